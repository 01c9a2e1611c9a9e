"""Weight precision per layer and unit type: fp32, int8, int4 through ONNX Runtime's ``MatMulNBits``.

Rules:

1. A projection at ``int4``/``int8`` becomes ``com.microsoft::MatMulNBits`` (block 32 along K,
   codes packed low-first, accuracy level as given: 4 = int8 activations, the fast kernels).
2. **Source grid kept exactly** when a GGUF grid is given, every llama.cpp block type: a 4-bit
   grid (Q4_0/Q4_1/Q4_K: ``w = d·q + m`` per 32) is written as codes ``q`` with scale ``d`` and
   the *integer* zero point 8 (a fast kernel), and the remainder ``(m + 8d)`` per block is added
   back as ``blocksum(x) @ C`` — the per-block sums of the input (32× fewer terms than the
   projection) times a small fp32 matrix; at int8 the same grid as codes ``q + 120``. A 5/6/8-bit
   grid (Q8_0, Q5_0, Q6_K; Q5_1/Q5_K with their offsets in ``C``) is 8-bit codes ``q + 128``
   with the default zero point 128 — at int4 too (as the native step: re-rounding it to 4 bits
   loses what the file kept); Q6_K's scales per 16 make its kernel's block 16.
3. Otherwise round-to-nearest (RTN) from the fp32 weight: symmetric for int4 (the floor every
   method must beat), asymmetric with integer zero points for int8.
4. Block sums of one input are computed once and shared by the projections that read it
   (Q/K/V, gate/up).
5. A tied LM head is quantized as a projection; the embedding's ``Gather`` then reads the same
   codes (rule 7).
6. Packing (default): projections that read the same input (Q/K/V; gate/up) become one kernel
   with their rows stacked, then a ``Split``; a fused ``GroupQueryAttention`` reads packed QKV
   directly. One activation quantization and one kernel launch instead of three.
7. The tied embedding's ``Gather`` becomes ``GatherBlockQuantized`` over the head's codes and
   scales (exact for a Q8_0 grid), so no fp32 table is kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult

from cscompile.errors import UserError
from cscompile.passes.graph_utils import add_initializer
from cscompile.passes.unit_map import Projection, UnitMap, require_unit_map
from cscompile.quant.gguf import GRID_TYPES, QK, BlockGrid, GGUFGrid, gguf_name

#: ``int4`` keeps a source GGUF grid exactly when there is one (block-sum correction on Q4_1);
#: ``int4-rtn`` always re-rounds (symmetric, no correction ops: faster, lossy on pre-quantized weights)
PRECISIONS = ("fp32", "int8", "int4", "int4-rtn")
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


def pack_codes(q: np.ndarray, bits: int, block: int = QK) -> np.ndarray:
    """Codes ``[N, K]`` (uint8, < 2**bits) → MatMulNBits B ``[N, K/block, block·bits/8]``, low-first along K."""
    n, k = q.shape
    q = q.astype(np.uint8).reshape(n, k // block, block)
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
        scale = np.abs(blocks).max(-1) / (mid - 1)
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

    def __init__(
        self,
        plan: PrecisionPlan,
        grid: GGUFGrid | None = None,
        accuracy_level: int = 4,
        pack: bool = True,
        source_layers: list[int] | None = None,
    ) -> None:
        super().__init__()
        #: layer i of this graph is layer ``source_layers[i]`` of the source (after dropping
        #: layers): the GGUF tensors are looked up by source index
        self.source_layers = source_layers
        self.pack = pack
        self.plan = plan
        self.grid = grid
        self.accuracy_level = accuracy_level
        self.report: dict[str, int] = {}

    def requires(self, model: ir.Model) -> None:
        require_unit_map(model, "QuantizeWeightsPass")

    def call(self, model: ir.Model) -> PassResult:
        um: UnitMap = model.meta["cscompile.unit_map"]
        graph = model.graph
        nodes = {n.name: n for n in graph}
        self._blocksums: dict[int, ir.Value] = {}
        self._head_codes: tuple[np.ndarray, np.ndarray, np.ndarray | None, int, int] | None = None
        self._head_b: ir.Value | None = None  # the tied head's MatMulNBits codes (B), shared by the embedding
        self.embedding = "fp32 Gather"
        self._opset(model)
        # groups of projections that read the same input: packed into one kernel when allowed
        groups: list[tuple[list[tuple[Projection, str]], int | None, str]] = []
        for layer in um.layers:
            a, m = layer.attention, layer.mlp
            if a.fused_qkv:
                raise UserError(
                    "quantization",
                    f"layer {layer.index} has a fused QKV projection",
                    "separate Q/K/V (Llama family)",
                )
            qkv = [(a.q, "q"), (a.k, "k"), (a.v, "v")]
            gate_up = [(p, r) for p, r in ((m.gate, "gate"), (m.up, "up")) if p is not None]
            ffn_groups = [(gate_up, "ffn"), ([(m.down, "down")], "ffn")] if layer.ffn else []
            for members, kind in ((qkv, "attn"), ([(a.o, "o")], "attn"), *ffn_groups):
                if self.pack:
                    groups.append((members, layer.index, kind))  # type: ignore[arg-type]
                else:
                    groups += [([mem], layer.index, kind) for mem in members]  # type: ignore[list-item]
        groups.append(([(um.lm_head, "embedding" if um.lm_head_tied else "lm_head")], None, "lm_head"))
        for members, layer_index, kind in groups:
            precision = self.plan.of(layer_index, kind)
            if precision == "fp32":
                continue
            found = []
            for proj, role in members:
                node = nodes.get(proj.node)
                if node is None:
                    raise UserError(
                        "quantization",
                        f"projection node '{proj.node}' not in the graph",
                        "the graph the unit map was made from",
                    )
                found.append((node, proj, role))
            self._replace(graph, found, layer_index, 8 if precision == "int8" else 4, precision != "int4-rtn")
        if um.lm_head_tied and self._head_codes is not None:
            self._quantize_embedding(graph, um.embedding)
        return PassResult(model, modified=bool(self.report))

    def _quantize_embedding(self, graph: ir.Graph, name: str) -> None:
        """Rule 7: a tied embedding's ``Gather`` reads the head's codes (``GatherBlockQuantized``).

        The same codes and scales as the LM head's ``MatMulNBits`` (exact for the source's Q8_0
        grid: the fp32 table *is* its dequantization), so the fp32 table leaves the file and
        memory (SmolLM2: 113 MB → 28 MB). Only without zero points, or with 8-bit ones.
        """
        assert self._head_codes is not None
        q, scale, zp, bits, block = self._head_codes
        if zp is not None and bits != 8:
            return
        table = graph.initializers.get(name)
        gathers = [n for n, slot in table.uses() if n.op_type == "Gather" and slot == 0] if table else []
        if table is None or len(gathers) != 1 or any(a.value != 0 for a in gathers[0].attributes.values()):
            return
        node = gathers[0]
        n, k = q.shape
        ids = node.inputs[1]
        # 8-bit codes: the head's own B initializer ([N, K/block, block]) is the table, blocks on
        # axis 2 and a Reshape back to [.., K] — one copy of the codes in the file (Gemma 3 270M:
        # 168 MB less); otherwise (4-bit: packed pairs) a 2-D copy of the codes
        share = bits == 8 and self._head_b is not None and ids is not None and ids.shape is not None
        shape3 = (n, k // block, 1) if share else (n, k // block)
        inputs = [
            self._head_b
            if share
            else add_initializer(
                graph, "cs.embedding.codes", pack_codes(q, bits, block).reshape(n, k * bits // 8)
            ),
            ids,
            add_initializer(graph, "cs.embedding.scales", scale.astype(np.float32).reshape(shape3)),
        ]
        if zp is not None:
            inputs.append(add_initializer(graph, "cs.embedding.zp", zp.astype(np.uint8).reshape(shape3)))
        gbq = ir.node(
            "GatherBlockQuantized",
            inputs,
            attributes={
                "gather_axis": 0,
                "quantize_axis": 2 if share else 1,
                "block_size": block,
                "bits": bits,
            },
            domain="com.microsoft",
            name="cs.embedding.gather",
        )
        new = [gbq]
        out = gbq.outputs[0]
        if share:
            assert ids is not None and ids.shape is not None
            dims = add_initializer(
                graph, "cs.embedding.shape", np.array([0] * len(ids.shape) + [k], np.int64)
            )
            reshape = ir.node("Reshape", [out, dims], name="cs.embedding.reshape")
            new.append(reshape)
            out = reshape.outputs[0]
        graph.insert_before(node, new)
        old = node.outputs[0]
        old.replace_all_uses_with(out, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        out.name = old.name
        if not any(True for _ in table.uses()):
            graph.initializers.pop(name, None)
        self.embedding = f"GatherBlockQuantized ({bits}-bit, the head's codes)"

    # -- helpers -----------------------------------------------------------------------
    @staticmethod
    def _opset(model: ir.Model) -> None:
        model.opset_imports.setdefault("com.microsoft", 1)

    def _codes(self, w_out_in: np.ndarray, layer: int | None, role: str, bits: int, use_grid: bool = True):  # type: ignore[no-untyped-def]
        """(codes, scales [N, K/sub], zero points or None, correction C [N, K/32] or None, source tag,
        code width, sub) — ``sub`` the elements one scale covers (32, or 16 for Q6_K's grid).
        """
        grid: BlockGrid | None = None
        if self.grid is not None and use_grid:
            src = layer if layer is None or self.source_layers is None else self.source_layers[layer]
            name = gguf_name(src, role)
            kind = self.grid.kind(name)
            if kind in GRID_TYPES:
                grid = self.grid.matched(name, w_out_in)
        if grid is not None and grid.kind == "Q4_1":
            # Q4_0/Q4_1/Q4_K: 4-bit codes q with scale d (Q4_K: d·sc) and the remainder m + 8d per
            # block; asked for at int8, the same grid as 8-bit codes q + 120 (d·(q + 120 − 128))
            assert grid.offset is not None
            corr = grid.offset + 8.0 * grid.scale
            if bits == 4:
                return grid.q, grid.scale, None, corr, "grid", 4, grid.sub
            return (grid.q + 120).astype(np.uint8), grid.scale, None, corr, "grid", 8, grid.sub
        if grid is not None:
            # Q8_0/Q5_0/Q6_K (Q5_1/Q5_K: their offsets as the correction): 8-bit codes q + 128 with
            # the default zero point 128 — at int4 too, as the native step does: a 5/6/8-bit grid
            # re-rounded to 4 bits loses what the file kept (Gemma 3 270M int4: mean KL 0.85 nats
            # against the source that way; docs/design.md "The source grid is kept")
            codes = (grid.q.astype(np.int16) + 128).astype(np.uint8)
            return codes, grid.scale, None, grid.offset, "grid", 8, grid.sub
        q, s, zp = rtn(w_out_in, bits, symmetric=bits == 4)
        return q, s, zp, None, "rtn", bits, QK

    def _blocksum(self, graph: ir.Graph, x: ir.Value, k: int, new: list[ir.Node]) -> ir.Value:
        if id(x) in self._blocksums:
            return self._blocksums[id(x)]
        tag = f"cs.blocksum.{len(self._blocksums)}"
        shape = add_initializer(
            graph,
            f"{tag}.shape",
            np.array([0, 0, k // QK, QK] if len(x.shape or (0, 0, 0)) == 3 else [0, k // QK, QK], np.int64),
        )
        axes = add_initializer(graph, f"{tag}.axes", np.array([-1], np.int64))
        r = ir.node("Reshape", [x, shape], name=f"{tag}.reshape")
        s = ir.node("ReduceSum", [r.outputs[0], axes], attributes={"keepdims": 0}, name=f"{tag}.sum")
        new += [r, s]
        self._blocksums[id(x)] = s.outputs[0]
        return s.outputs[0]

    def _replace(
        self,
        graph: ir.Graph,
        members: list[tuple[ir.Node, Projection, str]],
        layer: int | None,
        bits: int,
        use_grid: bool = True,
    ) -> None:
        """One MatMulNBits for ``members`` (projections reading one input), rows stacked along N.

        Members whose codes have different widths (a source grid kept at its own width beside a
        4-bit one) are not packed: one MatMulNBits each. Within a pack, a member whose scales
        cover 16 elements (Q6_K) makes the block 16, and the others' per-32 scales are repeated
        (the same weights exactly).
        """
        parts = []
        for _node, proj, role in members:
            w = graph.initializers[proj.weight].const_value.numpy()  # type: ignore[union-attr]
            w_out_in = np.ascontiguousarray(w.T if proj.weight_layout == "in_out" else w)
            if w_out_in.shape[1] % QK:
                raise UserError(
                    "quantization",
                    f"projection '{proj.node}' has K={w_out_in.shape[1]}",
                    f"K a multiple of {QK}",
                )
            parts.append(self._codes(w_out_in, layer, role, bits, use_grid))
        if len({p[5] for p in parts}) > 1:
            for member, part in zip(members, parts, strict=True):
                self._emit(graph, [member], [part], layer)
            return
        self._emit(graph, members, parts, layer)

    def _emit(
        self, graph: ir.Graph, members: list[tuple[ir.Node, Projection, str]], parts: list, layer: int | None
    ) -> None:
        bits = parts[0][5]
        block = min(p[6] for p in parts)
        parts = [
            (
                p[0],
                np.repeat(p[1], p[6] // block, axis=1),
                None if p[2] is None else np.repeat(p[2], p[6] // block, axis=1),
                *p[3:],
            )
            for p in parts
        ]
        x = members[0][0].inputs[0]
        assert x is not None
        k = parts[0][0].shape[1]
        sizes = [p[0].shape[0] for p in parts]
        n = sum(sizes)
        q = np.concatenate([p[0] for p in parts])
        if layer is None and len(parts) == 1 and parts[0][3] is None:
            self._head_codes = (q, parts[0][1], parts[0][2], bits, block)  # for the tied embedding (rule 7)
        scale = np.concatenate([p[1] for p in parts])
        zp = (
            None
            if all(p[2] is None for p in parts)
            else np.concatenate(
                [p[2] if p[2] is not None else np.full(p[1].shape, 1 << (bits - 1), np.uint8) for p in parts]
            )
        )
        corr = (  # per 32 elements whatever the block (the block sums are per 32)
            None
            if all(p[3] is None for p in parts)
            else np.concatenate(
                [p[3] if p[3] is not None else np.zeros((p[0].shape[0], k // QK), np.float32) for p in parts]
            )
        )
        first = members[0][1]
        tag = f"cs.q{bits}.{first.node or first.weight}"
        codes = add_initializer(graph, f"{tag}.B", pack_codes(q, bits, block))
        if layer is None and len(parts) == 1 and parts[0][3] is None:
            self._head_b = codes
        inputs = [
            x,
            codes,
            add_initializer(graph, f"{tag}.scales", scale.astype(np.float32).reshape(-1)),
        ]
        if zp is not None:
            if bits == 4:
                z = zp.reshape(n, -1)
                if z.shape[1] % 2:
                    z = np.concatenate([z, np.zeros((n, 1), np.uint8)], axis=1)
                zp = (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8)
            inputs.append(add_initializer(graph, f"{tag}.zp", zp.reshape(-1)))
        mnb = ir.node(
            "MatMulNBits",
            inputs,
            attributes={
                "K": k,
                "N": n,
                "bits": bits,
                "block_size": block,
                "accuracy_level": self.accuracy_level,
            },
            domain="com.microsoft",
            name=f"{tag}.matmul",
        )
        new = [mnb]
        out = mnb.outputs[0]
        if corr is not None:
            bs = self._blocksum(graph, x, k, new)
            cmat = add_initializer(
                graph, f"{tag}.corr", np.ascontiguousarray(corr.T.astype(np.float32))
            )  # [K/32, N]
            mm = ir.node("MatMul", [bs, cmat], name=f"{tag}.corr_mm")
            add = ir.node("Add", [out, mm.outputs[0]], name=f"{tag}.add")
            new += [mm, add]
            out = add.outputs[0]
        outs = [out]
        if len(members) > 1:
            split = ir.node(
                "Split",
                [out, add_initializer(graph, f"{tag}.split", np.array(sizes, np.int64))],
                attributes={"axis": -1},
                num_outputs=len(members),
                name=f"{tag}.split",
            )
            new.append(split)
            outs = list(split.outputs)
        graph.insert_before(members[0][0], new)
        for (node, proj, _), value in zip(members, outs):
            if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
                add_b = ir.node("Add", [value, node.inputs[2]], name=f"{tag}.bias")
                graph.insert_before(node, add_b)
                value = add_b.outputs[0]
            old = node.outputs[0]
            old.replace_all_uses_with(value, replace_graph_outputs=True)
            graph.remove(node, safe=True)
            value.name = old.name
            if not any(True for _ in graph.initializers[proj.weight].uses()):
                graph.initializers.pop(proj.weight, None)
        if len(members) == 3:
            self._feed_packed_qkv(out, outs)
        for part in parts:
            key = f"{'int8' if bits == 8 else 'int4'}-{part[4]}"
            self.report[key] = self.report.get(key, 0) + 1

    @staticmethod
    def _feed_packed_qkv(packed: ir.Value, outs: list[ir.Value]) -> None:
        """Rule 6: a GroupQueryAttention reading the three parts in order reads the packed tensor instead."""
        users = [{(n.name, slot) for n, slot in v.uses()} for v in outs]
        if any(len(u) != 1 for u in users):
            return
        (n0, s0), (n1, s1), (n2, s2) = (next(iter(u)) for u in users)
        node = next(n for n, _ in outs[0].uses())
        if node.op_type != "GroupQueryAttention" or (s0, s1, s2) != (0, 1, 2) or not n0 == n1 == n2:
            return
        node.replace_input_with(0, packed)
        node.replace_input_with(1, None)
        node.replace_input_with(2, None)
