"""A sweep's summary, rebuilt from its folders: per cell the mean and standard deviation over seeds, and each cell
against ``plain`` of the same seeds (a paired t-test over seeds, McNemar on the pooled paired predictions), with
the verdict in words. ``summary.json``'s layout; no torch."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from cbtool.errors import CbtoolError
from cbtool.sweep.plan import CORRUPTIONS_FILE, EVAL_FILE, PLAIN, Cell, SweepPlan, eval_files

ALPHA = 0.05
# (key, label, kind for tables.format_value, whether higher is better)
METRICS = (
    ("top1", "top-1 (%)", "accuracy", True),
    ("loss", "loss", "loss", False),
    ("entropy_mean", "entropy", "entropy", False),
    ("mce", "mCE", "error", False),
    ("corruption_error", "corruption error (%)", "error", False),
)
KIND = "cbtool-sweep-summary"


def run_metrics(plan: SweepPlan, root: str | Path, run) -> dict[str, Any] | None:
    """A finished run's figures from its eval files (None while it is unfinished)."""
    from cbtool.results import load_results

    folder = run.folder(root)
    if not all((folder / name).is_file() for name in eval_files(plan)):
        return None
    document = load_results(folder / EVAL_FILE)
    model = document["models"][0]
    found = {"top1": model["metrics"].get("top1"), "loss": model["metrics"].get("loss"),
             "entropy_mean": (model.get("density") or {}).get("entropy_mean"),
             "correct": model["metrics"].get("correct"), "dataset": document["dataset"]}  # fmt: skip
    if plan.evaluation.get("corruptions"):
        robustness = load_results(folder / CORRUPTIONS_FILE)["models"][0].get("robustness") or {}
        errors = list((robustness.get("mean_error") or {}).values())
        found["mce"] = robustness.get("mce")
        found["corruption_error"] = sum(errors) / len(errors) if errors else None
    return found


def summarize(plan: SweepPlan, root: str | Path) -> dict[str, Any]:
    """The summary document of the sweep in ``root`` as its folders stand now (unfinished runs are listed)."""
    from cbtool.results import SCHEMA_VERSION

    found = {run.name: run_metrics(plan, root, run) for run in plan.runs}
    _check_same_evaluation(found)
    keys = [key for key, *_ in METRICS if any(m and m.get(key) is not None for m in found.values())]
    cells = []
    for cell in plan.cells:
        seeds = [seed for seed in plan.seeds if found[_name(cell, seed)] is not None]
        values = {key: [found[_name(cell, seed)][key] for seed in seeds] for key in keys}
        cells.append({**cell.to_dict(), "seeds": seeds,
                      "metrics": {key: spread(values[key]) for key in keys}})  # fmt: skip
    baseline = next((cell for cell in plan.cells if cell.variant == PLAIN), None)
    comparisons = [compare_cells(plan, found, baseline, cell, keys) for cell in plan.cells
                   if baseline is not None and cell is not baseline]  # fmt: skip
    runs = {run.name: {"cell": run.cell.name, "seed": run.seed, "finished": found[run.name] is not None,
                       **{key: (found[run.name] or {}).get(key) for key in keys}} for run in plan.runs}  # fmt: skip
    dataset = next((m["dataset"] for m in found.values() if m), None)
    notes = [] if baseline is not None else ["no baseline: the grid has no 'plain' variant (add plain to --variants)"]
    return {"schema_version": SCHEMA_VERSION, "kind": KIND, "sweep": plan.identity(), "evaluated_on": dataset,
            "metrics": keys, "cells": cells, "baseline": PLAIN if baseline is not None else None,
            "comparisons": comparisons, "runs": runs,
            "missing": [name for name, m in found.items() if m is None], "notes": notes}  # fmt: skip


def _name(cell: Cell, seed: int) -> str:
    return f"{cell.name}-seed{seed}"


def spread(values: list[float | None]) -> dict[str, Any]:
    """Mean and sample standard deviation (n - 1; None below two values) of the values that are known."""
    known = [v for v in values if v is not None]
    return {"mean": statistics.fmean(known) if known else None,
            "std": statistics.stdev(known) if len(known) > 1 else None, "n": len(known),
            "values": list(values)}  # fmt: skip


