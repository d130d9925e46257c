"""The grid of a sweep: its cells (variant x position x layers; ``plain`` once), its runs (cell x seed), their
names and folders, what state each run's folder is in, and ``sweep.json``, the record that says which sweep a
folder holds. No torch at import (``run_state`` reads the checkpoint's name from ``cbtool.train``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from cbtool.errors import CbtoolError, OutputError
from cbtool.ranges import check_seed

PLAIN = "plain"
SWEEP_FILE = "sweep.json"
LOCK_FILE = ".lock"  # held while a sweep runs in the folder
SUMMARY_FILE = "summary.json"
RUNS_FOLDER = "runs"
MODEL_FILE = "model.safetensors"
EVAL_FILE = "eval.json"
CORRUPTIONS_FILE = "eval-corruptions.json"
FORMAT = "cbtool-sweep-1"


@dataclass(frozen=True)
class Cell:
    """One arm of the sweep: ``plain`` (no CB), or a CB variant at a position and layers."""

    variant: str
    position: str | None = None
    layers: str | None = None

    @property
    def name(self) -> str:
        if self.variant == PLAIN:
            return PLAIN
        layers = "" if self.layers == "all" else "-L" + self.layers.replace(",", "+")
        return f"{self.variant}-{self.position}{layers}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "variant": self.variant, "position": self.position, "layers": self.layers}


@dataclass(frozen=True)
class RunSpec:
    """One training run: a cell and a seed. Its folder is ``<sweep>/runs/<name>``."""

    cell: Cell
    seed: int

    @property
    def name(self) -> str:
        return f"{self.cell.name}-seed{self.seed}"

    def folder(self, root: str | Path) -> Path:
        return Path(root) / RUNS_FOLDER / self.name


@dataclass
class SweepPlan:
    """What a sweep runs: the cells, the seeds, the finetune options every run shares (``options``: finetune's
    parameter names, model options included), the evaluation, and whether the runs train (``finetune``).

    ``runtime`` holds the options that may differ when the sweep is started again (device, workers, ...).
    """

    cells: list[Cell]
    seeds: list[int]
    options: dict[str, Any]
    evaluation: dict[str, Any]
    finetune: bool = True
    runtime: dict[str, Any] = field(default_factory=dict)
    processes: int = 1  # per run (--torchrun N): it sets the global batch, so it is part of the recipe

    @property
    def runs(self) -> list[RunSpec]:
        """Seed-major order: every cell of seed 0 first, so that an early stop leaves complete pairs."""
        return [RunSpec(cell, seed) for seed in self.seeds for cell in self.cells]

    def run(self, name: str) -> RunSpec:
        for run in self.runs:
            if run.name == name:
                return run
        raise CbtoolError(f"this sweep has no run {name!r} (runs: {', '.join(r.name for r in self.runs)})")

    def runtime_finetune_options(self) -> dict[str, Any]:
        """The runtime settings each run gets (finetune's ``device``, ``workers``, ``quiet``)."""
        return {name: self.runtime.get(name) for name in ("device", "workers")} | {"quiet": bool(self.runtime.get("quiet"))}

    def identity(self) -> dict[str, Any]:
        """What makes two sweeps the same: everything but ``runtime``."""
        return {"format": FORMAT, "cells": [cell.to_dict() for cell in self.cells], "seeds": list(self.seeds),
                "options": self.options, "evaluation": self.evaluation, "finetune": self.finetune,
                "processes": self.processes, "runs": [run.name for run in self.runs]}  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        from cbtool.results import SCHEMA_VERSION

        return {"schema_version": SCHEMA_VERSION, **self.identity(), "runtime": self.runtime}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = SWEEP_FILE) -> "SweepPlan":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CbtoolError(f"{where} is not a cbtool sweep record ({FORMAT})")
        try:
            cells = [Cell(c["variant"], c.get("position"), c.get("layers")) for c in data["cells"]]
            return cls(cells, [int(s) for s in data["seeds"]], dict(data["options"]), dict(data["evaluation"]),
                       bool(data.get("finetune", True)), dict(data.get("runtime") or {}),
                       int(data.get("processes", 1)))  # fmt: skip
        except (KeyError, TypeError, ValueError) as error:
            raise CbtoolError(f"{where} is incomplete ({error}); it was not written by this cbtool") from None


def parse_variants(text: str) -> list[str]:
    """``plain,cb,cbs`` -> the variants, checked: known, none twice, at least one."""
    from cbtool.spec import VARIANTS

    choices = (PLAIN, *VARIANTS)
    names = _comma_list(text, "--variants")
    for name in names:
        if name not in choices:
            raise CbtoolError(f"unknown variant {name!r} in --variants: choose from {', '.join(choices)}")
    return names


def parse_positions(text: str) -> list[str]:
    from cbtool.spec import POSITIONS

    names = _comma_list(text, "--positions")
    for name in names:
        if name not in POSITIONS:
            raise CbtoolError(f"unknown position {name!r} in --positions: choose from {', '.join(POSITIONS)}")
    return names


def parse_layers(values: Sequence[str] | None) -> list[str]:
    """``--layers all,0-5,6-11`` (or repeated): one layer spec per comma; ``+`` joins terms inside one spec
    (``0+2+5-7`` is the spec ``0,2,5-7``). Returns the specs in CBSpec's normal form."""
    from cbtool.spec import CBSpec

    specs = []
    for value in values or ["all"]:
        for term in _comma_list(value, "--layers"):
            specs.append(CBSpec(layers=term.replace("+", ",")).layers)
    if len(set(specs)) != len(specs):
        raise CbtoolError(f"--layers names a layer set twice: {', '.join(specs)}")
    return specs


