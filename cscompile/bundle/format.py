"""The bundle format: limits, path rules, the manifest schema (version 1), canonical bytes, content hash.

Everything here is pure (no file access) except :func:`check_environment`, which asks the
installed onnx / onnxruntime what this machine can run. The writer and the loader share these
functions, so what the writer accepts is exactly what the loader accepts.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from typing import Any

from cscompile.errors import UserError

FORMAT = "cscompile-bundle"
SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
ARCHIVE_SUFFIX = ".csb"

MAX_MANIFEST_BYTES = 4 << 20
MAX_FILES = 4096
MAX_ARCHIVE_MEMBERS = 4096
MAX_FILE_BYTES = 64 << 30
MAX_TOTAL_BYTES = 64 << 30
MAX_PATH_CHARS = 512
MAX_JSON_DEPTH = 64
MAX_NAME_CHARS = 128

TARGETS = ("cpu", "trt")
ENGINE_KINDS = ("dense", "motif", "trt", "native")
KNOWN_DOMAINS = ("", "ai.onnx", "com.microsoft", "cscompile")

TOP_KEYS = ("created_by", "engines", "files", "format", "requires", "schema_version", "sections", "source")
TOP_KEYS_NULLABLE = ("tokenizer",)
ENGINE_KEYS = ("file", "kind", "name", "params", "profile")

SEGMENT = re.compile(r"[A-Za-z0-9_.+=@-]+")
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_VERSION = re.compile(r"\d{1,6}(\.\d{1,6}){0,3}")
_VERSION_PREFIX = re.compile(r"\d{1,6}(?:\.\d{1,6}){0,3}")

PATH_RULE = (
    "a normalized relative POSIX path inside the bundle (segments of A-Z a-z 0-9 . _ - + = @, "
    "no '.' or '..' segment, no leading '/', no backslash, no empty segment)"
)


class BundleError(UserError):
    """A bundle (or the input to write one) is malformed, tampered with, or not runnable here."""


def short(value: object, limit: int = 80) -> str:
    """A bounded ``repr`` for error messages (fuzzed input can be megabytes long)."""
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a repr must never turn into a second error
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def show(text: str, limit: int = 120) -> str:
    """A path or name as is when it is short and printable, else its bounded ``repr``."""
    return text if isinstance(text, str) and text.isprintable() and len(text) <= limit else short(text, limit)


def describe(value: object) -> str:
    """``a list ([1, 2])``-style description of a JSON value of the wrong type."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer"}
    names.update({float: "a number", type(None): "null"})
    return f"{names.get(type(value), type(value).__name__)} ({short(value, 60)})"


def check_rel_path(path: object, subject: str) -> str:
    """Return ``path`` if it is a safe relative bundle path, else raise :class:`BundleError`."""
    if not isinstance(path, str):
        raise BundleError(subject, f"got {describe(path)}", PATH_RULE)
    reason = None
    if not path:
        reason = "empty"
    elif len(path) > MAX_PATH_CHARS:
        reason = f"{len(path)} characters long, more than {MAX_PATH_CHARS}"
    elif "\x00" in path:
        reason = "contains a NUL byte"
    elif "\\" in path:
        reason = "contains a backslash"
    elif path.startswith("/"):
        reason = "is absolute"
    else:
        for seg in path.split("/"):
            if seg == "":
                reason = "has an empty segment"
            elif seg in (".", ".."):
                reason = f"has a '{seg}' segment"
            elif not SEGMENT.fullmatch(seg):
                reason = f"segment {short(seg, 40)} has characters outside the allowed set"
            if reason:
                break
    if reason:
        raise BundleError(subject, f"path {short(path)} {reason}", PATH_RULE)
    return path


def parent_dirs(rel: str) -> list[str]:
    """``a/b/c`` -> ``["a", "a/b"]``."""
    parts = rel.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} is not JSON")


def _parse_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:20]} overflows")
    return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {short(key, 40)}")
        out[key] = value
    return out


