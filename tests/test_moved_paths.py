"""Old import paths of modules moved into ``cbtool.models`` and ``cbtool.report`` keep working for one release."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

# Every module moved in 0.2.0: its old path (a deprecated alias file) and where it lives now.
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

# Public names each old path had, checked by identity against the new module.
NAMES = {
    "cbtool.sources": ["resolve", "parse_model_kwargs", "set_num_classes", "timm_data_config", "check_input_size"],
    "cbtool.fit": ["check_input_size", "check_finite_weights", "has_trained_weights", "unreadable_message"],
    "cbtool.architectures": ["rebuild", "choose_architecture", "HF_ARCHITECTURES"],
    "cbtool.provenance": [],
    "cbtool.hub": ["hub_access"],
    "cbtool.checkpoint": ["load", "save", "describe", "read_header", "read_metadata", "atomic_path", "unwrap"],
    "cbtool.metadata_check": ["check_data_config", "check_source", "INTERPOLATIONS"],
    "cbtool.tables": ["format_value", "format_table", "markdown_table", "format_p", "delta", "_table"],
    "cbtool.plotting": ["pyplot", "model_colours", "PALETTE", "colour"],
    "cbtool.viz.page": ["report_page", "write_report_page", "generic_tables", "density_section"],
    "cbtool.viz.svg": ["line_chart"],
}


def test_every_moved_path_is_listed():
    from pathlib import Path

    assert sorted(NAMES) == sorted(MOVED)
    root = Path(__file__).resolve().parents[1]
    for old in MOVED:  # each old path is a file of its own, marked deprecated, that names its new place
        text = (root / (old.replace(".", "/") + ".py")).read_text()
        assert text.startswith('"""Deprecated: moved to') and MOVED[old] in text


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_path_is_the_new_module(old):
    new = importlib.import_module(MOVED[old])
    assert importlib.import_module(old) is new
    parent, _, child = old.rpartition(".")
    assert getattr(importlib.import_module(parent), child) is new
    for name in NAMES[old]:
        assert getattr(importlib.import_module(old), name) is getattr(new, name)


def test_from_import_of_old_paths():
    from cbtool.checkpoint import load
    from cbtool.models.checkpoint import load as new_load
    from cbtool.sources import resolve
    from cbtool.models.resolve import resolve as new_resolve
    from cbtool import provenance
    from cbtool.models import provenance as new_provenance

    assert load is new_load and resolve is new_resolve and provenance is new_provenance


def test_report_package_keeps_the_old_module_names():
    import cbtool.report as report
    from cbtool.report import summaries

    assert set(report.__all__) <= set(dir(summaries))
    for name in report.__all__ + ["_table", "_plot_scales"]:
        assert getattr(report, name) is getattr(summaries, name)
    with pytest.raises(AttributeError):
        report.no_such_name  # noqa: B018


def test_importing_the_new_packages_imports_nothing_heavy():
    code = ("import sys, cbtool.models, cbtool.report, cbtool.tables, cbtool.viz.page; "
            "print(sorted(m for m in ('torch', 'timm', 'transformers', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
