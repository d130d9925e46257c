"""cbtool files: save and load round trips, loading into stock models, deepcopy, metadata and refused files."""

from __future__ import annotations

import copy
import json
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from cbtool.models import checkpoint
from cbtool.models.checkpoint import describe, load, read_header, read_metadata, save
from cbtool.errors import CbtoolError, CheckpointError, OutputError
from cbtool.spec import CBSpec
from cbtool.surgery import find_broadcasts, inject, spec_of

# id: (builder fixture, builder args, spec or None, image size)
ROUND_TRIPS = {
    "timm-cb": ("timm_model", ("vit_tiny_patch16_224",), CBSpec("cb", "mlp", "0,-1"), 32),
    "timm-cbs": ("timm_model", ("vit_tiny_patch16_224",), CBSpec("cbs", "attn", "1-2", 0.3), 32),
    "timm-plain": ("timm_model", ("vit_tiny_patch16_224",), None, 32),
    "swin-cb": ("timm_model", ("swin_tiny_patch4_window7_224",), CBSpec("cb", "mlp"), 64),
    "hf-vit-cb": ("hf_model", ("ViTForImageClassification",), CBSpec("cb", "block", "-1"), 32),
    "hf-deit-teacher-cbs": ("hf_model", ("DeiTForImageClassificationWithTeacher",), CBSpec("cbs", "mlp"), 32),
    "hf-dinov2-backbone-cb": ("hf_model", ("Dinov2Model",), CBSpec("cb", "attn"), 32),
}


def tiny_file(timm_model, folder: Path, spec: CBSpec | None = CBSpec(), name: str = "model.safetensors") -> Path:
    model = timm_model()
    if spec is not None:
        inject(model, spec)
    return save(model, folder / name)


@pytest.mark.parametrize("case", ROUND_TRIPS.values(), ids=ROUND_TRIPS.keys())
def test_save_load_round_trip(request, tmp_path, images, logits, case):
    builder, args, spec, size = case
    model = request.getfixturevalue(builder)(*args)
    if spec is not None:
        inject(model, spec)
    with torch.no_grad():  # trained scales, not the initial ones, must survive the trip
        for index, (_, op) in enumerate(find_broadcasts(model)):
            if spec is not None and spec.variant == "cbs":
                op.scale.copy_(torch.linspace(0.1, 0.9, op.scale.numel()).roll(index))
    path = save(model, tmp_path / "out.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]  # no temporary file left behind
    loaded = load(path)
    assert not loaded.training
    assert type(loaded) is type(model)
    assert spec_of(loaded) == spec
    assert loaded.cbtool_source == _as_json(model.cbtool_source)
    assert loaded.cbtool_data_config == _as_json(model.cbtool_data_config)
    x = images(size)
    assert (logits(loaded, x) - logits(model, x)).abs().max().item() < 1e-6
    original, again = model.state_dict(), loaded.state_dict()
    assert list(again) == list(original)
    assert all(torch.equal(again[key], original[key]) for key in original)


@pytest.mark.parametrize("position", ["mlp", "attn", "block"])
def test_cb_file_loads_into_stock_timm_model(tmp_path, timm_model, images, logits, position):
    import timm

    plain = timm_model()
    path = save(inject(timm_model(), CBSpec("cb", position)), tmp_path / "cb.safetensors")
    stock = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2,
        num_classes=5,
    ).eval()
    stock.load_state_dict(load_file(path), strict=True)
    x = images()
    assert torch.equal(logits(stock, x), logits(plain, x))


def test_cb_file_loads_into_stock_hf_model(tmp_path, hf_model, images, logits):
    import transformers

    plain = hf_model()
    path = save(inject(hf_model(), CBSpec("cb", "mlp")), tmp_path / "cb.safetensors")
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=32,
        patch_size=8, num_labels=5,
    )
    stock = transformers.ViTForImageClassification(config).eval()
    stock.load_state_dict(load_file(path), strict=True)
    x = images()
    assert torch.equal(logits(stock, x), logits(plain, x))


