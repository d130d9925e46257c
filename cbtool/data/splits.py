"""Split names: aliases (``val`` is ``validation``) and the default split for a purpose."""

from __future__ import annotations

from cbtool.errors import DatasetError

_CANONICAL = {"train": "train", "validation": "validation", "val": "validation", "valid": "validation", "test": "test"}
_DEFAULTS = {"eval": ("validation", "test"), "train": ("train",)}


def canonical_split(name: str) -> str | None:
    """``train``, ``validation`` or ``test`` for a split name or alias; None for anything else."""
    return _CANONICAL.get(name.lower())


def choose_split(available: list[str], requested: str | None, *, purpose: str, where: str) -> str:
    """The name in ``available`` to read: ``requested`` (or an alias of it), else the purpose's default.

    Evaluation defaults to validation, then test; training defaults to train.
    """
    if purpose not in _DEFAULTS:
        raise ValueError(f"purpose must be 'eval' or 'train', not {purpose!r}")
    listed = ", ".join(available) or "none"
    if requested is not None:
        if requested in available:
            return requested
        wanted = canonical_split(requested)
        for name in available:
            if wanted is not None and canonical_split(name) == wanted:
                return name
        raise DatasetError(f"{where} has no split '{requested}' (splits: {listed}); pick one of those with --split")
    for wanted in _DEFAULTS[purpose]:
        for name in available:
            if canonical_split(name) == wanted:
                return name
    defaults = " or ".join(_DEFAULTS[purpose])
    raise DatasetError(f"{where} has no {defaults} split (splits: {listed}); pick one with --split")
