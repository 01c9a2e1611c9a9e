"""``cscompile run``: generate text from a model, streaming."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from cscompile.cli.commands.common import THREADS, FloatIn, IntIn, console, err_console


@click.command("run")
@click.argument("model")
@click.argument("prompt")
@click.option("-n", "--max-new-tokens", default=128, show_default=True, type=IntIn(0, None))
@click.option("--temperature", default=0.0, show_default=True, type=FloatIn(0, None), help="0 = greedy.")
@click.option("--top-k", default=0, show_default=True, type=IntIn(0, None), help="0 = off.")
@click.option("--top-p", default=1.0, show_default=True, type=FloatIn(0, 1, min_open=True))
@click.option("--seed", type=IntIn(0, None), default=None, help="Seed for sampling (reproducible output).")
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option(
    "--chat/--raw",
    default=None,
    help="Wrap the prompt in the model's chat template (default: when the model has one), or run it as "
    "plain text (BOS added when the tokenizer's config says so).",
)
@click.option("--threads", type=THREADS, default=None, help="Intra-op threads (default: all cores).")
@click.option("--stats", is_flag=True, help="Print timings after the text.")
@click.option(
    "--engine",
    default=None,
    help="Bundle engine to run: a name from `cscompile inspect`, or 'motifs' for the switching runtime "
    "over every motif engine (default: the native engine when the bundle has one, else the dense one).",
)
@click.option(
    "--head",
    type=click.Choice(["auto", "full", "sensed"]),
    default="auto",
    show_default=True,
    help="The native engine's LM head in greedy decoding. auto: the bundle's sensed vocabulary head when "
    "it has one (a 4-bit preview of the head picks K candidates whose exact logits decide; the full "
    "head runs whenever the margin calibrated at build time is not met: the same tokens, fewer bytes "
    "read); full: always the whole head; sensed: require it, and sample from it too (the candidates' exact "
    "logits, the preview's elsewhere: an approximation of the full distribution, measured in BENCHMARKS.md). "
    "auto samples from the full head.",
)
@click.option(
    "--slo-ms-per-token",
    type=FloatIn(0, None, min_open=True),
    default=None,
    help="Bundles built with --pareto: run the best-quality front point predicted within this decode latency.",
)
@click.option(
    "--max-ppl-increase",
    type=FloatIn(0, None),
    default=None,
    help="Bundles built with --pareto: run the fastest front point within this perplexity increase (0.05 = +5%).",
)
@click.option(
    "--prompt-budget",
    default=None,
    metavar="R|N",
    help="Compress the prompt first (bundles built with --prompt-scorer): keep a fraction R in (0, 1] of "
    "the context, or at most N prompt tokens. The question (PROMPT's last paragraph, or PROMPT itself "
    "with --context) and --instruction are always kept.",
)
@click.option(
    "--latency-budget",
    type=FloatIn(0, None, min_open=True),
    default=None,
    metavar="MS",
    help="Compress the prompt as little as possible to finish this request in MS milliseconds end to end "
    "(scorer + prefill + decoding --max-new-tokens), from the bundle's calibrated grid and costs measured on "
    "this machine (once, cached). Bundles built with --prompt-scorer.",
)
@click.option(
    "--context",
    "context_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="With --prompt-budget: read the context from this file; PROMPT is then the question.",
)
@click.option(
    "--instruction", default="", help="With --prompt-budget: an instruction kept before the context."
)
@click.option(
    "--keep",
    multiple=True,
    metavar="REGEX",
    help="With --prompt-budget: never drop words matching REGEX (repeatable).",
)
@click.option(
    "--prompt-order",
    type=click.Choice(["original", "relevance"]),
    default="original",
    show_default=True,
    help="With --prompt-budget: kept sentences in text order, or the most relevant last (next to the "
    "question; measured best for retrieval).",
)
@click.option(
    "--show-compressed", is_flag=True, help="With --prompt-budget: print the compressed prompt first."
)
def run(model: str, prompt: str, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
        seed: int | None, stop: tuple[str, ...], chat: bool | None, threads: int | None, stats: bool,
        engine: str | None, head: str, slo_ms_per_token: float | None, max_ppl_increase: float | None,
        prompt_budget: str | None, context_file: Path | None, instruction: str, keep: tuple[str, ...],
        prompt_order: str, show_compressed: bool, latency_budget: float | None) -> None:  # fmt: skip
    """Generate from MODEL (a name such as smollm2, a model directory / .onnx, or a bundle) given PROMPT."""
    from cscompile.cli.commands.bundle_cmds import open_generator
    from cscompile.errors import UserError
    from cscompile.runtime import GenerationConfig, GenerationStats

    cfg = GenerationConfig(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop=stop
    )
    cfg.validate()  # before the model loads
    st = GenerationStats()
    compress: dict[str, Any] = {}
    if prompt_budget is not None and latency_budget is not None:
        raise UserError("--prompt-budget and --latency-budget", "both given", "one of them")
    if prompt_budget is not None or latency_budget is not None:
        from cscompile.prompt import PromptBudget

        if prompt_budget is not None:
            compress["prompt_budget"] = PromptBudget.parse(prompt_budget, keep=keep, order=prompt_order)
        else:
            compress["prompt_budget"] = PromptBudget(latency_ms=latency_budget, keep=keep, order=prompt_order)
            compress["prompt_budget"].validate()
        compress["instruction"] = instruction
        if context_file is not None:
            compress["question"] = prompt
            try:
                prompt = context_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise UserError(
                    "--context", f"{context_file} cannot be read ({exc})", "a UTF-8 text file"
                ) from None
    elif context_file is not None or instruction or keep or show_compressed:
        raise UserError(
            "--context/--instruction/--keep/--show-compressed",
            "given without --prompt-budget or --latency-budget",
            "--prompt-budget or --latency-budget",
        )
    with open_generator(model, threads, engine, slo_ms_per_token, max_ppl_increase, head) as tm:
        if compress and not hasattr(tm, "compress"):
            raise UserError(
                "--prompt-budget/--latency-budget", f"for {model}", "a bundle built with --prompt-scorer"
            )
        if chat is None:  # a model without a chat template runs raw
            chat = bool(getattr(tm.tokenizer, "chat_template", None))
        events = tm.stream(prompt, cfg, chat=chat, stats=st, **compress)
        done = tm.last_compression if compress else None
        for note in done.notes if done is not None else ():
            err_console.print(f"[yellow]note:[/yellow] {note}")
        if show_compressed and done is not None:
            console.print("[dim]--- compressed prompt ---[/dim]")
            console.print(done.text, markup=False, highlight=False)
            console.print("[dim]--- answer ---[/dim]")
        for ev in events:
            click.echo(ev.text, nl=False)
        switch_state = getattr(tm.session, "last_state", None)
        chosen = getattr(getattr(tm, "engine", None), "name", None)
        kind = getattr(getattr(tm, "engine", None), "kind", None)
    click.echo()
    if stats:
        if chosen is not None and (slo_ms_per_token is not None or max_ppl_increase is not None):
            console.print(f"[dim]front point: {chosen}[/dim]")
        elif chosen is not None:
            console.print(f"[dim]engine: {chosen} ({kind})[/dim]")
        console.print(
            f"[dim]prompt {st.prompt_tokens} tok | new {st.new_tokens} tok ({st.stop_reason}) | prefill {st.prefill_ms:.1f} ms | "
            f"decode {st.decode_ms_median:.2f} ms/tok median, p90 {st.decode_ms_p90:.2f} | {st.tokens_per_s:.1f} tok/s[/dim]"
        )
        if st.head_steps:
            console.print(
                f"[dim]sensed head: {st.head_steps} greedy steps, {st.head_fallbacks} ran the full head "
                f"({st.head_fallbacks / st.head_steps:.1%})[/dim]"
            )
        if compress:
            console.print(
                f"[dim]prompt compression: {st.prompt_tokens_original} → {st.prompt_tokens} tok "
                f"({st.prompt_tokens_removed} removed) | scorer {st.compress_ms:.1f} ms | TTFT {st.ttft_ms:.1f} ms[/dim]"
            )
        if switch_state is not None:
            s = switch_state.stats.summary()
            times = (
                f"engine {s['engine_ms_per_step']:.2f} ms/step"  # one call a step (the native engine)
                if s["engine_ms_per_step"]
                else f"ORT {s['ort_ms_per_step']:.2f} ms/step | FFN {s['ffn_ms_per_step']:.2f} ms/step"
            )
            console.print(
                f"[dim]motifs {s['motif_histogram']} | FFN executed {s['executed_fraction']:.1%} | "
                f"fallbacks {s['fallbacks']} | switches {s['switches']} | {times} | "
                f"control {s['control_ms_per_step']:.2f} ms/step[/dim]"
            )