def test_cbs_file_does_not_fit_a_stock_model_strictly(tmp_path, timm_model):
    path = save(inject(timm_model(), CBSpec("cbs", layers="0")), tmp_path / "cbs.safetensors")
    stock = timm_model(perturb=False)
    with pytest.raises(RuntimeError, match="blocks.0.mlp.cb.scale"):
        stock.load_state_dict(load_file(path), strict=True)


@pytest.mark.parametrize("variant", ["cb", "cbs"])
def test_deepcopy_keeps_hooks_on_the_copy(timm_model, images, logits, variant):
    model = inject(timm_model(), CBSpec(variant, "mlp"))
    twin = copy.deepcopy(model)
    x = images()
    before = logits(model, x)
    assert torch.equal(logits(twin, x), before)
    assert spec_of(twin) == spec_of(model)
    for (_, op), (_, op_copy), block in zip(find_broadcasts(model), find_broadcasts(twin), twin.blocks):
        assert op_copy is not op
        hooks = list(block.mlp._forward_hooks.values())
        assert len(hooks) == 1 and block.mlp.cb is op_copy  # the hook applies the copy's own operation
    if variant == "cbs":
        with torch.no_grad():
            twin.blocks[1].mlp.cb.scale.fill_(0.0)
        assert (logits(twin, x) - before).abs().max().item() > 1e-4
        assert torch.equal(logits(model, x), before)
        with torch.no_grad():
            model.blocks[2].mlp.cb.scale.fill_(1.0)
        assert not torch.equal(logits(model, x), before)
        assert torch.equal(twin.blocks[2].mlp.cb.scale, torch.full((32,), 0.5))


# --- metadata ------------------------------------------------------------------------------------


def test_metadata_is_strings_and_describes_the_file(tmp_path, timm_model):
    spec = CBSpec("cbs", "attn", "0,2", 0.25)
    model = inject(timm_model(), spec)
    path = save(model, tmp_path / "m.safetensors", training={"epochs": 1, "top1": 12.5})
    raw, tensors = read_header(path)
    assert all(isinstance(v, str) for v in raw.values())
    assert raw["format"] == "pt"
    assert CBSpec.from_json(raw["cbtool_spec"]) == spec
    assert json.loads(raw["cbtool_source"]) == _as_json(model.cbtool_source)
    assert set(tensors) == set(model.state_dict())
    metadata = read_metadata(path)
    assert metadata["cbtool_training"] == {"epochs": 1, "top1": 12.5}
    info = describe(path)
    assert info["cbtool"] is True
    assert info["cb_spec"] == spec.to_dict()
    assert info["cb_parameters"] == 2 * 32
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["tensors"] == len(model.state_dict())
    assert info["source"]["library"] == "timm" and info["source"]["pretrained"] is False
    assert load(path).cbtool_training == {"epochs": 1, "top1": 12.5}


def test_plain_safetensors_file_is_described_but_not_loaded(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(3, 4), "b": torch.zeros(4)}, str(path), metadata={"note": "hello"})
    info = describe(path)
    assert info == {"file": str(path), "tensors": 2, "parameters": 16, "cbtool": False, "metadata": {"note": "hello"}}
    with pytest.raises(CheckpointError, match="plain safetensors file without cbtool metadata.*--checkpoint"):
        load(path)


# --- refused files -------------------------------------------------------------------------------


def _header_bytes(header: dict) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text


