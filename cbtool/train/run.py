"""The run folder and what it holds: ``checkpoint.pt`` (model, optimizer, scaler, step, data position, every
rank's RNG states: tensors and primitives only, read back with ``torch.load(weights_only=True)``),
``checkpoint.json`` (the step and settings, readable without torch) and ``log.jsonl``. Only rank 0 writes.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from cbtool import distributed
from cbtool.models.checkpoint import atomic_path, unwrap
from cbtool.errors import CbtoolError, OutputError
from cbtool.files import finite_or_null, json_text, writing
from cbtool.train.config import CHECKPOINT_FORMAT, CHECKPOINT_INFO_NAME, CHECKPOINT_NAME, LOG_NAME, FinetuneConfig, State
from cbtool.train.consistency import check_same_run


class Run:
    """One training run's folder: it saves and resumes checkpoints, restores the RNG states and keeps the log.

    ``saved`` is the checkpoint being resumed (None for a new run); ``dir`` the folder: the resumed run's,
    ``config.run_dir``, or ``runs/<timestamp>`` with ``runs/last`` pointing at it.
    """

    def __init__(self, config: FinetuneConfig, info, checkpoint: Path | None):
        self.config, self.info = config, info
        self.saved = _load_checkpoint(checkpoint) if checkpoint is not None else None
        self.dir = _run_dir(config, info, checkpoint)
        self.checkpoint = self.dir / CHECKPOINT_NAME
        log = Path(config.log) if config.log else self.dir / LOG_NAME
        if self.saved is not None:
            check_same_run(self.saved, self.dir, log)
        # One id in checkpoint.pt, checkpoint.json and every log record: a folder mixing two runs is refused.
        self.id = (self.saved or {}).get("run_id") or uuid.uuid4().hex[:12]
        self.log = RunLog(log, enabled=info.is_main, run_id=self.id)

    def load_weights(self, model: nn.Module) -> None:
        """A resumed run's weights, once its settings are checked against the ones it started with."""
        if self.saved is not None:
            _check_resumable(self.saved, self.config, self.info)
            unwrap(model).load_state_dict(self.saved["model"])

    def restore(self, optimizer, scaler) -> State:
        """The optimizer's and scaler's state and the step counters: saved ones on resume, else fresh."""
        if self.saved is None:
            return State()
        saved_groups = self.saved["optimizer"]["param_groups"]
        if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in optimizer.param_groups]:
            raise CbtoolError("the checkpoint's optimizer does not hold this run's parameter groups (another cbtool "
                              "version or other --train parts); start the run again")  # fmt: skip
        lr_scales = [group.get("lr_scale") for group in optimizer.param_groups]
        optimizer.load_state_dict(self.saved["optimizer"])
        for group, lr_scale in zip(optimizer.param_groups, lr_scales):  # this plan's --cb-lr, not the saved ratio
            group.pop("lr_scale", None)
            if lr_scale is not None:
                group["lr_scale"] = lr_scale
        if scaler is not None and self.saved["scaler"]:
            scaler.load_state_dict(self.saved["scaler"])
        return State(**self.saved["state"])

    def unreached(self) -> list[str] | None:
        """The parameters a resumed run left out as unreached by its logits (``[]`` for a run saved before cbtool
        left them out, whose optimizer holds them); None for a new run, which finds them."""
        if self.saved is None:
            return None
        return list(self.saved.get("unreached", []))

    def shares_cb_lr(self) -> bool:
        """A resumed run saved before --cb-lr existed: its cbs scales keep training at the backbone's rate."""
        return self.saved is not None and "cb_lr" not in json.loads(self.saved["config"])

    def seed(self) -> None:
        """Augmentation and dropout differ per rank; the data order (the sampler's own seed) is shared."""
        _seed_everything(self.config.seed + self.info.rank)
        if self.saved is not None:
            _set_rng_state(self.saved["rng"][self.info.rank])

    def save(self, model: nn.Module, optimizer, scaler, state: State, total_steps: int,
             unreached: Sequence[str] = ()) -> Path | None:
        """Every rank hands in its RNG states; rank 0 writes ``checkpoint.pt`` then ``checkpoint.json``, atomically.
        ``unreached``: the parameters the run leaves out (``Plan.unreached``), kept for its resume."""
        rng = distributed.all_gather_objects(_rng_state())
        path = self.checkpoint
        if not self.info.is_main:
            return None
        from cbtool.models import provenance

        plain = unwrap(model)
        record = provenance.of(plain).to_dict()
        payload = {
            "format": CHECKPOINT_FORMAT,
            "model": plain.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else {},
            "state": asdict(state),
            "rng": rng,
            "world_size": self.info.world_size,
            "config": json.dumps(self.config.to_dict(), sort_keys=True),
            "total_steps": total_steps,
            "run_id": self.id,
            "unreached": list(unreached),  # so that a resume leaves out the same parameters
        }
        with atomic_path(path) as temporary, open(temporary, "wb") as handle:
            torch.save(payload, handle)  # through a Python file: a full disk is an OSError, not torch's RuntimeError
        summary = {"step": state.step, "total_steps": total_steps, "run_id": self.id, "epoch": state.epoch,
                   "pos": state.pos, "time": time.time(),
                   "world_size": self.info.world_size, "config": self.config.to_dict(), "run_info": self.config.run_info,
                   "record": record}  # fmt: skip
        with atomic_path(self.dir / CHECKPOINT_INFO_NAME) as temporary:
            temporary.write_text(json_text(summary, default=str))
        return path

    def nonfinite_message(self, loss: float, step: int, lr: float) -> str:
        return _nonfinite_message(loss, step, lr, self.dir)


