"""Every registered family against a hand-written forward with CB, and uniform attention reading entropy 1.0.

The references below write each block's forward out by hand from the library's own code, with
``cb(t) = 0.5 * t + 0.5 * mean_tokens(t)`` inserted at the documented end of the branch: after the
attention / MLP module in pre-norm blocks (before layer scale, drop path and the residual add), after the
post-norm in post-norm blocks (ResPostBlock, SwinV2), over the whole stage map in Swin. A plain twin runs
these forwards; the injected model must match it to 1e-5, and differ from the plain model, so removing
CB (or putting it one module off) fails the test. Weights are perturbed so no branch is zero-initialised.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch

from cbtool.errors import UnsupportedModelError
from cbtool.evaluation import evaluate
from cbtool.families import detect
from cbtool.families.hf_vit import HEADED
from cbtool.metrics.density import DensityAccumulator
from cbtool.spec import CBSpec
from cbtool.surgery import find_broadcasts, inject, remove

POSITIONS = ("mlp", "attn", "block")


def cb(t: torch.Tensor, dims=(1,)) -> torch.Tensor:
    return 0.5 * t + 0.5 * t.mean(dim=dims, keepdim=True)


def at(position: str, here: str, t: torch.Tensor, dims=(1,)) -> torch.Tensor:
    return cb(t, dims) if position == here else t


# ----- hand-written block forwards, one per block type ---------------------------------------------
def timm_block(self, position, x, attn_mask=None, is_causal=False, **kw):  # vision_transformer.Block
    x = x + self.drop_path1(self.ls1(at(position, "attn", self.attn(self.norm1(x), attn_mask=attn_mask))))
    x = x + self.drop_path2(self.ls2(at(position, "mlp", self.mlp(self.norm2(x)))))
    return at(position, "block", x)


def timm_respost(self, position, x, attn_mask=None, is_causal=False):  # post-norm: CB after norm1 / norm2
    x = x + self.drop_path1(at(position, "attn", self.norm1(self.attn(x, attn_mask=attn_mask))))
    x = x + self.drop_path2(at(position, "mlp", self.norm2(self.mlp(x))))
    return at(position, "block", x)


def eva_block(self, position, x, rope=None, attn_mask=None, is_causal=False):
    a = at(position, "attn", self.attn(self.norm1(x), rope=rope, attn_mask=attn_mask))
    x = x + self.drop_path1(a if self.gamma_1 is None else self.gamma_1 * a)
    m = at(position, "mlp", self.mlp(self.norm2(x)))
    x = x + self.drop_path2(m if self.gamma_2 is None else self.gamma_2 * m)
    return at(position, "block", x)


def beit_block(self, position, x, shared_rel_pos_bias=None):
    a = at(position, "attn", self.attn(self.norm1(x), shared_rel_pos_bias=shared_rel_pos_bias))
    x = x + self.drop_path1(a if self.gamma_1 is None else self.gamma_1 * a)
    m = at(position, "mlp", self.mlp(self.norm2(x)))
    x = x + self.drop_path2(m if self.gamma_2 is None else self.gamma_2 * m)
    return at(position, "block", x)


def cait_block(self, position, x):  # LayerScaleBlock (self-attention over patch tokens)
    x = x + self.drop_path(self.gamma_1 * at(position, "attn", self.attn(self.norm1(x))))
    x = x + self.drop_path(self.gamma_2 * at(position, "mlp", self.mlp(self.norm2(x))))
    return at(position, "block", x)


def swin_block(self, position, x):  # (B, H, W, C); CB averages the whole map, never a window
    B, H, W, C = x.shape
    x = x + self.drop_path1(at(position, "attn", self._attn(self.norm1(x)), (1, 2)))
    x = x.reshape(B, -1, C)
    x = x + self.drop_path2(at(position, "mlp", self.mlp(self.norm2(x))))
    return at(position, "block", x.reshape(B, H, W, C), (1, 2))


def swinv2_block(self, position, x):  # post-norm
    B, H, W, C = x.shape
    x = x + self.drop_path1(at(position, "attn", self.norm1(self._attn(x)), (1, 2)))
    x = x.reshape(B, -1, C)
    x = x + self.drop_path2(at(position, "mlp", self.norm2(self.mlp(x))))
    return at(position, "block", x.reshape(B, H, W, C), (1, 2))


def relpos_block(self, position, x, shared_rel_pos=None):  # vision_transformer_relpos.RelPosBlock
    x = x + self.drop_path1(self.ls1(at(position, "attn", self.attn(self.norm1(x), shared_rel_pos=shared_rel_pos))))
    x = x + self.drop_path2(self.ls2(at(position, "mlp", self.mlp(self.norm2(x)))))
    return at(position, "block", x)


def relpos_post_block(self, position, x, shared_rel_pos=None):  # ResPostRelPosBlock: CB after norm1 / norm2
    x = x + self.drop_path1(at(position, "attn", self.norm1(self.attn(x, shared_rel_pos=shared_rel_pos))))
    x = x + self.drop_path2(at(position, "mlp", self.norm2(self.mlp(x))))
    return at(position, "block", x)


def sam_block(self, position, x):  # (B, H, W, C); attn CB only in global blocks (windowed ones are refused)
    from timm.models.vision_transformer_sam import window_partition, window_unpartition

    B, H, W, _ = x.shape
    h = self.norm1(x)
    if self.window_size > 0:
        windows, pad = window_partition(h, self.window_size)
        a = window_unpartition(self.attn(windows), self.window_size, (H, W), pad)
    else:
        a = at(position, "attn", self.attn(h), (1, 2))
    x = x + self.drop_path1(self.ls1(a))  # per channel and identity in eval: the same after the unpartition
    x = x.reshape(B, H * W, -1)
    x = x + self.drop_path2(self.ls2(at(position, "mlp", self.mlp(self.norm2(x)))))
    return at(position, "block", x.reshape(B, H, W, -1), (1, 2))


def swinv2_cr_block(self, position, x):  # post-norm, then the optional main-branch norm3
    x = x + self.drop_path1(at(position, "attn", self.norm1(self._shifted_window_attn(x)), (1, 2)))
    B, H, W, C = x.shape
    x = x.reshape(B, -1, C)
    x = self.norm3(x + self.drop_path2(at(position, "mlp", self.norm2(self.mlp(x)))))
    return at(position, "block", x.reshape(B, H, W, C), (1, 2))


def hf_vit_layer(self, position, x, attention_mask=None, **kw):
    x = self.dropout(at(position, "attn", self.attention(self.layernorm_before(x), attention_mask)[0])) + x
    x = self.dropout(at(position, "mlp", self.mlp(self.layernorm_after(x)))) + x
    return at(position, "block", x)


def hf_dinov2_layer(self, position, x, attention_mask=None, **kw):
    a = at(position, "attn", self.attention(self.norm1(x), attention_mask=attention_mask)[0])
    x = self.drop_path(self.layer_scale1(a)) + x
    x = self.drop_path(self.layer_scale2(at(position, "mlp", self.mlp(self.norm2(x))))) + x
    return at(position, "block", x)


def hf_clip_layer(self, position, x, attention_mask=None, **kw):  # CLIP and SigLIP
    x = x + at(position, "attn", self.self_attn(hidden_states=self.layer_norm1(x), attention_mask=attention_mask)[0])
    x = x + at(position, "mlp", self.mlp(self.layer_norm2(x)))
    return at(position, "block", x)


def hf_beit_layer(self, position, x, attention_mask=None, interpolate_pos_encoding=False, resolution=None, **kw):
    if self.relative_position_bias is not None:
        window = (resolution[0] // self.patch_size, resolution[1] // self.patch_size)
        bias = self.relative_position_bias(window, interpolate_pos_encoding, dim_size=x.shape[1])
        attention_mask = bias + attention_mask if attention_mask is not None else bias
    a = at(position, "attn", self.attention(self.layernorm_before(x), attention_mask=attention_mask)[0])
    x = self.drop_path(self.lambda_1 * self.dropout(a)) + x
    m = at(position, "mlp", self.mlp(self.layernorm_after(x)))
    x = self.drop_path(self.lambda_2 * self.dropout(m)) + x
    return at(position, "block", x)


def hf_swin_layer(self, position, x, input_dimensions, always_partition=False, **kw):
    from transformers.models.swin.modeling_swin import window_partition, window_reverse

    if not always_partition:
        self.set_shift_and_window_size(input_dimensions)
    height, width = input_dimensions
    batch, _, channels = x.shape
    shortcut = x
    h = self.layernorm_before(x).view(batch, height, width, channels)
    h, pad = self.maybe_pad(h, height, width)
    _, hp, wp, _ = h.shape
    windows = window_partition(self.cyclic_shift(h), self.window_size).view(-1, self.window_size**2, channels)
    mask = self.get_attn_mask(hp, wp, dtype=h.dtype, device=windows.device)
    out, weights = self.attention(windows, mask)
    out = self.dropout(out).view(-1, self.window_size, self.window_size, channels)
    out = self.cyclic_shift(window_reverse(out, self.window_size, hp, wp), reverse=True)
    out = out[:, :height, :width, :].contiguous().view(batch, height * width, channels)
    x = shortcut + self.drop_path(at(position, "attn", out))
    x = self.dropout(at(position, "mlp", self.mlp(self.layernorm_after(x)))) + x
    return at(position, "block", x), weights


def hf_dinov3_layer(self, position, x, attention_mask=None, position_embeddings=None, **kw):
    a = self.attention(self.norm1(x), attention_mask=attention_mask, position_embeddings=position_embeddings, **kw)[0]
    x = self.drop_path(self.layer_scale1(at(position, "attn", a))) + x
    x = self.drop_path(self.layer_scale2(at(position, "mlp", self.mlp(self.norm2(x))))) + x
    return at(position, "block", x)


def hf_data2vec_layer(self, position, x, output_attentions=False, relative_position_bias=None,
                      interpolate_pos_encoding=False, resolution=None):  # BEiT, written before transformers 5
    out = self.attention(self.layernorm_before(x), output_attentions=output_attentions,
                         relative_position_bias=relative_position_bias, interpolate_pos_encoding=interpolate_pos_encoding,
                         resolution=resolution)  # fmt: skip
    a = at(position, "attn", out[0])
    x = self.drop_path(a if self.lambda_1 is None else self.lambda_1 * a) + x
    m = at(position, "mlp", self.output(self.intermediate(self.layernorm_after(x))))  # MLP ends at `output`
    x = self.drop_path(m if self.lambda_2 is None else self.lambda_2 * m) + x
    return (at(position, "block", x), *out[1:])


def hf_swinv2_layer(self, position, x, input_dimensions, output_attentions=False):  # post-norm, one shared drop_path
    from transformers.models.swinv2.modeling_swinv2 import window_partition, window_reverse

    height, width = input_dimensions
    batch, _, channels = x.shape
    shift, size = self.shift_size, self.window_size
    h, _ = self.maybe_pad(x.view(batch, height, width, channels), height, width)
    _, hp, wp, _ = h.shape
    h = torch.roll(h, shifts=(-shift, -shift), dims=(1, 2)) if shift > 0 else h
    windows = window_partition(h, size).view(-1, size * size, channels)
    out = self.attention(windows, self.get_attn_mask(hp, wp, dtype=h.dtype, device=h.device),
                         output_attentions=output_attentions)  # fmt: skip
    a = window_reverse(out[0].view(-1, size, size, channels), size, hp, wp)
    a = torch.roll(a, shifts=(shift, shift), dims=(1, 2)) if shift > 0 else a
    a = a[:, :height, :width, :].contiguous().view(batch, height * width, channels)
    x = x + self.drop_path(at(position, "attn", self.layernorm_before(a)))  # CB after the post-norm
    x = x + self.drop_path(at(position, "mlp", self.layernorm_after(self.output(self.intermediate(x)))))
    return (at(position, "block", x), *out[1:])


# ----- the families ------------------------------------------------------------------------------
def _timm(name, **kwargs):
    def build():
        import timm
        from timm.models import vision_transformer

        if isinstance(kwargs.get("block_fn"), str):
            kwargs["block_fn"] = getattr(vision_transformer, kwargs["block_fn"])
        return timm.create_model(name, pretrained=False, **kwargs)

    return build


def _hf(architecture, config_class, **config):
    def build():
        import transformers

        return getattr(transformers, architecture)(getattr(transformers, config_class)(**config))

    return build


_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
_HF = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8)
_SWIN = dict(img_size=64, window_size=4, embed_dim=24, depths=(2, 2), num_heads=(1, 2), num_classes=5)
_HF_NO_MLP = {k: v for k, v in _HF.items() if k != "intermediate_size"}
# SigLIP2 has no image size: a 4 x 4 grid of position embeddings (num_patches), resized to each image's patch grid.
_HF_NAFLEX = {**{k: v for k, v in _HF.items() if k != "image_size"}, "num_patches": 16}
_TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
_HF_SWIN = dict(image_size=64, patch_size=4, embed_dim=24, depths=[2, 2], num_heads=[1, 2], window_size=4, num_labels=5)

# id: (builder, image size, {block class name: hand-written forward})
CASES = {
    "timm-vit": (_timm("vit_tiny_patch16_224", **_VIT), 32, {"Block": timm_block}),
    "timm-vit-registers-no-class": (
        _timm("vit_tiny_patch16_224", reg_tokens=2, class_token=False, global_pool="avg", **_VIT), 32,
        {"Block": timm_block}),
    "timm-vit-respost": (_timm("vit_tiny_patch16_224", block_fn="ResPostBlock", **_VIT), 32,
                         {"ResPostBlock": timm_respost}),
    "timm-deit3": (_timm("deit3_small_patch16_224", **_VIT), 32, {"Block": timm_block}),
    "timm-deit-distilled": (_timm("deit_tiny_distilled_patch16_224", **_VIT), 32, {"Block": timm_block}),
    "timm-siglip": (_timm("vit_base_patch16_siglip_224", **_VIT), 32, {"Block": timm_block}),
    "timm-eva02": (_timm("eva02_tiny_patch14_224", **_VIT), 32, {"EvaBlock": eva_block}),
    "timm-beit": (_timm("beit_base_patch16_224", **_VIT), 32, {"Block": beit_block}),
    "timm-naflexvit": (_timm("naflexvit_base_patch16_gap", **_VIT), 32, {"Block": timm_block}),
    "timm-cait": (_timm("cait_xxs24_224", **_VIT), 32, {"LayerScaleBlock": cait_block}),
    "timm-pit-distilled": (_timm("pit_ti_distilled_224", img_size=64, num_classes=5), 64, {"Block": timm_block}),
    "timm-swin": (_timm("swin_tiny_patch4_window7_224", **_SWIN), 64, {"SwinTransformerBlock": swin_block}),
    "timm-swinv2": (_timm("swinv2_tiny_window8_256", **_SWIN), 64, {"SwinTransformerV2Block": swinv2_block}),
    "timm-relpos": (_timm("vit_relpos_base_patch16_224", **_VIT), 32, {"RelPosBlock": relpos_block}),
    "timm-relpos-cls-shared": (_timm("vit_srelpos_small_patch16_224", class_token=True, global_pool="token", **_VIT),
                               32, {"RelPosBlock": relpos_block}),
    "timm-relpos-respost": (_timm("vit_relpos_base_patch16_rpn_224", **_VIT), 32,
                            {"ResPostRelPosBlock": relpos_post_block}),
    "timm-sam": (_timm("samvit_base_patch16", img_size=48, patch_size=8, embed_dim=32, depth=3, num_heads=2,
                       window_size=4, global_attn_indexes=(1,), neck_chans=16, global_pool="avg", num_classes=5), 48,
                 {"Block": sam_block}),
    "timm-swinv2-cr": (_timm("swinv2_cr_tiny_224", **_SWIN), 64, {"SwinTransformerV2CrBlock": swinv2_cr_block}),
    "hf-vit": (_hf("ViTForImageClassification", "ViTConfig", num_labels=5, **_HF), 32, {"ViTLayer": hf_vit_layer}),
    "hf-deit-teacher": (_hf("DeiTForImageClassificationWithTeacher", "DeiTConfig", num_labels=5, **_HF), 32,
                        {"DeiTLayer": hf_vit_layer}),
    "hf-dinov2-registers": (
        _hf("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig", num_register_tokens=2, mlp_ratio=2,
            **{k: v for k, v in _HF.items() if k != "intermediate_size"}), 32,
        {"Dinov2WithRegistersLayer": hf_dinov2_layer}),
    "hf-clip-vision": (_hf("CLIPVisionModel", "CLIPVisionConfig", **_HF), 32, {"CLIPEncoderLayer": hf_clip_layer}),
    "hf-siglip-vision": (_hf("SiglipVisionModel", "SiglipVisionConfig", **_HF), 32,
                         {"SiglipEncoderLayer": hf_clip_layer}),
    "hf-beit": (_hf("BeitForImageClassification", "BeitConfig", num_labels=5, use_relative_position_bias=True,
                    layer_scale_init_value=0.5, **_HF), 32, {"BeitLayer": hf_beit_layer}),
    "hf-swin": (_hf("SwinForImageClassification", "SwinConfig", **_HF_SWIN), 64, {"SwinLayer": hf_swin_layer}),
    # The other classes of those layers: the encoders and classifiers around the same layer types.
    "hf-vit-model": (_hf("ViTModel", "ViTConfig", **_HF), 32, {"ViTLayer": hf_vit_layer}),
    "hf-deit": (_hf("DeiTForImageClassification", "DeiTConfig", num_labels=5, **_HF), 32, {"DeiTLayer": hf_vit_layer}),
    "hf-deit-model": (_hf("DeiTModel", "DeiTConfig", **_HF), 32, {"DeiTLayer": hf_vit_layer}),
    "hf-dinov2": (_hf("Dinov2ForImageClassification", "Dinov2Config", num_labels=5, mlp_ratio=2, **_HF_NO_MLP), 32,
                  {"Dinov2Layer": hf_dinov2_layer}),
    "hf-dinov2-model": (_hf("Dinov2Model", "Dinov2Config", mlp_ratio=2, **_HF_NO_MLP), 32, {"Dinov2Layer": hf_dinov2_layer}),
    "hf-dinov2-registers-classifier": (
        _hf("Dinov2WithRegistersForImageClassification", "Dinov2WithRegistersConfig", num_labels=5, num_register_tokens=2,
            mlp_ratio=2, **_HF_NO_MLP), 32, {"Dinov2WithRegistersLayer": hf_dinov2_layer}),
    "hf-clip": (_hf("CLIPModel", "CLIPConfig", vision_config=_HF, text_config=_TEXT), 32,
                {"CLIPEncoderLayer": hf_clip_layer}),
    "hf-clip-classifier": (_hf("CLIPForImageClassification", "CLIPConfig", vision_config=_HF, text_config=_TEXT,
                               num_labels=5), 32, {"CLIPEncoderLayer": hf_clip_layer}),
    "hf-siglip": (_hf("SiglipModel", "SiglipConfig", vision_config=_HF, text_config=_TEXT), 32,
                  {"SiglipEncoderLayer": hf_clip_layer}),
    "hf-siglip-classifier": (_hf("SiglipForImageClassification", "SiglipConfig", vision_config=_HF, text_config=_TEXT,
                                 num_labels=5), 32, {"SiglipEncoderLayer": hf_clip_layer}),
    "hf-beit-model": (_hf("BeitModel", "BeitConfig", use_shared_relative_position_bias=True, layer_scale_init_value=0.5,
                          **_HF), 32, {"BeitLayer": hf_beit_layer}),
    "hf-swin-model": (_hf("SwinModel", "SwinConfig", **_HF_SWIN), 64, {"SwinLayer": hf_swin_layer}),
    "hf-swin-backbone": (_hf("SwinBackbone", "SwinConfig", out_features=["stage1", "stage2"], **_HF_SWIN), 64,
                         {"SwinLayer": hf_swin_layer}),
    "hf-swinv2": (_hf("Swinv2ForImageClassification", "Swinv2Config", **_HF_SWIN), 64, {"Swinv2Layer": hf_swinv2_layer}),
    "hf-swinv2-model": (_hf("Swinv2Model", "Swinv2Config", **_HF_SWIN), 64, {"Swinv2Layer": hf_swinv2_layer}),
    "hf-dinov3": (_hf("DINOv3ViTModel", "DINOv3ViTConfig", num_register_tokens=2, **_HF), 32,
                  {"DINOv3ViTLayer": hf_dinov3_layer}),
    "hf-dinov2-backbone": (
        _hf("Dinov2Backbone", "Dinov2Config", out_features=["stage1", "stage2"], mlp_ratio=2,
            **{k: v for k, v in _HF.items() if k != "intermediate_size"}), 32, {"Dinov2Layer": hf_dinov2_layer}),
    "hf-dinov2-registers-backbone": (
        _hf("Dinov2WithRegistersBackbone", "Dinov2WithRegistersConfig", num_register_tokens=2, mlp_ratio=2,
            out_features=["stage1", "stage2"], **{k: v for k, v in _HF.items() if k != "intermediate_size"}), 32,
        {"Dinov2WithRegistersLayer": hf_dinov2_layer}),
    "hf-dinov3-backbone": (_hf("DINOv3ViTBackbone", "DINOv3ViTConfig", num_register_tokens=2,
                               out_features=["stage1", "stage2"], **_HF), 32, {"DINOv3ViTLayer": hf_dinov3_layer}),
    "hf-beit-backbone": (_hf("BeitBackbone", "BeitConfig", use_relative_position_bias=True, layer_scale_init_value=0.5,
                             out_features=["stage1", "stage2"], **_HF), 32, {"BeitLayer": hf_beit_layer}),
    "hf-swinv2-backbone": (_hf("Swinv2Backbone", "Swinv2Config", out_features=["stage1", "stage2"], **_HF_SWIN), 64,
                           {"Swinv2Layer": hf_swinv2_layer}),
    "hf-data2vec": (_hf("Data2VecVisionForImageClassification", "Data2VecVisionConfig", num_labels=5,
                        use_relative_position_bias=True, layer_scale_init_value=0.5, **_HF), 32,
                    {"Data2VecVisionLayer": hf_data2vec_layer}),
    "hf-data2vec-model": (_hf("Data2VecVisionModel", "Data2VecVisionConfig", use_shared_relative_position_bias=True,
                              **_HF), 32, {"Data2VecVisionLayer": hf_data2vec_layer}),
    "hf-vit-mae": (_hf("ViTMAEModel", "ViTMAEConfig", mask_ratio=0.0, **_HF), 32, {"ViTMAELayer": hf_vit_layer}),
    "hf-vit-msn": (_hf("ViTMSNForImageClassification", "ViTMSNConfig", num_labels=5, **_HF), 32,
                   {"ViTMSNLayer": hf_vit_layer}),
    "hf-vit-msn-model": (_hf("ViTMSNModel", "ViTMSNConfig", **_HF), 32, {"ViTMSNLayer": hf_vit_layer}),
    "hf-ijepa": (_hf("IJepaForImageClassification", "IJepaConfig", num_labels=5, **_HF), 32, {"IJepaLayer": hf_vit_layer}),
    "hf-ijepa-model": (_hf("IJepaModel", "IJepaConfig", **_HF), 32, {"IJepaLayer": hf_vit_layer}),
    "hf-siglip2-vision": (_hf("Siglip2VisionModel", "Siglip2VisionConfig", **_HF_NAFLEX), 32,
                          {"Siglip2EncoderLayer": hf_clip_layer}),
    "hf-siglip2": (_hf("Siglip2Model", "Siglip2Config", vision_config=_HF_NAFLEX, text_config=_TEXT), 32,
                   {"Siglip2EncoderLayer": hf_clip_layer}),
    "hf-siglip2-classifier": (_hf("Siglip2ForImageClassification", "Siglip2Config", vision_config=_HF_NAFLEX,
                                  text_config=_TEXT, num_labels=5), 32, {"Siglip2EncoderLayer": hf_clip_layer}),
    "hf-clip-vision-projection": (_hf("CLIPVisionModelWithProjection", "CLIPVisionConfig", projection_dim=16, **_HF), 32,
                                  {"CLIPEncoderLayer": hf_clip_layer}),
}


@torch.no_grad()
def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Seeded noise on every parameter; layer scales set near 1 so that no branch is scaled away."""
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in model.named_parameters():
        if any(part in name for part in ("gamma", "lambda_", "layer_scale", "ls1", "ls2")):
            parameter.fill_(1.0)
        parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model.float().eval()


