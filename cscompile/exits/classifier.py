"""Classification bundles: train exit adapters and calibrate exits at build time, classify at run time.

``cscompile build MODEL --task classify --labels a,b --train rows.jsonl`` adds a ``classify/``
part to the bundle:

- the dense engine cut into layer blocks (:mod:`cscompile.exits.ranges`) at ``cuts``;
- two sets of exit adapters, one adapter per block (:mod:`cscompile.exits.adapters`), trained
  on the pooled hidden states of the training texts (four fifths of the rows, chosen by a hash
  of the text): ``whole`` on whole texts, for the policies that read the whole text (``full``,
  ``layer``); ``prefix`` on every sentence prefix too (labelled with its text's label), for
  the policies that read sentence by sentence (``sentence``, ``2d``), which ask about prefixes;
- thresholds for each policy (``2d``, ``layer``, ``sentence``, ``full``), calibrated on the
  other fifth: the cheapest setting whose accuracy is within ``max_loss`` of the full model's
  (all sentences, all layers). Cost is ``layer·tokens + CALL_COST·block calls``;
- an outlier test at the first exit: the distance of the pooled state from the subspace of the
  training texts' first-exit states (their ``OOD_COMPONENTS`` principal components), against
  the 99.5th percentile over every training prefix. A text farther out (another language, a
  code listing) is *out of distribution*: the full model answers it, flagged as such. Measured
  on SmolLM2 (``tools/exp_early_exit.py``): German, Dutch, French, Spanish, Italian sentences
  land 1.2–1.6× beyond the threshold; about 1.5% of in-distribution test texts are flagged.

Training rows are JSONL objects ``{"text": ..., "label": ...}``. With ``teacher=True`` rows may
omit the label: the full model labels them by prompting (the likelihood of each label word as
its answer), and the report gives the teacher's agreement with the rows that do have one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cscompile.errors import UserError
from cscompile.exits.adapters import Adapter
from cscompile.exits.model import ExitStack, Outcome, apply_adapters, simulate

SECTION = "classify"
SPEC_FILE = "classify/classify.json"
ADAPTERS_FILE = "classify/adapters.npz"
POLICIES = ("2d", "layer", "sentence", "full")
#: thresholds tried by calibration, for both the layer (τ) and the sentence (σ) exit
GRID = (0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)
#: one block call's cost beyond its arithmetic, in layer·tokens (ORT dispatch, pooling, the
#: adapter): ``tools/exp_early_exit.py`` prints the fit it is set from (BENCHMARKS.md)
CALL_COST = 30
#: rows needed per label: four fifths train the adapters, one fifth calibrates the thresholds
MIN_PER_LABEL = 10
#: weight of the whole text among a training text's prefixes, per adapter set (the shorter
#: prefixes share the rest). Measured (``tools/exp_exit_adapters.py``, BENCHMARKS.md): whole-text
#: adapters make the sentence exit confidently wrong on uninformative openings, prefix adapters
#: make the layer exit worse on whole texts; so each policy gets the set trained on what it reads
ADAPTER_SETS: dict[str, float] = {"whole": 1.0, "prefix": 0.5}
POLICY_SET = {"full": "whole", "layer": "whole", "sentence": "prefix", "2d": "prefix"}
#: principal components of the first exit's training states the outlier test keeps
OOD_COMPONENTS = 16
TRAIN_FORMAT = 'JSONL rows {"text": "...", "label": "<one of --labels>"}'


# -- inputs ---------------------------------------------------------------------------------
def parse_labels(spec: str | Sequence[str]) -> list[str]:
    """``"positive,negative"`` (or a sequence) → the label list; at least two distinct, non-empty."""
    raw = spec.split(",") if isinstance(spec, str) else list(spec)
    labels = [str(x).strip() for x in raw]
    if any(not x for x in labels) or len(set(labels)) != len(labels) or len(labels) < 2:
        raise UserError(
            "--labels", f"{spec!r}", "at least two distinct, non-empty labels separated by commas"
        )
    return labels


@dataclass(frozen=True)
class Example:
    text: str
    label: int | None  # index into the labels; None = to be labelled by the teacher


def read_examples(path: Path, labels: Sequence[str], teacher: bool = False) -> list[Example]:
    """Read and check training rows (see the module docstring); errors name the file and line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError("--train", f"no file at {path}", TRAIN_FORMAT)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"--train {path.name}", "is not UTF-8 text", TRAIN_FORMAT) from None
    index = {lab: i for i, lab in enumerate(labels)}
    out: list[Example] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"--train {path.name} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(where, "is not valid JSON", TRAIN_FORMAT) from None
        text = row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise UserError(where, 'has no non-empty "text" string', TRAIN_FORMAT)
        label = row.get("label")
        if label is None and not teacher:
            raise UserError(
                where, 'has no "label"', "a label (or --teacher to label rows with the full model)"
            )
        if label is not None and label not in index:
            raise UserError(where, f"has label {label!r}", f"one of --labels ({', '.join(labels)})")
        out.append(Example(text.strip(), None if label is None else index[label]))
    if not out:
        raise UserError(f"--train {path.name}", "has no rows", TRAIN_FORMAT)
    return out