def json_depth(obj: Any) -> int:
    """Nesting depth of a parsed JSON value, computed without recursion."""
    depth, stack = 0, [(obj, 1)]
    while stack:
        value, d = stack.pop()
        if isinstance(value, dict):
            depth = max(depth, d)
            stack.extend((v, d + 1) for v in value.values())
        elif isinstance(value, list):
            depth = max(depth, d)
            stack.extend((v, d + 1) for v in value)
    return depth


def parse_json(data: bytes, subject: str) -> Any:
    """Strict JSON: UTF-8, no duplicate keys, no NaN/Infinity, nesting at most ``MAX_JSON_DEPTH``."""
    try:
        text = data.decode("utf-8")
        obj = json.loads(
            text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant, parse_float=_parse_float
        )
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise BundleError(
            subject, f"is not valid JSON ({short(str(exc), 100)})", "strict UTF-8 JSON"
        ) from None
    if json_depth(obj) > MAX_JSON_DEPTH:
        raise BundleError(subject, "nests JSON deeper than 64 levels", "a flat, ordinary JSON document")
    return obj


def canonical_manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    """The one byte form of a manifest: key-sorted, 2-space indented, ASCII, trailing newline.

    Same layout as :func:`cscompile.cache.atomic_write_json`, so the file written through it
    hashes to :func:`content_hash`.
    """
    try:
        text = json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=True, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise BundleError(
            "bundle manifest", f"is not serializable as JSON ({short(str(exc), 100)})", "plain JSON values"
        ) from None
    return (text + "\n").encode("ascii")


def version_tuple(text: str) -> tuple[int, ...] | None:
    """Leading numeric part of a version (``1.32.0.dev1`` -> ``(1, 32, 0)``), or None."""
    m = _VERSION_PREFIX.match(text.strip())
    return tuple(int(p) for p in m.group(0).split(".")) if m else None


def version_at_least(installed: tuple[int, ...], minimum: tuple[int, ...]) -> bool:
    """Numeric comparison with missing components read as 0."""
    n = max(len(installed), len(minimum))
    return installed + (0,) * (n - len(installed)) >= minimum + (0,) * (n - len(minimum))


class _Checker:
    """Type-checks a parsed manifest; every error names the manifest field."""

    def __init__(self, label: str) -> None:
        self.label = label

    def fail(self, where: str, received: str, expected: str) -> BundleError:
        return BundleError(f"bundle {self.label}: manifest {where}", received, expected)

    def obj(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, f"got {describe(value)}", "a JSON object")
        return value

    def keys(
        self, d: dict[str, Any], where: str, required: tuple[str, ...], nullable: tuple[str, ...] = ()
    ) -> None:
        for key in (*required, *nullable):
            if key not in d:
                raise self.fail(
                    where, f"has no key '{key}'", f"the keys {', '.join(sorted((*required, *nullable)))}"
                )
        for key in d:
            if key not in required and key not in nullable:
                raise self.fail(
                    where,
                    f"has the unknown key {short(key, 40)}",
                    f"only {', '.join(sorted((*required, *nullable)))}",
                )

    def string(
        self, value: Any, where: str, limit: int = MAX_NAME_CHARS, pattern: re.Pattern | None = None
    ) -> str:
        if not isinstance(value, str):
            raise self.fail(where, f"got {describe(value)}", "a string")
        if len(value) > limit:
            raise self.fail(where, f"is {len(value)} characters long", f"at most {limit}")
        if pattern is not None and not pattern.fullmatch(value):
            raise self.fail(where, f"got {short(value)}", f"a string matching {pattern.pattern}")
        return value

    def integer(self, value: Any, where: str, lo: int, hi: int) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(where, f"got {describe(value)}", f"an integer in [{lo}, {hi}]")
        if not lo <= value <= hi:
            raise self.fail(where, f"got {short(value)}", f"an integer in [{lo}, {hi}]")
        return value


