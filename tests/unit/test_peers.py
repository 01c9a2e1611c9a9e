"""The peer benchmark's machinery: the shared timing/scoring loop, the worker processes, and
the coordinator on a tiny model (peers that cannot run here are reported, not dropped)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cscompile.evaluation import peers


class BigramRunner:
    """A fake model whose next-token logits depend on the last token only."""

    def __init__(self, table: np.ndarray, score_mode: str = "window") -> None:
        self.table = table
        self.score_mode = score_mode
        self.fed: list[int] = []

    def prefill(self, ids):
        self.fed = list(ids)
        return self.table[ids[-1]].copy(), 1.0

    def decode(self, token):
        self.fed.append(token)
        return self.table[token].copy()

    def score(self, ids):
        return self.table[np.asarray(ids)]


@pytest.fixture
def table():
    return np.random.default_rng(0).standard_normal((11, 11)).astype(np.float32)


def test_generate_is_greedy_and_feeds_its_own_tokens(table):
    r = BigramRunner(table)
    out = peers.generate(r, [3, 5], 6)
    want, t = [], 5
    for _ in range(6):
        t = int(np.argmax(table[t]))
        want.append(t)
    assert out["tokens"] == want
    assert r.fed == [3, 5, *want[:-1]]
    assert len(out["decode_ms"]) == 5 and "ttft_ms" in out  # timings: the machine's, only their shape


def test_window_and_decode_scoring_agree_with_a_direct_computation(table):
    ids = np.random.default_rng(1).integers(0, 11, 40)
    want = 0.0
    for b in range(0, 39, 16):
        chunk = ids[b : b + 16]
        for i in range(1, len(chunk)):
            z = table[chunk[i - 1]].astype(np.float64)
            want -= z[chunk[i]] - np.log(np.exp(z - z.max()).sum()) - z.max()
    n_want = sum(len(ids[b : b + 16]) - 1 for b in range(0, 39, 16))
    for mode in ("window", "decode"):
        nll, n = peers.score_nll(BigramRunner(table, mode), ids, window=16)
        assert n == n_want
        assert nll == pytest.approx(want, rel=1e-6)


def test_prefix_agreement():
    assert peers.prefix_agreement([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert peers.prefix_agreement([1, 2, 9, 4], [1, 2, 3, 4]) == 0.5
    assert peers.prefix_agreement([7], [1, 2]) == 0.0


def test_missing_modules_are_named():
    spec = peers.PeerSpec("x", "X", "fp32", ("numpy", "surely_not_a_module_here"))
    assert peers.missing_modules(spec) == ["surely_not_a_module_here"]


def test_a_worker_that_cannot_load_reports_why(tmp_path):
    w = peers.Worker("ort-dense", {"threads": 1, "n_ctx": 64, "onnx": str(tmp_path / "nope.onnx")},
                     tmp_path / "w.log")  # fmt: skip
    try:
        assert w.hello["ready"] is False
        assert "nope.onnx" in w.hello["error"]
    finally:
        w.close()


def _row(key, tps, ppl, status="ok", ours=False):
    return {"key": key, "label": key, "precision": "p", "ours": ours, "status": status, "tokens_per_s": tps,
            "perplexity": ppl, "decode_ms_median": 1000 / tps, "decode_ms_p90": 1000 / tps,
            "prefill_ms_median": 1.0, "ttft_ms_median": 1.0, "peak_rss_mb": 1.0, "ppl_mode": "window",
            "greedy_identical": "1/1", "greedy_agreement": 1.0}  # fmt: skip


def test_report_ratios_and_unavailable_peers():
    report = {
        "results": [
            _row("ours-a", 100.0, 15.0, ours=True),
            _row("ours-b", 50.0, 14.0, ours=True),
            _row("fast-peer", 150.0, 20.0),
            _row("slow-peer", 25.0, 14.0),
            _row("absent", float("nan"), float("nan"), status="not installed: absent (pip install absent)"),
        ],
        "prompts": ["a"], "prompt_tokens": [10], "new_tokens": 4, "threads": 2, "ppl_tokens": 100,
        "machine": {"date": "d", "processor": "cpu"}, "command": "c", "model": "m",
    }  # fmt: skip
    text = peers.headline(report)
    assert "fastest cscompile: ours-a" in text
    # each compared with the fastest of ours at its perplexity or better (within 0.1%)
    assert "vs fast-peer (p): ours-a 1.50× slower" in text
    assert "vs slow-peer (p): ours-b 2.00× faster" in text
    assert "vs ours-b (p): ours-b" not in text  # nothing of ours is faster at its quality
    assert "absent (p): not run: not installed: absent (pip install absent)" in text
    md = peers.to_markdown(report)
    assert "| absent | p | not run: not installed" in md
    assert "| 1.50× |" in md and "| 0.50× |" in md


def test_the_engine_a_bundle_chose_names_the_precision():
    from cscompile.bundle import Engine

    def engine(name, kind, params):
        return Engine(name, "native/engine.json", kind, params, {}, Path("x"))

    switch = {"motifs": ["native", "native-2"], "entropy_thresholds": [1.0], "hold": 0}
    got = peers.engine_precision(engine("native-switch-0", "native", {"switch": switch}))
    assert got == "int4 native step, switched per token (native-switch-0: native ↔ native-2)"
    assert peers.engine_precision(engine("native", "native", {"activations": "int16"})) is None
    assert peers.engine_precision(engine("motif-a", "motif", {"switch": switch})) is None


@pytest.mark.slow  # four subprocess workers, one importing PyTorch: 7 s of CPU
def test_coordinator_on_a_tiny_model(tiny_dir, tmp_path):
    from cscompile.compiler.build import build_bundle

    model = tiny_dir("llama-2l")
    bundle = tmp_path / "tiny.csb"
    build_bundle(model, bundle, precision="fp32")
    report = peers.run_peer_bench(
        model=model, systems=["ort-dense", "bundle", "llama.cpp", "pytorch"], bundle=bundle, threads=1,
        per_family=1, new_tokens=5, ppl_tokens=300, log_dir=tmp_path / "logs", say=lambda m: None,
    )  # fmt: skip
    rows = {r["key"]: r for r in report["results"]}
    assert list(rows) == ["pytorch", "ort-dense", "bundle", "llama.cpp"]  # the reference first
    for key in ("pytorch", "ort-dense", "bundle"):
        assert rows[key]["status"] == "ok", rows[key]["status"]
        runs = report["runs"][key]
        assert len(runs) == len(report["prompts"]) == 4
        assert all(len(r["tokens"]) == 5 for r in runs)
        assert rows[key]["peak_rss_mb"] > 10
    # the same weights in fp32 through three runtimes: same perplexity, same greedy tokens
    ref = rows["pytorch"]["perplexity"]
    assert rows["ort-dense"]["perplexity"] == pytest.approx(ref, rel=1e-3)
    assert rows["bundle"]["perplexity"] == pytest.approx(ref, rel=1e-3)
    assert rows["ort-dense"]["greedy_agreement"] == 1.0
    # no GGUF for the tiny model (or no llama-cpp-python here): reported with the reason
    assert rows["llama.cpp"]["status"] != "ok"
    assert "GGUF" in rows["llama.cpp"]["status"] or "not installed" in rows["llama.cpp"]["status"]
    assert "llama.cpp" in peers.headline(report)


def test_the_sensed_head_system_decodes_the_same_tokens(tiny_dir, tmp_path):
    from cscompile.compiler.build import build_bundle

    model = tiny_dir("llama-q-2l")
    bundle = tmp_path / "tiny-int4.csb"
    build_bundle(model, bundle, precision="int4", sensed_head="on")
    report = peers.run_peer_bench(
        model=model, systems=["bundle", "bundle-sensed"], bundle=bundle, threads=1,
        per_family=1, new_tokens=8, ppl_tokens=300, log_dir=tmp_path / "logs", say=lambda m: None,
    )  # fmt: skip
    rows = {r["key"]: r for r in report["results"]}
    assert rows["bundle-sensed"]["status"] == "ok", rows["bundle-sensed"]["status"]
    assert [r["tokens"] for r in report["runs"]["bundle-sensed"]] == [
        r["tokens"] for r in report["runs"]["bundle"]
    ]
    assert rows["bundle-sensed"]["perplexity"] == rows["bundle"]["perplexity"]  # scoring keeps the full head


@pytest.mark.slow  # a subprocess worker beside a 1.5 GB coordinator: 5 s
def test_worker_peak_rss_is_its_own(tiny_dir, tmp_path):
    big = np.ones(1_500 * 2**20 // 8)  # the coordinator's own peak must not leak into the worker's
    w = peers.Worker("ort-dense", {"threads": 1, "n_ctx": 64, "onnx": str(tiny_dir("llama-2l") / "model.onnx")},
                     tmp_path / "w.log")  # fmt: skip
    try:
        assert w.hello["ready"] is True, w.hello
        rss = w.call(op="rss")
        assert 10 < rss["peak_rss_mb"] < 1_000, rss
    finally:
        w.close()
        del big


def test_bench_peers_command(tiny_dir, tmp_path, capsys):
    import json

    from cscompile.cli.main import main
    from cscompile.compiler.build import build_bundle

    model = tiny_dir("llama-q-2l")  # GQA-fused bundle, context 256: perplexity windows shrink to fit
    bundle = tmp_path / "q.csb"
    build_bundle(model, bundle, precision="int4")
    out = tmp_path / "peers.json"
    code = main(["bench", "--peers", str(bundle), "--model", str(model), "--systems", "ort-dense,bundle,llama.cpp",
                 "--per-family", "1", "-n", "4", "--threads", "1", "--json", str(out)])  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    rows = {r["key"]: r for r in report["results"]}
    assert rows["bundle"]["status"] == "ok" and rows["ort-dense"]["status"] == "ok"
    assert report["ppl_window"] == 256 and np.isfinite(rows["bundle"]["perplexity"])
    assert rows["llama.cpp"]["status"] != "ok"
    assert "fastest cscompile" in capsys.readouterr().out
    assert main(["bench"]) == 2  # no bundle and no --peers: one line, exit 2


def test_bench_peers_refuses_unknown_systems(tiny_dir, capsys):
    from cscompile.cli.main import main

    model = str(tiny_dir("llama-q-2l"))
    capsys.readouterr()  # the fixture's own output
    code = main(["bench", "--peers", "--model", model, "--systems", "ort-dense,vllm"])
    err = capsys.readouterr().err
    assert code == 2 and "--systems | 'vllm'" in err and len(err.strip().splitlines()) == 1
