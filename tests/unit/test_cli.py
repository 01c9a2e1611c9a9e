"""The CLI: user errors are one line and exit 2; the commands work on a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cscompile.cli.main import EXIT_USER, main


def _run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_unknown_model_name(capsys):
    code, _, err = _run(["run", "not-a-model", "hi"], capsys)
    assert code == EXIT_USER
    assert err.strip().startswith("error: model | 'not-a-model'") and "Expected" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_fetch_unknown_name(capsys):
    code, _, err = _run(["model", "fetch", "gpt-17"], capsys)
    assert code == EXIT_USER and "Expected one of: gemma3-270m, smollm2" in err


def test_corrupt_onnx_file(tmp_path, capsys):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x08\x07garbage that is not a protobuf" * 10)
    code, _, err = _run(["run", str(bad), "hi"], capsys)
    assert code == EXIT_USER and "could not be loaded by ONNX Runtime" in err
    assert "Traceback" not in err


def test_onnx_without_kv_cache(tmp_path, capsys):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["input_ids"], ["logits"], to=TensorProto.FLOAT)],
        "no_cache",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s"])],
    )
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    code, _, err = _run(["run", str(path), "hi"], capsys)
    assert code == EXIT_USER and "has no KV-cache inputs" in err


def test_unwritable_cache_dir(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "f"
    blocker.write_text("x")
    code, _, err = _run(["model", "fetch", "smollm2", "--cache-dir", str(blocker / "c")], capsys)
    assert code == EXIT_USER and "cannot be written" in err


def test_oversize_prompt(tiny_dir, capsys):
    code, _, err = _run(["run", str(tiny_dir("llama-2l")), "word " * 400, "-n", "4"], capsys)
    assert code == EXIT_USER and "exceed the context of 256" in err


def test_bad_flag_is_a_usage_error(tiny_dir, capsys):
    code, _, err = _run(["run", str(tiny_dir("llama-2l")), "hi", "--top-p", "2"], capsys)
    assert code == 2 and "--top-p" in err


def test_run_streams_text(tiny_dir, tiny_model, capsys):
    code, out, _ = _run(
        ["run", str(tiny_dir("llama-2l")), "hello", "-n", "8", "--raw", "--threads", "1"], capsys
    )
    assert code == 0
    want = tiny_model.generate(
        "hello", __import__("cscompile.runtime", fromlist=["x"]).GenerationConfig(max_new_tokens=8)
    ).text
    assert out == want + "\n"


def test_eval_writes_json(tiny_dir, tmp_path, capsys):
    report = tmp_path / "r.json"
    code, out, _ = _run(
        ["eval", str(tiny_dir("llama-2l")), "--family", "math", "-n", "4", "--ppl-tokens", "200", "--window", "64",
         "--stride", "64", "--threads", "1", "--json", str(report)],
        capsys,
    )  # fmt: skip
    assert code == 0, out
    data = json.loads(report.read_text())
    assert data["summary"]["overall"]["prompts"] == 10
    assert all(r["new_tokens"] == 4 for r in data["runs"])
    assert data["perplexity"]["tokens_scored"] == 200 - 4  # 4 windows of 64: each first token has no context
    assert data["peak_rss_mb"] > 10
    assert "math" in out


def test_console_script_and_module_entry():
    res = subprocess.run([sys.executable, "-m", "cscompile", "--version"], capture_output=True, text=True)
    assert res.returncode == 0 and "cscompile" in res.stdout


@pytest.mark.parametrize("argv", [["--help"], ["model", "--help"], ["run", "--help"], ["eval", "--help"]])
def test_help(argv, capsys):
    assert main(argv) == 0
