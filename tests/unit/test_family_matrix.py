"""The decoder families people deploy, each exported two ways, built and run against transformers.

For every family of :data:`cscompile.models.tiny.FAMILIES` (two layers, random weights, norm weights
and biases randomised) and every exporter (ours: :func:`~cscompile.models.export.export_hf_model`;
transformers' ``OnnxExporter``: :func:`~cscompile.models.export.export_with_transformers`), either
the case is refused in one line naming the setting or node (:data:`REFUSED`), or ``inspect``, the
fp32 and int4 builds and every engine each build ships agree with transformers on a prompt of 12
tokens and 16 cached decode steps (teacher-forced on transformers' greedy continuation), past the
sliding window (8) and the RoPE scaling's original context (16), within the gate's tolerances
(:mod:`cscompile.compiler.gate`) and, at int4, a mean KL of at most :data:`INT4_KL`. docs/families.md
tabulates what this file checks.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from cscompile.compiler import gate  # noqa: E402
from cscompile.errors import UserError  # noqa: E402
from cscompile.models.tiny import (  # noqa: E402
    FAMILIES,
    FAMILY_ORIGINAL_CONTEXT,
    FAMILY_WINDOW,
    tiny_family,
    write_tokenizer,
)

PROMPT = 12
STEPS = 16
#: int4 engines (round-to-nearest, 32-wide blocks) on these models measure 0.12-0.24 nats against
#: transformers; the gate's own bound (1.0) is for gross breakage only
INT4_KL = 0.5

#: (family, exporter) -> (stage, pattern of the one-line refusal); every other case runs
REFUSED: dict[tuple[str, str], tuple[str, str]] = {
    **{
        (f, "ours"): ("export", rf"model_type '{t}'")
        for f, t in (
            ("gemma2", "gemma2"),
            ("olmo2", "olmo2"),
            ("gpt-neox", "gpt_neox"),
        )
    },  # fmt: skip
    **{
        (f"llama-rope-{k}", x): (
            "export",
            rf"RoPE scaling '{k}' \(frequencies that change with the sequence length",
        )
        for k in ("dynamic", "longrope")
        for x in ("ours", "transformers")
    },
    # its per-head interleaved QKV is split at canonicalization; the parallel residual is refused
    ("gpt-neox", "transformers"): (
        "inspect",
        r"layer 0 \| parallel residual \(the MLP's norm reads the layer input",
    ),
}
#: (family, exporter) -> what the native step names when it refuses (int4 builds); others ship it
NO_NATIVE: dict[tuple[str, str], str] = {}
EXPORTERS = ("ours", "transformers")


def _reference(hf) -> tuple[list[int], np.ndarray]:
    """transformers' greedy continuation of a fixed prompt and its logits there: ``[1 + STEPS, V]``."""
    gen = torch.Generator().manual_seed(1)
    ids = [int(x) for x in torch.randint(3, 300, (PROMPT,), generator=gen)]
    with torch.no_grad():
        for _ in range(STEPS):
            ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
        ref = hf(torch.tensor([ids])).logits[0].double().numpy()
    return ids, ref[PROMPT - 1 : PROMPT + STEPS]


def _trace(tm, ids: list[int]) -> np.ndarray:
    """An engine's logits: the prefill's last position, then each cached step on ``ids``."""
    state = tm.session.new_state(batch=1)
    out = [tm.prefill(ids[:PROMPT], state)]
    for t in ids[PROMPT : PROMPT + STEPS]:
        out.append(tm.decode_one_token(t, state))
    return np.stack(out).astype(np.float64)


def _export(hf, exporter: str, out: Path) -> Path:
    from cscompile.models.export import export_hf_model, export_with_transformers

    out.mkdir(parents=True, exist_ok=True)
    if exporter == "ours":
        export_hf_model(hf, out / "model.onnx")
    else:
        export_with_transformers(hf, out)
    (out / "config.json").write_text(hf.config.to_json_string())
    write_tokenizer(out / "tokenizer")
    return out