def check_balance(examples: Sequence[Example], labels: Sequence[str], where: str) -> None:
    counts = np.bincount([e.label for e in examples if e.label is not None], minlength=len(labels))
    short = [f"{lab}: {c}" for lab, c in zip(labels, counts) if c < MIN_PER_LABEL]
    if short:
        raise UserError(
            where, f"has too few rows for {', '.join(short)}", f"at least {MIN_PER_LABEL} per label"
        )


def in_calibration(text: str) -> bool:
    """One row in five calibrates the thresholds (by the text's hash: deterministic, order-free)."""
    return hashlib.sha256(text.encode()).digest()[0] % 5 == 0


def sentence_ids(tokenizer: Any, text: str, max_tokens: int | None = None) -> list[list[int]]:
    """Token ids of ``text`` per sentence (one tokenization of the whole text, split by offsets)."""
    text = text.strip()
    if not text:
        raise UserError("text", "is empty", "some text to classify")
    from cscompile.prompt.compress import SENTENCE_END

    ids, offsets = tokenizer.encode_with_offsets(text)
    if max_tokens is not None and len(ids) > max_tokens:
        raise UserError("text", f"has {len(ids)} tokens", f"at most {max_tokens} (the model's context)")
    bounds = np.array([0] + [m.end() for m in SENTENCE_END.finditer(text)])
    last_char = np.array([max(b - 1, a) for a, b in offsets], np.int64)  # a token belongs where it ends
    sentence = np.searchsorted(bounds, last_char, side="right") - 1
    starts = [0, *(np.nonzero(np.diff(sentence))[0] + 1).tolist(), len(ids)]
    return [[int(t) for t in ids[a:b]] for a, b in zip(starts, starts[1:])]


def default_cuts(n_layers: int) -> list[int]:
    """About ten blocks of equal depth (SmolLM2: an exit every 3 of 30 layers)."""
    step = max(1, round(n_layers / 10))
    return sorted({*range(0, n_layers, step), n_layers})


def parse_cuts(spec: str | Sequence[int] | None, n_layers: int) -> list[int]:
    """Exit layers ``"3,6,12"`` → block boundaries ``[0, 3, 6, 12, n_layers]``."""
    if spec is None:
        return default_cuts(n_layers)
    try:
        vals = [int(x) for x in (spec.split(",") if isinstance(spec, str) else spec)]
    except ValueError:
        raise UserError("--exit-layers", f"{spec!r}", "comma-separated layer counts such as 3,6,12") from None
    if any(not 0 < v <= n_layers for v in vals) or sorted(set(vals)) != vals:
        raise UserError("--exit-layers", f"{spec!r}", f"increasing layer counts in 1..{n_layers}")
    return [0, *vals] if vals[-1] == n_layers else [0, *vals, n_layers]


# -- teacher --------------------------------------------------------------------------------
def label_prompt(tokenizer: Any, text: str, labels: Sequence[str]) -> str:
    """The chat prompt asking the model for the label (the teacher, and the harness's baseline)."""
    ask = (
        f"Classify the following text as {', '.join(labels[:-1])} or {labels[-1]}.\n\n"
        f"Text: {text}\n\nAnswer with one word."
    )
    return str(tokenizer.apply_chat_template([{"role": "user", "content": ask}]))


