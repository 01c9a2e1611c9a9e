"""Commands on bundles: ``cscompile verify``, ``cscompile bench``, and the bundle side of ``run``/``inspect``."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from cscompile.cli.commands.common import (
    THREADS,
    IntIn,
    console,
    err_console,
    prompt_options,
    resolve_model_dir,
)
from cscompile.errors import UserError

#: Families ``bench`` uses by default (retrieval prompts are long prefills, not decode).
BENCH_FAMILIES = ("code", "math", "summarization", "dialogue")


def bundle_path(model: str) -> Path | None:
    """The bundle ``model`` names (a ``.csb`` file or bundle directory), or None for anything else.

    Model names from the zoo keep their meaning even if a bundle of that name sits in the
    working directory.
    """
    from cscompile.models.zoo import ZOO
    from cscompile.runtime.bundle import is_bundle

    if model in ZOO:
        return None
    path = Path(model).expanduser()
    return path if is_bundle(path) else None


@contextlib.contextmanager
def open_generator(
    model: str,
    threads: int | None,
    engine: str | None = None,
    slo_ms_per_token: float | None = None,
    max_ppl_increase: float | None = None,
    head: str = "auto",
) -> Iterator[Any]:
    """A :class:`TextModel` for a model name/directory/.onnx, or a :class:`BundleModel` for a bundle.

    Both have ``stream``/``generate``; a bundle is closed when the block ends.
    """
    from cscompile.runtime import load, load_text_model

    bp = bundle_path(model)
    if bp is None:
        if (
            engine is not None
            or slo_ms_per_token is not None
            or max_ppl_increase is not None
            or head == "sensed"
        ):
            raise UserError(
                "--engine / --slo-ms-per-token / --max-ppl-increase / --head sensed",
                f"given for {model}",
                "a bundle (engines, fronts and sensed heads exist only in bundles)",
            )
        yield load_text_model(resolve_model_dir(model), threads=threads)
        return
    with load(bp, threads=threads, engine=engine, slo_ms_per_token=slo_ms_per_token,
              max_ppl_increase=max_ppl_increase, head=head) as bm:  # fmt: skip
        yield bm


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def _print_native_front(out: Console, section: dict[str, Any], engines: list[dict[str, Any]]) -> None:
    """The native engine's width × depth × precision front: one row per point, the whole model first."""
    from cscompile.native.points import NativeConfig

    table = Table("engine", "predicted ms/token", "perplexity", "query heads kept", "FFN blocks kept",
                  "layers dropped", "8-bit units", "LM head bits",
                  title="Pareto front of the native engine (latency predicted on the build machine; pick with "
                  "--slo-ms-per-token or --max-ppl-increase)")  # fmt: skip
    dense = section.get("dense", {})
    table.add_row(str(section.get("reference")), f"{dense.get('latency_ms_pred', float('nan')):.2f}", "+0.0%",
                  "all", "all", "0", "0", "8")  # fmt: skip
    for e in engines:
        cfg = e.get("params", {}).get("search")
        sw = e.get("params", {}).get("switch")
        if e.get("kind") == "native" and isinstance(sw, dict):  # motifs switched per token
            share = e["params"].get("share_pred", float("nan"))
            table.add_row(e["name"], f"{e['params']['latency_ms_pred']:.2f}", f"{e['profile']['ppl_increase']:+.1%}",
                          f"per token: {' ↔ '.join(map(str, sw.get('motifs', [])))}",
                          f"{share:.0%} of steps on the cheaper", "", "", "")  # fmt: skip
            continue
        if not cfg or e.get("kind") != "native":
            continue
        n = NativeConfig.from_dict(cfg).counts()
        table.add_row(
            e["name"],
            f"{e['params']['latency_ms_pred']:.2f}",
            f"{e['profile']['ppl_increase']:+.1%}",
            *(str(n[k]) for k in ("heads", "blocks", "dropped", "q8")),
            str(cfg.get("head_bits", 8)),
        )
    out.print(table)


