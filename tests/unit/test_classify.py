"""Classification bundles (issue 10): training rows, sentence split, calibration, build, runtime, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cscompile.errors import UserError
from cscompile.evaluation.sentiment import sentiment_set
from cscompile.exits import classifier as C


def _rows(path, n=120, classes=2, length="short"):
    rows = sentiment_set(n, classes, "train", length)
    path.write_text("".join(json.dumps({"text": r.text, "label": r.label}) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("spec", ["positive", "a,a", "a,,b", "", ["x"]])
def test_label_sets_need_two_distinct_labels(spec):
    with pytest.raises(UserError, match="--labels"):
        C.parse_labels(spec)
    assert C.parse_labels(" a, b ,c") == ["a", "b", "c"]


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"text": "fine", "label": "a"}\nnot json\n', "line 2 .*not valid JSON"),
        ('{"label": "a"}\n', 'line 1 .*no non-empty "text"'),
        ('{"text": "   ", "label": "a"}\n', 'no non-empty "text"'),
        ('{"text": "ok", "label": "c"}\n', "label 'c'.*one of --labels \\(a, b\\)"),
        ('{"text": "ok"}\n', 'no "label".*--teacher'),
        ('["text", "a"]\n', 'no non-empty "text"'),
        ("\n\n", "has no rows"),
    ],
)
def test_malformed_training_rows_name_the_line(tmp_path, content, match):
    p = tmp_path / "rows.jsonl"
    p.write_text(content)
    with pytest.raises(UserError, match=match) as err:
        C.read_examples(p, ["a", "b"])
    assert "\n" not in str(err.value)


def test_training_rows_read_labels_and_teacher_gaps(tmp_path):
    p = tmp_path / "rows.jsonl"
    p.write_text('{"text": " x ", "label": "b"}\n\n{"text": "y"}\n')
    assert C.read_examples(p, ["a", "b"], teacher=True) == [C.Example("x", 1), C.Example("y", None)]
    with pytest.raises(UserError, match="no file"):
        C.read_examples(tmp_path / "none.jsonl", ["a", "b"])
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(UserError, match="not UTF-8"):
        C.read_examples(tmp_path / "bin.jsonl", ["a", "b"])
    few = [C.Example("t", 0)] * 30 + [C.Example("u", 1)] * 3
    with pytest.raises(UserError, match="too few rows for b: 3"):
        C.check_balance(few, ["a", "b"], "training rows")


def test_sentences_split_one_tokenization(tiny_dir):
    from cscompile.decode.tokenizer import Tokenizer

    tok = Tokenizer(tiny_dir("llama-4l") / "tokenizer")
    text = "The food was good. We went on Monday!  Would I return? Yes"
    parts = C.sentence_ids(tok, text)
    assert len(parts) == 4 and sum(parts, []) == tok.encode(text)
    assert tok.decode(parts[1]).strip() == "We went on Monday!"
    with pytest.raises(UserError, match="text .*is empty"):
        C.sentence_ids(tok, " \n ")
    with pytest.raises(UserError, match="at most 5"):
        C.sentence_ids(tok, text, max_tokens=5)


def test_exit_layers():
    assert C.default_cuts(30) == list(range(0, 31, 3)) and C.default_cuts(4) == [0, 1, 2, 3, 4]
    assert C.parse_cuts("3,6,12", 30) == [0, 3, 6, 12, 30] and C.parse_cuts([2, 4], 4) == [0, 2, 4]
    for bad in ("6,3", "0,4", "3,31", "a"):
        with pytest.raises(UserError, match="--exit-layers"):
            C.parse_cuts(bad, 30)


def _trace(rng, n_sent, blocks, label, sharp):
    """Probabilities that sharpen towards ``label`` with depth and sentences read."""
    p = np.empty((n_sent, blocks, 2))
    for j in range(n_sent):
        for k in range(blocks):
            conf = 0.5 + 0.5 * min(1.0, sharp * (j + 1) * (k + 1) / (n_sent * blocks)) - 1e-3
            p[j, k, label], p[j, k, 1 - label] = conf, 1 - conf
    return p, [int(rng.integers(3, 9)) for _ in range(n_sent)]


def test_calibration_picks_the_cheapest_thresholds_within_the_loss():
    rng = np.random.default_rng(0)
    cuts = [0, 2, 4, 6]
    ys = [int(rng.integers(0, 2)) for _ in range(40)]
    traces = [_trace(rng, 5, 3, y, sharp=float(rng.uniform(0.5, 4))) for y in ys]
    doc = C.calibrate({"whole": traces, "prefix": traces}, ys, cuts, max_loss=0.0)
    rep = doc["report"]
    assert rep["full_accuracy"] == 1.0
    for policy in ("layer", "sentence", "2d"):
        # within the loss; not necessarily cheaper than the full model: reading sentence by sentence
        # costs a block call per sentence (measured: the sentence-wise exit is slower than full)
        assert rep[policy]["accuracy"] >= 1.0
        th = doc["thresholds"][policy]
        # every cheaper setting of the grid loses accuracy (the choice is the cheapest that does not)
        for tau in C.GRID if policy != "sentence" else [None]:
            for sigma in C.GRID if policy != "layer" else [None]:
                outs = [C.simulate_policy(p, t, cuts, policy, tau, sigma) for p, t in traces]
                acc = np.mean([o.label == y for o, y in zip(outs, ys)])
                c = np.mean([C.cost(o) for o in outs])
                full_cost = np.mean(
                    [C.cost(C.simulate_policy(p, t, cuts, "full", None, None)) for p, t in traces]
                )
                if c < rep[policy]["relative_cost"] * full_cost - 1e-9:
                    assert acc < 1.0, (policy, tau, sigma, th)
    assert doc["thresholds"]["full"] == {"tau": None, "sigma": None}


@pytest.fixture(scope="module")
def cls_bundle(tiny_dir, tmp_path_factory):
    from cscompile.compiler.build import build_bundle

    d = tmp_path_factory.mktemp("cls")
    out = d / "c.csb"
    res = build_bundle(tiny_dir("llama-4l"), out, precision="fp32", task="classify", labels="negative,positive",
                       train=_rows(d / "rows.jsonl", 100), exit_layers="1,2")  # fmt: skip
    return res


def test_build_adds_a_classifier_and_every_policy_matches_its_simulation(cls_bundle, tiny_dir):
    import dataclasses

    from cscompile.runtime import load

    assert cls_bundle.build["task"] == "classify" and cls_bundle.build["classify"]["labels"] == [
        "negative",
        "positive",
    ]
    assert "classify" in cls_bundle.manifest["sections"]
    texts = [r.text for r in sentiment_set(12, 2, "test")]
    with load(cls_bundle.path, threads=1) as m:
        clf = m.classifier
        clf.outliers = dataclasses.replace(clf.outliers, threshold=np.inf)  # the outlier test has its own
        assert clf.cuts == [0, 1, 2, 4] and clf.labels == ["negative", "positive"]
        assert clf.report["train_rows"] + clf.report["calibration_rows"] == 100
        for text in texts:
            sents = C.sentence_ids(m.tokenizer, text)
            for policy in C.POLICIES:
                probs, toks = clf.stack.trace(sents, clf.sets[C.POLICY_SET[policy]])
                th = clf.thresholds[policy]
                want = C.simulate_policy(probs, toks, clf.cuts, policy, th["tau"], th["sigma"])
                got = m.classify(text, policy)
                assert got.label == clf.labels[want.label] and got.exit_layer == clf.cuts[want.depth + 1]
                assert (got.layer_tokens, got.block_calls) == (want.layer_tokens, want.calls)
                assert got.confidence == pytest.approx(want.confidence, abs=1e-5)
                assert got.tokens == sum(toks) and got.sentences == len(sents) and got.in_distribution
                assert sorted(got.probabilities) == clf.labels


def test_full_policy_reads_the_dense_engines_last_residual(cls_bundle, tmp_path):
    """The full policy's answer is the last adapter on the pooled final residual of the dense engine."""
    import onnx_ir as ir
    import onnxruntime as ort

    from cscompile.bundle import open_bundle
    from cscompile.exits.adapters import pool_features
    from cscompile.runtime import load

    text = sentiment_set(3, 2, "test")[2].text
    with open_bundle(cls_bundle.path) as b:
        layers = b.read_json("unit_map.json")["layers"]
        model = ir.load(str(next(e for e in b.engines if e.kind == "dense").path))
        values = {v.name: v for n in model.graph for v in n.outputs}
        model.graph.outputs.append(values[layers[-1]["residual_out"]])
        ir.save(model, str(tmp_path / "dense.onnx"), external_data="dense.bin")  # while the bundle is open
    sess = ort.InferenceSession(str(tmp_path / "dense.onnx"))
    with load(cls_bundle.path, threads=1) as m:
        ids = np.array([m.tokenizer.encode(text)], np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        for i in sess.get_inputs():
            if i.name == "position_ids":
                feed[i.name] = np.arange(ids.shape[1])[None]
            if i.name.startswith("past_key_values"):
                feed[i.name] = np.zeros((1, int(i.shape[1]), 0, int(i.shape[3])), np.float32)
        final = sess.run([layers[-1]["residual_out"]], feed)[0][0]
        want = m.classifier.sets["whole"][-1].proba(pool_features(final))
        got = m.classify(text, "full")
    np.testing.assert_allclose([got.probabilities[k] for k in got.probabilities], want, atol=1e-5)


def test_out_of_distribution_texts_are_answered_by_the_full_model(cls_bundle):
    import dataclasses

    from cscompile.runtime import load

    text = sentiment_set(5, 2, "test")[4].text
    with load(cls_bundle.path, threads=1) as m:
        full = m.classify(text, "full")
        clf = m.classifier
        clf.outliers = dataclasses.replace(clf.outliers, threshold=0.0)  # everything is an outlier now
        flagged = m.classify(text, "2d")
        clf.outliers = dataclasses.replace(clf.outliers, threshold=1e9)
        usual = m.classify(text, "2d")
    assert not flagged.in_distribution and flagged.policy == "full" and usual.in_distribution
    assert (flagged.label, flagged.exit_layer, flagged.sentences_read) == (full.label, 4, full.sentences)
    assert flagged.confidence == pytest.approx(full.confidence, abs=1e-6)


def test_bad_classify_requests(cls_bundle, tiny_dir, tmp_path):
    from cscompile.bundle import BundleError
    from cscompile.compiler.build import build_bundle
    from cscompile.runtime import load

    with load(cls_bundle.path, threads=1) as m:
        with pytest.raises(UserError, match="text .*is empty"):
            m.classify("   ")
        with pytest.raises(UserError, match="policy .*one of 2d, layer, sentence, full"):
            m.classify("fine", "fast")
    plain = tmp_path / "plain"
    build_bundle(tiny_dir("llama-4l"), plain, precision="fp32")
    with load(plain, threads=1) as m, pytest.raises(BundleError, match="has no classifier"):
        m.classify("fine")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"labels": "a,b"}, "--labels/--train.*without --task classify"),
        ({"task": "classify", "labels": "a,b"}, "without --train"),
        ({"task": "classify", "train": "ROWS"}, "without --labels"),
        ({"task": "classify", "labels": "positive", "train": "ROWS"}, "--labels"),
        ({"task": "classify", "labels": "negative,positive", "train": "FEW"}, "too few rows for"),
        ({"task": "summarize"}, "--task"),
        (
            {"task": "classify", "labels": "negative,positive", "train": "ROWS", "exit_layers": "9"},
            "--exit-layers",
        ),
        ({"task": "classify", "labels": "negative,positive", "train": "ROWS", "max_loss": 1.0}, "--max-loss"),
    ],
)
def test_bad_classify_builds_fail_in_one_line_and_write_nothing(tiny_dir, tmp_path, kwargs, match):
    from cscompile.compiler.build import build_bundle

    rows = _rows(tmp_path / "rows.jsonl", 60)
    (tmp_path / "few.jsonl").write_text(rows.read_text().splitlines()[0] + "\n")
    kwargs = {k: {"ROWS": rows, "FEW": tmp_path / "few.jsonl"}.get(v, v) for k, v in kwargs.items()}
    out = tmp_path / "out.csb"
    with pytest.raises(UserError, match=match) as err:
        build_bundle(tiny_dir("llama-4l"), out, precision="fp32", **kwargs)
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["few.jsonl", "rows.jsonl"]


