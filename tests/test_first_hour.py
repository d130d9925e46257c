"""A newcomer's first hour: the README's offline commands run as written (shortened to a few steps) and give
the same files twice, every output is announced, options that cannot work are refused before any work, and the
small things on the way (info's training record, bench's suggestion, progress lines in logs)."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
from pathlib import Path

import pytest

from cbtool.cli.app import main

REPO = Path(__file__).resolve().parents[1]
TINY = ["vit_tiny_patch16_224", "--no-pretrained", "--num-classes", "10", "--img-size", "32", "--model-kwargs",
        "patch_size=8", "embed_dim=32", "depth=2", "num_heads=2"]  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("CBTOOL_DEBUG", raising=False)


def run_cli(*args, cwd: Path | None = None) -> tuple[int, str, str]:
    """``cbtool ARGS`` in this process (in ``cwd``) -> (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), contextlib.chdir(cwd or Path.cwd()):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as stop:
            code = stop.code or 0
    return code, out.getvalue(), err.getvalue()


def readme_offline_commands() -> list[list[str]]:
    """The commands of the README's offline quickstart block, as argument lists without ``cbtool``."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"Offline, on this repository's embedded sample.*?```bash\n(.*?)```", text, re.S).group(1)
    commands = [shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    assert all(words[0] == "cbtool" for words in commands), commands
    return [words[1:] for words in commands]


def shortened(args: list[str]) -> list[str]:
    """The same command, a few steps and images long (the README trains 10 epochs on the whole sample)."""
    args = list(args)
    if args[0] == "finetune":
        at = args.index("--epochs")
        args[at:at + 2] = ["--steps", "2", "--limit", "64", "--val-limit", "32", "--batch-size", "16", "--workers", "0"]
    if args[0] == "eval":
        args += ["--limit", "24", "--workers", "0", "--batch-size", "8"]
    return args


def without_timing(document: dict) -> dict:
    """An eval document less what may differ between identical runs: its time stamp and the throughput."""
    document = json.loads(json.dumps(document))
    document.pop("created", None)
    for model in document["models"]:
        model["metrics"].pop("throughput", None)
    return document


@pytest.fixture(scope="module")
def readme_runs(tmp_path_factory):
    """The README's offline commands run twice, each time in a new folder: [(folder, [(code, out, err)])]."""
    runs = []
    for name in ("first", "second"):
        folder = tmp_path_factory.mktemp(name)
        runs.append((folder, [run_cli(*shortened(args), cwd=folder) for args in readme_offline_commands()]))
    return runs


def test_readme_offline_commands_run_as_written(readme_runs):
    commands = readme_offline_commands()
    assert [args[0] for args in commands] == ["inject", "finetune", "eval", "eval"]
    assert "--corruptions" in commands[3]  # corruptions work on the offline model: it takes 32 px
    folder, results = readme_runs[0]
    for args, (code, _, err) in zip(commands, results):
        assert code == 0, (args, err)
    written = [line for _, _, err in results for line in err.splitlines() if line.startswith("wrote ")]
    assert [line.split(":")[0] for line in written] == [
        "wrote tiny-cb.safetensors", "wrote tuned.safetensors", "wrote results.json", "wrote robust.json",
        "wrote robust.png"]
    assert all((folder / name).stat().st_size > 0 for name in ("results.json", "robust.json", "robust.png"))
    robust = json.loads((folder / "robust.json").read_text())["models"][0]["robustness"]
    assert set(robust["corruptions"]) == {"gaussian_noise", "shot_noise", "impulse_noise"}