def _print_front(out: Console, section: dict[str, Any], engines: list[dict[str, Any]]) -> None:
    """The depth × precision front of a ``--pareto`` bundle: one row per point, dense first."""
    if section.get("engine") == "native":
        _print_native_front(out, section, engines)
        return
    table = Table("engine", "predicted ms/token", "perplexity", "layers kept", "FFNs kept", "re-rounded units", "head",
                  title="Pareto front (latency predicted on the build machine; pick with --slo-ms-per-token "
                  "or --max-ppl-increase)")  # fmt: skip
    dense = section.get("dense", {})
    table.add_row(
        "dense", f"{dense.get('latency_ms_pred', float('nan')):.2f}", "+0.0%", "all", "all", "0", "q8"
    )
    nat = section.get("native")
    if isinstance(nat, dict):
        table.add_row(
            f"{nat.get('engine')} (native step)", f"{nat.get('latency_ms_pred', float('nan')):.2f}",
            f"{nat.get('ppl_increase', float('nan')):+.1%}", "all", "all", "0", "q8",
        )  # fmt: skip
    for e in engines:
        cfg = e.get("params", {}).get("search")
        if not cfg:
            continue
        layers = cfg["layers"]
        table.add_row(
            e["name"],
            f"{e['params']['latency_ms_pred']:.2f}",
            f"{e['profile']['ppl_increase']:+.1%}",
            str(sum(x != "drop" for x in layers)),
            str(sum("ffn=exact" in x or "ffn=rtn" in x for x in layers)),
            str(sum(x.count("rtn") for x in layers)),
            cfg["head"],
        )
    out.print(table)


def _print_vocab(out: Console, v: Any) -> None:
    """The native engine's sensed vocabulary head: the plan and what the build measured per K."""
    if not isinstance(v, dict) or not isinstance(v.get("table"), list):
        out.print("sensed vocabulary head: unreadable section")
        return
    spec: dict[str, Any] = v["preview"] if isinstance(v.get("preview"), dict) else {}
    preview, head = spec.get("bytes", 0), v.get("head_bytes") or 0
    planes = spec.get("layout") == "planes"
    out.print(
        f"sensed vocabulary head (native engine, greedy steps): {v.get('bits')}-bit preview "
        + (f"= the head's high bit plane, stored {_mb(preview)}" if planes else _mb(preview))
        + (f" (+{preview / head:.0%} of the head's {_mb(head)})" if head else "")
        + (f", reads {_mb(spec.get('reads_bytes', 0))} per token" if planes else "")
        + f", K = {v.get('k')}, margin tau = {v.get('tau', float('nan')):.4g} x e_n |x| (calibrated on "
        f"{v.get('calib_tokens')} tokens; held-out largest error {v.get('heldout_worst_over_tau', float('nan')):.2f} tau)"
    )
    table = Table("K", "fallback to the full head", "greedy agreement", "argmax among candidates",
                  "misses let through", "expected bytes read / token", "sampling TV (T=1)",
                  title=f"sensed head on {v.get('heldout_tokens')} held-out tokens (build time)")  # fmt: skip
    for r in v["table"]:
        mark = " ← chosen" if r.get("k") == v.get("k") else ""
        table.add_row(f"{r.get('k')}{mark}", f"{r.get('fallback', 0):.1%}", f"{r.get('agree', 0):.2%}",
                      f"{r.get('in_topk', 0):.2%}", str(r.get("misses_passed")),
                      _mb(int(r.get("expected_bytes_per_token", 0))), f"{r.get('tv_t1.0', float('nan')):.2g}")  # fmt: skip
    out.print(table)


