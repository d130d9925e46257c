"""Forward-pass cost of Context Broadcasting: a plain model against the same weights with CB, timed in turns.

Both models live in one process and are timed alternately (plain, cb, plain, cb, ...) after a warm-up, so
slow drifts (clock frequency, other processes) hit both alike. The reported ratio is cb / plain of the
median batch times; docs/benchmarks.md has measured figures and what disturbs them.
"""

from __future__ import annotations

import copy
import math
import os
import platform
import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from cbtool.models import provenance
from cbtool._version import __version__
from cbtool.distributed import amp_dtype, pick_device, synchronize
from cbtool.errors import CbtoolError
from cbtool.memory import memory_guard
from cbtool.spec import CBSpec

from cbtool.results import SCHEMA_VERSION  # noqa: E402  (one version for every JSON document cbtool writes)
# Without --number, each timed repeat runs enough forwards to last about this long (GPU kernels are short).
MIN_REPEAT_S = 0.05
# A time budget never cuts a run below this many repeats: fewer give no meaningful spread.
MIN_REPEATS = 3
AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
CLOCKS = ("wall", "cpu")


@dataclass(frozen=True)
class Timing:
    """Milliseconds per forward of one batch (CPU milliseconds for the cpu clock): median, quartiles and
    extremes over the repeats."""

    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    max_ms: float
    images_per_s: float
    times_ms: list[float] = field(default_factory=list)

    @classmethod
    def from_times(cls, times_ms: Sequence[float], batch_size: int) -> "Timing":
        q1, median, q3 = quartiles(times_ms)
        return cls(
            median_ms=median,
            q1_ms=q1,
            q3_ms=q3,
            min_ms=min(times_ms),
            max_ms=max(times_ms),
            images_per_s=batch_size * 1000.0 / median,
            times_ms=list(times_ms),
        )


