"""encode / encode_prompts on both tiny backbones: target positions, prompt ends, image masks."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_VOCAB, build_tiny_tokenizer
from transformers import (
    Blip2Processor,
    BlipImageProcessorPil,
    CLIPImageProcessorPil,
    LlavaProcessor,
)

from dualedit.data.prompts import Sample, encode, encode_prompts, group_by_image, record_samples
from dualedit.data.records import EditRecord

IMAGE_TOKENS = {"llava": 16, "blip2": 4}
# LLaVA: "<s>" then the image; BLIP-2: the query placeholders first, then "<s>".
IMAGE_START = {"llava": 1, "blip2": 0}

SAMPLES = [
    Sample("red.png", "What color is the square? The answer is:", " red"),
    Sample("blue.png", "a photo of", " a blue square on the left ."),
    Sample("green.png", "How many ? The answer is:", " 2"),
]


def ids(words):
    return [TINY_VOCAB[w] for w in words.split()]


def test_encode_positions(tiny_vlm, tiny_images):
    batch = encode(SAMPLES, tiny_vlm.processor, tiny_vlm.backbone, tiny_images)
    n_img = IMAGE_TOKENS[tiny_vlm.name]
    b, s = batch.input_ids.shape
    assert b == 3 and batch.attention_mask.shape == (b, s) and batch.target_mask.dtype == torch.bool
    assert batch.pixel_values.shape == (3, 3, 32, 32)
    expected_targets = [ids("red"), ids("a blue square on the left ."), ids("2")]
    expected_last_prompt = [TINY_VOCAB[":"], TINY_VOCAB["of"], TINY_VOCAB[":"]]
    lengths = batch.attention_mask.sum(1).tolist()
    for i in range(len(SAMPLES)):
        target = expected_targets[i]
        end = int(batch.prompt_end[i])
        assert batch.target_ids[i][batch.target_mask[i]].tolist() == target
        assert batch.input_ids[i, end].item() == expected_last_prompt[i]
        # the target tokens follow the last prompt token; logits at p predict p + 1
        assert batch.input_ids[i, end + 1 : end + 1 + len(target)].tolist() == target
        assert batch.target_mask[i].nonzero().flatten().tolist() == list(
            range(end, end + len(target))
        )
        assert end + 1 + len(target) == lengths[i]  # right padding: real tokens first
        assert (
            batch.attention_mask[i, : lengths[i]].all()
            and not batch.attention_mask[i, lengths[i] :].any()
        )
        assert (batch.target_ids[i][~batch.target_mask[i]] == -100).all()
        image_positions = batch.image_mask[i].nonzero().flatten().tolist()
        start = IMAGE_START[tiny_vlm.name]
        assert image_positions == list(range(start, start + n_img))
    assert (batch.input_ids[batch.attention_mask == 0] == TINY_VOCAB["<pad>"]).all()
    assert batch.image_mask.sum().item() == 3 * n_img


def test_encoded_batch_matches_single_sample_logits(tiny_vlm, tiny_images):
    """Padding and masks are right: each row's target logits equal those of the sample alone."""
    model, backbone = tiny_vlm.model, tiny_vlm.backbone
    batch = encode(SAMPLES, tiny_vlm.processor, backbone, tiny_images)
    with torch.no_grad():
        logits = backbone.forward_logits(model, **batch.model_inputs())  # [batch, seq, vocab]
        for i, sample in enumerate(SAMPLES):
            alone = encode([sample], tiny_vlm.processor, backbone, tiny_images)
            single = backbone.forward_logits(model, **alone.model_inputs())
            torch.testing.assert_close(
                logits[i][batch.target_mask[i]],
                single[0][alone.target_mask[0]],
                atol=1e-5,
                rtol=1e-4,
            )
    other = encode(
        [SAMPLES[0]], tiny_vlm.processor, backbone, lambda path: tiny_images("yellow.png")
    )
    with torch.no_grad():
        changed = backbone.forward_logits(model, **other.model_inputs())
    assert not torch.allclose(changed[0][other.target_mask[0]], logits[0][batch.target_mask[0]])


