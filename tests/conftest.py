"""Shared fixtures: tiny random models (fixed seed, float32, eval mode), input images, and a ``python -m cbtool`` runner.

The model factories build through ``cbtool.models.resolve.resolve`` with ``pretrained=False``, so every model carries a
source record and can be saved; nothing touches the network.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SEED = 0

# Tiny architecture arguments for timm names: a few thousand parameters, milliseconds per forward on a CPU.
_TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5)
TINY_TIMM_KWARGS: dict[str, dict] = {
    "vit_tiny_patch16_224": _TINY_VIT,
    "deit_tiny_distilled_patch16_224": {**_TINY_VIT, "depth": 2},
    "eva02_tiny_patch14_224": {**_TINY_VIT, "depth": 2},
    "beit_base_patch16_224": {**_TINY_VIT, "depth": 2},
    "swin_tiny_patch4_window7_224": dict(
        img_size=64, window_size=4, embed_dim=24, depths=(1, 1), num_heads=(1, 2), num_classes=5
    ),
}
TINY_HF_CONFIG = dict(
    hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8,
    num_labels=5,
)
# transformers architecture -> model_type of its config.
HF_MODEL_TYPES = {
    "ViTForImageClassification": "vit",
    "ViTModel": "vit",
    "DeiTForImageClassification": "deit",
    "DeiTForImageClassificationWithTeacher": "deit",
    "Dinov2ForImageClassification": "dinov2",
    "Dinov2Model": "dinov2",
}


def perturb_(model, std: float = 0.1, seed: int = SEED):
    """Add seeded noise to every parameter, in place.

    Fresh inits keep heads, projections and layer scales near zero, which would hide a misplaced operation
    behind differences of 1e-8; the noise makes every branch matter.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * std)
    return model


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from more threads, and on a busy machine idle OpenMP threads stall each other
    (``pytestmark = pytest.mark.usefixtures("one_thread")`` in a module that trains)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def timm_model():
    """Factory ``timm_model(name="vit_tiny_patch16_224", seed=SEED, perturb=True, **kwargs)``: a tiny timm model.

    ``kwargs`` override the tiny arguments in ``TINY_TIMM_KWARGS`` for ``name``. The same name, seed and kwargs
    give the same weights, so two calls make a plain twin for a reference forward.
    """
    import torch

    from cbtool.models.resolve import resolve

    def build(name: str = "vit_tiny_patch16_224", *, seed: int = SEED, perturb: bool = True, **kwargs):
        torch.manual_seed(seed)
        model = resolve(name, pretrained=False, model_kwargs={**TINY_TIMM_KWARGS.get(name, {}), **kwargs})
        if perturb:
            perturb_(model, seed=seed)
        return model.float().eval()

    return build


@pytest.fixture
def hf_config():
    """Factory ``hf_config(model_type="vit", **overrides)``: a tiny transformers config (``TINY_HF_CONFIG``)."""

    def build(model_type: str = "vit", **overrides):
        import transformers

        return transformers.AutoConfig.for_model(model_type, **{**TINY_HF_CONFIG, **overrides})

    return build


@pytest.fixture
def hf_model(tmp_path_factory, hf_config):
    """Factory ``hf_model(architecture="ViTForImageClassification", seed=SEED, perturb=True, **config)``.

    Built through ``cbtool.models.resolve.resolve`` from a local folder holding only ``config.json``, as cbtool
    builds a Hugging Face model offline.
    """
    import torch

    from cbtool.models.resolve import resolve

    def build(architecture: str = "ViTForImageClassification", *, seed: int = SEED, perturb: bool = True, **overrides):
        config = hf_config(HF_MODEL_TYPES[architecture], **overrides)
        config.architectures = [architecture]
        folder = tmp_path_factory.mktemp(architecture)
        config.save_pretrained(folder)
        torch.manual_seed(seed)
        model = resolve(str(folder), pretrained=False)
        if perturb:
            perturb_(model, seed=seed)
        return model.float().eval()

    return build


@pytest.fixture
def images():
    """Factory ``images(size=32, batch=2, seed=SEED)``: a seeded float32 batch of shape (batch, 3, size, size)."""
    import torch

    def make(size: int = 32, batch: int = 2, seed: int = SEED):
        return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))

    return make


def _logits(model, x):
    import torch

    with torch.no_grad():
        output = model(x)
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    return logits if logits is not None else output.last_hidden_state


@pytest.fixture
def logits():
    """``logits(model, x)``: the logits of a timm or transformers classifier, without gradients
    (the last hidden state of a headless transformers model)."""
    return _logits


@pytest.fixture(scope="session")
def cli_env(tmp_path_factory) -> dict[str, str]:
    """The environment for ``python -m cbtool`` in a fresh process: this checkout first on the path,
    ``CBTOOL_DEBUG`` unset, and an empty Hugging Face cache (``HF_HOME``) so nothing is served from a cache."""
    dropped = {"CBTOOL_DEBUG", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE"}
    environment = {k: v for k, v in os.environ.items() if k not in dropped}
    environment["HF_HOME"] = str(tmp_path_factory.mktemp("hf_home"))
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), environment.get("PYTHONPATH")]))
    return environment


@pytest.fixture
def run_cli(tmp_path, cli_env):
    """Factory ``run_cli(*args, env=None, timeout=120)``: ``python -m cbtool ARGS`` in a fresh process, in
    ``tmp_path``, with ``cli_env`` updated by ``env``."""

    def run(*args, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "cbtool", *map(str, args)],
            cwd=tmp_path, env={**cli_env, **(env or {})}, capture_output=True, text=True, timeout=timeout,
        )

    return run


@pytest.fixture
def main_cli(capsys):
    """Factory ``main_cli(*args)``: ``cbtool ARGS`` in this process, through the console entry point (errors as one
    line, exit codes); returns ``(exit code, stderr)``. Faster than ``run_cli`` where a fresh process is not the point."""
    from cbtool.cli.app import main

    def run(*args) -> tuple[int, str]:
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as stop:
            code = stop.code or 0
        return code, capsys.readouterr().err

    return run


@pytest.fixture(scope="session")
def plain_and_cb_files(tmp_path_factory) -> Path:
    """A folder with ``plain.safetensors`` (a tiny 10-class ViT for 32 px images) and ``cb.safetensors``, its CB twin."""
    import torch

    import cbtool
    from cbtool.models.resolve import resolve

    folder = tmp_path_factory.mktemp("plain_and_cb")
    torch.manual_seed(SEED)
    model = resolve("vit_tiny_patch16_224", pretrained=False, model_kwargs={**_TINY_VIT, "num_classes": 10})
    cbtool.save(model, folder / "plain.safetensors")
    cbtool.inject(model, cbtool.CBSpec())
    cbtool.save(model, folder / "cb.safetensors")
    return folder


@pytest.fixture
def nan_loss_at(monkeypatch):
    """Factory ``nan_loss_at(n)``: the n-th cross-entropy computed from now on is nan (a training run then stops
    with a TrainingError after its last checkpoint); ``nan_loss_at(None)`` turns the poison off."""
    import torch.nn.functional as F

    real = F.cross_entropy
    state = {"calls": 0, "at": None}

    def poisoned(*args, **kwargs):
        state["calls"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if state["calls"] == state["at"] else loss

    monkeypatch.setattr(F, "cross_entropy", poisoned)

    def set_at(n: int | None) -> None:
        state["calls"], state["at"] = 0, n

    return set_at