@dataclass(frozen=True)
class BenchResult:
    """One plain-versus-CB measurement; ``to_dict`` is the ``cbtool bench --json`` record."""

    model: str
    cb_spec: dict[str, Any]
    device: str
    device_name: str
    threads: int
    batch_size: int
    input_size: list[int]
    amp: bool
    amp_dtype: str | None
    compile: bool
    channels_last: bool
    clock: str
    repeats: int
    warmup: int
    number: int
    plain: Timing
    cb: Timing
    ratio: float
    paired_ratio_q1: float
    paired_ratio_q3: float
    torch_version: str = torch.__version__
    timm_version: str | None = None
    python_version: str = platform.python_version()
    cbtool_version: str = __version__
    created: str = ""

    @property
    def overhead_percent(self) -> float:
        return (self.ratio - 1.0) * 100.0

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "cbtool-bench", "schema_version": SCHEMA_VERSION, **asdict(self)}

    def to_json(self) -> str:
        from cbtool.files import json_text

        return json_text(self.to_dict())

    def table(self) -> str:
        """The two timings and the ratio as a plain-text table."""
        from cbtool.report import format_table

        rows = [
            [name, f"{t.median_ms:.2f}", f"{t.q1_ms:.2f}-{t.q3_ms:.2f}", f"{t.min_ms:.2f}-{t.max_ms:.2f}",
             f"{t.images_per_s:.1f}"]
            for name, t in (("plain", self.plain), (f"{self.cb_spec['variant']}", self.cb))
        ]
        unit = "cpu ms" if self.clock == "cpu" else "ms"
        table = format_table(["model", f"median {unit}", f"IQR {unit}", f"min-max {unit}", "img/s"], rows,
                             align=["<", ">", ">", ">", ">"])
        return (
            f"{table}\n"
            f"ratio {self.cb_spec['variant']}/plain: {self.ratio:.4f} ({self.overhead_percent:+.2f}%), "
            f"per-repeat ratios IQR {self.paired_ratio_q1:.4f}-{self.paired_ratio_q3:.4f}"
        )

    def describe(self) -> str:
        """One line saying what was measured and where."""
        size = "x".join(str(s) for s in self.input_size)
        extras = [name for name, on in (("amp " + str(self.amp_dtype), self.amp), ("compile", self.compile),
                                        ("channels_last", self.channels_last)) if on]
        return (
            f"{self.model}: batch {self.batch_size} x {size} on {self.device} ({self.device_name}, "
            f"{self.threads} threads), torch {self.torch_version}{', ' + ', '.join(extras) if extras else ''}; "
            f"{self.repeats} repeats of {self.number} forward(s) after {self.warmup} warm-up, {self.clock} clock"
        )


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(q1, median, q3), interpolated between order statistics; a single value is all three."""
    values = sorted(float(v) for v in values)
    if not values:
        raise ValueError("no values")
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def measure_overhead(
    model: nn.Module,
    spec: CBSpec | None = None,
    *,
    batch_size: int = 32,
    input_size: Sequence[int] | None = None,
    device: str | torch.device | None = None,
    amp: bool = False,
    amp_dtype: str | None = None,
    compile: bool = False,
    channels_last: bool = False,
    repeats: int = 20,
    warmup: int = 3,
    number: int | None = None,
    max_seconds: float | None = None,
    clock: str = "wall",
    threads: int | None = None,
    label: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> BenchResult:
    """Time ``model`` against a deep copy of it with CB injected as ``spec`` says, in alternating repeats.

    input_size: (C, H, W); by default ``model.cbtool_data_config['input_size']``.
    number: forwards per timed repeat; by default enough for about 50 ms.
    max_seconds: stop repeating once the timed repeats have taken this long (``MIN_REPEATS`` at least);
        ``result.repeats`` says how many ran.
    amp: autocast to ``amp_dtype``, by default bf16 (fp16 on a GPU without bf16, and on MPS).
    clock: ``wall`` (CUDA events on a GPU) or, on the CPU only, ``cpu``: the process's CPU time, which
        other processes on a shared machine disturb far less than the wall clock.
    threads: intra-op CPU threads for the measurement (restored afterwards); by default torch's setting.

    ``model`` is moved to ``device`` (and to ``channels_last``) in place and otherwise left as it was.
    """
    from cbtool.families import detect
    from cbtool.models.fit import check_input_size
    from cbtool.surgery import inject, require_plain, spec_of

    spec = spec or CBSpec()
    for name, value, least in (("batch_size", batch_size, 1), ("repeats", repeats, 1), ("warmup", warmup, 0),
                               ("number", number, 1), ("threads", threads, 1)):
        if value is not None and int(value) < least:
            raise CbtoolError(f"{name} must be at least {least}, got {value}")
    if max_seconds is not None and not max_seconds > 0:
        raise CbtoolError(f"max_seconds must be positive, got {max_seconds}")
    if clock not in CLOCKS:
        raise CbtoolError(f"unknown clock {clock!r}: choose one of {', '.join(CLOCKS)}")
    existing = spec_of(model)
    hint = "" if existing is None else f", e.g. {plain_bench_command(model, existing)}"
    require_plain(model, f"bench injects CB itself: pass the plain source instead{hint}")
    input_size = _input_size(model, input_size)
    check_input_size(model, input_size, label or type(model).__name__, option="the input size")  # before any forward
    device = pick_device(str(device) if device is not None else None)
    if clock == "cpu" and device.type != "cpu":
        raise CbtoolError(f"the cpu clock measures CPU time and needs device cpu, not {device}; use the wall clock")
    autocast_dtype = _autocast_dtype(device, amp, amp_dtype)

    plain = model.to(device).eval()
    cb_model = inject(copy.deepcopy(plain), spec).eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        plain = plain.to(memory_format=memory_format)
        cb_model = cb_model.to(memory_format=memory_format)
    generator = torch.Generator().manual_seed(0)
    family = detect(plain)
    with memory_guard("--batch-size", batch_size):
        images = torch.randn(batch_size, *input_size, generator=generator).to(device, memory_format=memory_format)
        inputs = family.model_inputs(plain, images)  # converted once, outside the timed forwards (SigLIP2's patches)
    del images  # SigLIP2's patches are a copy
    runners = {"plain": family.entry(plain), "cb": family.entry(cb_model)}  # CLIPModel & co: the vision tower
    if compile:
        runners = {name: torch.compile(module) for name, module in runners.items()}

    previous_threads = torch.get_num_threads()
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if amp else nullcontext()
    try:
        if threads is not None:
            torch.set_num_threads(int(threads))
        used_threads = torch.get_num_threads()
        with torch.inference_mode(), autocast, memory_guard("--batch-size", batch_size):
            times, number = _alternate(runners, inputs, device, clock, repeats=repeats, warmup=warmup,
                                       number=number, max_seconds=max_seconds, compile=compile,
                                       variant=spec.variant, say=progress or (lambda _message: None))
    finally:
        torch.set_num_threads(previous_threads)

    plain_timing = Timing.from_times(times["plain"], batch_size)
    cb_timing = Timing.from_times(times["cb"], batch_size)
    paired_q1, _, paired_q3 = quartiles([c / p for c, p in zip(times["cb"], times["plain"])])
    return BenchResult(
        model=label or _label(model),
        cb_spec=spec.to_dict(),
        device=str(device),
        device_name=device_name(device),
        threads=used_threads,
        batch_size=int(batch_size),
        input_size=[int(s) for s in input_size],
        amp=bool(amp),
        amp_dtype=str(autocast_dtype).removeprefix("torch.") if amp else None,
        compile=bool(compile),
        channels_last=bool(channels_last),
        clock=clock,
        repeats=len(times["plain"]),
        warmup=int(warmup),
        number=int(number),
        plain=plain_timing,
        cb=cb_timing,
        ratio=cb_timing.median_ms / plain_timing.median_ms,
        paired_ratio_q1=paired_q1,
        paired_ratio_q3=paired_q3,
        timm_version=_timm_version(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def _alternate(
    runners: dict[str, nn.Module], inputs: tuple[tuple, dict], device: torch.device, clock: str, *, repeats: int,
    warmup: int, number: int | None, max_seconds: float | None, compile: bool, variant: str,
    say: Callable[[str], None],
) -> tuple[dict[str, list[float]], int]:
    """Warm up, then time the runners in turn; milliseconds per forward for each, and the forwards per repeat."""
    say(f"warm-up: {warmup} forward(s) per model{' (compiling first)' if compile else ''}")
    single = None
    for _ in range(max(warmup, 1 if compile else 0)):
        for name, module in runners.items():
            seconds = _time(module, inputs, device, 1, clock)
            single = seconds if name == "plain" else single
    if number is None:
        if single is None:
            single = _time(runners["plain"], inputs, device, 1, clock)
        number = max(1, math.ceil(MIN_REPEAT_S / max(single, 1e-6)))
    times: dict[str, list[float]] = {name: [] for name in runners}
    spent = 0.0
    for index in range(repeats):
        for name, module in runners.items():
            seconds = _time(module, inputs, device, number, clock)
            times[name].append(seconds * 1000.0 / number)
            spent += seconds
        say(f"repeat {index + 1}/{repeats}: plain {times['plain'][-1]:.2f} ms, {variant} {times['cb'][-1]:.2f} ms")
        if max_seconds is not None and spent >= max_seconds and index + 1 >= min(MIN_REPEATS, repeats):
            say(f"stopping after {index + 1} repeats: {spent:.1f} s >= max_seconds {max_seconds:g}")
            break
    return times, number


def _time(module: nn.Module, inputs: tuple[tuple, dict], device: torch.device, number: int, clock: str = "wall") -> float:
    """Seconds for ``number`` forwards on ``inputs`` (positional and keyword arguments), waiting for the device."""
    args, kwargs = inputs
    if device.type == "cuda":
        # Events are recorded on the current stream of ``device``: that is where the forwards run.
        stream = torch.cuda.current_stream(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record(stream)
        for _ in range(number):
            module(*args, **kwargs)
        end.record(stream)
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    now = time.process_time if clock == "cpu" else time.perf_counter
    synchronize(device)
    begin = now()
    for _ in range(number):
        module(*args, **kwargs)
    synchronize(device)
    return now() - begin


def plain_bench_command(model: nn.Module, spec: CBSpec) -> str:
    """The ``cbtool bench`` command that times ``model``'s architecture with the CB it has: its source with
    the same architecture options, random weights (the timing does not depend on them, and nothing is downloaded)."""
    import ast
    import shlex

    record = provenance.source_of(model) or {}
    if record.get("library") == "timm":
        words = [record["model_name"], "--no-pretrained"]
        kwargs = record.get("model_kwargs") or {}
        if kwargs:
            def text(value: Any) -> str:  # what parse_model_kwargs reads back as the same value
                try:
                    same = isinstance(value, str) and ast.literal_eval(value) == value
                except (ValueError, SyntaxError):
                    same = isinstance(value, str)
                return value if same else repr(value)
            words += ["--model-kwargs", *(f"{key}={text(value)}" for key, value in sorted(kwargs.items()))]
    else:
        words = [str(record.get("origin") or "MODEL"), "--no-pretrained"]
    words += ["--variant", spec.variant, "--position", spec.position, "--layers", str(spec.layers)]
    return "cbtool bench " + " ".join(shlex.quote(word) for word in words)


def _input_size(model: nn.Module, input_size: Sequence[int] | None) -> tuple[int, ...]:
    if input_size is None:
        config = provenance.data_config_of(model) or {}
        input_size = config.get("input_size")
        if input_size is None:
            raise CbtoolError(
                f"cannot tell the input size of {type(model).__name__}: pass input_size=(3, H, W) "
                "or build the model with cbtool.models.resolve.resolve"
            )
    if len(input_size) != 3 or any(int(s) < 1 for s in input_size):
        raise CbtoolError(f"input_size must be (channels, height, width), got {tuple(input_size)}")
    return tuple(int(s) for s in input_size)


def _autocast_dtype(device: torch.device, amp: bool, requested: str | None) -> torch.dtype | None:
    if not amp:
        if requested is not None:
            raise CbtoolError("amp_dtype needs amp=True")
        return None
    if requested is not None:
        if requested not in AMP_DTYPES:
            raise CbtoolError(f"unknown amp dtype {requested!r}: choose one of {', '.join(AMP_DTYPES)}")
        return AMP_DTYPES[requested]
    return amp_dtype(device)


def _label(model: nn.Module) -> str:
    source = provenance.source_of(model) or {}
    return str(source.get("origin") or source.get("model_name") or type(model).__name__)


def _timm_version() -> str | None:
    try:
        import timm
    except ImportError:
        return None
    return timm.__version__


def device_name(device: torch.device) -> str:
    """A human-readable name for ``device``: the GPU model, or the CPU model and its logical core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple {platform.machine()} (MPS)"
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name}, {os.cpu_count()} logical CPUs"
