"""optimum-onnx's exports of tiny decoders (tests/fixtures/optimum/, made by tools/make_optimum_fixtures.py
in a second environment: optimum-onnx pins transformers < 4.58) through inspect, build and every engine.

For each fixture (two layers, hidden 64, norm weights and biases randomised; the checkpoint beside the
graph in ``hf/``): ``inspect``'s unit map equals the one of our exporter's export of the same
checkpoint (transformers' ``OnnxExporter`` for Gemma 2, which ours refuses; optimum's attention
soft-cap dropped aside, :data:`DROPPED`), names and weight layouts aside; the fp32 and int4 builds either succeed and every
engine they ship matches transformers 5 (the checkpoint loaded here) on 12 prompt tokens and 16
cached decode steps within the gate's tolerances (the comparison of tests/unit/test_family_matrix.py),
or are refused in the one line of :data:`REFUSED`. docs/families.md tabulates it.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cscompile.errors import UserError  # noqa: E402
from tests.unit.test_family_matrix import _one_line, _reference, check_engines  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "optimum"
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3")
#: families whose unit map is compared with transformers' exporter's export (ours refuses Gemma 2)
TRANSFORMERS_EXPORTER = ("gemma2",)
#: family -> (stage, pattern of the one-line refusal) at both precisions; the others build and run
REFUSED: dict[str, tuple[str, str]] = {
    # optimum exports Gemma 2 through transformers 4.57's SDPA attention, which has no soft-cap:
    # the graph computes another model than the checkpoint's config says
    "gemma2": (
        "build",
        r"attention soft-cap 0\.5 \(attn_logit_softcapping\), the graph computes none \(layer 0\)",
    ),
}
#: families whose dense engine ships GroupQueryAttention fusion (the others deviate from Llama)
FUSED = ("llama", "qwen2")
#: family -> {attention field: (optimum's graph, ours)}: what optimum's export drops, all else equal
DROPPED: dict[str, dict[str, tuple[Any, Any]]] = {"gemma2": {"attn_softcap": (None, 0.5)}}
#: unit-map fields that name graph values or describe a weight's storage, not the model
_NAMES = {"node", "weight", "bias", "embedding", "residual_in", "residual_out", "attn_input", "mlp_input",
          "mlp_act", "attn_context", "past_key", "past_value", "present_key", "present_value",
          "initializer", "weight_layout"}  # fmt: skip


def _facts(x: Any) -> Any:
    """A unit map's dict with names replaced by whether they are set, floats rounded to 6 digits."""
    if isinstance(x, dict):
        return {k: (v is not None if k in _NAMES else _facts(v)) for k, v in x.items() if k != "units"}
    if isinstance(x, (list, tuple)):
        return [_facts(v) for v in x]
    if isinstance(x, float):
        return float(f"{x:.6g}")
    return x


def _hf(family: str):
    return transformers.AutoModelForCausalLM.from_pretrained(
        FIXTURES / family / "hf", dtype=torch.float32
    ).eval()


class _Fixture:
    def __init__(self, family: str, root: Path) -> None:
        self.family = family
        self.dir = root / family  # a copy: builds write beside nothing, but keep the tree read-only
        shutil.copytree(FIXTURES / family, self.dir, ignore=shutil.ignore_patterns("hf"))
        self.hf = _hf(family)
        self.ids, self.ref = _reference(self.hf)
        self.builds: dict[str, Any] = {}
        self.root = root

    def build(self, precision: str):
        from cscompile.compiler.build import build_bundle

        if precision not in self.builds:
            self.builds[precision] = build_bundle(self.dir, self.root / f"{self.family}-{precision}.csb",
                                                  precision=precision)  # fmt: skip
        return self.builds[precision]


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("optimum")
    made: dict[str, _Fixture] = {}

    def get(family: str) -> _Fixture:
        if family not in made:
            made[family] = _Fixture(family, root)
        return made[family]

    return get


