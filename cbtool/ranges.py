"""Valid ranges of numeric options: one check, one wording, for the CLI and the library alike."""

from __future__ import annotations

import math

from cbtool.errors import CbtoolError


def check_range(flag: str, value: float | int | None, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False) -> None:
    """Raise ``CbtoolError`` unless ``value`` (None passes) is a finite number in the range; the message names ``flag``."""
    if value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise CbtoolError(f"{flag} must be {_describe(low, high, low_open, high_open)}, not {value}")


def _describe(low, high, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{_shown(low)}, {_shown(high)}{')' if high_open else ']'}"
    if low is not None:
        return ("more than " if low_open else "at least ") + _shown(low)
    if high is not None:
        return ("less than " if high_open else "at most ") + _shown(high)
    return "a finite number"


def _shown(bound: float | int) -> str:
    return str(bound) if isinstance(bound, int) else f"{bound:g}"  # 4294967295, not 4.29497e+09


# Seeds as numpy (np.random.seed) and torch (manual_seed on every device) both take them.
SEED_MAX = 2**32 - 1
SEED_RANGE = (0, SEED_MAX)
_BIG = 2**31 - 1  # counts that end up in a C int somewhere (DataLoader, torch sizes, range lengths)
# Every integer option of the commands, by parameter name: (least, most). The lower bounds repeat Typer's
# ``min=`` (whose usage error comes first, for the CLI); the upper bounds keep a number inside what the
# libraries take, so that it is refused in one line here rather than overflowing in C. Memory that a legal
# batch size cannot get is a separate one-line error (cbtool.memory).
INT_OPTIONS: dict[str, tuple[int, int]] = {
    "seed": (0, SEED_MAX),
    "batch_size": (1, _BIG),
    "limit": (1, 2**63 - 1), "val_limit": (1, 2**63 - 1), "eval_limit": (1, 2**63 - 1),
    "workers": (0, 1024),
    "img_size": (1, 16384),  # pixels: a ViT's position embedding at 16384 px already takes gigabytes
    "num_classes": (1, 10_000_000),
    "epochs": (1, 1_000_000), "steps": (1, _BIG), "grad_accum": (1, 65536), "cb_ramp": (1, _BIG),
    "warmup_steps": (0, _BIG), "save_every": (1, _BIG), "eval_every": (1, _BIG), "log_every": (1, _BIG),
    "torchrun": (1, 1024),
    "repeats": (1, 1_000_000), "warmup": (0, 1_000_000), "number": (1, 1_000_000), "threads": (1, 4096),
    "panel": (32, 4096),  # pixels per picture: a grid of many such pictures is one image
    # SLURM's own limits are checked by sbatch --test-only; these only keep the numbers in a C int
    "slurm_nodes": (1, 100_000), "slurm_gpus_per_node": (0, 1024), "slurm_tasks_per_node": (1, 4096),
    "slurm_cpus_per_task": (1, 4096),
}  # fmt: skip


def check_int_options(values: dict[str, object]) -> None:
    """Every integer in ``values`` (parameter name -> value, as a command receives them) named in ``INT_OPTIONS``
    lies in its range; the message names the option as typed (``--batch-size``)."""
    for name, value in values.items():
        if name in INT_OPTIONS and isinstance(value, int) and not isinstance(value, bool):
            check_range(f"--{name.replace('_', '-')}", value, *INT_OPTIONS[name])


def check_seed(flag: str, seed: int) -> None:
    """A seed numpy and torch both take: a whole number in [0, 2**32 - 1]."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise CbtoolError(f"{flag} must be a whole number, not {seed!r}")
    check_range(flag, seed, 0, SEED_MAX)