def teacher_labels(engine: Path, tokenizer: Any, texts: Sequence[str], labels: Sequence[str],
                   threads: int | None = None, say: Callable[[str], None] = lambda m: None) -> list[int]:  # fmt: skip
    """The full model's label for each text: the label word (as written or capitalized) it finds
    most likely as its answer to :func:`label_prompt`.
    """
    from cscompile.decode.session import DecoderSession
    from cscompile.metrics import log_softmax

    sess = DecoderSession(engine, threads=threads)
    out = []
    for i, text in enumerate(texts):
        prompt = label_prompt(tokenizer, text, labels)
        p_ids = tokenizer.encode(prompt)
        scores = []
        for lab in labels:
            best = -np.inf
            for word in dict.fromkeys((lab, lab[:1].upper() + lab[1:])):
                ids = tokenizer.encode(prompt + word)
                n = len(p_ids) if ids[: len(p_ids)] == p_ids else len(ids) - len(tokenizer.encode(word))
                logp = log_softmax(sess.forward(np.array([ids], np.int64), sess.new_state())[0])
                best = max(best, float(sum(logp[t - 1, ids[t]] for t in range(n, len(ids)))))
            scores.append(best)
        out.append(int(np.argmax(scores)))
        if (i + 1) % 20 == 0:
            say(f"teacher labels {i + 1}/{len(texts)}")
    return out


# -- policies -------------------------------------------------------------------------------
def policy_thresholds(
    policy: str, tau: float | None = None, sigma: float | None = None
) -> tuple[float | None, float | None]:
    """What a policy uses: ``full`` neither threshold, ``layer`` τ, ``sentence`` σ, ``2d`` both."""
    if policy not in POLICIES:
        raise UserError("policy", f"{policy!r}", f"one of {', '.join(POLICIES)}")
    return (tau if policy in ("layer", "2d") else None, sigma if policy in ("sentence", "2d") else None)


def whole_text(policy: str) -> bool:
    """``full`` and ``layer`` read the whole text at once; ``sentence`` and ``2d`` one sentence at a time."""
    return policy in ("full", "layer")


def simulate_policy(probs: np.ndarray, tokens: list[int], cuts: list[int], policy: str, tau: float | None,
                    sigma: float | None) -> Outcome:  # fmt: skip
    """A policy's outcome from a full trace (what :meth:`Classifier.classify` does for real)."""
    t, s = policy_thresholds(policy, tau, sigma)
    if whole_text(policy):
        return simulate(probs[-1:], [sum(tokens)], cuts, t, None)
    return simulate(probs, tokens, cuts, t, s)


def prefix_weights(n: int, whole: float | None) -> np.ndarray:
    """Training weights of a text's ``n`` prefixes (the whole text last), summing to one;
    ``whole`` is the whole text's share (None: every prefix alike).
    """
    if whole is None or n == 1:
        return np.full(n, 1.0 / n)
    return np.concatenate([np.full(n - 1, (1 - whole) / (n - 1)), [whole]])


def cost(o: Outcome) -> float:
    return float(o.layer_tokens + CALL_COST * o.calls)


