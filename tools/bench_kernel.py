"""The channel-sparse FFN kernel vs ONNX Runtime's dense MatMuls, a 30-layer SmolLM2-sized stack.

Random weights of SmolLM2's shapes (H=576, I=1536), one token at a time; every variant runs the
same 30 layers, variants interleaved in each round (ORT's spinning off, so it does not steal the kernel's
cores). µs per layer (median over rounds).

    python tools/bench_kernel.py           # ~1 minute
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from cscompile.evaluation.report import machine_info
from cscompile.motifs.kernel import SparseFFN, pack_channel_major, pack_q8

ROOT = Path(__file__).resolve().parents[1]


def ort_stack(ws: list[np.ndarray], threads: int):  # type: ignore[no-untyped-def]
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, cur = [], [], "x"
    for i, w in enumerate(ws):
        inits += [
            numpy_helper.from_array(np.ascontiguousarray(w[:, 0, :].T), f"g{i}"),
            numpy_helper.from_array(np.ascontiguousarray(w[:, 1, :].T), f"u{i}"),
            numpy_helper.from_array(np.ascontiguousarray(w[:, 2, :]), f"d{i}"),
        ]
        nodes += [
            helper.make_node("MatMul", [cur, f"g{i}"], [f"G{i}"]),
            helper.make_node("Sigmoid", [f"G{i}"], [f"S{i}"]),
            helper.make_node("Mul", [f"G{i}", f"S{i}"], [f"A{i}"]),
            helper.make_node("MatMul", [cur, f"u{i}"], [f"U{i}"]),
            helper.make_node("Mul", [f"A{i}", f"U{i}"], [f"M{i}"]),
            helper.make_node("MatMul", [f"M{i}", f"d{i}"], [f"y{i}"]),
            helper.make_node("Add", [cur, f"y{i}"], [f"r{i}"]),
        ]
        cur = f"r{i}"
    h = ws[0].shape[2]
    g = helper.make_graph(
        nodes,
        "ffn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, h])],
        [helper.make_tensor_value_info(cur, TensorProto.FLOAT, [1, h])],
        inits,
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    # spinning workers would keep a core busy after each run and slow the kernel variants that follow
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(
        onnx.ModelProto.SerializeToString(model), so, providers=["CPUExecutionProvider"]
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "kernel.json")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    h, inter = 576, 1536
    ws = [
        pack_channel_major(
            *(rng.standard_normal(s).astype(np.float32) * 0.05 for s in ((inter, h), (inter, h), (h, inter)))
        )
        for _ in range(args.layers)
    ]
    f32 = [SparseFFN(w, args.threads) for w in ws]
    q8 = [SparseFFN(pack_q8(w), args.threads, "q8", h) for w in ws]
    sess = ort_stack(ws, args.threads)
    x = rng.standard_normal(h).astype(np.float32) * 0.1
    resid = np.zeros(h, np.float32)
    fracs = (1.0, 0.75, 0.5, 0.25)
    sets = {
        fr: [np.sort(rng.choice(inter, round(fr * inter), replace=False)).astype(np.int32) for _ in ws]
        for fr in fracs
    }
    times: dict[str, list[float]] = {}

    def timed(name: str, fn) -> None:  # type: ignore[no-untyped-def]
        fn()
        t = time.perf_counter()
        for _ in range(args.reps):
            fn()
        times.setdefault(name, []).append((time.perf_counter() - t) / args.reps / args.layers * 1e6)

    for _ in range(args.rounds):
        timed("ORT dense MatMuls", lambda: sess.run(None, {"x": x[None]}))
        for fr in fracs:
            for label, fs in (("C fp32", f32), ("C 8-bit", q8)):
                timed(
                    f"{label} {fr:.0%}",
                    lambda fs=fs, fr=fr: [
                        f.add_to(resid, x, None if fr == 1 else s) for f, s in zip(fs, sets[fr])
                    ],
                )
    med = {k: float(np.median(v)) for k, v in times.items()}
    base = med["ORT dense MatMuls"]
    rows = [{"variant": k, "us_per_layer": v, "speedup_vs_ort_dense": base / v} for k, v in med.items()]
    report = {
        "command": "python tools/bench_kernel.py",
        "machine": machine_info(),
        "threads": args.threads,
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("| variant | µs/layer | vs ORT dense |\n|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['us_per_layer']:.0f} | {r['speedup_vs_ort_dense']:.2f}× |")
    print(f"\n{args.layers} layers, H={h}, I={inter}, {args.threads} threads, median of {args.rounds} rounds × {args.reps} reps. "
          f"{report['machine']['date']}, {report['machine']['processor']}.")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