def output(model, x):
    """The logits; for headless models the last hidden state, or the feature maps of a backbone, all of them."""
    family = detect(model)
    torch.manual_seed(0)  # MAE shuffles its patches at random (mask_ratio 0 keeps them all): the same order each call
    with torch.no_grad():
        if family.library == "transformers":
            # CLIPModel / SiglipModel want text too: their vision tower's output, where CB is (family.run's choice,
            # which also cuts SigLIP2's patch sequences)
            result = family.run(model, x)
            if getattr(result, "logits", None) is not None:
                return result.logits
            if getattr(result, "feature_maps", None) is not None:
                return torch.cat([features.flatten(1) for features in result.feature_maps], dim=1)
            return result.last_hidden_state
        return model(x)


def with_reference_forwards(plain, forwards, position):
    reference = copy.deepcopy(plain)
    replaced = 0
    for name, module in reference.named_modules():
        if name.startswith("text_model."):  # CLIPModel / SiglipModel: the text tower's layers are not rewritten
            continue
        forward = forwards.get(type(module).__name__)
        if forward is not None:
            module.forward = types.MethodType(lambda self, *a, _f=forward, **k: _f(self, position, *a, **k), module)
            replaced += 1
    assert replaced == len(detect(plain).blocks(plain))
    return reference


