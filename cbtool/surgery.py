"""Insert Context Broadcasting into a model (resolve and validate every target first, then rewrite) and take it out.

Each operation is registered as the child ``cb`` of the module whose output ends the chosen branch and
applied by a forward hook on that module, so a ``cb`` model keeps the state-dict keys of the original
(it loads into stock timm/transformers with ``strict=True``) and ``cbs`` adds one ``<module>.cb.scale``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from torch import nn

from cbtool.broadcast import CHILD_NAME, BranchEnd, is_broadcast, make_broadcast, tensor_output_hook, tuple_output_hook
from cbtool.models import provenance
from cbtool.errors import SpecError, UnsupportedModelError
from cbtool.families import Family, detect
from cbtool.spec import CBSpec, scale_stats

SPEC_ATTRIBUTE = provenance.SPEC


@dataclass(frozen=True)
class _Target:
    block: nn.Module
    hooked: nn.Module
    token_dims: tuple[int, ...]
    tuple_output: bool
    dim: int
    norm_end: bool = False


def inject(model: nn.Module, spec: CBSpec | None = None) -> nn.Module:
    """Insert CB into ``model`` in place as ``spec`` says and return it.

    Every check runs before the first change, so a failure leaves the model untouched. For ``cb`` the
    state-dict keys are unchanged; ``cbs`` adds one ``<module>.cb.scale`` vector per rewritten block.
    """
    spec = spec or CBSpec()
    if not isinstance(spec, CBSpec):
        raise SpecError(f"spec must be a CBSpec, got {type(spec).__name__}")
    family = detect(model)
    require_plain(model, "inject it only once")
    blocks = family.blocks(model)
    targets = []
    for index in spec.resolve_layers(len(blocks)):
        name, block = blocks[index]
        branch = family.branch(block, spec.position)
        if CHILD_NAME in dict(branch.module.named_children()):
            raise UnsupportedModelError(f"a module in block {name} already has a child named {CHILD_NAME!r}")
        has_parameters = any(True for _ in branch.module.parameters())
        if _is_torch_leaf(branch.module) and not branch.norm_end and has_parameters:
            raise UnsupportedModelError(f"the {spec.position} branch of {name} ends in a {type(branch.module).__name__} "
                                        "with parameters, where cbtool cannot attach CB")
        targets.append(_Target(block, branch.module, branch.token_dims, branch.tuple_output,
                               family.block_dim(block), branch.norm_end))

    for target in targets:
        hooked = target.hooked if target.norm_end else _hookable(target.block, target.hooked)
        operation = make_broadcast(spec.variant, target.dim, spec.scale_init, target.token_dims)
        reference = next(target.block.parameters(), None)
        if reference is not None:
            operation.to(device=reference.device, dtype=reference.dtype)
        operation.overwrite_output = spec.position != "block"
        hooked.add_module(CHILD_NAME, operation)
        # First among the module's hooks: transformers installs its output-capturing hooks (hidden_states,
        # attentions) at the first call that asks for them, possibly before inject; they must read CB's output.
        hooked.register_forward_hook(tuple_output_hook if target.tuple_output else tensor_output_hook, prepend=True)
        if family.masked_tokens:
            target.block.register_forward_pre_hook(partial(_read_mask, family), with_kwargs=True)
    setattr(model, SPEC_ATTRIBUTE, spec)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Take Context Broadcasting out of ``model`` in place and return the plain model (as PEFT unloads an adapter).

    The hooks, the ``cb`` children (and with them any ``cbs`` scales) and the spec are removed; every other
    weight is untouched, so the result computes exactly what the model computed before ``inject``.
    """
    found = find_broadcasts(model)
    if not found and getattr(model, SPEC_ATTRIBUTE, None) is None:
        raise UnsupportedModelError("this model has no Context Broadcasting to remove")
    # Hooks are found by identity, not through handles, so that deep copies of a model remove their own.
    for module in model.modules():
        _drop_hooks(module._forward_hooks, (tensor_output_hook, tuple_output_hook))
        _drop_hooks(module._forward_pre_hooks, (_read_mask,))
    for name, _operation in found:
        parent_name = name.rpartition(".")[0]
        parent = model.get_submodule(parent_name)
        delattr(parent, CHILD_NAME)
        if isinstance(parent, BranchEnd):
            owner_name, _, attribute = parent_name.rpartition(".")
            setattr(model.get_submodule(owner_name), attribute, parent.inner)
    if SPEC_ATTRIBUTE in model.__dict__:
        delattr(model, SPEC_ATTRIBUTE)
    return model


