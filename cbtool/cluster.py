"""SLURM through submitit: the job's resources (``SlurmOptions``, named as submitit and SLURM name them), every check
before a job is submitted (submitit installed, SLURM reachable, the partition, the time limit, SLURM's own
``sbatch --test-only``), the executor, and what runs inside a job: torchrun's environment from submitit's task
environment, and a preemption signal that saves a checkpoint and requeues the job (submitit's checkpointable
pattern). No torch; submitit is imported inside the functions (the ``slurm`` extra)."""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from cbtool.errors import CbtoolError

# The folder (in a sweep folder or a run folder) for submitit's scripts, pickles and logs.
JOBS_FOLDER = "slurm"

# squeue's states of a job that is still SLURM's to run: a second job for its run would train it twice.
ACTIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
                 "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD")  # fmt: skip
MAX_REQUEUES = 20
_TIME = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")
TIME_FORMATS = "minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"


@dataclass(frozen=True)
class SlurmOptions:
    """One job's resources. ``time`` in minutes (submitit's ``timeout_min``); ``tasks_per_node`` defaults to one
    task per GPU (one without GPUs); ``params``: further sbatch options (``--slurm-param KEY=VALUE``)."""

    partition: str | None = None
    time: int = 60
    nodes: int = 1
    gpus_per_node: int | None = None
    tasks_per_node: int | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    params: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("time", "nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < (0 if name == "gpus_per_node" else 1)):
                raise CbtoolError(f"--slurm-{name.replace('_', '-')} must be a positive whole number, not {value!r}")

    @property
    def tasks(self) -> int:
        """Processes per job: the DDP world size."""
        return self.nodes * (self.tasks_per_node or self.gpus_per_node or 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def executor_parameters(self) -> dict[str, Any]:
        """``update_parameters`` of submitit's AutoExecutor (``slurm_`` ones are ignored by its local executor)."""
        slurm = {"partition": self.partition, "mem": self.mem, "account": self.account, "qos": self.qos,
                 "constraint": self.constraint}  # fmt: skip
        generic = {"timeout_min": self.time, "nodes": self.nodes, "tasks_per_node": self.tasks_per_node or self.gpus_per_node or 1,
                   "gpus_per_node": self.gpus_per_node, "cpus_per_task": self.cpus_per_task}  # fmt: skip
        parameters = {k: v for k, v in generic.items() if v is not None}
        parameters |= {f"slurm_{k}": v for k, v in slurm.items() if v is not None}
        if self.params:
            parameters["slurm_additional_parameters"] = dict(self.params)
        return parameters

    def sbatch_flags(self) -> list[str]:
        """The same request as sbatch flags, for ``sbatch --test-only``."""
        flags = {"partition": self.partition, "time": self.time, "nodes": self.nodes,
                 "ntasks-per-node": self.tasks_per_node or self.gpus_per_node or 1, "gpus-per-node": self.gpus_per_node,
                 "cpus-per-task": self.cpus_per_task, "mem": self.mem, "account": self.account, "qos": self.qos,
                 "constraint": self.constraint, **{k.replace("_", "-"): v for k, v in self.params.items()}}  # fmt: skip
        return [f"--{key}={value}" for key, value in flags.items() if value is not None]


def parse_time(text: str | int) -> int:
    """A SLURM time limit (``90``, ``1:30:00``, ``2-00``) -> whole minutes, rounded up."""
    if isinstance(text, int):
        return text
    match = _TIME.fullmatch(text.strip())
    if not match:
        raise CbtoolError(f"--slurm-time {text!r} is not a SLURM time limit: give {TIME_FORMATS}")
    days, first, second, third = (int(g) if g is not None else None for g in match.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = days * 86400 + first * 3600 + (second or 0) * 60 + (third or 0)
    elif third is not None:  # HH:MM:SS
        seconds = first * 3600 + second * 60 + third
    elif second is not None:  # MM:SS
        seconds = first * 60 + second
    else:  # minutes
        seconds = first * 60
    if seconds <= 0:
        raise CbtoolError(f"--slurm-time {text!r} gives the job no time")
    return math.ceil(seconds / 60)


def parse_params(items: list[str] | None) -> dict[str, str]:
    """``--slurm-param KEY=VALUE`` (repeatable) -> sbatch options; ``KEY`` as sbatch spells it (``mail-type``)."""
    params = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise CbtoolError(f"--slurm-param {item!r} is not KEY=VALUE (e.g. --slurm-param mail-type=END)")
        params[key.strip().replace("-", "_")] = value.strip()
    return params


def check_submitit() -> None:
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise CbtoolError("--slurm submits through submitit, which is not installed: pip install 'cbtool[slurm]'") from None


def check_cluster(options: SlurmOptions) -> None:
    """Before anything is submitted: SLURM answers, the partition exists, the time fits its limit, and SLURM itself
    accepts the request (``sbatch --test-only``). One line each."""
    check_submitit()
    missing = [name for name in ("sbatch", "sinfo", "squeue") if shutil.which(name) is None]
    if missing:
        raise CbtoolError(f"--slurm needs SLURM's commands ({', '.join(missing)} not found on PATH); run it on a "
                          "SLURM login node")  # fmt: skip
    listing = _slurm_command(["sinfo", "-h", "-o", "%P|%l"])
    limits = {}
    for line in listing.splitlines():
        name, _, limit = line.partition("|")
        limits[name.rstrip("*")] = limit
        if name.endswith("*") and options.partition is None:
            limits[None] = limit
    if options.partition is not None and options.partition not in limits:
        raise CbtoolError(f"unknown SLURM partition {options.partition!r}: this cluster has "
                          f"{', '.join(sorted(k for k in limits if k)) or 'none'}")  # fmt: skip
    limit = limits.get(options.partition)
    if limit and _TIME.fullmatch(limit) and options.time > parse_time(limit):  # not "infinite"
        where = f"partition {options.partition!r}" if options.partition else "the default partition"
        raise CbtoolError(f"--slurm-time {options.time} min is over the {limit} limit of {where}; ask for less time "
                          "(runs resume when requeued)")  # fmt: skip
    _slurm_command(["sbatch", "--test-only", *options.sbatch_flags(), "--wrap", "true"], refusal=True)


def _slurm_command(command: list[str], *, refusal: bool = False) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise CbtoolError(f"SLURM does not answer ({command[0]}: {error})") from None
    if result.returncode:
        lines = [line.strip() for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit {result.returncode}"
        reason = re.sub(r"^(sbatch|sinfo|squeue): (error: )?", "", reason)
        if refusal:
            raise CbtoolError(f"SLURM refuses the job: {reason}")
        raise CbtoolError(f"SLURM is not reachable ({command[0]}: {reason})")
    return result.stdout


def executor(folder: str | Path, options: SlurmOptions, name: str, cluster: str | None = "slurm"):
    """submitit's executor writing its scripts, pickles and logs to ``folder``; ``cluster="local"``: submitit's
    local executor (the same submission code, processes on this machine)."""
    import submitit

    # submitit counts a signal within 10 min of a short limit as a time-out and stops requeueing after
    # max_num_timeout of them (3 by default); a long run under short limits needs more, and resumes each time.
    made = submitit.AutoExecutor(folder=folder, cluster=cluster, slurm_max_num_timeout=MAX_REQUEUES)
    made.update_parameters(name=name, **options.executor_parameters())
    return made


def export_distributed() -> None:
    """Inside a submitit job: torchrun's variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) from
    submitit's task environment, so that ``cbtool.distributed`` joins DDP the way it does under torchrun."""
    import submitit

    environment = submitit.JobEnvironment()
    if environment.num_tasks > 1:
        # The GPUs stay visible: pick_device takes cuda:LOCAL_RANK, as under torchrun.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


@contextmanager
def requeue_on_preemption() -> Iterator[None]:
    """SLURM's preemption / time-limit signal (submitit's USR2) stops training the way Ctrl-C does: at the next
    step, with a checkpoint saved. Then submitit's own handler requeues the job (``Checkpointable.checkpoint``:
    the same call, which resumes from the run folder) and exits. Without the signal, the body runs as is."""
    import submitit

    preempt = submitit.JobEnvironment._usr_sig()
    requeue = signal.getsignal(preempt)  # submitit's SignalHandler.checkpoint_and_try_requeue
    preempted = []

    def stop_at_next_step(signum, frame):
        if not preempted:  # once: a second Ctrl-C would cut the checkpoint short
            os.kill(os.getpid(), signal.SIGINT)  # the training loop's deferred Ctrl-C: save at the step boundary
        preempted.append(signum)

    signal.signal(preempt, stop_at_next_step)
    try:
        yield
    except (KeyboardInterrupt, Exception):  # the training's Interrupted, or Ctrl-C outside training (evaluation)
        if not preempted or not callable(requeue):
            raise
        if submitit.JobEnvironment().global_rank != 0:
            raise SystemExit(0) from None  # rank 0 requeues the whole job; this task has nothing to return
        requeue(preempted[0], None)  # raises SystemExit after `scontrol requeue`
    finally:
        if requeue is not None:  # None: a handler not set from Python, which signal.signal cannot put back
            signal.signal(preempt, requeue)


def job_states(job_ids: list[str], cluster: str | None = "slurm") -> dict[str, str]:
    """The jobs among ``job_ids`` that are still queued or running, with their state (``PENDING``, ``RUNNING``...).

    SLURM: squeue (submitit's own watcher asks sacct, which needs SLURM's accounting database). Local: the job
    id is the process id."""
    if not job_ids:
        return {}
    if cluster == "local":
        return {job: "RUNNING" for job in job_ids if _alive(job)}
    # All of this user's jobs, one line per array task: asking for ids SLURM has forgotten would be an error.
    output = _slurm_command(["squeue", "-h", "-r", "--me", "-o", "%i|%T"])
    wanted, states = set(job_ids), {}
    for line in output.splitlines():
        job, _, state = line.strip().partition("|")
        if job in wanted and state in ACTIVE_STATES:
            states[job] = state
    return states


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError):
        return False
    try:  # a finished child that nobody reaped yet is not running
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def job_ended(folder: str | Path, job_id: str) -> tuple[bool, str]:
    """How a job that left the queue ended, from submitit's files: whether it returned (submitit wrote its result;
    not when killed by scancel or a node failure), and the last lines of its log."""
    from submitit.core.utils import JobPaths

    paths = JobPaths(folder, job_id=job_id, task_id=0)
    return paths.result_pickle.exists(), log_tail(paths.stderr)


_PROGRESS_BAR = re.compile(r"[^|\r\n]*\d+%\|[^|]*\|[^\]]*\]")  # tqdm: "finetune:  27%|██▋  | 398/1500 [...]"


def log_tail(path: Path, lines: int = 3) -> str:
    """The last ``lines`` lines of a job's log, progress bars left out."""
    try:
        text = _PROGRESS_BAR.sub("\n", path.read_text(errors="replace"))
    except OSError:
        return ""
    kept = [line.strip() for line in text.splitlines() if line.strip()]
    return " | ".join(kept[-lines:])
