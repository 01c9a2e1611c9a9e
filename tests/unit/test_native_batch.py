"""Continuous batching in the native step (issue 25 item 2): ``cs_dec_forward_batch`` runs one
token for each of B sequences, each with its own cache and position, in one call.

Every row of a batched step is compared with the same sequence stepped alone, bit for bit
(tolerance 0): the per-token operations are the single-token forward's and the multi-token
product computes the single-token product's numbers, in the installed, scalar and AVX2 builds.
"""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import numpy as np
import pytest
from test_native import CFG, _build, _tiny, needs_cc

from cscompile.errors import UserError
from cscompile.native import engine as native


def _avx512_here() -> bool:
    try:
        flags = re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        return False
    return flags is not None and {"avx512f", "avx512bw"} <= set(flags.group(1).split())


BUILDS = ["installed", pytest.param("x86-64", marks=needs_cc), pytest.param("haswell", marks=needs_cc)]
BUILDS.append(pytest.param("skylake-avx512", marks=[needs_cc, pytest.mark.skipif(not _avx512_here(), reason="no AVX-512")]))  # fmt: skip


_BUILT: dict[str, ctypes.CDLL] = {}


@pytest.fixture(params=BUILDS)
def build(request, tmp_path_factory, monkeypatch):
    """The kernel build the test runs on (``installed``: the one cscompile loads here)."""
    if request.param != "installed":
        if request.param not in _BUILT:  # compiled once per test run
            _BUILT[request.param] = _build(tmp_path_factory.mktemp("k"), request.param)
        monkeypatch.setattr(native, "_lib", _BUILT[request.param])
    return request.param


def _session(seed: int = 2, context: int = 128) -> native.NativeSession:
    w, _ = _tiny(seed=seed)
    return native.NativeSession(w, threads=2, context_length=context)


class Solo:
    """One sequence stepped alone (one C call per token): greedy tokens and the logits of each step."""

    def __init__(self, sess: native.NativeSession, prompt: np.ndarray) -> None:
        # a cache of 16 positions to start with (the session's states start at 256), doubling
        dec = native.NativeDecoder(
            sess.weights, sess.threads, sess.context_length, capacity=16, rope=sess.rope()
        )
        self.sess, self.state = sess, native.NativeState(dec)
        self.logits = [sess.forward_last(prompt[None], self.state)]
        self.tokens = [int(np.argmax(self.logits[-1]))]

    def step(self) -> None:
        self.logits.append(self.sess.forward_last(np.array([[self.tokens[-1]]]), self.state))
        self.tokens.append(int(np.argmax(self.logits[-1])))


@pytest.mark.parametrize("B", [1, 3, 5])
def test_batched_steps_equal_solo_steps_bit_for_bit(build, B):
    """B sequences with prompts of different lengths (so different positions and cache capacities,
    which grow from 16 during the run) stepped 16 times together: every row equals the sequence's
    own step exactly, and the greedy tokens are the same.
    """
    sess = _session()
    rng = np.random.default_rng(B)
    prompts = [rng.integers(0, CFG["vocab"], n) for n in (3, 14, 40, 9, 27)[:B]]
    alone = [Solo(sess, p) for p in prompts]
    together = [Solo(sess, p) for p in prompts]  # prefilled alone, then stepped in one call
    for _ in range(16):
        for s in alone:
            s.step()
        out = sess.forward_batch([s.tokens[-1] for s in together], [s.state for s in together])
        assert out.shape == (B, CFG["vocab"])
        for s, row in zip(together, out):
            s.logits.append(row)
            s.tokens.append(int(np.argmax(row)))
    caps = [s.state.decoder.capacity for s in together]
    assert caps == [32, 32, 64, 32, 64][:B]  # caches of different sizes, which grew during the run
    for a, t in zip(alone, together):
        assert t.tokens == a.tokens
        assert t.state.length == a.state.length
        np.testing.assert_array_equal(np.stack(t.logits), np.stack(a.logits))  # tolerance 0


