"""The rule grammar of ``cbtool check``: the checkable metrics, their default bounds, and ``--max-drop top1=0.5``."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from cbtool.errors import CbtoolError
from cbtool.report import format_value
from cbtool.robustness.registry import CORRUPTIONS, SEVERITIES

DROP, RISE = "drop", "rise"


@dataclass(frozen=True)
class MetricInfo:
    """A checkable metric: its kind (sets units and formatting) and the bound used when none is given."""

    name: str
    kind: str  # accuracy | loss | entropy | distance | throughput | error (robustness: lower is better)
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
        # Robustness (``cbtool eval --corruptions``): errors and CEs in percent, lower is better (--max-rise).
        # mce and relative_mce exist only where AlexNet's ImageNet-1k errors apply; mean_corruption_error everywhere.
        MetricInfo("mce", "error", 1.0),
        MetricInfo("relative_mce", "error", 1.0),
        MetricInfo("mean_corruption_error", "error", 1.0),
    )
}
# The direction in which a kind of metric improves; entropy and distance have none (CB raises entropy on purpose).
GOOD_DIRECTION = {"accuracy": RISE, "throughput": RISE, "loss": DROP, "error": DROP}
ALIASES = {"entropy_per_layer": "entropy_layer", "distance_per_layer": "distance_layer"}
# ``error:<corruption>`` (mean error over the severities run) and ``error:<corruption>:<severity>`` (one cell).
ERROR_PREFIX = "error:"
ERROR_DEFAULT = 1.0
KNOWN_TEXT = ", ".join(METRICS) + ", error:<corruption>, error:<corruption>:<severity>"


def robustness_cell(name: str) -> tuple[str, int | None] | None:
    """``("fog", 3)`` for ``error:fog:3``, ``("fog", None)`` for ``error:fog``, ``None`` for other names.

    Raises :class:`CbtoolError` for an ``error:`` name with an unknown corruption or a severity outside 1-5.
    """
    if not name.startswith(ERROR_PREFIX):
        return None
    corruption, has_severity, severity = name[len(ERROR_PREFIX):].partition(":")
    if corruption not in CORRUPTIONS:
        raise CbtoolError(f"unknown corruption {corruption!r} in metric {name!r}; valid: {', '.join(CORRUPTIONS)}")
    if not has_severity:
        return corruption, None
    if severity not in {str(s) for s in SEVERITIES}:
        raise CbtoolError(f"severity in metric {name!r} must be an integer from 1 to 5, got {severity!r}")
    return corruption, int(severity)


def metric_info(name: str) -> MetricInfo:
    """The :class:`MetricInfo` of a metric name, including ``error:<corruption>[:<severity>]``."""
    if name in METRICS:
        return METRICS[name]
    if robustness_cell(name) is not None:
        return MetricInfo(name, "error", ERROR_DEFAULT)
    raise CbtoolError(f"unknown metric {name!r}; known: {KNOWN_TEXT}")


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
        info = metric_info(self.metric)
        if self.direction not in (DROP, RISE):
            raise CbtoolError(f"direction must be {DROP!r} or {RISE!r}, got {self.direction!r}")
        if not math.isfinite(self.allowed) or self.allowed < 0:
            raise CbtoolError(f"allowed change for {self.metric} must be a non-negative number, got {self.allowed}")
        if info.kind == "error" and self.direction == DROP:
            raise CbtoolError(
                f"{self.metric} is an error (lower is better): bound its rise, e.g. --max-rise {self.metric}=1"
            )
        good = GOOD_DIRECTION.get(info.kind)
        if good is not None and self.direction == good:  # a bound on the good side would call improvements regressions
            bad = RISE if good == DROP else DROP
            raise CbtoolError(f"{self.metric} is better when it {'falls' if good == DROP else 'rises'}: a {self.direction} "
                              f"is an improvement; bound its {bad}, e.g. --max-{bad} {self.metric}={self.allowed:g}")  # fmt: skip
        if self.relative and info.kind in ("accuracy", "error"):
            raise CbtoolError(
                f"{self.metric} is already in percent: give the allowed {self.direction} in points, "
                f"e.g. {self.metric}=0.5"
            )

    @property
    def info(self) -> MetricInfo:
        return metric_info(self.metric)

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
        if name not in METRICS and not name.startswith(ERROR_PREFIX):
            raise CbtoolError(f"unknown metric {name!r} in {option} {text}; known: {KNOWN_TEXT}")
        info = metric_info(name)
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