def inspect_bundle(path: Path, as_json: bool) -> None:
    """``cscompile inspect BUNDLE``: the manifest summary (every file is verified first)."""
    from cscompile.bundle import BundleError, open_bundle
    from cscompile.bundle.format import check_environment

    with open_bundle(path, check_requires=False) as b:
        m = b.manifest
        build = b.read_json(b.sections["build"]) if "build" in b.sections else {}
        try:
            check_environment(m["requires"], str(path))
            runnable = "yes"
        except BundleError as exc:
            runnable = f"no ({exc.received})"
        if as_json:
            doc = {"content_hash": b.content_hash, "manifest": m, "build": build, "runnable_here": runnable}
            click.echo(json.dumps(doc, indent=2, sort_keys=True))
            return
        out = Console(width=120, highlight=False)
        total = sum(e["size"] for e in m["files"].values())
        form = "archive" if b.archive else "directory"
        out.print(f"[bold]bundle {path}[/bold] ({form}): {len(m['files'])} files, {_mb(total)}")
        out.print(f"content hash {b.content_hash}")
        out.print(f"source: {m['source']['name']} (sha256 {m['source']['sha256'][:16]}…)")
        req = m["requires"]
        opsets = ", ".join(f"{d or 'ai.onnx'} {v}" for d, v in sorted(req["opsets"].items()))
        out.print(
            f"requires: onnxruntime >= {req['onnxruntime_min']}, opsets {opsets}, target {req['target']}; "
            f"runnable here: {runnable}"
        )
        made = m["created_by"]
        out.print(f"created by cscompile {made['cscompile']} with onnxruntime {made['onnxruntime']}")
        if build:
            keys = ("precision", "target", "block_size", "seed", "max_engines")
            out.print("build: " + ", ".join(f"{k.replace('_', ' ')} {build.get(k)}" for k in keys))
        gate = build.get("gate") if build else None
        if gate:
            out.print(
                f"correctness gate: {gate['sequences']} sequences, prefill {gate['prefill']} + {gate['steps']} "
                "cached decode steps vs the source through ONNX Runtime"
            )
            for name, g in sorted(gate["engines"].items()):
                out.print(
                    f"  {name}: max |Δlogit| {g['max_abs']:.3g} ({g['max_rel']:.2g} of scale), "
                    f"mean KL {g['mean_kl']:.3g}, top-1 {g['top1']:.0%}"
                    + (" — dropped" if g.get("dropped") else "")
                    + f"; tolerance {', '.join(f'{k} {v}' for k, v in g['tolerance'].items())}"
                    + (f"; reference: {g['reference']}" if g.get("reference") else "")
                )
        else:
            out.print("correctness gate: no record (built before the gate)")
        engines = Table("engine", "kind", "file", "size", "params", title="engines")
        for e in m["engines"]:
            params = ", ".join(
                f"{k}={v}" for k, v in sorted(e["params"].items()) if v is not None and k != "search"
            )
            engines.add_row(e["name"], e["kind"], e["file"], _mb(m["files"][e["file"]]["size"]), params)
        out.print(engines)
        native = any(e["kind"] == "native" and "search" not in e["params"] for e in m["engines"])
        out.print(
            "serving (`cscompile serve`): "
            + (
                "the native engine batches the running sequences (one decode call per token for all of them)"
                if native
                else "one sequence per step (only the native engine batches; this bundle has none)"
            )
        )
        if "vocab" in b.sections:
            _print_vocab(out, b.read_json(b.sections["vocab"]))
        if "pareto" in b.sections:
            _print_front(out, b.read_json(b.sections["pareto"]), m["engines"])
        files = Table("file", "size", "sha256", title="files")
        for rel, entry in sorted(m["files"].items()):
            files.add_row(rel, _mb(entry["size"]), entry["sha256"][:16] + "…")
        out.print(files)
        sections = ", ".join(f"{k} = {v}" for k, v in sorted(m["sections"].items()))
        out.print(f"sections: {sections or '-'}; tokenizer: {m['tokenizer'] or '-'}")