def test_sequences_join_and_leave_between_steps(build):
    """A and B start together; C joins after its prefill at step 5; A leaves after step 9: each
    sequence's logits and tokens are those it gets alone.
    """
    sess = _session(seed=4)
    rng = np.random.default_rng(7)
    prompts = {name: rng.integers(0, CFG["vocab"], n) for name, n in (("A", 5), ("B", 21), ("C", 11))}
    alone = {k: Solo(sess, p) for k, p in prompts.items()}
    for s in alone.values():
        for _ in range(16):
            s.step()
    live: dict[str, Solo] = {k: Solo(sess, prompts[k]) for k in "AB"}
    for step in range(16):
        if step == 5:
            live["C"] = Solo(sess, prompts["C"])
        if step == 10:
            del live["A"]
        names = sorted(live)
        out = sess.forward_batch([live[k].tokens[-1] for k in names], [live[k].state for k in names])
        for k, row in zip(names, out):
            live[k].logits.append(row)
            live[k].tokens.append(int(np.argmax(row)))
    for k, s in live.items():
        ref = alone[k]
        n = len(s.tokens)
        assert s.tokens == ref.tokens[:n]
        np.testing.assert_array_equal(np.stack(s.logits), np.stack(ref.logits[:n]))
    assert len(live["B"].tokens) == 17 and len(live["C"].tokens) == 12


def _c_call(sess, B, tokens, positions, kcs, vcs, caps, lens, out, out_len=None):  # type: ignore[no-untyped-def]
    """cs_dec_forward_batch with raw arguments (None: a null pointer)."""
    assert sess._batch is not None

    alive = []

    def ptrs(arrs):  # type: ignore[no-untyped-def]
        if arrs is None:
            return None
        alive.append(
            (ctypes.c_void_p * max(1, len(arrs)))(*[None if a is None else a.ctypes.data for a in arrs])
        )
        return ctypes.addressof(alive[-1])

    keep = [np.asarray(tokens, np.int32), np.asarray(positions, np.int32), np.asarray(caps, np.int32),
            np.asarray(lens, np.int64)]  # fmt: skip
    return native.library().cs_dec_forward_batch(
        ctypes.byref(sess._batch.model), B, keep[0].ctypes.data, keep[1].ctypes.data, ptrs(kcs), ptrs(vcs),
        keep[2].ctypes.data, keep[3].ctypes.data, None if out is None else out.ctypes.data,
        out.size if out_len is None and out is not None else (out_len or 0),
    )  # fmt: skip


def test_the_c_step_refuses_bad_batches():
    """Sizes the C step receives are checked before use: a bad batch is an error code, not a crash."""
    sess = _session()
    st = [sess.new_state() for _ in range(3)]
    for s in st:
        sess.forward_last(np.array([[1, 2, 3]]), s)
    sess.forward_batch([1, 2, 3], st)  # makes the batch struct; positions are now 4
    d = [s.decoder for s in st]
    vpad = sess.weights.head.n_padded
    out = np.zeros((65, vpad), np.float32)
    kcs, vcs = [x.kc for x in d], [x.vc for x in d]
    caps, lens, pos = [x.capacity for x in d], [x.kc.size for x in d], [x.pos for x in d]

    def call(**kw):  # type: ignore[no-untyped-def]
        a = dict(B=3, tokens=[1, 2, 3], positions=pos, kcs=kcs, vcs=vcs, caps=caps, lens=lens, out=out)
        a.update(kw)
        return _c_call(sess, a["B"], a["tokens"], a["positions"], a["kcs"], a["vcs"], a["caps"], a["lens"],
                       a["out"], a.get("out_len"))  # fmt: skip

    assert call() == 0
    assert call(B=0) == -9  # no sequence
    assert (
        call(B=65, tokens=[1] * 65, positions=[0] * 65, caps=[16] * 65, lens=[0] * 65) == -9
    )  # > CS_MAX_BATCH
    assert call(B=-1) == -9
    assert call(positions=[4, caps[1], 4]) == -1  # beyond that sequence's cache
    assert call(positions=[4, -1, 4]) == -1
    assert call(positions=[4, 4, sess.context_length], caps=[caps[0], caps[1], 2**31 - 1], lens=[lens[0], lens[1], 2**62]) == -1  # fmt: skip
    assert call(tokens=[1, CFG["vocab"], 3]) == -1
    assert call(kcs=None) == -4 and call(vcs=None) == -4  # null cache arrays
    assert call(kcs=[kcs[0], None, kcs[2]]) == -4  # a null cache
    assert call(caps=[caps[0], caps[1] * 2, caps[2]]) == -4  # a capacity the cache does not hold
    assert call(lens=[lens[0], lens[1] - 1, lens[2]]) == -4
    assert call(caps=[0, caps[1], caps[2]]) == -4
    assert call(out=out, out_len=3 * vpad - 1) == -4  # logits too short
    assert call(out=None) == -4
    assert call(kcs=[kcs[0], kcs[0], kcs[2]]) == -9  # two sequences, one cache
    assert call(vcs=[vcs[0], kcs[1], vcs[2]]) == -9  # a sequence's K and V overlap
    assert [x.pos for x in d] == pos  # nothing ran


