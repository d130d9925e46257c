"""The bad-input battery: every command (all eight), fed what a new user might type, answers with one line and exit 2
(1 for a real regression), never a traceback, never a file left behind, and never touches an input.

Each row of ``CASES`` is ``id: (argv, exit code, phrase the message must contain)``. ``{in}`` is the folder of
shared inputs (checked byte for byte after each case), ``{out}`` an empty folder that must stay empty. A
phrase starting with ``usage:`` is one of Typer's own usage errors, which may keep their short box.
Everything runs in this process through ``cbtool.cli.app.main`` on tiny models, so the battery is fast.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from cbtool.models.checkpoint import save
from cbtool.cli.app import main
from cbtool.models.resolve import resolve
from cbtool.spec import CBSpec
from cbtool.surgery import inject

# A 28 px, patch-4 ViT with a 10-class head (the sample's shape), tiny enough for milliseconds per batch.
ARCH = ["patch_size=4", "embed_dim=32", "depth=2", "num_heads=2"]
KW = ["--model-kwargs", *ARCH, "img_size=28", "num_classes=10"]
VIT = ["vit_tiny_patch16_224", "--no-pretrained"]
EVAL = ["--dataset", "sample", "--limit", "20", "--batch-size", "10", "--workers", "0", "--quiet"]
TUNE = ["--dataset", "sample", "--limit", "40", "--val-limit", "20", "--batch-size", "10", "--workers", "0",
        "--steps", "1", "--quiet"]  # fmt: skip
CB = "{in}/cb.safetensors"
TRAINED = "{in}/trained.safetensors"
PLAIN = "{in}/plain.safetensors"
OUT = "{out}/m.safetensors"
JSON = "{out}/r.json"
BENCH = ["--repeats", "3", "--warmup", "0", "--number", "1", "--batch-size", "2", "--quiet"]

CASES: dict[str, tuple[list[str], int, str]] = {
    # --- inject ------------------------------------------------------------------------------------
    "inject-output-is-the-model": (["inject", CB, "-o", CB, "--force"], 2, "is an input of this command"),
    "inject-output-is-the-checkpoint": (["inject", "vit_tiny_patch16_224", "--checkpoint", "{in}/weights.safetensors", *KW,
                                         "-o", "{in}/weights.safetensors", "--force"], 2, "is an input of this command"),
    "inject-heads-do-not-divide": (["inject", *VIT, "--model-kwargs", "embed_dim=96", "num_heads=5", "-o", OUT], 2,
                                   "cannot build timm model vit_tiny_patch16_224 with embed_dim=96 num_heads=5"),
    "inject-patch-size-0": (["inject", *VIT, "--model-kwargs", "patch_size=0", "-o", OUT], 2,
                            "cannot build timm model vit_tiny_patch16_224 with patch_size=0"),
    "inject-img-size-conflict": (["inject", *VIT, "--img-size", "32", "--model-kwargs", "img_size=64", "-o", OUT], 2,
                                 "--img-size 32 and --model-kwargs img_size=64 disagree"),
    "inject-num-classes-conflict": (["inject", *VIT, "--num-classes", "3", *KW, "-o", OUT], 2,
                                    "--num-classes 3 and --model-kwargs num_classes=10 disagree"),
    "inject-empty-pth": (["inject", "vit_tiny_patch16_224", "--checkpoint", "{in}/empty.pth", *KW, "-o", OUT], 2,
                         "empty.pth: the file is empty"),
    "inject-empty-bin": (["inject", "vit_tiny_patch16_224", "--checkpoint", "{in}/empty.bin", *KW, "-o", OUT], 2,
                         "empty.bin: the file is empty"),
    "inject-pickled-objects": (["inject", "vit_tiny_patch16_224", "--checkpoint", "{in}/objects.pth", *KW, "-o", OUT], 2,
                               "cbtool reads plain tensors only"),
    "inject-malicious-pickle": (["inject", "vit_tiny_patch16_224", "--checkpoint", "{in}/evil.pth", *KW, "-o", OUT], 2,
                                "holds Python objects besides tensors"),
    "inject-truncated-pth": (["inject", "vit_tiny_patch16_224", "--checkpoint", "{in}/truncated.pth", *KW, "-o", OUT], 2,
                             "cannot read checkpoint"),
    "inject-pos-embed-of-32px": (["inject", "vit_tiny_patch16_224", "--checkpoint", "{in}/pos32.safetensors", *KW,
                                  "-o", OUT], 2, "pos_embed is (1, 65, 32) in the file but (1, 50, 32) in the model; "
                                                 "build the model to match with --img-size 32"),
    "inject-patch-of-8": (["inject", "vit_tiny_patch16_224", "--checkpoint", "{in}/patch8.safetensors", *KW, "-o", OUT],
                          2, "with --model-kwargs patch_size=8"),
    "inject-img-size-not-a-multiple": (["inject", *VIT, "--img-size", "30", "--model-kwargs", *ARCH, "-o", OUT], 2,
                                       "--img-size 30 is not a multiple of vit_tiny_patch16_224's patch size 4; use 28 or 32"),
    "inject-img-size-below-patch": (["inject", *VIT, "--img-size", "2", "--model-kwargs", *ARCH, "-o", OUT], 2,
                                    "is not a multiple of"),
    "inject-img-size-of-a-file": (["inject", PLAIN, "--img-size", "32", "-o", OUT], 2, "takes 28 px inputs, not 32"),
    "inject-kwargs-of-a-file": (["inject", PLAIN, "--model-kwargs", "depth=3", "-o", OUT], 2,
                                "cannot change a saved model's architecture"),
    "inject-output-folder-missing": (["inject", *VIT, *KW, "-o", "{out}/no/m.safetensors"], 2, "does not exist; create it first"),
    "inject-output-exists": (["inject", PLAIN, "-o", CB], 2, "already exists; pass --force"),
    "inject-output-is-a-folder": (["inject", *VIT, *KW, "-o", "{out}"], 2, "usage: is a directory"),
    "inject-bad-variant": (["inject", *VIT, "--variant", "cbx", "-o", OUT], 2, "unknown variant 'cbx'"),
    "inject-bad-position": (["inject", *VIT, "--position", "head", "-o", OUT], 2, "unknown position 'head'"),
    "inject-bad-layers": (["inject", *VIT, "--layers", "1-", "-o", OUT], 2, "bad --layers term '1-'"),
    "inject-layers-out-of-range": (["inject", *VIT, *KW, "--layers", "5", "-o", OUT], 2, "out of range"),
    "inject-unknown-name": (["inject", "vit_tinny_patch16_224", "--no-pretrained", "-o", OUT], 2, "did you mean"),
    "inject-not-a-transformer": (["inject", "resnet18", "--no-pretrained", "-o", OUT], 2, "is not a model class cbtool supports"),
    "inject-missing-file": (["inject", "{in}/nope.safetensors", "-o", OUT], 2, "does not exist"),
    "inject-random-bytes": (["inject", "{in}/random.safetensors", "-o", OUT], 2, "is not a safetensors file"),
    "inject-checkpoint-with-a-file": (["inject", PLAIN, "--checkpoint", "{in}/weights.safetensors", "-o", OUT], 2,
                                      "--checkpoint goes with a timm model name"),
    "inject-bad-kwargs-entry": (["inject", *VIT, "--model-kwargs", "patch_size", "-o", OUT], 2, "bad --model-kwargs entry"),
    "inject-unknown-kwarg": (["inject", *VIT, "--model-kwargs", "bogus=1", "-o", OUT], 2, "bad architecture argument"),
    "inject-twice": (["inject", CB, "-o", OUT], 2, "already has Context Broadcasting"),
    "inject-folder-without-config": (["inject", "{in}/images", "-o", OUT], 2, "is a folder without config.json"),
    "inject-num-classes-0": (["inject", *VIT, "--num-classes", "0", "-o", OUT], 2, "usage: Invalid value for '--num-classes'"),
    "inject-no-output": (["inject", *VIT], 2, "usage: Missing option '--output'"),
    # --- info --------------------------------------------------------------------------------------
    "info-missing": (["info", "{in}/nope.safetensors"], 2, "does not exist"),
    "info-folder": (["info", "{in}/images"], 2, "usage: is a directory"),
    "info-empty": (["info", "{in}/empty.pth"], 2, "is not a safetensors file (too short)"),
    "info-pth": (["info", "{in}/objects.pth"], 2, "is not a safetensors file"),
    "info-random-bytes": (["info", "{in}/random.safetensors"], 2, "is not a safetensors file"),
    # --- eval --------------------------------------------------------------------------------------
    "eval-json-is-the-model": (["eval", CB, *EVAL, "--json", CB], 2, "--json {in}/cb.safetensors is an input"),
    "eval-plot-is-the-model": (["eval", CB, *EVAL, "--plot", CB], 2, "--plot {in}/cb.safetensors is an input"),
    "eval-json-is-the-checkpoint": (["eval", "vit_tiny_patch16_224", "--checkpoint", "{in}/weights.safetensors", *KW, *EVAL,
                                     "--json", "{in}/weights.safetensors"], 2, "is an input of this command"),
    "eval-json-in-the-dataset": (["eval", CB, "--dataset", "{in}/images", "--json", "{in}/images/r.json"], 2,
                                 "lies inside the dataset folder"),
    "eval-json-and-plot-same": (["eval", CB, *EVAL, "--json", JSON, "--plot", JSON], 2, "name the same file"),
    "eval-all-images-bad": (["eval", CB, "--dataset", "{in}/corrupt", "--skip-bad-images", "--workers", "0", "--quiet"], 2,
                            "no image of '{in}/corrupt' could be evaluated: all 10 could not be decoded"),
    "eval-bad-image": (["eval", CB, "--dataset", "{in}/corrupt", "--workers", "0", "--quiet"], 2, "cannot decode image"),
    "eval-fresh-head-on-trained-file": (["eval", TRAINED, *EVAL, "--num-classes", "3"], 2,
                                        "would put a new, untrained head on the trained weights"),
    "eval-fresh-head-on-checkpoint": (["eval", "vit_tiny_patch16_224", "--checkpoint", "{in}/weights.safetensors",
                                       "--model-kwargs", *ARCH, "img_size=28", "--num-classes", "3", *EVAL], 2,
                                      "would put a new, untrained head"),
    "eval-img-size-30": (["eval", CB, *EVAL, "--img-size", "30"], 2, "takes 28 px inputs, not 30"),
    "eval-img-size-56": (["eval", CB, *EVAL, "--img-size", "56"], 2, "takes 28 px inputs, not 56"),
    "eval-dynamic-size-not-a-multiple": (["eval", "{in}/dynamic.safetensors", *EVAL, "--img-size", "30"], 2,
                                         "--img-size 30 is not a multiple of {in}/dynamic.safetensors's patch size 4"),
    "eval-img-size-conflict": (["eval", *VIT, "--img-size", "28", "--model-kwargs", *ARCH, "img_size=32", *EVAL], 2,
                               "disagree"),
    "eval-pos-embed": (["eval", "vit_tiny_patch16_224", "--checkpoint", "{in}/pos32.safetensors", *KW, *EVAL], 2,
                       "pos_embed is (1, 65, 32) in the file but (1, 50, 32) in the model"),
    "eval-empty-checkpoint": (["eval", "vit_tiny_patch16_224", "--checkpoint", "{in}/empty.pth", *KW, *EVAL], 2,
                              "the file is empty"),
    "eval-pickled-checkpoint": (["eval", "vit_tiny_patch16_224", "--checkpoint", "{in}/objects.pth", *KW, *EVAL], 2,
                                "plain tensors only"),
    "eval-no-dataset-folder": (["eval", CB, "--dataset", "{in}/nowhere"], 2, "no dataset '{in}/nowhere'"),
    "eval-dataset-is-a-file": (["eval", CB, "--dataset", "{in}/empty.pth"], 2, "is a file"),
    "eval-unknown-split": (["eval", CB, *EVAL, "--split", "nope"], 2, "has no split 'nope'"),
    "eval-crop-pct-2": (["eval", CB, *EVAL, "--crop-pct", "2"], 2, "--crop-pct must be in (0, 1]"),
    "eval-crop-pct-nan": (["eval", CB, *EVAL, "--crop-pct", "nan"], 2, "--crop-pct must be in (0, 1]"),
    "eval-interpolation": (["eval", CB, *EVAL, "--interpolation", "cubic"], 2, "--interpolation must be one of"),
    "eval-limit-0": (["eval", CB, "--dataset", "sample", "--limit", "0"], 2, "usage: Invalid value for '--limit'"),
    "eval-batch-size-0": (["eval", CB, "--dataset", "sample", "--batch-size", "0"], 2, "usage: Invalid value for '--batch-size'"),
    "eval-workers-negative": (["eval", CB, "--dataset", "sample", "--workers", "-1"], 2, "usage: Invalid value for '--workers'"),
    "eval-different-preprocessing": (["eval", CB, "{in}/cb32.safetensors", *EVAL], 2, "preprocess images differently"),
    "eval-head-does-not-fit": (["eval", "{in}/two.safetensors", *EVAL], 2, "has 10 classes but the model's head has 2"),
    "eval-hub-option-on-sample": (["eval", CB, *EVAL, "--image-column", "img"], 2, "only apply to Hub"),
    "eval-json-folder-missing": (["eval", CB, *EVAL, "--json", "{out}/no/r.json"], 2, "does not exist; create it first"),
    "eval-kwargs-of-a-file": (["eval", CB, *EVAL, "--model-kwargs", "depth=1"], 2, "cannot change a saved model's architecture"),
    "eval-unknown-device": (["eval", CB, *EVAL, "--device", "tpu9"], 2, "unknown device 'tpu9'"),
    "eval-no-dataset": (["eval", CB], 2, "usage: Missing option '--dataset'"),
    "eval-unknown-corruption": (["eval", CB, *EVAL, "--corruptions", "fog,smog"], 2,
                                "unknown corruption 'smog'"),
    "eval-severity-6": (["eval", CB, *EVAL, "--corruptions", "fog", "--severities", "1-6"], 2,
                        "severity must be an integer from 1 to 5, got 6"),
    "eval-severity-0": (["eval", CB, *EVAL, "--corruptions", "fog", "--severities", "0"], 2, "from 1 to 5, got 0"),
    "eval-examples-without-corruptions": (["eval", CB, *EVAL, "--save-examples", "{out}"], 2,
                                          "--save-examples only applies to corrupted images; give --corruptions too"),
    "eval-severities-without-corruptions": (["eval", CB, *EVAL, "--severities", "1,3"], 2,
                                            "--severities only applies to corrupted images; give --corruptions too"),
    "eval-no-jpeg-without-corruptions": (["eval", CB, *EVAL, "--no-jpeg"], 2, "--no-jpeg only applies to corrupted"),
    "eval-examples-under-a-file": (["eval", CB, *EVAL, "--corruptions", "fog", "--save-examples",
                                    "{in}/cb.safetensors/examples"], 2, "cannot be created: "),
    "eval-examples-in-the-dataset": (["eval", CB, "--dataset", "{in}/images", "--corruptions", "fog", "--save-examples",
                                      "{in}/images/c0"], 2, "lies inside the dataset folder"),
    "eval-corruptions-and-density": (["eval", CB, *EVAL, "--corruptions", "fog", "--density"], 2,
                                     "--density measures clean images"),
    "eval-corruptions-under-32-px": (["eval", CB, *EVAL, "--corruptions", "fog"], 2,
                                     "corruptions need inputs of at least 32 x 32 px"),
    "eval-corruptions-no-head": (["eval", *VIT, "--model-kwargs", *ARCH, "img_size=32", "num_classes=0", *EVAL,
                                  "--corruptions", "fog"], 2, "has no classification head"),
    # --- finetune ----------------------------------------------------------------------------------
    "tune-weight-decay": (["finetune", CB, *TUNE, "--weight-decay", "-1", "-o", OUT], 2, "--weight-decay must be at least 0"),
    "tune-clip-grad": (["finetune", CB, *TUNE, "--clip-grad", "-1", "-o", OUT], 2, "--clip-grad must be at least 0"),
    "tune-min-lr": (["finetune", CB, *TUNE, "--min-lr", "-1", "-o", OUT], 2, "--min-lr must be at least 0"),
    "tune-min-lr-above-lr": (["finetune", CB, *TUNE, "--lr", "1e-3", "--min-lr", "1e-2", "-o", OUT], 2,
                             "--min-lr must be in [0, 0.001]"),
    "tune-hflip": (["finetune", CB, *TUNE, "--hflip", "5", "-o", OUT], 2, "--hflip must be in [0, 1], not 5.0"),
    "tune-lr-0": (["finetune", CB, *TUNE, "--lr", "0", "-o", OUT], 2, "--lr must be more than 0"),
    "tune-lr-nan": (["finetune", CB, *TUNE, "--lr", "nan", "-o", OUT], 2, "--lr must be more than 0, not nan"),
    "tune-lr-inf": (["finetune", CB, *TUNE, "--lr", "inf", "-o", OUT], 2, "--lr must be more than 0, not inf"),
    "tune-label-smoothing": (["finetune", CB, *TUNE, "--label-smoothing", "1", "-o", OUT], 2, "--label-smoothing must be in [0, 1)"),
    "tune-warmup-frac": (["finetune", CB, *TUNE, "--warmup-frac", "1", "-o", OUT], 2, "--warmup-frac must be in [0, 1)"),
    "tune-scale": (["finetune", CB, *TUNE, "--scale", "0", "-o", OUT], 2, "--scale must be in (0, 1]"),
    "tune-color-jitter": (["finetune", CB, *TUNE, "--color-jitter", "-1", "-o", OUT], 2, "--color-jitter must be at least 0"),
    "tune-val-fraction": (["finetune", CB, *TUNE, "--val-fraction", "1.5", "-o", OUT], 2, "--val-fraction must be in (0, 1)"),
    "tune-resume-a-model-file": (["finetune", "--resume", CB, "-o", OUT], 2,
                                 "--resume takes a run folder (e.g. runs/last) or its checkpoint.pt"),
    "tune-resume-nothing": (["finetune", "--resume", "{in}/images", "-o", OUT], 2, "no checkpoint at"),
    "tune-output-is-the-model": (["finetune", CB, *TUNE, "-o", CB, "--force"], 2, "--output {in}/cb.safetensors is an input"),
    "tune-best-is-the-output": (["finetune", CB, *TUNE, "-o", OUT, "--save-best", OUT], 2, "name the same file"),
    "tune-log-is-the-model": (["finetune", CB, *TUNE, "-o", OUT, "--log", CB], 2, "--log {in}/cb.safetensors is an input"),
    "tune-output-in-the-dataset": (["finetune", CB, "--dataset", "{in}/images", "-o", "{in}/images/m.safetensors"], 2,
                                   "lies inside the dataset folder"),
    "tune-run-folder-not-writable": (["finetune", CB, *TUNE, "--run-dir", "/proc/cbtool-run", "-o", OUT], 2,
                                     "cannot write the run folder /proc/cbtool-run"),
    "tune-epochs-and-steps": (["finetune", CB, *TUNE, "--epochs", "1", "-o", OUT], 2, "--epochs or --steps, not both"),
    "tune-no-output": (["finetune", CB, *TUNE], 2, "give the output file with -o/--output"),
    "tune-no-dataset": (["finetune", CB, "-o", OUT], 2, "give a MODEL and --dataset"),
    "tune-val-split-is-train": (["finetune", CB, *TUNE, "--val-split", "train", "-o", OUT], 2, "is the training split"),
    "tune-val-split-and-fraction": (["finetune", CB, *TUNE, "--val-split", "test", "--val-fraction", "0.1", "-o", OUT], 2,
                                    "--val-split or --val-fraction, not both"),
    "tune-train-part": (["finetune", CB, *TUNE, "--train", "everything", "-o", OUT], 2, "unknown part 'everything'"),
    "tune-output-exists": (["finetune", CB, *TUNE, "-o", PLAIN], 2, "already exists; pass --force"),
    "tune-checkpoint-with-a-file": (["finetune", CB, *TUNE, "--checkpoint", "{in}/weights.safetensors", "-o", OUT], 2,
                                    "--checkpoint goes with a timm model name"),
    "tune-grad-accum-0": (["finetune", CB, *TUNE, "--grad-accum", "0", "-o", OUT], 2, "usage: Invalid value for '--grad-accum'"),
    # --- check -------------------------------------------------------------------------------------
    "check-nan-top1": (["check", "{in}/nan.json", "--baseline", "{in}/results.json"], 2,
                       "metrics.top1 is nan, not a finite number"),
    "check-nan-baseline": (["check", "{in}/results.json", "--baseline", "{in}/nan.json"], 2, "not a finite number"),
    "check-json-is-the-results": (["check", "{in}/results.json", "--baseline", "{in}/baseline.json", "--json",
                                   "{in}/results.json"], 2, "is an input of this command"),
    "check-markdown-is-the-baseline": (["check", "{in}/results.json", "--baseline", "{in}/baseline.json", "--markdown",
                                        "{in}/baseline.json"], 2, "is an input of this command"),
    "check-missing": (["check", "{in}/nope.json", "--baseline", "{in}/results.json"], 2, "no such file"),
    "check-not-json": (["check", "{in}/empty.pth", "--baseline", "{in}/results.json"], 2, "is not valid JSON"),
    "check-no-schema": (["check", "{in}/other.json", "--baseline", "{in}/results.json"], 2, "no schema_version"),
    "check-bad-rule": (["check", "{in}/results.json", "--baseline", "{in}/baseline.json", "--max-drop", "speed=1"], 2,
                       "unknown metric 'speed'"),
    "check-alpha": (["check", "{in}/results.json", "--baseline", "{in}/baseline.json", "--alpha", "2"], 2,
                    "alpha must be between 0 and 1"),
    "check-a-folder": (["check", "{in}/images", "--baseline", "{in}/results.json"], 2, "usage: is a directory"),
    "check-other-dataset": (["check", "{in}/results.json", "--baseline", "{in}/other-dataset.json"], 2,
                            "describe different datasets"),
    "check-regression": (["check", "{in}/worse.json", "--baseline", "{in}/baseline.json", "--strict"], 1, "regression: top1"),
    # --- compare -----------------------------------------------------------------------------------
    "compare-json-is-an-input": (["compare", "{in}/results.json", "{in}/baseline.json", "--json", "{in}/baseline.json"], 2,
                                 "is an input of this command"),
    "compare-one-model": (["compare", "{in}/results.json"], 2, "compare needs at least two models"),
    "compare-missing": (["compare", "{in}/results.json", "{in}/nope.json"], 2, "no such file"),
    "compare-nan": (["compare", "{in}/results.json", "{in}/nan.json"], 2, "not a finite number"),
    "compare-plot-without-density": (["compare", "{in}/results.json", "{in}/baseline.json", "--plot", "{out}/p.png"], 2,
                                     "--plot needs per-layer density"),
    # --- families ----------------------------------------------------------------------------------
    "families-extra-argument": (["families", "vit"], 2, "usage: Got unexpected extra"),
    "families-unknown-option": (["families", "--yaml"], 2, "usage: No such option: --yaml"),
    # --- bench -------------------------------------------------------------------------------------
    "bench-json-is-the-model": (["bench", PLAIN, *BENCH, "--json", PLAIN], 2, "is an input of this command"),
    "bench-img-size-30": (["bench", *VIT, "--img-size", "30", "--model-kwargs", "patch_size=4", "embed_dim=32", "depth=1",
                           "num_heads=2", *BENCH], 2, "--img-size 30 is not a multiple of"),
    "bench-img-size-of-a-file": (["bench", PLAIN, "--img-size", "56", *BENCH], 2, "takes 28 px inputs, not 56"),
    "bench-has-cb": (["bench", CB, *BENCH], 2, "already has Context Broadcasting"),
    "bench-clock": (["bench", PLAIN, *BENCH, "--clock", "sundial"], 2, "unknown clock 'sundial'"),
    "bench-variant": (["bench", PLAIN, *BENCH, "--variant", "cbx"], 2, "unknown variant 'cbx'"),
    "bench-kwargs-conflict": (["bench", *VIT, "--img-size", "28", "--model-kwargs", *ARCH, "img_size=32", *BENCH], 2,
                              "disagree"),
    "bench-repeats-0": (["bench", PLAIN, "--repeats", "0"], 2, "usage: Invalid value for '--repeats'"),
    "bench-threads-0": (["bench", PLAIN, "--threads", "0"], 2, "usage: Invalid value for '--threads'"),
    "bench-empty-checkpoint": (["bench", "vit_tiny_patch16_224", "--checkpoint", "{in}/empty.bin", *KW, *BENCH], 2,
                               "the file is empty"),
    # --- issue 24: nothing lost, round 2 ------------------------------------------------------------
    # Outputs that name an input: by another spelling, through a hard link, inside a dataset folder.
    "report-output-is-the-results": (["report", "{in}/results.json", "-o", "{in}/results.json"], 2, "is an input"),
    "report-output-is-the-second-input": (["report", "{in}/results.json", "{in}/baseline.json", "-o", "{in}/baseline-symlink.json"],
                                          2, "is an input of this command ({in}/baseline.json)"),
    "report-output-is-a-picture": (["report", "{in}/results.json", "-o", "{in}/pic.png", "--pictures", "{in}/pic.png"], 2,
                                   "--output {in}/pic.png is an input"),
    "report-output-is-a-hard-link": (["report", "{in}/results.json", "-o", "{in}/results-link.json"], 2,
                                     "is an input of this command ({in}/results.json)"),
    "viz-output-is-the-model": (["viz", PLAIN, "--dataset", "sample", "--limit", "2", "-o", PLAIN], 2, "is an input"),
    "viz-output-is-an-image": (["viz", PLAIN, "--images", "{in}/images/c0/0.png", "-o", "{in}/images/c0/0.png"], 2,
                               "is an input"),
    "viz-output-in-the-dataset": (["viz", PLAIN, "--dataset", "{in}/images", "-o", "{in}/images/v.png"], 2,
                                  "lies inside the dataset folder {in}/images"),
    "viz-output-not-png": (["viz", PLAIN, "--dataset", "sample", "-o", "{out}/v.jpg"], 2, "cbtool writes PNG pictures"),
    "inject-output-is-a-hard-link": (["inject", PLAIN, "-o", "{in}/plain-link.safetensors", "--force"], 2,
                                     "is an input of this command ({in}/plain.safetensors)"),
    "inject-output-pth": (["inject", *VIT, *KW, "-o", "{out}/m.pth"], 2, "cbtool writes safetensors files; name it m.safetensors"),
    "eval-json-is-a-hard-link-to-the-model": (["eval", PLAIN, *EVAL, "--json", "{in}/plain-link.safetensors"], 2,
                                              "is an input of this command"),
    "eval-plot-not-png": (["eval", CB, *EVAL, "--plot", "{out}/p.jpg"], 2, "cbtool writes PNG pictures"),
    "tune-log-is-a-hard-link": (["finetune", PLAIN, *TUNE, "-o", OUT, "--log", "{in}/plain-link.safetensors"], 2,
                                "is an input of this command"),
    "tune-output-pth": (["finetune", CB, *TUNE, "-o", "{out}/m.pt"], 2, "cbtool writes safetensors files"),
    "check-json-is-a-hard-link": (["check", "{in}/results.json", "--baseline", "{in}/baseline.json", "--json",
                                   "{in}/results-link.json"], 2, "is an input of this command"),
    "compare-plot-not-png": (["compare", "{in}/results.json", "{in}/baseline.json", "--plot", "{out}/p.jpg"], 2,
                             "cbtool writes PNG pictures"),
    "bench-json-is-a-hard-link": (["bench", PLAIN, *BENCH, "--json", "{in}/plain-link.safetensors"], 2, "is an input"),
    "sweep-output-in-the-dataset": (["sweep", PLAIN, "--dataset", "{in}/images", "-o", "{in}/images/sweep"], 2,
                                    "lies inside the dataset folder {in}/images"),
    "sweep-plot-not-png": (["sweep", PLAIN, "--dataset", "sample", "-o", "{out}/sweep", "--plot", "{out}/s.jpg"], 2,
                           "cbtool writes PNG pictures"),
    # NaN weights are refused at load, naming the tensors.
    "eval-nan-weights": (["eval", "{in}/nan.safetensors", *EVAL], 2,
                         "{in}/nan.safetensors has non-finite weights (NaN or infinity) in 2 tensor(s): "
                         "blocks.0.attn.qkv.weight, head.bias; the file is damaged"),
    "eval-nan-checkpoint": (["eval", "vit_tiny_patch16_224", "--checkpoint", "{in}/nan-state.safetensors", *KW, *EVAL], 2,
                            "has non-finite weights (NaN or infinity) in 2 tensor(s)"),
    "eval-outputs-overflow": (["eval", "{in}/overflow.safetensors", *EVAL, "--json", JSON], 2,
                              "model {in}/overflow.safetensors gave non-finite values (metrics.loss"),
    "inject-nan-weights": (["inject", "{in}/nan.safetensors", "-o", OUT], 2, "has non-finite weights"),
    "bench-nan-weights": (["bench", "{in}/nan.safetensors", *BENCH], 2, "has non-finite weights"),
    # Hugging Face folders load strictly: a config of 1 layer beside 2 layers of weights, a folder without its head.
    "eval-hf-config-short-of-the-weights": (["eval", "{in}/hf-short", *EVAL], 2,
                                            "{in}/hf-short: 16 tensor(s) in the weights but not in the model its "
                                            "config.json describes: vit.layers.1."),
    "eval-hf-without-its-head": (["eval", "{in}/hf-headless", *EVAL], 2,
                                 "2 tensor(s) missing from the weights (they would stay random): classifier.bias, "
                                 "classifier.weight (give --num-classes N for a new head)"),
    "inject-hf-config-short-of-the-weights": (["inject", "{in}/hf-short", "-o", OUT], 2, "in the weights but not in the model"),
    "inject-hf-without-its-head": (["inject", "{in}/hf-headless", "-o", OUT], 2, "missing from the weights"),
    # Impossible results: out of range, contradicting themselves, missing top1 (bad input, not a regression).
    "check-top1-150": (["check", "{in}/top1-150.json", "--baseline", "{in}/results.json"], 2,
                       "metrics.top1 is 150.0, not a percentage from 0 to 100"),
    "check-top1-negative": (["check", "{in}/results.json", "--baseline", "{in}/top1-negative.json"], 2,
                            "metrics.top1 is -5.0, not a percentage from 0 to 100"),
    "check-correct-contradicts-top1": (["check", "{in}/all-wrong.json", "--baseline", "{in}/results.json"], 2,
                                       "top1 is 52.0 but correct says 0 (0 of 20)"),
    "check-correct-too-short": (["check", "{in}/short-correct.json", "--baseline", "{in}/results.json"], 2,
                                "metrics.correct has 2 samples but num_samples is 20"),
    "check-num-samples-0": (["check", "{in}/no-samples.json", "--baseline", "{in}/results.json"], 2,
                            "dataset.num_samples is 0, not a count of samples above 0"),
    "check-no-top1": (["check", "{in}/no-top1.json", "--baseline", "{in}/results.json"], 2, "metrics has no top1"),
    "check-nan-loss": (["check", "{in}/nan-loss.json", "--baseline", "{in}/results.json"], 2,
                       "metrics.loss is nan, not a finite number"),
    "check-rise-bound-on-top1": (["check", "{in}/results.json", "--baseline", "{in}/baseline.json", "--max-rise", "top1=1"],
                                 2, "top1 is better when it rises: a rise is an improvement; bound its drop, "
                                    "e.g. --max-drop top1=1"),
    "check-drop-bound-on-loss": (["check", "{in}/results.json", "--baseline", "{in}/baseline.json", "--max-drop",
                                  "loss=0.1"], 2, "loss is better when it falls"),
    "compare-top1-150": (["compare", "{in}/results.json", "{in}/top1-150.json"], 2, "not a percentage from 0 to 100"),
    "compare-correct-too-short": (["compare", "{in}/results.json", "{in}/short-correct.json"], 2,
                                  "correct has 2 samples but num_samples is 20"),
    "compare-no-top1": (["compare", "{in}/results.json", "{in}/no-top1.json"], 2, "has no top1"),
}


def _tiny(seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    arch = {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 28, "num_classes": 10, **kwargs}
    return resolve("vit_tiny_patch16_224", pretrained=False, model_kwargs=arch)


class _Evil:
    """Unpickling this would create the marker file; cbtool must never run it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """The shared inputs: tiny cbtool files, weights files good and bad, image folders and results files."""
    folder = tmp_path_factory.mktemp("inputs")
    save(_tiny(), folder / "plain.safetensors")
    save(inject(_tiny(), CBSpec()), folder / "cb.safetensors")
    save(inject(_tiny(img_size=32), CBSpec()), folder / "cb32.safetensors")
    save(_tiny(num_classes=2), folder / "two.safetensors")
    save(_tiny(dynamic_img_size=True), folder / "dynamic.safetensors")
    state = _tiny(seed=1).state_dict()
    save_file(state, str(folder / "weights.safetensors"))
    save(resolve("vit_tiny_patch16_224", pretrained=False, checkpoint=folder / "weights.safetensors",
                 model_kwargs=ARCH + ["img_size=28", "num_classes=10"]), folder / "trained.safetensors")  # fmt: skip
    save_file(_tiny(img_size=32).state_dict(), str(folder / "pos32.safetensors"))
    save_file(_tiny(patch_size=8, img_size=32).state_dict(), str(folder / "patch8.safetensors"))
    (folder / "empty.pth").write_bytes(b"")
    (folder / "empty.bin").write_bytes(b"")
    torch.save({"model": state, "args": {"cfg": Path("x")}}, folder / "objects.pth")
    torch.save({"model": state, "hook": _Evil(str(folder.parent / "pwned"))}, folder / "evil.pth")
    data = (folder / "objects.pth").read_bytes()
    (folder / "truncated.pth").write_bytes(data[: len(data) // 2])
    (folder / "random.safetensors").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    for c in range(10):
        (folder / "corrupt" / f"class{c}").mkdir(parents=True)
        (folder / "corrupt" / f"class{c}" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    for c in range(2):
        (folder / "images" / f"c{c}").mkdir(parents=True)
        Image.fromarray(np.full((28, 28), 40 * c, np.uint8)).save(folder / "images" / f"c{c}" / "0.png")
    _results_files(folder)
    _issue_24_inputs(folder)
    return folder


def _issue_24_inputs(folder: Path) -> None:
    """Hard links to inputs, a picture, NaN weights, Hugging Face folders that do not fit, impossible results."""
    os.link(folder / "plain.safetensors", folder / "plain-link.safetensors")
    os.link(folder / "results.json", folder / "results-link.json")
    os.symlink("baseline.json", folder / "baseline-symlink.json")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "pic.png")
    broken = _tiny()
    with torch.no_grad():
        broken.blocks[0].attn.qkv.weight[0, 0] = math.nan
        broken.head.bias[3] = math.inf
    save(broken, folder / "nan.safetensors")
    save_file(broken.state_dict(), str(folder / "nan-state.safetensors"))
    overflowing = _tiny()
    with torch.no_grad():  # finite weights whose logits are not: the loss is NaN
        overflowing.head.weight.fill_(3e38)
    save(overflowing, folder / "overflow.safetensors")
    _hf_folders(folder)
    results = json.loads((folder / "results.json").read_text())

    def edited(name: str, change) -> None:
        document = json.loads(json.dumps(results))
        change(document, document["models"][0]["metrics"])
        (folder / name).write_text(json.dumps(document))

    edited("top1-150.json", lambda d, m: m.update(top1=150.0, top5=None))
    edited("top1-negative.json", lambda d, m: m.update(top1=-5.0))
    edited("all-wrong.json", lambda d, m: m.update(top1=52.0, top5=100.0, correct="0" * 20))
    edited("short-correct.json", lambda d, m: m.update(correct="01"))
    edited("no-samples.json", lambda d, m: d["dataset"].update(num_samples=0))
    edited("no-top1.json", lambda d, m: m.pop("top1"))
    edited("nan-loss.json", lambda d, m: m.update(loss=math.nan))


def _hf_folders(folder: Path) -> None:
    """A tiny ViT saved with save_pretrained; one whose config says 1 layer beside 2 layers of weights; one without
    its classifier weights."""
    import transformers

    config = transformers.ViTConfig(image_size=28, patch_size=4, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64, num_labels=10)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config)
    for name in ("hf-short", "hf-headless"):
        model.save_pretrained(folder / name)
    short = json.loads((folder / "hf-short" / "config.json").read_text())
    (folder / "hf-short" / "config.json").write_text(json.dumps({**short, "num_hidden_layers": 1}))
    weights = folder / "hf-headless" / "model.safetensors"
    state = {k: v for k, v in load_file(str(weights)).items() if not k.startswith("classifier.")}
    save_file(state, str(weights), metadata={"format": "pt"})


def _results_files(folder: Path) -> None:
    code = _run(["eval", str(folder / "cb.safetensors"), *EVAL, "--json", str(folder / "results.json")])
    assert code == 0
    results = json.loads((folder / "results.json").read_text())
    (folder / "baseline.json").write_text(json.dumps(results))
    worse = json.loads(json.dumps(results))
    metrics = worse["models"][0]["metrics"]
    metrics["correct"] = "0" * len(metrics["correct"])
    metrics["top1"], metrics["top5"] = 0.0, 0.0
    baseline = json.loads(json.dumps(results))
    baseline["models"][0]["metrics"].update(top1=100.0, top5=100.0, correct="1" * len(metrics["correct"]))
    (folder / "baseline.json").write_text(json.dumps(baseline))
    (folder / "worse.json").write_text(json.dumps(worse))
    nan = json.loads(json.dumps(results))
    nan["models"][0]["metrics"]["top1"] = math.nan
    (folder / "nan.json").write_text(json.dumps(nan))
    other = json.loads(json.dumps(results))
    other["dataset"].update(name="elsewhere", samples_sha256="0" * 64)
    (folder / "other-dataset.json").write_text(json.dumps(other))
    (folder / "other.json").write_text(json.dumps({"hello": 1}))


def _run(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as exited:
        return exited.code if isinstance(exited.code, int) else 0
    return 0


def _listing(folder: Path) -> dict[str, str]:
    """Every file under ``folder``, hidden temporaries included, with a hash of its bytes."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}  # fmt: skip


@pytest.mark.parametrize("case_id", CASES)
def test_bad_input(case_id, inputs, tmp_path, capsys, monkeypatch):
    argv, code, phrase = CASES[case_id]
    monkeypatch.delenv("CBTOOL_DEBUG", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)  # a default runs/ folder would show up here
    fill = {"in": str(inputs), "out": str(out)}
    before = _listing(inputs)
    result = _run([arg.format(**fill) for arg in argv])
    captured = capsys.readouterr()
    assert result == code, captured.err
    assert "Traceback" not in captured.out + captured.err
    if phrase.startswith("usage: "):
        assert phrase[len("usage: "):] in " ".join(captured.err.replace("│", " ").split()), captured.err
    else:
        lines = captured.err.strip().splitlines()
        prefix = "cbtool: error: " if code == 2 else "cbtool: error: regression"
        assert len(lines) == 1 and lines[0].startswith(prefix), captured.err
        assert phrase.format(**fill) in lines[0], lines[0]
        assert "weights_only" not in lines[0]  # never advise unpickling
    assert list(out.iterdir()) == []  # no output, no temporary, no run folder
    assert _listing(inputs) == before  # every input untouched
    assert not (inputs.parent / "pwned").exists()  # no pickled code ran


def test_the_battery_covers_every_command():
    commands = {argv[0] for argv, _, _ in CASES.values()}
    assert commands == {"inject", "info", "eval", "finetune", "check", "compare", "bench", "families", "report", "viz",
                        "sweep"}  # fmt: skip
    assert len(CASES) >= 80


def test_a_dynamic_size_model_takes_another_multiple_of_its_patch(inputs, tmp_path, capsys):
    """The awkward but valid case: --img-size on a saved model that takes any multiple of its patch."""
    out = tmp_path / "r.json"
    assert _run(["eval", str(inputs / "dynamic.safetensors"), *EVAL, "--img-size", "32", "--json", str(out)]) == 0, (
        capsys.readouterr().err)
    assert json.loads(out.read_text())["preprocessing"]["input_size"] == [3, 32, 32]


# --- issue 19: every error a user can cause is one line -------------------------------------------------------
# Outputs that cannot be written (a read-only file system, a full disk: small tmpfs mounts, as root), cbtool files
# whose metadata lies, malformed Hugging Face configs, numbers past what the machine takes, --markdown onto a
# binary file, --model-kwargs given twice or of the wrong type. Each case: its exit code, one line on stderr, no
# traceback, no file or temporary left anywhere, and every input (and every file already on the mounts) unchanged.

import errno  # noqa: E402
import subprocess  # noqa: E402
import typing  # noqa: E402

from safetensors import safe_open  # noqa: E402

SAMPLE = ["--dataset", "sample", "--limit", "20", "--workers", "0", "--quiet"]
CASES_19: dict[str, tuple[list[str], int, str]] = {
    # outputs on a read-only file system: refused before any work, the file already there kept
    "ro-inject": (["inject", PLAIN, "-o", "{ro}/m.safetensors"], 2, "cannot write {ro}/m.safetensors: the file system is read-only"),
    "ro-inject-force-over-a-file": (["inject", PLAIN, "-o", "{ro}/old.safetensors", "--force"], 2, "the file system is read-only"),
    "ro-eval-json": (["eval", CB, *EVAL, "--json", "{ro}/old.json"], 2, "cannot write {ro}/old.json: the file system is read-only"),
    "ro-eval-plot": (["eval", CB, *EVAL, "--density", "--plot", "{ro}/p.png"], 2, "cannot write {ro}/p.png: the file system"),
    "ro-check-markdown": (["check", "{in}/results.json", "--baseline", "{in}/results.json", "--markdown", "{ro}/summary.md"], 2,
                          "cannot write {ro}/summary.md: the file system is read-only"),
    "ro-check-json": (["check", "{in}/results.json", "--baseline", "{in}/results.json", "--json", "{ro}/c.json"], 2, "read-only"),
    "ro-compare-plot": (["compare", "{in}/results.json", "{in}/baseline.json", "--plot", "{ro}/p.png"], 2, "read-only"),
    "ro-compare-markdown": (["compare", "{in}/results.json", "{in}/baseline.json", "--markdown", "{ro}/summary.md"], 2, "read-only"),
    "ro-compare-json": (["compare", "{in}/results.json", "{in}/baseline.json", "--json", "{ro}/c.json"], 2, "read-only"),
    "ro-bench-json": (["bench", PLAIN, *BENCH, "--json", "{ro}/b.json"], 2, "cannot write {ro}/b.json: the file system is read-only"),
    "ro-report": (["report", "{in}/results.json", "-o", "{ro}/r.html"], 2, "cannot write {ro}/r.html: the file system is read-only"),
    "ro-viz": (["viz", PLAIN, "--dataset", "sample", "--limit", "2", "-o", "{ro}/v.png"], 2, "cannot write {ro}/v.png"),
    "ro-sweep-folder": (["sweep", PLAIN, *TUNE, "-o", "{ro}/sweep"], 2, "cannot write the sweep folder {ro}/sweep"),
    "ro-sweep-summarize-plot": (["sweep", "--summarize", "{in}/no-sweep", "--plot", "{ro}/p.png"], 2, "cannot write {ro}/p.png"),
    "ro-finetune-run-folder": (["finetune", PLAIN, *TUNE, "-o", OUT, "--run-dir", "{ro}/run"], 2, "cannot write the run folder {ro}/run"),
    "ro-finetune-log": (["finetune", PLAIN, *TUNE, "-o", OUT, "--log", "{ro}/log.jsonl"], 2, "cannot write the --log folder {ro}"),
    "ro-eval-save-examples": (["eval", CB, *EVAL, "--corruptions", "fog", "--severities", "1", "--save-examples", "{ro}"], 2,
                              "cannot write the --save-examples folder {ro}"),
    "ro-finetune-output": (["finetune", PLAIN, *TUNE, "-o", "{ro}/t.safetensors"], 2, "cannot write {ro}/t.safetensors"),
    # a full disk: refused before any work when nothing is free ...
    "full-inject": (["inject", PLAIN, "-o", "{full}/m.safetensors"], 2, "cannot write {full}/m.safetensors: no space left on the device"),
    "full-eval-json-over-a-file": (["eval", CB, *EVAL, "--json", "{full}/keep.json"], 2, "cannot write {full}/keep.json: no space left"),
    "full-check-json": (["check", "{in}/results.json", "--baseline", "{in}/results.json", "--json", "{full}/c.json"], 2, "no space left"),
    "full-compare-markdown": (["compare", "{in}/results.json", "{in}/baseline.json", "--markdown", "{full}/s.md"], 2, "no space left"),
    "full-finetune-run-folder": (["finetune", PLAIN, *TUNE, "-o", OUT, "--run-dir", "{full}/run"], 2,
                                 "cannot write the run folder {full}/run: no space left on the device; free some space or pick another"),
    # ... and when the disk fills in the middle of a write (streamed safetensors, a matplotlib PNG)
    "small-inject-mid-write": (["inject", PLAIN, "-o", "{small}/m.safetensors"], 2, "cannot write {small}/m.safetensors: no space left"),
    "small-compare-plot-mid-write": (["compare", "{in}/results.json", "{in}/density.json", "--plot", "{small}/p.png"], 2,
                                     "cannot write {small}/p.png: no space left"),
    # cbtool metadata that lies: the file, the key and the value
    "lie-std-0-eval": (["eval", "{lies}/std0.safetensors", *EVAL], 2, "std0.safetensors: cbtool_data_config.std is [0.5, 0.0, 0.5]"),
    "lie-crop-0-viz": (["viz", "{lies}/crop0.safetensors", "--dataset", "sample", "--limit", "2", "-o", "{out}/v.png"], 2,
                       "cbtool_data_config.crop_pct is 0, but it must be in (0, 1]"),
    "lie-interpolation-finetune": (["finetune", "{lies}/interp.safetensors", *TUNE, "-o", OUT], 2,
                                   "cbtool_data_config.interpolation is 'cubicle'"),
    "lie-mean-eval": (["eval", "{lies}/mean.safetensors", *EVAL], 2, "cbtool_data_config.mean is [0.5, 'x']"),
    "lie-mean-nan-eval": (["eval", "{lies}/mean-nan.safetensors", *EVAL], 2, "cbtool_data_config.mean is [0.5, nan, 0.5]"),
    "lie-std-2-values": (["eval", "{lies}/std2.safetensors", *EVAL], 2, "cbtool_data_config.std is [0.5, 0.5], but it must be 3"),
    "lie-input-size-0": (["eval", "{lies}/size0.safetensors", *EVAL], 2, "cbtool_data_config.input_size is [3, 0, 28]"),
    "lie-crop-mode": (["eval", "{lies}/cropmode.safetensors", *EVAL], 2, "cbtool_data_config.crop_mode is 'diagonal'"),
    "lie-model-name": (["info", "{lies}/noname.safetensors"], 2, "cbtool_source.model_name is ''"),
    "lie-model-kwargs": (["eval", "{lies}/kwargs.safetensors", *EVAL], 2, "cbtool_source.model_kwargs is [1, 2]"),
    "lie-library": (["eval", "{lies}/library.safetensors", *EVAL], 2, "cbtool_source.library is 'keras'"),
    # Hugging Face folders
    "hf-empty-config": (["eval", "{lies}/hf-empty", "--no-pretrained", *EVAL], 2, "hf-empty/config.json is empty"),
    "hf-malformed-config": (["inject", "{lies}/hf-malformed", "--no-pretrained", "-o", OUT], 2,
                            "hf-malformed/config.json is not valid JSON: Expecting value at line 2, column 7"),
    "hf-list-config": (["eval", "{lies}/hf-list", "--no-pretrained", *EVAL], 2, "hf-list/config.json holds a JSON list"),
    "hf-binary-config": (["eval", "{lies}/hf-binary", "--no-pretrained", *EVAL], 2, "hf-binary/config.json is not a text file"),
    # numbers past what the machine or the libraries take
    "seed-huge": (["finetune", PLAIN, *TUNE, "--seed", "99999999999999999999999", "-o", OUT], 2,
                  "--seed must be in [0, 4294967295], not 99999999999999999999999"),
    "seed-negative": (["finetune", PLAIN, *TUNE, "--seed", "-1", "-o", OUT], 2, "--seed must be in [0, 4294967295], not -1"),
    "seed-2-to-the-32": (["finetune", PLAIN, *TUNE, "--seed", str(2**32), "-o", OUT], 2, "--seed must be in [0, 4294967295]"),
    "sweep-seeds-negative": (["sweep", PLAIN, *TUNE, "--seeds", "0,-1", "-o", "{out}/sweep"], 2, "--seeds must be in [0, 4294967295], not -1"),
    "sweep-seeds-huge": (["sweep", PLAIN, *TUNE, "--seeds", "99999999999999999999999", "-o", "{out}/sweep"], 2,
                         "--seeds must be in [0, 4294967295]"),
    "bench-batch-of-940-gb": (["bench", PLAIN, *BENCH[:-3], "--batch-size", "100000000", "--quiet"], 2,
                              "out of memory at --batch-size 100000000: lower --batch-size"),
    "bench-batch-past-int32": (["bench", PLAIN, "--batch-size", "3000000000"], 2, "--batch-size must be in [1, 2147483647]"),
    "eval-batch-past-int32": (["eval", CB, *SAMPLE, "--batch-size", "99999999999999999999"], 2, "--batch-size must be in"),
    "eval-workers-huge": (["eval", CB, *SAMPLE, "--workers", "100000"], 2, "--workers must be in [0, 1024], not 100000"),
    "viz-panel-huge": (["viz", PLAIN, "--dataset", "sample", "--limit", "2", "--panel", "100000", "-o", "{out}/v.png"], 2,
                       "--panel must be in [32, 4096]"),
    "inject-img-size-huge": (["inject", *VIT, "--img-size", "1000000", "-o", OUT], 2, "--img-size must be in [1, 16384]"),
    "finetune-steps-huge": (["finetune", PLAIN, *TUNE[:-3], "--steps", str(2**40), "--quiet", "-o", OUT], 2, "--steps must be in"),
    "auto-augment-bogus": (["finetune", PLAIN, *TUNE, "--auto-augment", "bogus-policy", "-o", OUT], 2,
                           "--auto-augment 'bogus-policy': unknown policy 'bogus'"),
    "auto-augment-silent-section": (["finetune", PLAIN, *TUNE, "--auto-augment", "rand-mx", "-o", OUT], 2, "section 'mx' is not one of"),
    "auto-augment-bad-number": (["finetune", PLAIN, *TUNE, "--auto-augment", "rand-m9x", "-o", OUT], 2, "timm cannot parse it"),
    "auto-augment-sweep": (["sweep", PLAIN, *TUNE, "--auto-augment", "rand-n1000", "-o", "{out}/sweep"], 2, "n must be in [0, 64]"),
    # --markdown onto a binary file; --model-kwargs given twice or of the wrong type
    "check-markdown-binary": (["check", "{in}/results.json", "--baseline", "{in}/results.json", "--markdown", "{lies}/picture.md"],
                              2, "cannot append to {lies}/picture.md: it is not a UTF-8 text file (byte 0x89 at offset 0)"),
    "compare-markdown-binary": (["compare", "{in}/results.json", "{in}/baseline.json", "--markdown", "{lies}/nul.md"], 2,
                                "not a UTF-8 text file (byte 0x00 at offset 2)"),
    "kwargs-twice": (["inject", *VIT, "--model-kwargs", "patch_size=4", "patch_size=7", "-o", OUT], 2,
                     "--model-kwargs gives patch_size twice (patch_size=4 and patch_size=7); give it once"),
    "kwargs-text-for-a-number": (["inject", *VIT, "--model-kwargs", "embed_dim=abc", "-o", OUT], 2,
                                 "--model-kwargs embed_dim=abc: embed_dim takes a whole number, not 'abc'"),
    "kwargs-fraction-for-a-count": (["bench", *VIT, "--model-kwargs", *ARCH[:2], "depth=1.5", *BENCH], 2,
                                    "--model-kwargs depth=1.5: depth takes a whole number, not 1.5"),
}  # fmt: skip


def _mount(folder: Path, options: str) -> None:
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], check=True, capture_output=True)


@pytest.fixture(scope="module")
def mounts(tmp_path_factory):
    """``ro``: a read-only tmpfs holding files; ``full``: a 64 KiB tmpfs filled up (one file kept); ``small``: an empty
    16 KiB tmpfs that fills in the middle of a larger write. Root only (chmod does not stop root)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (a read-only folder made by chmod does not stop root either)")
    root = tmp_path_factory.mktemp("mounts")
    made = []
    try:
        for name, options in (("ro", "size=1m"), ("full", "size=64k"), ("small", "size=16k")):
            _mount(root / name, options)
            made.append(root / name)
    except (OSError, subprocess.CalledProcessError) as error:
        for folder in made:
            subprocess.run(["umount", str(folder)], check=False)
        pytest.skip(f"cannot mount a tmpfs here ({error}); the read-only and full-disk cases need one")
    (root / "ro" / "old.json").write_text('{"old": true}\n')
    (root / "ro" / "summary.md").write_text("# earlier steps\n")
    (root / "ro" / "old.safetensors").write_bytes(b"old model")
    subprocess.run(["mount", "-o", "remount,ro", str(root / "ro")], check=True)
    (root / "full" / "keep.json").write_text('{"keep": true}\n')
    with pytest.raises(OSError) as filled, open(root / "full" / "filler", "wb") as handle:
        while True:
            handle.write(b"\0" * 4096)
            handle.flush()
    assert filled.value.errno == errno.ENOSPC
    yield {"ro": str(root / "ro"), "full": str(root / "full"), "small": str(root / "small")}
    for folder in made:
        subprocess.run(["umount", str(folder)], check=False)


def _edited(source: Path, target: Path, key: str, **changes) -> None:
    """A copy of the cbtool file ``source`` whose metadata ``key`` has ``changes`` (what an edited or bit-flipped file says)."""
    from safetensors.torch import load_file

    with safe_open(str(source), "pt") as handle:
        metadata = dict(handle.metadata())
    record = json.loads(metadata[key])
    record.update(changes)
    save_file(load_file(str(source)), str(target), metadata={**metadata, key: json.dumps(record)})


@pytest.fixture(scope="module")
def lies(inputs, tmp_path_factory) -> Path:
    """Files whose contents lie or are malformed: cbtool metadata, Hugging Face configs, binary summaries."""
    folder = tmp_path_factory.mktemp("lies")
    plain, data = inputs / "plain.safetensors", "cbtool_data_config"
    for name, changes in {"std0": {"std": [0.5, 0.0, 0.5]}, "crop0": {"crop_pct": 0}, "interp": {"interpolation": "cubicle"},
                          "mean": {"mean": [0.5, "x"]}, "mean-nan": {"mean": [0.5, math.nan, 0.5]},
                          "std2": {"std": [0.5, 0.5]}, "size0": {"input_size": [3, 0, 28]},
                          "cropmode": {"crop_mode": "diagonal"}}.items():  # fmt: skip
        _edited(plain, folder / f"{name}.safetensors", data, **changes)
    _edited(plain, folder / "noname.safetensors", "cbtool_source", model_name="")
    _edited(plain, folder / "kwargs.safetensors", "cbtool_source", model_kwargs=[1, 2])
    _edited(plain, folder / "library.safetensors", "cbtool_source", library="keras")
    for name, content in {"hf-empty": b"", "hf-malformed": b'{"model_type": "vit",\n "x": }', "hf-list": b"[1]",
                          "hf-binary": b"\xff\xfe{}"}.items():  # fmt: skip
        (folder / name).mkdir()
        (folder / name / "config.json").write_bytes(content)
    (folder / "picture.md").write_bytes(b"\x89PNG\r\n\x1a\n\0\0")
    (folder / "nul.md").write_bytes(b"ab\0cd")
    return folder


@pytest.fixture(scope="module")
def density_results(inputs) -> None:
    """A results file with per-layer density, so that compare --plot has something to draw."""
    path = inputs / "density.json"
    if not path.exists():
        assert _run(["eval", str(inputs / "cb.safetensors"), *EVAL, "--density", "--json", str(path)]) == 0


@pytest.mark.parametrize("case_id", CASES_19)
def test_bad_input_19(case_id, inputs, lies, density_results, tmp_path, capsys, monkeypatch, request):
    argv, code, phrase = CASES_19[case_id]
    fill = {"in": str(inputs), "lies": str(lies), "out": str(tmp_path / "out")}
    if any(f"{{{name}}}" in arg for arg in argv for name in ("ro", "full", "small")):
        fill.update(request.getfixturevalue("mounts"))
    monkeypatch.delenv("CBTOOL_DEBUG", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)
    watched = [Path(fill[name]) for name in ("in", "lies", "ro", "full", "small") if name in fill]
    before = [_listing(folder) for folder in watched]
    result = _run([arg.format(**fill) for arg in argv])
    captured = capsys.readouterr()
    assert result == code, captured.err
    assert "Traceback" not in captured.out + captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cbtool: error: "), captured.err
    assert phrase.format(**fill) in lines[0], lines[0]
    assert list(out.iterdir()) == []  # no output, no temporary, no run folder
    assert [_listing(folder) for folder in watched] == before  # inputs, and files already on the mounts, as they were


def test_the_issue_19_battery_covers_every_writing_command():
    writers = {argv[0] for case, (argv, _, _) in CASES_19.items() if case.startswith(("ro-", "full-", "small-"))}
    assert writers == {"inject", "eval", "check", "compare", "bench", "report", "viz", "sweep", "finetune"}


def test_every_integer_option_has_a_range():
    """Each integer parameter of each command is named in ranges.INT_OPTIONS (which the CLI checks before any work)."""
    from cbtool.cli.app import app
    from cbtool.ranges import INT_OPTIONS, SEED_MAX

    found = set()
    for command in app.registered_commands:
        function = getattr(command.callback, "__wrapped__", command.callback)
        for name, hint in typing.get_type_hints(function, include_extras=True).items():
            base = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint
            if base in (int, typing.Optional[int]):
                found.add(name)
    assert found and found <= set(INT_OPTIONS), sorted(found - set(INT_OPTIONS))
    assert INT_OPTIONS["seed"] == (0, SEED_MAX) == (0, 2**32 - 1)


def _check_markdown(inputs: Path, target: str) -> int:
    return _run(["check", str(inputs / "results.json"), "--baseline", str(inputs / "results.json"), "--markdown", target])


def test_markdown_appends_to_a_text_file_on_a_new_line(inputs, tmp_path, capsys):
    summary = tmp_path / "summary.md"
    summary.write_text("# step one")  # no final newline
    assert _check_markdown(inputs, str(summary)) == 0
    text = summary.read_text()
    assert text.startswith("# step one\n### cbtool check passed\n")
    assert _check_markdown(inputs, str(summary)) == 0
    assert summary.read_text() == text + text[len("# step one\n"):]  # the second summary after the first
    assert [p.name for p in tmp_path.iterdir()] == ["summary.md"]


def test_markdown_appends_through_a_symlink(inputs, tmp_path, capsys):
    """GitHub's step summary may be a link: the link stays a link and its target gets the summary."""
    target, link = tmp_path / "target.md", tmp_path / "link.md"
    target.write_text("earlier\n")
    link.symlink_to(target)
    assert _check_markdown(inputs, str(link)) == 0
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text().startswith("earlier\n### cbtool check passed\n")


def test_markdown_appends_through_a_proc_self_fd_path(inputs, tmp_path, capsys):
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("no /proc/self/fd on this system")
    target = tmp_path / "summary.md"
    target.write_text("earlier\n")
    with open(target, "a") as handle:
        assert _check_markdown(inputs, f"/proc/self/fd/{handle.fileno()}") == 0
    assert target.read_text().startswith("earlier\n### cbtool check passed\n")
    assert [p.name for p in tmp_path.iterdir()] == ["summary.md"]


def test_markdown_through_a_link_to_a_binary_file_is_refused(inputs, lies, tmp_path, capsys):
    link = tmp_path / "link.md"
    link.symlink_to(lies / "picture.md")
    before = _listing(lies)
    assert _check_markdown(inputs, str(link)) == 2
    assert capsys.readouterr().err.strip().endswith("(byte 0x89 at offset 0); name a new file or a text file")
    assert _listing(lies) == before and link.is_symlink()


def test_an_existing_file_survives_a_full_disk_in_the_middle_of_a_write(mounts, capsys):
    """The temp-and-rename layer: the old file is kept whole, the temporary removed, the error one line."""
    from cbtool.errors import OutputError
    from cbtool.files import atomic_path

    small = Path(mounts["small"])
    old = small / "report.json"
    old.write_text("old\n")
    try:
        with pytest.raises(OutputError, match=r"cannot write .*report\.json: no space left on the device"):
            with atomic_path(old) as temporary:
                temporary.write_bytes(b"x" * 200_000)
        assert old.read_text() == "old\n" and [p.name for p in small.iterdir()] == ["report.json"]
    finally:
        old.unlink()


@pytest.mark.parametrize("message", ["[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: "
                                     "you tried to allocate 940000000000 bytes.", "CUDA out of memory. Tried to allocate 9 GiB"])
def test_eval_and_finetune_name_the_batch_size_when_memory_runs_out(message, inputs, tmp_path, capsys, monkeypatch):
    """The allocator's refusal, where it happens (a forward), becomes one line naming --batch-size."""
    import cbtool.evaluation
    import cbtool.train.loop

    def refuse(*args, **kwargs):
        raise RuntimeError(message)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cbtool.evaluation, "autocast_context", refuse)
    assert _run(["eval", str(inputs / "cb.safetensors"), *EVAL]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["cbtool: error: out of memory at --batch-size 10: lower --batch-size"]
    monkeypatch.setattr(cbtool.train.loop, "_train_step", refuse)
    assert _run(["finetune", str(inputs / "plain.safetensors"), *TUNE, "-o", str(tmp_path / "t.safetensors")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cbtool: error: out of memory on cpu at --batch-size 10: use a smaller --batch-size")
    assert not (tmp_path / "t.safetensors").exists()


def test_a_bug_shows_its_traceback_and_where_to_report_it(inputs, capsys, monkeypatch):
    """Only a bug in cbtool prints a traceback, and then it says where to report it; CBTOOL_DEBUG=1 re-raises."""
    import cbtool.results

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.delenv("CBTOOL_DEBUG", raising=False)
    monkeypatch.setattr(cbtool.results, "load_results", broken)
    argv = ["check", str(inputs / "results.json"), "--baseline", str(inputs / "results.json")]
    assert _run(argv) == 70
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError: a bug" in err
    assert err.strip().splitlines()[-1].startswith("cbtool: this is a bug in cbtool, not a problem with your input: please report it")
    monkeypatch.setenv("CBTOOL_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main(argv)


def test_library_users_get_the_same_ranges():
    from cbtool.errors import CbtoolError
    from cbtool.sweep.plan import parse_seeds
    from cbtool.train import FinetuneConfig

    with pytest.raises(CbtoolError, match=r"--seed must be in \[0, 4294967295\], not -3"):
        FinetuneConfig(seed=-3)
    with pytest.raises(CbtoolError, match=r"--auto-augment 'rand-mx'"):
        FinetuneConfig(auto_augment="rand-mx")
    assert FinetuneConfig(seed=2**32 - 1, auto_augment="rand-m9-mstd0.5-tweights").seed == 2**32 - 1
    assert parse_seeds("0,4294967295") == [0, 2**32 - 1]
    with pytest.raises(CbtoolError, match=r"--seeds must be in"):
        parse_seeds("4294967296")


# --- issue 24: cases that need their own set-up ------------------------------------------------------------------


def _one_line_error(capsys, code: int, phrase: str, result: int) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert result == code and len(err) == 1 and phrase in err[0], err
    return err[0]


def test_a_symlink_loop_in_a_dataset_counts_each_image_once(tmp_path, inputs, capsys):
    """``c0/loop -> ..`` and a link from c0 to a c1 image: 4 images, not hundreds; no c1 image labelled c0."""
    data = tmp_path / "data"
    for c in range(2):
        (data / f"c{c}").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((28, 28), 60 * c + i, np.uint8)).save(data / f"c{c}" / f"{i}.png")
    os.symlink("..", data / "c0" / "loop")
    os.symlink("../c1/0.png", data / "c0" / "stolen.png")
    before = _listing(data)
    out = tmp_path / "r.json"
    code = _run(["eval", str(inputs / "two.safetensors"), "--dataset", str(data), "--workers", "0", "--quiet",
                 "--json", str(out)])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 0 and len(err) == 1, err
    assert err[0].startswith(f"warning: '{data}': skipped 2 link(s)") and err[0].endswith("c0/loop, c0/stolen.png"), err
    assert json.loads(out.read_text())["dataset"]["num_samples"] == 4
    assert _listing(data) == before


def _short_run(folder: Path, inputs: Path, output: Path, *extra: str) -> None:
    assert _run(["finetune", str(inputs / "plain.safetensors"), *TUNE, "--run-dir", str(folder), "-o", str(output),
                 *extra]) == 0  # fmt: skip


@pytest.fixture(scope="module")
def two_runs(inputs, tmp_path_factory) -> tuple[Path, Path]:
    """Two finished runs of one step, with different seeds; their models are saved outside the run folders."""
    root = tmp_path_factory.mktemp("runs")
    _short_run(root / "a", inputs, root / "a.safetensors")
    _short_run(root / "b", inputs, root / "b.safetensors", "--seed", "1")
    return root / "a", root / "b"


def _mixed(tmp_path: Path, run: Path, other: Path, name: str) -> Path:
    """A copy of ``run`` with ``name`` taken from ``other``."""
    import shutil

    mixed = tmp_path / "mixed"
    shutil.copytree(run, mixed)
    shutil.copy(other / name, mixed / name)
    return mixed


@pytest.mark.parametrize("name, phrase", [
    ("checkpoint.json", "checkpoint.pt and checkpoint.json come from different runs"),
    ("log.jsonl", "log.jsonl holds no record of the run in checkpoint.pt"),
])  # fmt: skip
def test_resume_refuses_a_folder_that_mixes_two_runs(two_runs, tmp_path, capsys, name, phrase):
    mixed = _mixed(tmp_path, *two_runs, name)  # finished, but its model is not at -o: it would be resumed
    before = _listing(mixed)
    capsys.readouterr()
    _one_line_error(capsys, 2, phrase, _run(["finetune", "--resume", str(mixed), "-o", str(tmp_path / "m.safetensors"),
                                             "--quiet"]))  # fmt: skip
    assert _listing(mixed) == before and not (tmp_path / "m.safetensors").exists()


def test_resume_uses_the_folder_it_is_given(two_runs, tmp_path, capsys):
    """A run folder moved elsewhere resumes from where it is now; the original path is neither probed nor written."""
    import shutil

    run, _ = two_runs
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    original = _listing(run)
    output = tmp_path / "again.safetensors"
    capsys.readouterr()
    assert _run(["finetune", "--resume", str(moved), "-o", str(output), "--quiet"]) == 0, capsys.readouterr().err
    assert output.is_file() and _listing(run) == original
    events = [json.loads(line) for line in (moved / "log.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events][-2:] == ["resume", "end"]
    assert len({e["run"] for e in events}) == 1  # one run id throughout


def test_sweep_devices_without_cuda_is_refused(inputs, tmp_path, capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.chdir(tmp_path)
    before = _listing(inputs)
    result = _run(["sweep", str(inputs / "plain.safetensors"), *TUNE, "--devices", "0", "-o", str(tmp_path / "sweep")])
    _one_line_error(capsys, 2, "--devices 0 names GPU 0 but CUDA is not available", result)
    assert list(tmp_path.iterdir()) == [] and _listing(inputs) == before


def test_hf_folder_without_its_head_takes_a_new_one_with_num_classes(inputs, tmp_path, capsys):
    """--num-classes is the one way to put a fresh head on a Hugging Face folder; the encoder is the saved one."""
    from cbtool.models.resolve import resolve as resolve_model

    import transformers

    model = resolve_model(str(inputs / "hf-headless"), num_classes=10)
    reference = transformers.ViTForImageClassification.from_pretrained(str(inputs / "hf-headless")).state_dict()
    state = model.state_dict()
    encoder = [key for key in reference if not key.startswith("classifier.")]
    assert len(encoder) == len(state) - 2 and all(torch.equal(state[key], reference[key]) for key in encoder)
    assert model.config.num_hidden_layers == 2 and state["classifier.weight"].shape == (10, 32)


def test_a_ctrl_c_while_the_process_exits_is_exit_130_and_one_line(tmp_path):
    """A late Ctrl-C (in an atexit callback) ends the process with 130 and one line, never 0 with a traceback."""
    import subprocess
    import sys

    script = ("import atexit, os, signal, sys, time\n"
              "from cbtool.cli.app import exit_on_late_sigint\n"
              "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(5)))\n"
              "exit_on_late_sigint()\n"
              "print('results')\n")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 130 and done.stdout == "results\n"
    assert done.stderr.strip().splitlines() == ["cbtool: interrupted while exiting"]


def test_run_consistency_of_folders_with_and_without_run_ids(tmp_path):
    """The library check behind --resume: ids must agree; folders from before ids are held to step and settings."""
    from cbtool.errors import CbtoolError
    from cbtool.train.consistency import check_same_run, refuse_finished

    def folder(summary: dict, log: list[dict]) -> Path:
        (tmp_path / "checkpoint.json").write_text(json.dumps(summary))
        (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log) + '{"cut": ')  # a kill mid-line
        return tmp_path

    config = {"lr": 0.1, "seed": 0}
    saved = {"run_id": "aaa", "config": json.dumps(config), "state": {"step": 4}}
    log = tmp_path / "log.jsonl"
    check_same_run(saved, folder({"run_id": "aaa", "step": 4}, [{"run": "bbb"}, {"run": "aaa"}]), log)  # a shared log
    with pytest.raises(CbtoolError, match=r"come from different runs \(run aaa, step 4 vs run bbb, step 4\)"):
        check_same_run(saved, folder({"run_id": "bbb", "step": 4}, []), log)
    with pytest.raises(CbtoolError, match=r"holds no record of the run in checkpoint.pt \(run aaa, step 4; the log "
                                          r"starts with run bbb, step 1\)"):
        check_same_run(saved, folder({"run_id": "aaa", "step": 4}, [{"run": "bbb", "step": 1}]), log)
    legacy = {"config": json.dumps(config), "state": {"step": 4}}
    check_same_run(legacy, folder({"step": 4, "config": config}, [{"event": "start", "config": {"lr": 1}}]), log)
    with pytest.raises(CbtoolError, match=r"different runs \(step 4 vs step 6\)"):
        check_same_run(legacy, folder({"step": 6, "config": config}, []), log)
    with pytest.raises(CbtoolError, match="different runs"):
        check_same_run(legacy, folder({"step": 4, "config": {"lr": 0.2, "seed": 0}}, []), log)
    with pytest.raises(CbtoolError, match="holds no record"):
        check_same_run(legacy, folder({"step": 4, "config": config}, [{"run": "ccc"}]), log)
    refuse_finished(tmp_path, 3, 4, None)  # not finished
    refuse_finished(tmp_path, 4, 4, tmp_path / "missing.safetensors")  # finished, model missing: save it
    refuse_finished(tmp_path, 4, None, None)  # total unknown (an older summary): the loop decides
    with pytest.raises(CbtoolError, match=r"is already finished \(step 4 of 4\); nothing to resume"):
        refuse_finished(tmp_path, 4, 4, None)
