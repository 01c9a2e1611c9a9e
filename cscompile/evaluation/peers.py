"""Peers side by side: cscompile against what a user would pick instead, on one machine, in one run.

Every system runs in its own worker process (so its peak RSS is its own and one library's
thread pool cannot slow another's), loaded one at a time; during the timed part exactly one
worker is running and the others are stopped (SIGSTOP), so the engines never compete for the
two cores. The systems take turns prompt by prompt and the order rotates, so drifts of the
machine hit all of them alike.

All systems see the *same token ids* (the project's tokenizer and chat template, so a
tokenizer difference cannot change the work), decode greedily for a fixed number of tokens
(EOS ignored), and are timed by the same worker loop: ``prefill(ids) -> logits`` then
``decode(token) -> logits`` per step, argmax in NumPy for everyone. Reported per system:

* decode tokens/s (median step) and p90 step,
* prefill ms (the prompt's forward pass) and time to first token (request → first token id:
  cache/generator setup + prefill + first selection),
* peak RSS of the worker process after generation (library, weights, caches, Python),
* perplexity on the reference text (windows of 512; a system whose sparsity acts only in
  decode — the switching runtime — is scored teacher-forced step by step, which for a dense
  model gives the same number), and greedy agreement with the PyTorch fp32 reference (the
  common prefix of the generated ids, as a fraction).

Systems (keys): ``pytorch``, ``ort-dense``, ``bundle``, ``bundle-ort``, ``bundle-motifs``, ``llama.cpp``,
``ort-genai-fp32``, ``ort-genai-int4``. A system that cannot run here — a package that is not
installed, a model its builder cannot make — is reported with the reason, never dropped.
Peer models are built once and cached under ``$CSCOMPILE_CACHE/peers``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cscompile.errors import UserError

PEERS_HINT = (
    "pip install -e '.[peers]' (bash tools/setup.sh --peers caches llama-cpp-python's compiled wheel)"
)


@dataclass(frozen=True)
class PeerSpec:
    key: str
    label: str
    precision: str
    needs: tuple[str, ...] = ()  # importable modules the worker needs
    install: str = ""  # how to get them
    ours: bool = False


SPECS: tuple[PeerSpec, ...] = (
    PeerSpec(
        "pytorch",
        "PyTorch eager (transformers)",
        "fp32",
        ("torch", "transformers"),
        "pip install -e '.[export]'",
    ),
    PeerSpec("ort-dense", "cscompile dense ORT", "fp32", ours=True),
    # the bundle's default engine: the native step (the source GGUF's grids kept exactly)
    PeerSpec("bundle", "cscompile bundle", "int4 (the source GGUF's grid, exact; native step)", ours=True),
    # the same engine whose greedy steps end with the bundle's sensed vocabulary head
    PeerSpec(
        "bundle-sensed",
        "cscompile bundle, sensed head",
        "int4 native step, head preview from its high bit plane + exact rows",
        ours=True,
    ),  # fmt: skip
    PeerSpec(
        "bundle-ort",
        "cscompile bundle, ORT engine",
        "int4 (the source GGUF's Q4_1 grid where it has one; int8 activations)",
        ours=True,
    ),
    PeerSpec(
        "bundle-motifs", "cscompile bundle, switching runtime", "int4 attention + fp32 sparse FFN", ours=True
    ),
    PeerSpec("llama.cpp", "llama.cpp (llama-cpp-python)", "the source GGUF file", ("llama_cpp",), PEERS_HINT),
    PeerSpec("ort-genai-fp32", "ONNX Runtime GenAI", "fp32", ("onnxruntime_genai",), PEERS_HINT),
    PeerSpec(
        "ort-genai-int4",
        "ONNX Runtime GenAI",
        "int4 (builder RTN, block 32)",
        ("onnxruntime_genai",),
        PEERS_HINT,
    ),
)
SPEC_BY_KEY = {s.key: s for s in SPECS}
BUNDLE_KEYS = ("bundle", "bundle-sensed", "bundle-ort", "bundle-motifs")
REFERENCE = "pytorch"  # greedy agreement is measured against this system's output


def missing_modules(spec: PeerSpec) -> list[str]:
    """Modules ``spec`` needs that are not importable here (found without importing them)."""
    return [m for m in spec.needs if importlib.util.find_spec(m) is None]


# -- runners (inside a worker) ------------------------------------------------------------


class Runner(Protocol):
    score_mode: str  # "window" (one forward per window) or "decode" (teacher-forced steps)

    def prefill(self, ids: list[int]) -> tuple[np.ndarray, float]:
        """Start a new sequence: logits [V] after the prompt, and the forward pass's ms."""
        ...

    def decode(self, token: int) -> np.ndarray:
        """Feed one token; logits [V] for the next."""
        ...

    def score(self, ids: np.ndarray) -> np.ndarray:
        """Logits [T, V] of a window ``ids [T]`` from a fresh cache."""
        ...


