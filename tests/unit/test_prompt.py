"""Prompt compression: scorer numerics against PyTorch, layout, budget controller, bundle, CLI, eval sets."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from cscompile.data.longctx import FAMILIES, long_context_set, make_example, rouge_l
from cscompile.errors import UserError
from cscompile.prompt import PromptBudget, layout, select, split_prompt
from cscompile.prompt.compress import reorder


@pytest.fixture(scope="module")
def fp32_engine(tiny_dir, tmp_path_factory):
    from cscompile.passes.precision import precision_plan, quantize_model

    d = tiny_dir("llama-4l")
    out = tmp_path_factory.mktemp("prompt_engine")
    rep = quantize_model(d / "model.onnx", out, precision_plan("fp32"), "auto")
    assert str(rep["attention"]).startswith("GroupQueryAttention")
    return d, out / "model.onnx"


@pytest.fixture(scope="module")
def tok(tiny_dir):
    from cscompile.decode.tokenizer import Tokenizer

    return Tokenizer(tiny_dir("llama-4l") / "tokenizer")


def test_scorer_attention_equals_pytorch_eager(fp32_engine, tmp_path):
    import torch

    from cscompile.models.reference import TorchReference
    from cscompile.prompt import PromptScorer, ScorerSpec, build_scorer

    d, engine = fp32_engine
    attrs, rope = build_scorer(engine, [1, 3], tmp_path / "s.onnx")
    spec = ScorerSpec(((1, 0), (3, 3)), attrs["num_heads"], attrs["kv_num_heads"], 16, attrs["scale"])
    scorer = PromptScorer(tmp_path / "s.onnx", spec, rope, threads=1)
    ids = np.random.default_rng(0).integers(5, 300, 60)
    query = np.arange(45, 60)
    outs = scorer.run(ids)
    assert set(outs) == {"q1", "k1", "q3", "k3"}  # layers 0..3 only, no logits
    ref = TorchReference.from_dir(d / "hf", threads=1)
    ref.model.set_attn_implementation("eager")
    with torch.no_grad():
        att = ref.model(torch.from_numpy(ids[None]), output_attentions=True).attentions
    rows = []
    for layer, head in spec.heads:
        want = att[layer][0, head].numpy()[query].mean(0)
        got = scorer.head_attention(outs, query, layer, head)
        np.testing.assert_allclose(got, want, atol=2e-6)
        rows.append(want)
    scores, ms = scorer.scores(ids, query)
    np.testing.assert_allclose(scores, np.mean(rows, axis=0), atol=2e-6)
    assert ms > 0
    with pytest.raises(UserError, match="no query tokens"):
        scorer.scores(ids, np.array([], np.int64))
    with pytest.raises(UserError, match="at most 1024"):
        scorer.run(np.ones(1100, np.int64))


def test_scorer_refuses_unfused_engine(tiny_dir, tmp_path):
    from cscompile.prompt import build_scorer

    with pytest.raises(UserError, match="no fused attention"):
        build_scorer(tiny_dir("llama-4l") / "model.onnx", [0], tmp_path / "s.onnx")


def test_layout_labels_context_question_and_keep(tok):
    ctx = "Alpha beta gamma. The code is 4711 today.\n\nDelta epsilon zeta."
    lay = layout(tok, ctx, "What is the code?", "Answer briefly.", chat=True, keep=(r"\d+",))
    c0, c1 = lay.context_span
    assert lay.text[c0:c1] == ctx
    for i, (a, b) in enumerate(lay.offsets):
        inside = a >= c0 and b <= c1 and b > a
        assert (lay.sentence[i] >= 0) == inside
        if not inside:
            assert lay.protected[i]
    assert int(lay.sentence.max()) == 2  # three sentences
    digits = [i for i, (a, b) in enumerate(lay.offsets) if re.search(r"\d", lay.text[a:b])]
    assert digits and all(lay.protected[i] for i in digits)
    q0 = lay.text.index("What is the code?")
    after = {i for i, (a, _) in enumerate(lay.offsets) if a >= q0}
    assert after <= set(lay.query.tolist()) and all(lay.offsets[i][0] >= c1 for i in lay.query)
    with pytest.raises(UserError, match="empty"):
        layout(tok, "  ", "", "")


def _toy_layout(sizes):
    """A layout with sentences of the given token counts, 2 protected tokens each side."""
    from cscompile.prompt import PromptLayout

    sent = [-1, -1] + [s for s, n in enumerate(sizes) for _ in range(n)] + [-1, -1]
    sent = np.array(sent)
    n = len(sent)
    word = np.where(sent >= 0, np.arange(n), -1)
    return PromptLayout("", list(range(n)), [(i, i + 1) for i in range(n)], sent, word, sent < 0,
                        np.array([n - 1]), (0, 0))  # fmt: skip


def test_select_keeps_best_sentences_within_budget():
    lay = _toy_layout([4, 4, 4, 4, 4])
    scores = np.zeros(len(lay.ids))
    for s, v in enumerate([0.1, 0.9, 0.2, 0.8, 0.3]):
        scores[lay.sentence == s] = v
    keep, target, met = select(lay, scores, PromptBudget(ratio=0.4))
    assert met and target == 8
    assert set(np.unique(lay.sentence[keep & (lay.sentence >= 0)])) == {1, 3}
    assert keep[lay.sentence < 0].all()
    keep, _, _ = select(lay, scores, PromptBudget(ratio=1.0))
    assert keep.all()
    # tokens budget counts the protected tokens: 4 + 12 -> three sentences
    keep, target, met = select(lay, scores, PromptBudget(tokens=16))
    assert met and target == 12 and int((keep & (lay.sentence >= 0)).sum()) == 12
    # fine stage: coarse may overshoot by 50%, then words are dropped down to the budget exactly
    keep, target, _ = select(lay, scores, PromptBudget(ratio=0.3, fine=0.5))
    assert target == 6 and int((keep & (lay.sentence >= 0)).sum()) == 6
    # unmeetable: fewer tokens than the protected ones -> exactly the protected ones
    keep, _, met = select(lay, scores, PromptBudget(tokens=3))
    assert not met and np.array_equal(keep, lay.protected)


def test_reorder_puts_the_best_sentence_last():
    lay = _toy_layout([2, 3, 2])
    scores = np.zeros(len(lay.ids))
    for s, v in enumerate([0.9, 0.1, 0.5]):
        scores[lay.sentence == s] = v
    keep = np.ones(len(lay.ids), bool)
    pos = reorder(lay, scores, keep)
    assert sorted(pos.tolist()) == list(range(len(lay.ids)))
    assert pos[:2].tolist() == [0, 1] and pos[-2:].tolist() == [len(lay.ids) - 2, len(lay.ids) - 1]
    body = [int(lay.sentence[i]) for i in pos[2:-2]]
    assert body == [1, 1, 1, 2, 2, 0, 0]


@pytest.mark.parametrize(
    ("text", "match"),
    [("0", "fraction"), ("1.5", "whole token count"), ("abc", "fraction"), ("-3", "fraction")],
)
def test_budget_parse_rejects_bad_values(text, match):
    with pytest.raises(UserError, match=match):
        PromptBudget.parse(text)


def test_budget_parse_and_bad_regex():
    assert PromptBudget.parse("0.4").ratio == 0.4
    assert PromptBudget.parse("600").tokens == 600
    with pytest.raises(UserError, match="not a regular expression"):
        PromptBudget.parse("0.5", keep=("(",))
    with pytest.raises(UserError, match="order"):
        PromptBudget(ratio=0.5, order="random").validate()


def test_split_prompt():
    assert split_prompt("ctx one\n\nctx two\n\n  Question?  ") == ("ctx one\n\nctx two", "Question?")
    assert split_prompt("just a question") == ("", "just a question")


def test_long_context_sets_are_deterministic_and_scored_by_first_answer():
    for fam in FAMILIES:
        a, b = make_example(fam, 3), make_example(fam, 3)
        assert a == b
        assert make_example(fam, 3, split="calib") != a
        for ev in a.evidence:
            assert ev in a.context
    r = make_example("retrieval", 0)
    assert r.correct(f"The number is {r.answer}.") is True
    assert r.correct(f"It is 1234567, not {r.answer}.") is False
    assert r.correct(f"{r.answer}9") is False
    q = next(e for e in long_context_set("qa", 20) if e.kind == "day")
    other = next(d for d in ("Monday", "Tuesday") if d != q.answer)
    assert q.correct(f"On {q.answer}.") is True
    assert q.correct(f"On {other}, not {q.answer}.") is False
    assert make_example("summarize", 0).correct("anything") is None
    assert rouge_l("a b c d", "a b c d") == 1.0
    assert rouge_l("a b c d", "a x c y") == pytest.approx(0.5)
    assert rouge_l("a b", "x y") == 0.0


@pytest.fixture(scope="module")
def prompt_bundle(tiny_dir, tmp_path_factory):
    from cscompile.compiler.build import build_bundle

    out = tmp_path_factory.mktemp("pb") / "p.csb"
    res = build_bundle(tiny_dir("llama-4l"), out, precision="int4", prompt_scorer=True)
    assert res.build["prompt_scorer"] == {"layers": None}
    return out


def test_bundle_compresses_and_generates(prompt_bundle):
    from cscompile.runtime import GenerationConfig, load

    ex = make_example("retrieval", 0, tokens=120)
    with load(prompt_bundle, threads=1) as bm:
        doc = bm.bundle.read_json("prompt/scorer.json")
        assert doc["calibration"]["examples"] > 0 and len(doc["spec"]["heads"]) == 2
        c = bm.compress(ex.context, PromptBudget(ratio=0.4), question=ex.question)
        assert c.budget_met and 0 < c.removed_tokens < c.original_tokens
        assert c.ids == [t for t, k in zip(layout(bm.tokenizer, ex.context, ex.question).ids, c.kept) if k]
        assert ex.question in c.text
        cfg = GenerationConfig(max_new_tokens=4, stop_at_eos=False)
        res = bm.generate(
            ex.context, cfg, chat=True, prompt_budget=PromptBudget(ratio=0.4), question=ex.question
        )
        assert res.stats.prompt_tokens == len(c.ids)  # deterministic: the same selection
        assert res.stats.prompt_tokens_removed == c.removed_tokens and res.stats.compress_ms > 0
        assert res.stats.ttft_ms == pytest.approx(res.stats.compress_ms + res.stats.prefill_ms)
        # the compressed generation equals a dense generation of the kept ids
        plain = bm.generate(c.ids, cfg)
        assert plain.token_ids == res.token_ids
        # nothing before the question: nothing to compress, a note, everything kept
        c2 = bm.compress("Just a question?", PromptBudget(ratio=0.1))
        assert c2.removed_tokens == 0 and "nothing to compress" in c2.notes[0]
        # every word kept by --keep: the budget cannot be met, the protected tokens are kept
        c3 = bm.compress(ex.context, PromptBudget(ratio=0.05, keep=(r"\S+",)), question=ex.question)
        assert not c3.budget_met and "cannot be met" in c3.notes[0]
        lay3 = layout(bm.tokenizer, ex.context, ex.question, keep=(r"\S+",))
        removed = [t for t, k in zip(lay3.ids, c3.kept) if not k]
        assert bm.tokenizer.decode(removed).strip() == ""  # only whitespace between kept words went
        with pytest.raises(UserError, match="without a prompt budget"):
            bm.generate("x", cfg, question="y")


def test_bundle_without_scorer_and_tampered_spec(tiny_dir, prompt_bundle, tmp_path):
    import shutil

    from cscompile.bundle import BundleError, open_bundle
    from cscompile.compiler.build import build_bundle
    from cscompile.runtime import load

    plain = tmp_path / "plain"
    build_bundle(tiny_dir("llama-4l"), plain, precision="int4")
    with load(plain, threads=1) as bm, pytest.raises(BundleError, match="no prompt scorer"):
        bm.compress("a\n\nb?", PromptBudget(ratio=0.5))
    # a directory copy whose scorer.json is edited fails verification (hash) before anything runs
    d = tmp_path / "copy"
    with open_bundle(prompt_bundle) as b:
        shutil.copytree(b.root, d)
    spec = d / "prompt" / "scorer.json"
    doc = json.loads(spec.read_text())
    doc["spec"]["heads"] = [[99, 0]]
    spec.write_text(json.dumps(doc))
    with pytest.raises(BundleError):
        load(d, threads=1)


def test_spec_rejects_inconsistent_heads():
    from cscompile.prompt import ScorerSpec

    good = {"heads": [[0, 1]], "num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "scale": 0.25}
    assert ScorerSpec.from_dict(good).layers == (0,)
    for bad in ({**good, "heads": [[0, 9]]}, {**good, "heads": []}, {"heads": "x"}):
        with pytest.raises(UserError):
            ScorerSpec.from_dict(bad)


def test_cli_run_with_prompt_budget(prompt_bundle, tmp_path, capsys):
    from cscompile.cli.main import main

    ex = make_example("retrieval", 1, tokens=120)
    ctx = tmp_path / "ctx.txt"
    ctx.write_text(ex.context)
    rc = main(["run", str(prompt_bundle), ex.question, "--context", str(ctx), "--prompt-budget", "0.5",
               "--prompt-order", "relevance", "--show-compressed", "--stats", "-n", "3", "--threads", "1"])  # fmt: skip
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "compressed prompt" in out.out + out.err and "removed" in out.out + out.err
    assert main(["run", str(prompt_bundle), "q", "--keep", "x"]) == 2
    assert "without --prompt-budget" in capsys.readouterr().err
    assert main(["run", str(prompt_bundle), "q", "--prompt-budget", "2.5"]) == 2
    assert "whole token count" in capsys.readouterr().err


def test_bench_summary_math():
    from cscompile.evaluation.prompt_bench import summarize, to_markdown

    rows = []
    for i, (dense_ms, comp_ms, ok) in enumerate([(100.0, 50.0, True), (300.0, 100.0, False)]):
        base = {"family": "retrieval", "id": f"e{i}", "scorer_ms": 0.0, "prefill_ms": 0.0, "decode_ms": 0.0,
                "original_tokens": 100, "agree": 1.0}  # fmt: skip
        rows.append({**base, "setting": "dense", "e2e_ms": dense_ms, "correct": True, "prompt_tokens": 100})
        rows.append({**base, "setting": "r=0.3", "e2e_ms": comp_ms, "correct": ok, "prompt_tokens": 30})
    s = {x["setting"]: x for x in summarize(rows)}
    assert s["r=0.3"]["speedup"] == pytest.approx(400 / 150)
    assert s["r=0.3"]["accuracy"] == 0.5 and s["r=0.3"]["accuracy_vs_dense"] == 0.5
    assert s["r=0.3"]["retention"] == pytest.approx(0.3)
    assert "| retrieval | r=0.3 | 50% |" in to_markdown({"summary": list(s.values())})


def test_explicit_positions_on_a_plain_graph(tiny_dir, fp32_engine):
    from cscompile.decode.session import DecoderSession

    d, fused = fp32_engine
    sess = DecoderSession(d / "model.onnx", threads=1)
    ids = np.random.default_rng(1).integers(5, 300, (1, 24))
    base = sess.forward(ids, sess.new_state())
    same = sess.forward(ids, sess.new_state(), positions=np.arange(24)[None])
    np.testing.assert_array_equal(base, same)
    # original positions with dropped tokens masked out: what the dropped tokens were cannot matter
    kept = np.ones(24, np.int64)
    kept[5:15] = 0
    a = sess.forward(ids, sess.new_state(), attention_mask=kept[None], positions=np.arange(24)[None])
    other = ids.copy()
    other[0, 5:15] = np.random.default_rng(2).integers(5, 300, 10)
    b = sess.forward(other, sess.new_state(), attention_mask=kept[None], positions=np.arange(24)[None])
    np.testing.assert_allclose(a[0, kept > 0], b[0, kept > 0], atol=1e-5)
    assert np.abs(a[0, -1] - base[0, -1]).max() > 1e-3  # and they were really masked
    with pytest.raises(UserError, match="derives them itself"):
        DecoderSession(fused, threads=1).forward(
            ids, DecoderSession(fused, threads=1).new_state(), positions=np.arange(24)[None]
        )


def _alloc_tables():
    from cscompile.prompt.allocate import CostModel, QualityGrid

    costs = CostModel(
        scorer=(5.0, 0.25),
        prefill={"dense": (10.0, 1.0, 0.0), "fast": (10.0, 0.7, 0.0)},
        decode={"dense": 6.0, "fast": 4.0},
    )
    ratios, engines = [1.0, 0.5, 0.3, 0.1], ["dense", "fast"]
    acc = {
        (r, e): (0.95 if r >= 0.3 else 0.6) - (0.1 if e == "fast" else 0.0) for r in ratios for e in engines
    }
    kl = {(r, e): (1 - r) * 0.5 + (0.3 if e == "fast" else 0.0) for r in ratios for e in engines}
    return costs, QualityGrid(ratios, engines, acc, kl, lam=0.1)


def test_cost_model_fits_and_adds_the_scorer_only_when_compressing():
    from cscompile.prompt.allocate import CostModel

    n = [100, 400, 800, 1200]
    assert CostModel.fit_prefill(n, [3 + 0.5 * x + 1e-4 * x * x for x in n]) == pytest.approx((3, 0.5, 1e-4))
    assert CostModel.fit_linear(n, [2 + 0.2 * x for x in n]) == pytest.approx((2, 0.2))
    concave = CostModel.fit_prefill(n, [3 + 0.5 * x - 1e-4 * x * x for x in n])
    assert concave[2] == 0.0 and concave[1] > 0
    costs, _ = _alloc_tables()
    assert costs.e2e("dense", 1000, 1000, 10) == pytest.approx(10 + 1000 + 60)
    assert costs.e2e("dense", 1000, 300, 10) == pytest.approx(10 + 300 + 60 + 5 + 250)


def test_policies_respect_their_levers_and_joint_is_best_under_the_budget():
    from cscompile.prompt.allocate import POLICIES, allocate

    costs, grid = _alloc_tables()
    full = costs.e2e("dense", 1000, 1000, 10)
    # faithful: the least compression that fits; task: the best calibrated score
    assert allocate("prompt-only", 0.9 * full, costs, grid, 1000, 40, 10, "faithful").ratio == 0.5
    assert allocate("prompt-only", 2 * full, costs, grid, 1000, 40, 10, "faithful").ratio == 1.0
    for frac in (0.9, 0.7, 0.5, 0.4):
        ch = {p: allocate(p, frac * full, costs, grid, 1000, 40, 10) for p in POLICIES}
        assert ch["prompt-only"].engine == "dense" and ch["model-only"].ratio == 1.0
        assert len({c.ratio for c in [ch["sequential"]]}) == 1
        for p in POLICIES:
            if not ch[p].notes:
                assert ch[p].predicted_ms <= frac * full + 1e-9
                assert ch["joint"].score >= ch[p].score - 1e-12
    # an impossible budget: the fastest pair, flagged
    tight = allocate("joint", 50.0, costs, grid, 1000, 40, 10)
    assert tight.notes and tight.ratio == 0.1 and tight.engine == "fast"
    with pytest.raises(UserError, match="one of"):
        allocate("greedy", 100.0, costs, grid, 1000, 40, 10)
    with pytest.raises(UserError, match="positive"):
        allocate("joint", 0.0, costs, grid, 1000, 40, 10)


def test_scorer_layers_bound_the_scorer(tiny_dir, tmp_path):
    from cscompile.bundle import open_bundle
    from cscompile.compiler.build import build_bundle

    with pytest.raises(UserError, match="without --prompt-scorer"):
        build_bundle(tiny_dir("llama-4l"), tmp_path / "x", scorer_layers=1)
    assert not (tmp_path / "x").exists()
    build_bundle(tiny_dir("llama-4l"), tmp_path / "one", prompt_scorer=True, scorer_layers=1)
    with open_bundle(tmp_path / "one") as b:
        doc = b.read_json("prompt/scorer.json")
    assert doc["calibration"]["max_layer"] == 1
    assert {layer for layer, _ in doc["spec"]["heads"]} == {0}


def test_latency_budget_picks_a_ratio_and_caches_costs(prompt_bundle, tmp_path, monkeypatch):
    import cscompile.prompt.allocate as alloc
    from cscompile.prompt.allocate import QualityGrid
    from cscompile.runtime import load

    monkeypatch.setenv("CSCOMPILE_CACHE", str(tmp_path / "cache"))
    ex = make_example("retrieval", 2, tokens=120)
    with load(prompt_bundle, threads=1) as bm:
        doc = bm.bundle.read_json("prompt/scorer.json")
        for order in ("original", "relevance"):
            grid = QualityGrid.from_dict(doc["grid"]["orders"][order])
            assert grid.ratios == [1.0, 0.5, 0.3, 0.2, 0.1] and grid.engines == ["dense"]
            assert grid.kl[(1.0, "dense")] == 0.0  # the reference itself
        loose = bm.compress(ex.context, PromptBudget(latency_ms=1e9), question=ex.question, new_tokens=4)
        assert loose.budget_met and "latency budget" in loose.notes[0]
        assert loose.removed_tokens == 0  # faithful: the full prompt whenever it fits
        tight = bm.compress(ex.context, PromptBudget(latency_ms=1e-3), question=ex.question, new_tokens=4)
        assert not tight.budget_met and any("no pair within" in n for n in tight.notes)
        assert tight.removed_tokens > 0  # the fastest: the smallest ratio
        files = list((tmp_path / "cache" / "costs").glob("*.json"))
        assert len(files) == 1
    # a second load reads the cached costs instead of measuring
    monkeypatch.setattr(
        alloc, "measure_costs", lambda *a, **k: (_ for _ in ()).throw(AssertionError("measured"))
    )
    with load(prompt_bundle, threads=1) as bm:
        bm.compress(ex.context, PromptBudget(latency_ms=500.0), question=ex.question, new_tokens=4)
    # a damaged cache entry is measured again, not trusted
    files[0].write_text("{not json")
    monkeypatch.undo()
    monkeypatch.setenv("CSCOMPILE_CACHE", str(tmp_path / "cache"))
    with load(prompt_bundle, threads=1) as bm:
        bm.compress(ex.context, PromptBudget(latency_ms=500.0), question=ex.question, new_tokens=4)
    assert json.loads(files[0].read_text())["dense"] == "dense"
    with pytest.raises(UserError, match="bare compressor"):
        from cscompile.prompt import PromptCompressor

        PromptCompressor(None, None).compress("a", "b?", PromptBudget(latency_ms=10.0))


def test_cli_latency_budget(prompt_bundle, tmp_path, capsys, monkeypatch):
    from cscompile.cli.main import main

    monkeypatch.setenv("CSCOMPILE_CACHE", str(tmp_path / "cache"))
    ex = make_example("qa", 1, tokens=120)
    rc = main(
        ["run", str(prompt_bundle), ex.prompt(), "--latency-budget", "1e9", "-n", "2", "--threads", "1"]
    )
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "latency budget" in out.err
    assert main(["run", str(prompt_bundle), "q", "--latency-budget", "5", "--prompt-budget", "0.5"]) == 2
    assert "both given" in capsys.readouterr().err


def test_self_information_equals_pytorch(tiny_dir):
    import torch

    from cscompile.models.reference import TorchReference
    from cscompile.prompt.scorer import SelfInfoScorer

    d = tiny_dir("llama-4l")
    ids = np.random.default_rng(3).integers(5, 300, 40)
    info, ms = SelfInfoScorer(d / "model.onnx", threads=1).scores(ids, np.array([39]))
    logits = TorchReference.from_dir(d / "hf", threads=1).logits(ids[None])[0]
    logp = torch.log_softmax(torch.from_numpy(logits).double(), -1).numpy()
    want = np.concatenate([[0.0], -logp[np.arange(39), ids[1:]]])
    np.testing.assert_allclose(info, want, atol=2e-4)
    assert ms > 0 and info[1:].min() > 0


def test_latency_budget_needs_a_calibrated_grid(prompt_bundle, tmp_path):
    import shutil

    from cscompile.bundle import BundleError, open_bundle
    from cscompile.bundle.writer import write_bundle
    from cscompile.runtime import load

    # re-package the bundle with a scorer spec that has no grid (as an older build would)
    src = tmp_path / "src"
    with open_bundle(prompt_bundle) as b:
        shutil.copytree(b.root, src)
        manifest = b.manifest
    doc = json.loads((src / "prompt" / "scorer.json").read_text())
    del doc["grid"]
    (src / "prompt" / "scorer.json").write_text(json.dumps(doc))
    files = {rel: src / rel for rel in manifest["files"]}
    out = tmp_path / "old.csb"
    write_bundle(out, files=files, engines=manifest["engines"], source=manifest["source"],
                 requires=manifest["requires"], tokenizer=manifest.get("tokenizer"),
                 sections=manifest.get("sections", {}), archive=True)  # fmt: skip
    with load(out, threads=1) as bm, pytest.raises(BundleError, match="no calibrated prompt grid"):
        bm.compress("ctx.\n\nq?", PromptBudget(latency_ms=100.0))
    with load(out, threads=1) as bm:  # a ratio budget still works without the grid
        assert bm.compress("Some context here.\n\nq?", PromptBudget(ratio=0.5)).budget_met


def test_bad_inputs_to_compression_paths(prompt_bundle, tiny_dir, tmp_path, capsys):
    from cscompile.cli.main import main
    from cscompile.compiler.build import build_bundle
    from cscompile.runtime import GenerationConfig, load

    bad = tmp_path / "ctx.bin"
    bad.write_bytes(b"\xff\xfe\x00 not utf-8")
    assert main(["run", str(prompt_bundle), "q?", "--context", str(bad), "--prompt-budget", "0.5"]) == 2
    assert "UTF-8" in capsys.readouterr().err
    with load(prompt_bundle, threads=1) as bm, pytest.raises(UserError, match="token ids"):
        bm.generate([5, 6, 7], GenerationConfig(max_new_tokens=2), prompt_budget=PromptBudget(ratio=0.5))
    with pytest.raises(UserError, match="scorer max layer"):
        build_bundle(tiny_dir("llama-4l"), tmp_path / "deep", prompt_scorer=True, scorer_layers=9)
    assert not (tmp_path / "deep").exists()
