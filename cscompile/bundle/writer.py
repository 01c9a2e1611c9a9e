"""Write bundles: validated first, staged in a temporary sibling, renamed into place when complete.

The output is deterministic: the same inputs give a byte-identical ``manifest.json`` and, for
the archive form, a byte-identical tar (sorted members, mtime 0, uid/gid 0, empty owner
names, mode 0o644 for files and 0o755 for directories). No timestamps anywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cscompile import scratch
from cscompile.bundle.format import (
    ARCHIVE_SUFFIX,
    FORMAT,
    MANIFEST_NAME,
    MAX_ARCHIVE_MEMBERS,
    SCHEMA_VERSION,
    BundleError,
    canonical_manifest_bytes,
    check_rel_path,
    parent_dirs,
    short,
    validate_manifest,
)
from cscompile.bundle.loader import check_bundle_dir, content_hash
from cscompile.cache import atomic_dir, atomic_write_json, sha256_file


@dataclass(frozen=True)
class BundleInfo:
    """What :func:`write_bundle` produced."""

    path: Path
    archive: bool
    content_hash: str
    manifest: dict[str, Any]
    files: int
    total_bytes: int


def _created_by() -> dict[str, str]:
    import onnxruntime

    import cscompile

    return {"cscompile": cscompile.__version__, "onnxruntime": str(onnxruntime.__version__)}


def _check_sources(files: Any, label: str) -> dict[str, Path | bytes]:
    """Validate the ``files`` mapping: safe relative keys, values that are existing files or bytes."""
    subject = f"write_bundle {label}: files"
    if not isinstance(files, Mapping):
        raise BundleError(
            subject, f"got a {type(files).__name__}", "a mapping of relative path -> Path or bytes"
        )
    out: dict[str, Path | bytes] = {}
    for rel, src in files.items():
        check_rel_path(rel, f"{subject} key")
        where = f"{subject}[{rel!r}]"
        if rel == MANIFEST_NAME:
            raise BundleError(
                where, "is the manifest's own name", "data files only (the manifest is written for you)"
            )
        if isinstance(src, (bytes, bytearray, memoryview)):
            out[rel] = bytes(src)
        elif isinstance(src, os.PathLike):
            path = Path(src)
            try:
                st = os.stat(path)
            except OSError as exc:
                raise BundleError(
                    where, f"source {path} cannot be read ({exc.strerror or exc})", "an existing regular file"
                ) from None
            if not stat.S_ISREG(st.st_mode):
                raise BundleError(where, f"source {path} is not a regular file", "an existing regular file")
            out[rel] = path
        else:
            raise BundleError(where, f"got a {type(src).__name__} ({short(src, 40)})", "a Path or bytes")
    return out


def check_out(out: Path, archive: bool) -> None:
    """Refuse to replace anything at ``out`` that is not a bundle of the same form (or empty)."""
    subject = f"write_bundle output {out}"
    if out.name in ("", ".", ".."):
        raise BundleError(subject, "has no file name", "a path such as out/model.csb or out/model-bundle")
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise BundleError(
            subject, "is a symbolic link", "a real path (the link would be replaced, not its target)"
        )
    if archive:
        if stat.S_ISDIR(st.st_mode):
            raise BundleError(
                subject, "is an existing directory", "a file path for the archive (or archive=False)"
            )
        if st.st_size and not (out.suffix == ARCHIVE_SUFFIX or tarfile.is_tarfile(out)):
            raise BundleError(
                subject, "exists and is not a bundle archive", "a new path, or an old bundle to replace"
            )
        return
    if not stat.S_ISDIR(st.st_mode):
        raise BundleError(subject, "exists and is not a directory", "a directory path (or archive=True)")
    if any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
        raise BundleError(
            subject,
            "is a non-empty directory that is not a bundle (no manifest.json)",
            "a new or empty directory",
        )


def _draft_manifest(
    files: Mapping[str, dict[str, Any]],
    engines: Any,
    source: Any,
    requires: Any,
    tokenizer: Any,
    sections: Any,
) -> dict[str, Any]:
    if isinstance(engines, (list, tuple)):
        engines = [
            {"params": {}, "profile": {}, **e} if isinstance(e, Mapping) else e for e in engines
        ]  # params/profile default to empty
    manifest = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "created_by": _created_by(),
        "requires": requires,
        "source": source,
        "files": dict(files),
        "engines": engines,
        "tokenizer": tokenizer,
        "sections": sections,
    }
    return json.loads(canonical_manifest_bytes(manifest))  # tuples -> lists, exactly what a reader sees


def _stage(
    tmp: Path, sources: Mapping[str, Path | bytes], draft: dict[str, Any], label: str
) -> dict[str, Any]:
    """Write the files and the manifest into ``tmp`` and validate the result as the loader would."""
    entries: dict[str, dict[str, Any]] = {}
    for rel in sorted(sources):
        dest = tmp / rel
        for d in parent_dirs(rel):
            (tmp / d).mkdir(exist_ok=True)
            os.chmod(tmp / d, 0o755)
        src = sources[rel]
        if isinstance(src, bytes):
            with open(dest, "xb") as f:
                f.write(src)
        else:
            shutil.copyfile(src, dest)
        os.chmod(dest, 0o644)
        entries[rel] = {"sha256": sha256_file(dest), "size": dest.stat().st_size}
    manifest = {**draft, "files": entries}
    validate_manifest(manifest, label)
    atomic_write_json(tmp / MANIFEST_NAME, manifest)  # same bytes as canonical_manifest_bytes
    check_bundle_dir(tmp, label, hash_files=False)  # tree, sizes, ONNX opsets and external data
    return manifest


def _write_tar(f: Any, stage: Path, manifest: Mapping[str, Any]) -> None:
    files = set(manifest["files"]) | {MANIFEST_NAME}
    dirs = {d for rel in files for d in parent_dirs(rel)}
    with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name in sorted(files | dirs):
            info = tarfile.TarInfo(name)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if name in dirs:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(info)
            else:
                info.type, info.mode = tarfile.REGTYPE, 0o644
                info.size = (stage / name).stat().st_size
                with open(stage / name, "rb") as src:
                    tf.addfile(info, src)


def write_bundle(
    out: Path | str,
    *,
    files: Mapping[str, Path | bytes],
    engines: list[dict[str, Any]],
    source: dict[str, Any],
    requires: dict[str, Any],
    tokenizer: str | None,
    sections: dict[str, str],
    archive: bool | None = None,
) -> BundleInfo:
    """Write a bundle directory (or ``.csb`` archive when ``archive``, default: ``out`` ends in .csb).

    Everything is validated before the first byte is copied. The bundle is built in a
    temporary sibling of ``out`` and renamed into place only when complete: a failure or an
    interrupt leaves ``out`` as it was (absent, or the previous bundle) and no temporary files.
    """
    out = Path(out)
    archive = out.name.endswith(ARCHIVE_SUFFIX) if archive is None else archive
    label = str(out)
    sources = _check_sources(files, label)
    placeholder = {rel: {"sha256": "0" * 64, "size": 0} for rel in sources}
    draft = _draft_manifest(placeholder, engines, source, requires, tokenizer, sections)
    validate_manifest(draft, label)
    check_out(out, archive)
    if archive:
        members = len(sources) + 1 + len({d for rel in sources for d in parent_dirs(rel)})
        if members > MAX_ARCHIVE_MEMBERS:
            raise BundleError(
                f"write_bundle {label}", f"needs {members} archive members", f"at most {MAX_ARCHIVE_MEMBERS}"
            )
        manifest = _write_archive(out, sources, draft, label)
    else:
        with atomic_dir(out) as tmp:
            manifest = _stage(tmp, sources, draft, label)
    return BundleInfo(
        path=out,
        archive=archive,
        content_hash=content_hash(manifest),
        manifest=manifest,
        files=len(manifest["files"]),
        total_bytes=sum(e["size"] for e in manifest["files"].values()),
    )


def _write_archive(out: Path, sources: Mapping[str, Path | bytes], draft: dict[str, Any], label: str) -> dict:
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch.sweep(out.parent, f".{out.name}.tmp-")  # what killed builds left behind
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp_file: str | None = None
    try:
        scratch.hold(stage)
        manifest = _stage(stage, sources, draft, label)
        fd, tmp_file = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
        scratch.hold(tmp_file)
        with os.fdopen(fd, "wb") as f:
            _write_tar(f, stage, manifest)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_file, 0o644)
        os.replace(tmp_file, out)
        scratch.release(tmp_file)
        tmp_file = None
        return manifest
    finally:
        if tmp_file is not None:
            scratch.remove(tmp_file)
        scratch.remove(stage)