def placeable(model, position: str) -> str:
    """``--layers`` of the blocks where the family places CB at ``position`` (SAM: ``attn`` in global blocks only)."""
    family, placed = detect(model), []
    for index, (_, block) in enumerate(detect(model).blocks(model)):
        try:
            family.branch(block, position)
        except UnsupportedModelError:
            continue
        placed.append(str(index))
    return ",".join(placed)


def plain_and_images(case) -> tuple[torch.nn.Module, torch.Tensor]:
    """The case's model, seeded and perturbed, and two seeded images of its size."""
    build, size, _ = case
    torch.manual_seed(0)
    plain = perturbed(build())
    return plain, torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_cb_matches_the_hand_written_forward(case, position):
    plain, x = plain_and_images(case)
    forwards = case[2]
    expected = output(with_reference_forwards(plain, forwards, position), x)
    model = inject(copy.deepcopy(plain), CBSpec("cb", position, layers=placeable(plain, position)))
    got = output(model, x)
    assert (got - expected).abs().max().item() < 1e-5
    assert (got - output(plain, x)).abs().max().item() > 1e-4  # the test cannot pass without CB


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_remove_and_cbs_scale_zero_give_the_plain_model(case):
    plain, x = plain_and_images(case)
    expected = output(plain, x)
    keys = list(plain.state_dict())
    for position in POSITIONS:
        layers = placeable(plain, position)
        zero = inject(copy.deepcopy(plain), CBSpec("cbs", position, layers=layers, scale_init=0.0))
        assert len(find_broadcasts(zero)) == len(layers.split(","))
        assert (output(zero, x) - expected).abs().max().item() < 1e-6, position
        removed = remove(inject(copy.deepcopy(plain), CBSpec("cbs", position, layers=layers)))
        assert list(removed.state_dict()) == keys and find_broadcasts(removed) == []
        assert torch.equal(output(removed, x), expected), position


