"""Running a sweep's runs: each one is ``cbtool finetune`` (CB injected as its cell says) into its own run folder,
then ``cbtool eval --json`` of the model it wrote. One after another in this process, or as subprocesses, one per
device slot at a time (``--devices``), each optionally under torchrun.

A run folder holds finetune's checkpoint and log, ``model.safetensors`` and ``eval.json`` (``eval-corruptions.json``
with corruptions). A run whose eval files exist is finished and kept; one with a model is only evaluated; one with a
checkpoint resumes from it; any other starts afresh.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from cbtool.errors import CbtoolError, Interrupted
from cbtool.sweep.plan import CORRUPTIONS_FILE, EVAL_FILE, MODEL_FILE, PLAIN, RunSpec, SweepPlan, run_state

Note = Callable[[str], None]
CHILD_LOG = "sweep-run.log"
# The notes finetune has printed, per sweep folder: every run shares the data, so a note about it is said once.
_NOTES_SHOWN: dict[str, set[str]] = {}


def finetune_options(plan: SweepPlan, run: RunSpec, root: str | Path, *, resume: bool) -> dict[str, Any]:
    """The options of ``cbtool finetune`` for ``run``: the shared ones, CB as its cell says, its seed and folder."""
    folder = run.folder(root)
    cell = run.cell
    cb = cell.variant != PLAIN
    return {
        **plan.options, **plan.runtime_finetune_options(),
        "inject_cb": cb, "variant": cell.variant if cb else "cb", "position": cell.position or "mlp",
        "layers": cell.layers or "all", "scale_init": plan.options.get("scale_init") if cell.variant == "cbs" else None,
        # CB's own training options go to the runs that have CB (--cb-ramp) or cbs scales (--cb-lr)
        "cb_ramp": plan.options.get("cb_ramp") if cb else None,
        "cb_lr": plan.options.get("cb_lr") if cell.variant == "cbs" else None,
        "seed": run.seed, "output": folder / MODEL_FILE, "run_dir": folder, "resume": folder if resume else None,
        "save_best": None, "log": None, "force": False,
    }  # fmt: skip


def run_one(plan: SweepPlan, run: RunSpec, root: str | Path, *, quiet: bool = False) -> str:
    """Bring ``run`` to finished (train or resume, then evaluate) and return the state it started in.

    Ctrl-C during training raises ``cbtool.errors.Interrupted`` naming the run and its checkpoint.
    """
    from cbtool import distributed

    state = run_state(plan, run, root)
    if state == "done":
        return state
    folder = run.folder(root)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        if state in ("start", "resume"):
            if plan.finetune:
                _train(plan, run, root, resume=state == "resume")
            else:
                _build(plan, run, folder / MODEL_FILE)
        evaluate_run(plan, folder, quiet=quiet)
    finally:
        distributed.teardown()
    return state


def _train(plan: SweepPlan, run: RunSpec, root, *, resume: bool) -> None:
    from cbtool import train
    from cbtool.train import train_from_options

    try:
        shown = _NOTES_SHOWN.setdefault(str(Path(root).resolve()), set())
        train_from_options(finetune_options(plan, run, root, resume=resume), shown)
    except train.Interrupted as stop:
        if not stop.is_main:
            raise
        saved = f"saved {stop.checkpoint}" if stop.checkpoint else "its last complete checkpoint is kept"
        raise Interrupted(f"interrupted in run {run.name} at step {stop.step}; {saved}; run the same sweep command "
                          "again to resume it (finished runs are kept)") from None  # fmt: skip


def _build(plan: SweepPlan, run: RunSpec, output: Path) -> None:
    """No training (``--no-finetune``): the model as built for this seed, with CB as the cell says, saved."""
    from cbtool import distributed
    from cbtool.models.checkpoint import save
    from cbtool.spec import CBSpec
    from cbtool.train import new_model

    o, cell = plan.options, run.cell
    spec = None if cell.variant == PLAIN else CBSpec.from_options(
        cell.variant, cell.position, cell.layers, o.get("scale_init") if cell.variant == "cbs" else None)
    model = new_model(o["model"], seed=run.seed, spec=spec, pretrained=not o["no_pretrained"],
                      checkpoint=o["checkpoint"], num_classes=o["num_classes"], img_size=o["img_size"],
                      model_kwargs=o["model_kwargs"])  # fmt: skip
    if distributed.is_main_process():
        save(model, output)


def evaluate_run(plan: SweepPlan, folder: Path, *, quiet: bool = False) -> None:
    """``cbtool eval --json`` of the run's model on the sweep's evaluation data; corruptions in a second pass
    (density measures clean images only)."""
    from cbtool import distributed
    from cbtool.files import write_json_atomic
    from cbtool.pipeline import evaluate_dataset

    o, ev, runtime = plan.options, plan.evaluation, plan.runtime_finetune_options()
    common = dict(split=ev["split"], limit=ev["limit"], image_column=o.get("image_column"),
                  label_column=o.get("label_column"), skip_bad_images=bool(o.get("skip_bad_images")),
                  batch_size=o["batch_size"], workers=_eval_workers(runtime["workers"], runtime["device"]),
                  device=runtime["device"], amp=bool(o.get("amp")), channels_last=bool(o.get("channels_last")),
                  progress=not quiet)  # fmt: skip
    model = [str(folder / MODEL_FILE)]
    passes = [(EVAL_FILE, dict(density=ev["density"]))]
    if ev.get("corruptions"):
        passes.insert(0, (CORRUPTIONS_FILE, dict(corruptions=ev["corruptions"], severities=ev["severities"])))
    for name, extra in passes:  # eval.json last: it marks the run finished
        document = evaluate_dataset(model, ev["dataset"], **common, **extra)
        if distributed.is_main_process():
            write_json_atomic(folder / name, document)


def _eval_workers(workers: int | None, device: str | None) -> int:
    """As finetune's default: none on the CPU (they would compete with the model for its cores), else eval's 2."""
    from cbtool.distributed import pick_device

    if workers is not None:
        return workers
    return 0 if pick_device(device).type == "cpu" else 2


def run_line(plan: SweepPlan, run: RunSpec, root: str | Path, seconds: float | None = None) -> str:
    """``top-1 75.40%, loss 0.7173, entropy 0.9069 (2m13s)`` from a finished run's eval file."""
    from cbtool.results import load_results

    metrics = load_results(run.folder(root) / EVAL_FILE)["models"][0]
    top1, loss = metrics["metrics"]["top1"], metrics["metrics"]["loss"]
    entropy = (metrics.get("density") or {}).get("entropy_mean")
    text = f"top-1 {top1:.2f}%, loss {loss:.4f}" + (f", entropy {entropy:.4f}" if entropy is not None else "")
    return text + (f" ({_duration(seconds)})" if seconds is not None else "")


