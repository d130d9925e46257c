"""Going back to a run folder: find its checkpoint, read its settings, rebuild its model, merge options on resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from torch import nn

from cbtool.errors import CbtoolError
from cbtool.train.config import CHECKPOINT_INFO_NAME, CHECKPOINT_NAME

# Options that may differ when a run is resumed; every other one must match how the run started.
RUNTIME_OPTIONS = {"output", "save_best", "force", "quiet", "workers", "device", "resume", "log"}


def find_checkpoint(path: str | Path) -> Path:
    """``checkpoint.pt`` from a run folder, a ``last`` link or pointer file, or the file itself."""
    path = Path(path).expanduser()
    if path.is_file() and path.name == "last":  # a 'last' pointer where symlinks are unavailable
        path = path.parent / path.read_text(errors="replace").strip()
    elif path.is_file() and path.suffix != ".pt":
        raise CbtoolError(f"--resume takes a run folder (e.g. runs/last) or its {CHECKPOINT_NAME}, not {path}; "
                          "to train a saved model further, pass it as MODEL")  # fmt: skip
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise CbtoolError(f"no checkpoint at {path}; --resume takes a run folder holding {CHECKPOINT_NAME} (e.g. runs/last)")
    return path.resolve()


def load_run(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the model of a run folder (offline, random weights until ``finetune`` resumes it) and its info.

    The info is ``checkpoint.json``: ``step``, ``config``, ``run_info`` and the model ``record``.
    """
    from cbtool.models import provenance
    from cbtool.models.architectures import rebuild
    from cbtool.models.metadata import check_data_config, check_source
    from cbtool.spec import CBSpec
    from cbtool.surgery import inject

    info = read_run_info(path)
    record = info.get("record") or {}
    if not record.get("source"):
        raise CbtoolError(f"the run in {path} does not say how to rebuild the model (it was trained from a model without a cbtool source)")
    where = str(find_checkpoint(path).with_name(CHECKPOINT_INFO_NAME))
    check_source(record["source"], where, "record.source")
    if record.get("data_config"):
        check_data_config(record["data_config"], where, "record.data_config")
    model = rebuild(record["source"])
    if record.get("spec"):
        inject(model, CBSpec.from_dict(record["spec"]))
    provenance.attach(model, data_config=record.get("data_config"), training=record.get("training"))
    return model, info


def read_run_info(path: str | Path) -> dict:
    """``checkpoint.json`` of a run folder (or ``last`` link, or checkpoint file): step, config, run_info, record."""
    info_path = find_checkpoint(path).with_name(CHECKPOINT_INFO_NAME)
    try:
        return json.loads(info_path.read_text())
    except (OSError, json.JSONDecodeError):
        raise CbtoolError(f"cannot read {info_path}; the run folder is incomplete") from None


def recordable(options: dict[str, Any]) -> dict[str, Any]:
    """The options as JSON values, kept with each checkpoint so that --resume needs nothing else."""
    return {name: (str(value) if isinstance(value, Path) else value) for name, value in options.items()}


def resume_options(given: dict[str, Any], typed: Callable[[str], bool], flag: Callable[[str], str]) -> dict[str, Any]:
    """The options the run in ``given["resume"]`` started with, merged with ``given``.

    Runtime options (``RUNTIME_OPTIONS``) are taken from ``given`` when ``typed(name)`` or the run has none; any
    other option typed now must agree with the saved one (``flag(name)`` names it in the error).
    """
    saved = read_run_info(given["resume"]).get("run_info") or {}
    if not saved:
        raise CbtoolError(f"{given['resume']} holds no command-line settings (the run was started from Python); resume it with cbtool.finetune")
    merged = dict(saved)
    for name, value in given.items():
        if name in RUNTIME_OPTIONS:
            if typed(name) or saved.get(name) is None:
                merged[name] = value
            continue
        if typed(name) and recordable({name: value})[name] != saved.get(name):
            raise CbtoolError(f"this run started with {flag(name)} {saved.get(name)!r}, not {value!r}; leave {flag(name)} out to resume it")
    merged["resume"] = given["resume"]
    merged["run_dir"] = None  # the folder given to --resume, wherever the run first wrote it
    return merged
