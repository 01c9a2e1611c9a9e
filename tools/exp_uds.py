"""Uncertainty-driven sensing on SmolLM2: is m_t = clip(m0 + γ·H(p_{t−1}), m_min, m_max) worth it, and
is the loop stable on real decoding? (issue 4, item 6)

The FFN density is fixed (``--fraction`` of every layer's channels, uniform); only the sensing
budget m varies. Predictors (Gaussian Φ + ridge decoder per layer) are fitted at every m of
``--m`` on calibration text; everything is then measured on held-out text:

1. recovery error against m — e(m): the relative FFN-output error of the predicted support
   (‖(a ⊙ ¬S) W_down‖² / ‖a W_down‖², over layers and positions), and its log-log slope;
2. entropy sensitivity to support error — per position, the next-token entropy change against
   dense, ΔH_t, regressed on that position's support error e_t (all m pooled): a = dΔH/de;
3. the loop gain — linearizing H_t ≈ H*_t + a·e(m_t) and e(m) ≈ e(m̄) + e'·(m − m̄) around the
   mean budget m̄, one step of m_t = m0 + γ·H_{t−1} gives ∂H_t/∂H_{t−1} = γ·a·e'. |g| < 1: a
   disturbance in entropy dies out instead of ringing (the feedback is negative when a > 0, e' < 0);
4. real decoding, teacher-forced on the held-out text through the motif engine's decode kernel
   (one token at a time, KV cache): fixed m at every level vs UDS with γ set so m spans
   [m_min, m_max] between the 10th and 90th entropy percentiles — perplexity, mean KL to dense,
   the m_t trace (mean, saturation, lag-1 autocorrelation, sign alternation of Δm).

    python tools/exp_uds.py            # ~10 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from cscompile.decode.tokenizer import Tokenizer
from cscompile.evaluation.plotting import pyplot
from cscompile.evaluation.report import machine_info, save_report
from cscompile.metrics import log_softmax, reference_corpus
from cscompile.models.zoo import fetch
from cscompile.motifs.engine import LayeredEngine, Motif, fit_predictors
from cscompile.motifs.family import mean_kl
from cscompile.motifs.kernel import predicted_support
from cscompile.motifs.runtime import entropy
from cscompile.motifs.segments import plan_segments
from cscompile.passes.pipeline import analyze

ROOT = Path(__file__).resolve().parents[1]


def _entropies(logits: np.ndarray) -> np.ndarray:
    return np.array([entropy(row) for row in logits.reshape(-1, logits.shape[-1])])


def _nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    lp = log_softmax(logits.astype(np.float64))
    return -lp[np.arange(len(targets)), targets]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--m", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    ap.add_argument("--fraction", type=float, default=0.75)
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--probe-tokens", type=int, default=1024, help="held-out tokens for e(m), a")
    ap.add_argument("--decode-tokens", type=int, default=512, help="teacher-forced decode steps per policy")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "uds.json")
    args = ap.parse_args(argv)
    ms = sorted(args.m)

    art = fetch(args.model)
    ids = np.array(Tokenizer(art.tokenizer_dir).encode(reference_corpus()), np.int64)
    probe = ids[: args.probe_tokens]
    decode = ids[args.probe_tokens : args.probe_tokens + args.decode_tokens + 1]
    calib = ids[args.probe_tokens + args.decode_tokens + 1 :][: args.calib_tokens]
    model, um = analyze(art.directory / "model.onnx")
    eng = LayeredEngine(plan_segments(model, um), args.threads)
    del model
    inter, n_layers = eng.intermediate, eng.num_layers
    k = round(args.fraction * inter)
    t0 = time.time()
    preds = {m: fit_predictors(eng, calib, m=m, seed=0) for m in ms}
    motifs = {m: Motif(f"m{m}", [k] * n_layers, preds[m]) for m in ms}
    fit_s = time.time() - t0
    print(f"predictors fitted at m={ms} in {fit_s:.0f} s", file=sys.stderr)

    # 1-2: per-position support error and entropy change, evaluation mode over the probe text
    downs = [f.dense_weights()[:, 2, :] for f in eng.ffn]
    dense = eng.forward(probe[None], eng.new_state())[0]
    h_dense = _entropies(dense)
    err_tok: dict[int, np.ndarray] = {}
    dh: dict[int, np.ndarray] = {}
    kl_probe: dict[int, float] = {}
    eng.sparse_prefill = True
    for m in ms:
        num = np.zeros(len(probe))
        den = np.zeros(len(probe))

        def record(li: int, x: np.ndarray, a: np.ndarray, m: int = m, num=num, den=den) -> None:  # noqa: ANN001
            p = preds[m][li]
            mask = predicted_support(x, p.phi, p.decoder, p.bias, k, 0)
            full = a @ downs[li]
            miss = (a * ~mask) @ downs[li]
            num += (miss**2).sum(-1)
            den += (full**2).sum(-1)

        eng.recorder = record
        try:
            out = eng.forward(probe[None], eng.new_state(), motifs[m])[0]
        finally:
            eng.recorder = None
        err_tok[m] = num / np.maximum(den, 1e-30)
        dh[m] = _entropies(out) - h_dense
        kl_probe[m] = mean_kl(dense, out)
        print(
            f"m={m}: e={err_tok[m].mean():.4f}  mean dH={dh[m].mean():+.4f}  KL={kl_probe[m]:.4f}",
            file=sys.stderr,
        )
    eng.sparse_prefill = False
    e_mean = np.array([err_tok[m].mean() for m in ms])
    slope_loglog = float(np.polyfit(np.log(ms), np.log(e_mean), 1)[0])
    e_all = np.concatenate([err_tok[m] for m in ms])
    dh_all = np.concatenate([dh[m] for m in ms])
    a_sens = float(np.polyfit(e_all, dh_all, 1)[0])
    corr = float(np.corrcoef(e_all, dh_all)[0, 1])

    # 4: teacher-forced decoding, one token at a time through the kernel
    h_lo, h_hi = (float(q) for q in np.quantile(h_dense, [0.1, 0.9]))
    m_min, m_max = ms[0], ms[-1]
    gamma = (m_max - m_min) / max(h_hi - h_lo, 1e-6)
    m0 = m_min - gamma * h_lo
    m_bar = float(np.clip(m0 + gamma * np.median(h_dense), m_min, m_max))
    # e'(m̄) from the measured curve (finite difference between the levels around m̄)
    j = int(np.clip(np.searchsorted(ms, m_bar), 1, len(ms) - 1))
    e_prime = float((e_mean[j] - e_mean[j - 1]) / (ms[j] - ms[j - 1]))
    gain = gamma * a_sens * e_prime
    # the same gain measured directly: mean entropy change per unit of m around m̄ (no error proxy)
    dh_mean = np.array([dh[m].mean() for m in ms])
    dh_dm = float((dh_mean[j] - dh_mean[j - 1]) / (ms[j] - ms[j - 1]))
    dh_dm_fit = float(np.polyfit(ms, dh_mean, 1)[0])
    gain_direct = gamma * dh_dm_fit

    dense_dec = eng.forward(decode[None, :-1], eng.new_state())[0]  # row t: after token t

    def run(choose) -> dict:  # noqa: ANN001
        st = eng.new_state()
        logits = eng.forward(decode[None, :1], st)[0, -1]
        rows, used, nll, kls = [], [], [], []
        h_prev = entropy(logits)
        start = time.perf_counter()
        for t in range(1, len(decode) - 1):
            m = choose(h_prev)
            used.append(m)
            motif = None if m is None else motifs[m]
            logits = eng.forward(decode[None, t : t + 1], st, motif)[0, -1]
            nll.append(float(_nll(logits[None], decode[t + 1 : t + 2])[0]))
            kls.append(mean_kl(dense_dec[t][None], logits[None]))
            h_prev = entropy(logits)
            rows.append(h_prev)
        secs = time.perf_counter() - start
        used_arr = np.array([0 if u is None else u for u in used], float)
        dm = np.diff(used_arr)
        nz = dm[dm != 0]
        return {
            "perplexity": float(np.exp(np.mean(nll))),
            "mean_kl": float(np.mean(kls)),
            "mean_m": float(used_arr.mean()),
            "m_trace": used_arr.astype(int).tolist(),
            "entropy_trace": [round(x, 4) for x in rows],
            "saturated_low": float(np.mean(used_arr == m_min)),
            "saturated_high": float(np.mean(used_arr == m_max)),
            "lag1_autocorr": float(np.corrcoef(used_arr[:-1], used_arr[1:])[0, 1])
            if used_arr.std() > 0
            else 1.0,
            "sign_alternation": float(np.mean(nz[1:] * nz[:-1] < 0)) if len(nz) > 2 else 0.0,
            "seconds": secs,
        }

    results = {"dense": run(lambda h: None)}
    print(f"dense: ppl {results['dense']['perplexity']:.3f}", file=sys.stderr)
    for m in ms:
        results[f"fixed m={m}"] = run(lambda h, m=m: m)
        r = results[f"fixed m={m}"]
        print(f"fixed m={m}: ppl {r['perplexity']:.3f} KL {r['mean_kl']:.4f}", file=sys.stderr)

    def uds(h: float) -> int:
        want = float(np.clip(m0 + gamma * h, m_min, m_max))
        return min(ms, key=lambda x: abs(x - want))  # the nearest fitted budget

    results["UDS"] = run(uds)
    r = results["UDS"]
    print(f"UDS: ppl {r['perplexity']:.3f} KL {r['mean_kl']:.4f} mean m {r['mean_m']:.1f}", file=sys.stderr)
    fixed_m = np.array(ms, float)
    fixed_kl = np.array([results[f"fixed m={m}"]["mean_kl"] for m in ms])
    kl_at_equal_m = float(np.interp(r["mean_m"], fixed_m, fixed_kl))
    report = {
        "command": "python tools/exp_uds.py",
        "machine": machine_info(),
        "fraction": args.fraction,
        "m_levels": ms,
        "fit_seconds": fit_s,
        "probe_tokens": len(probe),
        "decode_tokens": len(decode) - 2,
        "error_vs_m": {"m": ms, "e": e_mean.tolist(), "loglog_slope": slope_loglog},
        "entropy_sensitivity": {
            "a": a_sens,
            "corr": corr,
            "mean_dH": {str(m): float(dh[m].mean()) for m in ms},
        },
        "probe_kl": {str(m): kl_probe[m] for m in ms},
        "controller": {
            "gamma": gamma,
            "m0": m0,
            "h10": h_lo,
            "h90": h_hi,
            "m_bar": m_bar,
            "e_prime": e_prime,
        },
        "loop_gain": gain,
        "loop_gain_direct": {"gamma_dH_dm_fit": gain_direct, "dH_dm_fit": dh_dm_fit, "dH_dm_local": dh_dm},
        "stable": abs(gain) < 1 and abs(gain_direct) < 1,
        "decode": results,
        "uds_kl_vs_fixed_at_equal_mean_m": {"uds": r["mean_kl"], "fixed_interpolated": kl_at_equal_m},
    }
    save_report(report, args.out, to_markdown, lambda p: _plot(report, p))
    return 0


def to_markdown(report: dict) -> str:
    ev = report["error_vs_m"]
    es = report["entropy_sensitivity"]
    c = report["controller"]
    lines = [
        "| m | support error e(m) | mean ΔH vs dense (nats) | KL to dense (probe) |",
        "|---|---|---|---|",
    ]
    for m, e in zip(ev["m"], ev["e"]):
        lines.append(f"| {m} | {e:.4f} | {es['mean_dH'][str(m)]:+.4f} | {report['probe_kl'][str(m)]:.4f} |")
    lines += [
        "",
        f"log-log slope of e(m): {ev['loglog_slope']:.3f}; entropy sensitivity a = dΔH/de = {es['a']:.3f} "
        f"nats per unit error (corr {es['corr']:.2f}); controller γ = {c['gamma']:.1f} per nat, m0 = {c['m0']:.1f}, "
        f"e'(m̄ = {c['m_bar']:.0f}) = {c['e_prime']:.2e}; loop gain γ·a·e' = {report['loop_gain']:.4f}; "
        f"measured directly, γ·dΔH/dm = {report['loop_gain_direct']['gamma_dH_dm_fit']:.4f} "
        f"(dΔH/dm = {report['loop_gain_direct']['dH_dm_fit']:.2e} nats per measurement, line fit over m) — "
        f"{'stable' if report['stable'] else 'UNSTABLE'} (|gain| < 1).",
        "",
        "| decode policy | mean m | perplexity | mean KL to dense | at m_min / m_max | lag-1 autocorr of m | Δm sign flips |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in report["decode"].items():
        lines.append(
            f"| {name} | {r['mean_m']:.1f} | {r['perplexity']:.3f} | {r['mean_kl']:.4f} | "
            f"{r['saturated_low']:.0%} / {r['saturated_high']:.0%} | {r['lag1_autocorr']:.2f} | {r['sign_alternation']:.0%} |"
        )
    u = report["uds_kl_vs_fixed_at_equal_mean_m"]
    lines.append(
        f"\nUDS mean KL {u['uds']:.4f} vs fixed m at the same mean m (interpolated) {u['fixed_interpolated']:.4f}. "
        f"FFN fraction {report['fraction']:.0%} in every layer; {report['decode_tokens']} teacher-forced decode steps; "
        f"{report['machine']['date']}, {report['machine']['processor']}."
    )
    return "\n".join(lines)


def _plot(report: dict, path: Path) -> None:
    plt = pyplot()
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 4))
    ev = report["error_vs_m"]
    a1.loglog(ev["m"], ev["e"], marker="o")
    a1.set_xlabel("measurements m")
    a1.set_ylabel("support error e(m)")
    a1.set_title(f"Recovery error vs m (slope {ev['loglog_slope']:.2f})")
    names = [n for n in report["decode"] if n != "dense"]
    xs = [report["decode"][n]["mean_m"] for n in names]
    ys = [report["decode"][n]["mean_kl"] for n in names]
    a2.scatter(xs, ys)
    for n, x, y in zip(names, xs, ys):
        a2.annotate(n, (x, y), fontsize=8)
    a2.set_xlabel("mean m per token (sensing bytes)")
    a2.set_ylabel("mean KL to dense")
    a2.set_title("Decoding: fixed m vs UDS")
    u = report["decode"]["UDS"]
    a3.plot(u["m_trace"][:200], label="m_t (UDS)")
    a3b = a3.twinx()
    a3b.plot(u["entropy_trace"][:200], color="tab:orange", alpha=0.6, label="H_t")
    a3.set_xlabel("decode step")
    a3.set_ylabel("m_t")
    a3b.set_ylabel("entropy (nats)")
    a3.set_title(f"UDS loop (gain {report['loop_gain']:.3f})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
