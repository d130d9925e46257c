"""Wires the command modules into one Typer app and turns user errors into one line on stderr."""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

import typer

from cbtool import __version__
from cbtool.cli import bench, check, compare, eval as eval_cmd, families, finetune, info, inject, report_page, sweep, viz
from cbtool.ranges import check_int_options

app = typer.Typer(
    name="cbtool",
    help="Context Broadcasting for Vision Transformers: inject, evaluate, fine-tune, and guard in CI.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


# Where a KeyboardInterrupt would do harm: the import machinery, and the code that forks workers.
_UNSAFE = ("<frozen importlib", "popen_fork.py", "popen_forkserver.py", "popen_spawn_posix.py")


@contextmanager
def sigint_outside_imports() -> Iterator[None]:
    """Ctrl-C raises ``KeyboardInterrupt`` as usual, except while a module is being imported or a worker forked:
    numpy, torch and timm are not safe to stop half-way (a half-imported numpy, or a C++ abort), and CPython
    drops an exception raised in a fork hook. Then the signal is sent again every 50 ms until that is done.
    Commands keep their lazy imports (and their fast errors)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return

    owner = os.getpid()

    def handler(signum, frame):
        while frame is not None and os.getpid() == owner:  # forked workers stop at once (torch expects that)
            if frame.f_code.co_filename.startswith(_UNSAFE[0]) or frame.f_code.co_filename.endswith(_UNSAFE[1:]):
                threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
                return
            frame = frame.f_back
        # Stopping now: workers and their helper threads end mid-handshake, and their noise must not bury the one line.
        threading.excepthook = sys.unraisablehook = lambda _: None
        sys.excepthook = lambda *_: None  # multiprocessing's fd-sharing thread reports through this one
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGINT) is handler:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def interruptible(command: Callable) -> Callable:
    """Ctrl-C in ``command`` becomes an ``Interrupted`` error (exit 130) that says which files were written.

    Typer would turn it into a silent exit 130; the command itself may raise a more precise ``Interrupted``.
    """

    @functools.wraps(command)
    def run(*args, **kwargs):
        from cbtool import files
        from cbtool.errors import Interrupted

        files.written.clear()
        check_int_options(kwargs)  # every integer option against its range in cbtool.ranges, before any work
        try:
            with sigint_outside_imports():
                return command(*args, **kwargs)
        except KeyboardInterrupt:
            done = ", ".join(str(path) for path in files.written)
            raise Interrupted(f"interrupted; wrote {done} before stopping" if done else "interrupted; nothing was written") from None

    return run


for _name, _command in (("inject", inject.inject_command), ("info", info.info_command), ("eval", eval_cmd.eval_command),
                        ("finetune", finetune.finetune_or_submit), ("sweep", sweep.sweep_command),
                        ("check", check.check_command),
                        ("compare", compare.compare_command), ("bench", bench.bench_command),
                        ("families", families.families_command), ("viz", viz.viz_command),
                        ("report", report_page.report_command)):  # fmt: skip
    app.command(_name)(interruptible(_command))


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"cbtool {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True, help="Show the version and exit."),
) -> None:
    """Context Broadcasting for Vision Transformers."""


# Options that, as in timm's scripts, take several space-separated values after one flag: key=value pairs,
# or (PATH_OPTIONS) every following argument up to the next option.
MULTI_VALUE_OPTIONS = ("--model-kwargs", "--images", "--pictures")
PATH_OPTIONS = ("--images", "--pictures")


def expand_multi_value_options(argv: list[str]) -> list[str]:
    """``--model-kwargs a=1 b=2`` -> ``--model-kwargs a=1 --model-kwargs b=2`` (Typer takes one value per flag)."""
    expanded: list[str] = []
    current: str | None = None
    for arg in argv:
        if arg in MULTI_VALUE_OPTIONS:
            current = arg
            continue
        if current is not None and ("=" in arg or current in PATH_OPTIONS) and not arg.startswith("-"):
            expanded += [current, arg]
            continue
        if current is not None and not expanded[-2:-1] == [current]:
            expanded.append(current)  # let Typer report the missing value
        current = None
        expanded.append(arg)
    if current is not None and expanded[-2:-1] != [current]:
        expanded.append(current)
    return expanded


def main(argv: list[str] | None = None) -> None:
    """Console entry point: known errors become one line on stderr (``CBTOOL_DEBUG=1`` shows the traceback); any
    other exception is a bug in cbtool: its traceback, then where to report it (exit 70)."""
    from cbtool.errors import CbtoolError

    args = expand_multi_value_options(list(sys.argv[1:] if argv is None else argv))
    try:
        app(args=args, prog_name="cbtool")  # standalone: Typer reports usage errors itself (exit 2)
    except SystemExit:
        if argv is None:  # the process is ending (not a caller's main([...])): a late Ctrl-C must not read as success
            exit_on_late_sigint()
        raise
    except CbtoolError as error:
        if error.exit_code == 130:  # interrupted: a further Ctrl-C must not cut the message or the exit short
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        if os.environ.get("CBTOOL_DEBUG"):
            raise
        print(f"cbtool: {error.prefix}{error}", file=sys.stderr)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:  # between commands, or in Typer itself
        print("cbtool: interrupted; nothing was written", file=sys.stderr)
        sys.exit(130)
    except Exception:  # not a user error: a bug, shown with its traceback and where to report it
        if os.environ.get("CBTOOL_DEBUG"):
            raise
        import traceback

        from cbtool.errors import BUG_EXIT_CODE, BUG_REPORT_HINT

        traceback.print_exc()
        print(f"cbtool: {BUG_REPORT_HINT}", file=sys.stderr)
        sys.exit(BUG_EXIT_CODE)


def exit_on_late_sigint() -> None:
    """From now on, Ctrl-C ends the process at once with exit 130 and one line, instead of a KeyboardInterrupt
    that an atexit callback (worker shutdown, joining threads) would report as "Exception ignored" before exit 0."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame) -> None:
        from cbtool import files

        try:
            sys.stdout.flush()
        except (OSError, ValueError):
            pass
        done = ", ".join(str(path) for path in files.written)
        line = f"cbtool: interrupted while exiting; wrote {done} before" if done else "cbtool: interrupted while exiting"
        os.write(2, (line + "\n").encode())
        os._exit(130)

    signal.signal(signal.SIGINT, handler)
