"""ONNX Runtime session for a KV-cache decoder, with the cache kept in OrtValues.

The cache never round-trips through numpy: each step binds the previous step's ``present``
OrtValues as this step's ``past`` inputs through IOBinding and lets ORT allocate the new
ones. Only the logits come back to numpy.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from cscompile.decode.spec import DecoderSpec
from cscompile.errors import UserError
from cscompile.limits import check_threads, max_threads

_NP_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(bfloat16)": np.float32}


def default_threads() -> int:
    """Intra-op threads: ``$CSCOMPILE_THREADS`` or the number of cores (bounded: cscompile.limits)."""
    env = os.environ.get("CSCOMPILE_THREADS")
    if env:
        try:
            value = int(env)
        except ValueError:
            raise UserError("CSCOMPILE_THREADS", f"'{env}'", "a positive integer") from None
        return check_threads(value, "CSCOMPILE_THREADS")
    return min(os.cpu_count() or 1, max_threads())


def resolve_threads(threads: int | None, what: str = "threads") -> int:
    """``threads`` checked (cscompile.limits.check_threads), or the default when None."""
    return default_threads() if threads is None else check_threads(threads, what)


def make_session_options(threads: int | None = None, spinning: bool = True) -> Any:
    """ORT options. ``spinning=False`` when several sessions take turns in one process: an idle
    session's spinning workers would otherwise steal the cores from the one running.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.intra_op_num_threads = resolve_threads(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return so


