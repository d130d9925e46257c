"""Import paths of modules moved in 0.3, kept working for one release (deprecated).

``import cbtool.sources`` (or ``from cbtool.checkpoint import load``) gives the very module now at its new path,
so the old and new names are the same objects and patching either patches both. The old files are gone rather
than left as re-export stubs, so that version control follows each file to its new place.
"""

from __future__ import annotations

import sys
from importlib import import_module
from importlib.abc import Loader, MetaPathFinder
from importlib.machinery import ModuleSpec

MOVED = {
    "cbtool.sources": "cbtool.models.resolve",
    "cbtool.fit": "cbtool.models.fit",
    "cbtool.architectures": "cbtool.models.architectures",
    "cbtool.provenance": "cbtool.models.provenance",
    "cbtool.hub": "cbtool.models.hub",
    "cbtool.checkpoint": "cbtool.models.checkpoint",
    "cbtool.metadata_check": "cbtool.models.metadata",
    "cbtool.tables": "cbtool.report.tables",
    "cbtool.plotting": "cbtool.report.plotting",
    "cbtool.viz.page": "cbtool.report.page",
    "cbtool.viz.svg": "cbtool.report.svg",
}


class _OldPath(MetaPathFinder, Loader):
    """Finds an old path and hands the import system the module at its new one."""

    def find_spec(self, fullname: str, path=None, target=None) -> ModuleSpec | None:
        return ModuleSpec(fullname, self) if fullname in MOVED else None

    def create_module(self, spec: ModuleSpec) -> None:
        return None  # a throwaway module: exec_module swaps in the real one

    def exec_module(self, module) -> None:
        # The import system returns whatever sys.modules holds under the name once this returns.
        sys.modules[module.__name__] = import_module(MOVED[module.__name__])


def install() -> None:
    """Put the old-path finder first on ``sys.meta_path``, once."""
    if not any(isinstance(finder, _OldPath) for finder in sys.meta_path):
        sys.meta_path.insert(0, _OldPath())  # before any path finder that could still see an old file
