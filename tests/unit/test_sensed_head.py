"""The sensed vocabulary head (qdecode.c cs_dec_forward_sensed) against the full head and numpy."""

from __future__ import annotations

import ctypes
import dataclasses

import numpy as np
import pytest

from cscompile.errors import UserError
from cscompile.native import engine as native
from cscompile.native import vocab
from tests.unit.test_native import CFG, _build, _reference_logits, _tiny, needs_cc

VCFG = {**CFG, "vocab": 500}  # enough rows for a top K to mean something (not a multiple of 16)


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    """The tiny model with its (tied) head as bit planes; the preview is their high plane (None)."""
    w, dense = _tiny(3, c=VCFG)
    return native.head_as_planes(w), dense, None, vocab.preview_errors(w.head)


def _full_step(w, ids):  # type: ignore[no-untyped-def]
    d = native.NativeDecoder(w, threads=2, max_ctx=64)
    d.forward(ids[:-1])
    return d.step(int(ids[-1])).copy()


def _sensed_step(w, ids, sensed):  # type: ignore[no-untyped-def]
    d = native.NativeDecoder(w, threads=2, max_ctx=64)
    d.forward(ids[:-1])
    st = d.step_greedy(int(ids[-1]), sensed)
    assert d._preview is not None
    return d, st


def test_selection_equals_numpy_reference(model) -> None:  # type: ignore[no-untyped-def]
    w, dense, preview, err = model
    V, K = VCFG["vocab"], 24
    ids = np.random.default_rng(1).integers(0, V, 9)
    full = _full_step(w, ids)
    # preview scores: the dequantized preview on the numpy model's final hidden state
    ref_p = _reference_logits(dict(dense, head=vocab.plane_preview(w.head)), ids, c=VCFG)[-1]
    d, st = _sensed_step(w, ids, native.SensedHead(preview, K, float("inf"), err))
    p = d._preview[:V].copy()  # type: ignore[index]
    np.testing.assert_allclose(p, ref_p, rtol=0, atol=2e-3 * np.abs(ref_p).max())
    assert np.isclose(st.xnorm, np.linalg.norm(_hidden(dense, ids)), rtol=1e-4)
    ref_e = np.linalg.norm(native.unpack(w.head).dequantize() - vocab.plane_preview(w.head), axis=1)
    np.testing.assert_allclose(err[:V], np.maximum(ref_e, 1e-3 * np.median(ref_e)), rtol=1e-5)
    for tau in (0.0, 0.05, 1e9):
        d, st = _sensed_step(w, ids, native.SensedHead(preview, K, tau, err))
        u = d._preview[:V].copy()  # type: ignore[index]
        # the upper bounds u_n = p_n + tau e_n |x|, ranked
        np.testing.assert_allclose(
            u, p + np.float32(tau) * err[:V] * np.float32(st.xnorm), rtol=1e-6, atol=1e-6
        )
        order = np.lexsort((np.arange(V), -u))  # by bound, then index
        cand = np.sort(d._cand[:K])
        assert set(cand) == set(order[:K])
        assert st.left_out == u[order[K]]
        np.testing.assert_array_equal(d._logits[cand], full[cand])  # exact rows, bit for bit
        zbest = full[cand].max()
        assert st.best == zbest
        passed = zbest > u[order[K]]
        assert st.fell_back == (not passed)
        want = int(cand[np.argmax(full[cand])]) if passed else int(np.argmax(full))
        assert st.token == want


def _hidden(dense, ids):  # type: ignore[no-untyped-def]
    """The final normalized hidden state, read off the numpy model via an identity head."""
    eye = np.eye(VCFG["hidden"])
    return _reference_logits(dict(dense, head=eye), ids, c=VCFG)[-1]


def test_rule_forced_to_fail_is_the_full_head_bit_for_bit(model) -> None:  # type: ignore[no-untyped-def]
    w, _, preview, err = model
    ids = np.random.default_rng(2).integers(0, VCFG["vocab"], 7)
    full = _full_step(w, ids)
    d, st = _sensed_step(w, ids, native.SensedHead(preview, 5, float("inf"), err))
    assert st.fell_back
    np.testing.assert_array_equal(d._logits[: VCFG["vocab"]], full)
    assert st.token == int(np.argmax(full))


