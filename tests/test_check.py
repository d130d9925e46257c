"""``cbtool check``: the statistics, the verdicts, and the exit codes through CliRunner and ``python -m cbtool``."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path
from statistics import NormalDist

import pytest
from typer.testing import CliRunner

from cbtool.check import (
    SCHEMA_VERSION,
    CheckReport,
    Rule,
    binomial_two_sided_p,
    check_results,
    dataset_mismatches,
    load_results,
    mcnemar_test,
    paired_proportion_interval,
    parse_rules,
    two_proportion_interval,
    two_proportion_test,
    wilson_interval,
)
from cbtool.cli.app import app
from cbtool.errors import CbtoolError, OutputError, RegressionError

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# Building results dicts
# --------------------------------------------------------------------------------------------


def paired(n: int, both: int, b: int, c: int) -> tuple[str, str]:
    """Baseline and current correctness over ``n`` samples: ``both`` right in both, ``b`` only in the baseline, ``c`` only now."""
    rest = n - both - b - c
    assert rest >= 0
    return "1" * both + "1" * b + "0" * c + "0" * rest, "1" * both + "0" * b + "1" * c + "0" * rest


def model(
    correct: str,
    label: str = "cb.safetensors",
    *,
    top5: float | None = 99.0,
    loss: float = 0.5,
    entropy: tuple[float, ...] | None = (0.9, 0.6, 0.3),
    distance: tuple[float, ...] = (20.0, 40.0, 60.0),
    throughput: float | None = 1000.0,
) -> dict:
    n = len(correct)
    density = None
    if entropy is not None:
        density = {
            "entropy_mean": sum(entropy) / len(entropy),
            "entropy_per_layer": list(entropy),
            "distance_mean": sum(distance) / len(distance),
            "distance_per_layer": list(distance),
        }
    return {
        "label": label,
        "source": {"library": "timm", "model": "vit_tiny_patch16_224"},
        "cb_spec": {"variant": "cb", "position": "mlp", "layers": "all"},
        "metrics": {
            "num_samples": n,
            "top1": 100.0 * correct.count("1") / n,
            "top5": top5,
            "loss": loss,
            "per_class_top1": {},
            "correct": correct,
            "throughput": None
            if throughput is None
            else {"model_images_per_s": throughput, "end_to_end_images_per_s": throughput * 0.8},
        },
        "density": density,
    }


def results(*models: dict, name: str = "sample", split: str = "test", sha: str | None = None) -> dict:
    n = models[0]["metrics"]["num_samples"]
    return {
        "schema_version": 1,
        "cbtool_version": "0.1.0",
        "created": "2026-11-27T10:00:00+00:00",
        "dataset": {
            "name": name,
            "kind": "sample",
            "split": split,
            "num_samples": n,
            "limit": None,
            "num_classes": 10,
            "samples_sha256": sha or hashlib.sha256(f"{name}/{split}/{n}".encode()).hexdigest(),
            "bad_images": 0,
        },
        "models": list(models),
        "class_names": [str(i) for i in range(10)],
    }


def pair_of(n: int, both: int, b: int, c: int, **current_kwargs) -> tuple[dict, dict]:
    """``(current results, baseline results)`` over the same samples."""
    base, cur = paired(n, both, b, c)
    return results(model(cur, **current_kwargs)), results(model(base))


def write(tmp_path: Path, name: str, obj: dict | str) -> Path:
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


# A real drop: 1000 samples, 92% -> 88%, 80 discordant pairs, 60 of them lost.
REAL_DROP = dict(n=1000, both=860, b=60, c=20)
# Within noise: 100 samples, 90% -> 89%.
NOISY_DROP = dict(n=100, both=87, b=3, c=2)


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "b, c, p, method",
    [
        (10, 0, 2 * 0.5**10, "mcnemar-exact"),
        (0, 10, 2 * 0.5**10, "mcnemar-exact"),
        (0, 0, 1.0, "mcnemar-exact"),
        (3, 2, 1.0, "mcnemar-exact"),
        (5, 15, 2 * sum(math.comb(20, k) for k in range(6)) / 2**20, "mcnemar-exact"),  # = 0.0413894...
        # chi-square with continuity correction: (|30-12|-1)^2/42 = 289/42, P(chi2_1 > 6.881) = 0.0087119
        (30, 12, 0.008711912962379598, "mcnemar-chi2"),
        (60, 20, 1.2986492541972959e-05, "mcnemar-chi2"),  # (40-1)^2/80 = 19.0125
    ],
)
def test_mcnemar_known_values(b, c, p, method):
    result = mcnemar_test(b, c)
    assert result.method == method
    assert result.p_value == pytest.approx(p, rel=1e-9)


def test_mcnemar_statistic_and_exact_threshold():
    assert mcnemar_test(30, 12).statistic == pytest.approx(289 / 42)
    assert mcnemar_test(13, 12).method == "mcnemar-chi2"  # b + c = 25: large enough for chi-square
    assert mcnemar_test(12, 12).method == "mcnemar-exact"
    assert mcnemar_test(30, 12, exact_below=100).p_value == pytest.approx(binomial_two_sided_p(12, 42))
    with pytest.raises(ValueError):
        mcnemar_test(-1, 3)


def test_intervals_against_published_values():
    # Wilson 8/10 and Newcombe (1998) example: 56/70 - 48/80, method 10 gives 0.0524 to 0.3339.
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    assert two_proportion_interval(48, 80, 56, 70) == pytest.approx((0.0524, 0.3339), abs=1e-4)
    # z-test: 920/1000 vs 880/1000 (pooled p = 0.9), z = -2.981.
    assert two_proportion_test(920, 1000, 880, 1000).p_value == pytest.approx(0.0028691127920765, rel=1e-9)
    # Paired, Wald with continuity correction: -0.04 +- (1.96 * sqrt(80 - 40**2/1000) / 1000 + 1/1000).
    half = NormalDist().inv_cdf(0.975) * math.sqrt(80 - 1.6) / 1000 + 0.001
    assert paired_proportion_interval(60, 20, 1000) == pytest.approx((-0.04 - half, -0.04 + half))


@pytest.mark.parametrize("b, c, n", [(19, 8, 500), (5, 0, 100), (6, 0, 100), (60, 20, 1000), (3, 2, 100)])
def test_paired_interval_agrees_with_mcnemar(b, c, n):
    low, high = paired_proportion_interval(b, c, n)
    assert (mcnemar_test(b, c).p_value < 0.05) == (high < 0 or low > 0)


# --------------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "drop, rise, expected",
    [
        ([], [], [Rule("top1", "drop", 0.5)]),
        (["top1=1"], [], [Rule("top1", "drop", 1.0)]),
        (["top1=off", "top5=0.3"], [], [Rule("top5", "drop", 0.3)]),
        ([], ["entropy_mean"], [Rule("top1", "drop", 0.5), Rule("entropy_mean", "rise", 0.02)]),
        (["model_images_per_s=5%"], [], [Rule("top1", "drop", 0.5), Rule("model_images_per_s", "drop", 5.0, True)]),
        ([], ["entropy_per_layer=0.1"], [Rule("top1", "drop", 0.5), Rule("entropy_layer", "rise", 0.1)]),
    ],
)
def test_parse_rules(drop, rise, expected):
    assert parse_rules(drop, rise) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("top3=1", "unknown metric 'top3'"),
        ("top1=", "expects METRIC=VALUE"),
        ("=0.5", "expects METRIC=VALUE"),
        ("top1=abc", "with a number"),
        ("top1=-1", "non-negative"),
        ("top1=5%", "already in percent"),
        ("loss=nan", "non-negative"),
    ],
)
def test_parse_rules_rejects(text, message):
    with pytest.raises(CbtoolError, match=message):
        parse_rules([text])


# --------------------------------------------------------------------------------------------
# Verdicts (library)
# --------------------------------------------------------------------------------------------


def _report(current: dict, baseline: dict, rules=None, **kwargs) -> CheckReport:
    return check_results(current, baseline, rules, **kwargs)


@pytest.mark.parametrize(
    "counts, strict, verdict, test",
    [
        (REAL_DROP, False, "regression", "mcnemar-chi2"),
        (REAL_DROP, True, "regression", "mcnemar-chi2"),
        (NOISY_DROP, False, "noise", "mcnemar-exact"),
        (NOISY_DROP, True, "regression", "mcnemar-exact"),
        (dict(n=1000, both=860, b=20, c=60), False, "improved", "mcnemar-chi2"),
        (dict(n=1000, both=880, b=20, c=20), False, "ok", "mcnemar-chi2"),
        (dict(n=1000, both=900, b=3, c=0), False, "ok", "mcnemar-exact"),  # -0.3 points: within 0.5
    ],
)
def test_top1_verdicts(counts, strict, verdict, test):
    current, baseline = pair_of(**counts)
    report = _report(current, baseline, strict=strict)
    (check,) = report.checks
    assert (check.metric, check.verdict, check.test) == ("top1", verdict, test)
    assert report.passed is (verdict != "regression")
    low, high = check.interval
    assert low <= check.difference <= high


def test_real_drop_numbers():
    current, baseline = pair_of(**REAL_DROP)
    (check,) = _report(current, baseline).checks
    assert (check.baseline, check.current, check.difference) == pytest.approx((92.0, 88.0, -4.0))
    assert check.p_value == pytest.approx(1.2986e-05, rel=1e-3)
    assert check.interval[1] < 0


def test_unpaired_when_datasets_differ_and_mismatch_allowed():
    base, cur = paired(**REAL_DROP)
    current = results(model(cur), sha="a" * 64)
    baseline = results(model(base), sha="b" * 64)
    with pytest.raises(CbtoolError, match=r"different datasets: samples_sha256 'aaaaaaaaaaaa…' vs 'bbbbbbbbbbbb…'"):
        _report(current, baseline)
    report = _report(current, baseline, allow_mismatch=True)
    (check,) = report.checks
    assert check.test == "two-proportion-z" and check.verdict == "regression"
    assert check.p_value == pytest.approx(0.0028691127920765, rel=1e-9)
    assert not report.same_samples and "datasets differ" in report.notes[0]


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"name": "other", "samples_sha256": "e" * 64}, "name 'other' vs 'sample'"),
        ({"split": "validation"}, "split 'validation' vs 'test'"),
        ({"num_samples": 500}, "num_samples 500 vs 1000"),
        ({"samples_sha256": "f" * 64}, "samples_sha256 'ffffffffffff…'"),
    ],
)
def test_mismatched_datasets_refused_with_reason(change, reason):
    current, baseline = pair_of(**REAL_DROP)
    current["dataset"].update(change)
    if "num_samples" in change:  # a consistent file of fewer samples: its own count, correctness and top-1
        metrics = current["models"][0]["metrics"]
        metrics["correct"] = metrics["correct"][: change["num_samples"]]
        metrics.update(num_samples=change["num_samples"],
                       top1=100.0 * metrics["correct"].count("1") / change["num_samples"], top5=100.0)  # fmt: skip
    mismatch = dataset_mismatches(current["dataset"], baseline["dataset"])[0]
    assert mismatch.startswith(reason)
    with pytest.raises(CbtoolError, match="describe different datasets") as info:
        _report(current, baseline)
    assert reason in str(info.value) and "--allow-mismatch" in str(info.value) and "\n" not in str(info.value)
    assert _report(current, baseline, allow_mismatch=True).notes


def test_same_samples_under_another_path_are_the_same_dataset():
    current, baseline = pair_of(**REAL_DROP)
    current["dataset"]["name"] = "/ci/checkout/val-subset"
    assert dataset_mismatches(current["dataset"], baseline["dataset"]) == []
    assert not _report(current, baseline).notes


@pytest.mark.parametrize(
    "rule, current_kwargs, verdicts",
    [
        (Rule("entropy_mean", "rise", 0.02), dict(entropy=(0.95, 0.65, 0.35)), ["regression"]),  # +0.05
        (Rule("entropy_mean", "rise", 0.02), dict(entropy=(0.91, 0.61, 0.31)), ["ok"]),  # +0.01
        (Rule("entropy_mean", "rise", 0.02), dict(entropy=(0.8, 0.5, 0.2)), ["improved"]),  # -0.1
        (Rule("entropy_layer", "rise", 0.05), dict(entropy=(0.9, 0.7, 0.3)), ["ok", "regression", "ok"]),
        (Rule("distance_layer", "drop", 2.0), dict(distance=(20.0, 37.0, 61.0)), ["ok", "regression", "ok"]),
        (Rule("loss", "rise", 0.02), dict(loss=0.55), ["regression"]),
        (Rule("model_images_per_s", "drop", 5.0, True), dict(throughput=940.0), ["regression"]),
        (Rule("model_images_per_s", "drop", 5.0, True), dict(throughput=960.0), ["ok"]),
        (Rule("end_to_end_images_per_s", "drop", 5.0, True), dict(throughput=1100.0), ["improved"]),
    ],
)
def test_other_metric_verdicts(rule, current_kwargs, verdicts):
    current, baseline = pair_of(n=100, both=90, b=0, c=0, **current_kwargs)
    report = _report(current, baseline, [rule])
    assert [c.verdict for c in report.checks] == verdicts
    assert all(c.p_value is None and c.interval is None for c in report.checks)
    if rule.metric.endswith("_layer"):
        assert [c.metric for c in report.checks] == [f"{rule.metric}[{i}]" for i in range(3)]


def test_a_non_finite_metric_is_bad_input_not_a_verdict():
    """cbtool eval refuses to write NaN, so a NaN loss is a broken or edited file (issue 24): exit 2, not 1."""
    current, baseline = pair_of(n=100, both=90, b=0, c=0, loss=float("nan"))
    with pytest.raises(CbtoolError, match=r"models\[0\]\.metrics\.loss is nan, not a finite number"):
        _report(current, baseline, [Rule("loss", "rise", 0.02)])


def test_boundary_change_is_within_bounds():
    # 92.1 - 91.6 is 0.5000000000000142 in floating point; a 0.5 bound must still accept it.
    current, baseline = pair_of(n=1000, both=900, b=0, c=0)
    baseline["models"][0]["metrics"].update(top1=92.1, correct=None)
    current["models"][0]["metrics"].update(top1=91.6, correct=None)
    assert _report(current, baseline, strict=True).checks[0].verdict == "ok"


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r["models"][0].update(density=None), "no attention density for entropy_mean; evaluate with --density"),
        (lambda r: r["models"][0]["metrics"].update(throughput=None), "no model_images_per_s"),
        (lambda r: r.update(schema_version=99), "schema_version 99"),
        (lambda r: r.pop("models"), "'models' is missing"),
        (lambda r: r["models"][0]["metrics"].update(correct="01x"), "string of 0s and 1s"),
    ],
)
def test_unusable_input_is_a_user_error(mutate, message):
    current, baseline = pair_of(n=100, both=90, b=0, c=0)
    mutate(current)
    rules = [Rule("entropy_mean", "rise", 0.02), Rule("model_images_per_s", "drop", 5, True)]
    with pytest.raises(CbtoolError, match=message):
        _report(current, baseline, rules)


@pytest.mark.parametrize("alpha", [0, 1, -0.1, 1.5])
def test_alpha_must_be_a_probability(alpha):
    current, baseline = pair_of(n=100, both=90, b=0, c=0)
    with pytest.raises(CbtoolError, match="alpha"):
        _report(current, baseline, alpha=alpha)


def test_models_paired_by_label_or_selected():
    base_a, cur_a = paired(**REAL_DROP)
    base_b, cur_b = paired(n=1000, both=900, b=0, c=0)
    current = results(model(cur_a, "plain"), model(cur_b, "cb"))
    baseline = results(model(base_b, "cb"), model(base_a, "plain"))
    report = _report(current, baseline)
    assert {(c.model, c.verdict) for c in report.checks} == {("plain", "regression"), ("cb", "ok")}
    assert [(c.model, c.baseline_model) for c in _report(current, baseline, model="cb").checks] == [("cb", "cb")]
    crossed = _report(current, baseline, model="cb", baseline_model="plain").checks
    assert [(c.model, c.baseline_model) for c in crossed] == [("cb", "plain")]
    with pytest.raises(CbtoolError, match="no model labelled 'vit'"):
        _report(current, baseline, model="vit")
    with pytest.raises(CbtoolError, match="has no model with that label"):
        _report(results(model(cur_a, "other"), model(cur_b, "cb")), baseline)


def test_report_dict_and_markdown():
    current, baseline = pair_of(**REAL_DROP)
    report = _report(current, baseline, [Rule("top1", "drop", 0.5), Rule("entropy_mean", "rise", 0.02)])
    record = json.loads(json.dumps(report.to_dict()))
    assert record["passed"] is False and record["counts"]["regression"] == 1 and record["counts"]["ok"] == 1
    assert record["checks"][0]["test"] == "mcnemar-chi2" and len(record["checks"][0]["interval"]) == 2
    markdown = report.to_markdown()
    assert "### cbtool check failed" in markdown
    assert "| metric | baseline | current | diff | 95% CI | p | allowed | verdict |" in markdown
    assert "| top1 | 92.00 | 88.00 | -4.00 |" in markdown and "**regression**" in markdown
    with pytest.raises(RegressionError, match=r"top1 -4.00 \(drop 0.50 allowed, p=1.3e-05\)"):
        report.raise_for_regression()


# --------------------------------------------------------------------------------------------
# CLI through CliRunner (exceptions surface as result.exception; main() maps them to exit codes)
# --------------------------------------------------------------------------------------------

runner = CliRunner()


@pytest.fixture
def files(tmp_path):
    def make(counts: dict, **current_kwargs) -> tuple[Path, Path]:
        current, baseline = pair_of(**counts, **current_kwargs)
        return write(tmp_path, "results.json", current), write(tmp_path, "baseline.json", baseline)

    return make


def test_cli_pass_prints_table(files):
    current, baseline = files(NOISY_DROP)
    result = runner.invoke(app, ["check", str(current), "--baseline", str(baseline)])
    assert result.exit_code == 0, result.output
    assert "95% CI" in result.output and "noise" in result.output and "check passed" in result.output


def test_cli_strict_fails_same_drop(files):
    current, baseline = files(NOISY_DROP)
    result = runner.invoke(app, ["check", str(current), "--baseline", str(baseline), "--strict"])
    assert isinstance(result.exception, RegressionError) and result.exception.exit_code == 1


def test_cli_regression_writes_markdown_and_json(files, tmp_path):
    current, baseline = files(REAL_DROP, entropy=(0.95, 0.65, 0.35))
    summary = write(tmp_path, "summary.md", "# earlier step\n")
    verdicts = tmp_path / "verdicts.json"
    args = ["check", str(current), "--baseline", str(baseline), "--max-rise", "entropy_mean=0.02"]
    result = runner.invoke(app, [*args, "--markdown", str(summary), "--json", str(verdicts)])
    assert isinstance(result.exception, RegressionError), result.output
    text = summary.read_text()
    assert text.startswith("# earlier step\n") and "cbtool check failed" in text  # appended, not replaced
    assert "| entropy_mean | 0.6000 | 0.6500 | +0.0500 | - | - | rise 0.0200 | **regression** |" in text
    assert json.loads(verdicts.read_text())["counts"]["regression"] == 2
    assert not list(tmp_path.glob(".*.tmp"))
    verdicts.write_text("old")  # reports are replaced (atomically), unlike model files
    again = runner.invoke(app, [*args, "--json", str(verdicts)])
    assert isinstance(again.exception, RegressionError) and json.loads(verdicts.read_text())["passed"] is False
    nowhere = runner.invoke(app, [*args, "--json", str(tmp_path / "missing" / "v.json")])
    assert isinstance(nowhere.exception, OutputError) and "does not exist" in str(nowhere.exception)
    assert "check" not in nowhere.output  # refused before any work


def test_cli_mismatch_refused_then_allowed(tmp_path):
    base, cur = paired(**REAL_DROP)
    current = write(tmp_path, "r.json", results(model(cur), split="validation"))
    baseline = write(tmp_path, "b.json", results(model(base)))
    refused = runner.invoke(app, ["check", str(current), "--baseline", str(baseline)])
    assert isinstance(refused.exception, CbtoolError) and "split 'validation' vs 'test'" in str(refused.exception)
    allowed = runner.invoke(app, ["check", str(current), "--baseline", str(baseline), "--allow-mismatch"])
    assert isinstance(allowed.exception, RegressionError) and "note: datasets differ" in allowed.output


# --------------------------------------------------------------------------------------------
# CLI through `python -m cbtool` (the main() wrapper: exit codes and one-line errors)
# --------------------------------------------------------------------------------------------


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cbtool", *args], cwd=REPO, capture_output=True, text=True, timeout=60
    )


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    good, good_base = pair_of(**NOISY_DROP)
    bad, bad_base = pair_of(**REAL_DROP)
    wrong_version = copy.deepcopy(good)
    wrong_version["schema_version"] = 99
    return {
        "ok": write(folder, "ok.json", good),
        "ok_base": write(folder, "ok_base.json", good_base),
        "drop": write(folder, "drop.json", bad),
        "drop_base": write(folder, "drop_base.json", bad_base),
        "broken": write(folder, "broken.json", '{"schema_version": 1, "models": ['),
        "version": write(folder, "version.json", wrong_version),
        "missing": folder / "missing.json",
        "robust": write(folder, "robust-cb.json", robust_pair()[0]),
        "robust_base": write(folder, "robust-plain.json", robust_pair()[1]),
    }


@pytest.mark.parametrize(
    "target, baseline, extra, code, stderr",
    [
        ("ok", "ok_base", [], 0, ""),
        ("drop", "drop_base", [], 1, "cbtool: error: regression: top1 -4.00"),
        ("broken", "ok_base", [], 2, "is not valid JSON (line 1"),
        ("missing", "ok_base", [], 2, "missing.json: no such file"),
        ("version", "ok_base", [], 2, "schema_version 99"),
        ("ok", "ok_base", ["--max-drop", "top3=1"], 2, "unknown metric 'top3'"),
        ("ok", "ok_base", ["--max-drop", "top1"], 0, ""),
        ("ok", "ok_base", ["--max-drop", "top1:0.5"], 2, "unknown metric 'top1:0.5'"),
        ("ok", "ok_base", ["--max-rise", "loss=much"], 2, "expects METRIC=VALUE with a number"),
        ("ok", "ok_base", ["--alpha", "2"], 2, "alpha must be between 0 and 1"),
    ],
)
def test_exit_codes_through_main(cli_files, target, baseline, extra, code, stderr):
    proc = _run("check", str(cli_files[target]), "--baseline", str(cli_files[baseline]), *extra)
    assert proc.returncode == code, proc.stderr
    if code == 0:
        assert proc.stderr == ""
    else:
        assert stderr in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_missing_baseline_option_is_a_usage_error(cli_files):
    proc = _run("check", str(cli_files["ok"]))
    assert proc.returncode == 2 and "--baseline" in proc.stderr


def test_check_and_compare_do_not_import_torch(cli_files, tmp_path):
    code = (
        "import sys\n"
        "from cbtool.cli.app import main\n"
        "for argv in sys.argv[1:]:\n"
        "    sys.argv = ['cbtool'] + argv.split('|')\n"
        "    try:\n"
        "        main()\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = sorted(m for m in ('torch', 'timm', 'transformers', 'torchvision') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "print('clean')\n"
    )
    runs = [
        f"check|{cli_files['drop']}|--baseline|{cli_files['drop_base']}|--json|{tmp_path / 'v.json'}",
        f"compare|{cli_files['ok_base']}|{cli_files['ok']}",
        f"check|{cli_files['robust']}|--baseline|{cli_files['robust_base']}|--max-rise|mce=1.0|--max-rise|error:fog:3",
        f"compare|{cli_files['robust_base']}|{cli_files['robust']}",
    ]
    proc = subprocess.run([sys.executable, "-c", code, *runs], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "clean" in proc.stdout, proc.stderr
    assert json.loads((tmp_path / "v.json").read_text())["passed"] is False  # the check really ran
    assert "mCE robust-cb.json:cb.safetensors vs robust-plain.json:cb.safetensors: +2.00" in proc.stdout
    assert "Attention density per layer" in proc.stdout and load_results(cli_files["ok"])["schema_version"] == 1


def test_documented_workflow_matches_example_file():
    example = (REPO / "docs" / "examples" / "github-workflow.yml").read_text()
    body = "".join(line for line in example.splitlines(keepends=True) if not line.startswith("#")).lstrip()
    guide = (REPO / "docs" / "check.md").read_text()
    assert f"```yaml\n{body}```" in guide
    assert "cbtool check results.json --baseline" in body and '--markdown "$GITHUB_STEP_SUMMARY"' in body


# --------------------------------------------------------------------------------------------
# Robustness metrics (issue 11): mce, relative_mce, error:<corruption>[:<severity>]
# --------------------------------------------------------------------------------------------


def robust(document: dict, cells: dict, *, mce: float | None = 60.0, relative_mce: float | None = 80.0) -> dict:
    """Give the only model of ``document`` a robustness record; ``cells[corruption][severity]`` is a correct string."""
    entry = document["models"][0]
    severities = sorted({s for by_severity in cells.values() for s in by_severity})
    error = {c: {str(s): 100.0 * v.count("0") / len(v) for s, v in by_s.items()} for c, by_s in cells.items()}
    entry["robustness"] = {
        "corruptions": list(cells),
        "severities": severities,
        "seed": 0,
        "clean_error": 100.0 - entry["metrics"]["top1"],
        "error": error,
        "correct": {c: {str(s): v for s, v in by_s.items()} for c, by_s in cells.items()},
        "mean_error": {c: sum(e.values()) / len(e) for c, e in error.items()},
        "ce": {}, "relative_ce": {},
        "mce": mce, "relative_mce": relative_mce, "mce_over": list(cells),
        "mean_corruption_error": sum(sum(e.values()) / len(e) for e in error.values()) / len(error),
        "mean_corruption_error_over": list(cells), "jpeg_quality": 85,
        "complete": False, "incomplete_reason": "mCE over 1 of the 15 ImageNet-C corruptions", "relative_to_first": None,
    }  # fmt: skip
    document["dataset"].update(name="imagenet-1k", split="validation", num_classes=1000)  # where mCE exists
    document["schema_version"] = SCHEMA_VERSION
    return document


def robust_pair(b: int = 30, c: int = 12, *, current_mce: float = 62.0, n: int = 200) -> tuple[dict, dict]:
    """Same samples; in fog severity 3 ``b`` images are right only in the baseline and ``c`` only now."""
    current, baseline = pair_of(n=n, both=n - 20, b=0, c=0)
    old, new = paired(n, n // 2, b, c)
    baseline = robust(baseline, {"fog": {3: old, 5: old}})
    current = robust(current, {"fog": {3: new, 5: old}}, mce=current_mce)
    return current, baseline


@pytest.mark.parametrize(
    "drop, rise, expected",
    [
        ([], ["mce=1.0"], [Rule("top1", "drop", 0.5), Rule("mce", "rise", 1.0)]),
        (["top1=off"], ["relative_mce", "error:fog"],
         [Rule("relative_mce", "rise", 1.0), Rule("error:fog", "rise", 1.0)]),
        (["top1=off"], ["error:fog:3=2"], [Rule("error:fog:3", "rise", 2.0)]),
    ],
)
def test_parse_robustness_rules(drop, rise, expected):
    assert parse_rules(drop, rise) == expected


@pytest.mark.parametrize(
    "drop, rise, message",
    [
        (["mce=1"], [], "lower is better"),
        ([], ["mce=5%"], "already in percent"),
        ([], ["error:mist"], "unknown corruption 'mist'"),
        ([], ["error:fog:6"], "severity in metric 'error:fog:6'"),
        ([], ["error:fog:"], "severity in metric"),
        ([], ["mcee"], "error:<corruption>:<severity>"),
    ],
)
def test_parse_robustness_rules_rejects(drop, rise, message):
    with pytest.raises(CbtoolError, match=message):
        parse_rules(drop, rise)


@pytest.mark.parametrize("current_mce, verdict", [(62.0, "regression"), (60.8, "ok"), (58.0, "improved")])
def test_mce_verdicts(current_mce, verdict):
    current, baseline = robust_pair(current_mce=current_mce)
    report = _report(current, baseline, parse_rules([], ["mce=1.0"]))
    check = report.checks[1]
    assert (check.metric, check.kind, check.verdict, check.p_value) == ("mce", "error", verdict, None)
    assert check.difference == pytest.approx(current_mce - 60.0)


@pytest.mark.parametrize("b, c", [(30, 12), (8, 1), (2, 9)])
def test_cell_mcnemar_matches_scipy(b, c):
    stats = pytest.importorskip("scipy.stats")
    current, baseline = robust_pair(b, c)
    report = _report(current, baseline, parse_rules(["top1=off"], ["error:fog:3=0.5", "error:fog"]))
    cell, mean = report.checks
    if b + c < 25:
        expected, method = stats.binomtest(min(b, c), b + c, 0.5).pvalue, "mcnemar-exact"
    else:
        expected, method = stats.chi2.sf((abs(b - c) - 1) ** 2 / (b + c), 1), "mcnemar-chi2"
    assert (cell.metric, cell.test) == ("error:fog:3", method)
    assert cell.p_value == pytest.approx(expected, rel=1e-9)
    assert cell.difference == pytest.approx(100 * (b - c) / 200)  # error rises by the images lost
    low, high = cell.interval
    assert low < cell.difference < high
    assert cell.verdict == ("regression" if b > c and expected < 0.05 else "improved" if expected < 0.05 else "noise")
    assert (mean.metric, mean.p_value, mean.test) == ("error:fog", None, None)  # mean over severities: bound alone
    assert mean.difference == pytest.approx(100 * (b - c) / 200 / 2)


def test_cell_without_pairing_uses_independent_samples():
    current, baseline = robust_pair(30, 12)
    del current["models"][0]["robustness"]["correct"]["fog"]
    report = _report(current, baseline, parse_rules(["top1=off"], ["error:fog:3"]))
    assert report.checks[0].test == "two-proportion-z" and "per-sample correctness of error:fog:3" in report.notes[0]


def test_cli_robustness_exit_codes(tmp_path):
    current, baseline = robust_pair(current_mce=62.0)
    files = {"cb": write(tmp_path, "robust-cb.json", current), "plain": write(tmp_path, "robust-plain.json", baseline)}
    within = copy.deepcopy(current)
    within["models"][0]["robustness"]["mce"] = 60.5
    files["within"] = write(tmp_path, "within.json", within)
    no_mce = copy.deepcopy(current)
    no_mce["models"][0]["robustness"].update(mce=None, relative_mce=None, severities=[3], mce_over=[],
                                             incomplete_reason="CE and mCE need severities 1-5")
    files["no_mce"] = write(tmp_path, "no-mce.json", no_mce)
    # A schema-2 file wrote an mCE on any dataset: on a 10-class one it is dropped on reading, with the reason.
    old = copy.deepcopy(current)
    old["dataset"].update(name="sample", split="test", num_classes=10)
    old["schema_version"] = 2
    for key in ("mce_over", "mean_corruption_error", "mean_corruption_error_over", "jpeg_quality", "incomplete_reason"):
        del old["models"][0]["robustness"][key]
    files["old"] = write(tmp_path, "old.json", old)
    other = copy.deepcopy(current)
    other["models"][0]["robustness"].update(mce_over=["fog", "snow"], mean_corruption_error_over=["fog", "snow"])
    files["other"] = write(tmp_path, "other.json", other)
    plain = copy.deepcopy(current)
    del plain["models"][0]["robustness"]
    files["none"] = write(tmp_path, "none.json", plain)
    cases = [
        ("cb", ["--max-rise", "mce=1.0"], 1, "cbtool: error: regression: mce +2.00 (rise 1.00 allowed)"),
        ("within", ["--max-rise", "mce=1.0"], 0, ""),
        ("no_mce", ["--max-rise", "mce=1.0"], 2, "has no mce (CE and mCE need severities 1-5); bound mean_corrupt"),
        ("old", ["--max-rise", "mce=1.0"], 2, "has no mce ('sample' has 10 classes, not ImageNet-1k's 1,000"),
        ("other", ["--max-rise", "mce=1.0"], 2, "mce of 'cb.safetensors' averages 2 corruptions in"),
        ("other", ["--max-rise", "mean_corruption_error"], 2, "(snow differ)"),
        ("cb", ["--max-rise", "mean_corruption_error=1.0"], 1, "regression: mean_corruption_error +"),
        ("cb", ["--max-rise", "mean_corruption_error=5"], 0, ""),
        ("none", ["--max-rise", "mce"], 2, "has no robustness record for mce; evaluate with --corruptions"),
        ("cb", ["--max-rise", "error:snow:3"], 2, "has no snow errors for error:snow:3 (evaluated: fog)"),
        ("cb", ["--max-rise", "error:fog:2"], 2, "has no fog severity 2 for error:fog:2"),
        ("cb", ["--max-drop", "mce=1"], 2, "mce is an error (lower is better)"),
    ]
    for name, extra, code, stderr in cases:
        base = files["old" if name == "old" else "plain"]  # the old file against itself: same dataset
        proc = _run("check", str(files[name]), "--baseline", str(base), *extra)
        assert proc.returncode == code, (name, extra, proc.stdout, proc.stderr)
        if code == 0:
            assert proc.stderr == "" and extra[1].split("=")[0] in proc.stdout
        else:
            assert stderr in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# --- issue 24: impossible results and bounds on the wrong side ---------------------------------------------------


@pytest.mark.parametrize("rule, message", [
    (("top1", "rise", 1.0), "top1 is better when it rises: a rise is an improvement; bound its drop, e.g. --max-drop top1=1"),
    (("top5", "rise", 0.5), "bound its drop"),
    (("model_images_per_s", "rise", 5.0, True), "model_images_per_s is better when it rises"),
    (("loss", "drop", 0.1), "loss is better when it falls: a drop is an improvement; bound its rise, e.g. --max-rise loss=0.1"),
    (("mce", "drop", 1.0), "mce is an error (lower is better): bound its rise"),
])  # fmt: skip
def test_a_bound_on_the_good_side_of_a_metric_is_refused(rule, message):
    with pytest.raises(CbtoolError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Rule(*rule)
    with pytest.raises(CbtoolError, match="is better when|lower is better"):
        parse_rules(**({"max_rise": [f"{rule[0]}=1"]} if rule[1] == "rise" else {"max_drop": [f"{rule[0]}=1"]}))


def test_entropy_and_distance_may_be_bounded_either_way():
    """CB raises entropy on purpose: neither direction is the good one, so both bounds stay allowed."""
    assert len(parse_rules(["entropy_mean=0.02", "distance_mean=1"], ["entropy_mean=0.02", "distance_layer=2"])) == 5


def _impossible(change) -> dict:
    current, _ = pair_of(n=200, both=100, b=0, c=4)
    change(current, current["models"][0]["metrics"])
    return current


@pytest.mark.parametrize("change, message", [
    (lambda d, m: m.update(top1=150.0), "metrics.top1 is 150.0, not a percentage from 0 to 100"),
    (lambda d, m: m.update(top1=-5.0), "metrics.top1 is -5.0, not a percentage"),
    (lambda d, m: m.update(top5=101.0), "metrics.top5 is 101.0"),
    (lambda d, m: m.update(top5=10.0), "top5 10.0 is below top1 52.0"),
    (lambda d, m: m.update(correct="0" * 200), r"top1 is 52.0 but correct says 0 \(0 of 200\)"),
    (lambda d, m: m.update(correct="01"), "metrics.correct has 2 samples but num_samples is 200"),
    (lambda d, m: m.update(num_samples=100), "metrics.num_samples is 100 but dataset.num_samples is 200"),
    (lambda d, m: d["dataset"].update(num_samples=0), "dataset.num_samples is 0, not a count of samples above 0"),
    (lambda d, m: d["dataset"].update(num_samples=True), "dataset.num_samples is True"),
    (lambda d, m: m.pop("top1"), "metrics has no top1"),
    (lambda d, m: m.update(top1=None), "metrics.top1 is None"),
    (lambda d, m: m.update(loss=-0.1), "metrics.loss is -0.1, not a cross-entropy"),
    (lambda d, m: m.update(loss=math.inf), "metrics.loss is inf, not a finite number"),
    (lambda d, m: m["per_class_top1"].update({"3": 120.0}), "per_class_top1.3 is 120.0"),
    (lambda d, m: d["models"][0]["density"].update(entropy_per_layer=[0.5, math.nan, 0.4]),
     r"density.entropy_per_layer\[1\] is nan"),
])  # fmt: skip
def test_impossible_results_are_bad_input(change, message):
    current = _impossible(change)
    from cbtool.check import validate_results

    with pytest.raises(CbtoolError, match=message):
        validate_results(current)
    baseline = _impossible(lambda d, m: None)
    with pytest.raises(CbtoolError, match=message):  # check and compare read through the same validation
        _report(current, baseline)


def test_consistent_results_pass_validation():
    from cbtool.check import validate_results

    current = _impossible(lambda d, m: None)
    assert current["models"][0]["metrics"]["top1"] == 52.0
    assert validate_results(current) is current
    current["models"][0]["metrics"].update(correct=None, top5=None, loss=None)  # absent values stay allowed
    validate_results(current)
