"""The real-size configs of the benchmarks (`benchmarks/real_sizes.py`): built on the meta device
(shapes only, no memory), they have the published checkpoints' parameter counts, depths, widths
and image tokens, and the processor gives prompts of the real image-token count."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from test_benchmarks import _load

from dualedit.backbones import get_backbone
from dualedit.small_vlm.tokenizer import build_tokenizer

WORDS = ["what", "colour", "is", "the", "ball", "?", "the", "answer", "is", ":", "red"]


@pytest.mark.parametrize(
    "arch, parameters, depth, hidden, image_tokens, pixels",
    [
        # llava-hf/llava-1.5-7b-hf: 7,063,427,072 parameters.
        ("llava", 7_063_427_072, 32, 4096, 576, 336),
        # Salesforce/blip2-opt-2.7b: 3.74 B parameters (OPT-2.7B, ViT-g, Q-Former).
        ("blip2", 3_744_679_936, 32, 2560, 32, 224),
    ],
)
def test_real_shapes(arch, parameters, depth, hidden, image_tokens, pixels):
    real_sizes = _load("real_sizes")
    tokenizer = build_tokenizer(WORDS, arch)
    model = real_sizes.build_real_model(arch, tokenizer, device="meta")
    assert sum(p.numel() for p in model.parameters()) == parameters
    assert next(model.parameters()).dtype == torch.bfloat16 and not model.training
    backbone = get_backbone(model)
    assert (backbone.depth(model), backbone.hidden_size(model)) == (depth, hidden)
    assert backbone.num_image_tokens(model) == image_tokens
    processor = real_sizes.build_real_processor(arch, tokenizer)
    text = ("<image>\n" if arch == "llava" else "") + "what colour is the ball ? the answer is :"
    batch = processor(images=Image.new("RGB", (32, 32)), text=text, return_tensors="pt")
    assert tuple(batch["pixel_values"].shape) == (1, 3, pixels, pixels)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert int((batch["input_ids"] == image_id).sum()) == image_tokens
    assert torch.get_default_dtype() == torch.float32  # restored after the build


def test_real_size_refuses_a_tokenizer_larger_than_its_vocabulary():
    real_sizes = _load("real_sizes")
    tokenizer = build_tokenizer([f"w{i}" for i in range(32_100)], "llava")
    with pytest.raises(ValueError, match="more than 32064"):
        real_sizes.real_config("llava", tokenizer)


def test_benchmark_arguments_for_real_sizes():
    common = _load("common")
    # --threads 0: leave this process's torch threads alone.
    args = common.parser("inference", "x").parse_args(["--size", "real", "--threads", "0"])
    common.check_args(args, repeats=3, warmup=1)
    assert args.model == "fresh"
    for bad in (["--size", "real", "--quick"], ["--size", "real", "--decoder-layers", "32"]):
        with pytest.raises(SystemExit, match="--size real takes neither"):
            common.check_args(common.parser("inference", "x").parse_args(bad), 3, 1)