# ----- uniform attention reads 1.0 in every layer -------------------------------------------------
_QK_LINEARS = ("q_proj", "k_proj", "query", "key", "attn.q", "attn.k")
_POSITION_BIASES = ("relative_position_bias_table", "q_bias", "k_bias", "cpb_mlp.2", "continuous_position_bias_mlp.2",
                    "rel_pos_h", "rel_pos_w", "rel_pos.mlp.fc2", "meta_mlp.fc2")


@torch.no_grad()
def uniform(model: torch.nn.Module) -> torch.nn.Module:
    """Zero query/key projections and position biases: every softmax then sees constant logits."""
    for name, module in model.named_modules():
        if name.endswith("qkv") and isinstance(module, torch.nn.Linear):
            rows = slice(0, 2 * module.out_features // 3)
            module.weight[rows] = 0.0
            if module.bias is not None:
                module.bias[rows] = 0.0
        elif name.endswith(_QK_LINEARS) and isinstance(module, torch.nn.Linear):
            module.weight.zero_()
            if module.bias is not None:
                module.bias.zero_()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if any(part in name for part in _POSITION_BIASES) and tensor.is_floating_point():
            tensor.zero_()
    return model


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_uniform_attention_reads_entropy_one_in_every_layer(case):
    build, size, _ = case
    torch.manual_seed(0)
    model = uniform(perturbed(build()))
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(2))
    labels = torch.zeros(3, dtype=torch.long)
    family = detect(model)
    if family.num_classes(model) is None and type(model).__name__ in HEADED:
        from cbtool.families.hf_heads import add_head

        model = add_head(model, 5)
    if family.num_classes(model) is None:  # no classifier to evaluate (MAE, DINOv3, backbones): the capture alone
        accumulator = DensityAccumulator(family.attention_layouts(model, (size, size)))
        with torch.no_grad(), family.capture_attention(model, accumulator, query_chunks=True):
            family.run(model, x)
        density = accumulator.result()
    else:
        (result,) = evaluate([model], [(x, labels, torch.arange(3))], density=True, progress=False)
        density = result.density
    layers = len(family.attention_layouts(model, (size, size)))
    assert len(density["entropy_per_layer"]) == layers
    for heads in density["entropy_per_layer_head"]:
        assert heads == pytest.approx([1.0] * len(heads), abs=1e-5)
    assert density["entropy_mean"] == pytest.approx(1.0, abs=1e-5)


