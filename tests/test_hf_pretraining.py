"""Hugging Face checkpoints of pre-training classes: a name or folder whose config lists ``ViTMAEForPreTraining``
loads its encoder (as ``AutoModel`` does), with the encoder's own weights, and says so; other refused classes are
named with the reason; integer ``--model-kwargs`` reach float config fields."""

from __future__ import annotations

import pytest
import torch
from test_family_reference import _HF, perturbed

from cbtool.errors import UnsupportedModelError
from cbtool.models.resolve import resolve

_DECODER = dict(decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                decoder_intermediate_size=32)


@pytest.fixture(scope="module")
def mae_folder(tmp_path_factory):
    import transformers

    torch.manual_seed(0)
    model = perturbed(transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(**_HF, **_DECODER)))
    folder = tmp_path_factory.mktemp("mae")
    model.save_pretrained(folder)
    return folder, model


def test_a_pretraining_checkpoint_loads_its_encoder(mae_folder, capsys):
    folder, pretraining = mae_folder
    model = resolve(str(folder), model_kwargs=["mask_ratio=0"])
    assert type(model).__name__ == "ViTMAEModel" and model.config.mask_ratio == 0.0
    assert model.cbtool_source["architecture"] == "ViTMAEModel"
    encoder = pretraining.vit.state_dict()
    state = model.state_dict()
    assert state.keys() == encoder.keys()
    assert all(torch.equal(state[key], encoder[key]) for key in state)  # the checkpoint's weights, not random ones
    err = capsys.readouterr().err
    assert "loaded its encoder, ViTMAEModel, without the pre-training head (decoder)" in err


def test_mae_with_masking_is_refused_naming_the_option(mae_folder, main_cli, tmp_path):
    folder, _ = mae_folder
    code, err = main_cli("inject", folder, "-o", tmp_path / "out.safetensors")
    lines = [line for line in err.splitlines() if line.startswith("cbtool:")]
    assert code == 2 and len(lines) == 1
    assert "drops a random 0.75 of the patches" in lines[0] and "--model-kwargs mask_ratio=0" in lines[0]
    assert not (tmp_path / "out.safetensors").exists()
    code, err = main_cli("inject", folder, "--model-kwargs", "mask_ratio=0", "-o", tmp_path / "out.safetensors")
    assert code == 0, err


def test_a_config_listing_a_refused_class_says_why(tmp_path):
    import transformers

    config = transformers.BeitConfig(**_HF)
    config.architectures = ["BeitForSemanticSegmentation"]
    config.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="is a BeitForSemanticSegmentation, a semantic-segmentation model"):
        resolve(str(tmp_path), pretrained=False)
    config.architectures = ["NoSuchModel"]
    config.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match=r"is a NoSuchModel model, which cbtool does not support; run "
                                                    r"`cbtool families`"):
        resolve(str(tmp_path), pretrained=False)


def test_num_classes_on_an_encoder_without_a_classification_model_is_refused(mae_folder, main_cli, tmp_path):
    folder, _ = mae_folder
    code, err = main_cli("inject", folder, "--model-kwargs", "mask_ratio=0", "--num-classes", "3",
                         "-o", tmp_path / "out.safetensors")
    assert code == 2 and "is a ViTMAEModel, which has no classification model in transformers, so --num-classes " \
                          "cannot give it a head" in err
