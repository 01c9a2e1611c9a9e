"""Tokenizer and chat template without transformers: ``tokenizers`` plus a sandboxed Jinja2.

Reads a Hugging Face tokenizer directory (``tokenizer.json`` and ``tokenizer_config.json``,
optionally ``chat_template.jinja``). The chat template is rendered in Jinja2's immutable
sandbox, as transformers does: a template from a model file is data, not code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cscompile.errors import UserError


def _token_text(value: Any, field: str, path: Path) -> str | None:
    """A special token's text: a string, an AddedToken object (``content``), or none."""
    text = value.get("content") if isinstance(value, dict) else value
    if text is not None and not isinstance(text, str):
        raise UserError(f"tokenizer {path}", f"has {field} {str(value)[:80]}",
                        "a string, an object with a string 'content', or null")  # fmt: skip
    return text


def _chat_template(value: Any, path: Path) -> str | None:
    """``chat_template``: a string, or transformers' list of named templates (the "default" one)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(
        isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
        for t in value
    ):
        named = {t["name"]: t["template"] for t in value}
        return named.get("default")
    raise UserError(f"tokenizer {path}", f"has chat_template {str(value)[:80]}",
                    "a string or a list of {name, template} objects")  # fmt: skip


class Tokenizer:
    def __init__(self, directory: Path | str) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.directory = Path(directory)
        tj = self.directory / "tokenizer.json"
        if not tj.is_file():
            raise UserError(
                "tokenizer", f"no tokenizer.json in {self.directory}", "a Hugging Face tokenizer directory"
            )
        try:
            self._tok = HFTokenizer.from_file(str(tj))
        except Exception as exc:
            raise UserError(
                "tokenizer", f"{tj} could not be parsed ({str(exc)[:120]})", "a valid tokenizer.json"
            ) from None
        cfg: dict[str, Any] = {}
        cj = self.directory / "tokenizer_config.json"
        if cj.is_file():
            try:
                cfg = json.loads(cj.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise UserError("tokenizer", f"{cj} is not valid JSON ({exc.msg})", "a JSON object") from None
            except UnicodeDecodeError as exc:
                raise UserError(
                    "tokenizer", f"{cj} is not UTF-8 (byte {exc.start})", "a UTF-8 JSON file"
                ) from None
            if not isinstance(cfg, dict):
                raise UserError("tokenizer", f"{cj} holds a {type(cfg).__name__}", "a JSON object")
        template = _chat_template(cfg.get("chat_template"), cj)
        tfile = self.directory / "chat_template.jinja"
        if template is None and tfile.is_file():
            try:
                template = tfile.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise UserError(
                    "chat template", f"{tfile} is not UTF-8 (byte {exc.start})", "a UTF-8 file"
                ) from None
        self._template: tuple[str, Any] | None = None  # (source, compiled), made on first use
        self.chat_template: str | None = template
        self.bos_token = _token_text(cfg.get("bos_token"), "bos_token", cj)
        self.eos_token = _token_text(cfg.get("eos_token"), "eos_token", cj)
        self.eos_token_ids: set[int] = set()
        for text in (self.eos_token, "<|im_end|>", "<|endoftext|>"):
            if text is not None:
                tid = self._tok.token_to_id(text)
                if tid is not None:
                    self.eos_token_ids.add(tid)
        self.vocab_size = self._tok.get_vocab_size()
        bos = self.bos_token
        self.bos_token_id: int | None = self._tok.token_to_id(bos) if bos is not None else None
        self.add_bos_token = self._adds_bos(cfg.get("add_bos_token"))

    def _adds_bos(self, configured: Any) -> bool:
        """Whether raw text starts with BOS: ``add_bos_token`` in the config, else the post-processor's choice."""
        if self.bos_token_id is None:
            return False
        if isinstance(configured, bool):
            return configured
        with_special = self._tok.encode("a", add_special_tokens=True).ids
        return bool(with_special) and with_special[0] == self.bos_token_id

    def encode_raw(self, text: str) -> list[int]:
        """Token ids of plain text (no chat template), with the BOS the tokenizer's config asks for."""
        ids = self.encode(text)
        if self.add_bos_token and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids.insert(0, self.bos_token_id)
        return ids

    def _encode(self, text: str, add_special_tokens: bool) -> Any:
        try:
            return self._tok.encode(text, add_special_tokens=add_special_tokens)
        except TypeError:  # tokenizers' answer to a str it cannot take: say which and why
            if not isinstance(text, str):
                raise UserError("text to tokenize", f"a {type(text).__name__}", "a str") from None
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise UserError(
                    "text to tokenize",
                    f"a lone surrogate U+{ord(text[exc.start]):04X} at character {exc.start}",
                    "valid Unicode text (surrogates only in pairs, as UTF-8 can encode)",
                ) from None
            raise

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self._encode(text, add_special_tokens).ids)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and each token's ``(start, end)`` character span in ``text``."""
        enc = self._encode(text, False)
        return list(enc.ids), [(int(a), int(b)) for a, b in enc.offsets]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=skip_special_tokens))

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render ``messages`` with the model's chat template (sandboxed Jinja2)."""
        if not self.chat_template:
            raise UserError(
                "chat template",
                f"the model's tokenizer ({self.directory}) has none, so it runs raw",
                "--raw (plain text prompt), or a model whose tokenizer has a chat template",
            )
        if self._template is None or self._template[0] != self.chat_template:
            from cscompile.decode.template import ChatTemplate

            self._template = (self.chat_template, ChatTemplate(self.chat_template))
        return self._template[1].render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )


class IncrementalDecoder:
    """The text of a growing token list, decoding only a short window per token (not the whole list).

    The window starts where the last complete text ended, so characters split across tokens and
    decoders that drop a leading space at a slice start both come out right; a trailing U+FFFD
    (an incomplete UTF-8 sequence) is held until the next token completes it.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""  # settled text: complete characters only
        self._prefix = 0
        self._read = 0

    def push(self, token: int) -> str:
        """Add one token; returns the settled text so far."""
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self._prefix : self._read])
        now = self.tokenizer.decode(self.ids[self._prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.text += now[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)
        return self.text

    def flush(self) -> str:
        """All text, including a trailing incomplete sequence (as U+FFFD)."""
        before = self.tokenizer.decode(self.ids[self._prefix : self._read])
        now = self.tokenizer.decode(self.ids[self._prefix :])
        return self.text + now[len(before) :]