def _load_checkpoint(path: Path) -> dict:
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file raises many types
        from cbtool.models.fit import unreadable_message

        raise CbtoolError(unreadable_message(path, error)) from None
    if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
        raise CbtoolError(f"{path} is not a cbtool training checkpoint")
    return saved


def _check_resumable(saved: dict, config: FinetuneConfig, info) -> None:
    before = json.loads(saved["config"])
    changed = [f"--{key.replace('_', '-')} {before.get(key)} -> {getattr(config, key)}"
               for key in ("batch_size", "grad_accum", "seed", "train", "cb_lr", "cb_ramp")
               if before.get(key) != getattr(config, key)]  # fmt: skip
    if saved["world_size"] != info.world_size:
        changed.append(f"processes {saved['world_size']} -> {info.world_size}")
    if changed:
        raise CbtoolError(f"cannot resume with other settings ({'; '.join(changed)}); resume with the ones the run started with")


def _rng_state() -> dict:
    version, values, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(values, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(position),
                  "has_gauss": int(has_gauss), "cached": float(cached)},  # fmt: skip
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device
    return state


def _set_rng_state(state: dict) -> None:
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state((numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"], numpy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _run_dir(config: FinetuneConfig, info, checkpoint: Path | None) -> Path:
    """The run folder: the resumed run's, ``config.run_dir``, or ``runs/<timestamp>`` (with ``runs/last``)."""
    if checkpoint is not None:
        return checkpoint.parent
    chosen = None
    if info.is_main:
        if config.run_dir:
            chosen = Path(config.run_dir).expanduser()
            if (chosen / CHECKPOINT_NAME).exists() and not config.force:
                raise OutputError(f"{chosen} already holds a run; resume it with --resume {chosen}, or pick another --run-dir (or --force)")
        try:
            if chosen is not None:
                chosen.mkdir(parents=True, exist_ok=True)
            else:
                chosen = _new_run_dir(Path("runs"))
        except OSError as error:
            raise OutputError(f"cannot create the run folder {chosen or 'runs'} ({error.strerror}); pick another with --run-dir") from None
    return Path(distributed.all_gather_objects(str(chosen) if chosen else None)[0])


def _new_run_dir(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = root / stamp, 1
    while path.exists():
        n += 1
        path = root / f"{stamp}-{n}"
    path.mkdir()
    last = root / "last"
    try:
        if last.is_symlink() or not last.exists():
            temporary = root / f".last.{os.getpid()}"
            os.symlink(path.name, temporary, target_is_directory=True)
            os.replace(temporary, last)
    except OSError:  # no symlinks (Windows without developer mode): a pointer file instead
        if not last.is_dir():
            last.write_text(path.name)
    return path


class RunLog:
    """``log.jsonl``: one JSON object per line, appended on rank 0 only."""

    def __init__(self, path: Path, *, enabled: bool, run_id: str | None = None):
        self.path, self.enabled, self.run_id = path, enabled, run_id
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, event: str, **fields: Any) -> None:
        if not self.enabled:
            return
        with writing(self.path), open(self.path, "a") as handle:
            run = {"run": self.run_id} if self.run_id else {}
            record = finite_or_null({"event": event, "time": round(time.time(), 3), **run, **fields})
            handle.write(json_text(record, indent=None, sort_keys=False, default=str) + "\n")


@contextmanager
def deferred_sigint() -> Iterator[threading.Event]:
    """The first Ctrl-C only sets the event (the loop stops at the next step boundary); a second one raises."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(_signum, _frame):
        stop.set()
        signal.signal(signal.SIGINT, previous)  # a second Ctrl-C interrupts at once

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def _nonfinite_message(loss: float, step: int, lr: float, run_dir: Path) -> str:
    checkpoint = run_dir / CHECKPOINT_NAME
    kept = f"the last good checkpoint is {checkpoint}" if checkpoint.exists() else "no checkpoint was saved yet"
    return (f"the training loss became {loss} at step {step} (lr {lr:.3g}); stopped before updating the weights, and "
            f"{kept}; lower --lr, raise --warmup-steps, or drop --amp")  # fmt: skip
