"""Small VLMs of the real transformers architectures, and their processors.

"llava": `LlavaForConditionalGeneration` (CLIP vision tower + MLP projector + Llama decoder).
"blip2": `Blip2ForConditionalGeneration` (BLIP-2 ViT + Q-Former + OPT decoder).

The models are ordinary transformers checkpoints: `save_pretrained` (model and processor into the
same folder) and `AutoModelForImageTextToText.from_pretrained` + `AutoProcessor.from_pretrained`
load them back, so every later layer treats them exactly like a downloaded LLaVA or BLIP-2.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipImageProcessorPil,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
)

from dualedit.small_vlm.tokenizer import ARCHES, IMAGE

# CLIP's normalisation constants, kept for both arches so pixel values look like real inputs.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
INIT_STD = 0.02
#: Both small language models tie their input and output token embeddings (OPT does by default,
#: Llama 3.2 1B / 3B do; LLaVA-1.5's Vicuna does not). Why: in the built-in world an answer word
#: such as an entity's name is read as an input almost nowhere (it ends its sentence), so an
#: untied input embedding barely learns which word it is (the untied small LLaVA's 48 names'
#: input embeddings have a mean cosine of 0.63 to each other, 0.29 for their output embeddings),
#: and DualEdit's adapters, which read the target from those input-side states, then edit names
#: in 0-24 % of E-VQA records where other kinds reach 94-100 % (docs/experiments/
#: dualedit_small_models.md, "LLaVA E-VQA: the misses are names"). A real model reads every
#: token as an input too. `build_model(..., tie_embeddings=False)` / `dualedit pretrain
#: --untied-embeddings` give the untied variant.
TIE_EMBEDDINGS = True


@dataclass(frozen=True)
class VLMSize:
    """Widths and depths of a small VLM. One meaning per field; `qformer_*` are BLIP-2 only.

    The language model keeps at least 6 decoder layers so that an editor's text and visual
    layers can be distinct and neither the first nor the last layer.
    """

    vision_hidden: int = 128
    vision_layers: int = 3
    vision_heads: int = 4
    vision_intermediate: int = 256
    patch_size: int = 4
    qformer_hidden: int = 128
    qformer_layers: int = 2
    qformer_heads: int = 4
    qformer_intermediate: int = 256
    num_query_tokens: int = 8
    text_hidden: int = 128
    text_layers: int = 6
    text_heads: int = 4
    text_intermediate: int = 256
    max_positions: int = 256

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"VLMSize.{field.name}: expected a positive int, got {value!r}")
        if self.text_layers < 6:
            raise ValueError(f"VLMSize.text_layers: need >= 6 decoder layers, got {self.text_layers}")
        for prefix in ("vision", "qformer", "text"):
            hidden, heads = getattr(self, f"{prefix}_hidden"), getattr(self, f"{prefix}_heads")
            if hidden % heads:
                raise ValueError(f"VLMSize.{prefix}_hidden={hidden} not divisible by {prefix}_heads={heads}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


# "tiny" is for tests (seconds); "small" is the default the demo pretrains.
SIZES: dict[str, VLMSize] = {
    "tiny": VLMSize(
        vision_hidden=32, vision_layers=1, vision_heads=2, vision_intermediate=64,
        qformer_hidden=32, qformer_layers=1, qformer_heads=2, qformer_intermediate=64,
        num_query_tokens=4, text_hidden=32, text_layers=6, text_heads=2, text_intermediate=64,
        max_positions=128,
    ),
    "small": VLMSize(),
}
DEFAULT_SIZE = "small"


def resolve_size(size: VLMSize | str | None) -> VLMSize:
    """A `VLMSize` from a preset name, an instance, or None (the default preset)."""
    if size is None:
        return SIZES[DEFAULT_SIZE]
    if isinstance(size, VLMSize):
        return size
    if isinstance(size, str) and size in SIZES:
        return SIZES[size]
    raise ValueError(f"size {size!r}: expected a VLMSize or one of {sorted(SIZES)}")


def _check(arch: str, image_size: int, size: VLMSize) -> None:
    if arch not in ARCHES:
        raise ValueError(f"arch {arch!r}: expected one of {ARCHES}")
    if image_size < size.patch_size or image_size % size.patch_size:
        raise ValueError(f"image_size={image_size} is not a multiple of patch_size={size.patch_size}")


def num_image_tokens(arch: str, size: VLMSize | str | None, image_size: int) -> int:
    """How many `<image>` placeholders one image takes in `input_ids`."""
    size = resolve_size(size)
    _check(arch, image_size, size)
    if arch == "llava":
        return (image_size // size.patch_size) ** 2  # patches, CLS dropped ('default')
    return size.num_query_tokens


def special_ids(tokenizer: PreTrainedTokenizerFast) -> dict:
    """The tokenizer's vocabulary size and special ids (ValueError: no image token)."""
    image_id = tokenizer.convert_tokens_to_ids(IMAGE)
    if image_id is None or image_id == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer has no {IMAGE!r} token; build it with small_vlm.tokenizer")
    return {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "image_token_id": image_id,
    }