def test_a_candidate_set_that_misses_the_argmax_is_caught(model) -> None:  # type: ignore[no-untyped-def]
    w, _, _, err = model
    V, K = VCFG["vocab"], 8
    ids = np.random.default_rng(4).integers(0, V, 6)
    full = _full_step(w, ids)
    top = int(np.argmax(full))
    # a preview whose row for the true argmax is negated: that token falls out of the top K
    dq = native.unpack(w.head).dequantize()
    dq[top] = -dq[top]
    bad_p = native.pack(native.rtn_grid(dq, "Q4_1"))
    d, st = _sensed_step(w, ids, native.SensedHead(bad_p, K, 0.0, err))
    assert top not in set(d._cand[:K]) and st.token != top  # the case: tau = 0 passes a wrong token
    assert not st.fell_back
    dec = native.NativeDecoder(w, threads=2, max_ctx=64)
    bad_e = vocab.preview_errors(w.head, bad_p)
    tau, _ = vocab.calibrate_tau(dec, bad_p, ids, bad_e)  # the margin measured on this preview's errors
    d, st = _sensed_step(w, ids, native.SensedHead(bad_p, K, tau, bad_e))
    # caught: the row's large preview error lifts its bound into the candidates, or the rule fails
    assert st.token == top and (st.fell_back or top in set(d._cand[:K]))


def test_greedy_generation_equals_the_full_head(model) -> None:  # type: ignore[no-untyped-def]
    w, _, preview, err = model
    rng = np.random.default_rng(5)
    dec = native.NativeDecoder(w, threads=2, max_ctx=64)
    tau, worst = vocab.calibrate_tau(dec, preview, rng.integers(0, VCFG["vocab"], 40), err)
    sensed = native.SensedHead(preview, 64, tau, err)
    fell = []
    for _ in range(3):
        prompt = list(rng.integers(0, VCFG["vocab"], 5))
        want = dec.generate(prompt, 20)
        assert dec.generate(prompt, 20, sensed=sensed) == want
        dec.reset()
        dec.forward(prompt)
        fell += [dec.step_greedy(t, sensed).fell_back for t in want[:-1]]
    assert not all(fell)  # the preview decided some steps (else the test proves nothing)


def test_refuses_what_does_not_fit(model) -> None:  # type: ignore[no-untyped-def]
    w, _, preview, err = model
    dec = native.NativeDecoder(w, threads=2, max_ctx=64)
    q8 = dataclasses.replace(w, head=native.from_planes(w.head))
    with pytest.raises(UserError, match="bit-plane"):  # the plane preview needs the head as planes
        native.NativeDecoder(q8, threads=2, max_ctx=64).step_greedy(1, native.SensedHead(None, 4, 1.0, err))
    for bad in (native.SensedHead(preview, 0, 1.0, err), native.SensedHead(preview, 501, 1.0, err),
                native.SensedHead(preview, 4, float("nan"), err)):  # fmt: skip
        with pytest.raises(UserError):
            dec.step_greedy(1, bad)
    with pytest.raises(UserError, match="bits"):
        vocab.build_preview(w.head, 3)
    # past the Python checks, the C step refuses a preview of another shape itself
    preview = vocab.build_preview(w.head)  # a separate Q4_1 preview
    short = dataclasses.replace(preview, d=preview.d[:-1])
    pv = short.struct()
    out, stats, cand = np.zeros(2, np.int32), np.zeros(3, np.float32), np.zeros(5, np.int32)
    args = [ctypes.byref(dec.model), ctypes.addressof(pv), err.ctypes.data, err.size, 1, 0, 4, 1.0, dec._logits.ctypes.data,
            dec._logits.size, dec._logits.ctypes.data, dec._logits.size, cand.ctypes.data, cand.size,
            out.ctypes.data, out.size, stats.ctypes.data, stats.size]  # fmt: skip
    assert dec.lib.cs_dec_forward_sensed(*args) == -7
    whole = preview.struct()
    args[1], args[13] = ctypes.addressof(whole), 4  # cand shorter than K + 1
    assert dec.lib.cs_dec_forward_sensed(*args) == -4
    args[13], args[3] = 5, VCFG["vocab"] - 1  # row errors shorter than the vocabulary
    assert dec.lib.cs_dec_forward_sensed(*args) == -4
    for bad_e in (np.full(3, np.nan), np.zeros(VCFG["vocab"]), -err):
        with pytest.raises(UserError, match="row error"):
            native.SensedHead(preview, 4, 1.0, bad_e)
    assert dec.lib.cs_dec_forward_sensed(*args) == -4
    args[1], args[3] = None, err.size  # the head's high plane: refused when the head is Q8_0
    assert dec.lib.cs_dec_forward_sensed(*args) == 0
    q8dec = native.NativeDecoder(q8, threads=2, max_ctx=64)
    args[0] = ctypes.byref(q8dec.model)
    assert dec.lib.cs_dec_forward_sensed(*args) == -7


