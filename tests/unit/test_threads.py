"""The native step on shared cores (issue 25): the thread governor's rules with injected timings,
its wiring into the decoder and session, and the OpenMP wait policy set around the kernel's load.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from cscompile import clib
from cscompile.errors import UserError
from cscompile.native import engine as native
from tests.unit.test_native import CFG, _reference_logits, _tiny


def _run(gov: native.ThreadGovernor, ms_at: dict[int, float], steps: int) -> list[int]:
    """``steps`` steps whose time depends only on the thread count chosen: the counts chosen."""
    chosen = []
    for _ in range(steps):
        t = gov.choose()
        chosen.append(t)
        gov.record(t, ms_at[t])
    return chosen


def test_idle_cores_keep_every_thread_and_probe_one_thread_ever_more_rarely():
    gov = native.ThreadGovernor(2, probe_every=16, max_interval=1024)
    chosen = _run(gov, {2: 1.0, 1: 1.8}, 4000)
    probes = [i for i, t in enumerate(chosen) if t == 1]
    assert gov.current == 2 and gov.switches == 0
    # the first probe after max_interval/4 steps, then 512, 1024, 1024, ... later
    assert probes == [255, 767, 1791, 2815, 3839]


def test_a_collapse_drops_to_one_thread_after_patience_steps_only():
    gov = native.ThreadGovernor(2, slow=2.0, patience=2)
    _run(gov, {2: 1.0, 1: 1.8}, 20)
    gov.record(2, 50.0)  # one slow step: noise
    assert gov.current == 2
    gov.record(2, 1.0)
    gov.record(2, 50.0)
    gov.record(2, 50.0)
    assert gov.current == 1 and gov.switches == 1
    assert gov.choose() == 1


def test_a_slowdown_still_faster_than_one_thread_keeps_every_thread():
    gov = native.ThreadGovernor(2, probe_every=16, max_interval=1024)
    _run(gov, {2: 1.0, 1: 4.0}, 300)  # one probe of 1 thread: 4 ms
    assert gov.current == 2
    _run(gov, {2: 3.0, 1: 4.0}, 50)  # 3x slower than its best, still faster than 1 thread
    assert gov.current == 2 and gov.switches == 0
    _run(gov, {2: 10.0, 1: 4.0}, 2)  # a jump past 2x the recent best and past 1 thread
    assert gov.current == 1


def test_one_thread_probes_back_with_backoff_and_returns_when_cores_free_up():
    gov = native.ThreadGovernor(2, probe_every=16, max_interval=1024)
    _run(gov, {2: 1.0, 1: 1.8}, 20)
    gov.record(2, 100.0)
    gov.record(2, 100.0)
    assert gov.current == 1
    # the cores stay shared: two threads keep losing; probes at 16, 32, 32, ... steps apart
    chosen = _run(gov, {2: 100.0, 1: 2.0}, 16 + 32 + 32 + 32)
    assert [i for i, t in enumerate(chosen) if t == 2] == [15, 47, 79, 111]
    assert gov.current == 1
    # the cores free up: the next probe (at most max_back = 32 steps away) wins and every step
    # after it has both threads
    chosen = _run(gov, {2: 1.0, 1: 2.0}, 300)
    first = chosen.index(2)
    assert first == 31 and set(chosen[first : first + 200]) == {2} and gov.current == 2


def test_a_probe_must_win_by_the_margin():
    gov = native.ThreadGovernor(2, gain=0.1, probe_every=4)
    _run(gov, {2: 1.0, 1: 1.0}, 5)
    gov.record(2, 10.0)
    gov.record(2, 10.0)
    assert gov.current == 1
    _run(gov, {2: 0.95, 1: 1.0}, 3)  # within 10%: not worth switching
    gov.record(gov.choose(), 0.95)
    assert gov.current == 1
    gov.record(2, 0.85)
    assert gov.current == 2


def test_one_thread_is_never_governed():
    gov = native.ThreadGovernor(1)
    assert set(_run(gov, {1: 5.0}, 600)) == {1} and gov.switches == 0


class _Scripted(native.ThreadGovernor):
    """Thread counts from a script; the timings it was given are kept."""

    def __init__(self, script: list[int]) -> None:
        super().__init__(2)
        self.script, self.seen = list(script), []  # type: ignore[var-annotated]

    def choose(self) -> int:
        return self.script.pop(0)

    def record(self, threads: int, ms: float) -> None:
        self.seen.append(threads)


def test_the_decoder_runs_each_step_at_the_governors_count_with_the_same_numbers():
    w, dense = _tiny(seed=7)
    ids = np.random.default_rng(3).integers(0, CFG["vocab"], 12)
    ref = _reference_logits(dense, ids)
    script = [1, 2, 1, 1, 2, 2, 1]
    gov = _Scripted(script)
    gov.current = 2
    dec = native.NativeDecoder(w, threads=2, max_ctx=32, governor=gov)
    rows = [dec.prefill(ids[:5])]  # a prompt chunk: the current count, not timed
    for t in ids[5:11]:
        rows.append(dec.step(int(t)).copy())
    assert gov.seen == script[:6] and gov.script == [1]
    np.testing.assert_allclose(np.stack(rows), ref[4:11], rtol=0, atol=2e-3 * np.abs(ref).max())


def test_sessions_adapt_by_default_and_the_switch_is_checked(monkeypatch):
    w, _ = _tiny(seed=1)
    monkeypatch.delenv("CSCOMPILE_ADAPTIVE_THREADS", raising=False)
    s = native.NativeSession(w, threads=2, context_length=32)
    assert isinstance(s.governor, native.ThreadGovernor)
    assert s.new_state().decoder.governor is s.governor  # one governor for every sequence
    assert native.NativeSession(w, threads=1, context_length=32).governor is None
    assert native.NativeSession(w, threads=2, context_length=32, adaptive=False).governor is None
    monkeypatch.setenv("CSCOMPILE_ADAPTIVE_THREADS", "0")
    assert native.NativeSession(w, threads=2, context_length=32).governor is None
    monkeypatch.setenv("CSCOMPILE_ADAPTIVE_THREADS", "yes")
    with pytest.raises(UserError, match="CSCOMPILE_ADAPTIVE_THREADS"):
        native.NativeSession(w, threads=2, context_length=32)


def test_the_wait_policy_is_set_for_the_load_only_and_never_over_the_users(monkeypatch):
    for v in clib.OMP_WAIT_VARS:
        monkeypatch.delenv(v, raising=False)
    with clib.openmp_wait_policy(123) as applied:
        assert applied and os.environ["GOMP_SPINCOUNT"] == "123"
    assert "GOMP_SPINCOUNT" not in os.environ
    for var, value in (("OMP_WAIT_POLICY", "active"), ("GOMP_SPINCOUNT", "5")):
        monkeypatch.setenv(var, value)
        with clib.openmp_wait_policy(123) as applied:
            assert not applied and os.environ[var] == value
        assert os.environ[var] == value
        monkeypatch.delenv(var)


def test_batched_steps_have_a_governor_per_batch_size_and_the_same_numbers():
    """Batch steps (the server's path) are governed per batch size; a row at either thread count
    equals the sequence's own step at the session's count, bit for bit.
    """
    w, _ = _tiny(seed=2)
    sess = native.NativeSession(w, threads=2, context_length=64, adaptive=True)
    fixed = native.NativeSession(w, threads=2, context_length=64, adaptive=False)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, CFG["vocab"], n) for n in (5, 11)]
    together = [sess.new_state() for _ in prompts]
    alone = [fixed.new_state() for _ in prompts]
    toks = [int(np.argmax(sess.forward_last(p[None], s))) for p, s in zip(prompts, together)]
    for p, s in zip(prompts, alone):
        fixed.forward_last(p[None], s)
    script = [1, 2, 2, 1, 1, 2]
    sess.batch_governors[2] = gov = _Scripted(script)
    for _ in script:
        rows = sess.forward_batch(toks, together)
        for t, s, row in zip(toks, alone, rows):
            np.testing.assert_array_equal(row, fixed.forward_last(np.array([[t]]), s))
        toks = [int(np.argmax(r)) for r in rows]
    assert gov.seen == script and gov.script == []
    fixed.forward_batch(toks, alone)
    assert fixed.batch_governors == {}  # a fixed session has none