@click.command("verify")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option(
    "--skip-requires",
    is_flag=True,
    help="Skip the checks of this machine (onnxruntime version, opsets, target): integrity only.",
)
def verify_cmd(bundle: Path, skip_requires: bool) -> None:
    """Check every file, hash and ONNX header of BUNDLE and whether this machine can run it."""
    from cscompile.bundle import verify_bundle
    from cscompile.compiler.gate import check_record

    report = verify_bundle(bundle, check_requires=not skip_requires)
    warning = check_record(report.build, report.engine_entries, f"bundle {bundle}")  # the gate's record
    if warning:
        click.echo(f"warning: {warning}", err=True)
    click.echo(report.summary())


def _bench_prompts(prompts_path: Path | None, families: tuple[str, ...], per_family: int) -> list[Any]:
    from cscompile.data.prompts import load_prompts

    if prompts_path is not None and not families:
        return load_prompts(prompts_path)[: per_family * len(BENCH_FAMILIES)]
    chosen = list(families) or list(BENCH_FAMILIES)
    out: list[Any] = []
    for fam in chosen:
        out += load_prompts(prompts_path, [fam])[:per_family]
    return out


@click.command("bench")
@click.argument("bundle", type=click.Path(path_type=Path), required=False)
@click.option("--model", "dense_model", default=None, help="The dense source model to compare with.")
@prompt_options
@click.option("--per-family", default=2, show_default=True, type=IntIn(1, None), help="Prompts per family.")
@click.option("-n", "--max-new-tokens", default=64, show_default=True, type=IntIn(2, None))
@click.option("--threads", type=THREADS, default=None)
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Write the report.")
@click.option(
    "--peers", is_flag=True,
    help="Measure cscompile against PyTorch, llama.cpp and onnxruntime-genai on --model (default smollm2), "
    "each in its own process; BUNDLE (optional) is the cscompile bundle to run.",
)  # fmt: skip
@click.option(
    "--systems", "peer_systems", default=None, help="With --peers: a comma-separated subset of the systems."
)
def bench_cmd(bundle: Path | None, dense_model: str | None, prompts_path: Path | None, families: tuple[str, ...],
              per_family: int, max_new_tokens: int, threads: int | None, json_out: Path | None,
              peers: bool, peer_systems: str | None) -> None:  # fmt: skip
    """Decode ms/token and tokens/s of BUNDLE's engine, against the dense --model when given.

    One process, the same prompts (chat template applied), greedy, a fixed number of new
    tokens; the systems alternate per prompt and the order flips every prompt, so machine
    noise hits both alike. Timings are reported, never asserted. With --peers: cscompile
    against the systems a user would pick instead (docs/usage.md, "Peers").
    """
    if peers:
        _bench_peers(bundle, dense_model or "smollm2", peer_systems, per_family, max_new_tokens, threads, json_out,
                     prompts_path, families)  # fmt: skip
        return
    if bundle is None:
        raise UserError("cscompile bench", "no BUNDLE given", "a bundle path, or --peers")
    from cscompile.cache import atomic_write_json
    from cscompile.decode.generate import TextModel
    from cscompile.decode.session import DecoderSession
    from cscompile.decode.tokenizer import Tokenizer
    from cscompile.evaluation.harness import OrtSystem, run_prompts, summarize
    from cscompile.evaluation.report import chat_encoder, machine_info
    from cscompile.model_config import read_context_length
    from cscompile.runtime import load

    with contextlib.ExitStack() as stack:
        bm = stack.enter_context(load(bundle, threads=threads, spinning=dense_model is None))
        content = bm.content_hash
        systems = [OrtSystem(bm.text_model, name=f"bundle {bundle.name}")]
        if dense_model is not None:
            from cscompile.decode.generate import model_paths

            onnx_path, tok_dir = model_paths(resolve_model_dir(dense_model))
            session = DecoderSession(onnx_path, threads=threads, spinning=False)
            tm = TextModel(session, Tokenizer(tok_dir), read_context_length(onnx_path.parent))
            systems.append(OrtSystem(tm, name=f"dense {onnx_path.parent.name}"))
        encode = chat_encoder(bm.text_model)
        decode = bm.tokenizer.decode
        limit = bm.context_length
        prompts, skipped = [], 0
        for p in _bench_prompts(prompts_path, families, per_family):
            if limit is not None and len(encode(p)) + max_new_tokens > limit:
                skipped += 1
            else:
                prompts.append(p)
        if not prompts:
            raise UserError(
                "bench prompts",
                f"all {skipped} prompts + {max_new_tokens} new tokens exceed the context of {limit}",
                "shorter prompts (--prompts FILE) or a smaller --max-new-tokens",
            )
        for s in systems:  # warm-up: first-run allocations, thread pools
            s.generate_ids(encode(prompts[0]), 4)
        runs: dict[str, list[Any]] = {s.name: [] for s in systems}
        texts: dict[str, list[str]] = {s.name: [] for s in systems}
        for i, p in enumerate(prompts):
            for s in systems if i % 2 == 0 else systems[::-1]:
                r = run_prompts(s, [p], encode, decode, max_new_tokens)[0]
                runs[s.name].append(r)
                texts[s.name].append(r.text)
            err_console.print(f"[dim][{i + 1}/{len(prompts)}] {p.id}[/dim]")
    rows: list[dict[str, Any]] = [{"system": s.name, **summarize(runs[s.name])["overall"]} for s in systems]
    base = rows[-1] if dense_model is not None else None
    table = Table(
        "system", "decode ms/tok", "p90", "tok/s", "prefill ms", "vs dense", title="cscompile bench"
    )
    for row in rows:
        speedup = base["decode_ms_median"] / row["decode_ms_median"] if base else None
        row["decode_speedup_vs_dense"] = speedup
        table.add_row(
            row["system"],
            f"{row['decode_ms_median']:.2f}",
            f"{row['decode_ms_p90']:.2f}",
            f"{row['tokens_per_s']:.1f}",
            f"{row['prefill_ms_median']:.1f}",
            f"{speedup:.2f}x" if speedup else "-",
        )
    console.print(table)
    same = None
    if base is not None:
        a, b = texts[systems[0].name], texts[systems[1].name]
        same = sum(x == y for x, y in zip(a, b))
        console.print(f"greedy text identical to dense on {same}/{len(prompts)} prompts")
    if skipped:
        console.print(
            f"{skipped} prompts skipped: longer than the context of {limit} with {max_new_tokens} new tokens"
        )
    if json_out:
        report = {
            "bundle": str(bundle),
            "content_hash": content,
            "dense_model": dense_model,
            "machine": machine_info(),
            "threads": threads,
            "new_tokens": max_new_tokens,
            "prompts": [p.id for p in prompts],
            "results": rows,
            "greedy_identical": same,
        }
        atomic_write_json(json_out, report)
        console.print(f"report written to {json_out}")


def _bench_peers(bundle: Path | None, model: str, systems: str | None, per_family: int, new_tokens: int,
                 threads: int | None, json_out: Path | None, prompts_path: Path | None,
                 families: tuple[str, ...]) -> None:  # fmt: skip
    from cscompile.cache import atomic_write_json
    from cscompile.evaluation.peers import headline, run_peer_bench, to_markdown

    report = run_peer_bench(
        model=model,
        systems=systems.split(",") if systems else None,
        bundle=bundle,
        threads=threads or 2,
        per_family=per_family,
        new_tokens=new_tokens,
        say=lambda m: err_console.print(f"[dim]{m}[/dim]"),
        prompts_path=prompts_path,
        families=families,
    )
    report["command"] = "cscompile bench --peers"
    click.echo(to_markdown(report))
    click.echo(headline(report))
    if json_out:
        atomic_write_json(json_out, report)
        console.print(f"report written to {json_out}")
