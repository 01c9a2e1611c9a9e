"""The ``cscompile::SparseFFN`` TensorRT plugin: a quickly-deployable Python plugin (QDP).

Why QDP with a torch kernel, not IPluginV3 in C++/CUDA: a fresh ``pip install cscompile[trt]``
must work without a CUDA toolchain, and the lowering must be testable on machines without a
GPU. A QDP is registered from Python (``tensorrt.plugin``, TensorRT ≥ 10.6), its kernel
(:func:`sparse_ffn_torch`) is plain torch, so the very function the engine calls is tested on
CPU against the numpy reference. The price: the plugin runs Python at every enqueue (JIT QDP),
so an engine needs this module imported before it is deserialized, and ``trtexec`` cannot run
it. The upgrade path is an ahead-of-time Triton kernel (``@trtp.aot_impl``, TensorRT ≥ 10.9),
which embeds PTX in the engine; the semantics and the tests stay.

No ``@trtp.autotune``: the plugin keeps the network's types (fp32 I/O) and TensorRT inserts the
casts around it in fp16/bf16 engines (``__cuda_array_interface__`` of a bf16 ``trtp.Tensor``
raises, so fp32 I/O is also the form that works for every engine precision).

This module must not use ``from __future__ import annotations``: QDP validates the decorated
functions' annotations as objects.
"""

from typing import Any

from cscompile.trt.plugin_ffn import QUALIFIED_NAME

_registered: Any = None


def sparse_ffn_torch(x, scores, indices, count, gate, up, down, block: int):  # noqa: ANN001, ANN201
    """The plugin's kernel in torch (any device): ``(y [B, S, H], residual [B, S])``.

    Sync-free (``count`` stays on the device: every one of the ``K`` indexed blocks is computed
    and those past ``count`` are masked), so it can sit inside a CUDA-graph capture.
    """
    import torch

    b, s, _ = x.shape
    k = indices.shape[-1]
    dev = x.device
    ch = (indices.long().unsqueeze(-1) * block + torch.arange(block, device=dev)).reshape(b, s, k * block)
    keep = (torch.arange(k, device=dev) < count.reshape(()).long()).repeat_interleave(block).to(x.dtype)
    g = torch.einsum("bsh,bskh->bsk", x, gate.t()[ch])
    u = torch.einsum("bsh,bskh->bsk", x, up.t()[ch])
    a = torch.nn.functional.silu(g) * u * keep
    y = torch.einsum("bsk,bskh->bsh", a, down[ch])
    d = (a.abs() - torch.gather(scores, -1, ch)) * keep
    num, den = (d * d).sum(-1), (a * a).sum(-1)
    res = torch.where(
        den > 0, torch.sqrt(num / den.clamp_min(torch.finfo(den.dtype).tiny)), torch.zeros_like(den)
    )
    return y, res


def register() -> Any:
    """Register the plugin with TensorRT's plugin registry (idempotent); returns ``tensorrt.plugin``."""
    global _registered
    if _registered is not None:
        return _registered
    from typing import Tuple  # noqa: UP035 - QDP checks the return annotation's type

    import tensorrt.plugin as trtp
    import torch

    @trtp.register(QUALIFIED_NAME)
    def sparse_ffn_desc(
        x: trtp.TensorDesc,
        scores: trtp.TensorDesc,
        indices: trtp.TensorDesc,
        count: trtp.TensorDesc,
        gate: trtp.TensorDesc,
        up: trtp.TensorDesc,
        down: trtp.TensorDesc,
        block: int,
    ) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:  # noqa: UP006
        residual = trtp.from_shape_expr((x.shape_expr[0], x.shape_expr[1]), dtype=x.dtype)
        return x.like(), residual

    @trtp.impl(QUALIFIED_NAME)
    def sparse_ffn_impl(
        x: trtp.Tensor,
        scores: trtp.Tensor,
        indices: trtp.Tensor,
        count: trtp.Tensor,
        gate: trtp.Tensor,
        up: trtp.Tensor,
        down: trtp.Tensor,
        block: int,
        outputs: Tuple[trtp.Tensor, trtp.Tensor],  # noqa: UP006
        stream: int,
    ) -> None:
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            xt, st, it, ct, gt, ut, dt = (
                torch.as_tensor(v, device="cuda") for v in (x, scores, indices, count, gate, up, down)
            )
            y, res = sparse_ffn_torch(xt, st, it, ct, gt, ut, dt, int(block))
            torch.as_tensor(outputs[0], device="cuda").copy_(y)
            torch.as_tensor(outputs[1], device="cuda").copy_(res)

    _registered = trtp
    return trtp
