"""``cbtool compare`` as a library: results files side by side, and the differences of each model from the first.

:func:`compare_results` gathers what the tables need (``report.comparison_text`` renders it);
:func:`compare` returns the JSON record that ``cbtool compare --json`` writes. No torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cbtool.check.rules import DEFAULT_RULES
from cbtool.check.stats import discordant_counts, mcnemar_test, paired_top1_test
from cbtool.check.verdicts import check_results
from cbtool.errors import CbtoolError
from cbtool.report import difference_rows, label_models
from cbtool.robustness.render import robustness_differences
from cbtool.results import SCHEMA_VERSION, dataset_mismatches, is_number, validate_results


@dataclass
class Comparison:
    """Every model of the compared files (the first is the reference) and what sets them apart."""

    files: list[str]
    models: list[dict[str, Any]]  # results ``models`` entries, labelled across files (``report.label_models``)
    same_samples: bool
    notes: list[str]
    p_values: list[float | None] | None  # McNemar on top1 against the reference, one per later model

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record (what ``cbtool compare --json`` writes)."""
        differences = difference_rows(self.models)
        for index, row in enumerate(differences):
            row["top1_p_value"] = self.p_values[index] if self.p_values is not None else None
        return {
            "kind": "cbtool-compare",
            "schema_version": SCHEMA_VERSION,
            "files": list(self.files),
            "same_samples": self.same_samples,
            "notes": list(self.notes),
            "models": [_summary(m) for m in self.models],
            "differences": differences,
            "robustness_differences": self.robustness_differences(),
        }

    def top1_checks(self, *, allow_mismatch: bool = False, alpha: float = 0.05) -> list[Any]:
        """What ``cbtool check LATER REFERENCE`` says of each later model's top-1 under its default rule: a
        ``MetricCheck`` (p-value, test, verdict) per later model, None where a top-1 is missing. Different
        datasets are refused as ``check`` refuses them, unless ``allow_mismatch``."""
        rules = [rule for rule in DEFAULT_RULES if rule.metric == "top1"]
        reference = self.models[0]
        checks = []
        for model in self.models[1:]:
            if not (is_number(model["metrics"].get("top1")) and is_number(reference["metrics"].get("top1"))):
                checks.append(None)
                continue
            report = check_results(_single(model), _single(reference), rules, alpha, allow_mismatch=allow_mismatch,
                                   results_name=model["file"], baseline_name=reference["file"])
            checks.append(report.checks[0])
        return checks

    def robustness_differences(self) -> list[dict[str, Any]]:
        """``report.robustness_differences``, with McNemar p-values per cell (``cell_p_values[c][s]``)
        when all files scored the same samples."""
        rows = robustness_differences(self.models)
        robust = [m for m in self.models if m.get("robustness")]
        for row, model in zip(rows, robust[1:]):
            row["cell_p_values"] = _cell_p_values(robust[0], model) if self.same_samples else None
        return rows


def _cell_p_values(reference: Mapping[str, Any], other: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """McNemar p-values per corruption cell that both models scored with per-sample correctness."""
    ref, cur = reference["robustness"].get("correct") or {}, other["robustness"].get("correct") or {}
    out: dict[str, dict[str, float]] = {}
    for corruption, cells in cur.items():
        for severity, new in (cells or {}).items():
            old = (ref.get(corruption) or {}).get(severity)
            if isinstance(old, str) and isinstance(new, str) and old and len(old) == len(new):
                out.setdefault(corruption, {})[severity] = mcnemar_test(*discordant_counts(old, new)).p_value
    return out


def _single(model: Mapping[str, Any]) -> dict[str, Any]:
    """A results document holding one labelled model (``report.label_models``' entries carry their dataset)."""
    return {"schema_version": SCHEMA_VERSION, "dataset": model["dataset"], "models": [dict(model)]}


def _summary(model: Mapping[str, Any]) -> dict[str, Any]:
    metrics, density, robustness = model["metrics"], model.get("density") or {}, model.get("robustness")
    return {
        "label": model["label"],
        "file": model["file"],
        "num_samples": metrics.get("num_samples"),
        "top1": metrics.get("top1"),
        "top5": metrics.get("top5"),
        "loss": metrics.get("loss"),
        "throughput": metrics.get("throughput"),
        "entropy_mean": density.get("entropy_mean"),
        "distance_mean": density.get("distance_mean"),
        "entropy_per_layer": density.get("entropy_per_layer"),
        "distance_per_layer": density.get("distance_per_layer"),
        "cb_scales": model.get("cb_scales"),
        # The robustness record without its per-sample strings (those stay in the results files).
        "robustness": {k: v for k, v in robustness.items() if k != "correct"} if robustness else None,
    }


def compare_results(documents: Sequence[Mapping[str, Any]], names: Sequence[str] | None = None) -> Comparison:
    """Compare results documents (dicts in the results schema); ``names`` (default ``results1``, ...) name their files.

    Raises :class:`CbtoolError` for a document that is not a results file, or fewer than two models in all.
    """
    names = [f"results{i + 1}" for i in range(len(documents))] if names is None else [str(n) for n in names]
    if len(names) != len(documents):
        raise CbtoolError(f"compare got {len(documents)} documents but {len(names)} names")
    for name, document in zip(names, documents):
        validate_results(document, name)
    models = label_models(list(zip(names, documents)))
    if len(models) < 2:
        raise CbtoolError("compare needs at least two models: give two results files, or one that holds several")

    reference = models[0]
    notes = []
    for model in models[1:]:
        reasons = dataset_mismatches(reference["dataset"], model["dataset"])
        if reasons:
            where = f"{model['label']} was evaluated on other data than {reference['label']}"
            notes.append(f"{where}: {'; '.join(reasons)}")
    sha = reference["dataset"].get("samples_sha256")
    same_samples = bool(sha) and all(m["dataset"].get("samples_sha256") == sha for m in models)
    p_values = None
    if same_samples:
        tests = [paired_top1_test(reference, model) for model in models[1:]]
        if any(test is not None for test in tests):
            p_values = [test.p_value if test is not None else None for test in tests]
    return Comparison(names, models, same_samples, notes, p_values)


def compare(documents: Sequence[Mapping[str, Any]], names: Sequence[str] | None = None) -> dict[str, Any]:
    """The ``cbtool compare --json`` record of ``documents`` (see :func:`compare_results`)."""
    return compare_results(documents, names).to_dict()