def _llava_config(ids: dict, size: VLMSize, image_size: int, tie: bool) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=size.vision_hidden, intermediate_size=size.vision_intermediate,
        num_hidden_layers=size.vision_layers, num_attention_heads=size.vision_heads,
        image_size=image_size, patch_size=size.patch_size, projection_dim=size.vision_hidden,
        initializer_range=INIT_STD,
    )
    text = LlamaConfig(
        vocab_size=ids["vocab_size"], hidden_size=size.text_hidden,
        intermediate_size=size.text_intermediate, num_hidden_layers=size.text_layers,
        num_attention_heads=size.text_heads, num_key_value_heads=size.text_heads,
        max_position_embeddings=size.max_positions, bos_token_id=ids["bos_token_id"],
        eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"],
        tie_word_embeddings=tie, initializer_range=INIT_STD,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=ids["image_token_id"],
        vision_feature_select_strategy="default", vision_feature_layer=-1,
        image_seq_length=num_image_tokens("llava", size, image_size),
        projector_hidden_act="gelu", tie_word_embeddings=tie,
    )


def _blip2_config(ids: dict, size: VLMSize, image_size: int, tie: bool) -> Blip2Config:
    vision = dict(
        hidden_size=size.vision_hidden, intermediate_size=size.vision_intermediate,
        num_hidden_layers=size.vision_layers, num_attention_heads=size.vision_heads,
        image_size=image_size, patch_size=size.patch_size,
        initializer_range=INIT_STD,  # the class default (1e-10) leaves the tower near zero
    )
    qformer = dict(
        hidden_size=size.qformer_hidden, num_hidden_layers=size.qformer_layers,
        num_attention_heads=size.qformer_heads, intermediate_size=size.qformer_intermediate,
        encoder_hidden_size=size.vision_hidden, cross_attention_frequency=1,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        vocab_size=ids["vocab_size"], pad_token_id=ids["pad_token_id"], initializer_range=INIT_STD,
    )
    text = dict(
        model_type="opt", vocab_size=ids["vocab_size"], hidden_size=size.text_hidden,
        num_hidden_layers=size.text_layers, num_attention_heads=size.text_heads,
        ffn_dim=size.text_intermediate, word_embed_proj_dim=size.text_hidden,
        max_position_embeddings=size.max_positions, bos_token_id=ids["bos_token_id"],
        eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"],
        dropout=0.0, attention_dropout=0.0, tie_word_embeddings=tie, init_std=INIT_STD,
    )
    return Blip2Config(
        vision_config=vision, qformer_config=qformer, text_config=text,
        num_query_tokens=size.num_query_tokens, image_token_index=ids["image_token_id"],
        initializer_range=INIT_STD,
    )


@torch.no_grad()
def _init_vit_like_clip(vision_model: torch.nn.Module, size: VLMSize) -> None:
    """Initialise the BLIP-2 ViT with CLIP's scales: larger, depth-scaled attention and MLP
    weights and unit-scale embeddings.

    transformers' BLIP-2 init is meant to be overwritten by pretrained weights; from scratch it
    learns shapes slower (after 800 warm-up steps: 86% held-out shape accuracy, against 91% with
    this init; CLIP's tower under the same recipe: 92%).
    """
    width = size.vision_hidden ** -0.5
    attn = width * (2 * size.vision_layers) ** -0.5
    for layer in vision_model.encoder.layers:
        layer.self_attn.qkv.weight.normal_(0.0, attn)
        layer.self_attn.projection.weight.normal_(0.0, width)
        layer.mlp.fc1.weight.normal_(0.0, (2 * size.vision_hidden) ** -0.5)
        layer.mlp.fc2.weight.normal_(0.0, attn)
    embeddings = vision_model.embeddings
    embeddings.class_embedding.normal_(0.0, width)
    # No pre-norm after the embeddings (CLIP has one): start the residual stream near unit scale.
    embeddings.patch_embedding.weight.mul_(7.0)
    embeddings.position_embedding.mul_(7.0)