def _duration(seconds: float) -> str:
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes}m{rest:02d}s" if minutes else f"{seconds:.1f}s"


def run_sequential(plan: SweepPlan, root: str | Path, *, quiet: bool, note: Note) -> None:
    """Every run in this process, in the plan's order; the first failure stops the sweep."""
    runs = plan.runs
    for number, run in enumerate(runs, 1):
        head = f"run {number}/{len(runs)} {run.name}"
        state = run_state(plan, run, root)
        if state == "done":
            note(f"{head}: finished earlier, kept ({run_line(plan, run, root)})")
            continue
        note(f"{head}: {_STARTING[state]}")
        started = time.perf_counter()
        try:
            run_one(plan, run, root, quiet=quiet)
        except Interrupted:
            raise
        except CbtoolError as error:
            raise type(error)(f"run {run.name} failed: {error}") from None
        note(f"{head}: {run_line(plan, run, root, time.perf_counter() - started)}")


_STARTING = {"start": "training", "resume": "resuming from its checkpoint", "evaluate": "evaluating its model"}


def device_slots(devices: list[str] | None, torchrun: int | None) -> list[str | None]:
    """``CUDA_VISIBLE_DEVICES`` per slot: the devices in groups of ``torchrun`` (one each without it); ``cpu``
    hides the GPUs. Without ``devices``: one slot that keeps the environment's."""
    if not devices:
        return [None]
    for device in devices:
        if device != "cpu" and not device.isdigit():
            raise CbtoolError(f"--devices item {device!r} is not a GPU index or cpu; give e.g. 0,1,2,3 or cpu,cpu")
    size = torchrun or 1
    if len(devices) % size:
        raise CbtoolError(f"--devices lists {len(devices)} devices, not a multiple of --torchrun {size}")
    groups = [devices[i:i + size] for i in range(0, len(devices), size)]
    return ["" if all(d == "cpu" for d in group) else ",".join(d for d in group if d != "cpu") for group in groups]


