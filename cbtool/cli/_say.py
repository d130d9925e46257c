"""What a command tells the user about its outputs: one ``wrote PATH`` line on stderr per file it wrote."""

from __future__ import annotations

import os
import sys


def wrote(path: str | os.PathLike[str], *, quiet: bool = False, detail: str | None = None) -> None:
    """``wrote PATH`` (``: detail`` when given) on stderr, unless ``quiet``: every command says so for each output."""
    if not quiet:
        print(f"wrote {path}" + (f": {detail}" if detail else ""), file=sys.stderr, flush=True)