def test_teacher_labels_rows_without_a_label(tiny_dir, tmp_path):
    from cscompile.compiler.build import build_bundle
    from cscompile.runtime import load

    rows = sentiment_set(60, 2, "train")
    # half the rows unlabelled; the tiny model's answers are arbitrary but must be one of the labels
    (tmp_path / "rows.jsonl").write_text(
        "".join(
            json.dumps({"text": r.text, **({"label": r.label} if i % 2 else {})}) + "\n"
            for i, r in enumerate(rows)
        )
    )
    try:
        res = build_bundle(tiny_dir("llama-4l"), tmp_path / "t.csb", precision="fp32", task="classify",
                           labels="negative,positive", train=tmp_path / "rows.jsonl", teacher=True)  # fmt: skip
    except UserError as exc:  # a random model may put every row on one side: then a clear error
        assert "too few rows" in str(exc)
        return
    with load(res.path, threads=1) as m:
        t = m.classifier.report["teacher"]
    assert t["labelled_by_teacher"] == 30 and 0.0 <= t["agreement_with_given_labels"] <= 1.0


def test_teacher_scores_the_label_words(tiny_dir):
    """The teacher's choice is the label with the larger summed log-probability (checked by hand)."""
    from cscompile.decode.session import DecoderSession
    from cscompile.decode.tokenizer import Tokenizer

    d = tiny_dir("llama-4l")
    tok = Tokenizer(d / "tokenizer")
    texts = ["The room was spotless.", "The plot made no sense."]
    got = C.teacher_labels(d / "model.onnx", tok, texts, ["bad", "good"])
    sess = DecoderSession(d / "model.onnx")
    for text, lab in zip(texts, got):
        prompt = C.label_prompt(tok, text, ["bad", "good"])
        best = []
        for word in ("bad", "good"):
            scores = []
            for w in (word, word.capitalize()):
                ids = tok.encode(prompt + w)
                n = len(tok.encode(prompt))
                logits = sess.forward(np.array([ids]), sess.new_state())[0].astype(np.float64)
                lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
                scores.append(sum(logits[t - 1, ids[t]] - lse[t - 1] for t in range(n, len(ids))))
            best.append(max(scores))
        assert lab == int(np.argmax(best))


