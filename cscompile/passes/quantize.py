"""Weight precision per layer and unit type: fp32, int8, int4 through ONNX Runtime's ``MatMulNBits``.

Rules:

1. A projection at ``int4``/``int8`` becomes ``com.microsoft::MatMulNBits`` (block 32 along K,
   codes packed low-first, accuracy level as given: 4 = int8 activations, the fast kernels).
2. **Source grid kept exactly** when a GGUF grid is given: a Q4_1 tensor (``w = d·q + m``) is
   written as codes ``q`` with scale ``d`` and the *integer* zero point 8 (a fast kernel), and
   the remainder ``(m + 8d)`` per block is added back as ``blocksum(x) @ C`` — the per-block sums
   of the input (32× fewer terms than the projection) times a small fp32 matrix. A Q8_0 tensor
   (``w = d·q``) is exactly 8-bit codes ``q + 128`` with the default zero point 128.
3. Otherwise round-to-nearest (RTN) from the fp32 weight: symmetric for int4 (the floor every
   method must beat), asymmetric with integer zero points for int8.
4. Block sums of one input are computed once and shared by the projections that read it
   (Q/K/V, gate/up).
5. A tied LM head keeps the fp32 embedding for the ``Gather``; only the head is quantized.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult, PreconditionError

from cscompile.errors import UserError
from cscompile.models.gguf_grid import QK, BlockGrid, GGUFGrid, gguf_name
from cscompile.passes.unit_map import Projection, UnitMap

PRECISIONS = ("fp32", "int8", "int4")
ATTN_ROLES = ("q", "k", "v", "o")
FFN_ROLES = ("gate", "up", "down")


@dataclass
class PrecisionPlan:
    """Precision per unit type, with per-layer overrides. Keys: ``attn``, ``ffn``, ``lm_head``."""

    attn: str = "int4"
    ffn: str = "int4"
    lm_head: str = "int8"
    layers: dict[int, dict[str, str]] = field(default_factory=dict)  # {layer: {"attn": "fp32"}}

    def of(self, layer: int | None, kind: str) -> str:
        if layer is None:
            p = self.lm_head
        else:
            p = self.layers.get(layer, {}).get(kind, getattr(self, kind))
        if p not in PRECISIONS:
            raise UserError("precision", f"'{p}' for {kind}", f"one of {', '.join(PRECISIONS)}")
        return p

    def describe(self) -> str:
        base = f"attn {self.attn}, ffn {self.ffn}, lm_head {self.lm_head}"
        return base + (f", overrides {self.layers}" if self.layers else "")


def pack_codes(q: np.ndarray, bits: int) -> np.ndarray:
    """Codes ``[N, K]`` (uint8, < 2**bits) → MatMulNBits B ``[N, K/32, 32·bits/8]``, low-first along K."""
    n, k = q.shape
    q = q.astype(np.uint8).reshape(n, k // QK, QK)
    if bits == 8:
        return np.ascontiguousarray(q)
    if bits == 4:
        return np.ascontiguousarray(q[..., 0::2] | (q[..., 1::2] << 4))
    raise UserError("bits", str(bits), "4 or 8")


def rtn(w_out_in: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Round-to-nearest per block of 32: codes ``[N, K]``, scales ``[N, K/32]``, zero points or None (default)."""
    n, k = w_out_in.shape
    blocks = w_out_in.reshape(n, k // QK, QK).astype(np.float64)
    top = (1 << bits) - 1
    if symmetric:
        mid = 1 << (bits - 1)
        scale = np.abs(blocks).max(-1) / (mid - 1) if bits == 4 else np.abs(blocks).max(-1) / (mid - 1)
        scale = np.where(scale == 0, 1.0, scale)
        q = np.clip(np.rint(blocks / scale[..., None]) + mid, 0, top)
        return q.reshape(n, k).astype(np.uint8), scale.astype(np.float32), None
    lo, hi = np.minimum(blocks.min(-1), 0), np.maximum(blocks.max(-1), 0)
    scale = np.where(hi > lo, (hi - lo) / top, 1.0)
    zp = np.clip(np.rint(-lo / scale), 0, top)
    q = np.clip(np.rint(blocks / scale[..., None]) + zp[..., None], 0, top)
    return q.reshape(n, k).astype(np.uint8), scale.astype(np.float32), zp.astype(np.uint8)


def dequantize(q: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, bits: int) -> np.ndarray:
    """Reference semantics of MatMulNBits' weight: ``(q - zp) · scale`` per block ([N, K])."""
    n, k = q.shape
    z = np.full(scale.shape, 1 << (bits - 1), np.float32) if zp is None else zp.astype(np.float32)
    w = (q.reshape(n, k // QK, QK).astype(np.float32) - z[..., None]) * scale[..., None]
    return w.reshape(n, k)


class QuantizeWeightsPass(InPlacePass):
    """Replace weight projections by ``MatMulNBits`` according to a :class:`PrecisionPlan`."""

    def __init__(self, plan: PrecisionPlan, grid: GGUFGrid | None = None, accuracy_level: int = 4) -> None:
        super().__init__()
        self.plan = plan
        self.grid = grid
        self.accuracy_level = accuracy_level
        self.report: dict[str, int] = {}

    def requires(self, model: ir.Model) -> None:
        if "cscompile.unit_map" not in model.meta:
            raise PreconditionError("QuantizeWeightsPass needs the unit map (run DiscoverUnitsPass first)")

    def call(self, model: ir.Model) -> PassResult:
        um: UnitMap = model.meta["cscompile.unit_map"]
        graph = model.graph
        nodes = {n.name: n for n in graph}
        self._blocksums: dict[int, ir.Value] = {}
        self._opset(model)
        jobs: list[tuple[Projection, int | None, str, str]] = []
        for layer in um.layers:
            a, m = layer.attention, layer.mlp
            if a.fused_qkv:
                raise UserError(
                    "quantization",
                    f"layer {layer.index} has a fused QKV projection",
                    "separate Q/K/V (Llama family)",
                )
            for role in ATTN_ROLES:
                jobs.append((getattr(a, role), layer.index, "attn", role))
            for role in FFN_ROLES:
                p = getattr(m, role)
                if p is not None:
                    jobs.append((p, layer.index, "ffn", role))
        jobs.append((um.lm_head, None, "lm_head", "embedding" if um.lm_head_tied else "lm_head"))
        for proj, layer_index, kind, role in jobs:
            precision = self.plan.of(layer_index, kind)
            if precision == "fp32":
                continue
            node = nodes.get(proj.node)
            if node is None:
                raise UserError(
                    "quantization",
                    f"projection node '{proj.node}' not in the graph",
                    "the graph the unit map was made from",
                )
            self._replace(graph, node, proj, layer_index, role, 8 if precision == "int8" else 4)
        return PassResult(model, modified=bool(self.report))

    # -- helpers -----------------------------------------------------------------------
    @staticmethod
    def _opset(model: ir.Model) -> None:
        model.opset_imports.setdefault("com.microsoft", 1)

    def _const(self, graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
        v = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        v.shape = ir.Shape(array.shape)
        v.dtype = ir.DataType.from_numpy(array.dtype)
        graph.register_initializer(v)
        return v

    def _codes(self, w_out_in: np.ndarray, layer: int | None, role: str, bits: int):  # type: ignore[no-untyped-def]
        """(codes, scales, zero points or None, correction C [N, K/32] or None, source tag)."""
        grid: BlockGrid | None = None
        if self.grid is not None:
            grid = self.grid.matched(gguf_name(layer, role), w_out_in)
        if grid is not None and grid.kind == "Q4_1" and bits == 4:
            assert grid.offset is not None
            return grid.q, grid.scale, None, grid.offset + 8.0 * grid.scale, "grid"
        if grid is not None and grid.kind == "Q8_0" and bits == 8:
            return (grid.q.astype(np.int16) + 128).astype(np.uint8), grid.scale, None, None, "grid"
        q, s, zp = rtn(w_out_in, bits, symmetric=bits == 4)
        return q, s, zp, None, "rtn"

    def _blocksum(self, graph: ir.Graph, x: ir.Value, k: int, new: list[ir.Node]) -> ir.Value:
        if id(x) in self._blocksums:
            return self._blocksums[id(x)]
        tag = f"cs.blocksum.{len(self._blocksums)}"
        shape = self._const(
            graph,
            f"{tag}.shape",
            np.array([0, 0, k // QK, QK] if len(x.shape or (0, 0, 0)) == 3 else [0, k // QK, QK], np.int64),
        )
        axes = self._const(graph, f"{tag}.axes", np.array([-1], np.int64))
        r = ir.node("Reshape", [x, shape], name=f"{tag}.reshape")
        s = ir.node("ReduceSum", [r.outputs[0], axes], attributes={"keepdims": 0}, name=f"{tag}.sum")
        new += [r, s]
        self._blocksums[id(x)] = s.outputs[0]
        return s.outputs[0]

    def _replace(
        self, graph: ir.Graph, node: ir.Node, proj: Projection, layer: int | None, role: str, bits: int
    ) -> None:
        w = graph.initializers[proj.weight].const_value.numpy()  # type: ignore[union-attr]
        w_out_in = w.T if proj.weight_layout == "in_out" else w
        n, k = w_out_in.shape
        if k % QK:
            raise UserError("quantization", f"projection '{proj.node}' has K={k}", f"K a multiple of {QK}")
        q, scale, zp, corr, source = self._codes(np.ascontiguousarray(w_out_in), layer, role, bits)
        tag = f"cs.q{bits}.{proj.node or proj.weight}"
        inputs = [
            node.inputs[0],
            self._const(graph, f"{tag}.B", pack_codes(q, bits)),
            self._const(graph, f"{tag}.scales", scale.astype(np.float32).reshape(-1)),
        ]
        if zp is not None:
            if bits == 4:
                z = zp.reshape(n, -1)
                if z.shape[1] % 2:
                    z = np.concatenate([z, np.zeros((n, 1), np.uint8)], axis=1)
                zp = (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8)
            inputs.append(self._const(graph, f"{tag}.zp", zp.reshape(-1)))
        x = node.inputs[0]
        assert x is not None
        mnb = ir.node(
            "MatMulNBits",
            inputs,
            attributes={
                "K": k,
                "N": n,
                "bits": bits,
                "block_size": QK,
                "accuracy_level": self.accuracy_level,
            },
            domain="com.microsoft",
            name=f"{tag}.matmul",
        )
        new = [mnb]
        out = mnb.outputs[0]
        if corr is not None:
            bs = self._blocksum(graph, x, k, new)
            cmat = self._const(
                graph, f"{tag}.corr", np.ascontiguousarray(corr.T.astype(np.float32))
            )  # [K/32, N]
            mm = ir.node("MatMul", [bs, cmat], name=f"{tag}.corr_mm")
            add = ir.node("Add", [out, mm.outputs[0]], name=f"{tag}.add")
            new += [mm, add]
            out = add.outputs[0]
        if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
            add_b = ir.node("Add", [out, node.inputs[2]], name=f"{tag}.bias")
            new.append(add_b)
            out = add_b.outputs[0]
        graph.insert_before(node, new)
        old = node.outputs[0]
        old.replace_all_uses_with(out, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        out.name = old.name
        if not any(True for _ in graph.initializers[proj.weight].uses()) and proj.weight != "":
            graph.initializers.pop(proj.weight, None)
        key = f"{'int8' if bits == 8 else 'int4'}-{source}"
        self.report[key] = self.report.get(key, 0) + 1