def calibrate(traces: Mapping[str, Sequence[tuple[np.ndarray, list[int]]]], ys: Sequence[int], cuts: list[int],
              max_loss: float) -> dict[str, Any]:  # fmt: skip
    """Each policy's cheapest thresholds within ``max_loss`` of the full model's accuracy;
    ``traces[set]`` are the calibration texts' traces under each adapter set (:data:`POLICY_SET`).
    """
    y = np.asarray(ys)

    def run(policy: str, tau: float | None, sigma: float | None) -> tuple[float, float, list[Outcome]]:
        outs = [simulate_policy(p, t, cuts, policy, tau, sigma) for p, t in traces[POLICY_SET[policy]]]
        return float(np.mean([o.label for o in outs] == y)), float(np.mean([cost(o) for o in outs])), outs

    full_acc, full_cost, full_outs = run("full", None, None)
    full_labels = np.array([o.label for o in full_outs])
    grids: dict[str, list[tuple[float | None, float | None]]] = {
        "full": [(None, None)],
        "layer": [(t, None) for t in GRID],
        "sentence": [(None, s) for s in GRID],
        "2d": [(t, s) for t in GRID for s in GRID],
    }
    report: dict[str, Any] = {"full_accuracy": full_acc, "max_loss": max_loss, "examples": len(y)}
    chosen: dict[str, Any] = {}
    for policy, grid in grids.items():
        best = None
        for tau, sigma in grid:
            acc, c, outs = run(policy, tau, sigma)
            if acc >= full_acc - max_loss - 1e-9 and (best is None or c < best[0]):
                best = (c, tau, sigma, acc, outs)
        if best is None:  # nothing within the loss: the most careful setting
            tau, sigma = policy_thresholds(policy, GRID[-1], GRID[-1])
            acc, c, outs = run(policy, tau, sigma)
            best = (c, tau, sigma, acc, outs)
        c, tau, sigma, acc, outs = best
        chosen[policy] = {"tau": tau, "sigma": sigma}
        report[policy] = {
            "accuracy": acc,
            "agreement_with_full": float(np.mean([o.label for o in outs] == full_labels)),
            "relative_cost": c / full_cost,
            "mean_exit_layer": float(np.mean([cuts[o.depth + 1] for o in outs])),
        }
    return {"thresholds": chosen, "report": report}


@dataclass(frozen=True)
class Outliers:
    """Distance of pooled states from the training states' principal subspace (module docstring)."""

    mean: np.ndarray  # [H]
    basis: np.ndarray  # [OOD_COMPONENTS, H], orthonormal rows
    threshold: float

    @classmethod
    def fit(cls, x: np.ndarray, components: int = 16, percentile: float = 99.5) -> Outliers:
        x = np.asarray(x, np.float64)
        mean = x.mean(0)
        _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
        o = cls(mean, vt[:components], 0.0)
        return cls(mean, o.basis, float(np.percentile(o.distance(x), percentile)))

    def distance(self, x: np.ndarray) -> np.ndarray:
        d = np.asarray(x, np.float64) - self.mean
        r = d - (d @ self.basis.T) @ self.basis
        return np.asarray(np.sqrt((r * r).sum(axis=-1)))

    def arrays(self) -> dict[str, np.ndarray]:
        return {"ood.mean": self.mean, "ood.basis": self.basis}


