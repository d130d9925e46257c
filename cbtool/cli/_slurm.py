"""The ``--slurm`` options of ``cbtool finetune`` and ``cbtool sweep``, named as submitit and SLURM name them, and
the ``SlurmOptions`` they make."""

from __future__ import annotations

from typing import Any, Optional

import typer

SLURM_OPTIONS = {
    "slurm": (bool, False, typer.Option("--slurm", help="Submit to SLURM through submitit instead of running here: one job (a job array for a sweep); see 'On a cluster' in the README.")),
    "slurm_partition": (Optional[str], None, typer.Option("--slurm-partition", help="SLURM partition (default: the cluster's default).")),
    "slurm_time": (str, "60", typer.Option("--slurm-time", help="Time limit per job: minutes, HH:MM:SS or D-HH:MM; a job stopped by it checkpoints and requeues.")),
    "slurm_nodes": (int, 1, typer.Option("--slurm-nodes", min=1, help="Nodes per job.")),
    "slurm_gpus_per_node": (Optional[int], None, typer.Option("--slurm-gpus-per-node", min=0, help="GPUs per node; one DDP process per GPU.")),
    "slurm_tasks_per_node": (Optional[int], None, typer.Option("--slurm-tasks-per-node", min=1, help="DDP processes per node (default: one per GPU, one without GPUs).")),
    "slurm_cpus_per_task": (Optional[int], None, typer.Option("--slurm-cpus-per-task", min=1, help="CPUs per process (data loading).")),
    "slurm_mem": (Optional[str], None, typer.Option("--slurm-mem", help="Memory per node, as sbatch --mem takes it (e.g. 64G).")),
    "slurm_account": (Optional[str], None, typer.Option("--slurm-account", help="SLURM account to charge.")),
    "slurm_qos": (Optional[str], None, typer.Option("--slurm-qos", help="SLURM quality of service.")),
    "slurm_constraint": (Optional[str], None, typer.Option("--slurm-constraint", help="SLURM node constraint (features), e.g. volta32gb.")),
    "slurm_param": (Optional[list[str]], None, typer.Option("--slurm-param", help="Any other sbatch option as KEY=VALUE (repeatable), e.g. mail-type=END.")),
}  # fmt: skip


def pop_slurm_options(options: dict[str, Any], typed: set[str], flag: Any) -> Any:
    """Take the SLURM options out of ``options``: their ``SlurmOptions`` with ``--slurm``, else None (and a SLURM
    option typed without ``--slurm`` is refused: it would do nothing). ``flag(name)``: how the user typed it."""
    from cbtool.cluster import SlurmOptions, parse_params, parse_time
    from cbtool.errors import CbtoolError

    values = {name: options.pop(name) for name in SLURM_OPTIONS}
    if not values["slurm"]:
        stray = sorted(name for name in typed if name in SLURM_OPTIONS)
        if stray:
            raise CbtoolError(f"{flag(stray[0])} is for jobs submitted with --slurm; add --slurm or drop it")
        return None
    return SlurmOptions(
        partition=values["slurm_partition"], time=parse_time(values["slurm_time"]), nodes=values["slurm_nodes"],
        gpus_per_node=values["slurm_gpus_per_node"], tasks_per_node=values["slurm_tasks_per_node"],
        cpus_per_task=values["slurm_cpus_per_task"], mem=values["slurm_mem"], account=values["slurm_account"],
        qos=values["slurm_qos"], constraint=values["slurm_constraint"], params=parse_params(values["slurm_param"]),
    )  # fmt: skip
