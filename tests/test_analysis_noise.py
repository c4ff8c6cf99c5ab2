"""Figure 2's noise analysis: no noise moves nothing, more noise moves more, image noise on the
last decoder layer cannot reach the answers, reruns are identical, and the model is left as it
was (weights, hooks)."""

from __future__ import annotations

import pytest
import torch
from analysis_tools import hook_ids
from test_train_data import write_tiny_mmedit

from dualedit.analysis.figures import read_json
from dualedit.analysis.inputs import analysis_data
from dualedit.analysis.noise import (
    MODALITIES,
    NoiseSettings,
    add_noise,
    answer_kl,
    masked_rms,
    run_noise,
)
from dualedit.data.mmedit import load_split

SIGMAS = (0.0, 0.5, 2.0, 8.0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("noise_mmedit")
    write_tiny_mmedit(root, n=4)
    return load_split(root, "vqa", "train")


def _kl(result, layer, modality, sigma):
    (row,) = [r for r in result["results"]
              if (r["layer"], r["modality"], r["sigma"]) == (layer, modality, sigma)]
    return row


def test_noise_known_answers_and_model_untouched(tiny_vlm, dataset, tmp_path):
    data = analysis_data(tiny_vlm.model, tiny_vlm.processor, dataset)
    hooks = hook_ids(data)
    assert not any(f or p for name, (f, p) in hooks.items() if "language_model" in name)
    state = {k: v.clone() for k, v in tiny_vlm.model.state_dict().items()}
    result = run_noise(data, tmp_path, sigmas=SIGMAS, batch_size=3, progress=False)

    assert all(torch.equal(state[k], v) for k, v in tiny_vlm.model.state_dict().items())
    assert hook_ids(data) == hooks
    depth = data.depth
    assert result["layers"] == list(range(depth)) and result["samples"] == 4
    assert len(result["results"]) == depth * len(MODALITIES) * len(SIGMAS)
    for row in result["results"]:
        assert row["kl_mean"] >= 0 and row["kl_std"] >= 0
        if row["sigma"] == 0.0:
            assert row["kl_mean"] == 0.0 and row["kl_std"] == 0.0  # exactly: nothing changed
    for modality in MODALITIES:
        # Averaged over the layers that can reach the answers, KL grows with sigma.
        mean = [sum(_kl(result, layer, modality, s)["kl_mean"] for layer in range(depth - 1))
                for s in SIGMAS[1:]]
        assert mean[0] < mean[1] < mean[2], (modality, mean)
    # After the last decoder layer every position goes through the head alone: noise on the
    # image positions cannot reach the answer positions, noise on the prompt text can.
    for sigma in SIGMAS:
        assert _kl(result, depth - 1, "image", sigma)["kl_mean"] == 0.0
    assert _kl(result, depth - 1, "text", 2.0)["kl_mean"] > 0
    assert _kl(result, 0, "image", 2.0)["kl_mean"] > 0
    # Noise on every position moves the answers at least as much as on the image alone.
    assert _kl(result, 2, "all", 8.0)["kl_mean"] > _kl(result, 2, "image", 8.0)["kl_mean"]

    rms = result["rms"]
    assert [row["layer"] for row in rms] == list(range(depth))
    assert all(row[m] > 0 for row in rms for m in MODALITIES)
    saved = read_json(tmp_path / "noise.json")
    assert saved["results"] == result["results"] and saved["rms"] == result["rms"]
    assert saved["settings"] == {"sigmas": list(SIGMAS), "scale": "relative",
                                 "modalities": list(MODALITIES), "seed": 0}
    assert saved["source"]["records"] == 4
    for figure in ("noise_text.png", "noise_image.png", "noise_all.png", "noise_layers.png"):
        assert (tmp_path / figure).read_bytes()[:4] == b"\x89PNG"


def test_noise_rerun_is_identical_and_seeded(tiny_vlm, dataset, tmp_path):
    data = analysis_data(tiny_vlm.model, tiny_vlm.processor, dataset, samples=3)
    settings = {"sigmas": (1.0,), "layers": [1, 3], "modalities": ("text", "all"),
                "batch_size": 2, "progress": False}
    first = run_noise(data, tmp_path / "a", **settings)
    again = run_noise(data, tmp_path / "b", **settings)
    assert read_json(tmp_path / "a" / "noise.json") == read_json(tmp_path / "b" / "noise.json")
    assert first["results"] == again["results"] and len(first["results"]) == 4
    assert not (tmp_path / "a" / "noise_image.png").exists()  # a modality not asked for
    other = run_noise(data, tmp_path / "c", seed=1, **settings)
    assert [r["kl_mean"] for r in other["results"]] != [r["kl_mean"] for r in first["results"]]
    absolute = run_noise(data, tmp_path / "d", scale="absolute", **settings)
    assert absolute["settings"]["scale"] == "absolute"
    assert [r["kl_mean"] for r in absolute["results"]] != [r["kl_mean"] for r in first["results"]]


def test_add_noise_known_answers():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 50, 64, generator=generator) * torch.tensor([1.0, 5.0])[:, None, None]
    mask = torch.zeros(2, 50, dtype=torch.bool)
    mask[:, 10:40] = True
    hidden[:, 10:40] *= 3.0  # the RMS over the mask differs from the RMS over the row
    assert masked_rms(hidden, mask).tolist() == pytest.approx(
        [float(hidden[b, 10:40].square().mean().sqrt()) for b in range(2)])
    rms = masked_rms(hidden, mask)

    def noisy(scale, seed=1):
        return add_noise(hidden, mask, 0.5, scale=scale,
                         generator=torch.Generator().manual_seed(seed))

    relative = noisy("relative")
    assert torch.equal(relative[~mask], hidden[~mask])  # untouched outside the mask, exactly
    for b in range(2):
        std = float((relative[b] - hidden[b])[mask[b]].std())
        assert std == pytest.approx(0.5 * float(rms[b]), rel=0.05)
    absolute = noisy("absolute")
    for b in range(2):
        assert float((absolute[b] - hidden[b])[mask[b]].std()) == pytest.approx(0.5, rel=0.05)
    assert torch.equal(noisy("relative"), relative) and not torch.equal(noisy("relative", 2),
                                                                         relative)
    zero = add_noise(hidden.half(), mask, 0.0, scale="relative",
                     generator=torch.Generator().manual_seed(0))
    assert zero.dtype == torch.float16 and torch.equal(zero, hidden.half())


