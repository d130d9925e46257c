"""Fine-tuning: heal a model after CB surgery (or train a new head) with a small, resumable AdamW loop.

``config`` holds the settings (``FinetuneConfig``), ``prepare`` gets the model and data ready, ``loop`` is
``finetune`` itself, ``run`` owns the run folder (checkpoints, RNG states, the log, Ctrl-C), ``resume`` goes
back to one, ``data`` chooses the validation split, ``record`` builds the saved ``training`` record and
``console`` prints, and ``options`` runs one from command-line options (finetune, sweep). A run folder
(``run_dir``; the CLI's default is ``runs/<timestamp>`` with ``runs/last`` pointing at the newest) holds ``checkpoint.pt``, ``checkpoint.json`` and ``log.jsonl``.
"""

from cbtool.train.config import (
    CHECKPOINT_INFO_NAME,
    CHECKPOINT_NAME,
    LOG_NAME,
    PRETRAINED_LR,
    SCRATCH_LR,
    FinetuneConfig,
    FinetuneResult,
    Interrupted,
)
from cbtool.train.data import resolve_training_data
from cbtool.train.loop import finetune
from cbtool.train.options import train_from_options
from cbtool.train.prepare import check_new_head, check_run_outputs, default_lr, fit_head, new_model
from cbtool.train.record import training_record
from cbtool.train.resume import find_checkpoint, load_run, read_run_info, recordable, resume_options
from cbtool.train.run import Run

__all__ = [
    "CHECKPOINT_INFO_NAME", "CHECKPOINT_NAME", "LOG_NAME", "PRETRAINED_LR", "SCRATCH_LR", "FinetuneConfig",
    "FinetuneResult", "Interrupted", "Run", "check_new_head", "check_run_outputs", "default_lr", "finetune",
    "find_checkpoint", "fit_head", "load_run", "new_model", "read_run_info", "recordable",
    "resolve_training_data", "resume_options", "train_from_options", "training_record",
]  # fmt: skip