# ----- NaFlexViT: padding tokens never enter the mean ----------------------------------------------
def _naflex_inputs(rows: int, cols: int, pad_to: int, patch: int = 8):
    generator = torch.Generator().manual_seed(3)
    image = torch.randn(1, 3, rows * patch, cols * patch, generator=generator)
    patches = image.unfold(2, patch, patch).unfold(3, patch, patch).permute(0, 2, 3, 4, 5, 1).reshape(1, rows * cols, -1)
    coords = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1).reshape(1, -1, 2)
    count, extra = rows * cols, pad_to - rows * cols
    alone = {"patches": patches, "patch_coord": coords, "patch_valid": torch.ones(1, count, dtype=torch.bool)}
    padded = {"patches": torch.cat([patches, torch.zeros(1, extra, patches.shape[-1])], 1),
              "patch_coord": torch.cat([coords, torch.zeros(1, extra, 2, dtype=torch.long)], 1),
              "patch_valid": torch.cat([torch.ones(1, count, dtype=torch.bool), torch.zeros(1, extra, dtype=torch.bool)], 1)}
    return alone, padded


@pytest.mark.parametrize("position", POSITIONS)
def test_naflexvit_cb_averages_valid_tokens_only(position, monkeypatch):
    build, _, _ = CASES["timm-naflexvit"]
    torch.manual_seed(0)
    plain = perturbed(build())
    alone, padded = _naflex_inputs(3, 4, pad_to=16)
    with torch.no_grad():
        assert torch.allclose(plain(padded), plain(alone), atol=1e-5)  # the model itself ignores padding
        model = inject(copy.deepcopy(plain), CBSpec("cb", position))
        got_padded, got_alone = model(padded), model(alone)
        assert (got_padded - got_alone).abs().max().item() < 1e-5
        assert (got_alone - plain(alone)).abs().max().item() > 1e-4
        # Without the mask, the mean would take in the 4 padding tokens: the test would fail.
        monkeypatch.setattr(type(detect(model)), "token_weights", lambda self, mask: None)
        assert (model(padded) - got_alone).abs().max().item() > 1e-4


