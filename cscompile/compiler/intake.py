"""What a build reads from the user before any work: the model's files, its tokenizer, its I/O."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cscompile.errors import UserError

TOKENIZER_PREFIX = "tokenizer/"


#: Files taken from a model directory that has no ``tokenizer/`` subdirectory.
LOOSE_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
)


def source_paths(model: Path) -> tuple[Path, Path]:
    """``(source .onnx, model base directory)`` of a model directory or ``.onnx`` file."""
    model = Path(model).expanduser()
    if model.is_dir():
        onnx_path = model / "model.onnx"
        if not onnx_path.is_file():
            raise UserError(
                "model", f"directory {model} has no model.onnx", "a model directory or an .onnx file"
            )
        return onnx_path, model
    if not model.is_file():
        raise UserError("model", f"no file or directory at {model}", "a model directory or an .onnx file")
    if model.suffix != ".onnx":
        raise UserError("model", f"{model} is not an .onnx file", "a model directory or an .onnx file")
    return model, model.parent


def model_name(onnx_path: Path, base: Path) -> str:
    """A short name for the manifest's ``source.name``: the directory name, or the file's stem."""
    return onnx_path.stem if onnx_path.stem != "model" else (base.resolve().name or "model")


def tokenizer_files(tokenizer: Path | None, base: Path) -> dict[str, Path]:
    """``{bundle path: source file}`` of the tokenizer, checked by loading it once."""
    from cscompile.bundle.format import SEGMENT
    from cscompile.decode.tokenizer import Tokenizer

    if tokenizer is not None:
        tok_dir = Path(tokenizer).expanduser()
        if not tok_dir.is_dir():
            raise UserError("--tokenizer", f"no directory at {tok_dir}", "a Hugging Face tokenizer directory")
        names = sorted(p.name for p in tok_dir.iterdir())
    elif (base / "tokenizer").is_dir():
        tok_dir = base / "tokenizer"
        names = sorted(p.name for p in tok_dir.iterdir())
    else:
        tok_dir = base
        names = [n for n in LOOSE_TOKENIZER_FILES if (base / n).is_file()]
    if not (tok_dir / "tokenizer.json").is_file():
        raise UserError(
            "tokenizer",
            f"no tokenizer.json in {tok_dir}",
            "a model directory with tokenizer/ (as `cscompile model fetch` writes), or --tokenizer DIR",
        )
    Tokenizer(tok_dir)  # parse errors surface here, not when the bundle is loaded
    out: dict[str, Path] = {}
    for name in names:
        path = tok_dir / name
        if path.is_file() and not path.is_symlink() and SEGMENT.fullmatch(name) and not name.startswith("."):
            out[TOKENIZER_PREFIX + name] = path
    return out


def tensor_info(name: str, dims: Sequence[Any], dtype: str) -> Any:
    from cscompile.decode.spec import TensorInfo

    return TensorInfo(name, tuple(d if isinstance(d, int) else str(d) for d in dims), dtype)


def check_decoder_io(model: Any, label: str) -> None:
    """Raise the runtime's one-line error unless ``model`` (onnx-ir) has KV-cache decoder I/O."""
    from cscompile.decode.spec import DecoderSpec

    def info(values: Sequence[Any]) -> list[Any]:
        out = []
        for v in values:
            dims = list(v.shape) if v.shape is not None else []
            dtype = f"tensor({v.dtype.name.lower()})" if v.dtype is not None else "tensor(float)"
            out.append(tensor_info(v.name, [d if isinstance(d, int) else str(d) for d in dims], dtype))
        return out

    DecoderSpec.from_io(info(model.graph.inputs), info(model.graph.outputs), source=label)


def check_decoder_io_file(onnx_path: Path, label: str) -> None:
    """The same check from the protobuf alone; silent if the file does not even parse."""
    import onnx

    from cscompile.decode.spec import DecoderSpec

    try:
        proto = onnx.load(str(onnx_path), load_external_data=False)
    except Exception:  # noqa: BLE001 - the caller re-raises the parse error it already has
        return

    def info(values: Sequence[Any]) -> list[Any]:
        out = []
        for v in values:
            dims = [
                d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim
            ]
            out.append(tensor_info(v.name, dims, "tensor(float)"))
        return out

    DecoderSpec.from_io(info(proto.graph.input), info(proto.graph.output), source=label)


#: config.json soft-caps and where discovery records what the graph computes
_CONFIG_SOFTCAPS = (
    ("attn_logit_softcapping", "attention soft-cap"),
    ("final_logit_softcapping", "logit soft-cap"),
)


def check_config_matches_graph(base: Path, um: Any) -> None:
    """Refuse a graph that leaves out a soft-cap its ``config.json`` sets: the graph computes another
    model than the checkpoint (optimum's Gemma 2 export goes through transformers 4.x's SDPA
    attention, which has no soft-cap), so no engine built from it can match the source.
    """
    import json

    path = base / "config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(
            "model config", f"{path} is not a JSON object", "a transformers config.json"
        ) from None
    if not isinstance(cfg, dict):
        return
    text = cfg.get("text_config")
    cfg = text if isinstance(text, dict) else cfg
    for key, what in _CONFIG_SOFTCAPS:
        want = cfg.get(key)
        if not isinstance(want, (int, float)) or isinstance(want, bool) or not want:
            continue
        if key == "final_logit_softcapping":
            computed = [("the graph", um.logit_softcap)]
        else:
            computed = [(f"layer {x.index}", x.attention.attn_softcap) for x in um.layers]
        for where, got in computed:
            if got is None or abs(got - want) > 1e-4 * abs(want):
                says = "none" if got is None else f"{got:g}"
                raise UserError(
                    f"model config {path}",
                    f"{what} {want:g} ({key}), the graph computes {says} ({where})",
                    "a graph that computes its config's settings (re-export it; an exporter dropped it)",
                )
