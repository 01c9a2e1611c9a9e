"""Bundles: what ``cscompile build`` writes and appliances load.

A bundle is a directory, or one uncompressed POSIX tar file with the ``.csb`` suffix, holding
``manifest.json`` (schema version 1, see :mod:`cscompile.bundle.format`) and the data files it
lists with their sha256 and size: ONNX engines, tokenizer files, ``.json``/``.npz`` sections.
No pickle anywhere. :func:`write_bundle` writes one atomically and deterministically;
:func:`open_bundle` and :func:`verify_bundle` check every byte before anything is used and
report every problem as a one-line :class:`BundleError`.
"""

from __future__ import annotations

from cscompile.bundle.format import (
    FORMAT,
    SCHEMA_VERSION,
    BundleError,
    canonical_manifest_bytes,
    validate_manifest,
)
from cscompile.bundle.loader import Bundle, Engine, VerifyReport, content_hash, open_bundle, verify_bundle
from cscompile.bundle.writer import BundleInfo, write_bundle

__all__ = [
    "FORMAT",
    "SCHEMA_VERSION",
    "Bundle",
    "BundleError",
    "BundleInfo",
    "Engine",
    "VerifyReport",
    "canonical_manifest_bytes",
    "content_hash",
    "open_bundle",
    "validate_manifest",
    "verify_bundle",
    "write_bundle",
]
