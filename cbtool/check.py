"""Regression verdicts for ``cbtool check``: compare a results file with a baseline, metric by metric.

An accuracy drop is a regression only when it exceeds the allowed change *and* is unlikely to be
sampling noise: a paired McNemar test when both runs scored the same samples (``metrics.correct``),
otherwise a test of two independent proportions. Other metrics carry no per-sample values, so
their bound alone decides. Only the standard library is used (no scipy, no torch).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any

from cbtool.errors import CbtoolError, RegressionError
from cbtool.report import format_p, format_table, format_value, markdown_table

SCHEMA_VERSION = 1
DROP, RISE = "drop", "rise"
Interval = tuple[float, float]
VERDICTS = ("ok", "improved", "noise", "regression")


# --------------------------------------------------------------------------------------------
# Statistics (pure functions)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TestResult:
    """A two-sided p-value, the statistic behind it (``None`` for exact tests) and the method's name."""

    p_value: float
    method: str
    statistic: float | None = None


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def chi2_1df_sf(x: float) -> float:
    """Survival function of the chi-square distribution with one degree of freedom."""
    return math.erfc(math.sqrt(max(x, 0.0) / 2.0))


def binomial_two_sided_p(k: int, n: int) -> float:
    """Exact two-sided p-value of ``k`` successes in ``n`` fair coin flips (doubling the smaller tail)."""
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1))
    return min(1.0, 2 * tail / 2**n)  # int / int divides exactly before rounding to float


def mcnemar_test(b: int, c: int, *, exact_below: int = 25) -> TestResult:
    """McNemar's test on the discordant pairs of a paired comparison.

    ``b``: samples only the baseline got right; ``c``: samples only the current model got right.
    Exact binomial when ``b + c < exact_below``, else chi-square with continuity correction.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be non-negative, got b={b}, c={c}")
    n = b + c
    if n < exact_below:
        return TestResult(binomial_two_sided_p(min(b, c), n), "mcnemar-exact")
    statistic = (abs(b - c) - 1) ** 2 / n
    return TestResult(chi2_1df_sf(statistic), "mcnemar-chi2", statistic)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion (as a fraction, not percent)."""
    if n <= 0:
        return (0.0, 1.0)
    z = _z(confidence)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return (low, high)


def two_proportion_interval(x1: int, n1: int, x2: int, n2: int, confidence: float = 0.95) -> tuple[float, float]:
    """Interval for ``x2/n2 - x1/n1`` from independent samples (Newcombe's hybrid score, from Wilson intervals)."""
    p1, p2 = x1 / n1, x2 / n2
    l1, u1 = wilson_interval(x1, n1, confidence)
    l2, u2 = wilson_interval(x2, n2, confidence)
    d = p2 - p1
    return (d - math.sqrt((p2 - l2) ** 2 + (u1 - p1) ** 2), d + math.sqrt((u2 - p2) ** 2 + (p1 - l1) ** 2))


def two_proportion_test(x1: int, n1: int, x2: int, n2: int) -> TestResult:
    """Two-sided z-test (pooled variance) that two independent proportions are equal."""
    pooled = (x1 + x2) / (n1 + n2)
    variance = pooled * (1 - pooled) * (1 / n1 + 1 / n2)
    if variance == 0:
        return TestResult(1.0, "two-proportion-z", 0.0)
    z = (x2 / n2 - x1 / n1) / math.sqrt(variance)
    return TestResult(math.erfc(abs(z) / math.sqrt(2)), "two-proportion-z", z)


