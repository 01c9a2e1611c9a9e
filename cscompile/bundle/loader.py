"""Open and verify bundles. Nothing in a bundle is used before it has been checked.

Directory form: read and type-check ``manifest.json``, check the requirements against this
machine, walk the tree with ``lstat`` (no symlinks, devices or unlisted files), compare sizes,
hash every file (chunked, opened with ``O_NOFOLLOW``), then parse every ``.onnx`` file and check
its opset imports and external-data locations.

Archive form (``.csb``, uncompressed POSIX tar): every member header is validated before any
byte is extracted (type, name, duplicates, count, sizes against the archive's length), the
manifest is read from the tar and checked, the member list is compared with the manifest, and
only then are the listed files copied, hashed on the way, into a private ``mkdtemp``
directory that :meth:`Bundle.close` (or the context manager, or a finalizer) removes.
tarfile's own extraction is never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import posixpath
import stat
import tarfile
import tempfile
import weakref
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from cscompile import scratch
from cscompile.bundle.format import (
    MANIFEST_NAME,
    MAX_ARCHIVE_MEMBERS,
    MAX_FILE_BYTES,
    MAX_FILES,
    MAX_MANIFEST_BYTES,
    MAX_TOTAL_BYTES,
    BundleError,
    canonical_manifest_bytes,
    check_environment,
    check_rel_path,
    parent_dirs,
    parse_json,
    short,
    show,
    validate_manifest,
)

#: name prefix of an archive's private extraction directory (in the system temp directory)
EXTRACT_PREFIX = "cscompile-bundle-"
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_BINARY = getattr(os, "O_BINARY", 0)
_CHUNK = 1 << 20
MAX_WALK_ENTRIES = 2 * MAX_FILES + 64
MAX_NPZ_MEMBERS = 4096
_REBUILD = "the file as built (the bundle is corrupt or was modified; rebuild or re-copy it)"
_TAR_TYPES = {
    tarfile.SYMTYPE: "symbolic link",
    tarfile.LNKTYPE: "hard link",
    tarfile.CHRTYPE: "character device",
    tarfile.BLKTYPE: "block device",
    tarfile.FIFOTYPE: "FIFO",
    tarfile.CONTTYPE: "contiguous file",
    tarfile.GNUTYPE_SPARSE: "sparse file",
}


@dataclass(frozen=True)
class Engine:
    """One engine of a bundle; ``path`` is the verified ONNX file."""

    name: str
    file: str
    kind: str
    params: dict[str, Any]
    profile: dict[str, Any]
    path: Path


@dataclass(frozen=True)
class VerifyReport:
    """What :func:`verify_bundle` checked."""

    path: Path
    archive: bool
    files_checked: int
    bytes_hashed: int
    engines: tuple[str, ...]
    target: str
    content_hash: str
    #: the manifest's engine entries and the ``build`` section (``None`` if the bundle has none)
    engine_entries: tuple[dict[str, Any], ...] = ()
    build: dict[str, Any] | None = None

    def summary(self) -> str:
        """One line for the CLI."""
        form = "archive" if self.archive else "directory"
        return (
            f"bundle {self.path} ({form}) OK: {self.files_checked} files, {self.bytes_hashed} bytes hashed, "
            f"engines {', '.join(self.engines) or '-'}, target {self.target}, content {self.content_hash[:16]}"
        )


@dataclass(frozen=True, eq=False)
class Bundle:
    """A verified bundle. ``root`` is a directory to read files from (a private copy for archives)."""

    root: Path
    manifest: dict[str, Any] = field(repr=False)
    engines: tuple[Engine, ...] = field(repr=False)
    content_hash: str
    source: Path
    archive: bool
    _cleanup: Any = field(default=None, repr=False)

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        """``{relative path: {"sha256", "size"}}`` as listed (and verified)."""
        return self.manifest["files"]

    @property
    def sections(self) -> dict[str, str]:
        return self.manifest["sections"]

    @property
    def tokenizer_dir(self) -> Path | None:
        """The tokenizer directory, or None if the bundle has no tokenizer."""
        tok = self.manifest["tokenizer"]
        self._check_open()
        return None if tok is None else self.root / tok.rstrip("/")

    @property
    def closed(self) -> bool:
        return self._cleanup is not None and not self._cleanup.alive

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError(f"bundle {self.source} is closed (its extracted files were removed)")

    def path_of(self, rel: str) -> Path:
        """Absolute path of a listed file; unlisted paths are refused."""
        self._check_open()
        if not isinstance(rel, str) or rel not in self.manifest["files"]:
            raise BundleError(
                f"bundle {self.source}",
                f"has no listed file {short(rel)}",
                "one of the files in its manifest",
            )
        return self.root / rel

    def section_path(self, name: str) -> Path:
        """Path of the file of a named section (``unit_map``, ``controller``, ...)."""
        if name not in self.sections:
            raise BundleError(
                f"bundle {self.source}", f"has no section {short(name)}", f"one of {sorted(self.sections)}"
            )
        return self.path_of(self.sections[name])

    def engine(self, name: str) -> Engine:
        """The engine called ``name``."""
        for eng in self.engines:
            if eng.name == name:
                return eng
        raise BundleError(
            f"bundle {self.source}",
            f"has no engine {short(name)}",
            f"one of {[e.name for e in self.engines]}",
        )

    def read_bytes(self, rel: str) -> bytes:
        """Content of a listed file."""
        with _open_nofollow(self.path_of(rel), f"bundle {self.source}: {rel}") as f:
            return f.read()

    def read_json(self, rel: str) -> Any:
        """Parse a listed JSON file (strict: no duplicate keys, no NaN)."""
        return parse_json(self.read_bytes(rel), f"bundle {self.source}: {rel}")

    def read_npz(self, rel: str) -> dict[str, np.ndarray]:
        """Load every array of a listed ``.npz`` (``allow_pickle=False``; sizes checked before allocation)."""
        path = self.path_of(rel)
        subject = f"bundle {self.source}: {rel}"
        with (
            _open_nofollow(path, subject) as f,
            _parsing(subject, "is not a valid .npz archive", "numpy arrays"),
        ):
            return _read_npz(f, subject)

    def close(self) -> None:
        """Remove the extracted copy of an archive bundle (no-op for the directory form)."""
        if self._cleanup is not None:
            self._cleanup()

    def __enter__(self) -> Bundle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class _Stats:
    files: int = 0
    bytes_hashed: int = 0


def open_bundle(path: Path | str, *, check_requires: bool = True) -> Bundle:
    """Open a bundle directory or ``.csb`` archive after checking every file; raise :class:`BundleError`.

    ``check_requires=False`` skips the "can this machine run it" checks (onnxruntime version,
    opset, target) for tools that only inspect bundles.
    """
    return _open(path, check_requires)[0]


def verify_bundle(path: Path | str, *, check_requires: bool = True) -> VerifyReport:
    """Run every check :func:`open_bundle` runs and return a summary; raise on the first problem."""
    bundle, stats = _open(path, check_requires)
    with bundle:
        return VerifyReport(
            path=bundle.source,
            archive=bundle.archive,
            files_checked=stats.files,
            bytes_hashed=stats.bytes_hashed,
            engines=tuple(e.name for e in bundle.engines),
            target=bundle.manifest["requires"]["target"],
            content_hash=bundle.content_hash,
            engine_entries=tuple(bundle.manifest["engines"]),
            build=bundle.read_json(bundle.sections["build"]) if "build" in bundle.sections else None,
        )


def check_bundle_dir(root: Path, label: str, *, hash_files: bool = True) -> dict[str, Any]:
    """Validate a directory bundle in place (used by the writer on its staging directory)."""
    manifest = _read_dir_manifest(root, label)
    validate_manifest(manifest, label)
    _check_tree(root, manifest["files"], label)
    if hash_files:
        _hash_tree(root, manifest["files"], label, _Stats())
    _check_payload(root, manifest, label)
    return manifest


# -- shared helpers ---------------------------------------------------------------------------


@contextlib.contextmanager
def _parsing(subject: str, received: str, expected: str) -> Iterator[None]:
    """Turn any failure of a third-party parser (tarfile, onnx, numpy, zipfile) into a BundleError.

    Their failure modes on corrupt input are not a closed set of exception types; only our own
    BundleError and non-Exception signals (KeyboardInterrupt) pass through unchanged.
    """
    try:
        yield
    except BundleError:
        raise
    except Exception as exc:
        detail = short(f"{type(exc).__name__}: {exc}", 120)
        raise BundleError(subject, f"{received} ({detail})", expected) from None


def _open_nofollow(path: Path, subject: str) -> IO[bytes]:
    """Open a regular file for reading without following a symlink at its last component."""
    try:
        fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_BINARY)
    except OSError as exc:
        raise BundleError(
            subject, f"cannot be opened ({exc.strerror or exc})", "a readable regular file"
        ) from None
    f = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise BundleError(subject, "is not a regular file", "a regular file")
    return f


def _hash_file(path: Path, declared: int, subject: str) -> tuple[str, int]:
    """sha256 and length of a file, reading at most ``declared + 1`` bytes in chunks."""
    h = hashlib.sha256()
    n = 0
    with _open_nofollow(path, subject) as f:
        while n <= declared and (block := f.read(min(_CHUNK, declared + 1 - n))):
            h.update(block)
            n += len(block)
    return h.hexdigest(), n


def _size_error(subject: str, actual: int, declared: int) -> BundleError:
    return BundleError(subject, f"is {actual} bytes but the manifest lists {declared}", _REBUILD)


def _hash_error(subject: str, actual: str, declared: str) -> BundleError:
    # as many digits as it takes to tell the two apart (a mismatch after digit 16 shows)
    n = next((i for i, (a, b) in enumerate(zip(actual, declared)) if a != b), min(len(actual), len(declared)))
    n = max(16, n + 4)
    a, d = (h[:n] + ("…" if len(h) > n else "") for h in (actual, declared))
    return BundleError(subject, f"has sha256 {a} but the manifest lists {d}", _REBUILD)


def _validate(manifest: Any, label: str, check_requires: bool) -> None:
    validate_manifest(manifest, label)
    if check_requires:
        check_environment(manifest["requires"], label)


def _make_bundle(root: Path, manifest: dict[str, Any], source: Path, tmp: Path | None) -> Bundle:
    engines = tuple(
        Engine(e["name"], e["file"], e["kind"], e["params"], e["profile"], root / e["file"])
        for e in manifest["engines"]
    )
    bundle = Bundle(root, manifest, engines, content_hash(manifest), source, archive=tmp is not None)
    if tmp is not None:
        object.__setattr__(bundle, "_cleanup", weakref.finalize(bundle, scratch.remove, tmp))
    return bundle


def _open(path: Path | str, check_requires: bool) -> tuple[Bundle, _Stats]:
    source = Path(path)
    label = str(source)
    subject = f"bundle {label}"
    try:
        st = os.stat(source)
    except FileNotFoundError:
        raise BundleError(
            subject, "does not exist", "a bundle directory or .csb file written by cscompile build"
        ) from None
    except (OSError, ValueError) as exc:
        raise BundleError(
            subject, f"cannot be read ({getattr(exc, 'strerror', None) or exc})", "a readable bundle"
        ) from None
    stats = _Stats()
    if stat.S_ISDIR(st.st_mode):
        root = source.resolve()
        manifest = _read_dir_manifest(root, label)
        _validate(manifest, label, check_requires)
        _check_tree(root, manifest["files"], label)
        _hash_tree(root, manifest["files"], label, stats)
        _check_payload(root, manifest, label)
        return _make_bundle(root, manifest, source, None), stats
    if stat.S_ISREG(st.st_mode):
        return _open_archive(source, label, check_requires, stats), stats
    raise BundleError(subject, "is neither a directory nor a regular file", "a bundle directory or .csb file")


# -- directory form ---------------------------------------------------------------------------


def _read_dir_manifest(root: Path, label: str) -> Any:
    path = root / MANIFEST_NAME
    subject = f"bundle {label}"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise BundleError(
            subject, "is not a bundle (no manifest.json)", "a directory written by cscompile build"
        ) from None
    except OSError as exc:
        raise BundleError(
            subject, f"manifest.json cannot be read ({exc.strerror or exc})", "a readable file"
        ) from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
        raise BundleError(f"{subject}: manifest.json", "is not a regular file (a symlink?)", "a regular file")
    if st.st_size > MAX_MANIFEST_BYTES:
        raise BundleError(
            f"{subject}: manifest.json",
            f"is {st.st_size} bytes",
            f"at most {MAX_MANIFEST_BYTES} bytes (4 MiB)",
        )
    with _open_nofollow(path, f"{subject}: manifest.json") as f:
        data = f.read(MAX_MANIFEST_BYTES + 1)
    if len(data) > MAX_MANIFEST_BYTES:
        raise BundleError(f"{subject}: manifest.json", "grew while being read", "a stable file")
    return parse_json(data, f"{subject}: manifest.json")


def _walk(root: Path, label: str) -> dict[str, int]:
    """``{relative path: size}`` of every regular file under ``root``; symlinks and specials are errors."""
    found: dict[str, int] = {}
    seen = 0
    stack: list[tuple[str, str]] = [("", os.fspath(root))]
    while stack:
        prefix, directory = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = list(it)
        except OSError as exc:
            raise BundleError(
                f"bundle {label}: {prefix or '.'}",
                f"cannot be listed ({exc.strerror or exc})",
                "a readable directory",
            ) from None
        for entry in entries:
            seen += 1
            rel = prefix + entry.name
            subject = f"bundle {label}: {show(rel)}"
            if seen > MAX_WALK_ENTRIES:
                raise BundleError(
                    f"bundle {label}", f"has more than {MAX_WALK_ENTRIES} entries", "a bundle tree"
                )
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                raise BundleError(
                    subject,
                    "is a symbolic link",
                    "only regular files and directories in a bundle (copy the target in)",
                )
            if stat.S_ISDIR(st.st_mode):
                stack.append((rel + "/", entry.path))
            elif stat.S_ISREG(st.st_mode):
                found[rel] = st.st_size
            else:
                raise BundleError(
                    subject, "is a device, FIFO or socket", "only regular files and directories in a bundle"
                )
    return found


def _check_tree(root: Path, files: Mapping[str, Any], label: str) -> None:
    found = _walk(root, label)
    found.pop(MANIFEST_NAME, None)
    for rel in sorted(files):
        if rel not in found:
            raise BundleError(
                f"bundle {label}: {rel}", "is listed in the manifest but missing", "every listed file present"
            )
    for rel in sorted(found):
        if rel not in files:
            raise BundleError(
                f"bundle {label}: {show(rel)}",
                "is not listed in the manifest",
                "only the files the manifest lists (remove it, or rebuild the bundle)",
            )
    for rel in sorted(files):
        if found[rel] != files[rel]["size"]:
            raise _size_error(f"bundle {label}: {rel}", found[rel], files[rel]["size"])


def _hash_tree(root: Path, files: Mapping[str, Any], label: str, stats: _Stats) -> None:
    for rel in sorted(files):
        subject = f"bundle {label}: {rel}"
        digest, n = _hash_file(root / rel, files[rel]["size"], subject)
        if n != files[rel]["size"]:
            raise _size_error(subject, n, files[rel]["size"])
        if digest != files[rel]["sha256"]:
            raise _hash_error(subject, digest, files[rel]["sha256"])
        stats.files += 1
        stats.bytes_hashed += n


# -- ONNX payload -------------------------------------------------------------------------------


def _check_payload(root: Path, manifest: Mapping[str, Any], label: str) -> None:
    """Parse every ``.onnx`` file (headers only: no external data) and check what it points at."""
    files = manifest["files"]
    opsets = manifest["requires"]["opsets"]
    for rel in sorted(files):
        if rel.endswith(".onnx"):
            _check_onnx(root, rel, files, opsets, label)


def onnx_tensors(model: Any) -> Iterator[Any]:
    """Every TensorProto of a model: initializers, sparse parts, attributes, subgraphs, functions."""
    graphs = [model.graph]
    node_lists = [f.node for f in model.functions]
    while graphs or node_lists:
        if graphs:
            g = graphs.pop()
            yield from g.initializer
            for sp in g.sparse_initializer:
                yield sp.values
                yield sp.indices
            node_lists.append(g.node)
            continue
        for node in node_lists.pop():
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                sparse = [attr.sparse_tensor] if attr.HasField("sparse_tensor") else []
                for sp in [*sparse, *attr.sparse_tensors]:
                    yield sp.values
                    yield sp.indices
                if attr.HasField("g"):
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)


def _check_onnx(
    root: Path, rel: str, files: Mapping[str, Any], opsets: Mapping[str, int], label: str
) -> None:
    import onnx

    subject = f"bundle {label}: {rel}"
    with (
        _open_nofollow(root / rel, subject) as f,
        _parsing(subject, "is not a parsable ONNX model", "a valid ONNX model"),
    ):
        model = onnx.load(f, format="protobuf", load_external_data=False)
    for imp in model.opset_import:
        domain = "" if imp.domain == "ai.onnx" else imp.domain
        declared = max(opsets.get(domain, 0), opsets.get("ai.onnx", 0) if domain == "" else 0)
        if not declared or imp.version > declared:
            raise BundleError(
                subject,
                f"imports opset {show(imp.domain or 'ai.onnx', 60)} version {imp.version} but requires.opsets "
                f"declares {declared or 'none'}",
                "requires.opsets to cover every opset the engines import",
            )
    base = posixpath.dirname(rel)
    for tensor in onnx_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL and not len(tensor.external_data):
            continue
        entries: dict[str, str] = {}
        for e in tensor.external_data:
            if e.key in entries:
                raise BundleError(
                    subject,
                    f"tensor {short(tensor.name)} repeats external-data key {short(e.key)}",
                    "unique keys",
                )
            entries[e.key] = e.value
        where = f"{subject}: tensor {show(tensor.name, 60)} external-data location"
        location = entries.get("location")
        if location is None:
            raise BundleError(where, "is missing", "a location naming a file of the bundle")
        check_rel_path(location, where)
        target = posixpath.join(base, location) if base else location
        if target not in files:
            raise BundleError(
                where,
                f"{short(location)} is not a file listed in the bundle",
                "a listed file next to the model",
            )
        offset, length = entries.get("offset", "0"), entries.get("length", "0")
        if not (offset.isdigit() and length.isdigit() and len(offset) < 20 and len(length) < 20):
            raise BundleError(
                where, f"has offset {short(offset)} / length {short(length)}", "decimal integers"
            )
        if int(offset) + int(length) > files[target]["size"]:
            raise BundleError(
                where,
                f"reads bytes {offset}..{int(offset) + int(length)} of {target} ({files[target]['size']} bytes)",
                "a range inside the data file",
            )


# -- npz ------------------------------------------------------------------------------------------


def _read_npz(f: IO[bytes], subject: str) -> dict[str, np.ndarray]:
    from numpy.lib import format as npy

    out: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(f) as zf:
        infos = zf.infolist()
        if len(infos) > MAX_NPZ_MEMBERS or sum(i.file_size for i in infos) > MAX_TOTAL_BYTES:
            raise BundleError(subject, f"has {len(infos)} members / too much data", "an ordinary .npz")
        for info in infos:
            if not info.filename.endswith(".npy") or info.filename[:-4] in out:
                raise BundleError(
                    subject, f"has the member {short(info.filename)}", "unique <name>.npy members"
                )
            with zf.open(info) as m:
                version = npy.read_magic(m)
                if version == (1, 0):
                    shape, _, dtype = npy.read_array_header_1_0(m)
                elif version == (2, 0):
                    shape, _, dtype = npy.read_array_header_2_0(m)
                else:
                    raise BundleError(subject, f"uses .npy format {version}", ".npy format 1.0 or 2.0")
                if dtype.hasobject:
                    raise BundleError(
                        subject, f"array {short(info.filename)} holds Python objects", "plain arrays"
                    )
                need = math.prod(int(d) for d in shape) * dtype.itemsize
                if need != info.file_size - m.tell():
                    raise BundleError(
                        subject,
                        f"array {short(info.filename)} declares {need} bytes of data",
                        "a consistent .npy",
                    )
            with zf.open(info) as m:
                out[info.filename[:-4]] = npy.read_array(m, allow_pickle=False)
    return out


# -- archive form -------------------------------------------------------------------------------


def _scan_tar(tf: tarfile.TarFile, archive_size: int, label: str) -> dict[str, tarfile.TarInfo]:
    """Validate every member header; return the regular files by normalized name. Extracts nothing."""
    files: dict[str, tarfile.TarInfo] = {}
    dirs: set[str] = set()
    count = total = 0
    subject = f"bundle {label}"
    while True:
        with _parsing(
            subject, "is not a valid uncompressed tar archive", "a .csb file written by cscompile build"
        ):
            member = tf.next()
        if member is None:
            break
        count += 1
        if count > MAX_ARCHIVE_MEMBERS:
            raise BundleError(
                subject, f"has more than {MAX_ARCHIVE_MEMBERS} archive members", "a bundle archive"
            )
        raw = member.name
        msubject = f"{subject}: archive member {show(raw)}"
        name = raw[2:] if raw.startswith("./") else raw
        if member.type == tarfile.DIRTYPE and name in (".", ""):
            continue
        check_rel_path(name, msubject)
        if name in files or name in dirs:
            raise BundleError(msubject, "appears twice", "each member once")
        if member.type == tarfile.DIRTYPE:
            dirs.add(name)
        elif member.type in (tarfile.REGTYPE, tarfile.AREGTYPE) and member.sparse is None:
            if not 0 <= member.size <= MAX_FILE_BYTES:
                raise BundleError(
                    msubject, f"declares {member.size} bytes", f"at most {MAX_FILE_BYTES} bytes"
                )
            total += member.size
            if total > MAX_TOTAL_BYTES + MAX_MANIFEST_BYTES:
                raise BundleError(subject, f"holds more than {MAX_TOTAL_BYTES} bytes", "at most 64 GiB")
            if member.offset_data + member.size > archive_size:
                raise BundleError(
                    msubject, "runs past the end of the archive (truncated?)", "a complete archive"
                )
            files[name] = member
        else:
            kind = _TAR_TYPES.get(member.type, f"special (type {short(member.type)})")
            raise BundleError(
                msubject, f"is a {kind}", "only regular files and directories in a bundle archive"
            )
    for name in files:
        for d in parent_dirs(name):
            if d in files:
                raise BundleError(
                    f"{subject}: archive member {d}", "is both a file and a directory", "distinct paths"
                )
    return files


def _read_member(tf: tarfile.TarFile, member: tarfile.TarInfo, label: str) -> bytes:
    with _parsing(f"bundle {label}: archive member {member.name}", "cannot be read", "a complete archive"):
        src = tf.extractfile(member)
        data = src.read(member.size) if src is not None else b""
    if len(data) != member.size:
        raise BundleError(
            f"bundle {label}: {member.name}", "is truncated in the archive", "a complete archive"
        )
    return data


def _extract(
    tf: tarfile.TarFile, member: tarfile.TarInfo, dest: Path, entry: Mapping[str, Any], subject: str
) -> int:
    """Copy one validated member to ``dest`` (created exclusively), hashing on the way."""
    dest.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_BINARY, 0o644)
    h = hashlib.sha256()
    n = 0
    with os.fdopen(fd, "wb") as out:
        with _parsing(subject, "cannot be read from the archive", "a complete archive"):
            src = tf.extractfile(member)
            while src is not None and (block := src.read(min(_CHUNK, member.size - n))):
                h.update(block)
                out.write(block)
                n += len(block)
    if n != entry["size"]:
        raise _size_error(subject, n, entry["size"])
    if h.hexdigest() != entry["sha256"]:
        raise _hash_error(subject, h.hexdigest(), entry["sha256"])
    return n


def _open_archive(source: Path, label: str, check_requires: bool, stats: _Stats) -> Bundle:
    subject = f"bundle {label}"
    try:
        f = open(source, "rb")  # noqa: SIM115 - closed by the with below
    except OSError as exc:
        raise BundleError(
            subject, f"cannot be opened ({exc.strerror or exc})", "a readable .csb file"
        ) from None
    with f:
        size = os.fstat(f.fileno()).st_size
        with _parsing(
            subject, "is not a bundle (not an uncompressed tar archive)", "a bundle directory or .csb file"
        ):
            tf = tarfile.open(fileobj=f, mode="r:")
        with tf:
            members = _scan_tar(tf, size, label)
            mm = members.pop(MANIFEST_NAME, None)
            if mm is None:
                raise BundleError(
                    subject, "is not a bundle (no manifest.json member)", "a .csb written by cscompile"
                )
            if mm.size > MAX_MANIFEST_BYTES:
                raise BundleError(f"{subject}: manifest.json", f"is {mm.size} bytes", "at most 4 MiB")
            manifest_bytes = _read_member(tf, mm, label)
            manifest = parse_json(manifest_bytes, f"{subject}: manifest.json")
            _validate(manifest, label, check_requires)
            files = manifest["files"]
            for rel in sorted(files):
                if rel not in members:
                    raise BundleError(
                        f"{subject}: {rel}",
                        "is listed in the manifest but not in the archive",
                        "a complete archive",
                    )
                if members[rel].size != files[rel]["size"]:
                    raise _size_error(f"{subject}: {rel}", members[rel].size, files[rel]["size"])
            for rel in sorted(members):
                if rel not in files:
                    raise BundleError(
                        f"{subject}: {rel}",
                        "is in the archive but not listed in the manifest",
                        "only listed files",
                    )
            scratch.sweep(tempfile.gettempdir(), EXTRACT_PREFIX)  # what killed runs left behind
            tmp = Path(tempfile.mkdtemp(prefix=EXTRACT_PREFIX))
            try:
                scratch.hold(tmp)
                for rel in sorted(files):
                    stats.bytes_hashed += _extract(
                        tf, members[rel], tmp / rel, files[rel], f"{subject}: {rel}"
                    )
                    stats.files += 1
                (tmp / MANIFEST_NAME).write_bytes(manifest_bytes)
                _check_tree(tmp, files, label)
                _check_payload(tmp, manifest, label)
                return _make_bundle(tmp, manifest, source, tmp)
            except BaseException:
                scratch.remove(tmp)
                raise


def content_hash(bundle: Any) -> str:
    """sha256 of the canonical manifest bytes; it covers every file through their listed hashes.

    Accepts a manifest mapping, anything with a ``manifest`` attribute (``Bundle``,
    ``BundleInfo``), or a bundle path (opened and fully verified first).
    """
    if isinstance(bundle, (str, Path)):
        with open_bundle(bundle, check_requires=False) as b:
            return b.content_hash
    manifest = bundle if isinstance(bundle, Mapping) else getattr(bundle, "manifest", None)
    if not isinstance(manifest, Mapping):
        raise TypeError(f"content_hash expects a manifest, a Bundle or a path, got {type(bundle).__name__}")
    return hashlib.sha256(canonical_manifest_bytes(manifest)).hexdigest()