def test_answer_kl_known_answer():
    # Row 0 has answers at positions 1 and 2, row 1 at position 0; KL(p || q) by hand.
    target_mask = torch.tensor([[False, True, True], [True, False, False]])
    p = torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]], dtype=torch.float64)
    q = torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.6, 0.4]], dtype=torch.float64)
    kl = (p * (p / q).log()).sum(-1)  # [answers]
    got = answer_kl(p.log(), q.log(), target_mask)
    assert got.tolist() == pytest.approx([float(kl[:2].mean()), float(kl[2])])
    reverse = answer_kl(q.log(), p.log(), target_mask)  # KL is not symmetric
    assert reverse.tolist() != pytest.approx(got.tolist())


def test_noise_arguments_are_validated(tiny_llava, dataset, tmp_path):
    data = analysis_data(*tiny_llava, dataset, samples=1)
    cases = [
        ({"modalities": ("text", "audio")}, "modalities"),
        ({"scale": "log"}, "scale"),
        ({"sigmas": (1.0, -0.5)}, "sigmas"),
        ({"sigmas": ()}, "sigmas"),
        ({"sigmas": (float("nan"),)}, "sigmas"),
        ({"layers": [0, 6]}, "layers"),
        ({"layers": [-1]}, "layers"),
        ({"layers": []}, "layers"),
        ({"seed": -1}, "seed"),
        ({"batch_size": 0}, "batch_size"),
    ]
    for kwargs, field in cases:
        with pytest.raises(ValueError, match=field):
            run_noise(data, tmp_path, progress=False, **kwargs)
    assert not list(tmp_path.iterdir())  # nothing written for a bad call
    assert NoiseSettings(sigmas=[1, 2]).sigmas == (1.0, 2.0)