def _one_line(exc: UserError) -> str:
    msg = str(exc)
    assert "\n" not in msg, msg
    return msg


class _Case:
    """One (family, exporter): the transformers model, its reference run, the export or its refusal."""

    def __init__(self, family: str, exporter: str, root: Path) -> None:
        self.family, self.exporter = family, exporter
        self.hf = tiny_family(family)
        self.ids, self.ref = _reference(self.hf)
        self.dir: Path | None = None
        self.refusal: tuple[str, str] | None = None
        try:
            self.dir = _export(self.hf, exporter, root / f"{family}-{exporter}")
        except UserError as exc:
            self.refusal = ("export", _one_line(exc))
        self.builds: dict[str, object] = {}

    def build(self, precision: str, root: Path):
        from cscompile.compiler.build import build_bundle

        if precision not in self.builds:
            assert self.dir is not None
            self.builds[precision] = build_bundle(self.dir, root / f"{self.family}-{self.exporter}-{precision}.csb",
                                                  precision=precision)  # fmt: skip
        return self.builds[precision]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    made: dict[tuple[str, str], _Case] = {}

    def get(family: str, exporter: str) -> _Case:
        if (family, exporter) not in made:
            made[(family, exporter)] = _Case(family, exporter, root)
        return made[(family, exporter)]

    get.root = root  # type: ignore[attr-defined]
    return get


def _params(precisions: tuple[str, ...]) -> list:
    out = []
    for f in FAMILIES:
        for x in EXPORTERS:
            for p in precisions:
                slow = x == "transformers" or p == "int4"  # transformers' exporter: ~30 s of CPU a model
                marks = [pytest.mark.slow] if slow else []
                out.append(pytest.param(f, x, p, marks=marks, id=f"{f}-{x}-{p}"))
    return out


@pytest.mark.parametrize(("family", "exporter", "precision"), _params(("fp32", "int4")))
def test_family_builds_and_matches_transformers_or_is_refused(cases, family, exporter, precision):
    from cscompile.passes.pipeline import analyze

    case = cases(family, exporter)
    want = REFUSED.get((family, exporter))
    if want is not None:
        stage, pattern = want
        refusal = case.refusal
        if stage in ("inspect", "build"):
            assert refusal is None and case.dir is not None, refusal
            with pytest.raises(UserError) as exc:
                if stage == "inspect":
                    analyze(case.dir / "model.onnx")
                else:
                    case.build(precision, cases.root)
            refusal = (stage, _one_line(exc.value))
        assert refusal is not None and refusal[0] == stage, refusal
        assert re.search(pattern, refusal[1]), refusal
        return
    assert case.refusal is None, case.refusal
    assert case.dir is not None
    _, um = analyze(case.dir / "model.onnx")  # what `inspect` prints
    assert um.num_layers == 2
    res = case.build(precision, cases.root)
    assert res.engines[0] == "dense"
    if precision == "int4":
        native_why = NO_NATIVE.get((family, exporter))
        if native_why is None:
            assert "native" in res.engines, res.warnings
        else:
            assert "native" not in res.engines
            assert any("no native engine" in w and native_why in w for w in res.warnings), res.warnings
    check_engines(res, case.ids, case.ref, precision)


def check_engines(res, ids: list[int], ref: np.ndarray, precision: str) -> dict[str, gate.Measure]:
    """Every engine ``res`` ships against transformers' logits ``ref`` on ``ids``: within the
    gate's tolerances (the native engine also against the dense one) and, at int4, :data:`INT4_KL`."""
    from cscompile.runtime import load

    measures: dict[str, gate.Measure] = {}
    for engine in res.engines:
        with load(res.path, threads=1, engine=engine) as bm:
            got = _trace(bm.text_model, ids)
        m = gate.measure([ref], [got])
        measures[engine] = m
        why = gate.verdict(m, precision, dense=measures["dense"] if engine == "native" else None)
        assert why is None, (engine, why)
        if precision == "int4":
            assert m.mean_kl <= INT4_KL, (engine, m)
    return measures


