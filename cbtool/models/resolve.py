"""Turn a MODEL string into a model plus a record of where it came from (enough to rebuild it offline).

Accepted: a timm name (optionally with a pretrained tag), ``hf-hub:`` ids, a timm name with ``--checkpoint``,
a Hugging Face transformers id or local folder (``config.json`` + weights), and a file written by cbtool.
The record is attached to the model as ``model.cbtool_source`` and its preprocessing as ``model.cbtool_data_config``.
"""

from __future__ import annotations

import ast
import difflib
import json
import sys
from pathlib import Path
from typing import Any

from torch import nn

from cbtool.errors import CbtoolError, ModelSourceError, first_line
from cbtool.models.fit import (check_finite_weights, check_input_size, check_option_conflicts,  # noqa: F401
                               check_strict_load, has_trained_weights, is_head_key, mismatch_message,
                               quiet_loading_report, read_json_object, unreadable_message, wrong_kwarg_types)
from cbtool.models import provenance
from cbtool.models.hf_preprocessing import hf_data_config, image_processor_config  # noqa: F401 (re-exported)
from cbtool.models.architectures import (HF_ARCHITECTURES, choose_architecture, import_transformers,  # noqa: F401
                                         pretraining_head, rebuild)
from cbtool.models.hub import hub_access
from cbtool.ranges import check_seed

# The record's attribute names, kept here for code written against cbtool 0.1.0; cbtool.models.provenance owns them.
SOURCE_ATTRIBUTE = provenance.SOURCE
DATA_CONFIG_ATTRIBUTE = provenance.DATA_CONFIG
OFFLINE_HINT = "pass --no-pretrained for random weights or --checkpoint FILE for local weights"
HF_OFFLINE_HINT = "download it once with network access, or pass a local folder with config.json and model.safetensors"