# -- build ----------------------------------------------------------------------------------
def classify_part(engine: Path, layers: list[dict[str, Any]], tokenizer: Any, examples: Sequence[Example],
                  labels: Sequence[str], work: Path, *, exit_layers: str | Sequence[int] | None = None,
                  max_loss: float = 0.01, threads: int | None = None,
                  say: Callable[[str], None] = lambda m: None) -> Any:  # fmt: skip
    """The bundle part ``classify/``: block engines, adapters, calibrated thresholds (module docstring)."""
    from cscompile.bundle.parts import BundlePart
    from cscompile.exits.ranges import cut_range

    labels = list(labels)
    cuts = parse_cuts(exit_layers, len(layers))
    examples = list(examples)
    teacher_report = None
    missing = [i for i, e in enumerate(examples) if e.label is None]
    if missing or not any(e.label is not None for e in examples):
        say(f"teacher: labelling {len(examples)} rows with the full model")
        taught = teacher_labels(engine, tokenizer, [e.text for e in examples], labels, threads, say)
        given = [(e.label, t) for e, t in zip(examples, taught) if e.label is not None]
        teacher_report = {
            "labelled_by_teacher": len(missing),
            "agreement_with_given_labels": float(np.mean([a == b for a, b in given])) if given else None,
        }
        examples = [Example(e.text, t if e.label is None else e.label) for e, t in zip(examples, taught)]
    check_balance(examples, labels, "training rows")
    fit = [e for e in examples if not in_calibration(e.text)]
    cal = [e for e in examples if in_calibration(e.text)]
    for part, name in ((fit, "training"), (cal, "calibration")):
        if len({e.label for e in part}) < len(labels):
            raise UserError("training rows", f"leave a label out of the {name} fifth",
                            f"more rows (at least {MIN_PER_LABEL} per label)")  # fmt: skip

    paths = []
    for a, b in zip(cuts, cuts[1:]):
        p = work / f"block-{a:02d}-{b:02d}.onnx"
        cut_range(engine, layers, a, b, p)
        paths.append(p)
    stack = ExitStack(paths, cuts, [], threads=threads)  # features need no adapters
    t0 = time.perf_counter()
    feats, ys = [], []
    for i, e in enumerate(fit):
        feats.append(stack.features(sentence_ids(tokenizer, e.text)))  # [sentences, blocks, H]: every prefix
        ys += [e.label] * len(feats[-1])
        if (i + 1) % 25 == 0:
            say(f"features {i + 1}/{len(fit)} ({time.perf_counter() - t0:.0f} s)")
    x, y = np.concatenate(feats), np.array(ys)
    sets = {}
    for name, whole in ADAPTER_SETS.items():
        w = np.concatenate([prefix_weights(len(f), whole) for f in feats])
        sets[name] = [
            Adapter.fit(x[w > 0, k], y[w > 0], len(labels), weights=w[w > 0]) for k in range(stack.blocks)
        ]
    ood = Outliers.fit(x[:, 0], OOD_COMPONENTS)
    traces: dict[str, list[tuple[np.ndarray, list[int]]]] = {name: [] for name in sets}
    for i, e in enumerate(cal):
        sents = sentence_ids(tokenizer, e.text)
        f = stack.features(sents)
        for name, ads in sets.items():
            traces[name].append((apply_adapters(f, ads), [len(s) for s in sents]))
        if (i + 1) % 25 == 0:
            say(f"calibration traces {i + 1}/{len(cal)}")
    cal_doc = calibrate(traces, [int(e.label or 0) for e in cal], cuts, max_loss)
    doc = {
        "labels": labels,
        "cuts": cuts,
        "blocks": [p.name for p in paths],
        "thresholds": cal_doc["thresholds"],
        "ood_distance": ood.threshold,
        "call_cost": CALL_COST,
        "report": {
            **cal_doc["report"],
            "train_rows": len(fit),
            "calibration_rows": len(cal),
            "teacher": teacher_report,
        },  # fmt: skip
    }
    arrays: dict[str, np.ndarray] = {}
    for name, ads in sets.items():
        for k, ad in enumerate(ads):
            arrays.update(ad.arrays(f"{name}{k}"))
    arrays.update(ood.arrays())
    np.savez(work / "adapters.npz", **arrays)  # type: ignore[arg-type]
    files: dict[str, Path | bytes] = {f"classify/{p.name}": p for p in paths}
    files[ADAPTERS_FILE] = work / "adapters.npz"
    files[SPEC_FILE] = (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()
    return BundlePart(files=files, sections={SECTION: SPEC_FILE})


# -- run ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Classification:
    label: str
    confidence: float
    probabilities: dict[str, float]
    policy: str
    exit_layer: int  # layers run for the deciding state
    layers: int  # the model's depth
    sentences_read: int
    sentences: int
    tokens_read: int
    tokens: int
    layer_tokens: int  # Σ tokens × layers computed
    block_calls: int  # layer-block sessions run
    ms: float
    in_distribution: bool = True

    def summary(self) -> str:
        where = (
            f"exit at layer {self.exit_layer}/{self.layers}, sentence {self.sentences_read}/{self.sentences}"
        )
        return f"{self.label}\t{self.confidence:.3f}\t{where}\t{self.ms:.1f} ms"


class Classifier:
    """A bundle's classification part (:func:`load_classifier`)."""

    def __init__(self, paths: list[Path], doc: dict[str, Any], sets: dict[str, list[Adapter]], outliers: Outliers,
                 tokenizer: Any, threads: int | None = None, max_tokens: int | None = None) -> None:  # fmt: skip
        self.labels: list[str] = list(doc["labels"])
        self.cuts: list[int] = list(doc["cuts"])
        self.thresholds: dict[str, dict[str, float | None]] = doc["thresholds"]
        self.outliers = outliers
        self.report: dict[str, Any] = doc.get("report", {})
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.sets = sets
        self.stack = ExitStack(paths, self.cuts, sets["whole"], threads=threads)

    def classify(self, text: str, policy: str = "2d") -> Classification:
        """Label ``text`` (see the module docstring); ``policy`` one of :data:`POLICIES`."""
        tau, sigma = policy_thresholds(policy, **self.thresholds.get(policy, {}))
        sents = sentence_ids(self.tokenizer, text, self.max_tokens)
        run = [sum(sents, [])] if whole_text(policy) else sents

        def outlier(p0: np.ndarray) -> bool:  # the pooled state at the first exit, first sentence
            return bool(self.outliers.distance(p0) > self.outliers.threshold)

        o = self.stack.classify(run, tau, sigma, check=outlier, adapters=self.sets[POLICY_SET[policy]])
        if not o.in_distribution:  # the full model answers, after what the check cost
            f = self.stack.classify([sum(sents, [])], None, None, adapters=self.sets["whole"])
            o = dataclasses.replace(f, layer_tokens=f.layer_tokens + o.layer_tokens, calls=f.calls + o.calls,
                                    ms=f.ms + o.ms, in_distribution=False)  # fmt: skip
            policy = "full"
        probs = o.probabilities if o.probabilities is not None else np.zeros(len(self.labels))
        return Classification(
            label=self.labels[o.label], confidence=o.confidence,
            probabilities={lab: float(p) for lab, p in zip(self.labels, probs)},
            policy=policy, exit_layer=self.cuts[o.depth + 1],
            layers=self.cuts[-1], sentences_read=o.sentences if not whole_text(policy) else len(sents),
            sentences=len(sents), tokens_read=o.tokens, tokens=sum(len(s) for s in sents),
            layer_tokens=o.layer_tokens, block_calls=o.calls, ms=o.ms, in_distribution=o.in_distribution,
        )  # fmt: skip


def load_classifier(bundle: Any, tokenizer: Any, threads: int | None = None,
                    max_tokens: int | None = None) -> Classifier | None:  # fmt: skip
    """The bundle's classifier, or None if it was built without ``--task classify``."""
    from cscompile.bundle import BundleError

    if SECTION not in bundle.sections:
        return None
    where = f"bundle {bundle.source}: {SPEC_FILE}"
    doc = bundle.read_json(bundle.sections[SECTION])
    try:
        labels, cuts, blocks = doc["labels"], doc["cuts"], doc["blocks"]
        ok = (
            isinstance(labels, list) and len(labels) >= 2 and all(isinstance(x, str) for x in labels)
            and isinstance(cuts, list) and all(isinstance(c, int) for c in cuts) and len(cuts) == len(blocks) + 1
            and cuts == sorted(set(cuts)) and cuts[0] == 0 and all(isinstance(b, str) for b in blocks)
            and all(p in doc["thresholds"] for p in POLICIES) and float(doc["ood_distance"]) > 0
        )  # fmt: skip
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise BundleError(where, "is not a classifier spec", "labels, cuts, blocks, thresholds, ood_distance")
    arrays = bundle.read_npz(ADAPTERS_FILE)
    sets = {
        name: [Adapter.from_arrays(arrays, f"{name}{k}") for k in range(len(blocks))] for name in ADAPTER_SETS
    }
    adapters = [a for ads in sets.values() for a in ads]
    if any(a.weight.shape[1] != len(labels) for a in adapters):
        raise BundleError(where, "adapters disagree with the label count", f"{len(labels)} classes")
    mean, basis = arrays.get("ood.mean"), arrays.get("ood.basis")
    h = adapters[0].mean.shape[0]
    if mean is None or basis is None or mean.shape != (h,) or basis.ndim != 2 or basis.shape[1] != h:
        raise BundleError(
            f"bundle {bundle.source}: {ADAPTERS_FILE}",
            "has no valid outlier basis",
            f"ood.mean [{h}], ood.basis [k, {h}]",
        )
    outliers = Outliers(
        np.asarray(mean, np.float64), np.asarray(basis, np.float64), float(doc["ood_distance"])
    )
    paths = [bundle.path_of(f"classify/{name}") for name in blocks]
    return Classifier(paths, doc, sets, outliers, tokenizer, threads, max_tokens)