@pytest.mark.parametrize(("architecture", "config_class", "headed"), [
    ("ViTModel", "ViTConfig", "ViTForImageClassification"),
    ("CLIPVisionModel", "CLIPVisionConfig", "CLIPForImageClassification"),
    ("SiglipVisionModel", "SiglipVisionConfig", "SiglipForImageClassification"),
    ("Siglip2VisionModel", "Siglip2VisionConfig", "Siglip2ForImageClassification"),
])
def test_headless_encoder_folder_gets_a_head_with_num_classes(tmp_path, architecture, config_class, headed):
    from cbtool.models.resolve import resolve

    torch.manual_seed(0)
    encoder = perturbed(_hf(architecture, config_class, **(_HF_NAFLEX if "Siglip2" in architecture else _HF))())
    encoder.save_pretrained(tmp_path / "encoder")
    model = resolve(str(tmp_path / "encoder"), num_classes=3)
    assert type(model).__name__ == headed and detect(model).num_classes(model) == 3
    assert model.cbtool_source["architecture"] == headed
    moved = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier")}
    originals = encoder.state_dict()
    for key, value in moved.items():  # every encoder tensor is the saved one, under the classifier's prefix
        source_key = next(k for k in originals if key.endswith(k))
        assert torch.equal(value, originals[source_key]), key
    x = torch.randn(2, 3, 32, 32)
    assert output(inject(model, CBSpec("cb")), x).shape == (2, 3)


def test_clip_model_is_read_through_its_vision_tower():
    import transformers

    config = transformers.CLIPConfig(vision_config=_HF, text_config=dict(hidden_size=32, num_hidden_layers=1,
                                                                        num_attention_heads=2, intermediate_size=64))
    model = transformers.CLIPModel(config)
    family = detect(model)
    assert [name for name, _ in family.blocks(model)] == [f"vision_model.encoder.layers.{i}" for i in range(2)]
    assert family.num_prefix_tokens(model) == 1  # the vision tower's class embedding, not the text tower's tokens
    assert family.num_classes(model) is None
