"""Figure 1's attention analysis: weights obtained on an sdpa model equal those transformers
returns from an eager copy, the shares of the last prompt token's row sum to 1, and the model's
attention implementation and hooks are as before afterwards (also after an error)."""

from __future__ import annotations

import pytest
import torch
from analysis_tools import hook_ids
from test_train_data import write_tiny_mmedit

from dualedit.analysis.attention import (
    STATS,
    attention_implementations,
    eager_attention,
    row_statistics,
    run_attention,
)
from dualedit.analysis.figures import read_json
from dualedit.analysis.inputs import analysis_data
from dualedit.backbones import get_backbone
from dualedit.data.mmedit import load_split

BACKBONES = ["llava", "blip2"]
BATCH = 3  # 5 records: a full and a partial batch


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("attention_mmedit")
    write_tiny_mmedit(root, n=5)
    return load_split(root, "vqa", "train")


def _sharpened(tiny_factory, name):
    """A fresh tiny model (sdpa) whose language-model queries and keys are scaled up, so that
    attention rows are far from uniform and differ between layers and heads."""
    model, processor = tiny_factory(name)
    backbone = get_backbone(model)
    with torch.no_grad():
        for i in range(backbone.depth(model)):
            attention = backbone.layer(model, i).self_attn
            attention.q_proj.weight.mul_(6.0 + i)
            attention.k_proj.weight.mul_(6.0)
    return model, processor


def _implementations(model):
    return [(name, module.config._attn_implementation) for name, module in model.named_modules()
            if hasattr(getattr(module, "config", None), "_attn_implementation")]


def _expected(model, processor, backbone, data, top_k):
    """The same statistics from transformers' own `output_attentions` on an eager copy, with the
    position sets built here from token ids."""
    model.set_attn_implementation("eager")
    image_id = backbone.image_token_id(model)
    bos = processor.tokenizer.bos_token_id
    rows = {layer: {stat: [] for stat in STATS} for layer in range(backbone.depth(model))}
    with torch.no_grad():
        for _, batch in data.batches("rel", BATCH):
            inputs = batch.model_inputs()
            out = model(**inputs, output_attentions=True)
            attentions = getattr(out, "language_model_outputs", out).attentions
            for b in range(batch.input_ids.shape[0]):
                end = int(batch.prompt_end[b])
                ids = batch.input_ids[b, : end + 1].tolist()
                text = [p for p, t in enumerate(ids) if t != image_id]
                sink = [text[0]] if ids[text[0]] == bos else []
                text = [p for p in text if p not in sink]
                image = [p for p, t in enumerate(ids) if t == image_id]
                for layer, weights in enumerate(attentions):
                    w = weights[b, :, end].mean(0).double()  # [seq]
                    top = w[image].sort(descending=True).values[:top_k]
                    values = {
                        "text_mean": w[text].mean(), "image_mean": w[image].mean(),
                        "image_top_k": top.mean(), "text_share": w[text].sum(),
                        "image_share": w[image].sum(), "sink_share": w[sink].sum(),
                        "other_share": w.sum() - w[: end + 1].sum(),
                    }
                    for stat, value in values.items():
                        rows[layer][stat].append(float(value))
    return rows