class SessionRunner:
    """A cscompile decoder session (dense ORT, a bundle's engine, the switching runtime)."""

    def __init__(
        self, session: Any, score_mode: str = "window", keep: Any = None, precision: str | None = None
    ) -> None:
        self.session = session
        self.score_mode = score_mode
        self._keep = keep  # e.g. an open bundle whose files the session reads
        self.precision = precision  # what actually ran, when the bundle decides it
        self._state: Any = None

    def prefill(self, ids: list[int]) -> tuple[np.ndarray, float]:
        # forward_last, as generation calls it: an engine that can skip the other positions' head
        # does (the native engine); the dense ORT graph computes every position's logits either way
        self._state = self.session.new_state()
        t = time.perf_counter()
        logits = self.session.forward_last(np.asarray([ids], np.int64), self._state)
        return logits, (time.perf_counter() - t) * 1e3

    def decode(self, token: int) -> np.ndarray:
        return self.session.forward(np.asarray([[token]], np.int64), self._state)[0, -1]

    def score(self, ids: np.ndarray) -> np.ndarray:
        return self.session.forward(ids[None].astype(np.int64), self.session.new_state())[0]


class SensedRunner(SessionRunner):
    """The bundle's native engine with its sensed vocabulary head: greedy steps return the token
    (:meth:`next_token`); scoring keeps the full head.
    """

    def next_token(self, token: int) -> int:
        return int(self.session.greedy_step(int(token), self._state))


class TorchRunner:
    score_mode = "window"

    def __init__(self, hf_dir: Path, threads: int) -> None:
        from cscompile.models.reference import TorchReference

        self.ref = TorchReference.from_dir(hf_dir, threads=threads)
        self.torch = self.ref.torch
        self._past: Any = None

    def _run(self, ids: list[int]) -> np.ndarray:
        with self.torch.no_grad():
            res = self.ref.model(
                input_ids=self.torch.tensor([ids]), past_key_values=self._past, use_cache=True
            )
        self._past = res.past_key_values
        return res.logits[0, -1].float().numpy()

    def prefill(self, ids: list[int]) -> tuple[np.ndarray, float]:
        from transformers import DynamicCache

        self._past = DynamicCache(config=self.ref.model.config)
        t = time.perf_counter()
        logits = self._run(ids)
        return logits, (time.perf_counter() - t) * 1e3

    def decode(self, token: int) -> np.ndarray:
        return self._run([token])

    def score(self, ids: np.ndarray) -> np.ndarray:
        return self.ref.logits(ids[None])[0]


class LlamaCppRunner:
    """llama.cpp through llama-cpp-python on the GGUF file the project starts from."""

    score_mode = "window"

    def __init__(self, gguf: Path, threads: int, n_ctx: int) -> None:
        from llama_cpp import Llama

        self._args: dict[str, Any] = dict(
            model_path=str(gguf), n_threads=threads, n_threads_batch=threads, verbose=False, seed=0
        )
        self.llm = Llama(n_ctx=n_ctx, n_batch=min(n_ctx, 512), logits_all=False, **self._args)
        self.vocab = self.llm.n_vocab()
        self._scorer: Any = None

    def _last_logits(self) -> np.ndarray:
        ptr = self.llm._ctx.get_logits()  # the last evaluated token's row (logits_all=False)
        return np.ctypeslib.as_array(ptr, shape=(self.vocab,)).copy()

    def prefill(self, ids: list[int]) -> tuple[np.ndarray, float]:
        self.llm.reset()
        t = time.perf_counter()
        self.llm.eval(ids)
        ms = (time.perf_counter() - t) * 1e3
        return self._last_logits(), ms

    def decode(self, token: int) -> np.ndarray:
        self.llm.eval([token])
        return self._last_logits()

    def score(self, ids: np.ndarray) -> np.ndarray:
        if self._scorer is None:  # all-position logits need their own context (made after timing)
            from llama_cpp import Llama

            n = max(512, len(ids))
            self._scorer = Llama(n_ctx=n, n_batch=n, logits_all=True, **self._args)
        s = self._scorer
        s.reset()
        s.eval([int(t) for t in ids])
        return np.asarray(s.scores[: len(ids)], np.float32).copy()


