"""Chat templates are bounded: a template that would run forever or blow up ends in one line."""

import time

import pytest

from cscompile.decode import template as tmpl
from cscompile.decode.template import ChatTemplate
from cscompile.errors import UserError

MSGS = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_an_ordinary_template_renders_as_jinja_does():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    want = (
        ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        .from_string(CHATML)
        .render(messages=MSGS, add_generation_prompt=True)
    )
    assert ChatTemplate(CHATML).render(messages=MSGS, add_generation_prompt=True) == want


@pytest.mark.parametrize(
    "source, what",
    [
        ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "steps"),
        ("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}", "steps"),
        ("{{ 'x' * 100000000 }}", "repeats"),
        ("{{ 10 ** 100000000 }}", "power"),
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursed"),
        ("{% for i in range(99999) %}{{ 'y' * 99999 }}{% endfor %}", "characters"),
    ],
)
def test_runaway_templates_end_in_one_line(source, what, monkeypatch):
    monkeypatch.setattr(tmpl, "MAX_STEPS", 50_000)  # the same rule, reached sooner
    monkeypatch.setattr(tmpl, "MAX_CHARS", 1 << 18)
    t0 = time.perf_counter()
    with pytest.raises(UserError, match=what) as err:
        ChatTemplate(source).render(messages=MSGS)
    assert "\n" not in str(err.value)
    assert time.perf_counter() - t0 < 3 * tmpl.MAX_SECONDS + 5


def test_the_time_bound_holds_for_slow_steps(monkeypatch):
    monkeypatch.setattr(tmpl, "MAX_SECONDS", 0.05)
    monkeypatch.setattr(tmpl, "MAX_STEPS", 10**12)
    with pytest.raises(UserError, match="did not finish"):
        ChatTemplate("{% for i in range(10**8) %}{{ i }}{% endfor %}").render(messages=MSGS)


def test_the_tokenizer_uses_the_bounded_renderer(tiny_dir, monkeypatch):
    monkeypatch.setattr(tmpl, "MAX_STEPS", 50_000)
    from cscompile.decode.tokenizer import Tokenizer

    tok = Tokenizer(tiny_dir("llama-2l") / "tokenizer")
    tok.chat_template = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    with pytest.raises(UserError, match="chat template"):
        tok.apply_chat_template(MSGS)
