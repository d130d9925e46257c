"""Insert Context Broadcasting into a model: resolve and validate every target first, then rewrite."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from cbtool.broadcast import is_broadcast, make_broadcast
from cbtool.errors import SpecError, UnsupportedModelError
from cbtool.families import detect
from cbtool.spec import CBSpec

# The operation lives on its block under this name, so cbs scales are saved as ``<block>.cb.scale``.
CHILD_NAME = "cb"
SPEC_ATTRIBUTE = "cbtool_spec"


@dataclass(frozen=True)
class _Target:
    block_name: str
    block: nn.Module
    hooked: nn.Module
    dim: int


def inject(model: nn.Module, spec: CBSpec | None = None) -> nn.Module:
    """Insert CB into ``model`` in place as ``spec`` says and return it.

    Every check runs before the first change, so a failure leaves the model untouched. For ``cb`` the
    state-dict keys are unchanged; ``cbs`` adds one ``<block>.cb.scale`` vector per rewritten block.
    """
    spec = spec or CBSpec()
    if not isinstance(spec, CBSpec):
        raise SpecError(f"spec must be a CBSpec, got {type(spec).__name__}")
    family = detect(model)
    existing = find_broadcasts(model)
    if existing or getattr(model, SPEC_ATTRIBUTE, None) is not None:
        where = existing[0][0] if existing else "the model"
        raise UnsupportedModelError(f"this model already has Context Broadcasting (at {where}); inject it only once")
    blocks = family.blocks(model)
    targets = []
    for index in spec.resolve_layers(len(blocks)):
        name, block = blocks[index]
        if CHILD_NAME in dict(block.named_children()):
            raise UnsupportedModelError(f"block {name} already has a child named {CHILD_NAME!r}")
        targets.append(_Target(name, block, family.branch_module(block, spec.position), family.block_dim(block)))

    for target in targets:
        operation = make_broadcast(spec.variant, target.dim, spec.scale_init)
        reference = next(target.block.parameters(), None)
        if reference is not None:
            operation.to(device=reference.device, dtype=reference.dtype)
        operation.overwrite_output = spec.position != "block"
        target.block.add_module(CHILD_NAME, operation)
        target.hooked.register_forward_hook(operation.output_hook)
    setattr(model, SPEC_ATTRIBUTE, spec)
    return model


def find_broadcasts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The CB operations in ``model``, with their qualified names."""
    return [(name, module) for name, module in model.named_modules() if is_broadcast(module)]


def spec_of(model: nn.Module) -> CBSpec | None:
    """The spec ``inject`` applied to ``model``, or None for a plain model."""
    return getattr(model, SPEC_ATTRIBUTE, None)


def broadcast_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learned CB parameters (the ``cbs`` scales); empty for ``cb``."""
    return [p for _, module in find_broadcasts(model) for p in module.parameters()]