CORRUPT_FILES = {
    "missing": (None, "does not exist"),
    "empty": (b"", "not a safetensors file (too short)"),
    "random-bytes": (bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).tolist()),
                     "not a safetensors file, or it is truncated (bad header length)"),
    "header-not-json": (struct.pack("<Q", 6) + b"{nope}", "unreadable header"),
    "header-a-list": (_header_bytes([1, 2]), "malformed safetensors header"),
    "tensor-beyond-end": (_header_bytes({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}) + b"\0" * 8,
                          "tensor 'w' lies beyond the end of the file"),
    "garbled-source": (_header_bytes({"__metadata__": {"cbtool_source": "{not json"}}),
                       "garbled cbtool metadata (cbtool_source is not valid JSON)"),
    "source-without-library": (_header_bytes({"__metadata__": {"cbtool_source": "{}"}}),
                               "cbtool_source lacks the model library"),
    "garbled-spec": (_header_bytes({"__metadata__": {"cbtool_source": '{"library": "timm"}', "cbtool_spec": "[1"}}),
                     "cbtool_spec is not valid JSON"),
    "metadata-not-strings": (_header_bytes({"__metadata__": {"cbtool_source": 5}}),
                             "malformed safetensors header (metadata must map strings to strings)"),
    "metadata-a-list": (_header_bytes({"__metadata__": ["cbtool_source"]}),
                        "malformed safetensors header (metadata must map strings to strings)"),
    "offsets-not-numbers": (_header_bytes({"w": {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}}),
                            "malformed safetensors header (entry 'w')"),
    "shape-not-numbers": (_header_bytes({"w": {"dtype": "F32", "shape": ["a"], "data_offsets": [0, 4]}}) + b"\0" * 4,
                          "malformed safetensors header (entry 'w')"),
    "entry-a-list": (_header_bytes({"w": [0, 4]}), "malformed safetensors header (entry 'w')"),
    "source-a-list": (_header_bytes({"__metadata__": {"cbtool_source": "[1]"}}), "cbtool_source is not a JSON object"),
    "spec-a-list": (_header_bytes({"__metadata__": {"cbtool_source": '{"library": "timm"}', "cbtool_spec": "[1]"}}),
                    "cbtool_spec is not a JSON object"),
    "spec-bad-value": (_header_bytes({"__metadata__": {"cbtool_source": '{"library": "timm"}',
                                                       "cbtool_spec": '{"position": "ffn"}'}}),
                       "garbled cbtool metadata (cbtool_spec: unknown position 'ffn'"),
    "data-config-a-list": (_header_bytes({"__metadata__": {"cbtool_source": '{"library": "timm"}',
                                                           "cbtool_data_config": "[1]"}}),
                           "cbtool_data_config is not a JSON object"),
}


@pytest.mark.parametrize("content, message", CORRUPT_FILES.values(), ids=CORRUPT_FILES.keys())
def test_corrupt_files_are_refused(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=_escaped(message)):
        describe(path)  # what `cbtool info` reads
    with pytest.raises(CheckpointError, match=_escaped(message)):
        load(path)


@pytest.mark.parametrize("cut", [4, 100, -1000, -1])
def test_truncated_copy_of_a_real_file_is_refused(tmp_path, timm_model, cut):
    path = tiny_file(timm_model, tmp_path)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match="truncated|too short"):
        describe(truncated)
    with pytest.raises(CheckpointError, match="truncated|too short"):
        load(truncated)


def test_weights_that_do_not_fit_the_recorded_architecture(tmp_path, timm_model):
    path = tiny_file(timm_model, tmp_path)
    metadata, _ = read_header(path)
    state = load_file(path)
    state.pop("head.bias")
    shrunk = tmp_path / "missing.safetensors"
    save_file(state, str(shrunk), metadata=metadata)
    with pytest.raises(CheckpointError, match="do not match the recorded architecture .*missing, e.g. head.bias"):
        load(shrunk)
    state = load_file(path)
    state["head.weight"] = torch.zeros(7, 32)
    wrong = tmp_path / "shape.safetensors"
    save_file(state, str(wrong), metadata=metadata)
    with pytest.raises(CheckpointError, match="do not match the recorded architecture"):
        load(wrong)


