"""transformers' ``hidden_states`` carry CB whatever the order of the forward hooks.

transformers 5.x installs its output-capturing hooks on the encoder layers at the first call that asks for
``output_hidden_states`` or ``output_attentions``; a model called so before ``inject`` has them ahead of CB's hook.
CB's hook is registered first in line (``prepend``), so the captured layer outputs are the CB outputs. Each case
is checked against the hand-written forwards of ``test_family_reference``, with calls before and after inject.
"""

from __future__ import annotations

import pytest
import torch
from test_family_reference import CASES, POSITIONS, perturbed, plain_and_images, with_reference_forwards

from cbtool.families import detect
from cbtool.spec import CBSpec
from cbtool.surgery import inject, remove

# CLIPModel, SiglipModel and Siglip2Model want text as well: their vision towers are the *-vision cases.
HF_CASES = {name: case for name, case in CASES.items()
            if name.startswith("hf-") and name not in ("hf-clip", "hf-siglip", "hf-siglip2")}


def hidden_states(model, x, **flags):
    torch.manual_seed(0)  # MAE's patch order
    with torch.no_grad():
        args, kwargs = detect(model).model_inputs(model, x)  # SigLIP2: patch sequences
        return model(*args, **kwargs, output_hidden_states=True, **flags).hidden_states


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("case", HF_CASES.values(), ids=HF_CASES.keys())
def test_hidden_states_hold_the_cb_outputs_after_an_earlier_capturing_call(case, position):
    build, _, forwards = case
    plain, x = plain_and_images(case)
    expected = hidden_states(with_reference_forwards(plain, forwards, position), x)
    before = hidden_states(plain, x)  # installs transformers' capturing hooks before CB's
    with torch.no_grad():
        args, kwargs = detect(plain).model_inputs(plain, x)
        plain(*args, **kwargs, output_attentions=True)
    model = inject(plain, CBSpec("cb", position))
    for got in (hidden_states(model, x), hidden_states(model, x, output_attentions=True)):
        assert len(got) == len(expected)
        for index, (g, e) in enumerate(zip(got, expected)):
            assert (g - e).abs().max().item() < 1e-5, (index, position)
    assert max((g - b).abs().max().item() for g, b in zip(got, before)) > 1e-4  # cannot pass without CB
    torch.manual_seed(0)
    fresh = inject(perturbed(build()), CBSpec("cb", position))  # transformers' hooks installed after CB's
    for g, e in zip(hidden_states(fresh, x), expected):
        assert (g - e).abs().max().item() < 1e-5
    for g, b in zip(hidden_states(remove(fresh), x), before):  # and remove restores the plain states
        assert torch.equal(g, b)
