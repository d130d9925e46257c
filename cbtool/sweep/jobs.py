"""``slurm/jobs.json`` in a sweep folder: which SLURM job was submitted for which run, and which of them are still
queued or running (squeue). Read by ``--slurm``, ``--status`` and a local sweep (which refuses to train runs whose
jobs are queued or running). No torch, no submitit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cbtool.cluster import JOBS_FOLDER  # noqa: F401  (also this module's: the sweep folder's slurm/ holds JOBS_FILE)
from cbtool.errors import CbtoolError

JOBS_FILE = "jobs.json"


def refuse_if_jobs_run(root: str | Path) -> None:
    """A local sweep in a folder whose SLURM jobs are queued or running would train their runs twice: refused.
    Where SLURM's commands are missing (the folder was copied off the cluster), its jobs cannot run here."""
    import shutil

    records = read_jobs(root)
    if not records or (shutil.which("squeue") is None and any(r.get("cluster") != "local" for r in records)):
        return
    active = active_jobs(records)
    if active:
        run, (job, state) = next(iter(active.items()))
        raise CbtoolError(f"{root} has {len(active)} SLURM job(s) queued or running (run {run}: job {job} is "
                          f"{state.lower()}); wait for them (cbtool sweep --status {root}), or scancel them first")  # fmt: skip


def read_jobs(root: str | Path) -> list[dict[str, Any]]:
    path = Path(root) / JOBS_FOLDER / JOBS_FILE
    if not path.is_file():
        return []
    try:
        return list(json.loads(path.read_text(encoding="utf-8"))["jobs"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CbtoolError(f"cannot read {path} ({error}); it was not written by this cbtool") from None


def write_jobs(root: Path, records: list[dict[str, Any]]) -> None:
    from cbtool.files import write_json_atomic

    write_json_atomic(root / JOBS_FOLDER / JOBS_FILE, {"jobs": records})


def latest_jobs(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each run's last submitted job."""
    return {record["run"]: record for record in records}


def active_jobs(records: list[dict[str, Any]]) -> dict[str, tuple[str, str]]:
    """run -> (job, SLURM state) for the runs whose last job is still queued or running."""
    from cbtool.cluster import job_states

    latest = latest_jobs(records)
    by_cluster: dict[str, list[str]] = {}
    for record in latest.values():
        by_cluster.setdefault(record.get("cluster", "slurm"), []).append(record["job"])
    states = {}
    for cluster, jobs in by_cluster.items():
        states |= job_states(jobs, cluster)
    return {run: (record["job"], states[record["job"]]) for run, record in latest.items() if record["job"] in states}
