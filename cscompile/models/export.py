"""Export a transformers Llama-family model to a KV-cache decoder ONNX, verified against PyTorch.

The export is ours (:mod:`cscompile.models.torch_decoder`); after tracing, one graph fix-up
runs: the tracer folds ``embed.T`` into a second 113 MB initializer for a tied LM head, so we
point the head back at the embedding (``Gemm(transB=1)``), which keeps the tie visible to the
passes and the file 17% smaller.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from cscompile.errors import UserError, require

#: Bumped whenever the exported graph changes shape; part of the cache key.
EXPORT_RECIPE = 1


def retie_lm_head(path: Path) -> bool:
    """Rewrite ``MatMul(x, E^T)`` with a constant ``E^T`` equal to the embedding into ``Gemm(x, E, transB=1)``.

    Returns whether the graph changed. Rules:

    1. The embedding is the initializer read by the ``Gather`` on ``input_ids``.
    2. A candidate is a ``MatMul`` whose second input is an initializer of the transposed
       shape whose values equal the embedding's transpose exactly, and whose first input is 2-D.
    3. The MatMul is replaced by a Gemm on the embedding; the copy is dropped.
    """
    import onnx_ir as ir

    model = ir.load(str(path))
    graph = model.graph
    ids = next((v for v in graph.inputs if v.name == "input_ids"), None)
    if ids is None:
        return False
    gathers = [n for n, _ in ids.uses() if n.op_type == "Gather"]
    if not gathers:
        return False
    emb_val = gathers[0].inputs[0]
    if emb_val is None or emb_val.const_value is None:
        return False
    emb = emb_val.const_value.numpy()
    changed = False
    for node in list(graph):
        if node.op_type != "MatMul":
            continue
        w = node.inputs[1]
        if w is None or w.const_value is None or w is emb_val:
            continue
        if tuple(w.shape or ()) != emb.shape[::-1]:
            continue
        if not np.array_equal(w.const_value.numpy(), emb.T):
            continue
        gemm = ir.node("Gemm", inputs=[node.inputs[0], emb_val], attributes={"transB": 1})
        old_out = node.outputs[0]
        graph.insert_after(node, gemm)
        if old_out.type is not None and old_out.dtype is not None:
            gemm.outputs[0].dtype = old_out.dtype
            gemm.outputs[0].shape = old_out.shape
        old_out.replace_all_uses_with(gemm.outputs[0], replace_graph_outputs=True)
        graph.remove(node, safe=True)
        gemm.outputs[0].name = old_out.name
        if not w.uses() and w.name is not None:
            graph.initializers.pop(w.name, None)
        changed = True
    if changed:
        ir.save(model, str(path))
    return changed


def export_hf_model(hf_model: Any, out_path: Path, probe_ids: list[int] | None = None) -> dict[str, Any]:
    """Export ``hf_model`` to ``out_path`` and check ORT logits against PyTorch's.

    Returns a report with the largest absolute logit difference on a probe prompt
    (prefill and one cached decode step).
    """
    torch = require("torch", "export", "exporting a model to ONNX")
    from cscompile.models.torch_decoder import DecoderConfig, export_onnx, from_hf

    model = from_hf(hf_model)
    export_onnx(model, str(out_path))
    retied = retie_lm_head(out_path)
    cfg: DecoderConfig = model.cfg  # type: ignore[assignment]
    ids = probe_ids or [1, 2, 3, 5, 8, 13, 21, 34]
    ids = [i % cfg.vocab_size for i in ids]
    diff, scale = _probe_difference(hf_model, out_path, ids, torch)
    if not diff <= PROBE_REL * max(scale, 1.0):
        raise UserError(
            f"export of {getattr(hf_model.config, 'model_type', '?')}",
            f"the exported graph's logits differ from transformers' by {diff:.3g} (logit scale {scale:.3g}) "
            f"on a {len(ids)}-token probe",
            f"agreement within {PROBE_REL:g} of the logit scale (report this model to cscompile)",
        )
    return {"max_abs_logit_diff": diff, "lm_head_retied": retied, "config": cfg.to_dict()}


#: the export's probe must agree with transformers within this fraction of the logit scale (fp32
#: exports measure 1e-7 to 1e-6 of it; a setting the export leaves out is of order 1)
PROBE_REL = 1e-3


def _probe_difference(hf_model: Any, onnx_path: Path, ids: list[int], torch: Any) -> tuple[float, float]:
    """Max |logit| difference between transformers and ORT, prefill plus one cached step, and the
    largest |logit| of transformers' (the scale).
    """
    from cscompile.decode.session import DecoderSession

    sess = DecoderSession(onnx_path, threads=min(2, os.cpu_count() or 1))
    with torch.no_grad():
        full = torch.tensor([ids])
        ref = hf_model(full).logits[0].float().numpy()  # [S, V]
    state = sess.new_state(batch=1)
    pre = sess.forward(np.array([ids[:-1]], np.int64), state)  # [1, S-1, V]
    step = sess.forward(np.array([ids[-1:]], np.int64), state)  # [1, 1, V]
    got = np.concatenate([pre[0], step[0]], axis=0)
    return float(np.abs(got - ref).max()), float(np.abs(ref).max())


def export_with_transformers(hf_model: Any, out_dir: Path) -> Path:
    """Export with transformers' own ``OnnxExporter`` (torch.export + dynamo) instead of ours.

    The second exporter the passes and the runtime are tested against: different op patterns
    (``Transpose(E)`` for the tied head, ``Expand`` for GQA, ``Reciprocal`` in RMSNorm), different
    I/O names (``input.past_key_values.layers.N.keys``), weights in ``model.onnx.data``.
    Returns the path of ``model.onnx``.
    """
    torch = require("torch", "export", "exporting a model to ONNX")
    transformers = require("transformers", "export", "exporting a model to ONNX")
    from transformers.exporters.exporter_onnx import OnnxConfig, OnnxExporter

    from cscompile.model_config import check_rope_scaling

    cfg = hf_model.config
    check_rope_scaling(cfg.to_dict(), "model config")  # the trace would hold one length's table
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    # A full cache on every layer: with the config, transformers gives sliding-window layers a cache
    # cut to the window plus a `_sliding_window_tensor` input, which a growing KV cache (ours, and
    # the attention mask's length) does not follow; the window stays in the traced mask.
    cache = transformers.DynamicCache()
    for i in range(cfg.num_hidden_layers):  # a non-empty past, so the graph takes cache inputs
        cache.update(torch.zeros(1, kv, 3, head_dim), torch.zeros(1, kv, 3, head_dim), i)
    inputs = {
        "input_ids": torch.tensor([[5, 6, 7, 8]]),
        "attention_mask": torch.ones(1, 7, dtype=torch.long),
        "position_ids": torch.tensor([[3, 4, 5, 6]]),
        "past_key_values": cache,
    }
    exported = OnnxExporter().export(hf_model, inputs, config=OnnxConfig(dynamic=True))
    exported.save_pretrained(str(out_dir))
    return Path(out_dir) / "model.onnx"
