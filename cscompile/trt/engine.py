"""TensorRT engine build and load (GPU only; ``tensorrt`` is imported inside the functions).

Written against the TensorRT 10 Python API (``tensorrt`` 10.8+; ``docs/gpu.md`` lists the calls
and the documentation they were checked against):

- build: ``Builder`` → ``create_network(0)`` (explicit batch is the only mode in 10.x) →
  ``OnnxParser.parse_from_file`` (external weights resolved beside the file; the plugin is
  registered first so the parser's plugin fallback finds ``cscompile::SparseFFN``) → builder
  config: precision flag (``FP16``/``BF16``; weak typing, deprecated but supported through 10.x),
  ``STRIP_PLAN`` + ``REFIT_IDENTICAL`` (a weight-stripped plan, refitted from the bundle's
  own weights at load: the bundle carries one copy of the weights, not one per engine), the
  timing cache, one optimization profile per :class:`~cscompile.trt.spec.Profile` →
  ``build_serialized_network``.
- load: ``Runtime.deserialize_cuda_engine`` → ``Refitter`` + ``OnnxParserRefitter.refit_from_file``
  on the graph the engine was built from → ``refit_cuda_engine``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cscompile.errors import UserError
from cscompile.hardware import gpu_problem
from cscompile.trt.spec import EngineSpec, TargetRecord

_LOGGER: Any = None
#: the runtimes that deserialized live engines (a TensorRT runtime must outlive its engines)
_RUNTIMES: list[Any] = []


def logger() -> Any:
    global _LOGGER
    import tensorrt as trt

    if _LOGGER is None:
        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


def require_gpu(what: str) -> None:
    """A one-line error, before any work, when TensorRT engines cannot be built or run here."""
    why = gpu_problem()
    if why is not None:
        raise UserError(
            what,
            f"this machine has no CUDA GPU with TensorRT ({why})",
            "an NVIDIA GPU machine with `pip install cscompile[trt]`, or --target cpu here",
        )


def current_target(precision: str) -> TargetRecord:
    """The TensorRT version and GPU of this machine (GPU only)."""
    import tensorrt as trt
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return TargetRecord(
        tensorrt=str(trt.__version__),
        gpu=str(torch.cuda.get_device_name(0)),
        compute_capability=f"{major}.{minor}",
        precision=precision,
    )


def check_target(recorded: TargetRecord, here: TargetRecord, rebuild: str) -> None:
    """Refuse to load engines built for another TensorRT version or GPU architecture.

    TensorRT plans are valid only for the TensorRT version and compute capability they were
    built with (no VERSION_COMPATIBLE / hardware-compatibility flags: those cost speed).
    """
    for field, label in (("tensorrt", "TensorRT"), ("compute_capability", "GPU compute capability")):
        want, got = getattr(recorded, field), getattr(here, field)
        if want != got:
            raise UserError(
                "TensorRT engines",
                f"built for {label} {want} ({recorded.gpu}), this machine has {got} ({here.gpu})",
                f"the same {label}, or a rebuild here: {rebuild}",
            )


def _errors(parser: Any) -> str:
    return "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))[:400]


def build_engine(onnx_path: Path, spec: EngineSpec, timing_cache: Path | None = None) -> bytes:
    """A serialized, weight-stripped engine for ``onnx_path`` (GPU only)."""
    import tensorrt as trt

    from cscompile.trt.plugin_qdp import register

    register()  # before parsing: the parser looks plugins up in the registry
    builder = trt.Builder(logger())
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger())
    if not parser.parse_from_file(str(onnx_path)):
        raise UserError(
            f"TensorRT parser on {onnx_path.name}", _errors(parser), "a graph TensorRT 10 imports"
        )
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec.workspace_mb << 20)
    if spec.precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif spec.precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    if spec.strip_weights:
        config.set_flag(trt.BuilderFlag.STRIP_PLAN)
        config.set_flag(trt.BuilderFlag.REFIT_IDENTICAL)
    cache_bytes = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, False)  # (cache, ignore_mismatch)
    for p in spec.profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in p.shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UserError(f"TensorRT build of {spec.name}", "the builder returned no engine (see its log above)",
                        "a graph and profiles TensorRT can build on this GPU")  # fmt: skip
    if timing_cache is not None:
        tmp = timing_cache.with_suffix(".tmp")
        tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
        tmp.replace(timing_cache)
    return bytes(plan)


def load_engine(plan: bytes, onnx_path: Path, stripped: bool) -> Any:
    """Deserialize ``plan`` and refit it from ``onnx_path`` (the graph it was built from)."""
    import tensorrt as trt

    from cscompile.trt.plugin_qdp import register

    register()  # JIT plugins must be registered before deserialization
    if not _RUNTIMES:
        _RUNTIMES.append(trt.Runtime(logger()))
    engine = _RUNTIMES[0].deserialize_cuda_engine(plan)
    if engine is None:
        raise UserError("TensorRT engine", "it could not be deserialized", "an engine built by this TensorRT")
    if stripped:
        refitter = trt.Refitter(engine, logger())
        parser_refitter = trt.OnnxParserRefitter(refitter, logger())
        if not parser_refitter.refit_from_file(str(onnx_path)):
            raise UserError(f"TensorRT refit from {onnx_path.name}", _errors(parser_refitter),
                            "the graph and weights the engine was built from")  # fmt: skip
        missing = refitter.get_missing_weights()
        if missing or not refitter.refit_cuda_engine():
            raise UserError(
                "TensorRT refit", f"weights missing: {list(missing)[:5]}", "every weight of the graph"
            )
    return engine