def test_classify_cli(cls_bundle, tmp_path):
    from click.testing import CliRunner

    from cscompile.cli.main import cli, main

    r = CliRunner().invoke(
        cli, ["classify", str(cls_bundle.path), "The food was delicious. We went on Monday."]
    )
    assert r.exit_code == 0, r.output
    label, conf, where, ms = r.stdout.strip().split("\t")
    assert label in ("negative", "positive") and 0.5 <= float(conf) <= 1 and "exit at layer" in where
    r = CliRunner().invoke(cli, ["classify", str(cls_bundle.path), "Fine.", "--json", "--policy", "full"])
    doc = json.loads(r.stdout)
    assert doc["policy"] == "full" and doc["exit_layer"] == 4 and doc["sentences"] == 1
    (tmp_path / "t.txt").write_text("The room was spotless.\n")
    r = CliRunner().invoke(cli, ["classify", str(cls_bundle.path), "--file", str(tmp_path / "t.txt")])
    assert r.exit_code == 0 and r.stdout.split("\t")[0] in ("negative", "positive")
    assert main(["classify", str(cls_bundle.path), ""]) == 2
    assert main(["classify", str(cls_bundle.path)]) == 2
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    assert main(["classify", str(cls_bundle.path), "--file", str(tmp_path / "bin.txt")]) == 2
    assert main(["classify", str(tmp_path / "none.csb"), "fine"]) == 2


