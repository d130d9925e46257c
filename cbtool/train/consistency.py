"""Whether a run folder's three files (``checkpoint.pt``, ``checkpoint.json``, ``log.jsonl``) come from one run.

Runs record one id in all three. Folders written before the id existed are checked by what they share: the
step and the settings of the checkpoint and of its summary, and a log without ids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cbtool.errors import CbtoolError
from cbtool.train.config import CHECKPOINT_INFO_NAME


def check_same_run(saved: dict[str, Any], folder: Path, log: Path) -> None:
    """Refuse to resume from ``folder`` when its checkpoint, summary and log disagree about which run they are."""
    summary = _summary(folder)
    run_id = saved.get("run_id")
    config = json.loads(saved["config"])
    step = (saved.get("state") or {}).get("step")
    if summary.get("run_id") != run_id or (run_id is None and (summary.get("step") != step or summary.get("config") != config)):
        raise CbtoolError(f"{folder}: checkpoint.pt and {CHECKPOINT_INFO_NAME} come from different runs "
                          f"({_which(run_id, step)} vs {_which(summary.get('run_id'), summary.get('step'))}); "
                          "resume from a folder one run wrote")  # fmt: skip
    records = _records(log)
    # A log may hold other runs too (a shared --log, a folder reused with --force), but it must hold this one.
    if run_id is not None:
        mine = any(record.get("run") == run_id for record in records)
    else:  # a run from before run ids: its log has none either (its settings may have changed on each --resume)
        mine = not any(record.get("run") for record in records)
    if records and not mine:
        first = records[0]
        raise CbtoolError(f"{log} holds no record of the run in checkpoint.pt ({_which(run_id, step)}; the log starts "
                          f"with {_which(first.get('run'), first.get('step'))}); resume from a folder one run wrote")  # fmt: skip


def _summary(folder: Path) -> dict[str, Any]:
    try:
        summary = json.loads((folder / CHECKPOINT_INFO_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        raise CbtoolError(f"cannot read {folder / CHECKPOINT_INFO_NAME}; the run folder is incomplete") from None
    return summary if isinstance(summary, dict) else {}


def _records(log: Path) -> list[dict[str, Any]]:
    """The log's records (none when it is missing); a damaged line (a kill mid-write) is passed over."""
    try:
        lines = log.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _which(run_id: Any, step: Any) -> str:
    return f"run {run_id}, step {step}" if run_id else f"step {step}"


def refuse_finished(folder: Path, step: int, total: int | None, output: Path | None) -> None:
    """A finished run whose model exists has nothing to resume: say so instead of saving and logging it again."""
    if total is not None and step >= total and (output is None or output.exists()):
        model = f" and its model {output} exists" if output is not None else ""
        raise CbtoolError(f"the run in {folder} is already finished (step {step} of {total}){model}; nothing to resume")