@pytest.mark.parametrize("name", BACKBONES)
def test_attention_matches_eager_reference(name, tiny_factory, dataset, tmp_path):
    model, processor = _sharpened(tiny_factory, name)
    assert model.config.text_config._attn_implementation == "sdpa"
    data = analysis_data(model, processor, dataset)
    implementations, hooks = _implementations(model), hook_ids(data)
    assert not any(f or p for name, (f, p) in hooks.items() if "language_model" in name)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = run_attention(data, tmp_path, batch_size=BATCH, top_k=3, progress=False)

    assert _implementations(model) == implementations  # sdpa everywhere again
    assert hook_ids(data) == hooks
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())

    reference_model, _ = _sharpened(tiny_factory, name)
    expected = _expected(reference_model, processor, data.backbone, data, top_k=3)
    depth = data.depth
    assert result["layers"] == list(range(depth)) and len(result["per_layer"]) == depth
    assert result["samples"] == 5
    for layer, row in enumerate(result["per_layer"]):
        assert row["layer"] == layer
        for stat in STATS:
            want = torch.tensor(expected[layer][stat], dtype=torch.float64)
            assert row[stat] == pytest.approx(float(want.mean()), abs=1e-5), (layer, stat)
            assert row[f"{stat}_std"] == pytest.approx(
                float(want.std(correction=0)), abs=1e-5), (layer, stat)
        total = row["text_share"] + row["image_share"] + row["sink_share"]
        assert total == pytest.approx(1.0, abs=1e-5)
        assert abs(row["other_share"]) < 1e-5
        assert row["sink_share"] > 0  # both prompts start their text with BOS
        assert row["image_top_k"] >= row["image_mean"] - 1e-9
    # Sharpened attention: the layers really differ (a wrong layer index would show).
    shares = [row["image_share"] for row in result["per_layer"]]
    assert max(shares) - min(shares) > 0.05

    saved = read_json(tmp_path / "attention.json")
    assert saved["analysis"] == "attention" and len(saved["per_layer"]) == depth
    assert saved["per_layer"][2]["image_share"] == pytest.approx(shares[2])
    assert saved["source"]["records"] == 5 and "eager" in saved["attention"]
    for figure in ("attention.png", "attention_share.png"):
        assert (tmp_path / figure).read_bytes()[:4] == b"\x89PNG"


def test_top_k_covering_all_image_positions_is_the_image_mean(tiny_vlm, dataset, tmp_path):
    data = analysis_data(tiny_vlm.model, tiny_vlm.processor, dataset, samples=2)
    result = run_attention(data, tmp_path, batch_size=2, top_k=10_000, progress=False)
    for row in result["per_layer"]:
        assert row["image_top_k"] == pytest.approx(row["image_mean"], rel=1e-6)
    with pytest.raises(ValueError, match="top_k"):
        run_attention(data, tmp_path, top_k=0, progress=False)


def test_row_statistics_known_answer():
    # Row 0: sink 0.1, text 0.2 + 0.3, image 0.05 + 0.35; row 1 has one image position only.
    weights = torch.tensor([[0.1, 0.2, 0.3, 0.05, 0.35], [0.5, 0.1, 0.1, 0.3, 0.0]])
    text = torch.tensor([[0, 1, 1, 0, 0], [0, 1, 1, 0, 0]], dtype=torch.bool)
    image = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 1, 0]], dtype=torch.bool)
    sink = torch.tensor([[1, 0, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    stats = row_statistics(weights, text, image, sink, top_k=1)
    assert stats["text_mean"].tolist() == pytest.approx([0.25, 0.1])
    assert stats["image_mean"].tolist() == pytest.approx([0.2, 0.3])
    assert stats["image_top_k"].tolist() == pytest.approx([0.35, 0.3])
    assert stats["sink_share"].tolist() == pytest.approx([0.1, 0.5])
    stats = row_statistics(weights, text, image, sink, top_k=3)  # more than row 1 has
    assert stats["image_top_k"].tolist() == pytest.approx([0.2, 0.3])
    assert stats["other_share"].abs().max() < 1e-6


def test_eager_attention_restores_a_mixed_setting_after_an_error(tiny_factory):
    model, _ = tiny_factory("blip2")
    model.set_attn_implementation({"vision_config": "eager"})
    before = attention_implementations(model.config)
    implementations = _implementations(model)
    assert before["vision_config"][""] == "eager" and before["text_config"][""] == "sdpa"
    with pytest.raises(RuntimeError, match="inside"):
        with eager_attention(model):
            assert model.config.text_config._attn_implementation == "eager"
            assert model.config.qformer_config._attn_implementation == "sdpa"  # untouched
            raise RuntimeError("inside")
    assert attention_implementations(model.config) == before
    assert _implementations(model) == implementations