class _FakeBundle:
    """Just enough of a bundle to hand ``load_classifier`` a malformed classifier part."""

    source = "fake.csb"
    sections = {C.SECTION: C.SPEC_FILE}

    def __init__(self, doc, arrays):
        self.doc, self.arrays = doc, arrays

    def read_json(self, rel):
        return self.doc

    def read_npz(self, rel):
        return self.arrays

    def path_of(self, rel):
        raise AssertionError("a malformed spec must be refused before any engine is opened")


def test_malformed_classifier_parts_are_one_line_bundle_errors(cls_bundle):
    from cscompile.bundle import BundleError, open_bundle

    with open_bundle(cls_bundle.path) as b:
        doc, arrays = b.read_json(C.SPEC_FILE), b.read_npz(C.ADAPTERS_FILE)
    bad_docs = [
        {**doc, "labels": ["only"]},
        {**doc, "cuts": [0, 2, 1, 4]},
        {**doc, "blocks": doc["blocks"][:-1]},
        {k: v for k, v in doc.items() if k != "thresholds"},
        {**doc, "ood_distance": "far"},
        [],
    ]
    for bad in bad_docs:
        with pytest.raises(BundleError, match="is not a classifier spec") as err:
            C.load_classifier(_FakeBundle(bad, arrays), None)
        assert "\n" not in str(err.value)
    no_basis = {k: v for k, v in arrays.items() if not k.startswith("ood.")}
    with pytest.raises(BundleError, match="no valid outlier basis"):
        C.load_classifier(_FakeBundle(doc, no_basis), None)
    three = {**doc, "labels": ["a", "b", "c"]}
    with pytest.raises(BundleError, match="adapters disagree with the label count"):
        C.load_classifier(_FakeBundle(three, arrays), None)


def test_outlier_test_flags_states_off_the_training_subspace():
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(64, 8)))[0].T  # an 8-dim subspace of R^64
    x = rng.normal(size=(2000, 8)) @ basis * 3 + rng.normal(size=(2000, 64)) * 0.05 + 1.0
    o = C.Outliers.fit(x, components=8, percentile=99.5)
    assert 0.002 < np.mean(o.distance(x) > o.threshold) <= 0.006
    off = 1.0 + rng.normal(size=(100, 64)) * 0.5  # leaves the subspace
    assert np.all(o.distance(off) > o.threshold)
    inside = rng.normal(size=(100, 8)) @ basis * 6 + 1.0  # far along it: not an outlier of this test
    assert np.mean(o.distance(inside) > o.threshold) < 0.05
