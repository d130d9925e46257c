"""Regression verdicts for ``cbtool check``: compare a results file with a baseline, metric by metric.

An accuracy drop is a regression only when it exceeds the allowed change *and* is unlikely to be
sampling noise: a paired McNemar test when both runs scored the same samples (``metrics.correct``),
otherwise a test of two independent proportions; one robustness cell (``error:fog:3``) the same way
on its per-sample ``correct`` string. Other metrics carry no per-sample values, so their bound alone
decides. No torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from cbtool.check.rules import DEFAULT_RULES, DROP, Rule, robustness_cell
from cbtool.check.robust_values import cell_correct, robustness_value, same_average
from cbtool.check.stats import (
    TestResult,
    discordant_counts,
    mcnemar_test,
    paired_proportion_interval,
    two_proportion_interval,
    two_proportion_test,
)
from cbtool.errors import CbtoolError, RegressionError
from cbtool.report import check_markdown, check_summary, check_text, format_p, format_value
from cbtool.results import SCHEMA_VERSION, dataset_mismatches, is_number, validate_results

Interval = tuple[float, float]
VERDICTS = ("ok", "improved", "noise", "regression")


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
    if metric in ("mce", "relative_mce", "mean_corruption_error") or robustness_cell(metric) is not None:
        return [(metric, robustness_value(model, metric, name))]
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

    @property
    def counts(self) -> dict[str, int]:
        """How many checks got each verdict, in the order of :data:`VERDICTS`."""
        return {v: sum(c.verdict == v for c in self.checks) for v in VERDICTS}

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
            "counts": self.counts,
            "checks": checks,
        }

    def summary(self) -> str:
        """One line: passed or failed, and the count of each verdict."""
        return check_summary(self)

    def to_text(self) -> str:
        """The plain-text report: which files, the table, notes and the summary line."""
        return check_text(self)

    def to_markdown(self) -> str:
        """A section for a CI job page (e.g. ``$GITHUB_STEP_SUMMARY``)."""
        return check_markdown(self)

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


    def cell_statistics(
        self, corruption: str, severity: int, confidence: float
    ) -> tuple[Interval | None, TestResult | None]:
        """Interval (in points) and test for the difference in top-1 error of one corruption cell.

        McNemar on the cell's per-sample ``correct`` strings when the runs are paired, exactly as for top1
        (the error difference is minus the accuracy difference: same p-value, interval negated).
        """
        new, old = cell_correct(self.current, corruption, severity), cell_correct(self.base, corruption, severity)
        if self.same_samples and new and old and len(new) == len(old) == self.n_current:
            b, c = discordant_counts(old, new)
            low, high = paired_proportion_interval(b, c, len(new), confidence)
            return (-100 * high, -100 * low), mcnemar_test(b, c)
        if not self.n_current or not self.n_base:
            return None, None
        key = str(severity)
        x_new = round(self.current["robustness"]["error"][corruption][key] * self.n_current / 100)
        x_old = round(self.base["robustness"]["error"][corruption][key] * self.n_base / 100)
        low, high = two_proportion_interval(x_old, self.n_base, x_new, self.n_current, confidence)
        return (100 * low, 100 * high), two_proportion_test(x_old, self.n_base, x_new, self.n_current)


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
    if not (is_number(alpha) and 0.0 < alpha < 1.0):
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
            cell = robustness_cell(rule.metric)
            if same_samples and cell is not None and cell[1] is not None and not (
                cell_correct(current, *cell) and cell_correct(base, *cell)
            ):
                notes.append(f"{current['label']}: per-sample correctness of {rule.metric} missing; "
                             "tested as independent samples")  # fmt: skip
        for rule in rules:
            new_values = _values(current, rule.metric, results_name)
            old_values = _values(base, rule.metric, baseline_name)
            same_average(current, base, rule.metric, names)
            if len(new_values) != len(old_values):
                raise CbtoolError(
                    f"{rule.metric}: model {current['label']!r} has {len(new_values)} layers in {results_name} "
                    f"but {len(old_values)} in {baseline_name}"
                )
            for (display, new), (_, old) in zip(new_values, old_values):
                if not is_number(old):
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
    if not is_number(new):
        # The baseline had a number and this run has none (NaN loss, top5 gone): that is a regression.
        current = new if isinstance(new, float) else None
        return MetricCheck(
            **common, current=current, difference=None, interval=None, p_value=None, test=None, verdict="regression"
        )
    difference = float(new) - float(old)
    interval, test = None, None
    cell = robustness_cell(rule.metric)
    if rule.info.kind == "accuracy":
        interval, test = pair.accuracy_statistics(rule.metric, 1 - alpha)
    elif cell is not None and cell[1] is not None:  # one corruption cell: tested like top1
        interval, test = pair.cell_statistics(cell[0], cell[1], 1 - alpha)
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


