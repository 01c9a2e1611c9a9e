"""The correctness gate for engines that drop units on purpose: the motif engines.

A motif engine runs, per decode step and layer, only the FFN channels its predictor picks, so
its error against the source *is* its purpose; what the gate checks is that it computes the
source model with exactly those channels removed. The reference is the source ONNX with every
layer's FFN activation (the down projection's input, ``UnitMap`` ``mlp_act``) multiplied by a
0/1 mask fed per step (:func:`masked_source`), run through ONNX Runtime on the gate's
calibration sequences:

1. each motif runs as a whole-sequence engine (prefill dense, as the runtime runs it, then the
   gate's teacher-forced decode steps with that motif every
   step; the switching runtime only picks among engines that are each gated);
2. the channels the engine's kernel executed at each step and layer are recorded, and must
   number the motif's ``k`` (a kernel that runs other counts than the motif says fails);
3. the reference runs the same steps with exactly those channels kept; :mod:`cscompile.compiler.gate`
   holds the engine (fp32 records) to ``FP32_REL`` against it (q8 records: the quantized bounds,
   and no worse than ``NATIVE_RATIO ×`` the dense engine's mean KL).

Only *which* channels the predictor picks is not judged here: that is the motif's quality
(measured as its calibration perplexity), not its correctness.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

#: graph input of layer ``l``'s FFN mask in the reference: ``[batch, seq, intermediate]`` float
MASK_INPUT = "cscompile_gate_ffn_mask_{}"
#: graph input of layer ``l``'s attention mask (on the O projection's input): ``[1]`` float
ATTN_INPUT = "cscompile_gate_attn_mask_{}"


def masked_source(source: Path, acts: Sequence[str], contexts: Sequence[str], out: Path) -> Path:
    """``source`` with each ``acts[l]`` (layer ``l``'s FFN activation) multiplied by the input
    ``MASK_INPUT.format(l)`` and each ``contexts[l]`` (its attention's O-projection input) by
    ``ATTN_INPUT.format(l)``; written to ``out`` (weights as external data beside it), once per
    build (both gates read it).

    Zero masks on both make a layer a residual passthrough (a depth-dropped layer: its K/V are
    still computed, and read by nothing). Raises ``KeyError`` naming a value the source lacks.
    """
    import onnx_ir as ir

    if out.is_file():
        return out
    model = ir.load(str(source))
    graph = model.graph
    by_name = {v.name: v for node in graph for v in node.outputs if v.name}
    gates = [(MASK_INPUT.format(li), name, True) for li, name in enumerate(acts)]
    gates += [(ATTN_INPUT.format(li), name, False) for li, name in enumerate(contexts)]
    for input_name, name, per_channel in gates:
        act = by_name.get(name)
        if act is None:
            raise KeyError(name)
        width = act.shape[-1] if act.shape is not None and len(act.shape) else None
        shape = (
            ["batch", "sequence", width if isinstance(width, int) else "intermediate"] if per_channel else [1]
        )
        mask = ir.Value(
            name=input_name, type=ir.TensorType(act.dtype or ir.DataType.FLOAT), shape=ir.Shape(shape)
        )
        graph.inputs.append(mask)
        uses = list(act.uses())
        mul = ir.node("Mul", [act, mask], name=input_name)
        masked = mul.outputs[0]
        masked.name = f"{name}_{input_name}"
        if act.dtype is not None:
            masked.dtype, masked.shape = act.dtype, act.shape
        for user, index in uses:
            user.replace_input_with(index, masked)
        producer = act.producer()
        if producer is None:
            raise KeyError(name)
        graph.insert_after(producer, mul)
    out.parent.mkdir(parents=True, exist_ok=True)
    ir.save(model, str(out), external_data=out.name + ".data")
    return out


class MaskedReference:
    """ORT over :func:`masked_source`'s graph: a dense prefill, then decode steps with FFN masks."""

    def __init__(self, path: Path, intermediate: Sequence[int], threads: int | None = None) -> None:
        from cscompile.decode.session import open_onnx_session
        from cscompile.decode.spec import DecoderSpec, TensorInfo

        self.session = open_onnx_session(path, threads)
        masks = {f.format(li) for li in range(len(intermediate)) for f in (MASK_INPUT, ATTN_INPUT)}

        def info(args: Sequence[Any]) -> list[TensorInfo]:
            return [TensorInfo(a.name, tuple(d if isinstance(d, int) else None for d in a.shape), a.type)
                    for a in args if a.name not in masks]  # fmt: skip

        self.spec = DecoderSpec.from_io(
            info(self.session.get_inputs()), info(self.session.get_outputs()), f"gate reference {path.name}"
        )
        self.intermediate = list(intermediate)
        self._outputs = [self.spec.logits, *(n for pair in self.spec.present_outputs for n in pair)]

    def new_state(self) -> dict[str, Any]:
        dtype = np.float16 if "float16" in self.spec.kv_dtype else np.float32  # the source's cache type
        kv = np.zeros((1, self.spec.num_kv_heads, 0, self.spec.head_dim), dtype)
        return {"past": [kv] * (2 * self.spec.num_layers), "length": 0}

    def forward(
        self,
        ids: np.ndarray,
        state: dict[str, Any],
        keep: Sequence[np.ndarray | None],
        attention: Sequence[bool] | None = None,
    ) -> np.ndarray:
        """Logits ``[S, V]`` of ``ids [S]`` after ``state`` (replaced, not mutated); ``keep[l]``: the
        FFN channels layer ``l`` keeps at every position (``None``: all); ``attention[l]``: whether
        layer ``l``'s attention output is kept (default: every layer's).
        """
        s, n = len(ids), state["length"] + len(ids)
        feeds: dict[str, np.ndarray] = {self.spec.input_ids: np.asarray(ids, np.int64)[None]}
        if self.spec.attention_mask:
            feeds[self.spec.attention_mask] = np.ones((1, n), np.int64)
        if self.spec.position_ids:
            feeds[self.spec.position_ids] = np.arange(state["length"], n, dtype=np.int64)[None]
        for name in self.spec.other_inputs:
            feeds[name] = np.arange(state["length"], n, dtype=np.int64)
        for name, value in zip((x for pair in self.spec.past_inputs for x in pair), state["past"]):
            feeds[name] = value
        for li, width in enumerate(self.intermediate):
            mask = np.ones((1, s, width), np.float32)
            if keep[li] is not None:
                mask[:] = 0.0
                mask[..., keep[li]] = 1.0
            feeds[MASK_INPUT.format(li)] = mask
            on = attention is None or attention[li]
            feeds[ATTN_INPUT.format(li)] = np.full(1, 1.0 if on else 0.0, np.float32)
        outs = self.session.run(self._outputs, feeds)
        state["past"], state["length"] = outs[1:], n
        return np.asarray(outs[0])[0]


class _Recording:
    """A motif engine's FFN kernel of one layer that records the channels each decode step ran."""

    def __init__(self, inner: Any, sink: list[np.ndarray | None], layer: int) -> None:
        self._inner, self._sink, self._layer = inner, sink, layer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def add_to(self, resid: np.ndarray, x: np.ndarray, idx: np.ndarray | None = None) -> np.ndarray:
        self._sink[self._layer] = None if idx is None else np.array(idx, np.int64)
        return self._inner.add_to(resid, x, idx)  # type: ignore[no-any-return]

    def sensed_add_to(self, *args: Any, **kwargs: Any) -> tuple[np.ndarray, float]:
        idx, residual = self._inner.sensed_add_to(*args, **kwargs)
        self._sink[self._layer] = np.array(idx, np.int64)  # the kernel reuses its index buffer
        return idx, residual


@dataclass
class MotifRun:
    """One motif engine's teacher-forced logits and its reference's (``[n, V]`` per sequence)."""

    name: str
    engine: list[np.ndarray]
    reference: list[np.ndarray]
    sparse: bool  # it ran fewer FFN channels than the source somewhere (else the reference is the source)
    precision: str  # of its FFN records: fp32 or q8
    miscount: str | None  # a kernel that ran other channel counts than the motif says


def motif_runs(
    files: Mapping[str, Path | bytes],
    source: Path,
    acts: Sequence[str],
    contexts: Sequence[str],
    seqs: Sequence[np.ndarray],
    src_logits: Sequence[np.ndarray],
    work: Path,
    prefill: int,
    threads: int | None = None,
) -> list[MotifRun]:
    """Run every motif engine of a motif part's ``files`` (written to ``work`` first: the bytes that
    ship are the bytes checked) and its reference (:func:`masked_source` of ``source``) on ``seqs``:
    a ``prefill`` then one decode step per remaining id, teacher-forced.
    """
    from cscompile.motifs.build import load_family
    from cscompile.motifs.load import load_engine

    root = work / "gate-motifs"
    for rel, data in files.items():
        if not rel.startswith("motifs/"):
            continue
        dst = root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(data if isinstance(data, bytes) else Path(data).read_bytes())
    engine = load_engine(root, threads)
    family, preds, _ = load_family(root)
    n_layers, width = engine.num_layers, engine.intermediate
    sink: list[np.ndarray | None] = [None] * n_layers
    engine.ffn = cast(Any, [_Recording(f, sink, li) for li, f in enumerate(engine.ffn)])
    precision = "fp32" if engine.ffn_format == "f32" else engine.ffn_format
    ref: MaskedReference | None = None
    # the prefill (dense in the engine and in the reference) runs once per sequence for all motifs
    eng_pre = []
    for ids in seqs:
        st = engine.new_state()
        eng_pre.append((engine.forward(ids[None, :prefill], st)[0, -1], st))
    ref_pre: list[tuple[np.ndarray, dict[str, Any]]] = []
    out = []
    for mb in family.members:
        motif = mb.motif(width, preds)
        sparse = any(k is not None and k < width for k in motif.k)
        engine_rows: list[np.ndarray] = []
        supports: list[list[list[np.ndarray | None]]] = []
        miscount: str | None = None
        for ids, (row0, st0) in zip(seqs, eng_pre):
            st, rows, steps = copy.copy(st0), [row0], []
            for t in range(prefill, len(ids) - 1):
                sink[:] = [None] * n_layers
                rows.append(engine.forward(ids[None, t : t + 1], st, motif)[0, -1])
                steps.append(list(sink))
                for li, (k, ran) in enumerate(zip(motif.k, sink)):
                    got = width if ran is None else len(ran)
                    want = width if k is None else min(k, width)
                    if got != want and miscount is None:
                        miscount = f"its kernel ran {got} FFN channels at layer {li}, the motif says {want}"
            engine_rows.append(np.stack(rows).astype(np.float64))
            supports.append(steps)
        reference = list(src_logits)  # a dense motif: the reference is the source itself
        if sparse:
            if ref is None:
                ref = MaskedReference(masked_source(source, acts, contexts, work / "gate-ref" / "model.onnx"),
                                      [width] * n_layers, threads)  # fmt: skip
                for ids in seqs:
                    rst = ref.new_state()
                    ref_pre.append((ref.forward(ids[:prefill], rst, [None] * n_layers)[-1], rst))
            reference = []
            for ids, (row0, rst0), steps in zip(seqs, ref_pre, supports):
                rst, rows = dict(rst0), [row0]
                for t, keep in zip(range(prefill, len(ids) - 1), steps):
                    rows.append(ref.forward(ids[t : t + 1], rst, keep)[-1])
                reference.append(np.stack(rows).astype(np.float64))
        out.append(MotifRun(f"motif-{mb.name}", engine_rows, reference, sparse, precision, miscount))
    return out


def point_runs(
    points: Sequence[tuple[str, Path, Mapping[str, Any]]],
    source: Path,
    acts: Sequence[str],
    contexts: Sequence[str],
    widths: Sequence[int],
    seqs: Sequence[np.ndarray],
    work: Path,
    run_engine: Any,
    prefill: int,
    threads: int | None = None,
) -> list[tuple[str, list[np.ndarray], list[np.ndarray]]]:
    """``(name, engine logits, reference logits)`` per depth-dropped ORT point ``(name, onnx path,
    search config)``: the reference is the source with the point's dropped layers passed through and
    its dropped FFNs zeroed (:func:`masked_source`), teacher-forced as the gate runs every engine;
    ``run_engine(path)`` is the gate's runner over an ONNX decoder.
    """
    from cscompile.search.joint import Config

    ref = MaskedReference(
        masked_source(source, acts, contexts, work / "gate-ref" / "model.onnx"), widths, threads
    )
    n = len(widths)
    out = []
    for name, path, search in points:
        drop, drop_ffn, _, _ = Config.from_dict(dict(search)).plan()
        keep = [np.zeros(0, np.int64) if li in drop or li in drop_ffn else None for li in range(n)]
        attention = [li not in drop for li in range(n)]
        reference = []
        for ids in seqs:
            st = ref.new_state()
            rows = [ref.forward(ids[:prefill], st, keep, attention)[-1]]
            for t in range(prefill, len(ids) - 1):
                rows.append(ref.forward(ids[t : t + 1], st, keep, attention)[-1])
            reference.append(np.stack(rows).astype(np.float64))
        run = run_engine(path)
        out.append((name, [run(ids) for ids in seqs], reference))
    return out