@needs_cc
@pytest.mark.parametrize("march,level", [("x86-64", "scalar"), ("haswell", "avx2")])
def test_other_builds_select_the_same(tmp_path, model, march, level) -> None:  # type: ignore[no-untyped-def]
    """The scalar and AVX2 builds: the same candidates, exact rows and token as the installed build."""
    w, _, preview, err = model
    lib = _build(tmp_path, march)
    assert native.SIMD_LEVELS[lib.cs_dec_simd()] == level
    ids = np.random.default_rng(6).integers(0, VCFG["vocab"], 8)
    sensed = native.SensedHead(preview, 16, 0.0, err)
    got = []
    for build in (lib, None):
        d = native.NativeDecoder(w, threads=2, max_ctx=64, lib=build)
        d.forward(ids[:-1])
        st = d.step_greedy(int(ids[-1]), sensed)
        cand = np.sort(d._cand[:16])
        got.append((st.token, st.fell_back, cand, d._logits[cand], d._preview))
    assert got[0][:2] == got[1][:2]
    np.testing.assert_array_equal(got[0][2], got[1][2])
    for a, b in zip(got[0][3:], got[1][3:], strict=True):
        np.testing.assert_allclose(
            a, b, rtol=0, atol=1e-4 * np.abs(b).max()
        )  # the builds sum in other orders


