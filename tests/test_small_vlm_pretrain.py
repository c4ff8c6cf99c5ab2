"""Pretraining: corpus encoding, loss goes down, cache, atomic output, determinism."""

from __future__ import annotations

import dataclasses
import importlib
import json

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from dualedit.backbones.registry import get_backbone
from dualedit.small_vlm.configs import build_model, build_processor, num_image_tokens
from dualedit.small_vlm.corpus import (
    batch_inputs,
    encode_corpus,
    load_images,
    read_corpus,
    vision_labels,
)
from dualedit.small_vlm.pretrain import METRICS_FILE, TrainSettings, pretrain
from dualedit.small_vlm.tokenizer import build_world_tokenizer
from dualedit.small_vlm.vision import (
    head_accuracy,
    logits_from_features,
    tower_features,
    vision_tower,
    warm_up_vision,
)

# The package exports the function `pretrain`, which hides the submodule of the same name.
pretrain_module = importlib.import_module("dualedit.small_vlm.pretrain")
ARCHES = ["llava", "blip2"]
QUICK = TrainSettings(steps=4, batch_size=8, text_batch_size=4, warmup_steps=1,
                      vision_steps=2, vision_batch_size=8, eval_batch_size=32)


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    from dualedit.world import build_world

    return build_world(tmp_path_factory.mktemp("world") / "w", seed=0, n_entities=12, n_train_vqa=4,
                       n_eval_vqa=2, n_train_caption=2, n_eval_caption=2, renderings_per_entity=2,
                       heldout_per_entity=1, text_subjects_per_relation=2, progress=False)


def _prepared(world, arch):
    lines = read_corpus(world / "corpus" / "train.jsonl")
    tok = build_world_tokenizer(world, arch)
    processor = build_processor(arch, tok, "tiny", 32)
    model = build_model(arch, tok, "tiny", 32, seed=0)
    pixels, index = load_images(world / "images", lines, processor)
    corpus = encode_corpus(lines, index, processor, get_backbone(model),
                           num_image_tokens(arch, "tiny", 32), 32)
    return lines, tok, model, pixels, index, corpus


@pytest.mark.parametrize("arch", ARCHES)
def test_encoded_targets_are_the_answers_followed_by_eos(tiny_world, arch):
    lines, tok, _, pixels, index, corpus = _prepared(tiny_world, arch)
    assert pixels.shape == (len(index), 3, 32, 32)
    for i in (0, 5, len(lines) - 1):  # vqa, caption, text fact
        start, n = int(corpus.prompt_lens[i]), int(corpus.target_lens[i])
        ids = corpus.input_ids[i, :int(corpus.lengths[i])].tolist()
        assert tok.decode(ids[start:start + n]) == lines[i]["answer"].lower()
        assert ids[start + n:] == [tok.eos_token_id]
        has_image = lines[i]["image"] is not None
        assert (int(corpus.image_index[i]) >= 0) == has_image
        n_image = ids.count(tok.convert_tokens_to_ids("<image>"))
        assert n_image == (num_image_tokens(arch, "tiny", 32) if has_image else 0)
    assert {"vqa", "caption", "text"} == set(corpus.tasks)
    labels, classes = vision_labels(lines, index)
    assert set(labels) == {"name", "color", "shape", "pattern", "material", "origin"}
    assert all((y >= 0).all() for y in labels.values())
    assert classes["shape"] == sorted({x["answer"] for x in lines if x["kind"] == "shape"})


@pytest.mark.parametrize("arch", ARCHES)
def test_corpus_encoding_agrees_with_the_data_layer(tiny_world, arch):
    """Pretraining sees exactly the ids and target positions the evaluation harness scores."""
    from dualedit.data.prompts import encode, question_sample

    lines, tok, model, _, _, corpus = _prepared(tiny_world, arch)
    processor = build_processor(arch, tok, "tiny", 32)
    backbone = get_backbone(model)

    def load(rel):
        from PIL import Image
        with Image.open(tiny_world / "images" / rel) as image:
            return image.convert("RGB")

    for i in (0, 3, 6, len(lines) - 1):
        line = lines[i]
        sample = question_sample(line["task"], line["image"], line["question"], line["answer"])
        batch = encode([sample], processor, backbone, load)
        n = int(batch.attention_mask.sum())
        ours = corpus.input_ids[i, :int(corpus.lengths[i])].tolist()
        assert ours[:-1] == batch.input_ids[0, :n].tolist()  # ours adds </s>
        assert ours[-1] == tok.eos_token_id
        start = int(corpus.prompt_lens[i])
        assert int(batch.prompt_end[0]) == start - 1