def test_encode_text_only(tiny_vlm, tiny_images):
    samples = [
        Sample(None, "nq question: what is the capital of the country ?", " paris"),
        Sample(None, "a?", " 7"),
    ]
    batch = encode(samples, tiny_vlm.processor, tiny_vlm.backbone, tiny_images)
    assert batch.pixel_values is None and "pixel_values" not in batch.model_inputs()
    assert not batch.image_mask.any()
    assert (batch.input_ids != TINY_VOCAB["<image>"]).all()
    assert batch.input_ids[0, 0].item() == TINY_VOCAB["<s>"]
    assert batch.target_ids[0][batch.target_mask[0]].tolist() == [TINY_VOCAB["<unk>"]]
    assert batch.target_ids[1][batch.target_mask[1]].tolist() == ids("7")
    assert batch.prompt_end.tolist() == [11, 2]  # <s> nq question : ... ? / <s> a ?
    with torch.no_grad():
        logits = tiny_vlm.backbone.forward_logits(tiny_vlm.model, **batch.model_inputs())
    assert logits.shape == (*batch.input_ids.shape, len(TINY_VOCAB))


def test_encode_record_samples(tiny_vlm, tiny_images):
    record = EditRecord(
        index=0,
        src="What color is the dog?",
        pred="red",
        rephrase="Which colour is the dog?",
        alt="blue",
        image="red.png",
        image_rephrase="green.png",
        loc="nq question: who lives at the house",
        loc_ans="a man",
        m_loc="yellow.png",
        m_loc_q="How many cat?",
        m_loc_a="3",
    )
    samples = record_samples(record, "vqa")
    groups = group_by_image(list(samples.values()))
    assert groups == {True: [0, 1, 2, 4], False: [3]}
    with_image = [list(samples.values())[i] for i in groups[True]]
    batch = encode(with_image, tiny_vlm.processor, tiny_vlm.backbone, tiny_images)
    assert batch.target_ids[0][batch.target_mask[0]].tolist() == ids("blue")
    assert batch.target_ids[3][batch.target_mask[3]].tolist() == ids("3")
    text = encode([samples["t_loc"]], tiny_vlm.processor, tiny_vlm.backbone, tiny_images)
    assert text.target_ids[0][text.target_mask[0]].tolist() == ids("a man")


def test_prompt_tokens_from_the_tokenizer_match_the_processor(tiny_vlm, tiny_images, monkeypatch):
    # encode finds the prompt's end from the tokenizer alone (one processor call per sample);
    # forcing the processor path for the prompt must give the same batch, image and text-only.
    import dualedit.data.prompts as prompts

    proc, backbone = tiny_vlm.processor, tiny_vlm.backbone
    text_only = [Sample(None, s.prompt, s.target) for s in SAMPLES]
    fast = [encode(batch, proc, backbone, tiny_images) for batch in (SAMPLES, text_only)]
    calls = []
    real = prompts._prompt_prefix
    monkeypatch.setattr(prompts, "_prompt_prefix", lambda *a: calls.append(real(*a)))
    slow = [encode(batch, proc, backbone, tiny_images) for batch in (SAMPLES, text_only)]
    assert len(calls) == 6 and all(c is not None for c in calls)  # the fast path applied
    for a, b in zip(fast, slow, strict=True):
        for field in ("input_ids", "attention_mask", "target_mask", "target_ids", "prompt_end"):
            assert torch.equal(getattr(a, field), getattr(b, field)), field
        assert torch.equal(a.image_mask, b.image_mask)


