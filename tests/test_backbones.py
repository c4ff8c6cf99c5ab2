"""Backbone specs on the tiny LLaVA and BLIP-2 models: layers, widths, modules, image positions."""

from __future__ import annotations

import pytest
import torch
from conftest import DEPTH, HIDDEN, TINY_VOCAB
from transformers import Blip2Config, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaMLP
from transformers.models.opt.modeling_opt import OPTDecoderLayer

from dualedit.backbones import (
    Blip2Backbone,
    LlavaBackbone,
    get_backbone,
    layer_output_tensor,
    replace_layer_output,
)

LAYER_TYPES = {"llava": LlamaDecoderLayer, "blip2": OPTDecoderLayer}
BACKBONE_TYPES = {"llava": LlavaBackbone, "blip2": Blip2Backbone}
IMAGE_TOKENS = {"llava": 16, "blip2": 4}


def language_model(name, model):
    return (
        [model.model.language_model, model.lm_head] if name == "llava" else [model.language_model]
    )


def test_get_backbone_by_model_type(tiny_vlm):
    backbone = get_backbone(tiny_vlm.model)
    assert type(backbone) is BACKBONE_TYPES[tiny_vlm.name]
    assert type(get_backbone(tiny_vlm.model.config)) is BACKBONE_TYPES[tiny_vlm.name]
    with pytest.raises(
        ValueError, match=r"unsupported model_type 'llama'; supported: \['blip-2', 'llava'\]"
    ):
        get_backbone(LlamaConfig())
    with pytest.raises(TypeError):
        get_backbone("llava")
    with pytest.raises(ValueError, match="needs config.model_type"):
        LlavaBackbone(Blip2Config())


def test_structure(tiny_vlm):
    model, backbone = tiny_vlm.model, tiny_vlm.backbone
    layers = backbone.decoder_layers(model)
    assert backbone.depth(model) == DEPTH == len(layers)
    assert all(type(layer) is LAYER_TYPES[tiny_vlm.name] for layer in layers)
    lm_modules = list(language_model(tiny_vlm.name, model)[0].modules())
    assert all(any(layer is m for m in lm_modules) for layer in layers)  # the language model's
    assert backbone.hidden_size(model) == backbone.hidden_size(model.config) == HIDDEN
    assert backbone.layer(model, 5) is layers[5]
    with pytest.raises(ValueError, match=r"layer 6 out of range: .* has 6 decoder layers \(0..5\)"):
        backbone.layer(model, 6)
    with pytest.raises(ValueError, match="layer -1 out of range"):
        backbone.mlp(model, -1)
    with pytest.raises(TypeError):
        backbone.layer(model, 1.0)


def test_mlp(tiny_vlm):
    model, backbone = tiny_vlm.model, tiny_vlm.backbone
    layer = backbone.decoder_layers(model)[2]
    mlp = backbone.mlp(model, 2)
    if tiny_vlm.name == "llava":
        assert (
            type(mlp) is LlamaMLP
            and mlp is layer.mlp
            and backbone.mlp_out(model, 2) is layer.mlp.down_proj
        )
    else:
        assert (
            mlp[0] is layer.fc1 and mlp[1] is layer.fc2 and backbone.mlp_out(model, 2) is layer.fc2
        )
    out = backbone.mlp_out(model, 2)
    assert isinstance(out, torch.nn.Linear) and out.out_features == HIDDEN
    mlp_params = {id(p) for p in mlp.parameters()}
    assert {id(p) for p in out.parameters()} <= mlp_params
    attention = {id(p) for p in layer.self_attn.parameters()}
    assert mlp_params and not (mlp_params & attention)
    assert {id(p) for p in layer.parameters()} >= mlp_params