def _source_measure(model_dir: Path, ids: list[int], ref: np.ndarray) -> gate.Measure:
    from cscompile.runtime import load_text_model

    return gate.measure([ref], [_trace(load_text_model(model_dir, threads=1), ids)])


@pytest.mark.parametrize(
    ("family", "drop"),
    [
        ("mistral", {"sliding_window": None}),
        ("llama-rope-llama3", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
        ("llama-rope-yarn", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
    ],
    ids=["window", "rope-llama3", "rope-yarn"],
)
def test_the_comparison_fails_when_a_setting_is_dropped(cases, family, drop, tmp_path):
    """What the issue found: an export that drops the window or the RoPE scaling fails the check above."""
    import transformers

    case = cases(family, "ours")
    cfg = case.hf.config.to_dict()
    cfg.update(drop)
    dropped = transformers.AutoModelForCausalLM.from_config(type(case.hf.config).from_dict(cfg))
    dropped.load_state_dict(case.hf.state_dict())
    assert len(case.ids) > FAMILY_WINDOW + 8 and len(case.ids) > FAMILY_ORIGINAL_CONTEXT + 8
    m = _source_measure(_export(dropped.eval(), "ours", tmp_path / "dropped"), case.ids, case.ref)
    assert gate.verdict(m, "fp32") is not None, m
    assert m.mean_kl > INT4_KL, m  # an int4 engine computing the dropped model would fail too
    ok = _source_measure(case.dir, case.ids, case.ref)  # and the honest export passes
    assert gate.verdict(ok, "fp32") is None, ok


def test_a_yarn_factor_left_out_of_the_fused_tables_fails(cases, tmp_path):
    """Attention fusion carries YaRN's factor on cos/sin into its RoPE tables; without it, it fails."""
    import dataclasses

    from cscompile.passes import META_KEY
    from cscompile.passes.pipeline import analyze
    from cscompile.passes.precision import precision_plan, quantize_model

    case = cases("llama-rope-yarn", "ours")
    assert case.dir is not None
    measures = {}
    for keep in (True, False):
        model, um = analyze(case.dir / "model.onnx")
        want = case.hf.model.rotary_emb.attention_scaling
        assert [x.attention.rope_scale for x in um.layers] == pytest.approx([want, want], rel=1e-5)
        if not keep:
            um.layers = [
                dataclasses.replace(x, attention=dataclasses.replace(x.attention, rope_scale=None))
                for x in um.layers
            ]
            model.meta[META_KEY] = um
        out = tmp_path / f"keep-{keep}"
        report = quantize_model(case.dir, out, precision_plan("fp32"), analyzed=(model, um))
        assert report["attention"].startswith("GroupQueryAttention")
        measures[keep] = _source_measure(out, case.ids, case.ref)
    assert gate.verdict(measures[True], "fp32") is None, measures
    assert gate.verdict(measures[False], "fp32") is not None, measures


def test_a_sliding_window_cache_input_is_refused_naming_the_way_out():
    """transformers 5 gives sliding layers a cache cut to the window and a `_sliding_window_tensor`
    input (exported with ``DynamicCache(config=...)``): refused in one line saying how to export."""
    from cscompile.decode.spec import DecoderSpec, TensorInfo

    cache = [
        TensorInfo(f"past_key_values.layers.0.{kind}s", (1, 2, "p", 16), "tensor(float)")
        for kind in ("key", "value")
    ]
    outputs = [TensorInfo("logits", (1, "s", 320), "tensor(float)")] + [
        TensorInfo(f"present.0.{kind}", (1, 2, "t", 16), "tensor(float)") for kind in ("key", "value")
    ]
    inputs = [TensorInfo("input_ids", (1, "s"), "tensor(int64)"), *cache]
    assert DecoderSpec.from_io(inputs, outputs).num_layers == 1
    window = TensorInfo("past_key_values.layers.0._sliding_window_tensor", (), "tensor(int64)")
    with pytest.raises(
        UserError, match=r"sliding-window cache inputs .*DynamicCache\(\) without the config"
    ) as exc:
        DecoderSpec.from_io([*inputs, window], outputs)
    _one_line(exc.value)


def test_a_build_refuses_a_rope_scaling_that_follows_the_sequence_length(cases, tmp_path):
    """The config beside a graph says `dynamic`: refused before any work, whatever made the graph."""
    import json
    import shutil

    from cscompile.compiler.build import build_bundle

    src = cases("llama", "ours").dir
    assert src is not None
    model = tmp_path / "model"
    shutil.copytree(src, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"config.json \| RoPE scaling 'dynamic'") as exc:
        build_bundle(model, tmp_path / "out.csb", precision="fp32")
    _one_line(exc.value)
    assert not (tmp_path / "out.csb").exists()


def test_a_dropped_qk_norm_fails_the_comparison(cases):
    """Qwen3 computed without its QK-norm (what the issue found fusion doing) fails the check above."""
    import copy

    case = cases("qwen3", "ours")
    dropped = copy.deepcopy(case.hf)
    for layer in dropped.model.layers:
        layer.self_attn.q_norm = torch.nn.Identity()
        layer.self_attn.k_norm = torch.nn.Identity()
    with torch.no_grad():
        logits = dropped(torch.tensor([case.ids])).logits[0].double().numpy()
    m = gate.measure([case.ref], [logits[PROMPT - 1 : PROMPT + STEPS]])
    assert gate.verdict(m, "fp32") is not None, m
    assert m.mean_kl > INT4_KL, m


def test_an_export_that_leaves_a_setting_out_is_refused_by_its_probe(cases, tmp_path, monkeypatch):
    """Our exporter compares its graph with transformers on a probe; a window left out fails it."""
    import dataclasses

    from cscompile.models import torch_decoder
    from cscompile.models.export import export_hf_model

    hf = cases("mistral", "ours").hf
    honest = torch_decoder.config_from_hf
    monkeypatch.setattr(
        torch_decoder,
        "config_from_hf",
        lambda c: dataclasses.replace(honest(c), sliding_layers=(), sliding_window=0),
    )
    with pytest.raises(UserError, match=r"export of mistral \| the exported graph's logits differ") as exc:
        export_hf_model(hf, tmp_path / "model.onnx", probe_ids=list(range(3, 3 + 2 * FAMILY_WINDOW)))
    _one_line(exc.value)


def _plain_rope(c: dict) -> dict:
    """``c`` with θ = 10000 over every channel (the RoPE of a Llama without scaling or partial rotary)."""
    hd = c["head_dim"]
    inv = [float(x) for x in 1.0 / 10000.0 ** (np.arange(0, hd, 2) / hd)]
    return {
        **c,
        "rotary_dim": hd,
        "rope_inv_freq": [inv],
        "rope_factor": [1.0],
        "layer_rope_table": [0] * c["n_layers"],
    }


#: family -> (what the native step computes for it, the native weights without it)
NATIVE_FEATURES = {
    "qwen3": ("QK-norm", lambda w: dict(config={**w.config, "qk_norm": False}, q_norm=None, k_norm=None)),
    "mistral": ("sliding window", lambda w: dict(config={**w.config, "layer_window": [0, 0]})),
    "llama-rope-yarn": ("YaRN's cos/sin factor", lambda w: dict(config={**w.config, "rope_factor": [1.0]})),
    "llama-rope-llama3": ("llama3 frequencies", lambda w: dict(config=_plain_rope(w.config))),
    "llama-rope-linear": ("linear frequencies", lambda w: dict(config=_plain_rope(w.config))),
    "qwen2": ("Q/K/V bias", lambda w: dict(config={**w.config, "qkv_bias": False}, qkv_bias=None)),
    "phi3": ("partial rotary", lambda w: dict(config=_plain_rope(w.config))),
    "gemma2-attention-cap": (
        "attention soft-cap",
        lambda w: dict(config=_without(w.config, "attention_softcap")),
    ),
    "gemma2-logit-cap": ("logit soft-cap", lambda w: dict(config=_without(w.config, "logit_softcap"))),
    # OLMo2: without the flag, the step normalizes before each branch (weights of ones)
    "olmo2-no-pre-norms": (
        "no norm before the branches",
        lambda w: dict(config=_without(w.config, "no_pre_norms")),
    ),
    "olmo2-qk-norm-full": (
        "full-width QK-norm",
        lambda w: dict(
            config=_without({**w.config, "qk_norm": False}, "qk_norm_full"), q_norm=None, k_norm=None
        ),
    ),
}


def _without(c: dict, key: str) -> dict:
    return {k: v for k, v in c.items() if k != key}


@pytest.mark.parametrize(
    "family",
    [
        pytest.param(f, marks=[pytest.mark.slow] if f.startswith(("gemma2", "olmo2")) else [])
        for f in sorted(NATIVE_FEATURES)
    ],
)
def test_the_native_step_computes_each_family_setting(cases, family):
    """The native step (int8 weights) matches transformers on the prompt and 16 cached steps past
    the window and the original RoPE context; the same weights with the family's setting left out
    (config and arrays) do not: each setting the C step computes is needed and computed."""
    import dataclasses

    from cscompile.native.engine import NativeDecoder, weights_from_model

    case = (
        cases(family.split("-")[0], "transformers")
        if family.startswith(("gemma2", "olmo2"))
        else cases(family, "ours")
    )
    assert case.dir is not None
    honest = weights_from_model(case.dir / "model.onnx", bits=8)

    def trace(w) -> np.ndarray:
        dec = NativeDecoder(w, threads=1, max_ctx=64)
        out = [dec.prefill(case.ids[:PROMPT])]
        out += [dec.step(t).copy() for t in case.ids[PROMPT : PROMPT + STEPS]]
        return np.stack(out).astype(np.float64)

    ok = gate.measure([case.ref], [trace(honest)])
    assert gate.verdict(ok, "int8") is None and ok.mean_kl < 0.01, ok
    what, drop = NATIVE_FEATURES[family]
    bad = gate.measure([case.ref], [trace(dataclasses.replace(honest, **drop(honest)))])
    assert bad.mean_kl > 10 * ok.mean_kl and bad.max_abs > 5 * ok.max_abs, (what, ok, bad)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_both_exporters_give_the_same_unit_map(cases, family):
    """The issue's "the same model through any of them gives the same unit map": what discovery
    finds (heads, projections' widths, MLP kind, norms, cache) does not depend on the exporter."""
    from helpers import unit_map_signature

    from cscompile.passes.pipeline import analyze

    dirs = [cases(family, x).dir for x in EXPORTERS if (family, x) not in REFUSED]
    if len(dirs) < 2 or None in dirs:
        pytest.skip("refused by one of the exporters (tested above)")
    sigs = [unit_map_signature(analyze(d / "model.onnx")[1]) for d in dirs]  # type: ignore[operator]
    assert sigs[0] == sigs[1]


class _PerHeadNorm(torch.nn.Module):
    """OLMo2's full-width QK-norm computed per head instead (Qwen3's way), with the same weight."""

    def __init__(self, norm, head_dim: int) -> None:
        super().__init__()
        self.norm, self.head_dim = norm, head_dim

    def forward(self, x):
        h = x.unflatten(-1, (-1, self.head_dim)).float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.norm.variance_epsilon)
        return self.norm.weight * h.flatten(-2)


def _olmo2_without(what: str):
    import copy

    hf = tiny_family("olmo2")
    dropped = copy.deepcopy(hf)
    for layer in dropped.model.layers:
        a = layer.self_attn
        if what == "post-norms":
            layer.post_attention_layernorm = torch.nn.Identity()
            layer.post_feedforward_layernorm = torch.nn.Identity()
        elif what == "qk-norm":
            a.q_norm, a.k_norm = torch.nn.Identity(), torch.nn.Identity()
        else:  # the same weights, normalized per head
            a.q_norm, a.k_norm = _PerHeadNorm(a.q_norm, a.head_dim), _PerHeadNorm(a.k_norm, a.head_dim)
    return hf, dropped


@pytest.mark.parametrize("what", ["post-norms", "qk-norm", "qk-norm-per-head"])
def test_olmo2_computed_without_a_setting_fails_the_comparison(what):
    """OLMo2 without its norms after the branches, without its QK-norm, or with the QK-norm per
    head instead of over the whole projection fails the check the family matrix makes."""
    hf, dropped = _olmo2_without(what)
    ids, ref = _reference(hf)
    with torch.no_grad():
        logits = dropped(torch.tensor([ids])).logits[0].double().numpy()
    m = gate.measure([ref], [logits[PROMPT - 1 : PROMPT + STEPS]])
    assert gate.verdict(m, "fp32") is not None, m
    # dropping either norm moves the logits as far as int4 rounding does or further (measured mean
    # KL 0.94 and 0.46); per head instead of full width, 0.06: only the fp32 build's check sees it
    assert m.mean_kl > (0.3 if what in ("post-norms", "qk-norm") else 0.01) and m.max_rel > 0.3, m


@pytest.mark.slow
def test_olmo2_discovery_records_its_norms_and_llama_code_refuses_them(cases, tmp_path):
    """transformers' OLMo2 graph: no norm before either branch (recorded as "none"), RMSNorms on
    both outputs, QK-norm over the whole Q (and K) width; a Llama deviation each (Llama-only code
    refuses them), which the native step computes (``no_pre_norms``, ``qk_norm_full``); the int8 dense engine matches transformers."""
    from cscompile.native.engine import family_features
    from cscompile.passes.pipeline import analyze
    from cscompile.runtime import load

    case = cases("olmo2", "transformers")
    assert case.dir is not None
    _, um = analyze(case.dir / "model.onnx")
    for x in um.layers:
        assert x.input_norm.kind == x.post_attention_norm.kind == "none"
        assert x.attn_output_norm is not None and x.attn_output_norm.weight is not None
        assert x.mlp_output_norm is not None and x.mlp_output_norm.weight is not None
        a = x.attention
        assert a.qk_norm_full and a.q_norm is not None and a.k_norm is not None
        assert a.q_norm.weight is not None and a.k_norm.weight is not None
    dev = um.llama_deviations()
    assert "layer 0 no norm before the attention/MLP (norms after the branches)" in dev
    assert "layer 0 QK-norm over the full projection width" in dev
    features = family_features(um, case.dir)
    assert features["no_pre_norms"] and features["qk_norm_full"] and features["post_norms"], features
    res = case.build("int8", cases.root)
    assert res.engines[0] == "dense"
    with load(res.path, threads=1, engine="dense") as bm:
        m = gate.measure([case.ref], [_trace(bm.text_model, case.ids)])
    assert gate.verdict(m, "int8") is None, m


@pytest.mark.slow
def test_gpt_neox_qkv_is_deinterleaved_exactly(cases, tmp_path):
    """Canonicalization gives GPT-NeoX's per-head interleaved QKV one MatMul and bias per role; the
    rewritten graph computes what transformers does (fp32 tolerance); discovery then reads three
    projections and refuses the parallel residual by name (the family matrix above)."""
    import shutil

    from cscompile.passes.canonicalize import CanonicalizePass
    from cscompile.passes.pipeline import load_model, save_model

    case = cases("gpt-neox", "transformers")
    assert case.dir is not None
    model = load_model(case.dir / "model.onnx")
    CanonicalizePass()(model)
    assert not any(n.op_type == "Split" for n in model.graph)
    out = tmp_path / "canonical"
    out.mkdir()
    save_model(model, out / "model.onnx")
    shutil.copy(case.dir / "config.json", out / "config.json")
    shutil.copytree(case.dir / "tokenizer", out / "tokenizer")
    m = _source_measure(out, case.ids, case.ref)
    assert gate.verdict(m, "fp32") is None, m