def require_plain(model: nn.Module, instead: str) -> None:
    """Refuse a model that already has CB, in one line that ends with ``instead`` (what to do instead)."""
    existing = find_broadcasts(model)
    spec = spec_of(model)
    if existing or spec is not None:
        where = f"{spec.variant} at {spec.position}, layers {spec.layers}" if spec else f"at {existing[0][0]}"
        raise UnsupportedModelError(f"this model already has Context Broadcasting ({where}); {instead}")


def find_broadcasts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The CB operations in ``model``, with their qualified names."""
    return [(name, module) for name, module in model.named_modules() if is_broadcast(module)]


def spec_of(model: nn.Module) -> CBSpec | None:
    """The spec ``inject`` applied to ``model``, or None for a plain model."""
    return getattr(model, SPEC_ATTRIBUTE, None)


def broadcast_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learned CB parameters (the ``cbs`` scales); empty for ``cb``."""
    return [p for _, module in find_broadcasts(model) for p in module.parameters()]


def set_ramp(model: nn.Module, factor: float | None) -> None:
    """Scale every CB operation's mixing weight by ``factor`` in [0, 1] (``finetune --cb-ramp``: 0 is the plain
    model, 1 full CB); None restores the full weight and the plain code path."""
    if factor is not None and not 0.0 <= factor <= 1.0:
        raise ValueError(f"ramp factor must be in [0, 1], not {factor}")
    for _, module in find_broadcasts(model):
        module.set_ramp(factor)


def scale_summary(model: nn.Module) -> list[dict] | None:
    """The learned ``cbs`` scales per rewritten block (``module``, ``layer``: the block's index in the model's
    block order, ``mean``, ``min``, ``max``): how much uniform attention each layer wants. None without ``cbs``."""
    blocks = [name for name, _ in detect(model).blocks(model)]
    rows = []
    for name, module in find_broadcasts(model):
        if hasattr(module, "scale"):
            row = scale_stats(name, module.scale.detach().float().cpu().tolist())
            row["layer"] = next((i for i, block in enumerate(blocks) if name.startswith(block + ".")), None)
            rows.append(row)
    return rows or None


def legacy_scale_keys(model: nn.Module) -> dict[str, str]:
    """cbtool 0.1.0 saved ``cbs`` scales as ``<block>.cb.scale``: map those names to where they live now."""
    family = detect(model)
    mapping = {}
    for block_name, block in family.blocks(model):
        for name, module in block.named_modules():
            if is_broadcast(module) and hasattr(module, "scale"):
                mapping[f"{block_name}.{CHILD_NAME}.scale"] = f"{block_name}.{name}.scale"
    return mapping


def _is_torch_leaf(module: nn.Module) -> bool:
    # torch.fx traces torch.nn modules as leaves and drops their hooks.
    return type(module).__module__.startswith("torch.nn") and not isinstance(module, nn.Sequential)


def _hookable(block: nn.Module, module: nn.Module) -> nn.Module:
    """``module``, or a ``BranchEnd`` put in its place where ``module`` is a torch.nn leaf (Identity, Dropout)."""
    if module is block or not _is_torch_leaf(module):
        return module
    name = next(n for n, m in block.named_modules() if m is module)
    owner_name, _, attribute = name.rpartition(".")
    wrapper = BranchEnd(module)
    setattr(block.get_submodule(owner_name), attribute, wrapper)
    return wrapper


def _read_mask(family: Family, block: nn.Module, args: tuple, kwargs: dict) -> None:
    """Block pre-hook for families with padding tokens: tell the block's CB which tokens count."""
    weights = family.token_weights(family.block_mask(args, kwargs))
    for module in block.modules():
        if is_broadcast(module):
            module.token_weights = weights


def _drop_hooks(hooks: dict, functions: tuple) -> None:
    for key, hook in list(hooks.items()):
        if hook in functions or getattr(hook, "func", None) in functions:
            del hooks[key]