def build_model(
    arch: str,
    tokenizer: PreTrainedTokenizerFast,
    size: VLMSize | str | None = None,
    image_size: int = 32,
    *,
    seed: int = 0,
    tie_embeddings: bool = TIE_EMBEDDINGS,
) -> PreTrainedModel:
    """A freshly initialised small VLM, deterministic in `seed`.

    Args:
        arch: "llava" or "blip2".
        tokenizer: from `small_vlm.tokenizer` (its ids become the config's special ids).
        size: a `VLMSize`, a preset name from `SIZES`, or None for the default.
        image_size: square input side in pixels, a multiple of `size.patch_size`.
        seed: seeds the initial weights.
        tie_embeddings: the language model's output embedding is its input embedding (see
            `TIE_EMBEDDINGS`).

    Returns:
        `LlavaForConditionalGeneration` or `Blip2ForConditionalGeneration` in train mode, float32,
        whose `generate()` stops on ``</s>``.

    Example:
        >>> model = build_model("blip2", build_tokenizer(["red"], "blip2"), "tiny", 32)
    """
    size = resolve_size(size)
    _check(arch, image_size, size)
    ids = special_ids(tokenizer)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        if arch == "llava":
            model = LlavaForConditionalGeneration(
                _llava_config(ids, size, image_size, tie_embeddings)
            )
        else:
            model = Blip2ForConditionalGeneration(
                _blip2_config(ids, size, image_size, tie_embeddings)
            )
            # transformers zero-initialises the queries; identical queries would start as
            # identical Q-Former outputs, so give each its own direction.
            with torch.no_grad():
                model.query_tokens.normal_(0.0, INIT_STD)
            _init_vit_like_clip(model.vision_model, size)
    finally:
        torch.random.set_rng_state(generator_state)
    greedy_until_eos(model, ids)
    return model


def greedy_until_eos(model: PreTrainedModel, ids: dict) -> None:
    """Make `model.generate()` greedy and stop on ``</s>`` (`ids`: from `special_ids`)."""
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = (
        ids["bos_token_id"], ids["eos_token_id"], ids["pad_token_id"],
    )
    gen.do_sample = False


def build_processor(
    arch: str,
    tokenizer: PreTrainedTokenizerFast,
    size: VLMSize | str | None = None,
    image_size: int = 32,
) -> ProcessorMixin:
    """The processor matching `build_model(arch, tokenizer, size, image_size)`.

    LLaVA: "<image>" in the text expands into one placeholder per patch. BLIP-2: the processor
    puts `num_query_tokens` placeholders before ``<s>``. Images are resized to `image_size`
    (no crop at the native size) and normalised with CLIP's mean and std.
    """
    size = resolve_size(size)
    _check(arch, image_size, size)
    special_ids(tokenizer)
    if arch == "llava":
        if getattr(tokenizer, "image_token", None) != IMAGE:
            raise ValueError("llava needs a tokenizer built with build_tokenizer(words, 'llava')")
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
            image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD),
        )
        return LlavaProcessor(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=size.patch_size,
            vision_feature_select_strategy="default", image_token=IMAGE,
            num_additional_image_tokens=1,
        )
    if hasattr(tokenizer, "image_token"):
        raise ValueError("blip2 needs a tokenizer built with build_tokenizer(words, 'blip2')")
    image_processor = BlipImageProcessorPil(
        size={"height": image_size, "width": image_size},
        image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD),
    )
    return Blip2Processor(
        image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=size.num_query_tokens
    )


def parameter_counts(model: PreTrainedModel) -> dict[str, int]:
    """Parameters per part ("vision", "connector", "language", "total") of a small VLM."""
    if model.config.model_type == "llava":
        parts = {
            "vision": model.model.vision_tower,
            "connector": model.model.multi_modal_projector,
            "language": torch.nn.ModuleList([model.model.language_model, model.lm_head]),
        }
    else:
        parts = {
            "vision": model.vision_model,
            "connector": torch.nn.ModuleList([model.qformer, model.language_projection]),
            "language": model.language_model,
        }
    counts = {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()}
    if model.config.model_type != "llava":
        counts["connector"] += model.query_tokens.numel()
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts
