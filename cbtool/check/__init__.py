"""Regression verdicts (``cbtool check``) and side-by-side comparisons (``cbtool compare``) of results files.

``stats``: McNemar's test, two-proportion tests and intervals, the paired t-test; ``rules``: the checkable metrics and the
``--max-drop top1=0.5`` grammar; ``verdicts``: a results file against a baseline; ``comparison``: several
results side by side. Reading results files is ``cbtool.results``'s, rendering ``cbtool.report``'s. No torch.
"""

from __future__ import annotations

from cbtool.check.comparison import Comparison, compare, compare_results
from cbtool.check.rules import (
    ALIASES, DEFAULT_RULES, DROP, METRICS, RISE, MetricInfo, Rule, metric_info, parse_rules, robustness_cell,
)  # fmt: skip
from cbtool.check.stats import (
    TestResult,
    binomial_two_sided_p,
    chi2_1df_sf,
    discordant_counts,
    mcnemar_test,
    paired_proportion_interval,
    paired_t_test,
    paired_top1_test,
    regularized_beta,
    student_t_two_sided_p,
    two_proportion_interval,
    two_proportion_test,
    wilson_interval,
)
from cbtool.check.verdicts import VERDICTS, CheckReport, Interval, MetricCheck, check_results, pair_models
from cbtool.results import SCHEMA_VERSION, dataset_mismatches, load_results, validate_results

__all__ = [
    "ALIASES", "DEFAULT_RULES", "DROP", "METRICS", "RISE", "SCHEMA_VERSION", "VERDICTS",
    "CheckReport", "Comparison", "Interval", "MetricCheck", "MetricInfo", "Rule", "TestResult",
    "binomial_two_sided_p", "check_results", "chi2_1df_sf", "compare", "compare_results", "dataset_mismatches",
    "discordant_counts", "load_results", "mcnemar_test", "metric_info", "robustness_cell",
    "paired_proportion_interval", "paired_t_test", "paired_top1_test", "regularized_beta", "student_t_two_sided_p",
    "pair_models", "parse_rules", "two_proportion_interval", "two_proportion_test", "validate_results",
    "wilson_interval",
]  # fmt: skip
