"""LLaVA-1.5-7B and BLIP2-OPT-2.7B at their real widths and depths, with random weights.

The configs are written here from the published checkpoints' config.json files
(`llava-hf/llava-1.5-7b-hf`, `Salesforce/blip2-opt-2.7b`): widths, depths, heads, MLP sizes,
image side and patch, image tokens (576 patches / 32 queries), which vision layer LLaVA reads
(the second to last), BLIP-2's Q-Former cross-attending every second layer, tied (OPT) or untied
(Vicuna) embeddings, and the vocabulary size. Only the tokenizer is the built-in world's (word
level; its ids are the first rows of the real-size embedding), so prompts are a few dozen tokens
plus the image tokens, as real E-VQA prompts are.

Used by the benchmarks' `--size real` (a GPU run: about 14 GB of bf16 weights for LLaVA). The
weights are initialised on the target device, so no CPU copy of the fp32 model is made.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from dualedit.small_vlm.configs import VLMSize, build_processor, greedy_until_eos, special_ids


@dataclass(frozen=True)
class RealSize:
    """One real checkpoint's shape. `vision`, `qformer`, `text`: config fields of that part."""

    name: str
    image_size: int
    patch_size: int
    image_tokens: int
    vocab_size: int
    tie_embeddings: bool
    vision: dict[str, Any]
    qformer: dict[str, Any] | None
    text: dict[str, Any]


REAL_SIZES: dict[str, RealSize] = {
    "llava": RealSize(
        name="llava-1.5-7b",
        image_size=336,
        patch_size=14,
        image_tokens=576,  # (336 / 14)^2 patches, CLS dropped
        vocab_size=32064,
        tie_embeddings=False,
        vision={"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                "intermediate_size": 4096, "projection_dim": 768},
        qformer=None,
        text={"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 32, "intermediate_size": 11008,
              "max_position_embeddings": 4096, "rms_norm_eps": 1e-5},
    ),
    "blip2": RealSize(
        name="blip2-opt-2.7b",
        image_size=224,
        patch_size=14,
        image_tokens=32,  # the Q-Former's queries
        vocab_size=50272,
        tie_embeddings=True,
        vision={"hidden_size": 1408, "num_hidden_layers": 39, "num_attention_heads": 16,
                "intermediate_size": 6144},
        qformer={"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                 "intermediate_size": 3072, "cross_attention_frequency": 2,
                 "encoder_hidden_size": 1408},
        text={"hidden_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 32,
              "ffn_dim": 10240, "word_embed_proj_dim": 2560, "max_position_embeddings": 2048},
    ),
}


def _ids(tokenizer: PreTrainedTokenizerFast, vocab_size: int) -> dict[str, int]:
    ids = special_ids(tokenizer)
    if ids["vocab_size"] > vocab_size:
        raise ValueError(f"tokenizer has {ids['vocab_size']} tokens, more than {vocab_size}")
    return ids


def real_config(arch: str, tokenizer: PreTrainedTokenizerFast) -> LlavaConfig | Blip2Config:
    """The transformers config of `arch`'s real checkpoint, special ids from `tokenizer`."""
    size = REAL_SIZES[arch]
    ids = _ids(tokenizer, size.vocab_size)
    special = {k: ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if arch == "llava":
        vision = CLIPVisionConfig(**size.vision, image_size=size.image_size,
                                  patch_size=size.patch_size)
        text = LlamaConfig(**size.text, vocab_size=size.vocab_size, **special,
                           tie_word_embeddings=size.tie_embeddings)
        return LlavaConfig(
            vision_config=vision, text_config=text, image_token_id=ids["image_token_id"],
            vision_feature_select_strategy="default", vision_feature_layer=-2,
            image_seq_length=size.image_tokens, projector_hidden_act="gelu",
            tie_word_embeddings=size.tie_embeddings,
        )
    return Blip2Config(
        vision_config={**size.vision, "image_size": size.image_size,
                       "patch_size": size.patch_size},
        qformer_config={**size.qformer, "vocab_size": size.vocab_size,
                        "pad_token_id": ids["pad_token_id"]},
        text_config={"model_type": "opt", **size.text, "vocab_size": size.vocab_size, **special,
                     "tie_word_embeddings": size.tie_embeddings},
        num_query_tokens=size.image_tokens, image_token_index=ids["image_token_id"],
    )


def build_real_model(
    arch: str,
    tokenizer: PreTrainedTokenizerFast,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> PreTrainedModel:
    """`arch`'s real-size model with random weights, built on `device` in `dtype`, eval mode
    (`device="meta"`: shapes only, to count parameters without memory)."""
    config = real_config(arch, tokenizer)
    torch.manual_seed(seed)
    cls = LlavaForConditionalGeneration if arch == "llava" else Blip2ForConditionalGeneration
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(config)
    finally:
        torch.set_default_dtype(previous)
    greedy_until_eos(model, special_ids(tokenizer))
    return model.eval()


def build_real_processor(arch: str, tokenizer: PreTrainedTokenizerFast) -> Any:
    """The processor for `build_real_model`: the real image side, patch and image tokens."""
    size = REAL_SIZES[arch]
    shape = VLMSize(patch_size=size.patch_size, num_query_tokens=size.image_tokens)
    return build_processor(arch, tokenizer, shape, size.image_size)
