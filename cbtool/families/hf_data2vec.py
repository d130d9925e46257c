"""transformers Data2VecVision: BEiT layers in the layout written before transformers 5 (tuple outputs, the MLP
split into ``intermediate`` and ``output``, attention maps returned only when asked, an SDPA class chosen at build)."""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Iterator

from torch import nn

from cbtool.families.base import AttentionCallback, Branch
from cbtool.families.hf_vit import HfViT, _MODELS

_DATA2VEC = f"{_MODELS}.data2vec.modeling_data2vec_vision"


class HfData2VecVision(HfViT):
    name = "hf-data2vec-vision"
    classes = (f"{_DATA2VEC}.Data2VecVisionModel", f"{_DATA2VEC}.Data2VecVisionForImageClassification")
    cb_semantics = "mean over all of one image's tokens (class token included); MLP branch ends at `output`"
    # The MLP branch is intermediate -> output; it ends at ``output`` (dense + dropout), before lambda_2.
    layer_classes = {f"{_DATA2VEC}.Data2VecVisionLayer": ("attention", "output")}

    def branch(self, block: nn.Module, position: str) -> Branch:
        if position == "block":
            return Branch(block, (1,), tuple_output=True)  # the layer returns (output, maps?)
        return super().branch(block, position)

    @contextmanager
    def capture_attention(self, model: nn.Module, callback: AttentionCallback,
                          query_chunks: bool = False) -> Iterator[None]:
        with ExitStack() as stack:
            for module in model.modules():
                stack.enter_context(_eager_class(module))
            stack.enter_context(super().capture_attention(model, callback, query_chunks))
            yield


@contextmanager
def _eager_class(module: nn.Module) -> Iterator[None]:
    """Run an SDPA self-attention as its eager parent class, which returns the maps, for the measurement.

    ``Data2VecVisionSdpaSelfAttention`` only overrides ``forward`` of ``Data2VecVisionSelfAttention``: same weights,
    same computation, but it returns no probabilities.
    """
    cls = type(module)
    parent = cls.__bases__[0] if cls.__bases__ else None
    if "Sdpa" not in cls.__name__ or parent is None or parent.__name__ != cls.__name__.replace("Sdpa", ""):
        yield
        return
    module.__class__ = parent
    try:
        yield
    finally:
        module.__class__ = cls
