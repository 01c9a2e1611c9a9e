"""The TensorRT runner: the dense and sparse engines of a bundle behind the motif-engine interface.

:class:`TrtEngine` has the ``new_state`` / ``forward(ids, state, motif, stats)`` interface of
:class:`~cscompile.motifs.engine.LayeredEngine`, so the switching controller
(:class:`~cscompile.motifs.runtime.SwitchingSession`) and text generation run on it unchanged.

Device memory (torch CUDA tensors, one stream):

- KV cache: per layer, two flat buffers for K and two for V of capacity ``context`` tokens.
  A step reads ``past`` as a contiguous ``[1, heads, P, d]`` view of one buffer and TensorRT
  writes ``present`` (``[1, heads, P + S, d]``) into the other; the next step swaps them. The
  cache never visits the host, and the dense and the sparse engine bind the same buffers, so
  switching engines between tokens moves nothing.
- motif switching inside the sparse engine is binding another (pre-uploaded) ``counts`` tensor.
- inputs (ids, positions, mask) are small uploads; logits come back to the host for sampling.

CUDA graphs are not used: the exported graphs concatenate the cache, so every decode step has
new shapes and a captured graph would be valid for one step only. A static-cache lowering
(fixed-capacity cache written in place) is the prerequisite; the plugin kernel is already
sync-free for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cscompile.decode.session import KVState, SessionBase
from cscompile.motifs.engine import Motif, StepStats
from cscompile.trt.lower import COUNTS_INPUT, RESIDUAL_PREFIX


@dataclass
class _Bound:
    engine: Any
    context: Any
    profile: int
    names: list[str]


class TrtEngine(SessionBase):
    """Dense engine (profiles prefill, decode) + optional sparse engine (decode, counts input)."""

    def __init__(
        self,
        dense: Any,
        sparse: Any | None,
        counts: dict[str, list[int]],
        block: int,
        topk: list[int],
        intermediate: int,
        num_layers: int,
        past: list[tuple[str, str]],
        present: list[tuple[str, str]],
        context: int,
        device: str = "cuda",
    ) -> None:
        """``device``: where the buffers live; ``"cpu"`` only for tests with a stand-in engine."""
        import torch

        self.torch = torch
        self.device = device
        self.stream = torch.cuda.Stream() if device == "cuda" else None
        self._handle = self.stream.cuda_stream if self.stream is not None else 0
        self.intermediate = intermediate
        self._layers = num_layers
        self.past, self.present = past, present
        self.context = context
        self.block, self.topk = block, topk
        self.counts = {k: torch.tensor(v, dtype=torch.int32, device=self.device) for k, v in counts.items()}
        self._counts_host = counts
        self.prefill = self._bind(dense, 0)
        self.decode = self._bind(dense, 1)
        self.sparse = self._bind(sparse, 0) if sparse is not None else None
        self.positions = torch.arange(context, dtype=torch.int64, device=self.device)[None]
        self.ones = torch.ones((1, context), dtype=torch.int64, device=self.device)
        self._residual_names = [
            n for n in (self.sparse.names if self.sparse else []) if n.startswith(RESIDUAL_PREFIX)
        ]
        kv = dense.get_tensor_shape(past[0][0])  # [batch, heads, past, head_dim]
        self.kv_shape = (int(kv[1]), int(kv[3]))
        if self.stream is not None:
            torch.cuda.synchronize()  # the tensors above were made on the default stream

    def _bind(self, engine: Any, profile: int) -> _Bound:
        ctx = engine.create_execution_context()
        ctx.set_optimization_profile_async(profile, self._handle)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        return _Bound(engine, ctx, profile, names)

    @property
    def num_layers(self) -> int:
        return self._layers

    def new_state(self, batch: int = 1) -> KVState:
        if batch != 1:
            raise ValueError("the TensorRT runner runs one sequence per state")
        torch = self.torch
        heads, hd = self.kv_shape
        size = heads * self.context * hd
        # per (layer, key|value): [buffer holding the past, buffer the next present goes to]
        bufs = [
            [torch.empty(size, dtype=torch.float32, device=self.device) for _ in range(2)]
            for _ in range(2 * self._layers)
        ]
        return KVState(batch=1, past=bufs, length=0, attention=np.zeros((1, 0), np.int64))

    def forward(
        self,
        input_ids: np.ndarray,
        state: KVState,
        motif: Motif | None = None,
        stats: StepStats | None = None,
        observe: Any = None,
    ) -> np.ndarray:
        torch = self.torch
        if observe is not None:
            raise ValueError("the TensorRT runner does not expose layer features (task-conditioned banks)")
        ids = np.ascontiguousarray(input_ids, np.int64)
        s, p = ids.shape[1], state.length
        if p + s > self.context:
            raise ValueError(f"{p + s} tokens exceed the engines' context of {self.context}")
        sparse = motif is not None and motif.name in self.counts and s == 1 and self.sparse is not None
        bound = self.sparse if sparse else (self.prefill if s > 1 else self.decode)
        assert bound is not None
        if self.stream is None:
            logits, residuals = self._run(bound, ids, state, motif, sparse)
        else:
            with torch.cuda.stream(self.stream):  # uploads, buffers and the engine on one stream
                logits, residuals = self._run(bound, ids, state, motif, sparse)
        state.length = p + s
        state.attention = np.ones((1, p + s), np.int64)
        if stats is not None and s == 1:
            if sparse and motif is not None:
                stats.residuals.extend(float(r) for r in residuals)
                counts = self._counts_host[motif.name]
                stats.executed.extend(
                    self.intermediate if k == 0 else min(c, k) * self.block for c, k in zip(counts, self.topk)
                )
            else:
                stats.executed.extend([self.intermediate] * self._layers)
        return logits

    def _run(
        self, bound: _Bound, ids: np.ndarray, state: KVState, motif: Motif | None, sparse: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        ctx = bound.context
        s, p = ids.shape[1], state.length
        heads, hd = self.kv_shape
        dev_ids = torch.from_numpy(ids).to(self.device)
        for name in bound.names:
            if name == "input_ids":
                ctx.set_input_shape(name, (1, s))
                ctx.set_tensor_address(name, dev_ids.data_ptr())
            elif name == "position_ids":
                ctx.set_input_shape(name, (1, s))
                ctx.set_tensor_address(name, self.positions[:, p:].data_ptr())
            elif name == "attention_mask":
                ctx.set_input_shape(name, (1, p + s))
                ctx.set_tensor_address(name, self.ones.data_ptr())
            elif name == COUNTS_INPUT:
                assert motif is not None
                ctx.set_input_shape(name, (self._layers,))
                ctx.set_tensor_address(name, self.counts[motif.name].data_ptr())
        for li, ((pk, pv), (ok, ov)) in enumerate(zip(self.past, self.present)):
            for j, (pin, pout) in enumerate(((pk, ok), (pv, ov))):
                src, dst = state.past[2 * li + j]
                ctx.set_input_shape(pin, (1, heads, p, hd))
                ctx.set_tensor_address(pin, src.data_ptr())
                ctx.set_tensor_address(pout, dst.data_ptr())
        logits = torch.empty(tuple(ctx.get_tensor_shape("logits")), dtype=torch.float32, device=self.device)
        ctx.set_tensor_address("logits", logits.data_ptr())
        residuals = torch.zeros(
            (len(self._residual_names) if sparse else 0, s), dtype=torch.float32, device=self.device
        )
        for i, name in enumerate(self._residual_names if sparse else []):
            ctx.set_tensor_address(name, residuals[i].data_ptr())
        if not ctx.execute_async_v3(self._handle):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
        if self.stream is not None:
            self.stream.synchronize()
        for pair in state.past:  # the present just written is the next step's past
            pair.reverse()
        return logits.cpu().numpy(), residuals[:, -1].cpu().numpy()