class GenAIRunner:
    """onnxruntime-genai's own generator over a model its builder made from the same weights."""

    score_mode = "window"

    def __init__(self, model_dir: Path, threads: int, n_ctx: int) -> None:
        import onnxruntime_genai as og

        self.og = og
        cfg = og.Config(str(model_dir))
        cfg.clear_providers()  # CPU
        cfg.overlay(
            json.dumps(
                {"model": {"decoder": {"session_options": {"intra_op_num_threads": threads,
                                                            "inter_op_num_threads": 1}}}}
            )
        )  # fmt: skip
        self.model = og.Model(cfg)
        self.n_ctx = n_ctx
        self._gen: Any = None

    def _generator(self, max_length: int) -> Any:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=max_length)
        return self.og.Generator(self.model, params)

    def prefill(self, ids: list[int]) -> tuple[np.ndarray, float]:
        self._gen = self._generator(self.n_ctx)
        t = time.perf_counter()
        self._gen.append_tokens(ids)
        ms = (time.perf_counter() - t) * 1e3
        return np.asarray(self._gen.get_logits()).reshape(-1), ms

    def decode(self, token: int) -> np.ndarray:
        self._gen.append_tokens([token])
        return np.asarray(self._gen.get_logits()).reshape(-1)

    def score(self, ids: np.ndarray) -> np.ndarray:
        gen = self._generator(len(ids) + 1)
        gen.append_tokens([int(t) for t in ids])
        return np.asarray(gen.get_output("logits"), np.float32)[0]


def engine_precision(engine: Any) -> str | None:
    """The precision column of a bundle engine the bundle itself chose (``None``: the spec's own).

    ``--engine motifs`` runs the motif engines of a ``--motifs`` bundle, or on a ``--pareto``
    bundle of the native engine its first switching point (native ↔ a reduced point per token).
    """
    switch = engine.params.get("switch") if engine.kind == "native" else None
    if isinstance(switch, dict):
        motifs = " ↔ ".join(str(m) for m in switch.get("motifs", []))
        return f"int4 native step, switched per token ({engine.name}: {motifs})"
    return None


def make_runner(key: str, cfg: dict[str, Any]) -> Runner:
    threads, n_ctx = int(cfg["threads"]), int(cfg["n_ctx"])
    if key == "pytorch":
        return TorchRunner(Path(cfg["hf_dir"]), threads)
    if key == "ort-dense":
        from cscompile.decode.session import DecoderSession

        return SessionRunner(DecoderSession(Path(cfg["onnx"]), threads=threads))
    if key in BUNDLE_KEYS:
        from cscompile.runtime import load

        engine = {"bundle": None, "bundle-sensed": None, "bundle-ort": "dense", "bundle-motifs": "motifs"}[
            key
        ]
        head = "sensed" if key == "bundle-sensed" else "full"
        bm = load(Path(cfg["bundle"]), threads=threads, engine=engine, head=head)
        runner = SensedRunner if key == "bundle-sensed" else SessionRunner
        return runner(bm.session, "decode" if key == "bundle-motifs" else "window", keep=bm,
                      precision=engine_precision(bm.engine))  # fmt: skip
    if key == "llama.cpp":
        return LlamaCppRunner(Path(cfg["gguf"]), threads, n_ctx)
    if key.startswith("ort-genai-"):
        return GenAIRunner(Path(cfg["genai_dir"]), threads, n_ctx)
    raise UserError("peer", f"'{key}'", f"one of {', '.join(SPEC_BY_KEY)}")


# -- the measurements (same code for every runner) ----------------------------------------


def generate(runner: Runner, ids: list[int], n: int) -> dict[str, Any]:
    """Greedy ``n`` tokens after ``ids``, timing prefill, time to first token and every step."""
    t0 = time.perf_counter()
    logits, prefill_ms = runner.prefill(ids)
    tok = int(np.argmax(logits))
    ttft_ms = (time.perf_counter() - t0) * 1e3
    out, steps = [tok], []
    next_token = getattr(runner, "next_token", None)  # a runner that picks the greedy token itself
    for _ in range(n - 1):
        t = time.perf_counter()
        tok = int(next_token(tok)) if next_token is not None else int(np.argmax(runner.decode(tok)))
        steps.append((time.perf_counter() - t) * 1e3)
        out.append(tok)
    return {"tokens": out, "prefill_ms": prefill_ms, "ttft_ms": ttft_ms, "decode_ms": steps}


