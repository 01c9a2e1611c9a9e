"""A layered motif engine: ORT segments for attention, the channel-sparse kernel for FFNs.

One decode step runs ``seg0``, then for every layer the FFN kernel (``mid += FFN_S(x)``, the
support ``S`` chosen by the motif) and the next segment, then the head. All sessions share
one copy of every weight (``add_initializer`` with prepacking off); the FFN weights live once,
channel-major ``[I, 3, H]``, in the kernel's layout. Prefill (``S > 1`` tokens) runs the FFNs
dense through BLAS on the same packed array (dense prefill is the default of the method).

A :class:`Motif` fixes, per layer, how many channels run (``k``) and how they are chosen:
``None`` = dense; ``"sensed"`` = the in-kernel sketch (``y = Φx``, scores ``B y``, top-k) with
an optional hot core that always runs. Switching motifs between tokens costs nothing: they
differ only in kernel arguments, never in sessions or cache layout.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from cscompile.decode.session import KVState, SessionBase, make_session_options
from cscompile.motifs.kernel import predicted_support
from cscompile.motifs.segments import HIDDEN_IN, MID, Segment, SegmentPlan, X


@dataclass
class LayerPredictor:
    """The sensing operator and the least-squares decoder of one layer (float32)."""

    phi: np.ndarray  # [m, H]
    decoder: np.ndarray  # [I, m]
    bias: np.ndarray | None = None  # [I]
    hot: int = 0  # channels [0, hot) of the packed order always run


@dataclass
class Motif:
    """Per-layer FFN channel counts; ``None`` entries run dense. ``skip``: layers this motif skips
    whole (attention and FFN; only their K/V are computed, so the cache stays complete).
    """

    name: str
    k: list[int | None]
    predictors: list[LayerPredictor | None] | None = None
    skip: frozenset[int] = frozenset()

    def executed_fraction(self, intermediate: int) -> float:
        return float(np.mean([1.0 if k is None else k / intermediate for k in self.k]))


@dataclass
class StepStats:
    ort_s: float = 0.0
    ffn_s: float = 0.0
    residuals: list[float] = field(default_factory=list)
    executed: list[int] = field(default_factory=list)


class LayeredEngine(SessionBase):
    """Runs a :class:`SegmentPlan` (one engine per motif, all sharing sessions and weights)."""

    def __init__(
        self,
        plan: SegmentPlan,
        threads: int | None = None,
        order: Sequence[np.ndarray] | None = None,
        ort_threads: int | None = None,
        prepack: bool = True,
        ffn_format: str = "f32",
        records: Sequence[np.ndarray] | None = None,
    ):
        """``prepack``: let ORT repack the segment weights for its GEMM (measured: segments 18%
        faster on SmolLM2 fp32, at the price of a second copy of the attention and head weights).
        ``ffn_format``: the kernel's records, ``f32`` or ``q8``. ``records``: already packed
        records per layer (e.g. memory-mapped from a bundle) instead of packing ``plan.ffn``.
        """
        import onnxruntime as ort

        from cscompile.decode.session import resolve_threads
        from cscompile.motifs.kernel import SparseFFN, pack_channel_major, pack_q8

        self.plan = plan
        self.threads = resolve_threads(threads)
        self._ort_values = {
            n: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for n, a in plan.store.items()
        }
        self._prepack = prepack
        self._ort_threads = ort_threads
        self.sessions = [self._session(seg) for seg in plan.segments]
        #: K/V-only sessions for skipped layers (index = layer; None for layer 0), made on first use
        self._kv_sessions: list | None = None
        self._kv_io: list | None = None
        # optional channel order per layer (hot core first); the kernel sees permuted channels
        self.ffn_format = ffn_format
        self.ffn = []
        if records is not None:
            self.ffn = [SparseFFN(r, self.threads, ffn_format, plan.hidden_size) for r in records]
        for f, perm in zip(plan.ffn, list(order) if order is not None else [None] * len(plan.ffn)):
            g, u, d = (f.gate, f.up, f.down) if perm is None else (f.gate[perm], f.up[perm], f.down[:, perm])
            w = pack_channel_major(g, u, d)
            if ffn_format == "q8":
                self.ffn.append(SparseFFN(pack_q8(w), self.threads, "q8", plan.hidden_size))
            else:
                self.ffn.append(SparseFFN(w, self.threads))
        plan.ffn = []  # the packed records are the only copy the engine keeps
        self.intermediate = self.ffn[0].intermediate
        self.hidden = plan.hidden_size
        #: called as ``recorder(layer, x [T, H], a [T, I])`` in dense prefill (calibration)
        self.recorder: Callable[[int, np.ndarray, np.ndarray], None] | None = None
        #: evaluation mode: prefill masks each position's FFN as a decode step would run it
        self.sparse_prefill = False
        self._lock = threading.RLock()
        self._observe: Callable[[int, np.ndarray], None] | None = None
        #: decode steps through reused IOBindings and fixed buffers (False: the general path)
        self.fast_decode = True
        self._io: list | None = None
        self._bufs: list[np.ndarray] = []
        self._kv_dtype = np.float32
        self._seg_inputs = [set(s.inputs) for s in plan.segments]

    @property
    def num_layers(self) -> int:
        return len(self.ffn)

    def _session(self, seg: Segment):  # noqa: ANN202 - an onnxruntime.InferenceSession
        """An ORT session for ``seg``, its weights supplied from the shared store (no copy)."""
        import onnxruntime as ort

        so = make_session_options(self._ort_threads or self.threads, spinning=False)
        if not self._prepack:
            so.add_session_config_entry("session.disable_prepacking", "1")
        if seg.weights:
            so.add_external_initializers(seg.weights, [self._ort_values[w] for w in seg.weights])
        return ort.InferenceSession(seg.model, sess_options=so, providers=["CPUExecutionProvider"])

    def _kv_session(self, li: int):  # noqa: ANN202 - an onnxruntime.InferenceSession
        """The K/V-only session of layer ``li`` (created on first use; weights from the shared store)."""
        if self._kv_sessions is None:
            if len(self.plan.kv_segments) != self.num_layers:
                raise ValueError("this engine's plan has no K/V-only segments (layer skip needs them)")
            self._kv_sessions = [None] * self.num_layers
            self._kv_io = [None] * self.num_layers
        if self._kv_sessions[li] is None:
            seg = self.plan.kv_segments[li]
            if seg is None:
                raise ValueError(f"layer {li} cannot be skipped (the first layer always runs)")
            self._kv_sessions[li] = self._session(seg)
            self._kv_io[li] = self._kv_sessions[li].io_binding()  # type: ignore[index]
        return self._kv_sessions[li]

    def new_state(self, batch: int = 1) -> KVState:
        import onnxruntime as ort

        sess = self.sessions[0]
        kv = next(i for i in sess.get_inputs() if i.name == self.plan.past[0][0])
        heads, head_dim = kv.shape[1], kv.shape[3]
        empty = np.zeros((batch, heads, 0, head_dim), self._kv_dtype)
        past = [ort.OrtValue.ortvalue_from_numpy(empty) for _ in range(2 * self.num_layers)]
        return KVState(batch=batch, past=past, length=0, attention=np.zeros((batch, 0), np.int64))

    def forward(
        self,
        input_ids: np.ndarray,
        state: KVState,
        motif: Motif | None = None,
        stats: StepStats | None = None,
        observe: Callable[[int, np.ndarray], None] | None = None,
    ) -> np.ndarray:
        """Logits ``[1, S, V]`` for ``input_ids [1, S]`` after ``state`` (advanced in place).

        ``observe(layer, x [S, H])`` sees each layer's FFN input during a prefill (S > 1).
        """
        if motif is not None and motif.skip and not all(0 < li < self.num_layers for li in motif.skip):
            raise ValueError(
                f"motif {motif.name} skips layers {sorted(motif.skip)}; layers 1..{self.num_layers - 1} can be skipped"
            )
        with self._lock:  # kernel buffers are shared: one step at a time
            if input_ids.shape == (1, 1) and self.fast_decode:
                return self._decode(input_ids, state, motif, stats)
            self._observe = observe
            try:
                return self._forward(input_ids, state, motif, stats)
            finally:
                self._observe = None

    def _decode(
        self, input_ids: np.ndarray, state: KVState, motif: Motif | None, stats: StepStats | None
    ) -> np.ndarray:
        """One decode token through reused IOBindings: FFN inputs and residuals live in fixed
        buffers that ORT writes and the kernel updates in place (no OrtValue or copy per layer).
        A skipped layer runs its K/V-only segment on the current residual, which passes through.
        """
        import onnxruntime as ort

        if self._io is None:
            self._io = [sess.io_binding() for sess in self.sessions]
            self._bufs = [np.zeros((1, 1, self.hidden), np.float32) for _ in range(3)]
        skip = motif.skip if motif is not None else frozenset()
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        mask = np.concatenate([state.attention, np.ones((1, 1), np.int64)], axis=1)
        pos = np.array([[state.length]], np.int64)
        common = {
            "input_ids": ort.OrtValue.ortvalue_from_numpy(ids),
            "attention_mask": ort.OrtValue.ortvalue_from_numpy(mask),
            "position_ids": ort.OrtValue.ortvalue_from_numpy(pos),
        }
        shape = [1, 1, self.hidden]
        mids, x = self._bufs[:2], self._bufs[2]
        cur = 0  # the buffer holding the residual stream (after layer 0)
        new_past: list = []
        clock = time.perf_counter
        for li, (seg, sess, io) in enumerate(zip(self.plan.segments, self.sessions, self._io)):
            if 0 < li < self.num_layers and li in skip:
                kv_sess = self._kv_session(li)
                kv_io = self._kv_io[li]  # type: ignore[index]
                kv_seg = self.plan.kv_segments[li]
                assert kv_seg is not None
                t0 = clock()
                for name in kv_seg.inputs:
                    if name in common:
                        kv_io.bind_ortvalue_input(name, common[name])
                kv_io.bind_input(HIDDEN_IN, "cpu", 0, np.float32, shape, mids[cur].ctypes.data)
                pk, pv = self.plan.past[li]
                kv_io.bind_ortvalue_input(pk, state.past[2 * li])
                kv_io.bind_ortvalue_input(pv, state.past[2 * li + 1])
                for name in kv_seg.outputs:
                    kv_io.bind_output(name, "cpu")
                kv_sess.run_with_iobinding(kv_io)
                new_past.extend(kv_io.get_outputs())
                if stats is not None:
                    stats.ort_s += clock() - t0
                    stats.executed.append(0)
                continue
            for name in self._seg_inputs[li]:
                if name in common:
                    io.bind_ortvalue_input(name, common[name])
            if li > 0:
                io.bind_input(HIDDEN_IN, "cpu", 0, np.float32, shape, mids[cur].ctypes.data)
            t0 = clock()
            if li == self.num_layers:
                io.bind_output(seg.outputs[0], "cpu")
                sess.run_with_iobinding(io)
                if stats is not None:
                    stats.ort_s += clock() - t0
                state.past = new_past
                state.length += 1
                state.attention = mask
                return np.asarray(io.get_outputs()[0].numpy())
            pk, pv = self.plan.past[li]
            io.bind_ortvalue_input(pk, state.past[2 * li])
            io.bind_ortvalue_input(pv, state.past[2 * li + 1])
            dst = 0 if li == 0 else 1 - cur
            mid = mids[dst]
            for name in seg.outputs:
                if name == MID:
                    io.bind_output(MID, "cpu", 0, np.float32, shape, mid.ctypes.data)
                elif name == X:
                    io.bind_output(X, "cpu", 0, np.float32, shape, x.ctypes.data)
                else:
                    io.bind_output(name, "cpu")
            sess.run_with_iobinding(io)
            t1 = clock()
            outs = dict(zip(seg.outputs, io.get_outputs()))
            if li == 0:
                for name in self.plan.shared:
                    common[name] = outs[name]
            new_past.extend([outs[self.plan.present[li][0]], outs[self.plan.present[li][1]]])
            self._ffn(li, mid, x, motif, stats)
            cur = dst
            if stats is not None:
                stats.ort_s += t1 - t0
                stats.ffn_s += clock() - t1
        raise AssertionError("unreachable: the head segment returns")

    def _forward(
        self, input_ids: np.ndarray, state: KVState, motif: Motif | None, stats: StepStats | None
    ) -> np.ndarray:
        import onnxruntime as ort

        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        b, s = ids.shape
        if b != 1:
            raise ValueError("the layered engine runs one sequence at a time")
        skip = motif.skip if motif is not None else frozenset()
        mask = np.concatenate([state.attention, np.ones((1, s), np.int64)], axis=1)
        pos = np.arange(state.length, state.length + s, dtype=np.int64)[None]
        common = {
            "input_ids": ort.OrtValue.ortvalue_from_numpy(ids),
            "attention_mask": ort.OrtValue.ortvalue_from_numpy(mask),
            "position_ids": ort.OrtValue.ortvalue_from_numpy(pos),
        }
        shared_names = self.plan.shared
        new_past: list = []
        hidden = None
        clock = time.perf_counter
        for li, (seg, sess) in enumerate(zip(self.plan.segments, self.sessions)):
            skipped = 0 < li < self.num_layers and li in skip
            if skipped:
                sess = self._kv_session(li)
                seg = self.plan.kv_segments[li]  # type: ignore[assignment]
                wanted = set(seg.inputs)
            else:
                wanted = self._seg_inputs[li]
            feeds = {name: common[name] for name in wanted if name in common}
            if li < self.num_layers:
                pk, pv = self.plan.past[li]
                feeds[pk] = state.past[2 * li]
                feeds[pv] = state.past[2 * li + 1]
            if hidden is not None:
                feeds[HIDDEN_IN] = ort.OrtValue.ortvalue_from_numpy(hidden)
            t0 = clock()
            outs = sess.run_with_ort_values(seg.outputs, feeds)
            t1 = clock()
            if stats is not None:
                stats.ort_s += t1 - t0
            if li == self.num_layers:
                return np.asarray(outs[0].numpy())
            by = dict(zip(seg.outputs, outs))
            if li == 0:
                for name in shared_names:
                    common[name] = by[name]
            new_past.extend([by[self.plan.present[li][0]], by[self.plan.present[li][1]]])
            if not skipped:  # a skipped layer leaves the residual as it is
                mid = np.ascontiguousarray(by[MID].numpy(), dtype=np.float32)
                x = np.ascontiguousarray(by[X].numpy(), dtype=np.float32)
                self._ffn(li, mid, x, motif, stats)
                if stats is not None:
                    stats.ffn_s += clock() - t1
                hidden = mid
            if li == self.num_layers - 1:
                state.past = new_past
                state.length += s
                state.attention = mask
        raise AssertionError("unreachable: the head segment returns")

    def _ffn(
        self, li: int, mid: np.ndarray, x: np.ndarray, motif: Motif | None, stats: StepStats | None
    ) -> None:
        f = self.ffn[li]
        s = x.shape[1]
        k = None if motif is None else motif.k[li]
        pred = motif.predictors[li] if motif is not None and motif.predictors is not None else None
        if k is not None and k < self.intermediate and pred is None:
            raise ValueError(f"motif {motif.name if motif else ''}: layer {li} has k={k} but no predictor")
        if s > 1:  # prefill: dense through BLAS on strided views of the packed array
            x2 = x.reshape(s, -1)
            w = f.dense_weights()
            g = x2 @ w[:, 0, :].T
            a = g / (1.0 + np.exp(-g)) * (x2 @ w[:, 1, :].T)
            if self.recorder is not None:
                self.recorder(li, x2, a)
            if self._observe is not None:
                self._observe(li, x2)
            if self.sparse_prefill and pred is not None and k is not None and k < self.intermediate:
                # evaluation mode: each position runs exactly what a decode step would
                a = a * predicted_support(x2, pred.phi, pred.decoder, pred.bias, k, pred.hot)
            mid.reshape(s, -1)[:] += a @ w[:, 2, :]
            return
        xv, rv = x.reshape(-1), mid.reshape(-1)
        if pred is None or k is None or k >= self.intermediate:
            f.add_to(rv, xv)
            if stats is not None:
                stats.executed.append(self.intermediate)
            return
        idx, residual = f.sensed_add_to(rv, xv, pred.phi, pred.decoder, pred.bias, k, pred.hot)
        if stats is not None:
            stats.residuals.append(residual)
            stats.executed.append(len(idx))


def fit_predictors(
    engine: LayeredEngine,
    calib_ids: np.ndarray,
    m: int,
    seed: int = 0,
    ridge: float = 1e-3,
    window: int = 512,
) -> list[LayerPredictor]:
    """Per layer, a Gaussian sketch ``Φ [m, H]`` and a ridge decoder from ``Φx`` to channel
    activity ``|a_i|·‖down_i‖``, fitted on the FFN inputs of ``calib_ids`` (dense prefill).
    """
    from cscompile.recovery.operators import MeasurementOperator
    from cscompile.recovery.solvers import SketchDecoder

    phi = MeasurementOperator("gaussian", m, engine.hidden, seed).matrix.astype(np.float32)
    norms = [np.linalg.norm(f.dense_weights()[:, 2, :], axis=1) for f in engine.ffn]
    ys: list[list[np.ndarray]] = [[] for _ in engine.ffn]
    ss: list[list[np.ndarray]] = [[] for _ in engine.ffn]

    def record(li: int, x: np.ndarray, a: np.ndarray) -> None:
        ys[li].append(x @ phi.T)
        ss[li].append(np.abs(a) * norms[li])

    engine.recorder = record
    try:
        for start in range(0, len(calib_ids) - 1, window):
            engine.forward(np.asarray(calib_ids)[None, start : start + window], engine.new_state())
    finally:
        engine.recorder = None
    out = []
    for y, sc in zip(ys, ss):
        d = SketchDecoder(ridge).fit(np.concatenate(y), np.concatenate(sc))
        assert d.weight is not None and d.bias is not None
        out.append(
            LayerPredictor(
                phi=phi,
                decoder=np.ascontiguousarray(d.weight.T, dtype=np.float32),
                bias=np.ascontiguousarray(d.bias, dtype=np.float32),
            )
        )
    return out
