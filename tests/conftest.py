"""Shared test fixtures: tiny random LLaVA and BLIP-2 models with processors, built in code.

Both models: 6 decoder layers of width 32, 32 px images; LLaVA uses patch 8 (16 image tokens),
BLIP-2 uses 4 query tokens. One word-level tokenizer (lower-cased words and punctuation; unknown
words map to "<unk>"). Everything is offline, CPU, deterministic (seeded, global RNG untouched).

Fixtures:
    tiny_llava, tiny_blip2 -> (model, processor), session-scoped: do not modify them; a test that
        changes weights builds its own with `tiny_factory("llava" | "blip2")`.
    tiny_vlm -> TinyVLM(name, model, processor, backbone), parametrised over both backbones.
    tiny_image_dir -> a folder of four small coloured PNGs (red, green, blue, yellow .png).
    tiny_images -> an ImageStore over it.
    mmedit_root -> ../shared/data/mmedit beside the repository (skips, with the reason, when absent).
    short_gate_head_fits (autouse) -> learned gate heads fitted for 30 steps in every test.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from PIL import Image
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors
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
    PreTrainedTokenizerFast,
)

from dualedit.backbones import Backbone, get_backbone
from dualedit.data.mmedit import ImageStore

#: The real benchmark files: `../shared/data/mmedit` beside the repository, unless overridden.
MMEDIT_ROOT = Path(
    os.environ.get(
        "DUALEDIT_MMEDIT_ROOT",
        Path(__file__).resolve().parents[2] / "shared" / "data" / "mmedit",
    )
)

# Tiny models run fastest on one thread, and CI's two cores are then not oversubscribed.
torch.set_num_threads(1)

TINY_SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
TINY_WORDS = (
    "the answer is : ? . , ' a an of on in to and what which who how many much color colour shape "
    "photo picture image this that there are it its do does can you use for with by nq question "
    "0 1 2 3 4 5 6 7 8 9 10 red green blue yellow black white orange purple pink brown gray "
    "circle square triangle star cross ring dog cat bird car tree house ball kite boat person "
    "man woman small big large left right top bottom one two three four five sky city skyscrapers "
    "number buildings flowers vase sport leader united states mexican civil war was supported "
    "during selection wooden kitchen tools counter provide brief overview content capital country "
    "called name animal fruit apple banana lives at near"
).split()
TINY_VOCAB = {token: i for i, token in enumerate(TINY_SPECIAL + TINY_WORDS)}
HIDDEN = 32
DEPTH = 6
IMAGE_SIZE = 32
LLAVA_PATCH = 8  # (32 / 8)^2 = 16 image tokens
BLIP2_QUERIES = 4
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 40, 220),
    "yellow": (240, 220, 20),
}


class TinyVLM(NamedTuple):
    name: str
    model: torch.nn.Module
    processor: Any
    backbone: Backbone


def build_tiny_tokenizer(image_token_attribute: bool) -> PreTrainedTokenizerFast:
    """Word-level tokenizer; "<s>" prepended. LLaVA wants the `image_token` attribute, BLIP-2 not
    (its processor adds "<image>" itself and crashes on an existing attribute)."""
    core = Tokenizer(models.WordLevel(TINY_VOCAB, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TINY_SPECIAL])
    bos = TINY_VOCAB["<s>"]
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    extra = {"extra_special_tokens": {"image_token": "<image>"}} if image_token_attribute else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        **extra,
    )


def _text_ids() -> dict[str, int]:
    return {
        "vocab_size": len(TINY_VOCAB),
        "pad_token_id": TINY_VOCAB["<pad>"],
        "bos_token_id": TINY_VOCAB["<s>"],
        "eos_token_id": TINY_VOCAB["</s>"],
    }


def build_tiny_llava(seed: int = 0) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=HIDDEN,
            intermediate_size=2 * HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=IMAGE_SIZE,
            patch_size=LLAVA_PATCH,
        ),
        text_config=LlamaConfig(
            hidden_size=HIDDEN,
            intermediate_size=2 * HIDDEN,
            num_hidden_layers=DEPTH,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            **_text_ids(),
        ),
        image_token_id=TINY_VOCAB["<image>"],
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=(IMAGE_SIZE // LLAVA_PATCH) ** 2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).eval()
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": IMAGE_SIZE},
            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        ),
        tokenizer=build_tiny_tokenizer(image_token_attribute=True),
        patch_size=LLAVA_PATCH,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
    )
    return model, processor


def build_tiny_blip2(seed: int = 0) -> tuple[Blip2ForConditionalGeneration, Blip2Processor]:
    config = Blip2Config(
        vision_config={
            "hidden_size": HIDDEN,
            "intermediate_size": 2 * HIDDEN,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": IMAGE_SIZE,
            "patch_size": LLAVA_PATCH,
        },
        qformer_config={
            "hidden_size": HIDDEN,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 2 * HIDDEN,
            "encoder_hidden_size": HIDDEN,
        },
        text_config={
            "model_type": "opt",
            "hidden_size": HIDDEN,
            "ffn_dim": 2 * HIDDEN,
            "num_hidden_layers": DEPTH,
            "num_attention_heads": 4,
            "word_embed_proj_dim": HIDDEN,
            "max_position_embeddings": 128,
            **_text_ids(),
        },
        num_query_tokens=BLIP2_QUERIES,
        image_token_index=TINY_VOCAB["<image>"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Blip2ForConditionalGeneration(config).eval()
    processor = Blip2Processor(
        image_processor=BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer=build_tiny_tokenizer(image_token_attribute=False),
        num_query_tokens=BLIP2_QUERIES,
    )
    return model, processor


TINY_BUILDERS: dict[str, Callable[..., tuple[Any, Any]]] = {
    "llava": build_tiny_llava,
    "blip2": build_tiny_blip2,
}


@pytest.fixture(autouse=True)
def short_gate_head_fits(monkeypatch):
    """DualEdit trainings fit the learned gate heads (the default gate key) for `heads.STEPS`
    steps; on the tiny models of these tests 30 do. What a fit learns is tested with explicit
    step counts (test_gate_heads.py)."""
    import dualedit.editors.dualedit.heads as heads

    monkeypatch.setattr(heads, "STEPS", 30)


@pytest.fixture(scope="session")
def tiny_llava():
    """(model, processor): tiny random LLaVA, shared by the session; do not modify."""
    return build_tiny_llava()


@pytest.fixture(scope="session")
def tiny_blip2():
    """(model, processor): tiny random BLIP-2 (OPT), shared by the session; do not modify."""
    return build_tiny_blip2()


@pytest.fixture(scope="session", params=sorted(TINY_BUILDERS))
def tiny_vlm(request, tiny_llava, tiny_blip2) -> TinyVLM:
    """Each tiny backbone in turn, as TinyVLM(name, model, processor, backbone)."""
    model, processor = {"llava": tiny_llava, "blip2": tiny_blip2}[request.param]
    return TinyVLM(request.param, model, processor, get_backbone(model))


@pytest.fixture
def tiny_factory() -> Callable[..., tuple[Any, Any]]:
    """build(name, seed=0) -> a fresh (model, processor) that a test may modify."""

    def build(name: str, seed: int = 0) -> tuple[Any, Any]:
        return TINY_BUILDERS[name](seed=seed)

    return build


@pytest.fixture(scope="session")
def tiny_image_dir(tmp_path_factory) -> Path:
    """A folder with red.png, green.png, blue.png, yellow.png (40x30 with a white square)."""
    root = tmp_path_factory.mktemp("tiny_images")
    for name, rgb in COLOURS.items():
        image = Image.new("RGB", (40, 30), rgb)
        image.paste((255, 255, 255), (5, 5, 15, 15))
        image.save(root / f"{name}.png")
    return root


@pytest.fixture(scope="session")
def tiny_images(tiny_image_dir) -> ImageStore:
    return ImageStore(tiny_image_dir)


@pytest.fixture(scope="session")
def mmedit_root() -> Path:
    """The real MMEdit files; tests that need them skip (with this reason) where absent."""
    if not (MMEDIT_ROOT / "vqa" / "vqa_train.json").is_file():
        pytest.skip(f"real MMEdit files not found at {MMEDIT_ROOT} (set DUALEDIT_MMEDIT_ROOT)")
    return MMEDIT_ROOT