def validate_manifest(manifest: Any, label: str) -> None:
    """Check the type, range and cross-references of every manifest field; raise :class:`BundleError`.

    Reads nothing from disk. Order matters: ``format`` and ``schema_version`` come first so a
    manifest from a newer cscompile is reported as such, not as a field error.
    """
    c = _Checker(label)
    m = c.obj(manifest, "(top level)")
    if m.get("format") != FORMAT:
        raise c.fail("format", f"got {describe(m.get('format'))}", f"'{FORMAT}'")
    sv = m.get("schema_version")
    if isinstance(sv, int) and not isinstance(sv, bool) and sv > SCHEMA_VERSION:
        raise c.fail(
            "schema_version",
            f"is {sv}, written by a newer cscompile",
            f"schema_version {SCHEMA_VERSION} (upgrade cscompile to load this bundle)",
        )
    if sv != SCHEMA_VERSION or isinstance(sv, bool):
        raise c.fail("schema_version", f"got {describe(sv)}", f"schema_version {SCHEMA_VERSION}")
    c.keys(m, "(top level)", TOP_KEYS, TOP_KEYS_NULLABLE)

    created = c.obj(m["created_by"], "created_by")
    c.keys(created, "created_by", ("cscompile", "onnxruntime"))
    for key in ("cscompile", "onnxruntime"):
        c.string(created[key], f"created_by.{key}")

    req = c.obj(m["requires"], "requires")
    c.keys(req, "requires", ("onnxruntime_min", "opsets", "target"))
    c.string(req["onnxruntime_min"], "requires.onnxruntime_min", pattern=_VERSION)
    opsets = c.obj(req["opsets"], "requires.opsets")
    for domain, version in opsets.items():
        if domain not in KNOWN_DOMAINS:
            raise c.fail(
                "requires.opsets",
                f"names the unknown operator domain {short(domain, 40)}",
                f"only the domains {', '.join(repr(d) for d in KNOWN_DOMAINS)}",
            )
        c.integer(version, f"requires.opsets[{domain!r}]", 1, 10_000)
    target = c.string(req["target"], "requires.target")
    if target not in TARGETS:
        raise c.fail("requires.target", f"got {short(target)}", "'cpu' or 'trt'")

    src = c.obj(m["source"], "source")
    c.keys(src, "source", ("name", "sha256"))
    c.string(src["name"], "source.name", limit=1024)
    c.string(src["sha256"], "source.sha256", pattern=_SHA256)

    files = c.obj(m["files"], "files")
    if len(files) > MAX_FILES:
        raise c.fail("files", f"lists {len(files)} files", f"at most {MAX_FILES}")
    total = 0
    for rel, entry in files.items():
        where = f"files[{short(rel, 60)}]"
        check_rel_path(rel, f"bundle {label}: manifest {where}")
        if rel == MANIFEST_NAME:
            raise c.fail(
                where, "lists the manifest itself", "only the data files (manifest.json is implicit)"
            )
        e = c.obj(entry, where)
        c.keys(e, where, ("sha256", "size"))
        c.string(e["sha256"], f"{where}.sha256", pattern=_SHA256)
        total += c.integer(e["size"], f"{where}.size", 0, MAX_FILE_BYTES)
    if total > MAX_TOTAL_BYTES:
        raise c.fail("files", f"declares {total} bytes in total", f"at most {MAX_TOTAL_BYTES} (64 GiB)")
    dirs = {d for rel in files for d in parent_dirs(rel)}
    clash = sorted(dirs & files.keys()) + ([MANIFEST_NAME] if MANIFEST_NAME in dirs else [])
    if clash:
        raise c.fail("files", f"uses {short(clash[0])} both as a file and as a directory", "distinct paths")

    engines = m["engines"]
    if not isinstance(engines, list):
        raise c.fail("engines", f"got {describe(engines)}", "a list of engine objects")
    names: set[str] = set()
    for i, raw in enumerate(engines):
        where = f"engines[{i}]"
        eng = c.obj(raw, where)
        c.keys(eng, where, ENGINE_KEYS)
        name = c.string(eng["name"], f"{where}.name", pattern=_NAME)
        if name in names:
            raise c.fail(f"{where}.name", f"repeats the engine name {name!r}", "unique engine names")
        names.add(name)
        file = check_rel_path(eng["file"], f"bundle {label}: manifest {where}.file")
        if eng["kind"] not in ENGINE_KINDS:
            raise c.fail(
                f"{where}.kind", f"got {describe(eng['kind'])}", "'dense', 'motif', 'trt' or 'native'"
            )
        # a dense engine is one ONNX graph; a motif engine is one graph too, or an engine.json
        # (segments, weight and record index) whose files are listed and hashed like any other;
        # a TensorRT engine is a serialized plan (opaque bytes, only ever handed to TensorRT)
        # a native engine is an engine.json (config, matrix shapes, array index) over a weights.bin
        suffixes = {
            "dense": (".onnx",),
            "motif": (".onnx", ".json"),
            "trt": (".plan",),
            "native": (".json",),
        }[eng["kind"]]
        if not file.endswith(suffixes):
            raise c.fail(
                f"{where}.file",
                f"is {short(file)}",
                f"a {' or '.join(suffixes)} file for a {eng['kind']} engine",
            )
        if file not in files:
            raise c.fail(f"{where}.file", f"{short(file)} is not listed in files", "a file listed in files")
        c.obj(eng["params"], f"{where}.params")
        c.obj(eng["profile"], f"{where}.profile")

    tok = m["tokenizer"]
    if tok is not None:
        if not isinstance(tok, str) or not tok.endswith("/"):
            raise c.fail("tokenizer", f"got {describe(tok)}", "null or a directory prefix ending in '/'")
        check_rel_path(tok[:-1], f"bundle {label}: manifest tokenizer")
        if not any(rel.startswith(tok) for rel in files):
            raise c.fail("tokenizer", f"no listed file is under {short(tok)}", "at least one tokenizer file")

    sections = c.obj(m["sections"], "sections")
    for name, rel in sections.items():
        c.string(name, f"sections key {short(name, 40)}", pattern=_NAME)
        check_rel_path(rel, f"bundle {label}: manifest sections[{name!r}]")
        if rel not in files:
            raise c.fail(
                f"sections[{name!r}]", f"{short(rel)} is not listed in files", "a file listed in files"
            )


