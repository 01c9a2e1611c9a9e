"""Graph passes on the real SmolLM2: the unit map is right, and the same from every exporter and naming."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import run_logits, save, scramble_names, unit_map_signature

from cscompile.passes import InstrumentPass, PermuteFFNPass, admissible_block_sizes
from cscompile.passes.pipeline import analyze

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smol_map(smollm2):
    return analyze(smollm2.onnx, block_size=16)


def test_smollm2_unit_map(smol_map):
    _, um = smol_map
    assert um.architecture == "llama" and um.num_layers == 30
    assert um.vocab_size == 49152 and um.hidden_size == 576 and um.lm_head_tied
    for layer in um.layers:
        a = layer.attention
        assert (a.num_heads, a.num_kv_heads, a.group_size, a.head_dim, a.rope) == (9, 3, 3, 64, True)
        assert layer.mlp.kind == "swiglu" and layer.mlp.intermediate_size == 1536
    assert len([u for u in um.units if u.kind == "ffn_block"]) == 30 * 1536 // 16
    assert len([u for u in um.units if u.kind == "head_group"]) == 30 * 3
    assert admissible_block_sizes(um, "cpu") == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128]
    params = sum(u.params for u in um.units if u.kind == "layer") + um.vocab_size * um.hidden_size
    assert (
        params == 134_515_008 - 61 * 576
    )  # SmolLM2-135M has 134,515,008 weights; 61 norm scales are not units


def test_scrambled_copy_gives_the_same_map(smollm2, smol_map, tmp_path):
    scrambled = scramble_names(smollm2.onnx, tmp_path / "scrambled.onnx", seed=11)
    _, um = analyze(scrambled, block_size=16)
    assert unit_map_signature(um) == unit_map_signature(smol_map[1])


def test_second_exporter_gives_the_same_map(smollm2, smol_map, tmp_path):
    from transformers import AutoModelForCausalLM

    from cscompile.models.export import export_with_transformers

    hf = AutoModelForCausalLM.from_pretrained(str(smollm2.hf_dir)).eval()
    path = export_with_transformers(hf, tmp_path / "tx")
    _, um = analyze(path, block_size=16)
    assert unit_map_signature(um) == unit_map_signature(smol_map[1])


def test_permutation_and_instrumentation_keep_logits(smollm2, tmp_path):
    ids = np.array([[1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47]], np.int64)
    ref = run_logits(smollm2.onnx, ids, threads=2)
    model, um = analyze(smollm2.onnx)
    rng = np.random.default_rng(0)
    PermuteFFNPass({0: rng.permutation(1536), 29: rng.permutation(1536)})(model)
    InstrumentPass(block_size=16)(model)
    out = save(model, tmp_path / "perm_inst.onnx")
    np.testing.assert_allclose(run_logits(out, ids, threads=2), ref, rtol=1e-4, atol=2e-4)