def _nll(logits: np.ndarray, targets: np.ndarray) -> float:
    from cscompile.metrics import log_softmax

    lp = log_softmax(np.asarray(logits, np.float64))
    return -float(lp[np.arange(len(targets)), targets].sum())


def score_nll(runner: Runner, ids: np.ndarray, window: int = 512) -> tuple[float, int]:
    """Total NLL and count over non-overlapping windows (each scored from its first token)."""
    total, count = 0.0, 0
    for b in range(0, len(ids) - 1, window):
        chunk = ids[b : b + window]
        if len(chunk) < 2:
            break
        if runner.score_mode == "decode":
            rows = [runner.prefill([int(chunk[0])])[0]]
            rows += [runner.decode(int(t)) for t in chunk[1:-1]]
            logits = np.stack(rows)
        else:
            logits = runner.score(chunk)[:-1]
        total += _nll(logits, chunk[1:])
        count += len(chunk) - 1
    return total, count


def peak_rss_mb() -> float:
    """Peak RSS of this process since exec (``VmHWM``).

    ``ru_maxrss`` would not do: Linux carries the forking parent's high-water mark across exec,
    so every worker would report the coordinator's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # elsewhere: the best there is


def worker_main(key: str, cfg_json: str) -> int:
    """Serve one system over JSON lines: stdin commands, replies on the original stdout."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # libraries that print to stdout must not corrupt the protocol
    sys.stdout = sys.stderr
    cfg = json.loads(cfg_json)
    try:
        t = time.perf_counter()
        runner = make_runner(key, cfg)
        hello = {"ready": True, "load_s": time.perf_counter() - t, "rss_mb": _rss_mb()}
        if precision := getattr(runner, "precision", None):
            hello["precision"] = precision
        proto.write(json.dumps(hello) + "\n")
    except Exception as e:  # reported as the reason this system did not run
        proto.write(json.dumps({"ready": False, "error": f"{type(e).__name__}: {e}".splitlines()[0]}) + "\n")
        return 1
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["op"] == "generate":
                reply = generate(runner, cmd["ids"], cmd["n"])
            elif cmd["op"] == "nll":
                nll, count = score_nll(runner, np.asarray(cmd["ids"], np.int64), cmd.get("window", 512))
                reply = {"nll": nll, "count": count, "mode": runner.score_mode}
            elif cmd["op"] == "rss":
                reply = {"peak_rss_mb": peak_rss_mb(), "rss_mb": _rss_mb()}
            else:
                return 0
        except Exception as e:
            reply = {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
        proto.write(json.dumps(reply) + "\n")
    return 0


def _rss_mb() -> float:
    import psutil

    return float(psutil.Process().memory_info().rss) / 2**20


# -- the coordinator ----------------------------------------------------------------------


class Worker:
    """One system's worker process; stopped (SIGSTOP) whenever it is not the one being timed."""

    def __init__(self, key: str, cfg: dict[str, Any], log: Path, timeout_s: float = 1800) -> None:
        self.key = key
        self.log_path = log
        self._log = log.open("w")
        env = dict(os.environ, OMP_NUM_THREADS=str(cfg["threads"]), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cscompile.evaluation.peers", "worker", key, json.dumps(cfg)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, env=env,
        )  # fmt: skip
        self.timeout_s = timeout_s
        self.hello = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            return {"error": f"worker exited with {self.proc.returncode}: {self.last_log_line()}"}
        reply: dict[str, Any] = json.loads(line)
        return reply

    def last_log_line(self) -> str:
        self._log.flush()
        lines = [ln.strip() for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        return lines[-1][:300] if lines else "(no output)"

    def call(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.resume()
        try:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
            return self._read()
        except BrokenPipeError:
            self.proc.wait()
            return {"error": f"worker exited with {self.proc.returncode}: {self.last_log_line()}"}
        finally:
            self.pause()

    def pause(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.resume()
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@dataclass
class SystemResult:
    key: str
    label: str
    precision: str
    ours: bool
    status: str = "ok"  # "ok" or why it did not run
    load_s: float = float("nan")
    runs: list[dict[str, Any]] = field(default_factory=list)
    peak_rss_mb: float = float("nan")
    perplexity: float = float("nan")
    ppl_mode: str = ""
    greedy_agreement: float = float("nan")
    greedy_identical: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def summary(self) -> dict[str, Any]:
        steps = [ms for r in self.runs for ms in r["decode_ms"]]
        med = float(np.median(steps)) if steps else float("nan")
        out = {k: v for k, v in asdict(self).items() if k != "runs"}
        out.update(
            decode_ms_median=med,
            decode_ms_p90=float(np.percentile(steps, 90)) if steps else float("nan"),
            tokens_per_s=1000.0 / med if steps else float("nan"),
            prefill_ms_median=float(np.median([r["prefill_ms"] for r in self.runs]))
            if self.runs
            else float("nan"),
            ttft_ms_median=float(np.median([r["ttft_ms"] for r in self.runs])) if self.runs else float("nan"),
        )
        return out


def prefix_agreement(a: list[int], ref: list[int]) -> float:
    """Fraction of ``ref`` that ``a`` reproduces before the first differing token."""
    n = 0
    for x, y in zip(a, ref):
        if x != y:
            break
        n += 1
    return n / max(1, len(ref))


def build_genai_model(hf_dir: Path, out: Path, precision: str, log: Callable[[str], None]) -> Path:
    """onnxruntime-genai's builder on the fp32 checkpoint (cached; built in a temp dir, then renamed)."""
    if (out / "genai_config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        log(f"building the onnxruntime-genai {precision} model (its own builder, about 20 s)")
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o",
               str(tmp / "model"), "-p", precision, "-e", "cpu", "-c", str(tmp / "cache")]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0 or not (tmp / "model" / "genai_config.json").is_file():
            tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"onnxruntime-genai builder failed ({res.returncode}): {tail[0][:300]}")
        (tmp / "model").rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def prepare(key: str, ctx: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """The worker config of ``key`` (building and caching what it needs); raises with a reason."""
    art = ctx["artifacts"]
    cfg: dict[str, Any] = {"threads": ctx["threads"], "n_ctx": ctx["n_ctx"]}
    if key == "pytorch":
        cfg["hf_dir"] = str(art.hf_dir)
    elif key == "ort-dense":
        cfg["onnx"] = str(art.onnx)
    elif key in BUNDLE_KEYS:
        cfg["bundle"] = str(ctx["bundle"]())
    elif key == "llama.cpp":
        from cscompile.passes.precision import find_source_gguf

        gguf = find_source_gguf(art.directory)
        if gguf is None:
            raise RuntimeError(
                f"no source GGUF in {art.directory / 'source'} (llama.cpp runs GGUF files only)"
            )
        cfg["gguf"] = str(gguf)
    elif key.startswith("ort-genai-"):
        prec = key.rsplit("-", 1)[1]
        cfg["genai_dir"] = str(
            build_genai_model(art.hf_dir, ctx["peer_dir"] / f"ort-genai-{prec}", prec, log)
        )
    return cfg


def _cache_name(model: str | Path) -> str:
    path = Path(model)
    if not path.is_dir():
        return str(model)
    import hashlib

    return f"{path.name}-{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]}"


def model_artifacts(model: str | Path) -> Any:
    """A zoo name (fetched and cached) or a directory in the fetched-model layout."""
    from cscompile.models.zoo import ModelArtifacts, fetch

    path = Path(model)
    if path.is_dir():
        if not (path / "model.onnx").is_file() or not (path / "tokenizer").is_dir():
            raise UserError(
                "--model", f"{path} has no model.onnx and tokenizer/", "a fetched-model directory"
            )
        man = path / "manifest.json"
        return ModelArtifacts(path, json.loads(man.read_text()) if man.is_file() else {})
    return fetch(str(model))


def motif_refusal(onnx_path: Path) -> tuple[str | None, Any]:
    """Why the motif engines cannot lower ``onnx_path`` (or None), and the analysis that says so
    (handed to the build, which then does not analyze the source again).
    """
    from cscompile.motifs.segments import lowering_refusal
    from cscompile.passes.pipeline import analyze

    analysis = analyze(onnx_path)
    return lowering_refusal(analysis[1]), analysis


def default_bundle(art: Any, cache: Path, log: Callable[[str], None]) -> Path:
    """The bundle the benchmark runs when none is given: int4 dense + native + motif family, cached."""
    from cscompile.compiler.build import build_bundle
    from cscompile.steps.base import Lines

    path = cache / "int4-native-motifs-sensed.csb"  # renamed when a build adds a part the systems need
    if not path.exists():
        log(
            f"building {path.name} (cscompile build --motifs: int4 + native engines + motif family, a few minutes)"
        )
        # a family the motif engines do not lower (Gemma): the rest still runs, built once without it
        why, analysis = motif_refusal(art.directory / "model.onnx")
        if why is not None:
            log(f"no motif family for this model ({why}); building without it")
        build_bundle(art.directory, path, precision="int4", motifs=why is None, progress=Lines(log),
                     analysis=analysis)  # fmt: skip
    return path


def run_peer_bench(
    model: str | Path = "smollm2",
    systems: list[str] | None = None,
    bundle: Path | None = None,
    threads: int = 2,
    per_family: int = 1,
    new_tokens: int = 64,
    ppl_tokens: int = 4096,
    log_dir: Path | None = None,
    say: Callable[[str], None] = print,
    prompts_path: Path | None = None,
    families: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Measure every system in ``systems`` (default: all) on ``model``; the JSON-ready report.

    Prompts: ``per_family`` of each of ``families`` (default code, math, summarization,
    dialogue: retrieval prompts are long prefills) from ``prompts_path`` (default: the shipped set).
    """
    from cscompile.cache import cache_root
    from cscompile.data.prompts import load_prompts
    from cscompile.decode.tokenizer import Tokenizer
    from cscompile.evaluation.report import machine_info
    from cscompile.metrics import reference_corpus

    keys = systems or [s.key for s in SPECS]
    for k in keys:
        if k not in SPEC_BY_KEY:
            raise UserError("--systems", f"'{k}'", f"some of {', '.join(SPEC_BY_KEY)}")
    if REFERENCE in keys:  # the reference first: everyone's agreement is measured against it
        keys = [REFERENCE] + [k for k in keys if k != REFERENCE]
    art = model_artifacts(model)
    tok = Tokenizer(art.tokenizer_dir)
    prompts = []
    for fam in families or ("code", "math", "summarization", "dialogue"):
        prompts += load_prompts(prompts_path, [fam])[:per_family]
    if not prompts:
        raise UserError("peer benchmark prompts", "none selected", "a prompt file with the chosen families")
    # the chat template when the model has one; else raw text (BOS as its tokenizer's config says)
    prompt_ids = [
        tok.encode(tok.apply_chat_template(p.messages))
        if tok.chat_template
        else tok.encode_raw("\n\n".join(m["content"] for m in p.messages))
        for p in prompts
    ]
    corpus = np.asarray(tok.encode(reference_corpus())[:ppl_tokens], np.int64)
    peer_dir = cache_root() / "peers" / _cache_name(model)
    peer_dir.mkdir(parents=True, exist_ok=True)
    bundle_cache: list[Path] = []

    def get_bundle() -> Path:
        if not bundle_cache:
            bundle_cache.append(bundle or default_bundle(art, peer_dir, say))
        return bundle_cache[0]

    from cscompile.metrics import scoring_window

    window = scoring_window(art.directory)
    ctx = {
        "artifacts": art,
        "threads": threads,
        "n_ctx": int(np.ceil((max(map(len, prompt_ids)) + new_tokens + 8) / 64) * 64),
        "peer_dir": peer_dir,
        "bundle": get_bundle,
    }
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="cscompile-peers-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, SystemResult] = {}
    workers: dict[str, Worker] = {}
    try:
        for k in keys:  # load one at a time
            spec = SPEC_BY_KEY[k]
            res = results[k] = SystemResult(k, spec.label, spec.precision, spec.ours)
            missing = missing_modules(spec)
            if missing:
                res.status = f"not installed: {', '.join(missing)} ({spec.install})"
                say(f"{k}: {res.status}")
                continue
            try:
                cfg = prepare(k, ctx, say)
            except Exception as e:
                res.status = f"could not prepare: {e}".splitlines()[0]
                say(f"{k}: {res.status}")
                continue
            say(f"{k}: loading")
            w = Worker(k, cfg, log_dir / f"{k}.log")
            if not w.hello.get("ready"):
                res.status = f"failed to load: {w.hello.get('error')}"
                say(f"{k}: {res.status}")
                w.close()
                continue
            res.load_s = w.hello["load_s"]
            res.precision = w.hello.get("precision", res.precision)
            w.pause()
            workers[k] = w
        live = [k for k in keys if k in workers]
        for k in live:  # warm-up: first-run allocations, thread pools
            _check(workers[k].call(op="generate", ids=prompt_ids[0], n=4), results[k])
        for i, ids in enumerate(prompt_ids):
            order = live[i % len(live) :] + live[: i % len(live)] if live else []
            for k in order:
                if results[k].ok:
                    reply = workers[k].call(op="generate", ids=ids, n=new_tokens)
                    if _check(reply, results[k]):
                        results[k].runs.append({"prompt": prompts[i].id, **reply})
            say(f"[{i + 1}/{len(prompt_ids)}] {prompts[i].id}")
        for k in live:
            if results[k].ok:
                reply = workers[k].call(op="rss")
                if _check(reply, results[k]):
                    results[k].peak_rss_mb = reply["peak_rss_mb"]
        for k in live:
            if results[k].ok:
                say(f"{k}: perplexity over {len(corpus)} tokens")
                reply = workers[k].call(op="nll", ids=corpus.tolist(), window=window)
                if _check(reply, results[k]):
                    results[k].perplexity = float(np.exp(reply["nll"] / reply["count"]))
                    results[k].ppl_mode = reply["mode"]
    finally:
        for w in workers.values():
            w.close()
    ref = results.get(REFERENCE)
    if ref is not None and ref.ok and ref.runs:
        for r in results.values():
            if r.ok and r.runs:
                agree = [prefix_agreement(a["tokens"], b["tokens"]) for a, b in zip(r.runs, ref.runs)]
                r.greedy_agreement = float(np.mean(agree))
                r.greedy_identical = f"{sum(a == 1.0 for a in agree)}/{len(agree)}"
    rows = [r.summary() for r in results.values()]
    return {
        "command": "",
        "machine": machine_info(),
        "threads": threads,
        "model": Path(model).name if Path(model).is_dir() else str(model),
        "prompts": [p.id for p in prompts],
        "prompt_tokens": [len(x) for x in prompt_ids],
        "prompt_form": "chat template" if tok.chat_template else "raw text, no chat template",
        "new_tokens": new_tokens,
        "ppl_tokens": int(len(corpus)),
        "ppl_window": window,
        "reference": REFERENCE,
        "results": rows,
        "runs": {k: r.runs for k, r in results.items()},
        "logs": str(log_dir),
    }


def _check(reply: dict[str, Any], res: SystemResult) -> bool:
    if "error" in reply:
        res.status = f"failed: {reply['error']}"
        return False
    return True


# -- reporting ------------------------------------------------------------------------------


def _name(r: dict[str, Any]) -> str:
    return f"{r['label']} ({r['precision']})"


# perplexities within 0.1% count as equal quality: the same weights through two runtimes differ by ~1e-4
PPL_TOL = 1e-3


def fastest_ours(rows: list[dict[str, Any]], max_ppl: float | None = None) -> dict[str, Any] | None:
    """The fastest cscompile row (decode), among those at ``max_ppl`` or better when it is given."""
    ours = [r for r in rows if r["ours"] and r["status"] == "ok" and np.isfinite(r["tokens_per_s"])]
    if max_ppl is not None:
        ours = [r for r in ours if r["perplexity"] <= max_ppl * (1 + PPL_TOL)]
    return max(ours, key=lambda r: r["tokens_per_s"]) if ours else None


def match_for(rows: list[dict[str, Any]], row: dict[str, Any]) -> dict[str, Any] | None:
    """What ``row`` is compared with: the fastest cscompile system at its quality or better, else
    (no such system ran) the fastest one.
    """
    same = fastest_ours(rows, row["perplexity"]) if np.isfinite(row["perplexity"]) else None
    return same or fastest_ours(rows)


def to_markdown(report: dict[str, Any]) -> str:
    rows = report["results"]
    lines = [
        "| system | precision | decode tok/s | ms/token (p90) | prefill ms | TTFT ms | peak RSS MB | perplexity "
        "| greedy = PyTorch (prefix) | decode vs fastest cscompile at its perplexity or better |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['label']} | {r['precision']} | not run: {r['status']} |||||||")
            continue
        best = match_for(rows, r)
        ratio = r["tokens_per_s"] / best["tokens_per_s"] if best else float("nan")
        ppl = f"{r['perplexity']:.3f}" + (" (decode)" if r["ppl_mode"] == "decode" else "")
        lines.append(
            f"| {r['label']} | {r['precision']} | {r['tokens_per_s']:.1f} | {r['decode_ms_median']:.2f} "
            f"({r['decode_ms_p90']:.2f}) | {r['prefill_ms_median']:.1f} | {r['ttft_ms_median']:.1f} | "
            f"{r['peak_rss_mb']:.0f} | {ppl} | {r['greedy_identical']} ({r['greedy_agreement']:.2f}) | "
            f"{ratio:.2f}× |"
        )
    m = report["machine"]
    lines.append(
        f"\n{len(report['prompts'])} prompts (median {np.median(report['prompt_tokens']):.0f} tokens, "
        f"{report.get('prompt_form', 'chat template')}) × {report['new_tokens']} greedy tokens, {report['threads']} threads, each system in its own "
        f"process, one running at a time; perplexity over {report['ppl_tokens']} tokens of pydoc_data.topics "
        f"(windows of {report.get('ppl_window', 512)}; “decode” = teacher-forced decode steps). {m['date']}, {m['processor']}{', ' + m['isa'] if m.get('isa') else ''}. "
        f"Command: `{report['command']}`."
    )
    return "\n".join(lines)


def headline(report: dict[str, Any]) -> str:
    """One line per system: how far ahead or behind the fastest cscompile system at its quality
    (perplexity within 0.1%, or better) it is — the fastest one overall if none is.
    """
    rows = [r for r in report["results"] if r["status"] == "ok"]
    fastest = fastest_ours(rows)
    if fastest is None:
        return "no cscompile system ran"
    out = [
        f"fastest cscompile: {_name(fastest)} {fastest['tokens_per_s']:.1f} tok/s, ppl {fastest['perplexity']:.3f}"
    ]
    for r in rows:
        best = match_for(rows, r)
        if best is None or r is best:
            continue
        ratio = best["tokens_per_s"] / r["tokens_per_s"]
        word = "faster" if ratio >= 1 else "slower"
        out.append(
            f"  vs {_name(r)}: {best['label']} {ratio if ratio >= 1 else 1 / ratio:.2f}× {word} "
            f"({best['tokens_per_s']:.1f} vs {r['tokens_per_s']:.1f} tok/s, ppl {best['perplexity']:.3f} vs "
            f"{r['perplexity']:.3f}; first token {best['ttft_ms_median']:.0f} vs {r['ttft_ms_median']:.0f} ms)"
        )
    for r in report["results"]:
        if r["status"] != "ok":
            out.append(f"  {r['label']} ({r['precision']}): not run: {r['status']}")
    return "\n".join(out)


def plot(report: dict[str, Any], path: Path) -> None:
    """Decode tokens/s against perplexity, one numbered point per system (up and left is better):
    every system, and beside it the equal-quality corner (perplexity within 2% of the best).
    """
    from cscompile.evaluation.plotting import pyplot

    plt = pyplot()
    rows = [r for r in report["results"] if r["status"] == "ok" and np.isfinite(r["perplexity"])]
    if not rows:
        return
    best_ppl = min(r["perplexity"] for r in rows)
    near = [r for r in rows if r["perplexity"] <= 1.02 * best_ppl]
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2))
    for ax, subset, title in (
        (axes[0], rows, "all systems"),
        (axes[1], near, "at equal quality (perplexity within 2% of the best)"),
    ):
        for r in subset:
            i = rows.index(r) + 1
            color = "#2a7" if r["ours"] else "#a44"
            ax.scatter(r["perplexity"], r["tokens_per_s"], s=60, color=color, zorder=3)
            ax.annotate(str(i), (r["perplexity"], r["tokens_per_s"]), textcoords="offset points",
                        xytext=(6, -3), fontsize=8, color=color)  # fmt: skip
        ax.set_xlabel("perplexity (lower is better)")
        ax.set_ylabel("decode tokens/s (higher is better)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.set_title(title, fontsize=9)
    lines = [f"{i}. {r['label']} ({r['precision']}): {r['tokens_per_s']:.0f} tok/s, ppl {r['perplexity']:.3f}"
             for i, r in enumerate(rows, 1)]  # fmt: skip
    fig.text(0.01, 0.01, "\n".join(lines), fontsize=7, va="bottom", family="monospace")
    fig.suptitle(
        f"{report['model']}: cscompile (green) vs peers (red), {report['threads']} threads, "
        f"{report['new_tokens']} tokens × {len(report['prompts'])} prompts",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.03 + 0.022 * len(lines), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _cli() -> int:
    if len(sys.argv) >= 4 and sys.argv[1] == "worker":
        return worker_main(sys.argv[2], sys.argv[3])
    print("usage: python -m cscompile.evaluation.peers worker KEY CONFIG_JSON (run by the coordinator)")
    return 2


if __name__ == "__main__":
    sys.exit(_cli())