# the distributions that install the ``onnxruntime`` module (CPU first)
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml")


@functools.cache
def onnxruntime_version() -> str | None:
    """The installed onnxruntime's version, from its package metadata (read once per process):
    importing onnxruntime costs a process ~20 MB, which a bundle run by the native engine never needs.
    """
    from importlib import metadata

    for dist in ORT_DISTRIBUTIONS:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def check_environment(requires: Mapping[str, Any], label: str) -> None:
    """Check that this machine can run a bundle with these (already validated) requirements."""
    import onnx

    subject = f"bundle {label}"
    found = onnxruntime_version()
    installed = version_tuple(found or "")
    minimum = version_tuple(requires["onnxruntime_min"]) or (0,)
    if installed is None or not version_at_least(installed, minimum):
        raise BundleError(
            f"{subject} requires onnxruntime >= {requires['onnxruntime_min']}",
            f"the installed onnxruntime is {found or 'missing'}",
            f"onnxruntime {requires['onnxruntime_min']} or newer (pip install -U 'onnxruntime>="
            f"{requires['onnxruntime_min']}'), or a bundle built with this version",
        )
    supported = onnx.defs.onnx_opset_version()
    for domain in ("", "ai.onnx"):
        want = requires["opsets"].get(domain)
        if want is not None and want > supported:
            raise BundleError(
                f"{subject} requires ONNX opset {want}",
                f"the installed onnx supports opsets up to {supported}",
                "a newer onnx/onnxruntime, or a bundle exported with a lower opset",
            )
    target = requires["target"]
    if target == "trt":
        from cscompile.hardware import gpu_problem

        why = gpu_problem()
        if why is not None:
            raise BundleError(
                f"{subject}: target 'trt'",
                f"this machine has no CUDA GPU with TensorRT ({why})",
                "a bundle built with --target cpu, or an NVIDIA GPU machine with cscompile[trt] installed",
            )
    elif target != "cpu":  # unreachable after validate_manifest, kept for direct callers
        raise BundleError(f"{subject}: target", f"got {short(target)}", "'cpu' or 'trt'")
