"""Small VLM builders: real architectures, save/load round trip, generation stops on </s>."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from dualedit.evaluate import load_vlm
from dualedit.backbones.registry import get_backbone
from dualedit.small_vlm.configs import (
    SIZES,
    VLMSize,
    build_model,
    build_processor,
    num_image_tokens,
    parameter_counts,
)
from dualedit.small_vlm.tokenizer import build_tokenizer

ARCHES = ["llava", "blip2"]
WORDS = ["what", "color", "is", "the", "object", "?", "answer", ":", "red", "blue", "a", "photo",
         "of", "named", "zorb"]
PROMPT = "What color is the object? The answer is:"


def _image(seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _built(arch: str, seed: int = 0):
    tok = build_tokenizer(WORDS, arch)
    return build_model(arch, tok, "tiny", 32, seed=seed), build_processor(arch, tok, "tiny", 32)


def _inputs(processor, arch: str, texts: list[str], images: list[Image.Image] | None):
    if images is not None and arch == "llava":
        texts = ["<image>\n" + t for t in texts]
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


@pytest.mark.parametrize("arch", ARCHES)
def test_model_class_layout_and_image_tokens(arch):
    model, processor = _built(arch)
    expected = {"llava": "LlavaForConditionalGeneration", "blip2": "Blip2ForConditionalGeneration"}
    assert type(model).__name__ == expected[arch]
    backbone = get_backbone(model)
    assert backbone.depth(model) == SIZES["tiny"].text_layers >= 6
    enc = _inputs(processor, arch, [PROMPT], [_image(0)])
    n_image = int(backbone.image_mask(model, enc["input_ids"]).sum())
    assert n_image == num_image_tokens(arch, "tiny", 32) == backbone.num_image_tokens(model)
    assert n_image == (64 if arch == "llava" else SIZES["tiny"].num_query_tokens)
    counts = parameter_counts(model)
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")


@pytest.mark.parametrize("arch", ARCHES)
def test_save_load_round_trip_gives_identical_logits(arch, tmp_path):
    model, processor = _built(arch)
    model.eval()
    enc = _inputs(processor, arch, [PROMPT, "a photo of"], [_image(1), _image(2)])
    with torch.no_grad():
        before = model(**enc).logits
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)

    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(AutoProcessor.from_pretrained(tmp_path)) is type(processor)
    # load_vlm pins the PIL image backend the model was built with (transformers picks the
    # torchvision one where torchvision is installed, and its resize gives other pixels).
    _, loaded_processor = load_vlm(tmp_path)
    assert type(loaded_processor) is type(processor)
    assert type(loaded_processor.image_processor) is type(processor.image_processor)
    enc2 = _inputs(loaded_processor, arch, [PROMPT, "a photo of"], [_image(1), _image(2)])
    assert torch.equal(enc2["input_ids"], enc["input_ids"])
    assert torch.equal(enc2["pixel_values"], enc["pixel_values"])
    with torch.no_grad():
        after = loaded(**enc2).logits
    assert torch.equal(before, after)
    assert loaded.generation_config.eos_token_id == 2


@pytest.mark.parametrize("arch", ARCHES)
def test_input_and_output_embeddings_are_tied_unless_asked(arch, tmp_path):
    # Tied: one matrix, before and after a save/load; untied: two, of the same shape.
    tokenizer = build_tokenizer(WORDS, arch)
    tied = build_model(arch, tokenizer, "tiny", 32)
    assert tied.get_output_embeddings().weight is tied.get_input_embeddings().weight
    tied.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    assert torch.equal(loaded.get_input_embeddings().weight, tied.get_input_embeddings().weight)
    untied = build_model(arch, tokenizer, "tiny", 32, tie_embeddings=False)
    out, inp = untied.get_output_embeddings().weight, untied.get_input_embeddings().weight
    assert out is not inp and out.shape == inp.shape and not torch.equal(out, inp)


@pytest.mark.parametrize("arch", ARCHES)
def test_seed_decides_the_initial_weights(arch):
    a, _ = _built(arch, seed=0)
    b, _ = _built(arch, seed=0)
    c, _ = _built(arch, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    if arch == "blip2":  # transformers zero-initialises them; ours must differ per query
        assert a.query_tokens[0, 0].ne(a.query_tokens[0, 1]).any()


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("with_image", [True, False])
def test_generate_stops_on_eos(arch, with_image):
    model, processor = _built(arch)
    model.eval()
    eos = processor.tokenizer.eos_token_id
    red = processor.tokenizer.convert_tokens_to_ids("red")
    calls = []

    def force(_module, _args, logits):
        # The first new token is "red", every later one "</s>".
        forced = torch.full_like(logits, -1e4)
        forced[..., red if not calls else eos] = 0.0
        calls.append(1)
        return forced

    head = get_backbone(model).language_model_head(model)
    handle = head.register_forward_hook(force)
    try:
        images = [_image(3)] if with_image else None
        enc = _inputs(processor, arch, [PROMPT], images)
        backbone = get_backbone(model)
        new = backbone.generate(model, enc["input_ids"], enc["attention_mask"],
                                enc.get("pixel_values"), max_new_tokens=8, do_sample=False)
    finally:
        handle.remove()
    assert new[0].tolist() == [red, eos]


def test_size_validation():
    with pytest.raises(ValueError, match="text_layers"):
        VLMSize(text_layers=4)
    with pytest.raises(ValueError, match="divisible"):
        VLMSize(text_hidden=100, text_heads=3)
    tok = build_tokenizer(WORDS, "llava")
    with pytest.raises(ValueError, match="multiple of patch_size"):
        build_model("llava", tok, "tiny", 30)
    with pytest.raises(ValueError, match="size"):
        build_model("llava", tok, "huge", 32)
    with pytest.raises(ValueError, match="blip2"):
        build_processor("blip2", tok, "tiny", 32)  # a LLaVA tokenizer (has image_token)
