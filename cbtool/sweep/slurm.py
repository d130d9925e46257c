"""``cbtool sweep --slurm``: each unfinished run of the grid becomes one job of a SLURM job array (submitit), in the
same run folders as a local sweep. ``slurm/`` in the sweep folder holds submitit's scripts and logs and
``jobs.json``, the record of which job brings which run to finished; ``--status`` reads it with the folders and
squeue. Starting the same sweep again submits only the runs that are neither finished nor queued or running; the
summary is written by the job that finishes the last run (or by ``--summarize``)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from cbtool.cluster import SlurmOptions
from cbtool.sweep.jobs import JOBS_FOLDER, active_jobs, latest_jobs, write_jobs, read_jobs
from cbtool.sweep.plan import SweepPlan, read_plan, run_state



class SweepRun:
    """One run of the sweep in ``root`` as a submitit job (pickled): finetune and evaluate it as ``--only`` does,
    in DDP over the job's tasks; the preemption signal checkpoints and requeues it (``checkpoint`` makes it
    checkpointable for submitit); the job that finishes the sweep's last run writes the summary."""

    def __init__(self, root: str, name: str):
        self.root, self.name = root, name

    def __call__(self) -> str:
        from cbtool import distributed
        from cbtool.cluster import export_distributed, requeue_on_preemption
        from cbtool.sweep.start import run_child, write_summary

        export_distributed()
        with requeue_on_preemption():
            run_child(self.root, self.name)
        plan = read_plan(self.root)
        if distributed.is_main_process() and all(run_state(plan, run, self.root) == "done" for run in plan.runs):
            write_summary(self.root, plan)
            return f"{self.name} finished; wrote the summary"
        return f"{self.name} finished"

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Requeue the same call: it resumes from the run folder's checkpoint."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(SweepRun(self.root, self.name))


def submit_sweep(plan: SweepPlan, root: str | Path, options: SlurmOptions, *, cluster: str = "slurm",
                 note: Callable[[str], None] = lambda text: None) -> list[dict[str, str]]:
    """Check everything (submitit, SLURM and the request, the plan), claim ``root``, and submit one job per run
    that is neither finished nor queued or running, as one job array. Returns the new records (run, job)."""
    from cbtool.cluster import check_cluster, check_submitit, executor
    from cbtool.sweep.start import check_plan, claimed_folder, write_summary

    if options.tasks != plan.processes:
        raise ValueError(f"the plan was made for {plan.processes} process(es) per run, not {options.tasks}")
    check_submitit()
    if cluster == "slurm":
        check_cluster(options)
    check_plan(plan)
    root = Path(root).resolve()
    plan.runtime["slurm"] = options.to_dict()
    with claimed_folder(root, plan):
        records = read_jobs(root)
        active = active_jobs(records)
        todo = []
        for number, run in enumerate(plan.runs, 1):
            head = f"run {number}/{len(plan.runs)} {run.name}"
            state = run_state(plan, run, root)
            if state == "done":
                note(f"{head}: finished earlier, kept")
            elif run.name in active:
                job, status = active[run.name]
                note(f"{head}: job {job} is {status.lower()}, not submitted again")
            else:
                todo.append((head, run, state))
        if not todo:
            if all(run_state(plan, run, root) == "done" for run in plan.runs):
                write_summary(root, plan)
            return []
        submitter = executor(root / JOBS_FOLDER, options, f"cbtool-sweep-{root.name}", cluster)
        with submitter.batch():
            jobs = [submitter.submit(SweepRun(str(root), run.name)) for _, run, _ in todo]
        new = [{"run": run.name, "job": str(job.job_id), "cluster": cluster, "submitted": round(time.time(), 3)}
               for (_, run, _), job in zip(todo, jobs)]  # fmt: skip
        write_jobs(root, records + new)
        for (head, _, state), record in zip(todo, new):
            what = {"start": "to train", "resume": "to resume from its checkpoint", "evaluate": "to evaluate"}[state]
            note(f"{head}: submitted as job {record['job']} ({what})")
    return new


def sweep_status(root: str | Path) -> list[dict[str, Any]]:
    """Each run's state: ``finished``, ``pending``/``running`` (its job, from squeue), ``failed`` (its job left the
    queue and the run is unfinished: the log's last lines say why), or ``not submitted``; with the last step its
    log reached and its job."""
    plan = read_plan(root)
    records = read_jobs(root)
    latest, active = latest_jobs(records), active_jobs(records)
    rows = []
    for run in plan.runs:
        record = latest.get(run.name)
        row = {"run": run.name, "job": record["job"] if record else None, "step": _last_step(run.folder(root)),
               "detail": ""}  # fmt: skip
        if run_state(plan, run, root) == "done":
            row["state"] = "finished"
        elif run.name in active:
            row["state"] = active[run.name][1].lower()
        elif record is None:
            row["state"] = "not submitted"
        else:
            from cbtool.cluster import job_ended

            returned, tail = job_ended(Path(root) / JOBS_FOLDER, record["job"])
            saved = _checkpoint_step(run.folder(root))
            row["state"] = "failed"
            row["detail"] = "; ".join(filter(None, [
                None if returned else "killed (no result from the job)",
                None if saved is None else f"resumes from its checkpoint at step {saved} when submitted again",
                tail or "no log"]))  # fmt: skip
        rows.append(row)
    return rows


def _checkpoint_step(folder: Path) -> int | None:
    from cbtool.train.config import CHECKPOINT_INFO_NAME

    try:
        return int(json.loads((folder / CHECKPOINT_INFO_NAME).read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _last_step(folder: Path) -> int | None:
    """The last training step the run's log.jsonl records."""
    try:
        lines = (folder / "log.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            step = json.loads(line).get("step")
        except ValueError:
            continue
        if step is not None:
            return int(step)
    return None


def status_text(rows: list[dict[str, Any]]) -> str:
    """The status as a table: run, state, job, step, and why a failed run failed."""
    width = max(len(row["run"]) for row in rows)
    lines = [f"{'run':<{width}}  {'state':<13}  {'job':<12}  {'step':>6}  detail"]
    for row in rows:
        step = "" if row["step"] is None else str(row["step"])
        lines.append(f"{row['run']:<{width}}  {row['state']:<13}  {row['job'] or '-':<12}  {step:>6}  {row['detail']}".rstrip())
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    lines.append(", ".join(f"{n} {state}" for state, n in counts.items()))
    return "\n".join(lines)