def test_text_model_greedy_uses_the_sensed_head(model, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from cscompile.decode.generate import GenerationConfig, TextModel

    w, _, preview, err = model
    rng = np.random.default_rng(7)
    dec = native.NativeDecoder(w, threads=2, max_ctx=64)
    tau, _ = vocab.calibrate_tau(dec, preview, rng.integers(0, VCFG["vocab"], 40), err)

    class _Tok:
        vocab_size = VCFG["vocab"]
        eos_token_ids: set[int] = set()

        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            return "".join(f"<{i}>" for i in ids)

    calls = []
    real = native.NativeDecoder.step_greedy
    monkeypatch.setattr(native.NativeDecoder, "step_greedy", lambda s, *a: calls.append(1) or real(s, *a))
    full = TextModel(native.NativeSession(w, 2, 64), _Tok())  # type: ignore[arg-type]
    sensed = TextModel(
        native.NativeSession(w, 2, 64, sensed=native.SensedHead(preview, 64, tau, err)), _Tok()
    )  # type: ignore[arg-type]
    prompt = [int(t) for t in rng.integers(0, VCFG["vocab"], 6)]
    greedy = GenerationConfig(max_new_tokens=16)
    want = full.generate(prompt, greedy).token_ids
    assert not calls
    assert sensed.generate(prompt, greedy).token_ids == want
    assert len(calls) == 15
    calls.clear()
    hot = GenerationConfig(max_new_tokens=8, temperature=0.8, seed=1)
    assert sensed.generate(prompt, hot).token_ids == full.generate(prompt, hot).token_ids
    assert not calls  # sampling keeps the full head


def test_sense_head_sets_a_calibrated_head_and_refuses_other_engines(model) -> None:  # type: ignore[no-untyped-def]
    w, _, _, _ = model
    sess = native.NativeSession(w, 2, 64)
    head = vocab.sense_head(sess, list(range(0, 400, 13)), k=32)
    assert sess.sensed is head and head.k == 32 and 0 < head.tau < float("inf")
    with pytest.raises(UserError, match="native engine"):
        vocab.sense_head(object(), [1, 2, 3])


def test_cli_refuses_a_sensed_head_without_a_bundle(capsys) -> None:  # type: ignore[no-untyped-def]
    from cscompile.cli.main import main

    assert main(["run", "smollm2", "hi", "--head", "sensed", "--temperature", "0.7"]) == 2
    assert "--head sensed" in capsys.readouterr().err


# -- the bundle section: planned at build time, loaded by the runtime ----------------------------
@pytest.fixture(scope="module")
def sensed_bundle(tiny_dir, tmp_path_factory):  # type: ignore[no-untyped-def]
    from cscompile.compiler.build import build_bundle

    root = tmp_path_factory.mktemp("vocab")
    on = build_bundle(tiny_dir("llama-q-2l"), root / "on", precision="int4", sensed_head="on")
    off = build_bundle(tiny_dir("llama-q-2l"), root / "off", precision="int4", sensed_head="off")
    return on.path, off.path


def test_the_build_plans_the_head_and_the_runtime_uses_it(sensed_bundle) -> None:  # type: ignore[no-untyped-def]
    from cscompile.bundle import open_bundle
    from cscompile.runtime import GenerationConfig, GenerationStats, load

    on, off = sensed_bundle
    with open_bundle(on) as b:
        assert b.sections["vocab"] == "native/vocab.json" and "native/vocab.bin" in b.files
        v = b.read_json("native/vocab.json")
        # no preview copy: vocab.bin holds e_n alone (4 bytes a padded row)
        assert (b.root / "native/vocab.bin").stat().st_size <= 4 * v["preview"]["n"] + 64 + 4 * 16
        assert v["preview"]["layout"] == "planes" and v["preview"]["bytes"] == 0
    with open_bundle(off) as b:
        assert "vocab" not in b.sections and "native/vocab.bin" not in b.files
        off_bytes = (b.root / "native/weights.bin").stat().st_size
    with open_bundle(on) as b:  # the same bytes: the planes are the Q8_0 head's, shuffled
        assert (b.root / "native/weights.bin").stat().st_size == off_bytes
        assert b.read_json("native/engine.json")["matrices"]["head"]["bits"] == native.PLANES
    chosen = next(r for r in v["table"] if r["k"] == v["k"])
    assert chosen["misses_passed"] == 0 and v["heldout_worst_over_tau"] <= 1.0 and v["calib_tokens"] == 512
    # the chosen K has the fewest expected bytes among the K that let no miss through
    assert chosen["expected_bytes_per_token"] == min(
        r["expected_bytes_per_token"] for r in v["table"] if r["misses_passed"] == 0
    )
    greedy = GenerationConfig(max_new_tokens=24)
    got = {}
    for head in ("auto", "full"):
        with load(on, threads=1, head=head) as bm:
            assert (bm.session.sensed is not None) == (head == "auto")
            st = GenerationStats()
            got[head] = [
                e.token_id for e in bm.stream("the quick brown fox", greedy, stats=st) if e.token_id >= 0
            ]
            assert st.head_steps == (23 if head == "auto" else 0) and st.head_fallbacks <= st.head_steps
            assert st.head_steps == 0 or (st.new_tokens == 24 and st.head_fallbacks < st.head_steps)
    assert got["auto"] == got["full"]
    with load(on, threads=1) as bm:  # the head's bit planes, K and tau as the build measured
        s = bm.session.sensed
        assert (s.k, s.tau) == (v["k"], v["tau"]) and s.preview is None
        assert bm.session.weights.head.bits == native.PLANES and bm.session.weights.emb is None  # tied
        np.testing.assert_array_equal(s.rowerr, vocab.preview_errors(bm.session.weights.head))
    with load(on, threads=1, head="full") as bm:  # the bundle stores the head once, as planes
        assert bm.session.weights.head.bits == native.PLANES and bm.session.sensed is None
    with load(off, threads=1) as bm:  # no sensed head: the head stays Q8_0
        assert bm.session.weights.head.bits == 8
    with pytest.raises(UserError, match="no sensed vocabulary head"):
        load(off, threads=1, head="sensed")
    with pytest.raises(UserError, match="head"):
        load(on, threads=1, head="maybe")


def test_a_bad_vocab_section_is_refused_in_one_line(sensed_bundle) -> None:  # type: ignore[no-untyped-def]
    from cscompile.bundle import BundleError, open_bundle
    from cscompile.native.engine import load_weights

    on, _ = sensed_bundle
    with open_bundle(on) as b:
        meta = b.read_json("native/vocab.json")
        w = load_weights(b.root, b.read_json("native/engine.json"), "b")
        assert vocab.load_vocab(b.root, meta, w, "b").k == meta["k"]
        bad = [
            {**meta, "format_version": 9}, {**meta, "k": 0}, {**meta, "k": 10**10}, {**meta, "k": True},
            {**meta, "tau": -1.0}, {**meta, "tau": float("nan")}, {**meta, "tau": "1"},
            {**meta, "preview": {**meta["preview"], "n": meta["preview"]["n"] + 16}},
            {**meta, "arrays": {**meta["arrays"], "rowerr": {**meta["arrays"]["rowerr"], "offset": 10**9}}},
            {**meta, "preview": {**meta["preview"], "layout": "copy"}}, {**meta, "format_version": 1},
            {**meta, "arrays": {}},
            {**meta, "arrays": {**meta["arrays"], "rowerr": {**meta["arrays"]["rowerr"], "shape": [16]}}},
        ]  # fmt: skip
        for m in bad:
            with pytest.raises(BundleError) as info:
                vocab.load_vocab(b.root, m, w, "b")
            assert "native/vocab.json" in str(info.value.subject) and "\n" not in str(info.value)


def test_the_plan_ships_nothing_when_the_margin_does_not_hold(model) -> None:  # type: ignore[no-untyped-def]
    w, _, _, _ = model
    rng = np.random.default_rng(11)
    # a margin calibrated on two tokens does not cover the errors of 200 held-out ones
    plan = vocab.plan_head(w, rng.integers(0, VCFG["vocab"], 2), rng.integers(0, VCFG["vocab"], 200))
    assert plan.sensed is None and plan.heldout_worst_over_tau > 1.0 and "margin" in plan.why
    plan = vocab.plan_head(w, rng.integers(0, VCFG["vocab"], 200), rng.integers(0, VCFG["vocab"], 100))
    assert plan.sensed is not None and plan.heldout_worst_over_tau <= 1.0 and plan.k in vocab.PLAN_KS


def test_cli_head_flags(sensed_bundle, capsys) -> None:  # type: ignore[no-untyped-def]
    from cscompile.cli.main import main

    on, off = sensed_bundle
    capsys.readouterr()
    assert main(["run", str(on), "hello", "-n", "8", "--stats", "--threads", "1"]) == 0
    assert "sensed head: 7 greedy steps" in capsys.readouterr().out
    assert main(["inspect", str(on)]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "preview = the head's high bit plane" in shown and "(+0% of the head's" in shown
    assert main(["run", str(off), "hello", "-n", "4", "--head", "sensed"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --head sensed") and len(err.splitlines()) == 1


def test_sampling_logits_are_exact_candidates_and_the_preview_elsewhere(model) -> None:  # type: ignore[no-untyped-def]
    w, _, preview, err = model
    V, K = VCFG["vocab"], 24
    ids = np.random.default_rng(12).integers(0, V, 9)
    full = _full_step(w, ids)
    probe = native.SensedHead(preview, K, float("inf"), err)
    d, _ = _sensed_step(w, ids, probe)
    p = d._preview[:V].copy()  # type: ignore[index]  # the plain preview scores (the probe adds no bound)
    tau, _ = vocab.calibrate_tau(native.NativeDecoder(w, threads=2, max_ctx=64), preview, ids, err)
    d = native.NativeDecoder(w, threads=2, max_ctx=64)
    d.forward(ids[:-1])
    z, st = d.step_sensed_logits(int(ids[-1]), native.SensedHead(preview, K, tau, err))
    assert not st.fell_back  # else this checks only the fallback
    cand = d._cand[:K]
    np.testing.assert_array_equal(z[cand], full[cand])
    rest = np.setdiff1d(np.arange(V), cand)
    np.testing.assert_allclose(z[rest], p[rest], rtol=0, atol=1e-5 * np.abs(p).max())
    d = native.NativeDecoder(w, threads=2, max_ctx=64)
    d.forward(ids[:-1])
    z, st = d.step_sensed_logits(int(ids[-1]), probe)  # the rule forced to fail: the full head
    assert st.fell_back
    np.testing.assert_array_equal(z, full)
    assert vocab._tv(np.log(np.array([0.5, 0.5])), np.log(np.array([0.75, 0.25]))) == pytest.approx(0.25)


def test_only_head_sensed_samples_from_the_sensed_head(sensed_bundle, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from cscompile.runtime import GenerationConfig, load

    on, _ = sensed_bundle
    calls = []
    real = native.NativeDecoder.step_sensed_logits
    monkeypatch.setattr(
        native.NativeDecoder, "step_sensed_logits", lambda s, *a: calls.append(1) or real(s, *a)
    )
    hot = GenerationConfig(max_new_tokens=8, temperature=0.8, seed=3)
    with load(on, threads=1) as bm:
        auto = bm.generate("once upon a time", hot).token_ids
    assert not calls  # auto samples from the full head
    with load(on, threads=1, head="full") as bm:
        assert bm.generate("once upon a time", hot).token_ids == auto
    with load(on, threads=1, head="sensed") as bm:
        bm.generate("once upon a time", hot)
    assert len(calls) == 7


# -- the head's bit planes: the full head, the exact rows and the embedding read them ---------------
def _gemv(lib, m, x):  # type: ignore[no-untyped-def]
    y, work, s = np.zeros(m.n_padded, np.float32), np.zeros(4096, np.float32), m.struct()
    assert lib.cs_dec_gemv(ctypes.addressof(s), x.ctypes.data, x.size, y.ctypes.data, y.size, 2,
                           work.ctypes.data, work.size) == 0  # fmt: skip
    return y


def test_bit_planes_round_trip_the_q8_codes(model) -> None:  # type: ignore[no-untyped-def]
    w, _, _, _ = model
    q8 = native.from_planes(w.head)
    assert q8.bits == 8 and w.head.bits == native.PLANES and w.head.nbytes == q8.nbytes  # zero extra bytes
    np.testing.assert_array_equal(native.to_planes(q8).codes, w.head.codes)
    np.testing.assert_array_equal(native.unpack(w.head).q, native.unpack(q8).q)
    c = native.unpack(q8).q.astype(np.int16)
    assert c.min() < -100 and c.max() > 100  # both nibbles' full ranges are exercised
    with pytest.raises(UserError, match="Q8_0"):
        native.to_planes(vocab.build_preview(q8))


def _planes_equal_q8(lib, w) -> None:  # type: ignore[no-untyped-def]
    """The planes' full head, prefill logits (qgemm), decode step (qgemv) and tied embedding (qrow)
    against the Q8_0 head's, bit for bit, in build ``lib``."""
    q8 = dataclasses.replace(w, head=native.from_planes(w.head))
    x = np.random.default_rng(21).standard_normal(VCFG["hidden"]).astype(np.float32) * 3
    np.testing.assert_array_equal(_gemv(lib, w.head, x), _gemv(lib, q8.head, x))
    ids = np.random.default_rng(22).integers(0, VCFG["vocab"], 12)
    got = []
    for m in (w, q8):  # tied: every token's embedding row is read from the head (planes / Q8_0)
        d = native.NativeDecoder(m, threads=2, max_ctx=64, lib=lib)
        got.append((d.logits_all(ids).copy(), d.step(int(ids[0])).copy()))
    for a, b in zip(*got, strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_planes_full_head_is_the_q8_head_bit_for_bit(model) -> None:  # type: ignore[no-untyped-def]
    w, _, _, _ = model
    _planes_equal_q8(native.library(), w)
    # the batched step (qgemm: every sequence's logits from one pass over the head's groups)
    rows = []
    for m in (w, dataclasses.replace(w, head=native.from_planes(w.head))):
        sess = native.NativeSession(m, threads=2, context_length=64)
        states = [sess.new_state() for _ in range(3)]
        for i, st in enumerate(states):
            sess.forward_last(np.array([[1 + i, 7, 9 + i]]), st)
        rows.append(sess.forward_batch([4, 5, 6], states).copy())
    np.testing.assert_array_equal(rows[0], rows[1])
    # an untied model: the embedding keeps its own Q8_0 grid, the head alone is planes
    u, _ = _tiny(4, tied=False, c=VCFG)
    up = native.head_as_planes(u)
    assert up.emb is u.emb and up.head.bits == native.PLANES
    ids = np.random.default_rng(23).integers(0, VCFG["vocab"], 9)
    np.testing.assert_array_equal(
        native.NativeDecoder(up, threads=2, max_ctx=64).logits_all(ids),
        native.NativeDecoder(u, threads=2, max_ctx=64).logits_all(ids),
    )


@needs_cc
@pytest.mark.parametrize("march,level", [("x86-64", "scalar"), ("haswell", "avx2")])
def test_other_builds_planes_are_the_q8_head_bit_for_bit(tmp_path, model, march, level) -> None:  # type: ignore[no-untyped-def]
    w, _, _, err = model
    lib = _build(tmp_path, march)
    assert native.SIMD_LEVELS[lib.cs_dec_simd()] == level
    _planes_equal_q8(lib, w)
    # the plane preview against numpy in this build too, and its fallback is the full head
    ids = np.random.default_rng(24).integers(0, VCFG["vocab"], 9)
    d = native.NativeDecoder(w, threads=2, max_ctx=64, lib=lib)
    d.forward(ids[:-1])
    st = d.step_greedy(int(ids[-1]), native.SensedHead(None, 5, float("inf"), err))
    full = native.NativeDecoder(w, threads=2, max_ctx=64, lib=lib)
    full.forward(ids[:-1])
    np.testing.assert_array_equal(d._logits[: VCFG["vocab"]], full.step(int(ids[-1])))
    assert st.fell_back and st.token == int(np.argmax(d._logits[: VCFG["vocab"]]))
    _, dense = _tiny(3, c=VCFG)
    ref_p = _reference_logits(dict(dense, head=vocab.plane_preview(w.head)), ids, c=VCFG)[-1]
    p = d._preview[: VCFG["vocab"]]  # type: ignore[index]
    np.testing.assert_allclose(p, ref_p, rtol=0, atol=2e-3 * np.abs(ref_p).max())


def test_a_front_point_derives_from_a_planes_head(model) -> None:  # type: ignore[no-untyped-def]
    """A native front point derived from weights whose head is planes: 8-bit keeps the planes, 4-bit
    re-rounds the head and the tied embedding keeps reading the planes."""
    w, _, _, _ = model
    q8 = dataclasses.replace(w, head=native.from_planes(w.head))
    ids = np.random.default_rng(31).integers(0, VCFG["vocab"], 8)
    for bits in (8, 4):
        full = [native.LayerPlan()] * VCFG["n_layers"]
        a, b = native.derive(w, full, head_bits=bits), native.derive(q8, full, head_bits=bits)
        assert (a.head.bits == native.PLANES) == (bits == 8)
        np.testing.assert_array_equal(
            native.NativeDecoder(a, threads=2, max_ctx=64).logits_all(ids),
            native.NativeDecoder(b, threads=2, max_ctx=64).logits_all(ids),
        )


def test_hidden_states_and_top_bit_previews(model) -> None:  # type: ignore[no-untyped-def]
    """The sweep's inputs: the head's input recovered from the logits is the numpy model's final
    hidden state (up to the activations' quantization), and the 4-bit top-bits preview is the high
    plane's (values and e_n)."""
    w, dense, _, err = model
    ids = np.random.default_rng(11).integers(0, VCFG["vocab"], 7)
    x = vocab.hidden_states(native.NativeDecoder(w, threads=2, max_ctx=64), ids)
    want = _hidden(dense, ids)
    assert x.shape == (7, VCFG["hidden"])
    np.testing.assert_allclose(x[-1], want, rtol=0, atol=2e-2 * np.abs(want).max())
    p4, e4 = vocab.top_bits(w.head, 4)
    np.testing.assert_allclose(p4[: VCFG["vocab"]], vocab.plane_preview(w.head), rtol=1e-6)
    np.testing.assert_allclose(e4[: VCFG["vocab"]], err[: VCFG["vocab"]], rtol=1e-5)
    q = native.unpack(w.head).q.astype(np.int8).astype(np.float32)
    p2, _ = vocab.top_bits(w.head, 2)  # the centre of the 64 codes that share the top 2 bits
    d = np.repeat(native.unpack(w.head).scale, 32, axis=1)
    np.testing.assert_allclose(p2[: VCFG["vocab"]], d * (64 * np.floor(q / 64) + 31.5), rtol=1e-6)
    with pytest.raises(UserError, match="head_as_planes"):
        vocab.hidden_states(native.NativeDecoder(_q8(w), 2, 64), ids)


def _q8(w):  # type: ignore[no-untyped-def]
    return dataclasses.replace(w, head=native.from_planes(w.head))


def test_the_cascade_replay_never_passes_a_miss(model) -> None:  # type: ignore[no-untyped-def]
    """The numpy cascade (2- or 3-bit first stage over every row, the K1 best kept, their 4-bit
    preview, the K best, exact rows): a first stage that drops the argmax is caught by the rule
    (no miss passes), K1 = vocab is the one-stage 4-bit preview, and a margin too small lets misses
    through (what the rule's two thresholds guard against)."""
    w, _, _, _ = model
    V = VCFG["vocab"]
    rng = np.random.default_rng(12)
    dec = native.NativeDecoder(w, threads=2, max_ctx=64)
    xc, xh = (
        vocab.hidden_states(dec, rng.integers(0, V, 40)),
        vocab.hidden_states(dec, rng.integers(0, V, 40)),
    )
    C = vocab.PreviewChoice
    choices = [C(4, 16), C(2, 16, V), C(2, 16, 24), C(3, 8, 32), C(2, 4)]
    got = vocab.sweep_previews(w.head, V, xc, xh, choices)
    rows = got["rows"]
    assert got["tokens"] == 40 and all(r["misses_passed"] == 0 for r in rows)
    assert all(r["fallback_full_tiered"] <= r["fallback"] for r in rows)
    for k in ("fallback", "in_topk"):  # K1 = every row: the first stage keeps all, the 4-bit stage decides
        assert rows[1][k] == rows[0][k]
    loose = vocab.sweep_previews(w.head, V, xc, xh, [C(2, 4), C(2, 4, 24)], safety=1e-3)
    assert any(r["misses_passed"] > 0 for r in loose["rows"])  # tau too small: the rule is unsound
    full = w.head.nbytes
    assert vocab.choice_bytes(w.head, C(4, 16), 1.0) > full  # a certain fallback costs more than the head


def test_a_first_stage_that_drops_the_argmax_is_caught() -> None:
    """A constructed head: 40 rows alternating codes 0 and 63, row 47 all 63 (the argmax), rows
    40-46 all 20. At a constant x the 2-bit preview scores every row alike (the centre 31.5), and
    rows 0-39 and 47 share the highest bound, so a first stage keeping K1 = 24 keeps rows 0-23
    (ties by index) and drops the argmax; the best exact candidate then stays below the best
    bound left out, and the rule falls back."""
    from cscompile.quant.gguf import BlockGrid

    n, k = 48, 64
    q = np.zeros((n, k), np.int8)
    q[:40, 1::2] = 63
    q[40:47] = 20
    q[47] = 63
    head = native.to_planes(
        native.pack(BlockGrid("Q8_0", q, np.full((n, k // 32), 1 / 64, np.float32), None))
    )
    x = np.outer([1.0, 0.5, 2.0], np.ones(k)).astype(np.float32)
    C = vocab.PreviewChoice
    got = vocab.sweep_previews(head, n, x, x, [C(2, 4, 24), C(2, 4, 48)])
    cut, keep_all = got["rows"]
    assert got["taus"][2] == pytest.approx(1.25)  # row 47's error is exactly its e_n |x|
    assert cut["in_topk"] == 0 and cut["fallback"] == 1 and cut["misses_passed"] == 0
    assert cut["fallback_full_tiered"] == 0  # tiered: the 4-bit stage over every row finds row 47
    assert keep_all["misses_passed"] == 0
