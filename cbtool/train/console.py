"""What a run prints on stderr: the opening line, the progress bar and the validation lines (rank 0 only)."""

from __future__ import annotations

import sys


class Progress:
    """A tqdm bar, or plain lines when there is none."""

    def __init__(self, bar):
        self.bar = bar

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def set_postfix(self, **kwargs) -> None:
        if self.bar is not None:
            self.bar.set_postfix(**kwargs)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def progress(total: int, initial: int, *, enabled: bool) -> Progress:
    if not enabled:
        return Progress(None)
    from cbtool.progress import progress_bar

    return Progress(progress_bar(total, initial=initial, desc="finetune", unit="step"))


def _validation_text(val: dict | None) -> str:
    if val is None:
        return "no validation"
    holdout = val.get("holdout")
    if holdout:
        return (f"validation on {val['num_samples']} images held out of {holdout.get('from_split') or 'the training data'} "
                f"(--val-fraction {holdout['fraction']:g})")  # fmt: skip
    split = f"split {val['split']}" if val.get("split") else "the validation data"
    return f"validation on {split} ({val['num_samples']} images)"


def unreached_note(names, all_names) -> str:
    """Which parameters a run leaves alone because the logits do not depend on them: whole modules by their name,
    the rest one by one."""
    left_out = set(names)
    owners = {name.rsplit(".", 1)[0] for name in names}
    whole = {m for m in owners if all(n in left_out for n in all_names if n.startswith(m + "."))}
    outermost = sorted(m for m in whole if not any(m.startswith(other + ".") for other in whole))
    shown = outermost + sorted(n for n in names if not any(n.startswith(m + ".") for m in outermost))
    listed = ", ".join(shown[:3]) + (f" and {len(shown) - 3} more" if len(shown) > 3 else "")
    count = f"{len(names)} parameter tensor{'s' if len(names) != 1 else ''}"
    return f"note: {count} do{'es' if len(names) == 1 else ''} not reach the logits and {'is' if len(names) == 1 else 'are'} not trained ({listed})"


def start_note(state, total, steps_per_epoch, lr, trainable, info, device, run_dir, config, data, cb_lr=None) -> str:
    verb = f"resuming at step {state.step} of" if state.step else "training for"
    processes = f" x {info.world_size} processes" if info.world_size > 1 else ""
    lr_note = "" if config.lr is not None else " (default for these weights; set --lr)"
    if cb_lr is not None:
        lr_note += f", cbs scales {cb_lr:g}" + ("" if config.cb_lr is not None else " (set --cb-lr)")
    if config.cb_ramp:
        lr_note += f", CB weight ramped over {config.cb_ramp} steps"
    return (f"{verb} {total} steps ({total / steps_per_epoch:.3g} epochs of {steps_per_epoch}) on {device}{processes}: "
            f"{trainable:,} parameters ({config.train}), lr {lr:g}{lr_note}, "
            f"batch {config.batch_size}x{config.grad_accum}{processes}; {_validation_text(data['val'])}; "
            f"run folder {run_dir}")  # fmt: skip


def eval_line(step: int, total: int, metrics: dict) -> str:
    density = f", entropy {metrics['entropy_mean']:.3f}" if metrics.get("entropy_mean") is not None else ""
    ramp = metrics.get("cb_ramp")
    ramping = f" (CB weight at {ramp:.0%} of full: --cb-ramp)" if ramp is not None and ramp < 1 else ""
    return f"step {step}/{total}: val top-1 {metrics['top1']:.2f}%, loss {metrics['loss']:.4f}{density}{ramping}"