@pytest.mark.parametrize(
    "spec_text, expected",
    [
        ('{"scale_init": "x"}', "scale_init must be a number"),
        ('{"layers": "0-"}', "bad --layers term '0-'"),
        ('{"layers": "0-7"}', "layer 7 is out of range for a model with 3 blocks"),
        ('{"position": "attn"}', {"variant": "cb", "position": "attn", "layers": "all", "scale_init": 0.5}),
    ],
)
def test_spec_metadata_is_validated(tmp_path, timm_model, spec_text, expected):
    path = tiny_file(timm_model, tmp_path)
    metadata, _ = read_header(path)
    edited = tmp_path / "edited.safetensors"
    save_file(load_file(path), str(edited), metadata={**metadata, "cbtool_spec": spec_text})
    if isinstance(expected, dict):  # a partial spec reads back complete
        assert read_metadata(edited)["cbtool_spec"] == expected == describe(edited)["cb_spec"]
        assert spec_of(load(edited)) == CBSpec(position="attn")
        return
    with pytest.raises(CbtoolError, match=_escaped(expected)):
        load(edited)


# --- writing -------------------------------------------------------------------------------------


def test_existing_output_needs_force(tmp_path, timm_model):
    path = tiny_file(timm_model, tmp_path, spec=None)
    before = path.read_bytes()
    model = inject(timm_model(seed=1), CBSpec())
    with pytest.raises(OutputError, match="already exists; pass --force"):
        save(model, path)
    assert path.read_bytes() == before
    save(model, path, force=True)
    assert path.read_bytes() != before
    assert spec_of(load(path)) == CBSpec()


@pytest.mark.parametrize(
    "target, message",
    [
        ("missing/out.safetensors", "output folder .*missing does not exist"),
        (".", "is a folder; give a file name"),
    ],
)
def test_unwritable_outputs(tmp_path, timm_model, target, message):
    with pytest.raises(OutputError, match=message):
        save(timm_model(), tmp_path / target)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_no_file(tmp_path, timm_model, monkeypatch):
    def broken(_state, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "write_safetensors", broken)
    with pytest.raises(OutputError, match=r"cannot write .*out\.safetensors: disk full"):  # one line, the temporary removed
        save(timm_model(), tmp_path / "out.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_model_without_source_record_is_refused(tmp_path):
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=1, num_heads=2)
    with pytest.raises(CheckpointError, match="no cbtool source record"):
        save(model, tmp_path / "out.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_wrapped_models_are_unwrapped(tmp_path, timm_model):
    model = inject(timm_model(), CBSpec("cbs"))
    path = save(SimpleNamespace(module=model), tmp_path / "ddp.safetensors")
    assert set(load_file(path)) == set(model.state_dict())
    assert checkpoint.unwrap(SimpleNamespace(_orig_mod=model)) is model


def _as_json(value):
    """``value`` as it reads back from JSON metadata (tuples become lists)."""
    return json.loads(json.dumps(value))


def _escaped(text: str) -> str:
    import re

    return re.escape(text)


def test_non_finite_weights_are_refused_at_load_with_their_names(tmp_path, timm_model):
    """A bit-rotted file (issue 24): refused in one line naming the tensors, never evaluated as numbers."""
    from cbtool.errors import ModelSourceError
    from cbtool.models.fit import check_finite_weights, name_list

    path = tiny_file(timm_model, tmp_path)
    metadata, _ = read_header(path)
    state = load_file(path)
    names = sorted(name for name, tensor in state.items() if tensor.is_floating_point())[:6]
    for name in names:
        state[name].view(-1)[0] = float("nan") if len(name) % 2 else float("-inf")
    rotten = tmp_path / "rotten.safetensors"
    save_file(state, str(rotten), metadata=metadata)
    with pytest.raises(ModelSourceError) as info:
        load(rotten)
    message = str(info.value)
    assert message == (f"{rotten} has non-finite weights (NaN or infinity) in 6 tensor(s): {name_list(names)}; "
                       "the file is damaged")  # fmt: skip
    assert message.endswith("and 2 more; the file is damaged") and "\n" not in message
    check_finite_weights({"a": torch.ones(2), "steps": torch.tensor([3])}, "fine")  # integers are not checked
    assert name_list(["a", "b"]) == "a, b" and name_list(list("abcdef"), limit=2) == "a, b and 4 more"
