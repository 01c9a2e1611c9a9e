"""Universal vs task-conditioned measurement banks on SmolLM2's real FFN traces.

Each prompt of the shipped set (5 families × 10) is traced by dense prefill (the FFN input x and
channel activity s of a few layers). Prompts 0–7 of every family fit, 8–9 test. Three ways to
pick the sketch decoder (y = Φx → s) for a test prompt:

- **universal**: one decoder fitted on every family's fitting prompts;
- **family bank**: the decoder of the prompt's own family (an oracle of the task label);
- **k-means bank**: prompts clustered by a cheap prompt feature (mean of layer 0's FFN input
  over the prompt), one decoder per cluster; a test prompt takes the nearest centroid's bank at
  prefill — no label needed.

Support F1 against the oracle top-k on the test prompts' tokens.

    python tools/exp_banks.py          # ~3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cscompile.data.prompts import load_prompts
from cscompile.decode.tokenizer import Tokenizer
from cscompile.evaluation.plotting import pyplot
from cscompile.evaluation.report import machine_info, save_report
from cscompile.models.zoo import fetch
from cscompile.motifs.engine import LayeredEngine
from cscompile.motifs.segments import plan_segments
from cscompile.passes.pipeline import analyze
from cscompile.recovery.banks import BankSelector, kmeans, prompt_feature
from cscompile.recovery.operators import MeasurementOperator
from cscompile.recovery.solvers import SketchDecoder
from cscompile.recovery.supports import support_f1, topk_support

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("code", "math", "summarization", "dialogue", "retrieval")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 15, 29])
    ap.add_argument("--m", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--fracs", type=float, nargs="+", default=[0.10, 0.50])
    ap.add_argument("--max-prompt-tokens", type=int, default=768)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "banks.json")
    args = ap.parse_args(argv)

    art = fetch(args.model)
    tok = Tokenizer(art.tokenizer_dir)
    model, um = analyze(art.directory / "model.onnx")
    eng = LayeredEngine(plan_segments(model, um), args.threads)
    del model
    norms = {li: np.linalg.norm(eng.ffn[li].dense_weights()[:, 2, :], axis=1) for li in args.layers}
    prompts = []  # (family, index, {layer: (x, s)})
    for fam in FAMILIES:
        for i, p in enumerate(load_prompts(families=[fam])):
            ids = np.array(tok.encode(tok.apply_chat_template(p.messages)), np.int64)[
                : args.max_prompt_tokens
            ]
            rec: dict[int, tuple[np.ndarray, np.ndarray]] = {}

            def record(li: int, x: np.ndarray, a: np.ndarray, rec=rec) -> None:  # type: ignore[no-untyped-def]
                if li in norms:
                    rec[li] = (x.astype(np.float32), (np.abs(a) * norms[li]).astype(np.float32))

            eng.recorder = record
            eng.forward(ids[None], eng.new_state())
            eng.recorder = None
            prompts.append((fam, i, rec))
    fit = [p for p in prompts if p[1] < 8]
    test = [p for p in prompts if p[1] >= 8]
    feat = lambda p: prompt_feature(p[2][args.layers[0]][0])  # noqa: E731 - the cheap prompt feature
    cent, labels = kmeans(np.stack([feat(p) for p in fit]), len(FAMILIES))
    purity = float(
        np.mean([np.bincount([FAMILIES.index(fit[j][0]) for j in np.flatnonzero(labels == c)]).max() / max(1, (labels == c).sum()) for c in range(len(cent)) if (labels == c).any()])
    )  # fmt: skip
    rows = []
    for m in args.m:
        for li in args.layers:
            phi = MeasurementOperator("gaussian", m, eng.hidden, li).matrix

            def fit_on(group: list, li: int = li, phi: np.ndarray = phi) -> SketchDecoder:  # type: ignore[type-arg]
                x = np.concatenate([p[2][li][0] for p in group])
                s = np.concatenate([p[2][li][1] for p in group])
                return SketchDecoder(1e-3).fit(x @ phi.T, s)

            uni = fit_on(fit)
            fam_bank = {f: fit_on([p for p in fit if p[0] == f]) for f in FAMILIES}
            km_bank = {
                c: fit_on([fit[j] for j in np.flatnonzero(labels == c)])
                for c in range(len(cent))
                if (labels == c).any()
            }
            for p in test:
                x, s = p[2][li]
                c = BankSelector(cent).choose(feat(p))
                decs = {"universal": uni, "family bank": fam_bank[p[0]], "k-means bank": km_bank.get(c, uni)}
                y = x @ phi.T
                for name, dec in decs.items():
                    pred = dec.predict(y)
                    for frac in args.fracs:
                        k = round(frac * s.shape[1])
                        f1 = np.mean(
                            [
                                support_f1(topk_support(pred[t], k), topk_support(s[t], k))
                                for t in range(len(s))
                            ]
                        )
                        rows.append(
                            {
                                "m": m,
                                "layer": li,
                                "family": p[0],
                                "policy": name,
                                "fraction": frac,
                                "f1": float(f1),
                            }
                        )
    summary = {}
    for m in args.m:
        for frac in args.fracs:
            for name in ("universal", "family bank", "k-means bank"):
                vals = [
                    r["f1"] for r in rows if r["m"] == m and r["fraction"] == frac and r["policy"] == name
                ]
                summary[f"m={m} k={frac:.0%} {name}"] = float(np.mean(vals))
    report = {
        "command": "python tools/exp_banks.py",
        "machine": machine_info(),
        "layers": args.layers,
        "kmeans_purity": purity,
        "summary": summary,
        "rows": rows,
    }
    save_report(report, args.out, to_markdown, lambda path: plot(report, path))
    return 0


def to_markdown(report: dict) -> str:
    lines = ["| m | k | universal | family bank | k-means bank |", "|---|---|---|---|---|"]
    keys = sorted({tuple(k.split(" ")[:2]) for k in report["summary"]})
    for m, k in keys:
        vals = [report["summary"][f"{m} {k} {p}"] for p in ("universal", "family bank", "k-means bank")]
        lines.append(f"| {m[2:]} | {k[2:]} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    lines.append(
        f"\nSupport F1 on the test prompts (2 per family), layers {report['layers']}; k-means on the mean layer-0 "
        f"FFN input, cluster purity {report['kmeans_purity']:.2f}. {report['machine']['date']}, {report['machine']['processor']}."
    )
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    names = ("universal", "family bank", "k-means bank")
    keys = sorted({" ".join(k.split(" ")[:2]) for k in report["summary"]})
    w = 0.25
    for i, name in enumerate(names):
        ax.bar(np.arange(len(keys)) + i * w, [report["summary"][f"{k} {name}"] for k in keys], w, label=name)
    ax.set_xticks(np.arange(len(keys)) + w, keys)
    ax.set_ylabel("support F1")
    ax.set_title("Universal vs task-conditioned sketch decoders")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