def paired_proportion_interval(b: int, c: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Interval for the paired difference ``(c - b) / n``: Wald with continuity correction (Fleiss).

    The correction keeps the interval in step with the continuity-corrected McNemar test, so that
    an interval that excludes zero and a significant p-value almost always go together.
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    z = _z(confidence)
    d = (c - b) / n
    half = z * math.sqrt(max(b + c - (c - b) ** 2 / n, 0.0)) / n + 1 / n
    return (max(-1.0, d - half), min(1.0, d + half))


def discordant_counts(baseline_correct: str, current_correct: str) -> tuple[int, int]:
    """``(b, c)``: samples right only in the baseline, and right only in the current run."""
    b = c = 0
    for old, new in zip(baseline_correct, current_correct):
        if old != new:
            if old == "1":
                b += 1
            else:
                c += 1
    return b, c


# --------------------------------------------------------------------------------------------
# Metrics and rules
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricInfo:
    """A checkable metric: its kind (sets units and formatting) and the bound used when none is given."""

    name: str
    kind: str  # accuracy | loss | entropy | distance | throughput
    default_allowed: float
    default_relative: bool = False
    per_layer: bool = False


METRICS: dict[str, MetricInfo] = {
    m.name: m
    for m in (
        MetricInfo("top1", "accuracy", 0.5),
        MetricInfo("top5", "accuracy", 0.5),
        MetricInfo("loss", "loss", 0.02),
        MetricInfo("entropy_mean", "entropy", 0.02),
        MetricInfo("entropy_layer", "entropy", 0.05, per_layer=True),
        MetricInfo("distance_mean", "distance", 1.0),
        MetricInfo("distance_layer", "distance", 2.0, per_layer=True),
        MetricInfo("model_images_per_s", "throughput", 5.0, default_relative=True),
        MetricInfo("end_to_end_images_per_s", "throughput", 5.0, default_relative=True),
    )
}
ALIASES = {"entropy_per_layer": "entropy_layer", "distance_per_layer": "distance_layer"}


@dataclass(frozen=True)
class Rule:
    """One bound: ``metric`` may move in ``direction`` (drop or rise) by at most ``allowed``.

    ``allowed`` is in the metric's units (percentage points for accuracies), or a percentage of
    the baseline value when ``relative``.
    """

    metric: str
    direction: str
    allowed: float
    relative: bool = False

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise CbtoolError(f"unknown metric {self.metric!r}; known: {', '.join(METRICS)}")
        if self.direction not in (DROP, RISE):
            raise CbtoolError(f"direction must be {DROP!r} or {RISE!r}, got {self.direction!r}")
        if not math.isfinite(self.allowed) or self.allowed < 0:
            raise CbtoolError(f"allowed change for {self.metric} must be a non-negative number, got {self.allowed}")
        if self.relative and METRICS[self.metric].kind == "accuracy":
            raise CbtoolError(
                f"{self.metric} is already in percent: give the allowed {self.direction} in points, "
                f"e.g. {self.metric}=0.5"
            )

    @property
    def info(self) -> MetricInfo:
        return METRICS[self.metric]

    def describe(self) -> str:
        """``drop 0.50`` or ``rise 5%``: the bound as the report shows it."""
        amount = f"{self.allowed:g}%" if self.relative else format_value(self.allowed, self.info.kind)
        return f"{self.direction} {amount}"

    @classmethod
    def parse(cls, text: str, direction: str) -> Rule | None:
        """Parse ``METRIC=VALUE``, ``METRIC=5%``, a bare ``METRIC`` (its default bound) or ``METRIC=off`` (``None``)."""
        option = f"--max-{direction}"
        name, sep, value = text.partition("=")
        name, value = name.strip(), value.strip()
        name = ALIASES.get(name, name)
        if not name or (sep and not value):
            raise CbtoolError(f"{option} expects METRIC=VALUE (e.g. top1=0.5), got {text!r}")
        if name not in METRICS:
            raise CbtoolError(f"unknown metric {name!r} in {option} {text}; known: {', '.join(METRICS)}")
        info = METRICS[name]
        if not sep:
            return cls(name, direction, info.default_allowed, info.default_relative)
        if value.lower() == "off":
            return None
        relative = value.endswith("%")
        try:
            allowed = float(value.rstrip("%").strip())
        except ValueError:
            raise CbtoolError(f"{option} expects METRIC=VALUE with a number (e.g. {name}=0.5), got {text!r}") from None
        return cls(name, direction, allowed, relative)


DEFAULT_RULES: tuple[Rule, ...] = (Rule("top1", DROP, 0.5),)


def parse_rules(max_drop: Iterable[str] = (), max_rise: Iterable[str] = (), *, defaults: bool = True) -> list[Rule]:
    """Rules from ``--max-drop``/``--max-rise`` texts, on top of :data:`DEFAULT_RULES`.

    A later rule for the same metric and direction replaces an earlier one; ``METRIC=off`` removes it.
    """
    rules: dict[tuple[str, str], Rule | None] = {}
    if defaults:
        rules.update({(r.metric, r.direction): r for r in DEFAULT_RULES})
    for direction, texts in ((DROP, max_drop), (RISE, max_rise)):
        for text in texts:
            name = text.partition("=")[0].strip()
            rules[(ALIASES.get(name, name), direction)] = Rule.parse(text, direction)
    return [rule for rule in rules.values() if rule is not None]


# --------------------------------------------------------------------------------------------
# Reading results files
# --------------------------------------------------------------------------------------------


def validate_results(results: Any, name: str = "results") -> dict[str, Any]:
    """Check that ``results`` has the shape of docs/results-schema.md; raise :class:`CbtoolError` naming the flaw."""
    if not isinstance(results, dict):
        raise CbtoolError(f"{name} is not a cbtool results file: expected a JSON object, got {type(results).__name__}")
    version = results.get("schema_version")
    if version is None:
        raise CbtoolError(f"{name} is not a cbtool results file: no schema_version (write one with cbtool eval --json)")
    from cbtool.results import READABLE_SCHEMA_VERSIONS

    if version not in READABLE_SCHEMA_VERSIONS:
        raise CbtoolError(
            f"{name} has schema_version {version!r}, this cbtool reads {' and '.join(map(str, READABLE_SCHEMA_VERSIONS))}; "
            "use the cbtool version that wrote it, or re-run cbtool eval"
        )
    if not isinstance(results.get("dataset"), dict):
        raise CbtoolError(f"{name} is not a cbtool results file: 'dataset' is missing or not an object")
    models = results.get("models")
    if not isinstance(models, list) or not models:
        raise CbtoolError(f"{name} is not a cbtool results file: 'models' is missing or empty")
    for index, model in enumerate(models):
        if not isinstance(model, dict) or not isinstance(model.get("metrics"), dict) or "label" not in model:
            raise CbtoolError(f"{name}: models[{index}] needs a 'label' and a 'metrics' object")
        correct = model["metrics"].get("correct")
        if correct is not None and (not isinstance(correct, str) or correct.strip("01")):
            raise CbtoolError(f"{name}: models[{index}].metrics.correct must be a string of 0s and 1s")
        # Accuracies are counts over samples: NaN means a broken file. (A NaN loss is a broken model: a regression.)
        for key in ("top1", "top5"):
            value = model["metrics"].get(key)
            if value is not None and not _is_number(value):
                raise CbtoolError(f"{name}: models[{index}].metrics.{key} is {value!r}, not a finite number; "
                                  "re-run cbtool eval to get usable results")  # fmt: skip
    return results


def load_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a results file written by ``cbtool eval --json``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CbtoolError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CbtoolError(f"{path} is a folder, not a results file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise CbtoolError(f"cannot read {path}: {error}") from None
    try:
        results = json.loads(text)
    except json.JSONDecodeError as error:
        where = f"line {error.lineno}, column {error.colno}"
        raise CbtoolError(f"{path} is not valid JSON ({where}: {error.msg})") from None
    return validate_results(results, str(path))


def dataset_mismatches(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """Reasons why two results' ``dataset`` records may not describe the same samples (empty when they do)."""
    reasons = []
    same_samples = a.get("samples_sha256") is not None and a.get("samples_sha256") == b.get("samples_sha256")
    # The same samples spelled by another path (./val vs /ci/val) are still the same dataset.
    keys = ("split", "num_samples") if same_samples else ("name", "split", "num_samples", "samples_sha256")
    for key in keys:
        x, y = a.get(key), b.get(key)
        if x != y:
            if key == "samples_sha256":
                x, y = (v[:12] + "…" if isinstance(v, str) and len(v) > 12 else v for v in (x, y))
            reasons.append(f"{key} {x!r} vs {y!r}" if key != "num_samples" else f"{key} {x} vs {y}")
    return reasons


def _num_samples(results: Mapping[str, Any], model: Mapping[str, Any]) -> int | None:
    n = model["metrics"].get("num_samples", results["dataset"].get("num_samples"))
    return int(n) if isinstance(n, (int, float)) and n > 0 else None


def pair_models(
    results: Mapping[str, Any],
    baseline: Mapping[str, Any],
    model: str | None = None,
    baseline_model: str | None = None,
    *,
    names: tuple[str, str] = ("results", "baseline"),
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """``(current, baseline)`` model pairs: the labels asked for, the only model of each, or equal labels."""

    def find(data: Mapping[str, Any], label: str, name: str) -> dict[str, Any]:
        for entry in data["models"]:
            if entry["label"] == label:
                return entry
        labels = ", ".join(repr(m["label"]) for m in data["models"])
        raise CbtoolError(f"{name} has no model labelled {label!r} (labels there: {labels})")

    current, base = results["models"], baseline["models"]
    if model is not None or baseline_model is not None:
        if model is not None:
            chosen = find(results, model, names[0])
        elif len(current) == 1:
            chosen = current[0]
        else:
            raise CbtoolError(f"{names[0]} holds {len(current)} models; pick one with --model")
        if baseline_model is not None:
            return [(chosen, find(baseline, baseline_model, names[1]))]
        return [(chosen, base[0] if len(base) == 1 else find(baseline, chosen["label"], names[1]))]
    if len(current) == 1 and len(base) == 1:
        return [(current[0], base[0])]
    by_label = {m["label"]: m for m in base}
    pairs = []
    for entry in current:
        if entry["label"] not in by_label:
            labels = ", ".join(repr(m["label"]) for m in base)
            raise CbtoolError(
                f"model {entry['label']!r} of {names[0]} has no model with that label in {names[1]} "
                f"(labels there: {labels}); pick the pair with --model and --baseline-model"
            )
        pairs.append((entry, by_label[entry["label"]]))
    return pairs


def _values(model: Mapping[str, Any], metric: str, name: str) -> list[tuple[str, float | None]]:
    """``[(display name, value)]`` of ``metric`` in one model: one entry, or one per layer."""
    metrics, density = model["metrics"], model.get("density")
    label = model["label"]
    if metric in ("top1", "top5", "loss"):
        return [(metric, metrics.get(metric))]
    if metric in ("model_images_per_s", "end_to_end_images_per_s"):
        throughput = metrics.get("throughput") or {}
        if throughput.get(metric) is None:
            raise CbtoolError(f"{name}: model {label!r} has no {metric} (it was evaluated without throughput)")
        return [(metric, throughput[metric])]
    if not isinstance(density, dict):
        raise CbtoolError(f"{name}: model {label!r} has no attention density for {metric}; evaluate with --density")
    if metric in ("entropy_mean", "distance_mean"):
        return [(metric, density.get(metric))]
    key = {"entropy_layer": "entropy_per_layer", "distance_layer": "distance_per_layer"}[metric]
    layers = density.get(key)
    if not isinstance(layers, list):
        raise CbtoolError(f"{name}: model {label!r} has no {key}; evaluate with --density")
    return [(f"{metric}[{i}]", v) for i, v in enumerate(layers)]


# --------------------------------------------------------------------------------------------
# The check
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricCheck:
    """The verdict on one metric of one model pair. ``difference`` is current minus baseline."""

    model: str
    baseline_model: str
    metric: str
    kind: str
    direction: str
    baseline: float | None
    current: float | None
    difference: float | None
    interval: Interval | None  # of the difference, at confidence 1 - alpha
    p_value: float | None
    test: str | None
    allowed: float  # in the metric's units (a relative bound is resolved against the baseline)
    allowed_text: str
    verdict: str

    @property
    def failed(self) -> bool:
        return self.verdict == "regression"


@dataclass
class CheckReport:
    """All verdicts of one ``check``; ``passed`` is what the exit code reports."""

    checks: list[MetricCheck]
    alpha: float
    strict: bool
    same_samples: bool
    notes: list[str] = field(default_factory=list)
    results_name: str = "results"
    baseline_name: str = "baseline"

    @property
    def regressions(self) -> list[MetricCheck]:
        return [c for c in self.checks if c.failed]

    @property
    def passed(self) -> bool:
        return not self.regressions

    @property
    def confidence_label(self) -> str:
        return f"{100 * (1 - self.alpha):g}% CI"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record of the verdicts (what ``--json`` writes)."""
        checks = []
        for check in self.checks:
            entry = asdict(check)
            entry["interval"] = list(check.interval) if check.interval is not None else None
            checks.append(entry)
        return {
            "kind": "cbtool-check",
            "schema_version": SCHEMA_VERSION,
            "passed": self.passed,
            "alpha": self.alpha,
            "strict": self.strict,
            "same_samples": self.same_samples,
            "results": self.results_name,
            "baseline": self.baseline_name,
            "notes": list(self.notes),
            "counts": {v: sum(c.verdict == v for c in self.checks) for v in VERDICTS},
            "checks": checks,
        }

    def _rows(self) -> tuple[list[str], list[list[str]]]:
        several = len({(c.model, c.baseline_model) for c in self.checks}) > 1
        headers = ["metric", "baseline", "current", "diff", self.confidence_label, "p", "allowed", "verdict"]
        rows = []
        for c in self.checks:
            diff = format_value(c.difference, c.kind, signed=True)
            if c.allowed_text.endswith("%") and c.difference is not None and c.baseline:
                diff += f" ({100 * c.difference / abs(c.baseline):+.1f}%)"
            interval = "-"
            if c.interval is not None:
                low, high = (format_value(v, c.kind, signed=True) for v in c.interval)
                interval = f"[{low}, {high}]"
            current, baseline = format_value(c.current, c.kind), format_value(c.baseline, c.kind)
            row = [c.metric, baseline, current, diff, interval, format_p(c.p_value), c.allowed_text, c.verdict]
            rows.append([c.model, *row] if several else row)
        return (["model", *headers] if several else headers), rows

    def summary(self) -> str:
        """One line: passed or failed, and the count of each verdict."""
        counts = ", ".join(f"{sum(c.verdict == v for c in self.checks)} {v}" for v in VERDICTS)
        state = "passed" if self.passed else "FAILED"
        return f"check {state}: {len(self.checks)} checks ({counts})"

    def to_text(self) -> str:
        """The plain-text report: which files, the table, notes and the summary line."""
        pairs = sorted({(c.model, c.baseline_model) for c in self.checks})
        lines = [f"{self.results_name} vs baseline {self.baseline_name}"]
        if len(pairs) == 1:
            model, base = pairs[0]
            lines[0] += f" (model {model!r}" + (f" vs {base!r})" if base != model else ")")
        headers, rows = self._rows()
        lines += ["", format_table(headers, rows), ""]
        lines += [f"note: {note}" for note in self.notes]
        lines.append(self.summary())
        return "\n".join(lines)

    def to_markdown(self) -> str:
        """A section for a CI job page (e.g. ``$GITHUB_STEP_SUMMARY``)."""
        headers, rows = self._rows()
        rows = [[f"**{cell}**" if cell == "regression" else cell for cell in row] for row in rows]
        state = "passed" if self.passed else "failed: regression"
        lines = [
            f"### cbtool check {state}",
            "",
            f"`{self.results_name}` vs baseline `{self.baseline_name}`, "
            f"alpha {self.alpha:g}{', strict' if self.strict else ''}.",
            "",
            markdown_table(headers, rows),
            "",
        ]
        lines += [f"- {note}" for note in self.notes]
        if self.notes:
            lines.append("")
        return "\n".join(lines) + "\n"  # a blank line before whatever the next step appends

    def raise_for_regression(self) -> None:
        """Raise :class:`RegressionError` (exit code 1) naming the failed metrics, if any."""
        if self.passed:
            return
        parts = []
        for c in self.regressions[:3]:
            where = f"{c.model}: " if len({x.model for x in self.checks}) > 1 else ""
            p = f", p={format_p(c.p_value)}" if c.p_value is not None else ""
            change = format_value(c.difference, c.kind, signed=True)
            parts.append(f"{where}{c.metric} {change} ({c.allowed_text} allowed{p})")
        more = f" and {len(self.regressions) - 3} more" if len(self.regressions) > 3 else ""
        raise RegressionError(f"regression: {'; '.join(parts)}{more}")


def _verdict(worse: float, allowed: float, p_value: float | None, alpha: float, strict: bool) -> str:
    # worse > 0: moved in the direction the rule forbids. Float slack so that 92.1 - 91.6 == 0.5 is within 0.5.
    slack = 1e-9 * max(1.0, abs(allowed))
    significant = p_value is None or p_value < alpha
    if worse > allowed + slack:
        return "regression" if significant or strict else "noise"
    if -worse > allowed + slack:
        return "improved" if significant else "noise"
    return "ok"


@dataclass(frozen=True)
class _Pair:
    """One current model and its baseline model, with what the accuracy tests need to know."""

    current: Mapping[str, Any]
    base: Mapping[str, Any]
    n_current: int | None
    n_base: int | None
    same_samples: bool

    def accuracy_statistics(self, metric: str, confidence: float) -> tuple[Interval | None, TestResult | None]:
        """Interval (in points) and test for the accuracy difference: paired when possible, else independent."""
        new, old = self.current["metrics"].get("correct"), self.base["metrics"].get("correct")
        if metric == "top1" and self.same_samples and new and old and len(new) == len(old) == self.n_current:
            b, c = discordant_counts(old, new)
            low, high = paired_proportion_interval(b, c, len(new), confidence)
            return (100 * low, 100 * high), mcnemar_test(b, c)
        if not self.n_current or not self.n_base:
            return None, None
        x_new = round(self.current["metrics"][metric] * self.n_current / 100)
        x_old = round(self.base["metrics"][metric] * self.n_base / 100)
        low, high = two_proportion_interval(x_old, self.n_base, x_new, self.n_current, confidence)
        return (100 * low, 100 * high), two_proportion_test(x_old, self.n_base, x_new, self.n_current)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_results(
    results: Mapping[str, Any],
    baseline: Mapping[str, Any],
    rules: Sequence[Rule] | None = None,
    alpha: float = 0.05,
    strict: bool = False,
    allow_mismatch: bool = False,
    *,
    model: str | None = None,
    baseline_model: str | None = None,
    results_name: str = "results",
    baseline_name: str = "baseline",
) -> CheckReport:
    """Compare ``results`` with ``baseline`` (both dicts in the results schema) under ``rules``.

    ``rules`` defaults to :data:`DEFAULT_RULES`. A change beyond a rule's bound is a regression when
    it is significant at ``alpha`` (or always, with ``strict``; or when the metric has no test), and
    noise otherwise. Raises :class:`CbtoolError` for unusable input, including different datasets
    unless ``allow_mismatch``.
    """
    validate_results(results, results_name)
    validate_results(baseline, baseline_name)
    if not (_is_number(alpha) and 0.0 < alpha < 1.0):
        raise CbtoolError(f"alpha must be between 0 and 1 (exclusive), got {alpha}")
    rules = list(DEFAULT_RULES if rules is None else rules)
    if not rules:
        raise CbtoolError("no metric to check: every rule is off")

    notes = []
    mismatches = dataset_mismatches(results["dataset"], baseline["dataset"])
    if mismatches:
        if not allow_mismatch:
            raise CbtoolError(
                f"{results_name} and {baseline_name} describe different datasets: {'; '.join(mismatches)} "
                "(--allow-mismatch compares them anyway)"
            )
        notes.append(f"datasets differ ({'; '.join(mismatches)}); accuracy tests treat the runs as independent")
    sha = results["dataset"].get("samples_sha256")
    same_count = results["dataset"].get("num_samples") == baseline["dataset"].get("num_samples")
    same_samples = bool(sha) and sha == baseline["dataset"].get("samples_sha256") and same_count

    checks = []
    names = (results_name, baseline_name)
    for current, base in pair_models(results, baseline, model, baseline_model, names=names):
        pair = _Pair(current, base, _num_samples(results, current), _num_samples(baseline, base), same_samples)
        has_correct = current["metrics"].get("correct") and base["metrics"].get("correct")
        if same_samples and not has_correct and any(rule.metric == "top1" for rule in rules):
            notes.append(f"{current['label']}: per-sample correctness missing; top1 tested as independent samples")
        for rule in rules:
            new_values = _values(current, rule.metric, results_name)
            old_values = _values(base, rule.metric, baseline_name)
            if len(new_values) != len(old_values):
                raise CbtoolError(
                    f"{rule.metric}: model {current['label']!r} has {len(new_values)} layers in {results_name} "
                    f"but {len(old_values)} in {baseline_name}"
                )
            for (display, new), (_, old) in zip(new_values, old_values):
                if not _is_number(old):
                    hint = " (the model has fewer than 5 classes)" if rule.metric == "top5" and old is None else ""
                    where = f"{baseline_name}: model {base['label']!r}"
                    raise CbtoolError(f"{where} has no usable {display}: {old!r}{hint}")
                checks.append(_judge(rule, display, pair, new, old, alpha, strict))
    return CheckReport(checks, float(alpha), strict, same_samples, notes, results_name, baseline_name)


def _judge(rule: Rule, display: str, pair: _Pair, new: Any, old: float, alpha: float, strict: bool) -> MetricCheck:
    allowed = rule.allowed * abs(old) / 100 if rule.relative else rule.allowed
    common = dict(
        model=str(pair.current["label"]),
        baseline_model=str(pair.base["label"]),
        metric=display,
        kind=rule.info.kind,
        direction=rule.direction,
        baseline=float(old),
        allowed=allowed,
        allowed_text=rule.describe(),
    )
    if not _is_number(new):
        # The baseline had a number and this run has none (NaN loss, top5 gone): that is a regression.
        current = new if isinstance(new, float) else None
        return MetricCheck(
            **common, current=current, difference=None, interval=None, p_value=None, test=None, verdict="regression"
        )
    difference = float(new) - float(old)
    interval, test = None, None
    if rule.info.kind == "accuracy":
        interval, test = pair.accuracy_statistics(rule.metric, 1 - alpha)
    p_value = test.p_value if test is not None else None
    worse = -difference if rule.direction == DROP else difference
    return MetricCheck(
        **common,
        current=float(new),
        difference=difference,
        interval=interval,
        p_value=p_value,
        test=test.method if test is not None else None,
        verdict=_verdict(worse, allowed, p_value, alpha, strict),
    )


def paired_top1_test(reference: Mapping[str, Any], other: Mapping[str, Any]) -> TestResult | None:
    """McNemar's test on top1 of two models scored on the same samples (``None`` without both ``correct``)."""
    a, b = reference["metrics"].get("correct"), other["metrics"].get("correct")
    if not a or not b or len(a) != len(b):
        return None
    return mcnemar_test(*discordant_counts(a, b))
