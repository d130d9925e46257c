"""Corruption Error (CE), mCE and relative mCE from top-1 error tables; pure Python, no torch.

Definitions (Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations", ICLR 2019, Section 3):

    CE_c          = sum_s E_{s,c} / sum_s E^AlexNet_{s,c}
    relative CE_c = sum_s (E_{s,c} - E_clean) / sum_s (E^AlexNet_{s,c} - E^AlexNet_clean)

over the severities s = 1..5; mCE and relative mCE average them over the 15 ImageNet-C corruptions.
An error table maps corruption -> severity -> top-1 error (a fraction, 0-1).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from cbtool.robustness.registry import COMMON, SEVERITIES, CorruptionError, check_corruption, check_severity

# AlexNet's top-1 error on ImageNet-C per corruption, averaged over severities 1-5 (the CE denominator
# of Hendrycks & Dietterich, ICLR 2019, Section 3; their AlexNet is torchvision's, evaluated by
# hendrycks/robustness ImageNet-C/test.py). The six-digit values are those distributed with the
# benchmark, as quoted in google-research/augmix imagenet.py ("Raw AlexNet errors taken from
# https://github.com/hendrycks/robustness"). No AlexNet figures are published for the four extra
# corruptions (speckle_noise, gaussian_blur, spatter, saturate), so they get no CE.
ALEXNET_ERRORS: dict[str, float] = {
    "gaussian_noise": 0.886428,
    "shot_noise": 0.894468,
    "impulse_noise": 0.922640,
    "defocus_blur": 0.819880,
    "glass_blur": 0.826268,
    "motion_blur": 0.785948,
    "zoom_blur": 0.798360,
    "snow": 0.866816,
    "frost": 0.826572,
    "fog": 0.819324,
    "brightness": 0.564592,
    "contrast": 0.853204,
    "elastic_transform": 0.646056,
    "pixelate": 0.717840,
    "jpeg_compression": 0.606500,
}
# AlexNet's clean top-1 error: torchvision's published 56.522% top-1 for alexnet-owt-4df8aa71.pth, the
# checkpoint ImageNet-C/test.py evaluates (the paper rounds it to 43.5%).
ALEXNET_CLEAN_ERROR: float = 1.0 - 0.56522

ErrorTable = Mapping[str, Mapping[int, float]]


@dataclass(frozen=True)
class RobustnessSummary:
    """Per-corruption and mean figures; fractions (multiply by 100 for the paper's percentages)."""

    mean_error: dict[str, float]  # mean top-1 error over severities, every corruption in the table
    ce: dict[str, float]  # corruptions that have a baseline error
    relative_ce: dict[str, float] = field(default_factory=dict)  # only when a clean error is given
    mce: float | None = None
    relative_mce: float | None = None
    complete: bool = False  # True when CE covers all 15 ImageNet-C corruptions (the published mCE)


def _check_error(value: float, what: str) -> float:
    """``value`` as a float if it is an error rate (a fraction from 0 to 1), else CorruptionError."""
    if not 0.0 <= value <= 1.0:
        raise CorruptionError(f"{what} must be a fraction from 0 to 1, got {value!r}")
    return float(value)


def mean_error(errors_by_severity: Mapping[int, float], corruption: str = "corruption") -> float:
    """Mean top-1 error over severities 1-5; all five must be present (the baselines average all five).
    Severities may be ints or, as JSON objects store them, digit strings."""
    errors_by_severity = {
        check_severity(int(key) if isinstance(key, str) and key.isdigit() else key): value
        for key, value in errors_by_severity.items()
    }
    missing = [s for s in SEVERITIES if s not in errors_by_severity]
    if missing:
        listed = ", ".join(map(str, missing))
        raise CorruptionError(f"CE needs severities 1-5 of {corruption}; missing {listed}")
    values = [_check_error(errors_by_severity[s], f"error of {corruption} at severity {s}") for s in SEVERITIES]
    return sum(values) / len(values)


def corruption_error(errors_by_severity: Mapping[int, float], baseline_error: float, corruption: str = "") -> float:
    """CE: the summed error over severities 1-5 divided by the baseline's (given as its mean)."""
    return mean_error(errors_by_severity, corruption or "corruption") / baseline_error


def relative_corruption_error(
    errors_by_severity: Mapping[int, float],
    clean_error: float,
    baseline_error: float,
    baseline_clean_error: float = ALEXNET_CLEAN_ERROR,
    corruption: str = "",
) -> float:
    """Relative CE: the error added by the corruption, relative to the baseline's added error."""
    added = mean_error(errors_by_severity, corruption or "corruption") - _check_error(clean_error, "clean error")
    return added / (baseline_error - baseline_clean_error)


def summarize(
    errors: ErrorTable,
    clean_error: float | None = None,
    baseline: Mapping[str, float] = ALEXNET_ERRORS,
    baseline_clean_error: float = ALEXNET_CLEAN_ERROR,
) -> RobustnessSummary:
    """CE per corruption with a baseline, mCE over them, and (with ``clean_error``) the relative ones."""
    means = {name: mean_error(errors[name], check_corruption(name)) for name in errors}
    ce = {name: means[name] / baseline[name] for name in means if name in baseline}
    relative: dict[str, float] = {}
    if clean_error is not None:
        clean = _check_error(clean_error, "clean error")
        relative = {name: (means[name] - clean) / (baseline[name] - baseline_clean_error) for name in ce}
    return RobustnessSummary(
        mean_error=means,
        ce=ce,
        relative_ce=relative,
        mce=sum(ce.values()) / len(ce) if ce else None,
        relative_mce=sum(relative.values()) / len(relative) if relative else None,
        complete=set(COMMON) <= set(ce),
    )