def parse_model_kwargs(items: list[str] | None) -> dict[str, Any]:
    """``["patch_size=4", "global_pool=avg"]`` -> ``{"patch_size": 4, "global_pool": "avg"}`` (Python literals)."""
    kwargs: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key.isidentifier():
            raise ModelSourceError(f"bad --model-kwargs entry {item!r}: use key=value, e.g. patch_size=4")
        if key in kwargs:
            raise ModelSourceError(f"--model-kwargs gives {key} twice ({key}={kwargs[key]!r} and {item}); give it once")
        try:
            kwargs[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            kwargs[key] = text
    return kwargs


def resolve(
    model: str,
    *,
    pretrained: bool = True,
    checkpoint: str | Path | None = None,
    num_classes: int | None = None,
    img_size: int | None = None,
    model_kwargs: dict[str, Any] | list[str] | None = None,
    seed: int | None = None,
) -> nn.Module:
    """Build the model that ``model`` names, with ``model.cbtool_source`` and ``model.cbtool_data_config`` set.

    ``model_kwargs`` are timm ``create_model`` arguments: a dict, or ``key=value`` strings as the CLI takes them.
    ``seed`` seeds torch before anything is built, so random weights (``pretrained=False``, a new head) are the
    same on every run; the source record keeps it (``seed``) when the model has any.
    """
    if seed is not None:
        check_seed("seed", seed)
        import torch

        torch.manual_seed(seed)
    return _resolve(model, pretrained=pretrained, checkpoint=checkpoint, num_classes=num_classes,
                    img_size=img_size, model_kwargs=model_kwargs, seed=seed)


def _record_seed(model: nn.Module, seed: int | None, random_weights: bool) -> nn.Module:
    """Keep ``seed`` in the source record of a model some of whose weights it drew."""
    if seed is not None and random_weights and provenance.source_of(model) is not None:
        provenance.attach(model, source={**provenance.source_of(model), "seed": seed})
    return model


def _resolve(model: str, *, pretrained: bool, checkpoint, num_classes, img_size, model_kwargs, seed) -> nn.Module:
    if isinstance(model_kwargs, (list, tuple)):
        model_kwargs = parse_model_kwargs(list(model_kwargs))
    model_kwargs = dict(model_kwargs or {})
    check_option_conflicts(img_size, num_classes, model_kwargs)
    path = Path(model).expanduser()
    if path.suffix == ".safetensors" or (path.is_file() and not path.is_dir()):
        if checkpoint is not None:
            raise ModelSourceError("--checkpoint goes with a timm model name, not with a file")
        if model_kwargs:
            raise ModelSourceError("--img-size and --model-kwargs cannot change a saved model's architecture")
        from cbtool.models.checkpoint import load

        loaded = load(path)
        if num_classes is not None:
            from cbtool.families import detect

            if detect(loaded).num_classes(loaded) != num_classes:
                set_num_classes(loaded, num_classes)
                provenance.mark_fresh_head(loaded, has_trained_weights(loaded))
                _record_seed(loaded, seed, True)
        if img_size is not None:  # the size it was built for, or any size a dynamic-size model takes
            check_input_size(loaded, img_size, str(model))
            config = provenance.data_config_of(loaded) or {"input_size": [3, img_size, img_size]}
            provenance.attach(loaded, data_config={**config, "input_size": [config["input_size"][0], img_size, img_size]})
        return loaded
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{path} is a folder without config.json: expected a Hugging Face model folder")
        config = read_json_object(path / "config.json")
        if "architecture" in config and "model_type" not in config:  # a timm model saved with push_to_hub layout
            raise ModelSourceError(f"{path} holds a timm model: use its name with --checkpoint {path}/model.safetensors")
        return _record_seed(_resolve_transformers(str(path), local=True, pretrained=pretrained, num_classes=num_classes,
                                                  img_size=img_size, model_kwargs=model_kwargs, checkpoint=checkpoint),
                            seed, not pretrained or num_classes is not None)
    if model.startswith(("hf-hub:", "timm/")) or _is_timm_name(model):
        name = f"hf-hub:{model}" if model.startswith("timm/") else model
        built = _resolve_timm(name, pretrained=pretrained, checkpoint=checkpoint, num_classes=num_classes,
                              img_size=img_size, model_kwargs=model_kwargs, origin=model)
        drawn = checkpoint is None and not provenance.source_of(built)["pretrained"]
        return _record_seed(built, seed, drawn or provenance.has_fresh_head(built))
    if "/" in model and not model.startswith((".", "/", "~")):
        return _record_seed(_resolve_transformers(model, local=False, pretrained=pretrained, num_classes=num_classes,
                                                  img_size=img_size, model_kwargs=model_kwargs, checkpoint=checkpoint),
                            seed, not pretrained or num_classes is not None)
    if "/" in model or path.suffix:
        raise ModelSourceError(f"{model} does not exist")
    raise ModelSourceError(_unknown_name_message(model))


# --- timm ---------------------------------------------------------------------------------------


def _is_timm_name(name: str) -> bool:
    import timm

    architecture = name.split(".", 1)[0]
    return timm.is_model(architecture)


def _unknown_name_message(name: str) -> str:
    import timm

    close = difflib.get_close_matches(name.split(".", 1)[0], timm.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models() or use 'hf-hub:ORG/NAME'"
    return f"unknown model {name!r}: not a timm model, a Hugging Face id (ORG/NAME), a folder or a file{hint}"


def _resolve_timm(name: str, *, pretrained: bool, checkpoint, num_classes, img_size, model_kwargs, origin) -> nn.Module:
    import timm

    kwargs = dict(model_kwargs)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if img_size is not None:
        kwargs["img_size"] = img_size
    use_hub = pretrained and checkpoint is None
    hub_args: dict[str, Any] = {}
    try:
        with hub_access(f"the weights of {name}", OFFLINE_HINT):
            if name.startswith("hf-hub:"):
                # Rebuilding offline needs the architecture and the arguments the Hub config adds.
                from timm.models import load_model_config_from_hf

                pretrained_cfg, architecture, hub_args = load_model_config_from_hf(name[len("hf-hub:"):])
            model = timm.create_model(name, pretrained=use_hub, **kwargs)
    except CbtoolError:
        raise
    except Exception as error:  # timm asserts, divides by the patch size, ...: name what was asked for
        wrong = wrong_kwarg_types(name, kwargs)
        if wrong:  # the argument whose type the architecture does not take, rather than where that broke it
            raise ModelSourceError(f"cannot build timm model {name}: {wrong}") from None
        if isinstance(error, TypeError):
            raise ModelSourceError(f"bad architecture argument for {name} ({' '.join(f'{k}={v!r}' for k, v in kwargs.items())}): {first_line(error)}") from None
        raise ModelSourceError(f"cannot build timm model {name} with {' '.join(f'{k}={v!r}' for k, v in kwargs.items()) or 'its defaults'}: {first_line(error)}") from None
    if img_size is not None:
        check_input_size(model, img_size, name)
    # cbtool_fresh_head: trained weights under a new, untrained head (timm leaves it at its initialisation).
    if checkpoint is not None:
        provenance.mark_fresh_head(model, load_weights(model, checkpoint, allow_new_head=num_classes is not None))
    else:
        provenance.mark_fresh_head(model, use_hub and num_classes is not None and model.pretrained_cfg.get("num_classes") != num_classes)
        if use_hub:
            check_finite_weights(model.state_dict(), f"the weights of {name}")
    # The name as typed (with its tag, if any) rebuilds the same architecture and data config offline;
    # an hf-hub: id needs the network, so it is recorded as its architecture plus the Hub's arguments.
    rebuild_name = model.pretrained_cfg.get("architecture") if name.startswith("hf-hub:") else name
    record_kwargs = {**(hub_args or {}), **kwargs, "num_classes": int(model.num_classes)}
    record = {
        "library": "timm",
        "model_name": rebuild_name,
        "model_kwargs": record_kwargs,
        "origin": origin,
        "pretrained": bool(use_hub),
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
    }
    provenance.attach(model, source=record, data_config=timm_data_config(model, img_size))
    return model


def timm_data_config(model: nn.Module, img_size: int | None = None) -> dict[str, Any]:
    from timm.data import resolve_model_data_config

    config = {key: list(value) if isinstance(value, tuple) else value
              for key, value in resolve_model_data_config(model).items()}
    patch_embed = getattr(model, "patch_embed", None)
    size = getattr(patch_embed, "img_size", None)
    if img_size is not None:
        size = (img_size, img_size)
    if size is not None:
        config["input_size"] = [config["input_size"][0], int(size[0]), int(size[1])]
    return config


def load_weights(model: nn.Module, checkpoint: str | Path, *, allow_new_head: bool = False) -> bool:
    """Load a state dict from ``.safetensors`` or ``.pth``/``.bin`` (``weights_only=True``) into ``model``.

    Returns whether the file's head was left out for another class count (``allow_new_head``)."""
    state = read_state_dict(checkpoint)
    check_finite_weights(state, str(checkpoint))
    own, count = model.state_dict(), len(state)
    if allow_new_head:
        # A head of another class count is left at its fresh initialisation (as timm does for pretrained).
        state = {k: v for k, v in state.items() if not (k in own and own[k].shape != v.shape and is_head_key(model, k))}
    mismatched = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if allow_new_head:
        missing = [k for k in missing if not is_head_key(model, k)]
    if mismatched or missing or unexpected:
        raise ModelSourceError(mismatch_message(model, str(checkpoint), mismatched, missing, unexpected))
    model.load_state_dict(state, strict=not allow_new_head)
    return len(state) < count


def read_state_dict(path: str | Path) -> dict:
    """A flat state dict from a weights file, unwrapping the usual ``state_dict``/``model`` containers."""
    import torch

    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelSourceError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt files raise a zoo of types
        raise ModelSourceError(unreadable_message(path, error)) from None
    for key in ("state_dict_ema", "model_ema", "state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelSourceError(f"{path} holds no state dict of tensors")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def set_num_classes(model: nn.Module, num_classes: int) -> None:
    """Give ``model`` a fresh ``num_classes`` head and record it, so a saved file rebuilds with that head."""
    from cbtool.families import detect

    detect(model).reset_classifier(model, num_classes)
    if provenance.source_of(model) is not None:
        _update_num_classes(model, num_classes)


def _update_num_classes(model: nn.Module, num_classes: int) -> None:
    record = dict(provenance.source_of(model))
    if record["library"] == "timm":
        record["model_kwargs"] = {**record.get("model_kwargs", {}), "num_classes": num_classes}
    else:
        record["config"] = json.loads(model.config.to_json_string())
    provenance.attach(model, source=record)


# --- transformers -------------------------------------------------------------------------------


def _resolve_transformers(name: str, *, local: bool, pretrained: bool, num_classes, img_size, model_kwargs,
                          checkpoint) -> nn.Module:
    from cbtool.families.hf_heads import HEADED, add_head
    from cbtool.families import detect

    transformers = import_transformers()
    if img_size is not None:
        raise ModelSourceError("--img-size is not supported for transformers models; it needs new position embeddings")
    if checkpoint is not None:
        raise ModelSourceError("--checkpoint goes with a timm model name; a Hugging Face folder holds its own weights")
    what = f"the Hugging Face model {name}"
    overrides = dict(model_kwargs)
    if num_classes is not None:
        overrides["num_labels"] = num_classes
    try:
        with hub_access(what, HF_OFFLINE_HINT if not local else "check the folder"):
            if overrides:  # --model-kwargs mask_ratio=0 is a float field: transformers' validation wants 0.0
                plain = transformers.AutoConfig.from_pretrained(name, trust_remote_code=False)
                _check_config_keys(plain, model_kwargs, name)
                overrides = {key: float(value) if _float_field(plain, key, value) else value
                             for key, value in overrides.items()}
            config = transformers.AutoConfig.from_pretrained(name, trust_remote_code=False, **overrides)
            architecture = choose_architecture(config, name)
            dropped = pretraining_head(config, architecture)
            cls = getattr(transformers, architecture)
            if pretrained:
                with quiet_loading_report(bars=not local):  # cbtool says what did not fit, in one line (check_strict_load)
                    model, loading = cls.from_pretrained(name, config=config, trust_remote_code=False, output_loading_info=True,
                                                         ignore_mismatched_sizes=num_classes is not None)  # fmt: skip
            else:
                model = cls(config)
            processor = image_processor_config(name)
    except CbtoolError:
        raise
    except Exception as error:  # transformers raises many types for bad configs and files
        if "ignore_mismatched_sizes" in str(error):  # transformers' own words point at a report it logged
            raise ModelSourceError(f"cannot load {what}: its weights have other shapes than the model "
                                   f"{'--model-kwargs describe' if model_kwargs else 'its config.json describes'}; "
                                   "check the options") from None
        raise ModelSourceError(f"cannot load {what}: {first_line(error, 300)}") from None
    if pretrained:
        if dropped:  # the encoder of a pre-training checkpoint, as AutoModel loads it: the head's weights stay out
            loading["unexpected_keys"] = [key for key in loading.get("unexpected_keys") or []
                                          if not key.startswith(dropped)]
            _note(f"{name} holds {', '.join(config.architectures)}: loaded its encoder, {architecture}, "
                  f"without the pre-training head ({', '.join(p.rstrip('.') for p in dropped)})")
        check_strict_load(model, loading, name, new_head=num_classes is not None)
        check_finite_weights(model.state_dict(), name)
    if num_classes is not None and architecture in HEADED:  # a headless encoder: --num-classes adds a head
        model = add_head(model, num_classes)
        architecture = type(model).__name__
    elif num_classes is not None and detect(model).num_classes(model) is None:
        raise ModelSourceError(f"{name} is a {architecture}, which has no classification model in transformers, so "
                               "--num-classes cannot give it a head; leave --num-classes out (inject, viz and bench "
                               "take it headless)")
    record = {
        "library": "transformers",
        "architecture": architecture,
        "config": json.loads(model.config.to_json_string()),
        "origin": name,
        "pretrained": bool(pretrained),
        "checkpoint": None,
    }
    data_config = hf_data_config(model.config, processor, f"{name}/preprocessor_config.json")
    if processor:  # the image processor's mean, std and sizes are input like any other file's
        from cbtool.models.metadata import check_data_config

        check_data_config(data_config, f"{name}/preprocessor_config.json", "its data config")
    provenance.attach(model, source=record, data_config=data_config)
    return model




def _note(text: str) -> None:
    """A note on stderr, once per job (rank 0 under torchrun)."""
    from cbtool.distributed import is_main_process

    if is_main_process():
        print(f"note: {text}", file=sys.stderr)


def _check_config_keys(config, model_kwargs: dict, name: str) -> None:
    """Refuse ``--model-kwargs`` keys that ``config`` does not have: transformers would set them and nothing reads
    them. A field of a vision-text model's vision tower is named as such."""
    for key in model_kwargs:
        if hasattr(config, key) or hasattr(config, f"_{key}"):  # attn_implementation is kept as _attn_implementation
            continue
        tower = getattr(config, "vision_config", None)
        where = (f"; it is a field of {type(tower).__name__}, and cbtool sets the top-level config's fields only"
                 if tower is not None and hasattr(tower, key) else "")
        raise ModelSourceError(f"--model-kwargs {key}: {name}'s {type(config).__name__} has no field {key!r}{where}")


def _float_field(config, key: str, value: Any) -> bool:
    """Whether an integer ``--model-kwargs`` value sets a float field of a transformers config."""
    return isinstance(value, int) and not isinstance(value, bool) and isinstance(getattr(config, key, None), float)
