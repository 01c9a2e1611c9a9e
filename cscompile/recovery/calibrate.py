"""Calibration traces: run the instrumented model over prompts and store what recovery learns from.

For every prompt: a prefill, then greedy decode steps through the KV cache. Per layer and token
the trace keeps the sensing feature f(h) (hidden state after the input norm), the FFN
intermediate ``a`` (every block granularity's activity is derived from it and ``W_down``
offline), and the head-group activities. Shards are written one prompt at a time as ``.npz``
(float16 where it is enough; loaded with ``allow_pickle=False``), so memory stays bounded; the
trace directory is built in a temporary sibling and renamed into place when complete.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from cscompile import __version__
from cscompile.cache import atomic_dir, atomic_write_json, sha256_file
from cscompile.data.prompts import Prompt
from cscompile.decode.generate import model_paths
from cscompile.decode.session import DecoderSession, KVState
from cscompile.decode.tokenizer import Tokenizer
from cscompile.errors import UserError
from cscompile.passes import InstrumentPass, UnitMap
from cscompile.passes.pipeline import analyze, run_passes, save_model

TRACE_VERSION = 1


class InstrumentedSession(DecoderSession):
    """A decoder session that also returns the instrumentation outputs (``cs.L*``)."""

    def __init__(self, path: Path | str, threads: int | None = None) -> None:
        super().__init__(path, threads=threads)
        self.extra = [o.name for o in self.session.get_outputs() if o.name.startswith("cs.")]

    def step(self, input_ids: np.ndarray, state: KVState) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One forward: logits ``[B, S, V]`` and every ``cs.*`` output."""
        return self.run(input_ids, state, extra_outputs=self.extra)


@dataclass(frozen=True)
class TraceSet:
    """A calibration trace directory: ``manifest.json`` + ``shard-NNNN.npz`` + ``weights.npz``."""

    directory: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, directory: Path | str) -> TraceSet:
        import json

        d = Path(directory)
        try:
            manifest = json.loads((d / "manifest.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(
                "calibration traces",
                f"{d} has no readable manifest.json ({exc})",
                "a directory written by `cscompile calibrate`",
            ) from None
        if manifest.get("trace_version") != TRACE_VERSION:
            raise UserError(
                "calibration traces", f"version {manifest.get('trace_version')!r}", f"version {TRACE_VERSION}"
            )
        return cls(d, manifest)

    def shards(self) -> Iterator[dict[str, np.ndarray]]:
        for name in self.manifest["shards"]:
            with np.load(self.directory / name, allow_pickle=False) as z:
                yield {k: z[k] for k in z.files}

    def layer(self, key: str, layer: int) -> np.ndarray:
        """All tokens of one array (``feature``, ``act``, ``heads``) of one layer, concatenated."""
        return np.concatenate([s[f"{key}_L{layer}"] for s in self.shards()], axis=0)

    def down_weight(self, layer: int) -> np.ndarray:
        """``W_down`` of a layer as ``[I, H]`` (to derive block activities at any granularity)."""
        with np.load(self.directory / "weights.npz", allow_pickle=False) as z:
            return z[f"down_L{layer}"]


def collect_traces(
    model_dir: Path,
    prompts: list[Prompt],
    out_dir: Path,
    max_new_tokens: int = 32,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> TraceSet:
    """Run ``prompts`` (chat template applied) through the instrumented model; write the traces."""
    onnx_path, tok_dir = model_paths(model_dir)
    if not prompts:
        raise UserError("calibration prompts", "none given", "at least one prompt")
    model, um = analyze(onnx_path)
    model = run_passes(model, [("instrument", InstrumentPass(block_size=1))])
    tok = Tokenizer(tok_dir)
    with tempfile.TemporaryDirectory(prefix="cscompile-calib-") as work:
        inst_path = Path(work) / "instrumented.onnx"
        save_model(model, inst_path)
        sess = InstrumentedSession(inst_path, threads=threads)
        with atomic_dir(out_dir) as tmp:
            _save_weights(model, um, tmp / "weights.npz")
            shards, n_tokens = [], 0
            for i, p in enumerate(prompts):
                ids = (
                    tok.encode(tok.apply_chat_template(p.messages))
                    if tok.chat_template
                    else tok.encode(p.messages[-1]["content"])
                )
                rows = _trace_prompt(sess, um, ids, max_new_tokens)
                rows["family"] = np.array([p.family])
                name = f"shard-{i:04d}.npz"
                np.savez(tmp / name, **rows)  # type: ignore[arg-type]
                shards.append(name)
                n_tokens += int(rows["tokens"].shape[0])
                if progress:
                    progress(i + 1, len(prompts))
            manifest = {
                "trace_version": TRACE_VERSION,
                "cscompile": __version__,
                "model": str(onnx_path),
                "model_sha256": sha256_file(onnx_path),
                "layers": um.num_layers,
                "hidden_size": um.hidden_size,
                "intermediate_size": um.intermediate_size,
                "kv_groups": um.layers[0].attention.num_kv_heads,
                "max_new_tokens": max_new_tokens,
                "prompts": [{"id": p.id, "family": p.family} for p in prompts],
                "tokens": n_tokens,
                "shards": shards,
            }
            atomic_write_json(tmp / "manifest.json", manifest)
    return TraceSet(out_dir, manifest)


def _trace_prompt(
    sess: InstrumentedSession, um: UnitMap, ids: list[int], max_new_tokens: int
) -> dict[str, np.ndarray]:
    state = sess.new_state()
    logits, extra = sess.step(np.array([ids], np.int64), state)
    steps = [extra]
    tokens = list(ids)
    phase = [0] * len(ids)
    for _ in range(max_new_tokens):
        nxt = int(np.argmax(logits[0, -1]))
        tokens.append(nxt)
        phase.append(1)
        logits, extra = sess.step(np.array([[nxt]], np.int64), state)
        steps.append(extra)
    tokens, phase = tokens[: len(ids) + max_new_tokens], phase[: len(ids) + max_new_tokens]
    rows: dict[str, np.ndarray] = {"tokens": np.array(tokens, np.int32), "phase": np.array(phase, np.int8)}
    for layer in um.layers:
        tag = f"cs.L{layer.index}"
        for key, name, dtype in (
            ("feature", f"{tag}.feature", np.float16),
            ("act", f"{tag}.ffn.act", np.float16),
            ("heads", f"{tag}.attn.group_activity", np.float32),
        ):
            rows[f"{key}_L{layer.index}"] = np.concatenate([s[name][0] for s in steps], axis=0).astype(dtype)
    return rows


def _save_weights(model: ir.Model, um: UnitMap, path: Path) -> None:
    arrays = {}
    for layer in um.layers:
        d = layer.mlp.down
        w = model.graph.initializers[d.weight].const_value.numpy()  # type: ignore[union-attr]
        arrays[f"down_L{layer.index}"] = (w if d.weight_layout == "in_out" else w.T).astype(np.float32)
    np.savez(path, **arrays)  # type: ignore[arg-type]  # numpy stubs: **kwargs vs allow_pickle