def test_readme_offline_commands_are_reproducible(readme_runs):
    """Two runs of the same commands: byte-identical model files, and eval JSON equal but for time and speed."""
    (first, _), (second, _) = readme_runs
    for name in ("tiny-cb.safetensors", "tuned.safetensors"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    for name in ("results.json", "robust.json"):
        a, b = (json.loads((folder / name).read_text()) for folder in (first, second))
        assert a["created"] != b["created"] or a["created"]  # the part that may differ is there
        assert without_timing(a) == without_timing(b), name
    from cbtool.models.checkpoint import describe

    assert describe(first / "tiny-cb.safetensors")["source"]["seed"] == 0  # the file says what drew its weights


def test_quickstart_script_runs_the_readme_commands():
    """scripts/quickstart.sh runs what the README shows (its own paths, --force and --run-dir aside)."""
    script = (REPO / "scripts" / "quickstart.sh").read_text().replace("\\\n", " ")
    lines = [shlex.split(line.replace('"$out/', '"').replace("$cb ", "cbtool "))
             for line in script.splitlines() if line.startswith("$cb ")]
    ran = []
    for words in lines:
        for flag, count in (("--force", 1), ("--run-dir", 2)):
            if flag in words:
                at = words.index(flag)
                del words[at:at + count]
        ran.append(words[1:])
    assert [args for args in ran if args[0] != "info"] == readme_offline_commands()


def test_seed_draws_the_weights(tmp_path):
    paths = [tmp_path / f"{name}.safetensors" for name in ("a", "b", "c")]
    for path, seed in zip(paths, (0, 0, 1)):
        code, _, err = run_cli("inject", *TINY, "--seed", seed, "-o", path)
        assert code == 0, err
    a, b, c = (path.read_bytes() for path in paths)
    assert a == b and a != c
    code, _, err = run_cli("inject", *TINY, "--seed", 2**32, "-o", tmp_path / "d.safetensors")
    assert code == 2 and err.strip() == "cbtool: error: --seed must be in [0, 4294967295], not 4294967296"
    assert not (tmp_path / "d.safetensors").exists()


def test_eval_of_random_weights_is_seeded(tmp_path):
    """eval --no-pretrained builds each model from --seed: the same predictions every time, recorded."""
    documents = []
    for seed, name in ((5, "a"), (5, "b"), (6, "c")):
        code, _, err = run_cli("eval", *TINY, "--dataset", "sample", "--limit", "30", "--workers", "0", "--seed", seed,
                              "--json", tmp_path / f"{name}.json", "--quiet")
        assert code == 0 and err == "", err
        documents.append(json.loads((tmp_path / f"{name}.json").read_text())["models"][0])
    a, b, c = documents
    assert a["metrics"]["loss"] == b["metrics"]["loss"] != c["metrics"]["loss"]
    assert (a["source"]["seed"], c["source"]["seed"]) == (5, 6)


@pytest.mark.parametrize(("args", "message"), [
    (["--plot", "p.png"], "--plot draws per-layer density (add --density), error against severity (add --corruptions) "
                          "or learned cbs scales, and no model here has cbs scales"),
    (["--severities", "3"], "--severities only applies to corrupted images; give --corruptions too (e.g. --corruptions all), "
                            "or leave them out"),
    (["--crop-pct", "5"], "--crop-pct must be in (0, 1], not 5.0"),
])  # fmt: skip
def test_eval_options_that_cannot_work_are_refused_before_any_image(tmp_path, monkeypatch, args, message):
    import cbtool.data

    def no_data(*_, **__):
        raise AssertionError("the dataset was opened")

    monkeypatch.setattr(cbtool.data, "resolve_dataset", no_data)
    code, out, err = run_cli("eval", *TINY, "--dataset", "sample", "--json", "r.json", *args, cwd=tmp_path)
    assert (code, out) == (2, "") and err.strip() == f"cbtool: error: {message}"
    assert list(tmp_path.iterdir()) == []


def test_viz_rollout_options_need_rollout(tmp_path):
    model = ["vit_tiny_patch16_224", "--no-pretrained", "--model-kwargs", "img_size=32", "patch_size=8"]
    code, _, err = run_cli("viz", *model, "--dataset", "sample", "--discard-ratio", "0.5", "-o", tmp_path / "v.png")
    assert code == 2 and err.strip() == ("cbtool: error: --discard-ratio sets how attention rollout is drawn; "
                                         "add --rollout, or drop --discard-ratio")


def test_a_cbs_file_has_scales_to_plot(tmp_path):
    from cbtool.models.checkpoint import has_cb_scales

    for variant in ("cb", "cbs"):
        code, _, err = run_cli("inject", *TINY, "--variant", variant, "-o", tmp_path / f"{variant}.safetensors", "-q")
        assert code == 0 and err == ""
    assert not has_cb_scales(tmp_path / "cb.safetensors") and has_cb_scales(tmp_path / "cbs.safetensors")


def test_info_shows_the_training_record_as_lines(readme_runs):
    folder, _ = readme_runs[0]
    code, out, err = run_cli("info", "tuned.safetensors", cwd=folder)
    assert code == 0, err
    lines = out.splitlines()
    assert max(map(len, lines)) < 220 and not any("{" in line for line in lines)
    training = next(line for line in lines if line.startswith("training:"))
    assert training.startswith("training:    2 steps (0.5 epochs) on sample (train, 64 images") and "seed 0" in training
    assert any(line.startswith("  validation sample (validation, 32 images") for line in lines)
    assert "random weights from seed 0" in next(line for line in lines if line.startswith("source:"))


def test_bench_suggests_a_command_that_runs(readme_runs):
    folder, _ = readme_runs[0]
    code, _, err = run_cli("bench", "tiny-cb.safetensors", cwd=folder)
    assert code == 2
    suggested = err.strip().split("e.g. ", 1)[1]
    args = shlex.split(suggested)
    assert args[:2] == ["cbtool", "bench"] and "img_size=32" in args and "patch_size=4" in args
    code, out, err = run_cli(*args[1:], "--repeats", "1", "--warmup", "0", "--number", "1", "--batch-size", "2",
                            "--quiet", cwd=folder)
    assert code == 0, err
    assert "cb at mlp" in out or "cb" in out


def test_progress_in_a_log_is_a_line_every_five_percent():
    from cbtool.progress import LineProgress, progress_bar

    log = io.StringIO()
    bar = progress_bar(100, desc="finetune", unit="step", file=log)
    assert isinstance(bar, LineProgress)
    for _ in range(100):
        bar.set_postfix(loss="1.0", refresh=False)
        bar.update(1)
    bar.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 20 and lines[0].startswith("finetune: 5/100 step (5%), ") and lines[0].endswith("loss=1.0")
    assert lines[-1].startswith("finetune: 100/100 step (100%)")

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    from tqdm import tqdm

    terminal_bar = progress_bar(10, desc="eval", unit="batch", file=Terminal())
    assert isinstance(terminal_bar, tqdm)
    terminal_bar.close()


@pytest.mark.parametrize(("args", "message"), [
    (["--auto-augment", "rand-m9-mstd0.5"], "--auto-augment sets the training augmentation, which is off (the default "
                                            "for inputs under 64 px); add --augment, or drop --auto-augment"),
    (["--no-augment", "--hflip", "0"], "--hflip sets the training augmentation, which is off (--no-augment); add "
                                       "--augment, or drop --hflip"),
])  # fmt: skip
def test_augmentation_options_without_augmentation_are_refused_before_the_data(tmp_path, monkeypatch, args, message):
    import cbtool.train.data

    def no_data(*_, **__):
        raise AssertionError("the dataset was opened")

    monkeypatch.setattr(cbtool.train.data, "resolve_training_data", no_data)
    code, out, err = run_cli("finetune", *TINY, "--dataset", "sample", "--steps", "1", *args, "-o", "t.safetensors",
                             cwd=tmp_path)
    assert (code, out) == (2, "") and err.strip() == f"cbtool: error: {message}"
    assert list(tmp_path.iterdir()) == []


def test_viz_checks_the_pictures_before_opening_the_dataset(tmp_path, monkeypatch):
    import cbtool.data

    def no_data(*_, **__):
        raise AssertionError("the dataset was opened")

    monkeypatch.setattr(cbtool.data, "resolve_dataset", no_data)
    model = ["vit_tiny_patch16_224", "--no-pretrained", "--model-kwargs", "img_size=32", "patch_size=8", "depth=2"]
    code, _, err = run_cli("viz", *model, "--dataset", "sample", "--layers", "5", "-o", tmp_path / "v.png")
    assert code == 2 and "out of range" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "v.png").exists()


