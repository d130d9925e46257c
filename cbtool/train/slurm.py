"""``cbtool finetune --slurm``: one fine-tune as one SLURM job through submitit, in DDP over the job's tasks (the code
path torchrun uses), requeued with a checkpoint when SLURM preempts it or its time runs out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cbtool.cluster import JOBS_FOLDER, SlurmOptions

_PATHS = ("output", "run_dir", "log", "save_best", "checkpoint", "resume")


class FinetuneJob:
    """``train_from_options`` in a submitit job; a requeued job resumes from the run folder's checkpoint."""

    def __init__(self, options: dict[str, Any]):
        self.options = options

    def __call__(self) -> str | None:
        from cbtool import distributed
        from cbtool.cluster import export_distributed, requeue_on_preemption
        from cbtool.train.config import CHECKPOINT_NAME
        from cbtool.train.options import train_from_options

        export_distributed()
        options = dict(self.options)
        if (Path(options["run_dir"]) / CHECKPOINT_NAME).is_file():
            options["resume"] = options["run_dir"]  # requeued, or resubmitted after a kill
        with requeue_on_preemption():
            try:
                result = train_from_options(options)
            finally:
                distributed.teardown()
        return str(result.output) if result is not None else None

    def checkpoint(self, *args: Any, **kwargs: Any):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(FinetuneJob(self.options))


def submit_finetune(options: dict[str, Any], slurm: SlurmOptions, *, cluster: str = "slurm"):
    """Check the request and the outputs, fix the run folder (``runs/<timestamp>`` unless ``--run-dir``), submit.
    Returns (job id, run folder, the job's log)."""
    from cbtool.cluster import check_cluster, check_submitit, executor
    from cbtool.train.prepare import check_run_outputs
    from cbtool.train.resume import find_checkpoint
    from cbtool.train.run import _new_run_dir

    check_submitit()
    if cluster == "slurm":
        check_cluster(slurm)
    o = {name: (str(Path(value).expanduser().resolve()) if name in _PATHS and value is not None else value)
         for name, value in options.items()}  # fmt: skip
    if o["dataset"] is not None and Path(o["dataset"]).expanduser().exists():
        o["dataset"] = str(Path(o["dataset"]).expanduser().resolve())  # the job may start in another folder
    check_run_outputs(o["output"], save_best=o["save_best"], log=o["log"], run_dir=o["run_dir"], resume=o["resume"],
                      inputs=[o["model"], o["checkpoint"]], dataset=o["dataset"], force=o["force"])  # fmt: skip
    if o["run_dir"] is None and o["resume"] is not None:
        o["run_dir"] = str(find_checkpoint(o["resume"]).parent)  # the resumed run goes on in its own folder
    elif o["run_dir"] is None:
        o["run_dir"] = str(_new_run_dir(Path("runs").resolve()))
    submitter = executor(Path(o["run_dir"]) / JOBS_FOLDER, slurm, f"cbtool-finetune-{Path(o['output']).stem}", cluster)
    job = submitter.submit(FinetuneJob(o))
    return str(job.job_id), o["run_dir"], str(job.paths.stderr).replace("%t", "0")