def compare_cells(plan: SweepPlan, found: dict, baseline: Cell, cell: Cell, keys: list[str]) -> dict[str, Any]:
    """``cell`` against ``baseline`` on the seeds both finished: per metric the mean paired difference and a paired
    t-test over seeds; McNemar on top-1 over the predictions of all those seeds pooled; and the verdict."""
    from cbtool.check.stats import discordant_counts, mcnemar_test, paired_t_test

    seeds = [s for s in plan.seeds if found[_name(cell, s)] is not None and found[_name(baseline, s)] is not None]
    pairs = [(found[_name(baseline, s)], found[_name(cell, s)]) for s in seeds]
    metrics = {}
    for key in keys:
        known = [(a[key], b[key]) for a, b in pairs if a.get(key) is not None and b.get(key) is not None]
        entry: dict[str, Any] = {"difference": statistics.fmean(b - a for a, b in known) if known else None,
                                 "n": len(known), "t": None, "p_value": None}  # fmt: skip
        if len(known) >= 2:
            test = paired_t_test([a for a, _ in known], [b for _, b in known])
            tied = math.isnan(test.p_value)  # the same nonzero difference on every seed: no spread to test by
            entry.update(t=test.statistic, df=len(known) - 1, p_value=None if tied else test.p_value, tied=tied)
        metrics[key] = entry
    mcnemar = None
    strings = [(a.get("correct"), b.get("correct")) for a, b in pairs]
    if strings and all(x and y and len(x) == len(y) for x, y in strings):
        b, c = discordant_counts("".join(x for x, _ in strings), "".join(y for _, y in strings))
        test = mcnemar_test(b, c)
        mcnemar = {"baseline_only": b, "current_only": c, "predictions": sum(len(x) for x, _ in strings),
                   "p_value": test.p_value, "method": test.method}  # fmt: skip
    result = {"cell": cell.name, "baseline": baseline.name, "seeds": seeds, "metrics": metrics, "mcnemar": mcnemar,
              "top1_differences": [b.get("top1") - a.get("top1") for a, b in pairs
                                   if a.get("top1") is not None and b.get("top1") is not None]}  # fmt: skip
    result["verdicts"] = {key: verdict(key, metrics[key], mcnemar if key == "top1" else None) for key in keys}
    result["statement"] = statement(result)
    return result


def verdict(key: str, entry: dict[str, Any], mcnemar: dict | None) -> str:
    """``higher``/``lower`` (beyond noise at p < 0.05), ``within noise``, or ``untested`` (one seed without McNemar,
    or the same difference on every seed, where a t-test has no spread to judge by).

    Over two or more seeds the paired t-test decides, since it sees how much training itself varies; with one
    seed only McNemar can judge top-1, and then only the noise of the evaluation sample.
    """
    if entry["difference"] is None or entry.get("tied"):  # tied: the same difference on every seed, no spread
        return "untested"
    p = entry["p_value"]
    if p is None and mcnemar is not None and entry["n"] < 2:
        p = mcnemar["p_value"]
    if p is None:
        return "untested"
    if p >= ALPHA or entry["difference"] == 0:
        return "within noise"
    return "higher" if entry["difference"] > 0 else "lower"


def statement(comparison: dict[str, Any]) -> str:
    """The comparison in one sentence, e.g. ``cb-mlp vs plain over 3 seeds: top-1 +0.40 points, within noise
    (paired t-test p = 0.412; McNemar on 3,000 pooled predictions p = 0.310); entropy -0.0194, lower (p = 0.012)``."""
    from cbtool.report.tables import format_p, format_value

    seeds = comparison["seeds"]
    head = f"{comparison['cell']} vs {comparison['baseline']}"
    if not seeds:
        return f"{head}: no seed has both runs finished yet"
    parts = []
    for key, label, kind, _ in METRICS:
        entry = comparison["metrics"].get(key)
        if entry is None or entry["difference"] is None:
            continue
        unit = " points" if key == "top1" else ""
        tests = []
        if entry["p_value"] is not None:
            tests.append(f"paired t-test p = {format_p(entry['p_value'])}")
        mcnemar = comparison["mcnemar"] if key == "top1" else None
        if mcnemar is not None:
            tests.append(f"McNemar on {mcnemar['predictions']:,} pooled predictions p = {format_p(mcnemar['p_value'])}")
        words = comparison["verdicts"][key]
        words = "no test" if words == "untested" else words
        if entry.get("tied"):
            tests.insert(0, "the same difference on every seed: no spread for a t-test")
        label = label.split(" (")[0]
        if words == "within noise" and mcnemar is not None and entry["p_value"] is not None and mcnemar["p_value"] < ALPHA:
            signs = {d > 0 for d in comparison.get("top1_differences") or [] if d != 0}
            why = "the seeds disagree in sign" if len(signs) > 1 else f"not significant over {len(seeds)} seeds"
            words = f"within seed noise (McNemar finds the pooled predictions differ, but {why})"
        parts.append(f"{label} {format_value(entry['difference'], kind, signed=True)}{unit}, {words}"
                     + (f" ({'; '.join(tests)})" if tests else ""))  # fmt: skip
    seeds_text = f"over {len(seeds)} seed{'s' if len(seeds) > 1 else ''}"
    text = f"{head} {seeds_text}: " + "; ".join(parts)
    if len(seeds) < 2:
        text += ". A test over seeds needs 2 or more seeds; McNemar alone judges the evaluation sample, not training noise"
    return text


def _check_same_evaluation(found: dict[str, dict | None]) -> None:
    """Every run must have been evaluated on the same samples, or pairing them means nothing."""
    from cbtool.results import dataset_mismatches

    finished = [(name, m) for name, m in found.items() if m is not None]
    for name, metrics in finished[1:]:
        reasons = dataset_mismatches(finished[0][1]["dataset"], metrics["dataset"])
        if reasons:
            raise CbtoolError(f"runs {finished[0][0]} and {name} were evaluated on different data ({'; '.join(reasons)}); "
                              "remove the eval files of the odd one and run the sweep again")  # fmt: skip
