"""CBSpec: which Context Broadcasting operation goes where, validated and JSON round-trippable."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from cbtool.errors import SpecError

VARIANTS = ("cb", "cbs")
DEFAULT_SCALE_INIT = 0.5
POSITIONS = ("mlp", "attn", "block")


@dataclass(frozen=True)
class CBSpec:
    """Where and how to insert Context Broadcasting.

    variant: ``cb`` (``0.5 * x + 0.5 * mean``) or ``cbs`` (``x + s * (mean - x)``, ``s`` learned per channel).
    position: ``mlp`` (end of the MLP branch, the paper's choice), ``attn`` (end of the attention branch)
        or ``block`` (the block's output, on the residual stream).
    layers: ``all`` or indices and ranges such as ``0,2,5-7``; negative indices count from the end.
    scale_init: initial value of the ``cbs`` scales; 0.5 makes ``cbs`` start equal to ``cb``.
    """

    variant: str = "cb"
    position: str = "mlp"
    layers: str = "all"
    scale_init: float = DEFAULT_SCALE_INIT

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise SpecError(f"unknown variant {self.variant!r}: choose one of {', '.join(VARIANTS)}")
        if self.position not in POSITIONS:
            raise SpecError(f"unknown position {self.position!r}: choose one of {', '.join(POSITIONS)}")
        object.__setattr__(self, "layers", _normalize_layers(self.layers))
        _parse_layer_terms(self.layers)  # syntax check now; range check needs the depth
        try:
            scale_init = float(self.scale_init)
        except (TypeError, ValueError):  # e.g. a garbled cbtool_spec in a file's metadata
            raise SpecError(f"scale_init must be a number in [0, 1], got {self.scale_init!r}") from None
        if not 0.0 <= scale_init <= 1.0:
            raise SpecError(f"scale_init must lie in [0, 1], got {self.scale_init}")
        if self.variant == "cb" and scale_init != DEFAULT_SCALE_INIT:
            raise SpecError(f"scale_init sets the learned scales of cbs; cb mixes with a fixed 0.5 (got {scale_init})")
        object.__setattr__(self, "scale_init", scale_init)

    @classmethod
    def from_options(cls, variant: str, position: str, layers: str, scale_init: float | None) -> "CBSpec":
        """The spec of the command-line options; ``--scale-init`` only goes with ``--variant cbs``."""
        if scale_init is not None and variant != "cbs":
            raise SpecError(f"--scale-init sets the learned scales of cbs; --variant {variant} has none (use --variant cbs)")
        return cls(variant, position, layers, DEFAULT_SCALE_INIT if scale_init is None else scale_init)

    def resolve_layers(self, depth: int) -> tuple[int, ...]:
        """The sorted block indices this spec selects in a model with ``depth`` blocks."""
        if self.layers == "all":
            return tuple(range(depth))
        chosen: set[int] = set()
        for start, end in _parse_layer_terms(self.layers):
            for index in (start, end):
                if not -depth <= index < depth:
                    raise SpecError(
                        f"layer {index} is out of range for a model with {depth} blocks "
                        f"(valid: 0..{depth - 1} or -{depth}..-1)"
                    )
            lo, hi = start % depth, end % depth
            if lo > hi:
                raise SpecError(f"empty layer range {start}-{end} in --layers {self.layers!r}")
            chosen.update(range(lo, hi + 1))
        return tuple(sorted(chosen))

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "CBSpec":
        if not isinstance(data, dict):
            raise SpecError(f"a CB spec must be a JSON object, got {type(data).__name__}")
        unknown = set(data) - {"variant", "position", "layers", "scale_init"}
        if unknown:
            raise SpecError(f"unknown CB spec field(s): {', '.join(sorted(unknown))}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "CBSpec":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise SpecError(f"the CB spec is not valid JSON ({error.msg})") from None
        return cls.from_dict(data)


def _normalize_layers(layers: object) -> str:
    if isinstance(layers, (list, tuple)):
        layers = ",".join(str(int(i)) for i in layers)
    if not isinstance(layers, str):
        raise SpecError(f"--layers must be a string like 'all' or '0,2,5-7', got {layers!r}")
    text = layers.replace(" ", "").lower()
    if not text:
        raise SpecError("--layers is empty: use 'all' or indices like '0,2,5-7'")
    return text


def _parse_layer_terms(layers: str) -> list[tuple[int, int]]:
    """Parse ``0,2,5-7,-1`` into inclusive (start, end) pairs; ``all`` gives an empty list."""
    if layers == "all":
        return []
    terms = []
    for term in layers.split(","):
        try:
            if term.count("-") == 0 or (term.startswith("-") and term.count("-") == 1):
                terms.append((int(term), int(term)))
                continue
            # a range: the separator is the first '-' that is not a leading sign
            split_at = term.index("-", 1)
            terms.append((int(term[:split_at]), int(term[split_at + 1 :])))
        except ValueError:
            raise SpecError(
                f"bad --layers term {term!r} in {layers!r}: use 'all' or indices and ranges like '0,2,5-7' or '-2--1'"
            ) from None
    return terms


def scale_stats(module: str, values: list[float]) -> dict:
    """``{"module", "mean", "min", "max"}`` of one learned ``cbs`` scale vector."""
    return {"module": module, "mean": sum(values) / len(values), "min": min(values), "max": max(values)}