def check_gpus(devices: list[str] | None) -> None:
    """Refuse GPU indices in ``--devices`` that this machine does not have (a child would quietly run on the CPU)."""
    indices = sorted({int(d) for d in devices or [] if d.isdigit()})
    if not indices:
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise CbtoolError(f"--devices {','.join(devices)} names GPU {indices[0]} but CUDA is not available; "
                          "use --devices cpu,cpu or run without --devices")  # fmt: skip
    if indices[-1] >= count:
        raise CbtoolError(f"--devices names GPU {indices[-1]} but this machine has {count} (0-{count - 1})")


def child_command(root: str | Path, run: RunSpec, torchrun: int | None) -> list[str]:
    """The command that brings one run to finished in a fresh process (under torchrun with ``torchrun``)."""
    launcher = [sys.executable]
    if torchrun:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
    return [*launcher, "-m", "cbtool", "sweep", "-o", str(root), "--only", run.name]


def run_in_subprocesses(plan: SweepPlan, root: str | Path, *, slots: list[str | None], torchrun: int | None,
                        note: Note, launch=subprocess.Popen) -> None:
    """The unfinished runs as subprocesses, one per slot at a time; each writes its output to
    ``<run>/sweep-run.log``. A failure lets the running ones finish and starts no more; Ctrl-C is passed on."""
    runs = plan.runs
    free: queue.Queue = queue.Queue()
    for slot in slots:
        free.put(slot)
    stop, failures, children, lock = threading.Event(), [], set(), threading.Lock()

    def one(number: int, run: RunSpec) -> None:
        head = f"run {number}/{len(runs)} {run.name}"
        slot = free.get()
        try:
            if stop.is_set():
                return
            folder = run.folder(root)
            folder.mkdir(parents=True, exist_ok=True)
            env = dict(os.environ)
            if slot is not None:
                env["CUDA_VISIBLE_DEVICES"] = slot
            where = "" if slot is None else f" on {'cpu' if slot == '' else 'CUDA device ' + slot}"
            note(f"{head}: {_STARTING[run_state(plan, run, root)]}{where}")
            started = time.perf_counter()
            with open(folder / CHILD_LOG, "ab") as log:
                # Its own session: a terminal's Ctrl-C reaches only this process, which passes on one SIGINT
                # (a second one would stop a run before its checkpoint is saved).
                child = launch(child_command(root, run, torchrun), env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)  # fmt: skip
                with lock:
                    children.add(child)
                code = child.wait()
                with lock:
                    children.discard(child)
            if code != 0:
                stop.set()
                failures.append(f"run {run.name} failed (exit {code}): {_last_line(folder / CHILD_LOG)}")
                return
            note(f"{head}: {run_line(plan, run, root, time.perf_counter() - started)}")
        finally:
            free.put(slot)

    pending = []
    for number, run in enumerate(runs, 1):
        if run_state(plan, run, root) == "done":
            note(f"run {number}/{len(runs)} {run.name}: finished earlier, kept ({run_line(plan, run, root)})")
        else:
            pending.append((number, run))
    with ThreadPoolExecutor(max_workers=len(slots)) as pool:
        futures = [pool.submit(one, number, run) for number, run in pending]
        try:
            for future in futures:
                while not future.done():
                    time.sleep(0.2)  # short waits keep Ctrl-C responsive in the main thread
                future.result()
        except KeyboardInterrupt:
            stop.set()
            with lock:
                for child in children:
                    child.send_signal(signal.SIGINT)  # each run saves a checkpoint at its next step
            for future in futures:
                future.exception()
            raise Interrupted("interrupted; finished runs are kept and running ones saved a checkpoint; run the "
                              "same sweep command again to continue") from None  # fmt: skip
    if failures:
        raise CbtoolError("; ".join(failures))


def _last_line(path: Path) -> str:
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no output"
    return lines[-1] if lines else "no output"