def parse_seeds(text: str) -> list[int]:
    seeds = []
    for item in _comma_list(text, "--seeds"):
        try:
            seeds.append(int(item))
        except ValueError:
            raise CbtoolError(f"--seeds takes whole numbers like 0,1,2, not {item!r}") from None
        check_seed("--seeds", seeds[-1])
    if len(set(seeds)) != len(seeds):
        raise CbtoolError(f"--seeds repeats a seed ({text}); each seed runs once per variant")
    return seeds


def grid(variants: Sequence[str], positions: Sequence[str], layers: Sequence[str]) -> list[Cell]:
    """``plain`` once (position and layers mean nothing to it), each CB variant at every position and layer set."""
    cells = []
    for variant in variants:
        if variant == PLAIN:
            cells.append(Cell(PLAIN))
        else:
            cells.extend(Cell(variant, position, layer_spec) for position in positions for layer_spec in layers)
    return cells


def _comma_list(text: str, flag: str) -> list[str]:
    items = [item.strip() for item in (text or "").split(",")]
    if not text or not all(items):
        raise CbtoolError(f"{flag} {text!r} has an empty item; give a comma list like {_EXAMPLES[flag]}")
    if len(set(items)) != len(items):
        raise CbtoolError(f"{flag} {text!r} names an item twice")
    return items


_EXAMPLES = {"--variants": "plain,cb,cbs", "--positions": "mlp,attn", "--layers": "all,0-5", "--seeds": "0,1,2"}


def read_plan(folder: str | Path) -> SweepPlan:
    """The sweep recorded in ``folder/sweep.json``; a one-line error when there is none."""
    path = Path(folder) / SWEEP_FILE
    if not path.is_file():
        raise CbtoolError(f"{folder} holds no sweep ({SWEEP_FILE} is missing); give the -o folder of a cbtool sweep")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CbtoolError(f"cannot read {path}: {error}") from None
    return SweepPlan.from_dict(data, str(path))


def claim_folder(folder: str | Path, plan: SweepPlan) -> bool:
    """Record ``plan`` in ``folder`` (created if needed); True when the folder already held this sweep.

    A folder holding another sweep, or other files and no sweep, is refused before anything is written. A sweep
    claims its folder under the folder's lock (``start.claimed_folder``), so that a second start cannot replace it.
    """
    from cbtool.files import write_json_atomic

    resumed = check_claim(folder, plan)
    (Path(folder) / RUNS_FOLDER).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(folder) / SWEEP_FILE, plan.to_dict())
    return resumed


def check_claim(folder: str | Path, plan: SweepPlan) -> bool:
    """``claim_folder``'s checks, writing nothing: True when ``folder`` holds this sweep; refused when it holds
    another sweep whose runs produced something, or other files (its lock file aside), or cannot be written."""
    from cbtool.files import check_writable_folder

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"-o {folder} is a file; give a folder for the sweep")
    existing = folder / SWEEP_FILE
    resumed = existing.is_file()
    if resumed:
        recorded = read_plan(folder)
        difference = first_difference(recorded.identity(), plan.identity())
        # a sweep whose runs produced nothing yet (it failed at once) may be started again with other settings
        if difference and any(run_state(recorded, run, folder) != "start" for run in recorded.runs):
            raise OutputError(f"{folder} holds a different sweep ({difference}); pick another -o folder, or "
                              "run the same command to continue it")  # fmt: skip
    elif folder.is_dir() and any(path.name != LOCK_FILE for path in folder.iterdir()):
        raise OutputError(f"{folder} is not empty and holds no sweep; pick a new or empty -o folder")
    check_writable_folder(folder, "sweep folder", "pick another -o folder")
    return resumed


def run_state(plan: SweepPlan, run: RunSpec, root: str | Path) -> str:
    """``done``, ``evaluate`` (the model exists), ``resume`` (a checkpoint exists) or ``start``."""
    from cbtool.train import CHECKPOINT_NAME

    folder = run.folder(root)
    if all((folder / name).is_file() for name in eval_files(plan)):
        return "done"
    if (folder / MODEL_FILE).is_file():
        return "evaluate"
    if plan.finetune and (folder / CHECKPOINT_NAME).is_file():
        return "resume"
    return "start"


def eval_files(plan: SweepPlan) -> list[str]:
    """The evaluation files a finished run holds (``eval.json`` last: it marks the run finished)."""
    return [EVAL_FILE, CORRUPTIONS_FILE] if plan.evaluation.get("corruptions") else [EVAL_FILE]


def first_difference(before: Any, now: Any, path: str = "") -> str | None:
    """Where two sweep records differ first, in words (``None`` when they are the same)."""
    if isinstance(before, dict) and isinstance(now, dict):
        for key in sorted(set(before) | set(now)):
            found = first_difference(before.get(key), now.get(key), f"{path}.{key}" if path else key)
            if found:
                return found
        return None
    if before != now:
        name = path.rsplit(".", 1)[-1]
        shown = "--" + name.replace("_", "-") if path.startswith(("options.", "evaluation.")) else path
        return f"{shown} {json.dumps(before)} there, {json.dumps(now)} here"
    return None