def test_finetune_announces_each_output_and_quiet_silences_it(tmp_path):
    common = [*TINY, "--dataset", "sample", "--steps", "1", "--limit", "20", "--val-limit", "10", "--batch-size", "10",
              "--workers", "0"]  # fmt: skip
    code, out, err = run_cli("finetune", *common, "-o", "t.safetensors", "--save-best", "b.safetensors", "--log", "l.jsonl",
                             "--run-dir", "run", cwd=tmp_path)
    assert code == 0, err
    written = [line.split(":")[0] for line in err.splitlines() if line.startswith("wrote ")]
    assert written == ["wrote t.safetensors", "wrote b.safetensors", "wrote l.jsonl"] and out == ""
    code, out, err = run_cli("finetune", *common, "-o", "q.safetensors", "--run-dir", "run2", "--quiet", cwd=tmp_path)
    assert (code, out, err) == (0, "", "")


def test_check_and_compare_announce_what_they_wrote(readme_runs, tmp_path):
    folder, _ = readme_runs[0]
    results = folder / "results.json"
    code, _, err = run_cli("check", results, "--baseline", results, "--json", tmp_path / "c.json", "--markdown",
                           tmp_path / "c.md")
    assert code == 0 and err.splitlines() == [f"wrote {tmp_path / 'c.md'}: appended the summary",
                                              f"wrote {tmp_path / 'c.json'}"], err
    code, _, err = run_cli("compare", results, results, "--json", tmp_path / "k.json", "--markdown", tmp_path / "k.md",
                           "--quiet")
    assert (code, err) == (0, "") and (tmp_path / "k.json").is_file() and (tmp_path / "k.md").is_file()
    code, _, err = run_cli("compare", results, results, "--markdown", tmp_path / "k.md")
    assert code == 0 and err.splitlines()[-1] == f"wrote {tmp_path / 'k.md'}: appended the comparison", err
