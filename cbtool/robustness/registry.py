"""Corruption names, groups and the parsers for ``--corruptions`` and ``--severities``; no torch."""

from __future__ import annotations

from collections.abc import Iterable

from cbtool.errors import CbtoolError

# The order of Hendrycks & Dietterich (ICLR 2019), Figure 1, then the four held-out ("extra") ones.
GROUPS: dict[str, tuple[str, ...]] = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"),
    "weather": ("snow", "frost", "fog", "brightness"),
    "digital": ("contrast", "elastic_transform", "pixelate", "jpeg_compression"),
    "extra": ("speckle_noise", "gaussian_blur", "spatter", "saturate"),
}
# The 15 corruptions of ImageNet-C, over which mCE is averaged.
COMMON: tuple[str, ...] = GROUPS["noise"] + GROUPS["blur"] + GROUPS["weather"] + GROUPS["digital"]
CORRUPTIONS: tuple[str, ...] = COMMON + GROUPS["extra"]
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
# ImageNet-C's files were saved as JPEG at this quality after corruption (make_imagenet_c.py); cbtool re-encodes
# the same way by default so that its errors are comparable with published ImageNet-C numbers.
JPEG_QUALITY = 85
# Selections that name several corruptions at once.
SUBSETS: dict[str, tuple[str, ...]] = {"all": CORRUPTIONS, "common": COMMON, **GROUPS}


class CorruptionError(CbtoolError):
    """An unknown corruption name or a severity outside 1-5."""


def check_corruption(name: str) -> str:
    """Return ``name`` if it is a known corruption, else raise CorruptionError listing the valid ones."""
    if name not in CORRUPTIONS:
        raise CorruptionError(
            f"unknown corruption {name!r}; valid: {', '.join(CORRUPTIONS)} (or a group: {', '.join(SUBSETS)})"
        )
    return name


def check_severity(severity: object) -> int:
    """Return ``severity`` as an int if it is an integer in 1-5, else raise CorruptionError."""
    if isinstance(severity, bool) or not isinstance(severity, int) or severity not in SEVERITIES:
        raise CorruptionError(f"severity must be an integer from 1 to 5, got {severity!r}")
    return severity


def check_jpeg_quality(quality: object) -> int | None:
    """``quality`` if it is None (no re-encoding) or a JPEG quality from 1 to 95, else CorruptionError."""
    if quality is None:
        return None
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 95:
        raise CorruptionError(f"jpeg_quality must be None (no re-encoding) or an integer from 1 to 95, got {quality!r}")
    return quality


def parse_corruptions(text: str) -> tuple[str, ...]:
    """Parse ``all``, ``common``, a group (``noise``, ``blur``, ``weather``, ``digital``, ``extra``) or
    comma-separated names and groups into corruption names, in canonical order, without repeats."""
    parts = [part.strip().lower() for part in text.split(",")]
    if not any(parts):
        raise CorruptionError(f"no corruption given; valid: {', '.join(CORRUPTIONS)} (or {', '.join(SUBSETS)})")
    chosen: set[str] = set()
    for part in parts:
        if not part:
            raise CorruptionError(f"empty name in --corruptions {text!r}")
        chosen.update(SUBSETS[part] if part in SUBSETS else (check_corruption(part),))
    return tuple(name for name in CORRUPTIONS if name in chosen)


def parse_severities(text: str) -> tuple[int, ...]:
    """Parse ``1-5``, ``3`` or ``1,3,5`` (ranges and lists mix: ``1,3-5``) into sorted severities."""
    chosen: set[int] = set()
    for part in text.split(","):
        low, _, high = part.strip().partition("-")
        try:
            bounds = (int(low), int(high) if high else int(low))
        except ValueError:
            raise CorruptionError(f"severities must look like 1-5, 3 or 1,3,5; got {text!r}") from None
        if bounds[0] > bounds[1]:
            raise CorruptionError(f"severity range {part.strip()!r} runs backwards; write it as {bounds[1]}-{bounds[0]}")
        for severity in bounds:
            check_severity(severity)
        chosen.update(range(bounds[0], bounds[1] + 1))
    return tuple(sorted(chosen))


def corruption_order(names: Iterable[str]) -> list[str]:
    """``names`` without repeats in ImageNet-C's order (:data:`CORRUPTIONS`), unknown names last as first seen."""
    given = list(dict.fromkeys(names))
    return [name for name in CORRUPTIONS if name in given] + [name for name in given if name not in CORRUPTIONS]


def describe_corruptions(names: Iterable[str], most: int = 3) -> str:
    """A short phrase for a set of corruptions, for a plot's label: the selection it equals ("the 3 noise
    corruptions", "the 15 ImageNet-C corruptions", "all 19 corruptions"), else the names when at most ``most``,
    else how many."""
    ordered = corruption_order(names)
    if set(ordered) == set(CORRUPTIONS):
        return f"all {len(CORRUPTIONS)} corruptions"
    if set(ordered) == set(COMMON):
        return f"the {len(COMMON)} ImageNet-C corruptions"
    group = next((key for key, members in GROUPS.items() if set(ordered) == set(members)), None)
    if group is not None:
        return f"the {len(ordered)} {group} corruptions"
    return ", ".join(ordered) if len(ordered) <= most else f"{len(ordered)} corruptions"


def format_severities(severities: Iterable[int]) -> str:
    """Severities as ``--severities`` reads them, runs joined: ``(1, 2, 3, 4, 5)`` -> ``1-5``, ``(1, 3, 4, 5)`` ->
    ``1,3-5``."""
    runs: list[list[int]] = []
    for severity in sorted(set(severities)):
        if runs and severity == runs[-1][-1] + 1:
            runs[-1].append(severity)
        else:
            runs.append([severity])
    return ",".join(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]) for run in runs)
