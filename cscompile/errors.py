"""The two exception types of cscompile.

A :class:`UserError` is a mistake in what the user gave us (a bad model file, a bad flag, a
prompt too long): the CLI prints its one-line message and exits non-zero, no traceback.
Anything else is an internal error and keeps its traceback.
"""

from __future__ import annotations


class CscompileError(Exception):
    """Base class of every error cscompile raises on purpose."""


class UserError(CscompileError):
    """Bad input from the user. Message shape: ``<subject> | <what was received>. Expected <what>.``"""

    def __init__(self, subject: str, received: str, expected: str) -> None:
        self.subject = subject
        self.received = received
        self.expected = expected
        super().__init__(f"{subject} | {received}. Expected {expected}.")


class MissingDependencyError(UserError):
    """An optional extra is needed for this operation but is not installed."""

    def __init__(self, package: str, extra: str, purpose: str) -> None:
        super().__init__(
            purpose,
            f"the Python package '{package}' is not installed",
            f"it installed: pip install 'cscompile[{extra}]'",
        )


def require(module: str, extra: str, purpose: str):  # noqa: ANN201 - returns a module
    """Import an optional heavy module, or raise a :class:`MissingDependencyError`."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(module.split(".")[0], extra, purpose) from exc
