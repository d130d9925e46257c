"""A real one-node SLURM cluster for the tests: munged, slurmctld and slurmd started as root in a temporary state
folder, with ``SLURM_CONF`` pointing at its slurm.conf. ``start`` returns the cluster, or raises ``Unavailable``
with the reason (not root, a program missing, a daemon that does not come up); ``stop`` ends the daemons it
started, by their ids.

Run it by hand to get a cluster for an interactive session: ``python tests/slurm_cluster.py /tmp/slurm``
(prints the ``export SLURM_CONF=...`` line; Ctrl-C stops it).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PROGRAMS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol", "scancel")
PARTITION = "debug"


class Unavailable(Exception):
    """SLURM cannot be started here; the message says why (the tests skip with it)."""


@dataclass
class Cluster:
    root: Path
    conf: Path
    env: dict[str, str]  # SLURM_CONF and the rest, for subprocesses and os.environ
    partition: str = PARTITION
    processes: list[subprocess.Popen] = field(default_factory=list)
    pid_files: list[Path] = field(default_factory=list)

    def run(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """A SLURM client command against this cluster."""
        return subprocess.run(list(args), env={**os.environ, **self.env}, capture_output=True, text=True,
                              check=check, timeout=timeout)  # fmt: skip


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024 * 9 // 10  # slurmd refuses a node that declares more than it has
    return 1024


def start(root: str | Path, *, cpus: int | None = None, timeout: float = 30) -> Cluster:
    """Start munged, slurmctld and slurmd with their state, logs, pid files and sockets under ``root``."""
    found = {name: shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin") for name in PROGRAMS}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise Unavailable(f"SLURM is not installed ({', '.join(missing)} missing; apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        raise Unavailable("starting slurmd needs root (the test cluster runs as SlurmUser=root)")
    root = Path(root)
    for sub in ("munge", "state", "spool", "log", "run"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "munge", 0o700)
    host = socket.gethostname().split(".")[0]
    cpus = cpus or os.cpu_count() or 1
    key, sock = root / "munge" / "munge.key", root / "munge" / "munge.socket"
    conf = root / "slurm.conf"
    conf.write_text(f"""\
ClusterName=cbtooltest
SlurmctldHost={host}
SlurmUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock},cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / 'spool'}
SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}
SlurmdPidFile={root / 'run' / 'slurmd.pid'}
SlurmctldLogFile={root / 'log' / 'slurmctld.log'}
SlurmdLogFile={root / 'log' / 'slurmd.log'}
SlurmctldDebug=info
SlurmdDebug=info
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
KillWait=5
MinJobAge=600
InactiveLimit=0
NodeName={host} CPUs={cpus} RealMemory={_memory_mb()} State=UNKNOWN
PartitionName={PARTITION} Nodes={host} Default=YES MaxTime=60 State=UP
""")
    env = {"SLURM_CONF": str(conf)}
    cluster = Cluster(root, conf, env)
    try:
        _run([found["mungekey"], "--create", "--force", f"--keyfile={key}"])
        os.chmod(key, 0o600)
        _run([found["munged"], f"--socket={sock}", f"--key-file={key}", f"--pid-file={root / 'run' / 'munged.pid'}",
              f"--log-file={root / 'log' / 'munged.log'}", f"--seed-file={root / 'munge' / 'seed'}", "--force"])
        cluster.pid_files.append(root / "run" / "munged.pid")
        _wait(lambda: sock.exists(), timeout, "munged did not create its socket", root / "log" / "munged.log")
        for daemon, flags in (("slurmctld", ["-i"]), ("slurmd", [])):
            # -D: stay in the foreground, so that this process owns them (and can end them by their ids)
            log = open(root / "log" / f"{daemon}.out", "ab")
            cluster.processes.append(subprocess.Popen([found[daemon], "-D", *flags], env={**os.environ, **env},
                                                      stdout=log, stderr=subprocess.STDOUT,
                                                      start_new_session=True))  # fmt: skip
        _wait(lambda: _idle(cluster), timeout, "the node did not become idle", root / "log" / "slurmd.log")
    except BaseException:
        stop(cluster)
        raise
    return cluster


def _idle(cluster: Cluster) -> bool:
    for process in cluster.processes:
        if process.poll() is not None:
            raise Unavailable(f"{process.args[0]} exited with code {process.returncode}; see {cluster.root / 'log'}")
    result = cluster.run("sinfo", "-h", "-o", "%T", check=False, timeout=10)
    return result.returncode == 0 and result.stdout.strip() == "idle"


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise Unavailable(f"{command[0]} failed: {(result.stderr or result.stdout).strip().splitlines()[-1:]}")


def _wait(ready, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
            raise Unavailable(f"{what} within {timeout:.0f}s ({' | '.join(tail)})")
        time.sleep(0.3)


def stop(cluster: Cluster) -> None:
    """End every job, then the daemons this module started (by their ids)."""
    if any(process.poll() is None for process in cluster.processes):
        cluster.run("scancel", "--full", "--user=root", check=False, timeout=10)
    for process in reversed(cluster.processes):
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    for pid_file in cluster.pid_files:
        try:
            os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
        except (OSError, ValueError):
            pass


if __name__ == "__main__":
    import sys

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a timeout's SIGTERM stops the daemons too
    running = start(sys.argv[1] if len(sys.argv) > 1 else "/tmp/cbtool-slurm")
    print(f"export SLURM_CONF={running.conf}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        stop(running)