@pytest.mark.parametrize("arch", ARCHES)
def test_preloaded_pixels_equal_the_processor_on_pil_images(tiny_world, arch):
    from PIL import Image

    lines, tok, _, pixels, index, _ = _prepared(tiny_world, arch)
    processor = build_processor(arch, tok, "tiny", 32)
    rel = sorted(index)[3]
    with Image.open(tiny_world / "images" / rel) as image:
        expected = processor.image_processor([image.convert("RGB")], return_tensors="pt")["pixel_values"]
    assert torch.equal(pixels[index[rel]], expected[0])


def test_corpus_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"task": "vqa", "image": "a.png", "question": "q", "answer": "a", "kind": "k"}\n'
                    '{"task": "vqa", "image": "a.png", "question": "q", "kind": "k"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'answer'"):
        read_corpus(path)
    with pytest.raises(FileNotFoundError):
        read_corpus(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("arch", ARCHES)
def test_feature_path_matches_the_model_forward(tiny_world, arch):
    _, _, model, pixels, _, corpus = _prepared(tiny_world, arch)
    model.eval()
    rows = torch.nonzero(corpus.image_index >= 0).flatten()[:6]
    ids, attention, _, _ = batch_inputs(
        corpus, rows, 1.0, torch.tensor(corpus.special_ids))
    images = pixels[corpus.image_index[rows]]
    with torch.no_grad():
        direct = get_backbone(model).forward_logits(model, ids, attention, images)
        via = logits_from_features(model, ids, attention, tower_features(model, images),
                                   get_backbone(model).image_token_id(model))
    torch.testing.assert_close(via, direct, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHES)
def test_short_training_lowers_the_loss_and_keeps_the_tower(tiny_world, arch):
    _, _, model, pixels, _, corpus = _prepared(tiny_world, arch)
    special = torch.tensor(corpus.special_ids)
    image_rows = torch.nonzero(corpus.image_index >= 0).flatten()
    image_id = get_backbone(model).image_token_id(model)
    features = tower_features(model, pixels)
    tower_before = {k: v.clone() for k, v in vision_tower(model).state_dict().items()}

    def loss() -> float:
        with torch.no_grad():
            ids, attention, weights, _ = batch_inputs(corpus, image_rows, 3.0, special)
            logits = logits_from_features(model, ids, attention,
                                          features[corpus.image_index[image_rows]], image_id)
            return float(pretrain_module._weighted_loss(logits, ids, weights))

    before = loss()
    settings = dataclasses.replace(QUICK, steps=60, lr=1e-2)
    curve = pretrain_module.train_vlm(model, corpus, features, settings, torch.Generator().manual_seed(0))
    after = loss()
    assert after < 0.7 * before, (before, after)
    assert curve[-1]["step"] == 60
    assert all(torch.equal(v, tower_before[k]) for k, v in vision_tower(model).state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("arch", ARCHES)
def test_vision_warm_up_learns_color(tiny_world, arch):
    lines, _, model, pixels, index, _ = _prepared(tiny_world, arch)
    labels, _ = vision_labels(lines, index)
    generator = torch.Generator().manual_seed(0)
    heads = warm_up_vision(model, pixels, labels, steps=40, batch_size=16, lr=3e-3,
                           weight_decay=0.0, shift=1, grad_clip=1.0, generator=generator)
    accuracy = head_accuracy(model, heads, pixels, labels)
    assert accuracy["color"] >= 0.9, accuracy


@pytest.mark.parametrize("arch", ARCHES)
def test_pretrain_writes_a_loadable_model_and_metrics(tiny_world, tmp_path, arch):
    out = tmp_path / "model"
    metrics = pretrain(tiny_world, arch, out, size="tiny", settings=QUICK, progress=False)
    assert json.loads((out / METRICS_FILE).read_text()) == metrics
    assert set(metrics["heldout_accuracy"]) == {"vqa", "caption", "text"}
    assert all(0.0 <= v <= 1.0 for v in metrics["heldout_accuracy"].values())
    assert "vqa/shape" in metrics["heldout_accuracy_by_kind"]
    assert set(metrics["generation_exact_match"]) == {"vqa", "caption", "text"}
    assert metrics["settings"]["arch"] == arch and metrics["parameters"]["total"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp folders left
    model = AutoModelForImageTextToText.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    assert get_backbone(model).depth(model) == 6
    assert processor.tokenizer.eos_token_id == model.generation_config.eos_token_id


def test_cache_hits_and_misses(tiny_world, tmp_path, monkeypatch):
    out = tmp_path / "model"
    first = pretrain(tiny_world, "blip2", out, size="tiny", settings=QUICK, progress=False)
    weights = (out / "model.safetensors").read_bytes()
    runs = []
    real_run = pretrain_module._run

    def counting_run(*args, **kwargs):
        runs.append(args)
        return real_run(*args, **kwargs)

    monkeypatch.setattr(pretrain_module, "_run", counting_run)
    assert pretrain(tiny_world, "blip2", out, size="tiny", settings=QUICK, progress=False) == first
    assert runs == []
    # Another thread count trains the same model: still a cache hit.
    pretrain(tiny_world, "blip2", out, size="tiny", settings=QUICK, progress=False,
             threads=QUICK.num_threads + 1)
    assert runs == []
    assert (out / "model.safetensors").read_bytes() == weights

    pretrain(tiny_world, "blip2", out, size="tiny", settings=QUICK, progress=False, force=True)
    assert len(runs) == 1
    # Same seed and settings: deterministic, byte-identical weights.
    assert (out / "model.safetensors").read_bytes() == weights

    changed = pretrain(tiny_world, "blip2", out, size="tiny", seed=1, settings=QUICK, progress=False)
    assert len(runs) == 2 and changed["settings"]["seed"] == 1
    assert (out / "model.safetensors").read_bytes() != weights
    pretrain(tiny_world, "blip2", out, size="tiny", seed=1,
             settings=dataclasses.replace(QUICK, steps=5), progress=False)
    assert len(runs) == 3
    untied = pretrain(tiny_world, "blip2", out, size="tiny", seed=1, tie_embeddings=False,
                      settings=dataclasses.replace(QUICK, steps=5), progress=False)
    assert len(runs) == 4 and untied["settings"]["tie_embeddings"] is False
    monkeypatch.setattr(pretrain_module, "PRETRAIN_VERSION", pretrain_module.PRETRAIN_VERSION + 1)
    pretrain(tiny_world, "blip2", out, size="tiny", seed=1,
             settings=dataclasses.replace(QUICK, steps=5), progress=False)
    assert len(runs) == 5


def test_cache_follows_the_world_files(tiny_world, tmp_path, monkeypatch):
    import shutil

    world = tmp_path / "world"
    shutil.copytree(tiny_world, world)
    out = tmp_path / "model"
    first = pretrain(world, "llava", out, size="tiny", settings=QUICK, progress=False)
    with (world / "corpus" / "heldout.jsonl").open("a") as handle:
        handle.write("\n")  # same lines, other bytes: another world fingerprint

    def refuse(*args, **kwargs):
        raise RuntimeError("retrained")

    monkeypatch.setattr(pretrain_module, "_run", refuse)
    with pytest.raises(RuntimeError, match="retrained"):
        pretrain(world, "llava", out, size="tiny", settings=QUICK, progress=False)
    assert json.loads((out / METRICS_FILE).read_text()) == first  # the old model is untouched


def test_bad_arguments(tiny_world, tmp_path):
    with pytest.raises(ValueError, match="arch"):
        pretrain(tiny_world, "gpt", tmp_path / "m", size="tiny", progress=False)
    with pytest.raises(FileNotFoundError, match="world.json"):
        pretrain(tmp_path / "nothing", "llava", tmp_path / "m", size="tiny", progress=False)
    with pytest.raises(ValueError, match="steps"):
        TrainSettings(steps=0)


@pytest.mark.slow  # builds the default world and pretrains both default models: ~12 min on 2 cores
def test_default_pretraining_meets_the_accuracy_targets(tmp_path):
    from dualedit.world import build_world

    world = build_world(tmp_path / "world", seed=0, progress=False)
    for arch in ARCHES:
        metrics = pretrain(world, arch, tmp_path / arch, progress=False)
        acc = metrics["heldout_accuracy"]
        assert acc["vqa"] >= 0.95 and acc["caption"] >= 0.90 and acc["text"] >= 0.95, (arch, acc)
        assert min(metrics["generation_exact_match"].values()) >= 0.85, metrics["generation_exact_match"]


def test_fingerprint_ignores_the_edit_records(tiny_world, tmp_path):
    import shutil

    world = tmp_path / "world"
    shutil.copytree(tiny_world, world)
    first = pretrain_module._fingerprint(world)
    meta_path = world / "world.json"
    meta = json.loads(meta_path.read_text())
    meta["record_index"] = {"vqa_eval": []}  # other edit records: same pretraining data
    meta["format_version"] = -1
    meta_path.write_text(json.dumps(meta))
    assert pretrain_module._fingerprint(world) == first
    meta["entities"][0]["material"] = "other"  # another fact to learn: another fingerprint
    meta_path.write_text(json.dumps(meta))
    assert pretrain_module._fingerprint(world) != first
