"""``--slurm`` through submitit: against a real one-node SLURM cluster started for these tests (tests/slurm_cluster.py;
skipped with the reason where it cannot start), and through submitit's local executor and plain checks where
SLURM is not needed.

With SLURM: a 2-variant x 2-seed sweep whose runs equal the same sweep run here; a run preempted (requeued with a
checkpoint) and then killed outright (resubmitted by the next sweep call) that ends at the weights of an
uninterrupted run; ``--status``; a two-task finetune job equal to torchrun's; bad requests refused in one line
before anything is written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import slurm_cluster

MODEL = ["vit_tiny_patch16_224", "--no-pretrained", "--num-classes", "10", "--img-size", "28",
         "--model-kwargs", "patch_size=7", "embed_dim=32", "depth=2", "num_heads=2"]  # fmt: skip
QUICK = ["--dataset", "sample", "--limit", "200", "--val-limit", "60", "--steps", "3", "--batch-size", "32",
         "--workers", "0", "--eval-limit", "100", "--quiet"]  # fmt: skip
ONE_CPU = ["--slurm", "--slurm-cpus-per-task", "1", "--slurm-time", "10"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running one-node cluster, with SLURM_CONF set for this process and its children."""
    try:
        cluster = slurm_cluster.start(tmp_path_factory.mktemp("slurm"))
    except slurm_cluster.Unavailable as reason:
        pytest.skip(f"no SLURM cluster: {reason}")
    before = {key: os.environ.get(key) for key in cluster.env}
    os.environ.update(cluster.env)
    try:
        yield cluster
    finally:
        slurm_cluster.stop(cluster)
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def job_env(monkeypatch, cli_env):
    """Jobs inherit this process's environment (sbatch exports it): this checkout first, one thread each."""
    for key, value in {**cli_env, "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(key, value)


def cbtool(*args, timeout: float = 180) -> subprocess.CompletedProcess:
    """``python -m cbtool ARGS`` in a fresh process (as a user types it on the login node)."""
    return subprocess.run([sys.executable, "-m", "cbtool", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def wait_for_jobs(folder: Path, timeout: float = 300) -> None:
    """Until none of the sweep's jobs is queued or running."""
    from cbtool.sweep.jobs import active_jobs, read_jobs

    deadline = time.monotonic() + timeout
    while active_jobs(read_jobs(folder)):
        assert time.monotonic() < deadline, f"jobs still running after {timeout}s"
        time.sleep(1)


def wait_until(condition, timeout: float = 120, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def events(run: Path) -> list[str]:
    return [json.loads(line)["event"] for line in (run / "log.jsonl").read_text().splitlines()]


def same_weights(first: Path, second: Path) -> None:
    a, b = load_file(first), load_file(second)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def jobs_of(folder: Path) -> list[dict]:
    return json.loads((folder / "slurm" / "jobs.json").read_text())["jobs"]


@pytest.mark.slow
def test_sweep_on_slurm_equals_the_local_sweep(tmp_path, slurm, job_env):
    """Four runs as one job array; a second call while they run submits nothing; the last job writes the summary,
    whose runs equal the same sweep run here, value for value; --status says finished."""
    out, local = tmp_path / "slurm-sweep", tmp_path / "local-sweep"
    grid = ["--variants", "plain,cb", "--seeds", "0,1"]
    first = cbtool("sweep", *MODEL, *QUICK, *grid, "-o", out, *ONE_CPU)
    assert first.returncode == 0, first.stderr
    assert "submitted 4 job(s)" in first.stdout
    records = jobs_of(out)
    assert [r["run"] for r in records] == ["plain-seed0", "cb-mlp-seed0", "plain-seed1", "cb-mlp-seed1"]
    assert len({r["job"].split("_")[0] for r in records}) == 1  # one job array
    again = cbtool("sweep", *MODEL, *QUICK[:-1], *grid, "-o", out, *ONE_CPU)
    assert again.returncode == 0, again.stderr
    assert jobs_of(out) == records  # nothing queued or running is submitted twice
    assert "not submitted again" in again.stderr or "finished earlier" in again.stderr
    wait_for_jobs(out)
    assert (out / "summary.json").exists(), "the last job writes the summary"

    ran_here = cbtool("sweep", *MODEL, *QUICK, *grid, "-o", local)
    assert ran_here.returncode == 0, ran_here.stderr
    for run in ("plain-seed0", "cb-mlp-seed0", "plain-seed1", "cb-mlp-seed1"):
        on_slurm = json.loads((out / "runs" / run / "eval.json").read_text())["models"][0]
        here = json.loads((local / "runs" / run / "eval.json").read_text())["models"][0]
        on_slurm["metrics"].pop("throughput"), here["metrics"].pop("throughput")  # timings, not results
        assert on_slurm["metrics"] == here["metrics"], run
        assert on_slurm["density"] == here["density"], run
        same_weights(out / "runs" / run / "model.safetensors", local / "runs" / run / "model.safetensors")
    summary, reference = (json.loads((f / "summary.json").read_text()) for f in (out, local))
    assert summary["cells"] == reference["cells"] and summary["comparisons"] == reference["comparisons"]

    status = cbtool("sweep", "--status", out)
    assert status.returncode == 0, status.stderr
    assert status.stdout.strip().splitlines()[-1] == "4 finished"
    third = cbtool("sweep", *MODEL, *QUICK, *grid, "-o", out, *ONE_CPU)
    assert "nothing to submit" in third.stdout and jobs_of(out) == records


@pytest.mark.slow
def test_preempted_then_killed_run_ends_at_the_uninterrupted_weights(tmp_path, slurm, job_env):
    """SLURM's preemption signal: the job saves a checkpoint and requeues itself; scancel: the next sweep call
    resubmits the run, which resumes from its last checkpoint. The model equals an uninterrupted run's."""
    out, local = tmp_path / "slurm-sweep", tmp_path / "local-sweep"
    recipe = [*MODEL, "--dataset", "sample", "--limit", "200", "--val-limit", "60", "--steps", "900", "--batch-size",
              "16", "--workers", "0", "--eval-limit", "100", "--save-every", "100", "--variants", "plain",
              "--seeds", "0", "--quiet"]  # fmt: skip
    run = out / "runs" / "plain-seed0"
    assert cbtool("sweep", *recipe, "-o", out, *ONE_CPU).returncode == 0
    job = jobs_of(out)[0]["job"]

    wait_until(lambda: (run / "log.jsonl").exists() and "train" in events(run), what="training to start")
    slurm.run("scancel", "--signal=USR2", job)  # what SLURM sends before the time limit or a preemption
    wait_until(lambda: "interrupted" in events(run), what="the checkpoint on preemption")
    wait_until(lambda: events(run).count("resume") == 1, timeout=120, what="the requeued job to resume")
    assert jobs_of(out)[0]["job"] == job  # the same job, requeued

    # killed outright, as by a node failure or scancel's SIGKILL (no checkpoint, no requeue), as soon as the
    # requeued job trains again. A plain scancel (and `scancel --full --signal=KILL` of the job, which reaches the
    # batch script) ends the tasks with SIGTERM first, which submitit ignores, and SIGKILL only KillWait later: on
    # an idle machine the tiny run finishes within that wait. The step's tasks get SIGKILL at once.
    slurm.run("scancel", "--signal=KILL", f"{job}.0")
    wait_until(lambda: not _queued(job), what="the killed job to leave the queue")
    status = cbtool("sweep", "--status", out)
    assert "failed" in status.stdout and "killed" in status.stdout, status.stdout

    resubmitted = cbtool("sweep", *recipe, "-o", out, *ONE_CPU)
    assert resubmitted.returncode == 0, resubmitted.stderr
    assert "to resume from its checkpoint" in resubmitted.stderr or len(jobs_of(out)) == 2
    assert len(jobs_of(out)) == 2
    wait_for_jobs(out)
    assert events(run).count("resume") == 2 and (out / "summary.json").exists()

    assert cbtool("sweep", *recipe, "-o", local).returncode == 0
    same_weights(run / "model.safetensors", local / "runs" / "plain-seed0" / "model.safetensors")


def _queued(job: str) -> bool:
    from cbtool.cluster import job_states

    return bool(job_states([job]))


@pytest.mark.slow
def test_a_preempted_two_task_finetune_job_equals_torchrun(tmp_path, slurm, job_env):
    """finetune --slurm with two tasks joins DDP from submitit's task environment; the preemption signal reaches
    both, they stop at the same step, rank 0 saves and requeues; the weights equal an uninterrupted torchrun's."""
    common = [*MODEL, "--dataset", "sample", "--limit", "120", "--val-limit", "40", "--steps", "300", "--batch-size",
              "8", "--workers", "0", "--device", "cpu", "--quiet"]  # fmt: skip
    run = tmp_path / "run-slurm"
    submitted = cbtool("finetune", *common, "-o", tmp_path / "slurm.safetensors", "--run-dir", run, *ONE_CPU,
                       "--slurm-tasks-per-node", "2")  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.split("submitted job ")[1].split()[0]
    wait_until(lambda: (run / "log.jsonl").exists() and "train" in events(run), timeout=120, what="training")
    slurm.run("scancel", "--signal=USR2", job)
    wait_until(lambda: not _queued(job) and (tmp_path / "slurm.safetensors").exists(), timeout=300, what="the job")
    assert events(run).count("interrupted") == 1 and events(run).count("resume") == 1, events(run)
    assert json.loads((run / "checkpoint.json").read_text())["world_size"] == 2

    here = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                           "cbtool", "finetune", *common, "-o", tmp_path / "torchrun.safetensors", "--run-dir",
                           tmp_path / "run-torchrun"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert here.returncode == 0, here.stderr[-2000:]
    same_weights(tmp_path / "slurm.safetensors", tmp_path / "torchrun.safetensors")


@pytest.mark.parametrize("extra, message", [
    (["--slurm-partition", "nosuch"], "unknown SLURM partition 'nosuch': this cluster has debug"),
    (["--slurm-time", "2:00:00"], "--slurm-time 120 min is over the 1:00:00 limit of the default partition"),
    (["--slurm-gpus-per-node", "1"], "SLURM refuses the job:"),
])  # fmt: skip
def test_requests_slurm_refuses_are_one_line_and_write_nothing(tmp_path, slurm, main_cli, extra, message):
    out = tmp_path / "sweep"
    code, err = main_cli("sweep", *MODEL, *QUICK, "-o", out, *ONE_CPU, *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_a_refused_finetune_job_writes_nothing(tmp_path, slurm, main_cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = main_cli("finetune", *MODEL, "--dataset", "sample", "-o", "m.safetensors", *ONE_CPU,
                         "--slurm-partition", "nosuch")  # fmt: skip
    assert code == 2 and "unknown SLURM partition 'nosuch'" in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def test_an_unreachable_controller_is_one_line(tmp_path, slurm, main_cli, monkeypatch):
    conf = tmp_path / "slurm.conf"
    text = slurm.conf.read_text().replace("SlurmctldPort=", f"SlurmctldPort={slurm_cluster._free_port()}\n#")
    conf.write_text(text + "MessageTimeout=2\n")
    monkeypatch.setenv("SLURM_CONF", str(conf))
    code, err = main_cli("sweep", *MODEL, *QUICK, "-o", tmp_path / "sweep", *ONE_CPU)
    assert code == 2 and "SLURM is not reachable (sinfo:" in err, err
    assert not (tmp_path / "sweep").exists()


# Without a SLURM cluster: the checks, and the submission code through submitit's local executor.


@pytest.mark.parametrize("text, minutes", [("90", 90), ("1:30", 2), ("1:30:00", 90), ("2-00", 2880), ("1-2:30", 1590),
                                           ("0-0:0:30", 1)])  # fmt: skip
def test_slurm_time_limits_read_as_minutes(text, minutes):
    from cbtool.cluster import parse_time

    assert parse_time(text) == minutes


@pytest.mark.parametrize("text, message", [("1h", "is not a SLURM time limit"), ("0", "gives the job no time"),
                                           ("1:2:3:4", "is not a SLURM time limit")])  # fmt: skip
def test_bad_time_limits_are_refused(text, message):
    from cbtool.cluster import parse_time
    from cbtool.errors import CbtoolError

    with pytest.raises(CbtoolError, match=message):
        parse_time(text)


def test_slurm_params_become_sbatch_flags():
    from cbtool.cluster import SlurmOptions, parse_params

    options = SlurmOptions(partition="gpu", time=90, nodes=2, gpus_per_node=4, mem="64G",
                           params=parse_params(["mail-type=END", "exclusive=user"]))  # fmt: skip
    assert options.tasks == 8
    assert options.sbatch_flags() == ["--partition=gpu", "--time=90", "--nodes=2", "--ntasks-per-node=4",
                                      "--gpus-per-node=4", "--mem=64G", "--mail-type=END", "--exclusive=user"]  # fmt: skip
    assert options.executor_parameters() == {
        "timeout_min": 90, "nodes": 2, "tasks_per_node": 4, "gpus_per_node": 4, "slurm_partition": "gpu",
        "slurm_mem": "64G", "slurm_additional_parameters": {"mail_type": "END", "exclusive": "user"}}  # fmt: skip


@pytest.mark.parametrize("args, message", [
    (["--slurm-partition", "gpu"], "--slurm-partition is for jobs submitted with --slurm; add --slurm or drop it"),
    (["--slurm", "--devices", "cpu,cpu"], "--devices spreads runs over this machine; with --slurm each run is a job"),
    (["--slurm", "--torchrun", "2"], "--torchrun spreads runs over this machine"),
    (["--slurm", "--slurm-time", "soon"], "--slurm-time 'soon' is not a SLURM time limit"),
    (["--slurm", "--slurm-param", "mail-type"], "--slurm-param 'mail-type' is not KEY=VALUE"),
])  # fmt: skip
def test_bad_slurm_options_are_one_line(tmp_path, main_cli, args, message):
    out = tmp_path / "sweep"
    code, err = main_cli("sweep", *MODEL, *QUICK, "-o", out, *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_no_submitit_or_no_slurm_is_one_line_before_anything_is_written(tmp_path, main_cli, monkeypatch):
    out = tmp_path / "sweep"
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit fails
    code, err = main_cli("sweep", *MODEL, *QUICK, "-o", out, "--slurm")
    assert code == 2 and "submitit, which is not installed: pip install 'cbtool[slurm]'" in err, err
    code, err = main_cli("finetune", *MODEL, "--dataset", "sample", "-o", tmp_path / "m.safetensors", "--slurm")
    assert code == 2 and "not installed" in err, err
    monkeypatch.delitem(sys.modules, "submitit")
    pytest.importorskip("submitit")
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch
    code, err = main_cli("sweep", *MODEL, *QUICK, "-o", out, "--slurm")
    assert code == 2 and "--slurm needs SLURM's commands (sbatch, sinfo, squeue not found on PATH)" in err, err
    assert not out.exists() and not (tmp_path / "runs").exists()


def test_status_refuses_other_options_and_folders_without_a_sweep(tmp_path, main_cli):
    code, err = main_cli("sweep", "--status", tmp_path)
    assert code == 2 and "holds no sweep" in err, err
    code, err = main_cli("sweep", "--status", tmp_path, "--seeds", "0,1")
    assert code == 2 and "--seeds does nothing with --status, which reads the sweep folder" in err, err


@pytest.mark.slow
def test_local_executor_runs_the_array_and_the_last_job_summarizes(tmp_path, job_env, monkeypatch):
    """submitit's local executor (processes here) runs the same submission and job code: every run finishes,
    the last job writes the summary, a second submission finds nothing to do, --status reads it."""
    pytest.importorskip("submitit")
    from cbtool.cluster import SlurmOptions
    from cbtool.sweep.slurm import status_text, submit_sweep, sweep_status
    from cbtool.sweep.start import make_plan

    options = dict(no_pretrained=True, num_classes=10, img_size=28,
                   model_kwargs=["patch_size=7", "embed_dim=32", "depth=2", "num_heads=2"], limit=200, val_limit=60,
                   steps=3, batch_size=32, workers=0, quiet=True)  # fmt: skip
    plan = make_plan("vit_tiny_patch16_224", "sample", variants="plain,cb", seeds="0", eval_limit=100, **options)
    out = tmp_path / "sweep"
    notes: list[str] = []
    submitted = submit_sweep(plan, out, SlurmOptions(time=10), cluster="local", note=notes.append)
    assert [r["run"] for r in submitted] == ["plain-seed0", "cb-mlp-seed0"] and all(r["cluster"] == "local" for r in submitted)
    assert notes == [f"run 1/2 plain-seed0: submitted as job {submitted[0]['job']} (to train)",
                     f"run 2/2 cb-mlp-seed0: submitted as job {submitted[1]['job']} (to train)"]  # fmt: skip
    wait_for_jobs(out)
    summary = json.loads((out / "summary.json").read_text())
    assert [cell["name"] for cell in summary["cells"]] == ["plain", "cb-mlp"] and summary["missing"] == []
    again = make_plan("vit_tiny_patch16_224", "sample", variants="plain,cb", seeds="0", eval_limit=100, **options)
    assert submit_sweep(again, out, SlurmOptions(time=10), cluster="local") == []
    rows = sweep_status(out)
    assert [(row["run"], row["state"], row["step"]) for row in rows] == [("plain-seed0", "finished", 3), ("cb-mlp-seed0", "finished", 3)]
    assert status_text(rows).splitlines()[-1] == "2 finished"


def test_a_local_sweep_is_refused_while_the_folders_jobs_run(tmp_path, main_cli):
    """Starting the sweep here while its jobs are queued or running would train their runs twice."""
    from cbtool.sweep.jobs import write_jobs

    out = tmp_path / "sweep"
    (out / "slurm").mkdir(parents=True)
    write_jobs(out, [{"run": "plain-seed0", "job": str(os.getpid()), "cluster": "local", "submitted": 0.0}])
    code, err = main_cli("sweep", *MODEL, *QUICK, "-o", out)
    assert code == 2 and f"has 1 SLURM job(s) queued or running (run plain-seed0: job {os.getpid()} is running)" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["slurm"]


def test_a_failed_jobs_log_tail_leaves_out_progress_bars(tmp_path):
    from cbtool.cluster import log_tail

    log = tmp_path / "1_0_log.err"
    log.write_text("loading\nstep 396/1500: val top-1 56.67%\n\rfinetune:  26%|██▋       | 396/1500 [00:20<00:44, "
                   "24.98step/s, loss=0.88]\rfinetune:  27%|██▋       | 398/1500 [00:20<00:51, 21.52step/s]"
                   "srun: error: vm: task 0: Killed\nsrun: Force Terminated StepId=3.0\n")  # fmt: skip
    assert log_tail(log) == ("step 396/1500: val top-1 56.67% | srun: error: vm: task 0: Killed | "
                             "srun: Force Terminated StepId=3.0")  # fmt: skip
    assert log_tail(tmp_path / "missing.err") == ""