def test_vision_and_language_parameters_partition_the_model(tiny_vlm):
    model, backbone = tiny_vlm.model, tiny_vlm.backbone
    vision = {id(p) for p in backbone.vision_parameters(model)}
    language = {id(p) for m in language_model(tiny_vlm.name, model) for p in m.parameters()}
    everything = {id(p) for p in model.parameters()}
    assert vision and language and not (vision & language)
    assert vision | language == everything
    if tiny_vlm.name == "blip2":
        assert any(p is model.query_tokens for p in backbone.vision_parameters(model))
        assert [type(m).__name__ for m in backbone.vision_modules(model)] == [
            "Blip2VisionModel",
            "Blip2QFormerModel",
            "Linear",
        ]
    else:
        assert [type(m).__name__ for m in backbone.vision_modules(model)] == [
            "CLIPVisionModel",
            "LlavaMultiModalProjector",
        ]


def test_image_tokens_and_prompt_text(tiny_vlm):
    model, backbone = tiny_vlm.model, tiny_vlm.backbone
    assert backbone.image_token_id(model) == TINY_VOCAB["<image>"]
    assert backbone.num_image_tokens(model) == IMAGE_TOKENS[tiny_vlm.name]
    ids = torch.tensor([[1, 4, 4, 7], [4, 0, 0, 0]])
    assert backbone.image_mask(model, ids).tolist() == [
        [False, True, True, False],
        [True, False, False, False],
    ]
    expected = "<image>\nWhat is it?" if tiny_vlm.name == "llava" else "What is it?"
    assert backbone.prompt_text("What is it?", has_image=True) == expected
    assert backbone.prompt_text("What is it?", has_image=False) == "What is it?"


def test_blip2_needs_image_token_index():
    backbone = get_backbone(Blip2Config(text_config={"model_type": "opt"}))
    with pytest.raises(ValueError, match="image_token_index is None"):
        backbone.image_token_id(backbone.config)
    with pytest.raises(ValueError, match="OPT language model"):
        get_backbone(Blip2Config(text_config={"model_type": "t5"}))


def test_head_and_final_norm_reproduce_logits(tiny_vlm):
    """Hooked last-layer output -> final_norm -> head equals the model's logits."""
    model, processor, backbone = tiny_vlm.model, tiny_vlm.processor, tiny_vlm.backbone
    inputs = processor(text="what color ?", return_tensors="pt")
    seen = []
    handle = backbone.decoder_layers(model)[-1].register_forward_hook(
        lambda module, args, output: seen.append(layer_output_tensor(output))
    )
    try:
        with torch.no_grad():
            logits = backbone.forward_logits(model, inputs["input_ids"], inputs["attention_mask"])
    finally:
        handle.remove()
    assert seen[0].shape == (1, inputs["input_ids"].shape[1], HIDDEN)  # [batch, seq, hidden]
    with torch.no_grad():
        rebuilt = backbone.language_model_head(model)(backbone.final_norm(model)(seen[0]))
    torch.testing.assert_close(rebuilt, logits)


def test_layer_output_helpers_and_hook_replacement(tiny_vlm, tiny_images):
    h = torch.ones(1, 2, 3)
    assert layer_output_tensor(h) is h and layer_output_tensor((h, None)) is h
    assert replace_layer_output((h, "cache"), h * 2)[1] == "cache"
    assert replace_layer_output(h, h * 2).sum() == 12
    with pytest.raises(TypeError):
        layer_output_tensor({"h": h})

    model, processor, backbone = tiny_vlm.model, tiny_vlm.processor, tiny_vlm.backbone
    text = backbone.prompt_text("what color ?", has_image=True)
    inputs = processor(text=text, images=tiny_images("red.png"), return_tensors="pt")
    with torch.no_grad():
        base = backbone.forward_logits(model, **inputs)
        torch.testing.assert_close(base, model(**inputs).logits)
        handle = backbone.decoder_layers(model)[3].register_forward_hook(
            lambda module, args, output: replace_layer_output(
                output, layer_output_tensor(output) * 0.5
            )
        )
        try:
            edited = backbone.forward_logits(model, **inputs)
        finally:
            handle.remove()
        after = backbone.forward_logits(model, **inputs)
    assert not torch.allclose(base, edited)
    torch.testing.assert_close(base, after)
