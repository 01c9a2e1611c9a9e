"""Loading a point of a bundle's Pareto front, and picking one for a latency or quality target.

The build side (searching the front and writing its engines) is :mod:`cscompile.search.artifact`;
it imports :data:`NATIVE_HEAD_BIN` from here (the runtime never imports the search).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cscompile.errors import UserError

NATIVE_HEAD_BIN = "native/front.bin"


def load_point(
    base: Any,
    params: dict[str, Any],
    section: Any,
    label: str,
    root: Path | None = None,
    keep_kv: bool = False,
) -> Any:
    """The weights of a native front point (``params.search``) from the bundle's native weights
    (and, for a 4-bit LM head, the front's GPTQ-rounded head in ``root/native/front.bin``);
    ``keep_kv`` for a motif of the switching runtime.
    """
    from cscompile.bundle import BundleError
    from cscompile.native.engine import PackedMatrix
    from cscompile.native.points import NativeConfig, Ranking, Shape, derive_config

    def fail(got: str, want: str) -> BundleError:
        return BundleError(f"bundle {label}: native front point", got, want)

    shape = Shape.of(base.config)
    try:
        r = section["ranking"]
        ranking = Ranking([list(map(int, h)) for h in r["heads"]], [list(map(int, b)) for b in r["blocks"]])
    except (KeyError, TypeError, ValueError):
        raise fail(
            "has no valid unit ranking in its front section", "heads and blocks lists per layer"
        ) from None
    if (
        (len(ranking.heads), len(ranking.blocks)) != (shape.n_layers,) * 2
        or any(sorted(h) != list(range(shape.n_heads)) for h in ranking.heads)
        or any(sorted(b) != list(range(shape.ffn_blocks)) for b in ranking.blocks)
    ):
        raise fail(
            "has a unit ranking that does not fit the model",
            "a permutation of the heads and blocks per layer",
        )
    try:
        config = NativeConfig.from_dict(params["search"])
        config.check(shape)
        head = None
        spec = section.get("head_q4")
        if config.head_bits == 4 and spec is not None and root is not None:
            from cscompile.bundle.blobs import array_views

            try:
                views = array_views(root / NATIVE_HEAD_BIN, spec["arrays"])
                head = PackedMatrix(views["head_q4.codes"], views["head_q4.d"], views["head_q4.m"],
                                    int(spec["n"]), int(spec["k"]), int(spec["bits"]))  # fmt: skip
            except (OSError, KeyError, TypeError, ValueError) as exc:
                raise fail(
                    f"has an unreadable 4-bit head ({str(exc)[:100]})", "an untampered bundle"
                ) from None
        return derive_config(base, config, ranking, head, keep_kv=keep_kv)
    except KeyError:
        raise fail("has no search configuration", "params.search") from None
    except UserError as exc:
        if isinstance(exc, BundleError):
            raise
        raise fail(f"{exc.subject}: {exc.received}", exc.expected) from None


def load_switch_point(
    base: Any,
    params: dict[str, Any],
    section: Any,
    engines: Any,
    label: str,
    root: Path,
    threads: int | None = None,
    context_length: int | None = None,
) -> Any:
    """The switching runtime of a switching point (``params.switch``): the native engine and the
    front points it names, derived with their K/V kept, under its calibrated controller.
    """
    from cscompile.bundle import BundleError
    from cscompile.motifs.runtime import ControllerConfig
    from cscompile.native.engine import ENGINE_NAME
    from cscompile.native.switch import NativeSwitchingSession

    def fail(got: str, want: str) -> BundleError:
        return BundleError(f"bundle {label}: switching point", got, want)

    sw = params.get("switch")
    names = sw.get("motifs") if isinstance(sw, dict) else None
    thr = sw.get("entropy_thresholds") if isinstance(sw, dict) else None
    hold = sw.get("hold", 0) if isinstance(sw, dict) else None
    if (
        not isinstance(names, list)
        or len(names) < 2
        or not all(isinstance(n, str) for n in names)
        or not isinstance(thr, list)
        or len(thr) != len(names) - 1
        or not all(isinstance(t, (int, float)) and not isinstance(t, bool) and np.isfinite(t) for t in thr)
        or thr != sorted(thr)
        or not isinstance(hold, int)
        or isinstance(hold, bool)
        or hold < 0
    ):
        raise fail(f"has a malformed switch entry ({str(sw)[:120]})",
                   "motifs (≥ 2 names), ascending finite entropy_thresholds (one fewer), hold ≥ 0")  # fmt: skip
    points = {e.name: e for e in engines if e.kind == "native" and "search" in e.params}
    weights = []
    for name in names:
        if name == ENGINE_NAME:
            weights.append(base)
        elif name in points:
            weights.append(load_point(base, points[name].params, section, label, root, keep_kv=True))
        else:
            raise fail(f"names the motif {name!r}", f"{ENGINE_NAME!r} or a front point ({sorted(points)})")
    return NativeSwitchingSession(weights, names, ControllerConfig([float(t) for t in thr], hold=hold),
                                  threads, context_length)  # fmt: skip


def select_engine(
    manifest: dict[str, Any],
    slo_ms: float | None,
    max_ppl_increase: float | None,
    section: dict[str, Any] | None = None,
) -> str:
    """The engine meeting both targets: the best quality within the SLO, else the fastest within
    the quality bound; the dense engine counts as a point (0% increase at its predicted latency),
    and so does the native engine when the front's ``section`` measured it. A native front
    (``section["reference"]``, :func:`native_pareto_part`) counts its reference engine as the 0% point.
    """
    engines = manifest.get("engines", [])
    try:
        points = [
            (str(e["name"]), float(e["params"]["latency_ms_pred"]), float(e["profile"]["ppl_increase"]))
            for e in engines
            if e.get("kind") in ("dense", "native") and "latency_ms_pred" in e.get("params", {})
        ]
        dense_ms = next((float(e["params"]["dense_latency_ms_pred"]) for e in engines
                         if "dense_latency_ms_pred" in e.get("params", {})), None)  # fmt: skip
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError("bundle front", f"malformed engine entry ({type(exc).__name__}: {exc})",
                        "front points with numeric latency_ms_pred and ppl_increase") from None  # fmt: skip
    native: list[tuple[str, float, float]] = []
    nat = (section or {}).get("native")
    if isinstance(nat, dict) and any(
        e.get("name") == nat.get("engine") and e.get("kind") == "native" for e in engines
    ):
        try:
            native = [(str(nat["engine"]), float(nat["latency_ms_pred"]), float(nat["ppl_increase"]))]
        except (KeyError, TypeError, ValueError):
            raise UserError(
                "bundle front", "a malformed native point", "numeric latency_ms_pred and ppl_increase"
            ) from None
    if any(not (np.isfinite(ms) and np.isfinite(q)) for _, ms, q in [*points, *native]):
        raise UserError("bundle front", "a point with a non-finite latency or perplexity", "finite numbers")
    # the front's 0% point: the engine the front was searched from (native, or the dense ORT engine)
    ref = (section or {}).get("reference")
    ref_kind = "native" if isinstance(ref, str) else "dense"
    dense = next(
        (e["name"] for e in engines if e.get("kind") == ref_kind and "search" not in e.get("params", {})
         and (ref_kind == "dense" or e.get("name") == ref)),
        None,
    )  # fmt: skip
    if not points or dense_ms is None or dense is None:
        raise UserError("--slo-ms-per-token / --max-ppl-increase", "a bundle without a Pareto front",
                        "a bundle built with `cscompile build --pareto`")  # fmt: skip
    points += [(dense, dense_ms, 0.0), *native]
    ok = [
        p
        for p in points
        if (slo_ms is None or p[1] <= slo_ms) and (max_ppl_increase is None or p[2] <= max_ppl_increase)
    ]
    if ok:
        return (
            min(ok, key=lambda p: (p[2], p[1]))[0] if slo_ms is not None else min(ok, key=lambda p: p[1])[0]
        )

    def miss(p: tuple[str, float, float]) -> float:
        over_ms = max(0.0, p[1] - slo_ms) / slo_ms if slo_ms else 0.0
        over_q = max(0.0, p[2] - max_ppl_increase) if max_ppl_increase is not None else 0.0
        return over_ms + over_q

    near = min(points, key=miss)
    asked = " and ".join(x for x in (f"≤ {slo_ms:g} ms/token" if slo_ms is not None else "",
                                      f"perplexity ≤ +{max_ppl_increase:.1%}" if max_ppl_increase is not None else "") if x)  # fmt: skip
    raise UserError(
        "front point",
        f"none meets {asked}",
        f"a looser target; nearest feasible point: {near[0]} at {near[1]:.2f} ms/token (build machine), "
        f"perplexity {near[2]:+.1%}",
    )
