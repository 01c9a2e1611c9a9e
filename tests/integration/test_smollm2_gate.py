"""The correctness gate on the real model: the honest int4 build passes with margin (its measures
are the calibration of the tolerances, docs/design.md), and a native engine with a RoPE base 2x off
— small logit errors (max 2.7), the kind a dropped RoPE scaling gives — is dropped."""

from __future__ import annotations

import dataclasses

import pytest

from cscompile.compiler import gate
from cscompile.compiler.build import build_bundle
from cscompile.native import engine as native

pytestmark = pytest.mark.integration


def test_smollm2_int4_gate(smollm2, tmp_path, monkeypatch):
    res = build_bundle(smollm2.directory, tmp_path / "smol", precision="int4")
    rec = res.build["gate"]["engines"]
    assert res.engines[:2] == ("dense", "native")
    assert rec["dense"]["mean_kl"] <= gate.QUANT_KL / 20 and rec["dense"]["top1"] == 1.0  # 0.0023 measured
    assert rec["native"]["mean_kl"] <= 1e-4  # the source GGUF's grid, fp32 activations: 1.7e-7 measured
    original = native.weights_from_model

    def wrong_rope(*a, **kw):
        w = original(*a, **kw)
        return dataclasses.replace(w, config={**w.config, "rope_theta": w.config["rope_theta"] * 2})

    monkeypatch.setattr(native, "weights_from_model", wrong_rope)
    bad = build_bundle(smollm2.directory, tmp_path / "bad", precision="int4")
    assert bad.engines == ("dense",) and any(w.startswith("native engine dropped") for w in bad.warnings)
