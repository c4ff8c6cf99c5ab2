"""DualEditConfig: derived defaults, validation, JSON."""

import json

import pytest
import torch

from dualedit.editors.dualedit import DualEditConfig, default_layers


def test_paper_defaults_for_a_32_layer_model():
    llava = DualEditConfig().resolve(depth=32, hidden_size=4096, model_type="llava")
    assert (llava.text_layer, llava.visual_layer) == (16, 19)
    assert (llava.width, llava.heads, llava.tau) == (1024, 8, 0.6)
    assert llava.gate and llava.gate_scope == "both" and llava.gate_key == "prompt_end_image"
    assert llava.dtype == "float32" and llava.resolved
    blip2 = DualEditConfig().resolve(32, 2560, "blip-2", torch.bfloat16)
    assert blip2.tau == 0.8 and blip2.dtype == "bfloat16" and blip2.torch_dtype == torch.bfloat16
    assert blip2.gate_key == "prompt_end_image_groups" and blip2.resolved


def test_gate_key_defaults_per_architecture_and_an_explicit_one_wins():
    assert DualEditConfig().gate_key is None and not DualEditConfig(tau=0.5).resolved
    other = DualEditConfig(tau=0.5).resolve(8, 64, "idefics")
    assert other.gate_key == "prompt_end_image"
    given = DualEditConfig(gate_key="last_position").resolve(8, 64, "blip-2")
    assert given.gate_key == "last_position"


def test_small_models_get_a_small_width_and_middle_layers():
    tiny = DualEditConfig(heads=4).resolve(depth=6, hidden_size=32, model_type="llava")
    assert (tiny.text_layer, tiny.visual_layer, tiny.width) == (3, 4, 32)
    for depth in range(4, 64):
        t, v = default_layers(depth)
        assert 0 < t < v < depth - 1, depth
    assert default_layers(4) == (1, 2)
    with pytest.raises(ValueError, match="3 decoder layers"):
        default_layers(3)


def test_explicit_values_win_and_are_checked_against_the_depth():
    config = DualEditConfig(text_layer=5, visual_layer=5, width=16, heads=2, tau=0.3)
    resolved = config.resolve(depth=6, hidden_size=32, model_type="llava")
    assert (resolved.text_layer, resolved.visual_layer, resolved.width, resolved.tau) == (
        5,
        5,
        16,
        0.3,
    )
    with pytest.raises(ValueError, match="visual_layer 6 out of range .* 6 decoder layers"):
        DualEditConfig(visual_layer=6).resolve(depth=6, hidden_size=32, model_type="llava")
    with pytest.raises(ValueError, match="no default tau for model_type 'idefics'"):
        DualEditConfig().resolve(depth=6, hidden_size=32, model_type="idefics")
    assert DualEditConfig(tau=0.5).resolve(6, 32, "idefics").tau == 0.5
    assert not DualEditConfig().resolved


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"width": 30, "heads": 8}, "width 30 is not divisible by heads 8"),
        ({"tau": 1.5}, "tau must be a number in \\[-1, 1\\]"),
        ({"tau": True}, "tau"),
        ({"gate_scope": "visual"}, "gate_scope"),
        ({"gate_key": "last"}, "gate_key"),
        ({"use_text": False, "use_visual": False}, "nothing to edit"),
        ({"text_layer": 5, "visual_layer": 3}, "visual_layer 3 comes before text_layer 5"),
        ({"text_layer": -1}, "text_layer must be an int >= 0"),
        ({"heads": 0}, "heads"),
        ({"gate": "yes"}, "gate must be a bool"),
        ({"dtype": "fp8"}, "dtype"),
    ],
)
def test_invalid_values_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DualEditConfig(**kwargs)


def test_visual_before_text_is_fine_when_the_visual_adapter_is_off():
    assert DualEditConfig(text_layer=5, visual_layer=3, use_visual=False).text_layer == 5


def test_json_is_sorted_and_round_trips():
    config = DualEditConfig(tau=0.7, gate_key="last_position").resolve(8, 64, "blip-2")
    text = config.to_json()
    data = json.loads(text)
    assert list(data) == sorted(data)
    assert DualEditConfig.from_dict(data) == config
    with pytest.raises(ValueError, match="unknown DualEditConfig field\\(s\\) \\['tua'\\]"):
        DualEditConfig.from_dict({**data, "tua": 0.1})