def open_onnx_session(
    path: Path, threads: int | None = None, providers: list[str] | None = None, spinning: bool = True
) -> Any:
    """An ``InferenceSession`` with our defaults, or a one-line :class:`UserError`."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise UserError("ONNX model", f"no file at {path}", "a path to an existing .onnx file")
    try:
        return ort.InferenceSession(
            str(path),
            sess_options=make_session_options(threads, spinning),
            providers=providers or ["CPUExecutionProvider"],
        )
    except Exception as exc:  # ORT raises several unrelated types for a bad file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"ONNX model {path}",
            f"could not be loaded by ONNX Runtime ({first[:200]})",
            "a valid ONNX decoder file (re-export it, or run `cscompile model fetch` again)",
        ) from None


@dataclass
class KVState:
    """The cache of one sequence batch: OrtValues per layer, and how many positions they hold."""

    batch: int
    past: list[Any]  # OrtValue per (layer, key|value), flattened in spec order
    length: int = 0
    attention: np.ndarray = field(default_factory=lambda: np.zeros((1, 0), np.int64))
    #: fused graphs: positions the preallocated buffers hold (``past`` wraps ``buffers``, which
    #: GroupQueryAttention updates in place); 0 = ORT allocates a grown ``present`` every step
    capacity: int = 0
    buffers: list[np.ndarray] = field(default_factory=list)


@runtime_checkable
class Session(Protocol):
    """What every engine's session implements: dense ONNX Runtime, native, motif, TensorRT and the
    switching runtimes. The decode loop (:class:`~cscompile.decode.generate.TextModel`) sees only this.
    """

    def new_state(self, batch: int = 1) -> Any:
        """An empty KV cache for ``batch`` sequences."""
        ...

    def forward(self, input_ids: np.ndarray, state: Any) -> np.ndarray:
        """``input_ids [B, S]`` after ``state`` → logits ``[B, S, V]``; advances ``state``."""
        ...

    def forward_last(self, input_ids: np.ndarray, state: Any) -> np.ndarray:
        """``input_ids [1, S]`` → the last position's logits ``[V]`` (engines may skip the others' head)."""
        ...

    def close(self) -> None:
        """Release what the session holds beyond memory (idempotent)."""
        ...


class SessionBase:
    """Defaults of the :class:`Session` protocol: ``forward_last`` from ``forward``, a no-op ``close``."""

    def forward_last(self, input_ids: np.ndarray, state: Any) -> np.ndarray:
        return self.forward(input_ids, state)[0, -1]  # type: ignore[attr-defined,no-any-return]  # [1, S, V] -> [V]

    def close(self) -> None:
        return None


class DecoderSession(SessionBase):
    """A loaded decoder: ``forward(ids, state)`` runs one prefill or decode step."""

    def __init__(
        self,
        path: Path | str,
        threads: int | None = None,
        providers: list[str] | None = None,
        spinning: bool = True,
    ) -> None:
        self.path = Path(path)
        self.session = open_onnx_session(self.path, threads, providers, spinning)
        self.spec = DecoderSpec.from_ort(self.session, source=f"ONNX model {self.path.name}")
        self._kv_np = _NP_DTYPES.get(self.spec.kv_dtype, np.float32)
        meta = self.session.get_modelmeta().custom_metadata_map
        #: GQA-fused graphs derive positions from sequence lengths: no padding inside a batch
        self.fused_attention = meta.get("cscompile.attention") == "gqa"
        logits_shape = next((o.shape for o in self.session.get_outputs() if o.name == self.spec.logits), None)
        last = logits_shape[-1] if logits_shape else None
        #: ids the graph's embedding takes: [0, vocab_size) (None: the graph does not say)
        self.vocab_size: int | None = last if isinstance(last, int) and last > 0 else None
        self._past_names = [n for pair in self.spec.past_inputs for n in pair]
        self._present_names = [n for pair in self.spec.present_outputs for n in pair]
        #: fused graphs: positions the shared KV buffers start with (doubling when full)
        self.kv_reserve = 256

    def new_state(self, batch: int = 1) -> KVState:
        import onnxruntime as ort

        empty = np.zeros((batch, self.spec.num_kv_heads, 0, self.spec.head_dim), self._kv_np)
        past = [ort.OrtValue.ortvalue_from_numpy(empty) for _ in self._past_names]
        return KVState(batch=batch, past=past, length=0, attention=np.zeros((batch, 0), np.int64))

    def _reserve(self, state: KVState, needed: int) -> None:
        """Grow ``state``'s shared KV buffers (fused graphs) to hold ``needed`` positions.

        The capacity doubles (from :attr:`kv_reserve`), so a long generation reallocates a
        handful of times and each step writes one position instead of copying the whole cache
        (as a plain ``present`` output would). Measured on SmolLM2 int4: 8.02 → 6.52 ms/token
        over positions 64–364, bitwise the same logits.
        """
        import onnxruntime as ort

        if needed <= state.capacity:
            return
        cap = max(self.kv_reserve, state.capacity)
        while cap < needed:
            cap *= 2
        shape = (state.batch, self.spec.num_kv_heads, cap, self.spec.head_dim)
        bufs = []
        for i in range(len(self._past_names)):
            buf = np.zeros(shape, self._kv_np)
            if state.buffers:
                buf[:, :, : state.length] = state.buffers[i][:, :, : state.length]
            bufs.append(buf)
        state.buffers = bufs  # the OrtValues below borrow this memory: keep it alive here
        state.past = [ort.OrtValue.ortvalue_from_numpy(b) for b in bufs]
        state.capacity = cap

    def forward(
        self,
        input_ids: np.ndarray,
        state: KVState,
        attention_mask: np.ndarray | None = None,
        positions: np.ndarray | None = None,
    ) -> np.ndarray:
        """Run ``input_ids [B, S]`` after ``state``; returns logits ``[B, S, V]`` and advances ``state``.

        ``attention_mask`` (``[B, S]``, 1 = real token) supports left padding; positions are
        ``cumsum(mask) - 1`` over the whole sequence, as in transformers, unless ``positions``
        gives them (see :meth:`run`).
        """
        return self.run(input_ids, state, attention_mask, positions=positions)[0]

    def run(
        self,
        input_ids: np.ndarray,
        state: KVState,
        attention_mask: np.ndarray | None = None,
        extra_outputs: Sequence[str] = (),
        positions: np.ndarray | None = None,
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """:meth:`forward`, also fetching ``extra_outputs`` (e.g. instrumentation) as numpy arrays.

        ``positions`` (``[B, S]``) overrides the RoPE positions (e.g. a compressed prompt at its
        tokens' original positions); only graphs with a ``position_ids`` input take them.
        """
        import onnxruntime as ort

        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        b, s = ids.shape
        if self.vocab_size is not None and ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = ids[(ids < 0) | (ids >= self.vocab_size)][0]  # ORT's Gather would read zeros or wrap
            raise UserError("input_ids", f"token id {int(bad)}", f"ids in [0, {self.vocab_size})")
        if b != state.batch:
            raise UserError("input_ids", f"batch {b}", f"the batch of the KV state ({state.batch})")
        new_mask = np.ones((b, s), np.int64) if attention_mask is None else attention_mask.astype(np.int64)
        if self.fused_attention and not new_mask.all():
            raise UserError(
                "attention_mask",
                "has padding, but this graph's attention is fused (GroupQueryAttention)",
                "unpadded sequences (run padded batches on an unfused graph)",
            )
        mask = np.concatenate([state.attention, new_mask], axis=1)  # [B, T]
        pos = (np.cumsum(mask, axis=1) - 1)[:, -s:]
        pos = np.where(new_mask > 0, pos, 1).astype(np.int64)  # [B, S]
        if positions is not None:
            if not self.spec.position_ids or self.fused_attention:
                raise UserError(
                    "positions",
                    "given for a graph that derives them itself",
                    "a graph with a position_ids input",
                )
            pos = np.asarray(positions, np.int64).reshape(b, s)
        io = self.session.io_binding()
        io.bind_ortvalue_input(self.spec.input_ids, ort.OrtValue.ortvalue_from_numpy(ids))
        if self.spec.attention_mask:
            io.bind_ortvalue_input(self.spec.attention_mask, ort.OrtValue.ortvalue_from_numpy(mask))
        if self.spec.position_ids:
            io.bind_ortvalue_input(
                self.spec.position_ids, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(pos))
            )
        for name in self.spec.other_inputs:  # cache_position for some exporters
            cp = np.arange(state.length, state.length + s, dtype=np.int64)
            io.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(cp))
        shared = self.fused_attention
        if shared:
            self._reserve(state, state.length + s)
        for name, value in zip(self._past_names, state.past):
            io.bind_ortvalue_input(name, value)
        io.bind_output(self.spec.logits, "cpu")
        if shared:  # present = past: GroupQueryAttention appends in place, nothing is copied
            for name, value in zip(self._present_names, state.past):
                io.bind_ortvalue_output(name, value)
            names = [self.spec.logits, *extra_outputs]
        else:
            names = [self.spec.logits, *self._present_names, *extra_outputs]
        for name in names[1:]:
            io.bind_output(name, "cpu")
        self.session.run_with_iobinding(io)
        outs = io.get_outputs()
        if shared:  # bound outputs come back in binding order: logits, the presents, then extras
            outs = [outs[0], *outs[1 + len(self._present_names) :]]
        by_name = dict(zip(names, outs))
        if not shared:
            state.past = [by_name[n] for n in self._present_names]
        state.length += s
        state.attention = mask
        extra = {n: np.asarray(by_name[n].numpy()) for n in extra_outputs}
        return np.asarray(by_name[self.spec.logits].numpy()), extra


def decode_step_seconds(sess: Any, prompt: int = 32, steps: int = 16) -> list[float]:
    """Seconds of each of ``steps`` decode steps of a session, teacher-forced on fixed ids after a prompt."""
    st = sess.new_state()
    ids = (np.arange(prompt + steps, dtype=np.int64) * 37 % 97 + 3)[None]  # valid in any vocabulary
    sess.forward(ids[:, :prompt], st)
    times = []
    for t in range(prompt, prompt + steps):
        a = time.perf_counter()
        sess.forward(ids[:, t : t + 1], st)
        times.append(time.perf_counter() - a)
    return times


def measure_decode_ms(engine: Path, threads: int | None = None, prompt: int = 32, steps: int = 16) -> float:
    """Median decode ms/token of an ONNX decoder here (teacher-forced on fixed ids after a prompt)."""
    return float(np.median(decode_step_seconds(DecoderSession(engine, threads=threads), prompt, steps))) * 1e3
