"""Preprocessing built by timm's own ``create_transform``, so tensors match timm's pipeline."""

from __future__ import annotations

from cbtool.errors import DatasetError
from cbtool.models.metadata import INTERPOLATIONS  # noqa: F401  (public name kept here)

_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def resolve_preprocessing(data_config: dict, *, img_size=None, crop_pct=None, interpolation=None, is_training: bool = False) -> dict:
    """The timm data config with the user's overrides applied and checked (for the JSON record too).

    Training also accepts ``interpolation="random"`` (bilinear or bicubic per image, as timm's train.py).
    """
    missing = [key for key in ("input_size", "mean", "std") if key not in data_config]
    if missing:
        raise DatasetError(f"the model's data config lacks {', '.join(missing)}; pass a timm-style data config")
    config = {key: data_config.get(key) for key in _CONFIG_KEYS}
    config["interpolation"] = config["interpolation"] or "bilinear"
    config["crop_mode"] = config["crop_mode"] or "center"
    if img_size is not None:
        height, width = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if min(height, width) < 1:
            raise DatasetError(f"--img-size must be positive, not {img_size}")
        config["input_size"] = (3, int(height), int(width))
    if crop_pct is not None:
        if not 0.0 < crop_pct <= 1.0:
            raise DatasetError(f"--crop-pct must be in (0, 1], not {crop_pct}")
        config["crop_pct"] = float(crop_pct)
    if interpolation is not None:
        allowed = INTERPOLATIONS + (("random",) if is_training else ())
        if interpolation not in allowed:
            raise DatasetError(f"--interpolation must be one of {', '.join(allowed)}, not '{interpolation}'")
        config["interpolation"] = interpolation
    config["input_size"] = tuple(int(v) for v in config["input_size"])
    config["mean"] = tuple(float(v) for v in config["mean"])
    config["std"] = tuple(float(v) for v in config["std"])
    return config


def build_transform(data_config: dict, *, is_training: bool = False, img_size=None, crop_pct=None, interpolation=None, **train_options):
    """timm's eval transform (resize, center crop, normalize) or its training transform.

    ``data_config`` is what ``timm.data.resolve_data_config`` returns. ``train_options`` go to
    ``create_transform`` when ``is_training`` (``scale``, ``hflip``, ``auto_augment``, ``re_prob``, ...).
    """
    from timm.data import create_transform

    config = resolve_preprocessing(data_config, img_size=img_size, crop_pct=crop_pct, interpolation=interpolation, is_training=is_training)
    if is_training:
        return create_transform(
            input_size=config["input_size"], is_training=True, interpolation=config["interpolation"],
            mean=config["mean"], std=config["std"], **train_options,
        )  # fmt: skip
    if train_options:
        raise TypeError(f"training options given for an eval transform: {', '.join(train_options)}")
    return create_transform(
        input_size=config["input_size"], is_training=False, interpolation=config["interpolation"],
        mean=config["mean"], std=config["std"], crop_pct=config["crop_pct"], crop_mode=config["crop_mode"],
    )  # fmt: skip


# timm's policy families (the first dash-separated section) and the numeric sections each one reads.
_AUGMENT_SECTIONS = {"rand": ("m", "n", "p", "mstd", "mmax", "inc"), "augmix": ("m", "w", "d", "a", "b", "mstd"),
                     "original": ("mstd",), "originalr": ("mstd",), "v0": ("mstd",), "v0r": ("mstd",), "3a": ("mstd",)}
_AUGMENT_COUNTS = {"n": 64, "w": 64, "d": 64}  # ops per image, chains: each costs time on every training image


def check_auto_augment(policy: str) -> str:
    """``policy`` unchanged when timm can build it (parsed by timm itself, with a sample image size); otherwise
    one line naming the section it does not take. timm skips a section without a number silently, so those
    are refused here, and so are op counts that would make every image take seconds."""
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform

    sections = policy.split("-")
    family = sections[0]
    if family not in _AUGMENT_SECTIONS:
        raise DatasetError(f"--auto-augment {policy!r}: unknown policy {family!r}; use rand-..., augmix-... or one of "
                           f"{', '.join(name for name in _AUGMENT_SECTIONS if name not in ('rand', 'augmix'))} "
                           "(e.g. rand-m9-mstd0.5)")  # fmt: skip
    for section in sections[1:]:
        if family == "rand" and section.startswith("t"):
            continue  # a transform-set name, e.g. tweights
        key, value = _split_section(section)
        if key not in _AUGMENT_SECTIONS[family] or not value:
            raise DatasetError(f"--auto-augment {policy!r}: section {section!r} is not one of {family}'s "
                               f"{', '.join(name + 'N' for name in _AUGMENT_SECTIONS[family])}")
        if key in _AUGMENT_COUNTS and not 0 <= _number(value) <= _AUGMENT_COUNTS[key]:
            raise DatasetError(f"--auto-augment {policy!r}: {key} must be in [0, {_AUGMENT_COUNTS[key]}], not {value}")
    hparams = {"translate_const": 100, "img_mean": (124, 116, 104)}  # what timm's create_transform passes
    build = {"rand": rand_augment_transform, "augmix": augment_and_mix_transform}.get(family, auto_augment_transform)
    try:
        build(policy, hparams)
    except Exception as error:  # timm asserts, and int()/float() raise on a malformed number
        raise DatasetError(f"--auto-augment {policy!r}: timm cannot parse it ({error or type(error).__name__})") from None
    return policy


def _split_section(section: str) -> tuple[str, str]:
    """``"mstd0.5"`` -> ("mstd", "0.5"), as timm splits it (at the first digit)."""
    import re

    parts = re.split(r"(\d.*)", section, maxsplit=1)
    return (parts[0], parts[1]) if len(parts) > 1 else (section, "")


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return -2.0  # outside every count's range: refused with the count's own message