def test_forward_batch_refuses_what_it_cannot_step():
    sess = _session()
    other = _session(seed=9)
    a, b = sess.new_state(), sess.new_state()
    for s in (a, b):
        sess.forward_last(np.array([[1, 2]]), s)
    with pytest.raises(UserError, match="one sequence twice"):
        sess.forward_batch([1, 1], [a, a])
    with pytest.raises(UserError, match="another session"):
        sess.forward_batch([1, 1], [a, other.new_state()])
    with pytest.raises(UserError, match="2 tokens for 1 sequences"):
        sess.forward_batch([1, 1], [a])
    with pytest.raises(UserError, match="0 tokens for 0"):
        sess.forward_batch([], [])
    with pytest.raises(UserError, match="token id 80"):
        sess.forward_batch([1, 80], [a, b])
    full = native.NativeSession(sess.weights, threads=1, context_length=3)
    c = full.new_state()
    full.forward_last(np.array([[1, 2, 3]]), c)
    with pytest.raises(UserError, match="4 tokens of context"):
        full.forward_batch([1], [c])
    assert (a.length, b.length) == (2, 2)
    # a sensed head serves single greedy steps; a batched step runs the full head (its exact argmax)
    from cscompile.native.vocab import build_preview, preview_errors

    preview = build_preview(sess.weights.head)
    sess.sensed = native.SensedHead(preview, 4, 0.1, preview_errors(sess.weights.head, preview))
    assert sess.max_batch == 64
    ref = [native.NativeSession(sess.weights, threads=1, context_length=128) for _ in range(2)]
    ref_states = [r.new_state() for r in ref]
    for r, s in zip(ref, ref_states):
        r.forward_last(np.array([[1, 2]]), s)
    rows = sess.forward_batch([5, 6], [a, b])
    for r, s, t, row in zip(ref, ref_states, (5, 6), rows):
        np.testing.assert_array_equal(row, r.forward_last(np.array([[t]]), s))
    assert (a.head_steps, b.head_steps) == (0, 0)
    sess.sensed_sampling = True  # sampled steps read the sensed head's logits: no batched step
    assert sess.max_batch == 1
    with pytest.raises(UserError, match="1 to 1 sequences"):
        sess.forward_batch([1, 1], [a, b])


def test_switching_sessions_do_not_batch():
    from cscompile.motifs.runtime import ControllerConfig
    from cscompile.native.switch import NativeSwitchingSession

    w, _ = _tiny(seed=1)
    narrow = native.derive(w, [native.LayerPlan(ffn_blocks=(0,)), native.LayerPlan()], keep_kv=True)
    sw = NativeSwitchingSession([w, narrow], ["full", "narrow"], ControllerConfig([1.0]), 1, 32)
    assert sw.max_batch == 1
    st = sw.new_state()
    sw.forward_last(np.array([[1, 2]]), st)
    with pytest.raises(UserError, match="1 to 1 sequences"):
        sw.forward_batch([1, 2], [st, sw.new_state()])
    with pytest.raises(UserError, match="NativeSwitchState of another session"):
        sw.forward_batch([1], [st])


# -- the sensed head after a batched step (issue 24 "sensed head in serving") ---------------------
VCFG = {**CFG, "vocab": 500}  # enough rows for a top K to mean something (not a multiple of 16)


def _sensed_session(tau: float, k: int = 24, cap: float = 0.0, planes: bool = False) -> native.NativeSession:
    """A tiny model with a sensed head: a separate Q4_1 preview, or (``planes``) the head stored as
    bit planes whose high plane is the preview (what a build ships).
    """
    from cscompile.native import vocab

    w, _ = _tiny(3, c={**VCFG, "logit_softcap": cap} if cap else VCFG)
    if planes:
        w = native.head_as_planes(w)
    preview = None if planes else vocab.build_preview(w.head)
    err = vocab.preview_errors(w.head, preview)
    if tau < 0:  # calibrated on a few teacher-forced tokens, as the build does
        dec = native.NativeDecoder(w, threads=2, max_ctx=128)
        tau, _ = vocab.calibrate_tau(
            dec, preview, np.random.default_rng(0).integers(0, VCFG["vocab"], 48), err
        )
    return native.NativeSession(
        w, threads=2, context_length=128, sensed=native.SensedHead(preview, k, tau, err)
    )


