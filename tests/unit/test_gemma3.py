"""Gemma 3 through our exporter and the runtime, against transformers (tiny model built in code)."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from cscompile.models.tiny import build_tiny_gemma3, tiny_gemma3  # noqa: E402

ATOL = 1e-4  # fp32 ORT vs fp32 PyTorch; logits are O(1..30)


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    return build_tiny_gemma3(tmp_path_factory.mktemp("gemma3"))


def test_runtime_matches_transformers_past_the_sliding_window(gemma_dir):
    from cscompile.runtime import load_text_model

    hf = tiny_gemma3()  # same seed, same weights as the exported model
    window = hf.config.sliding_window
    tm = load_text_model(gemma_dir, threads=1)
    prompt = [0, 17, 42, 99, 5]
    state = tm.session.new_state(batch=1)
    got = [tm.prefill(prompt, state)]
    ids = list(prompt)
    for _ in range(16):  # 5 + 16 positions: well past the window of 6
        ids.append(int(np.argmax(got[-1])))
        got.append(tm.decode_one_token(ids[-1], state))
    assert len(ids) > 2 * window
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()  # [S, V]
    want = ref[len(prompt) - 1 :]  # the positions the runtime produced logits for
    diff = np.abs(np.stack(got) - want).max(axis=-1)
    assert diff.max() < ATOL, f"max |Δlogit| per step {np.round(diff, 6)}"
    # the soft-cap is on: no logit beyond it
    assert np.abs(np.stack(got)).max() < hf.config.final_logit_softcapping


def test_export_report_and_config(gemma_dir):
    report = json.loads((gemma_dir / "export.json").read_text())
    cfg = report["config"]
    assert report["max_abs_logit_diff"] < ATOL
    assert cfg["family"] == "gemma3" and cfg["sliding_layers"] == [0, 2] and cfg["sliding_window"] == 6


def test_unsupported_gemma_settings_are_refused():
    from cscompile.errors import UserError
    from cscompile.models.torch_decoder import config_from_hf

    cfg = tiny_gemma3().config
    cfg.attn_logit_softcapping = 50.0
    with pytest.raises(UserError, match="attn_logit_softcapping"):
        config_from_hf(cfg)


def test_raw_prompt_gets_bos_when_the_config_says_so(gemma_dir):
    from cscompile.decode.tokenizer import Tokenizer
    from cscompile.runtime import load_text_model

    tok = Tokenizer(gemma_dir / "tokenizer")
    plain = tok.encode("hello world")
    assert tok.add_bos_token and tok.bos_token_id is not None and plain[:1] != [tok.bos_token_id]
    assert tok.encode_raw("hello world") == [tok.bos_token_id, *plain]
    tm = load_text_model(gemma_dir, threads=1)
    assert tm.encode_prompt("hello world", chat=False) == [tok.bos_token_id, *plain]
    # BOS written by the user is not doubled
    assert tm.encode_prompt(tok.bos_token + "hello world", chat=False) == [tok.bos_token_id, *plain]


def test_chat_without_template_names_raw(gemma_dir, capsys):
    from cscompile.cli.main import main
    from cscompile.errors import UserError
    from cscompile.runtime import load_text_model

    with pytest.raises(UserError, match="--raw"):
        load_text_model(gemma_dir, threads=1).encode_prompt("hi", chat=True)
    assert main(["run", str(gemma_dir), "hello", "-n", "2", "--chat", "--threads", "1"]) == 2
    assert "--raw" in capsys.readouterr().err
    # without --chat/--raw a model without a template runs raw
    assert main(["run", str(gemma_dir), "hello", "-n", "2", "--threads", "1"]) == 0


def test_tokenizer_without_add_bos_keeps_raw_text_as_is(tiny_dir):
    """The tiny Llama tokenizer (like SmolLM2's) has a BOS token but neither config nor post-processor adds it."""
    from cscompile.decode.tokenizer import Tokenizer

    tok = Tokenizer(tiny_dir("llama-2l") / "tokenizer")
    assert tok.bos_token_id is not None and not tok.add_bos_token
    assert tok.encode_raw("hello world") == tok.encode("hello world")
