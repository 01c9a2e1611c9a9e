"""What a TensorRT engine build needs, decided on any machine: precision, optimization profiles,
weight stripping, and the record a bundle keeps of the GPU and TensorRT it was built for.

Everything here is plain data computed from the ONNX graphs, so it is tested on CPU; only
:mod:`cscompile.trt.engine` calls TensorRT.

Profiles (one execution context each; TensorRT picks kernels per profile):

- dense engine: ``prefill`` — ``S`` from 1 to ``max_prompt`` tokens after a cache of 0 to
  ``context − 1`` tokens (chunked prompts and later turns); ``decode`` — one token after 0 to
  ``context − 1`` cached tokens, tuned at half the context.
- sparse engine: ``decode`` only (the method prefills dense; sparse motifs run decode steps).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import onnx

from cscompile.errors import UserError

PRECISIONS = ("fp16", "bf16", "fp32")
#: the tokens, positions and masks of the exported decoders, by input role
ROLES = {"input_ids": "tokens", "position_ids": "tokens", "attention_mask": "total"}


@dataclass
class Profile:
    name: str
    #: input name -> (min, opt, max) shapes
    shapes: dict[str, tuple[list[int], list[int], list[int]]]


@dataclass
class EngineSpec:
    name: str  # "dense" | "sparse"
    onnx: str  # the graph, relative to the bundle's trt/ directory
    precision: str
    profiles: list[Profile]
    strip_weights: bool = True  # refit from the bundle's weights at load: one copy on disk
    workspace_mb: int = 1024

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EngineSpec:
        profiles = [
            Profile(p["name"], {k: (list(v[0]), list(v[1]), list(v[2])) for k, v in p["shapes"].items()})
            for p in d["profiles"]
        ]
        return cls(
            d["name"], d["onnx"], d["precision"], profiles, bool(d["strip_weights"]), int(d["workspace_mb"])
        )


@dataclass
class TargetRecord:
    """What a TensorRT bundle was built for; loading elsewhere is refused with the rebuild command."""

    tensorrt: str
    gpu: str
    compute_capability: str  # "8.9"
    precision: str
    engines: list[EngineSpec] = field(default_factory=list)


def past_inputs(um: Any) -> set[str]:
    """The KV-cache input names of a unit map's layers (the ``past`` of :func:`profiles_for`)."""
    return {n for lay in um.layers for n in (lay.attention.past_key, lay.attention.past_value) if n}


def _role(name: str, past: set[str]) -> str:
    if name in ROLES:
        return ROLES[name]
    if name in past:
        return "past"
    return "static"


def _dims(inp: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]


def profiles_for(
    model: onnx.ModelProto, kind: str, max_prompt: int, context: int, past: set[str]
) -> list[Profile]:
    """Optimization profiles for every input of ``model`` (``kind``: ``dense`` or ``sparse``).

    ``past``: the names of the KV-cache inputs. A dynamic dimension the decoder interface does
    not explain is an error (TensorRT would need a range the build cannot choose).
    """
    if not 1 <= max_prompt <= context:
        raise UserError("--max-prompt", f"{max_prompt}", f"1 ≤ max prompt ≤ context ({context})")
    init = {t.name for t in model.graph.initializer}
    windows = {  # (tokens, past) ranges per profile: (min, opt, max)
        "prefill": ((1, min(128, max_prompt), max_prompt), (0, 0, context - 1)),
        "decode": ((1, 1, 1), (0, context // 2, context - 1)),
    }
    names = ["prefill", "decode"] if kind == "dense" else ["decode"]
    out = []
    for pname in names:
        (t0, t1, t2), (p0, p1, p2) = windows[pname]
        ranges = {
            "tokens": (t0, t1, t2),
            "past": (p0, p1, p2),
            "total": (max(1, t0 + p0), t1 + p1, min(context, t2 + p2)),
        }
        shapes: dict[str, tuple[list[int], list[int], list[int]]] = {}
        for inp in model.graph.input:
            if inp.name in init:
                continue
            dims = _dims(inp)
            role = _role(inp.name, past)
            lo, opt, hi = [], [], []
            for axis, d in enumerate(dims):
                if isinstance(d, int) and d > 0:
                    r = (d, d, d)
                elif axis == 0 and role != "static":  # batch: one sequence per context
                    r = (1, 1, 1)
                elif role == "tokens" and axis == 1:
                    r = ranges["tokens"]
                elif role == "total" and axis == 1:
                    r = ranges["total"]
                elif role == "past" and axis == 2:
                    r = ranges["past"]
                else:
                    raise UserError(
                        "TensorRT profiles",
                        f"input {inp.name} has a dynamic dimension {axis} ({d or '?'})",
                        "the decoder interface: [batch, tokens] ids/positions, [batch, total] mask, "
                        "[batch, heads, past, head_dim] cache",
                    )
                lo.append(r[0])
                opt.append(r[1])
                hi.append(r[2])
            shapes[inp.name] = (lo, opt, hi)
        out.append(Profile(pname, shapes))
    return out


def engine_specs(
    dense: onnx.ModelProto,
    sparse: onnx.ModelProto | None,
    past: set[str],
    precision: str = "fp16",
    max_prompt: int = 1024,
    context: int = 2048,
) -> list[EngineSpec]:
    if precision not in PRECISIONS:
        raise UserError("--trt-precision", f"'{precision}'", f"one of {', '.join(PRECISIONS)}")
    specs = [
        EngineSpec("dense", "dense.onnx", precision, profiles_for(dense, "dense", max_prompt, context, past))
    ]
    if sparse is not None:
        specs.append(
            EngineSpec(
                "sparse", "sparse.onnx", precision, profiles_for(sparse, "sparse", max_prompt, context, past)
            )
        )
    return specs