@pytest.mark.parametrize(
    ("tau", "k", "cap", "planes"),
    [(-1.0, 24, 0.0, False), (1.0, 1, 0.0, False), (float("inf"), 24, 0.0, False), (1.0, 1, 2.0, False),
     (-1.0, 24, 0.0, True), (1.0, 1, 0.0, True)],
    ids=["calibrated", "mixed", "probe", "mixed-softcap", "planes-calibrated", "planes-mixed"],
)  # fmt: skip
def test_batched_sensed_rows_equal_solo_sensed_steps(build, tau, k, cap, planes):
    """Five sequences (three greedy through the sensed head, two sampled through the full head)
    stepped together 14 times: each greedy row's token and fallback are its solo sensed step's
    (``greedy_step``), a fallen-back row's logits the full head's bit for bit, and each sampled
    row's logits its solo step's bit for bit. One candidate and a wide margin mix passes and
    fallbacks in the batches; the probe (tau = inf) always falls back. With a logit soft-cap
    (Gemma 2), the sampled rows are capped as the full head's step caps them.
    """
    sess = _sensed_session(tau, k, cap, planes)
    V = VCFG["vocab"]
    rng = np.random.default_rng(11)
    prompts = [rng.integers(0, V, n) for n in (3, 14, 40, 9, 27)]
    greedy = [True, False, True, True, False]
    alone = [sess.new_state() for _ in prompts]
    together = [sess.new_state() for _ in prompts]
    toks = []
    for p, a, t in zip(prompts, alone, together):
        first = int(np.argmax(sess.forward_last(p[None], a)))
        sess.forward_last(p[None], t)
        toks.append(first)
    solo_toks = list(toks)
    fell_rows = 0
    for _ in range(14):
        logits, chosen = sess.forward_batch_sensed(toks, together, greedy)
        assert logits.shape == (5, V)
        for b, (st, g) in enumerate(zip(alone, greedy)):
            if g:
                before = st.head_fallbacks
                nxt = sess.greedy_step(solo_toks[b], st)
                assert chosen[b] == nxt
                if st.head_fallbacks > before:
                    fell_rows += 1
                    z = st.decoder._logits[:V]  # the solo sensed step's full head (not capped)
                    if cap:  # capped here as the full head's step caps (C tanhf against numpy's)
                        np.testing.assert_allclose(logits[b], cap * np.tanh(z / cap), rtol=0, atol=1e-6)
                    else:
                        np.testing.assert_array_equal(logits[b], z)
                else:
                    cand = st.decoder._cand[: sess.sensed.k]  # type: ignore[union-attr]
                    np.testing.assert_array_equal(logits[b, cand], st.decoder._logits[cand])
                solo_toks[b] = nxt
            else:
                ref = sess.forward_last(np.array([[solo_toks[b]]]), st)
                np.testing.assert_array_equal(logits[b], ref)  # tolerance 0
                solo_toks[b] = chosen[b] = int(np.argmax(ref))
        toks = list(chosen)
    for a, t, g in zip(alone, together, greedy):
        assert (t.head_steps, t.head_fallbacks) == (a.head_steps, a.head_fallbacks)
        assert t.head_steps == (14 if g else 0) and t.length == a.length
    if k == 1:
        assert 0 < fell_rows < 3 * 14  # both outcomes met in batched steps
    if tau == float("inf"):
        assert fell_rows == 3 * 14


def test_batched_sensed_refuses_what_it_cannot_step():
    sess = _sensed_session(0.1)
    a, b = sess.new_state(), sess.new_state()
    for s in (a, b):
        sess.forward_last(np.array([[1, 2]]), s)
    with pytest.raises(UserError, match="a flag per sequence"):
        sess.forward_batch_sensed([1, 2], [a, b], [True])
    assert sess.sensed is not None
    sess.sensed.k = VCFG["vocab"] + 1
    with pytest.raises(UserError, match="K = 501"):
        sess.forward_batch_sensed([1, 2], [a, b], [True, True])
    sess.sensed.k = 24
    with pytest.raises(UserError, match="one sequence twice"):
        sess.forward_batch_sensed([1, 1], [a, a], [True, True])
    plain = native.NativeSession(sess.weights, threads=1, context_length=128)
    with pytest.raises(UserError, match="sensed head"):
        plain.forward_batch_sensed([1], [plain.new_state()], [True])
    assert (a.length, b.length, a.head_steps) == (2, 2, 0)  # nothing ran