def test_encode_errors(tiny_vlm, tiny_images):
    proc, backbone = tiny_vlm.processor, tiny_vlm.backbone
    with pytest.raises(ValueError, match="mix image and text-only"):
        encode([SAMPLES[0], Sample(None, "a?", " 1")], proc, backbone, tiny_images)
    with pytest.raises(ValueError, match="empty list"):
        encode([], proc, backbone, tiny_images)
    with pytest.raises(ValueError, match=r"sample 1: the prompt's tokens are not a prefix"):
        # "of" + "s" tokenises as one unknown word: the tokenizer merges across the boundary
        encode([SAMPLES[0], Sample("red.png", "a photo of", "s")], proc, backbone, tiny_images)
    with pytest.raises(ValueError, match="has no tokens"):
        encode([Sample("red.png", "a photo of", "")], proc, backbone, tiny_images)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        encode([Sample("missing.png", "a photo of", " x")], proc, backbone, tiny_images)


def test_encode_rejects_wrong_image_token_count(tiny_llava, tiny_blip2, tiny_images):
    from dualedit.backbones import get_backbone

    wrong_llava = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
        tokenizer=build_tiny_tokenizer(image_token_attribute=True),
        patch_size=4,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
    )
    with pytest.raises(ValueError, match="64 image placeholder tokens, the llava model expects 16"):
        encode(SAMPLES[:1], wrong_llava, get_backbone(tiny_llava[0]), tiny_images)
    wrong_blip2 = Blip2Processor(
        image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}),
        tokenizer=build_tiny_tokenizer(image_token_attribute=False),
        num_query_tokens=2,
    )
    # BLIP-2 itself would run silently with 2 of 4 placeholders
    with pytest.raises(ValueError, match="2 image placeholder tokens, the blip-2 model expects 4"):
        encode(SAMPLES[:1], wrong_blip2, get_backbone(tiny_blip2[0]), tiny_images)


def test_encode_prompts_left_padding_and_generate(tiny_vlm, tiny_images):
    model, proc, backbone = tiny_vlm.model, tiny_vlm.processor, tiny_vlm.backbone
    batch = encode_prompts(SAMPLES, proc, backbone, tiny_images)
    b, s = batch.input_ids.shape
    assert batch.prompt_end.tolist() == [s - 1] * b
    assert batch.attention_mask[:, -1].all()
    assert batch.input_ids[:, -1].tolist() == [TINY_VOCAB[":"], TINY_VOCAB["of"], TINY_VOCAB[":"]]
    lengths = batch.attention_mask.sum(1)
    assert lengths.min() < s and all(
        not batch.attention_mask[i, : s - n].any() for i, n in enumerate(lengths.tolist())
    )
    assert batch.image_mask.sum(1).tolist() == [IMAGE_TOKENS[tiny_vlm.name]] * b
    right = encode_prompts(SAMPLES, proc, backbone, tiny_images, padding_side="right")
    assert right.prompt_end.tolist() == (lengths - 1).tolist()
    teacher = encode(SAMPLES, proc, backbone, tiny_images)
    assert right.prompt_end.tolist() == teacher.prompt_end.tolist()
    with pytest.raises(ValueError, match="padding_side"):
        encode_prompts(SAMPLES, proc, backbone, tiny_images, padding_side="middle")

    with torch.no_grad():
        new = backbone.generate(model, **batch.model_inputs(), max_new_tokens=3, do_sample=False)
        assert new.shape == (b, 3)
        # the longest prompt has no padding: its first new token is the forward's argmax
        longest = int(lengths.argmax())
        alone = encode_prompts([SAMPLES[longest]], proc, backbone, tiny_images)
        logits = backbone.forward_logits(model, **alone.model_inputs())
    assert new[longest, 0].item() == logits[0, -1].argmax().item()


def test_batch_to_device(tiny_llava, tiny_images):
    from dualedit.backbones import get_backbone

    batch = encode(SAMPLES[:1], tiny_llava[1], get_backbone(tiny_llava[0]), tiny_images)
    moved = batch.to("cpu")
    assert type(moved) is type(batch) and torch.equal(moved.target_ids, batch.target_ids)
    assert moved.pixel_values is not None


def test_non_image_loader_rejected(tiny_llava):
    from dualedit.backbones import get_backbone

    with pytest.raises(TypeError, match="returned str"):
        encode(SAMPLES[:1], tiny_llava[1], get_backbone(tiny_llava[0]), lambda path: "not an image")
