"""Chat templates rendered in Jinja2's immutable sandbox, with a bound on the work they do.

A template shipped with a model is data, never code (the sandbox), and it must also end: a
template with nested ``range`` loops passes any static check and renders forever. Every
``range`` item, call, attribute or item lookup and binary operator counts one step; a render
stops with a one-line error after :data:`MAX_STEPS` steps, :data:`MAX_SECONDS` seconds or
:data:`MAX_CHARS` characters of output. Real templates take a few hundred steps per message.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

from cscompile.errors import UserError

MAX_STEPS = 1_000_000
MAX_SECONDS = 2.0
MAX_CHARS = 1 << 22
_SUBJECT = "chat template"


class _Budget(threading.local):
    steps = 0
    deadline = 0.0


def _env_class() -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedSandbox(ImmutableSandboxedEnvironment):  # type: ignore[misc]
        intercepted_binops = frozenset({"*", "**", "+"})

        def __init__(self, **kw: Any) -> None:
            super().__init__(**kw)
            self.budget = _Budget()
            self.globals["range"] = self.bounded_range

        def tick(self) -> None:
            b = self.budget
            b.steps += 1
            if b.steps > MAX_STEPS or (b.steps & 1023 == 0 and time.perf_counter() > b.deadline):
                raise UserError(
                    _SUBJECT,
                    f"did not finish within {MAX_STEPS:,} steps or {MAX_SECONDS:g} s (a loop that does not end?)",
                    "a template that renders the conversation (loops over the messages)",
                )

        def bounded_range(self, *args: Any) -> Iterator[int]:
            for i in range(*args):
                self.tick()
                yield i

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            self.tick()
            if operator == "**" and isinstance(right, int) and abs(right) > 64:
                raise UserError(_SUBJECT, f"raises to the power {right}", "exponents up to 64")
            if operator == "*" and isinstance(right, int) and isinstance(left, (str, list, tuple)):
                left, right = right, left
            if operator == "*" and isinstance(left, int) and isinstance(right, (str, list, tuple)):
                if left * len(right) > MAX_CHARS:
                    raise UserError(
                        _SUBJECT, f"repeats a sequence {left} times", f"results under {MAX_CHARS:,} items"
                    )
            return super().call_binop(context, operator, left, right)

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
            __self.tick()
            return super().call(__context, __obj, *args, **kwargs)

        def getattr(self, obj: Any, attribute: str) -> Any:
            self.tick()
            return super().getattr(obj, attribute)

        def getitem(self, obj: Any, argument: Any) -> Any:
            self.tick()
            return super().getitem(obj, argument)

    return BoundedSandbox


class ChatTemplate:
    """One model's chat template, compiled once, rendered under the bounds above (thread-safe)."""

    def __init__(self, source: str) -> None:
        from jinja2.exceptions import TemplateError

        def raise_exception(message: str) -> None:
            raise UserError(_SUBJECT, message, "messages the template accepts")

        self.env = _env_class()(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        self.env.globals["raise_exception"] = raise_exception
        try:
            self.template = self.env.from_string(source)
        except TemplateError as exc:
            raise UserError(_SUBJECT, f"does not parse ({exc})", "a valid Jinja2 chat template") from None

    def render(self, **variables: Any) -> str:
        from jinja2.exceptions import TemplateError

        budget = self.env.budget
        budget.steps, budget.deadline = 0, time.perf_counter() + MAX_SECONDS
        out: list[str] = []
        size = 0
        try:
            for chunk in self.template.generate(**variables):
                size += len(chunk)
                if size > MAX_CHARS:
                    raise UserError(
                        _SUBJECT, f"renders more than {MAX_CHARS:,} characters", "a bounded prompt"
                    )
                out.append(chunk)
                self.env.tick()
        except TemplateError as exc:
            raise UserError(_SUBJECT, f"failed to render ({exc})", "a valid Jinja2 chat template") from None
        except RecursionError:
            raise UserError(_SUBJECT, "recursed without end", "a template whose macros terminate") from None
        return "".join(out)
