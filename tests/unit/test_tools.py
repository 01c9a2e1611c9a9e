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


def test_bench_vocab_refuses_bad_candidate_counts():
    for bad in ("0,64", "x", ""):
        res = _tool("tools/bench_vocab.py", "--ks", bad)
        assert res.returncode == 2 and "expected candidate counts >= 1" in res.stderr


def test_bench_vocab_refuses_bad_preview_choices():
    for args, needle in (
        (("--preview", "planes,q2"), "expected planes, copy or planes,copy"),
        (("--sweep-bits", "2,5"), "expected preview bit widths in 1..4"),
        (("--k1s", "0"), "expected candidate counts >= 1"),
    ):
        res = _tool("tools/bench_vocab.py", *args)
        assert res.returncode == 2 and needle in res.stderr, (args, res.stderr)


def test_bench_serve_refuses_bad_arguments():
    for args, needle in (
        (("--bundle", "x", "--clients", "4,x"), "expected comma-separated integers"),
        (("--bundle", "x", "--servers", "vllm"), "expected a comma-separated subset"),
        (("--bundle", "x", "--requests", "0"), "expected an integer >= 1"),
        (("--bundle", "x", "--rss-requests", "0"), "expected an integer >= 1"),
        (("--bundle", "/no/such/bundle"), "no such bundle"),
        (("--bundle", "/no/such/bundle", "--rss-requests", "10"), "no such bundle"),
    ):
        res = _tool("tools/bench_serve.py", *args)
        assert res.returncode == 2 and needle in res.stderr, (args, res.stderr)


def test_serve_overhead_refuses_bad_arguments():
    for args, needle in (
        (("--bundle", "x", "--prompts", "0"), "expected an integer >= 1"),
        (("--bundle", "x", "--py-spy", "-1"), "expected an integer >= 0"),
        (("--bundle", "/no/such/bundle"), "no such bundle"),
    ):
        res = _tool("tools/serve_overhead.py", *args)
        assert res.returncode == 2 and needle in res.stderr, (args, res.stderr)


def test_bench_prefill_refuses_bad_lengths_rounds_and_systems():
    for args, msg in (
        (("--lengths", "0,64"), "expected prompt lengths >= 1"),
        (("--lengths", "64,x"), "expected prompt lengths >= 1"),
        (("--rounds", "0"), "expected an integer >= 1"),
        (("--systems", "native,gpu"), "expected distinct names among native, dense, llama.cpp"),
    ):
        res = _tool("tools/bench_prefill.py", *args)
        assert res.returncode == 2 and msg in res.stderr, (args, res.stderr)


def test_bench_contention_refuses_bad_arguments_before_measuring(tmp_path):
    missing = _tool("tools/bench_contention.py", "--bundle", str(tmp_path / "none.csb"))
    assert missing.returncode == 2 and "no such bundle" in missing.stderr
    (tmp_path / "b.csb").write_bytes(b"")
    for flag, bad, want in (
        ("--rounds", "0", ">= 1"),
        ("--steps", "x", ">= 8"),
        ("--threads", "1", ">= 2"),
        ("--configs", "default,nope", "names from default"),
    ):
        res = _tool("tools/bench_contention.py", "--bundle", str(tmp_path / "b.csb"), flag, bad)
        assert (
            res.returncode == 2
            and f"expected {'' if flag == '--configs' else 'an integer '}{want}" in res.stderr
        )
        assert "contention:" not in res.stderr  # nothing started


def test_setup_reads_the_pinned_llama_cpp_version_from_pyproject():
    """tools/setup.sh --peers builds the llama-cpp-python wheel of the version pyproject pins: its
    sed must find it however the requirement is spelled (with extras or not)."""
    import re
    import subprocess

    script = (ROOT / "tools" / "setup.sh").read_text()
    line = next(ln for ln in script.splitlines() if ln.strip().startswith("LLAMA=$(sed"))
    cmd = line.strip()[len("LLAMA=$(") : -1]
    got = subprocess.run(["bash", "-c", cmd], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    pinned = re.search(
        r'"llama-cpp-python(?:\[[a-z,]+\])?==([0-9.]+)"', (ROOT / "pyproject.toml").read_text()
    )
    assert pinned and got == pinned.group(1)
