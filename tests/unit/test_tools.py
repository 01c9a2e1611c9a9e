"""Bad input to the repo's benchmark tools: one clear line, exit 2, nothing measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_bench_peers_render_refuses_what_it_did_not_save(tmp_path):
    missing = _tool("tools/bench_peers.py", "--render", str(tmp_path / "none.json"))
    assert (
        missing.returncode == 2
        and "--render" in missing.stderr
        and "cannot read it as JSON" in missing.stderr
    )
    (tmp_path / "bad.json").write_text("{not json")
    bad = _tool("tools/bench_peers.py", "--render", str(tmp_path / "bad.json"))
    assert bad.returncode == 2 and "cannot read it as JSON" in bad.stderr
    (tmp_path / "other.json").write_text(json.dumps({"rows": []}))
    other = _tool("tools/bench_peers.py", "--render", str(tmp_path / "other.json"))
    assert other.returncode == 2 and "has no 'results' list" in other.stderr
    assert not (tmp_path / "other.png").exists()


def test_bench_peers_render_redraws_a_saved_report(tmp_path):
    row = {"key": "bundle", "label": "cscompile bundle", "precision": "int4", "ours": True, "status": "ok",
           "tokens_per_s": 100.0, "perplexity": 15.0, "decode_ms_median": 10.0, "decode_ms_p90": 11.0,
           "prefill_ms_median": 5.0, "ttft_ms_median": 6.0, "peak_rss_mb": 100.0, "ppl_mode": "window",
           "greedy_identical": "1/1", "greedy_agreement": 1.0}  # fmt: skip
    peer = {
        **row,
        "key": "llama.cpp",
        "label": "llama.cpp",
        "ours": False,
        "tokens_per_s": 50.0,
        "perplexity": 15.1,
    }
    report = {"results": [row, peer], "prompts": ["a"], "prompt_tokens": [10], "new_tokens": 4, "threads": 2,
              "ppl_tokens": 100, "machine": {"date": "d", "processor": "cpu"}, "command": "c", "model": "m"}  # fmt: skip
    path = tmp_path / "peers.json"
    path.write_text(json.dumps(report))
    res = _tool("tools/bench_peers.py", "--render", str(path))
    assert res.returncode == 0, res.stderr
    assert "vs llama.cpp (int4): cscompile bundle 2.00× faster" in res.stdout
    assert (tmp_path / "peers.png").stat().st_size > 0


def test_ab_native_refuses_an_unknown_revision():
    res = _tool("tools/ab_native.py", "--base", "no-such-revision-here")
    assert res.returncode == 2
    assert "--base no-such-revision-here: no cscompile/native/csrc/qdecode.c at that revision" in res.stderr