def test_the_fixtures_are_small_and_say_what_made_them():
    total = 0
    for family in FAMILIES:
        d = FIXTURES / family
        size = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
        assert size < 1_000_000, (family, size)
        total += size
        versions = json.loads((d / "versions.json").read_text())
        assert versions["optimum-onnx"] and versions["transformers"].startswith("4."), versions
        for name in (
            "model.onnx",
            "config.json",
            "hf/config.json",
            "hf/model.safetensors",
            "tokenizer/tokenizer.json",
        ):
            assert (d / name).is_file(), (family, name)
    assert total < 6_000_000, total


def _params(slow_families: tuple[str, ...]) -> list:
    return [pytest.param(f, marks=[pytest.mark.slow] if f in slow_families else [], id=f) for f in FAMILIES]


@pytest.mark.parametrize("family", _params(TRANSFORMERS_EXPORTER))
def test_inspect_reads_the_unit_map_of_our_export(family, tmp_path):
    """The same checkpoint, exported by optimum and by us, gives the same unit map."""
    from cscompile.models.export import export_hf_model, export_with_transformers
    from cscompile.passes.pipeline import analyze

    _, got = analyze(FIXTURES / family / "model.onnx")
    hf = _hf(family)
    if family in TRANSFORMERS_EXPORTER:
        path = export_with_transformers(hf, tmp_path)
    else:
        path = tmp_path / "model.onnx"
        export_hf_model(hf, path)
    _, want = analyze(path)
    assert got.num_layers == 2
    got_d, want_d = _facts(got.to_dict()), _facts(want.to_dict())
    for key, (theirs, ours) in DROPPED.get(family, {}).items():  # what optimum's graph leaves out
        for g, w in zip(got_d["layers"], want_d["layers"]):
            assert (g["attention"][key], w["attention"][key]) == (theirs, ours)
            w["attention"][key] = theirs
    assert got_d == want_d


@pytest.mark.parametrize("precision", ["fp32", pytest.param("int4", marks=pytest.mark.slow)])
@pytest.mark.parametrize("family", FAMILIES)
def test_the_build_matches_transformers_or_is_refused(fixtures, family, precision):

    fx = fixtures(family)
    want = REFUSED.get(family)
    if want is not None:
        stage, pattern = want
        with pytest.raises(UserError) as exc:
            fx.build(precision)
        assert re.search(pattern, _one_line(exc.value)), str(exc.value)
        return
    res = fx.build(precision)
    assert res.engines[0] == "dense"
    # what the issue found: fusion failing every optimum build ("no RoPE frequency constant")
    fused = res.manifest["engines"][0]["params"]["attention"]
    assert fused == ("gqa" if family in FUSED else "plain"), (fused, res.warnings)
    if precision == "int4":
        assert "native" in res.engines, res.warnings
    measures = check_engines(res, fx.ids, fx.ref, precision)
    assert np.isfinite(measures["dense"].max_abs)


def test_a_fused_gate_up_left_unsplit_is_refused_naming_it():
    """Without the fold after shape inference, optimum's Phi-3 gate_up stays one projection sliced at
    computed bounds: discovery refuses it naming both nodes, never reads it as a plain SiLU MLP."""
    from cscompile.passes import CanonicalizePass, DiscoverUnitsPass
    from cscompile.passes.pipeline import load_model, run_passes

    model = load_model(FIXTURES / "phi3" / "model.onnx")
    with pytest.raises(UserError) as exc:
        run_passes(model, [("canonicalize", CanonicalizePass(shape_inference=False)),
                           ("discover-units", DiscoverUnitsPass(1))])  # fmt: skip
    assert re.search(r"layer 0 \| MLP input projection '.*gate_up_proj/MatMul' gives 192 columns and the down "
                     r"projection '.*down_proj/MatMul' takes 96 \(a fused gate_up\)", _one_line(exc.value))  # fmt: skip
