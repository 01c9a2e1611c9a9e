"""The OpenAI request bodies, checked, and OpenAI's error shape.

A parameter the server does not implement is refused with a 400 that names it, rather than
ignored: a client asking for ``n: 3`` or ``logprobs`` must not get an answer that silently lacks
them. Parameters whose value changes nothing (``n: 1``, ``presence_penalty: 0``, ``user``) pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cscompile.errors import UserError
from cscompile.runtime import GenerationConfig


class APIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str | None, message: str, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass(frozen=True)
class Limits:
    """Per-request token limits of the server (None: only the model's context bounds them)."""

    max_tokens: int | None = None  # new tokens per request
    max_prompt_tokens: int | None = None


@dataclass
class Job:
    """A checked request: the prompt's token ids and how to generate."""

    ids: list[int]
    config: GenerationConfig
    stream: bool
    include_usage: bool


# accepted, and harmless at these values (the value a client sends when it means "off")
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "parallel_tool_calls": (None, True, False),
    "response_format": (None, {"type": "text"}),
}
_COMMON = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "user",
}
COMPLETION_KEYS = _COMMON | {"prompt", "n", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs",
                             "echo", "best_of", "suffix"}  # fmt: skip
CHAT_KEYS = _COMMON | {"messages", "max_completion_tokens", "n", "presence_penalty", "frequency_penalty",
                       "logit_bias", "logprobs", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls",
                       "response_format"}  # fmt: skip


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_keys(body: Any, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad(None, "The request body must be a JSON object.")
    for key, value in body.items():
        if key not in allowed:
            raise bad(
                key,
                f"Unsupported parameter: '{key}' is not supported by this server.",
                "unsupported_parameter",
            )
        if key in _NEUTRAL and value not in _NEUTRAL[key]:
            raise bad(key, f"Unsupported value: '{key}' = {value!r}; this server supports only {_NEUTRAL[key][1]!r}.",
                      "unsupported_value")  # fmt: skip
    return body


def check_model(body: dict[str, Any], model_id: str) -> None:
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise bad("model", "'model' is required: the served model's id (GET /v1/models).")
    if name != model_id:
        raise APIError(404, f"The model '{name}' does not exist; this server serves '{model_id}'.",
                       param="model", code="model_not_found")  # fmt: skip


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise bad("stop", f"'stop' must be a non-empty string or a list of up to 4 of them; got {value!r}.")
    return tuple(stops)


def sampling(body: dict[str, Any], max_tokens_key: str = "max_tokens") -> dict[str, Any]:
    """``temperature``, ``top_p``, ``top_k``, ``seed`` and ``stop`` as GenerationConfig fields."""
    out: dict[str, Any] = {}
    t = body.get("temperature")
    if t is not None:
        if not _is_number(t) or not 0 <= t <= 2:
            raise bad("temperature", f"'temperature' must be a number in [0, 2]; got {t!r}.")
        out["temperature"] = float(t)
    p = body.get("top_p")
    if p is not None:
        if not _is_number(p) or not 0 < p <= 1:
            raise bad("top_p", f"'top_p' must be a number in (0, 1]; got {p!r}.")
        out["top_p"] = float(p)
    k = body.get("top_k")
    if k is not None:
        if not _is_int(k) or k < 0:
            raise bad("top_k", f"'top_k' must be an integer >= 0 (0 means off); got {k!r}.")
        out["top_k"] = k
    seed = body.get("seed")
    if seed is not None:
        if not _is_int(seed) or not 0 <= seed < 2**63:
            raise bad("seed", f"'seed' must be an integer in [0, 2^63); got {seed!r}.")
        out["seed"] = seed
    out["stop"] = _stop(body.get("stop"))
    return out


def stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream")
    if stream not in (None, True, False):
        raise bad("stream", f"'stream' must be a boolean; got {stream!r}.")
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not stream:
            raise bad("stream_options", "'stream_options' is only allowed with 'stream': true.")
        if (
            not isinstance(opts, dict)
            or set(opts) - {"include_usage"}
            or not isinstance(opts.get("include_usage", False), bool)
        ):
            raise bad("stream_options", f"'stream_options' must be {{'include_usage': bool}}; got {opts!r}.")
        include_usage = bool(opts.get("include_usage", False))
    return bool(stream), include_usage


def new_tokens(body: dict[str, Any], keys: tuple[str, ...], n_prompt: int, context: int | None,
               limits: Limits, default: int | None) -> int:  # fmt: skip
    """The request's ``max_tokens`` (checked against the context and the server's limits)."""
    asked: int | None = None
    key = keys[0]
    for k in keys:
        if body.get(k) is not None:
            asked, key = body[k], k
            if not _is_int(asked) or asked < 1:
                raise bad(k, f"'{k}' must be an integer >= 1; got {asked!r}.")
            break
    if n_prompt == 0:
        raise bad("prompt", "The prompt is empty (0 tokens); at least one token is needed.")
    if limits.max_prompt_tokens is not None and n_prompt > limits.max_prompt_tokens:
        raise bad("messages" if "max_completion_tokens" in keys else "prompt",
                  f"The prompt has {n_prompt} tokens; this server accepts at most {limits.max_prompt_tokens}.",
                  "context_length_exceeded")  # fmt: skip
    if asked is not None and limits.max_tokens is not None and asked > limits.max_tokens:
        raise bad(
            key, f"'{key}' is {asked}; this server generates at most {limits.max_tokens} tokens per request."
        )
    room = None if context is None else context - n_prompt
    if room is not None and room < 1:
        raise bad("messages" if "max_completion_tokens" in keys else "prompt",
                  f"This model's maximum context length is {context} tokens; the prompt has {n_prompt}.",
                  "context_length_exceeded")  # fmt: skip
    if asked is not None:
        if room is not None and asked > room:
            raise bad(key, f"This model's maximum context length is {context} tokens; the prompt has {n_prompt} "
                      f"and {asked} were requested for the completion.", "context_length_exceeded")  # fmt: skip
        return asked
    caps = [c for c in (default, room, limits.max_tokens) if c is not None]
    return min(caps) if caps else 256


def prompt_ids(prompt: Any, tokenizer: Any) -> list[int]:
    """A completion ``prompt``: text, one-element list of text, token ids, or one list of token ids."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)  # type: ignore[no-any-return]
    if isinstance(prompt, list) and all(_is_int(t) for t in prompt):
        vocab = tokenizer.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise bad("prompt", f"Token ids must lie in [0, {vocab}).")
        return list(prompt)
    raise bad("prompt", "'prompt' must be a string or a list of token ids (one prompt per request).")


def chat_text(messages: Any, tokenizer: Any) -> str:
    """``messages`` rendered with the model's chat template."""
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "'messages' must be a non-empty list of {role, content} objects.")
    plain: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise bad(
                f"messages[{i}]", f"messages[{i}] must have a role among system, developer, user, assistant."
            )
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise bad(
                f"messages[{i}]",
                f"messages[{i}] has unsupported fields {sorted(extra)}.",
                "unsupported_parameter",
            )
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):  # fmt: skip
                raise bad(
                    f"messages[{i}].content", "Only text content parts are supported.", "unsupported_value"
                )
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad(
                f"messages[{i}].content", f"messages[{i}].content must be a string or a list of text parts."
            )
        role = "system" if m["role"] == "developer" else m["role"]
        plain.append({"role": role, "content": content})
    try:
        return tokenizer.apply_chat_template(plain)  # type: ignore[no-any-return]
    except UserError as exc:
        raise bad("messages", str(exc)) from None


def finish_reason(stop_reason: str) -> str:
    """OpenAI's ``finish_reason`` for the runtime's ``stop_reason``."""
    return "length" if stop_reason == "length" else "stop"
