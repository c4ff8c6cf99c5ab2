"""DualEditor files: adapters (save_pretrained / from_pretrained) and the edit memory; and the
evaluation harness driving the editor."""

import contextlib
import json

import pytest
import torch
from folder_tools import legacy, rewrite_json, rewrite_tensors

from dualedit.data.prompts import Sample, encode
from dualedit.editors.dualedit import DualEditor

EDIT = ("red.png", "what color is the ball? the answer is:", "blue")
QUERIES = [
    Sample("red.png", "what color is the ball? the answer is:", " blue"),
    Sample("blue.png", "how many dogs are there in the picture? the answer is:", " two"),
]


def randomise(editor, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in editor.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)


def edited_logits(editor, batch):
    with torch.no_grad(), editor.context(batch) as ctx:
        logits = editor.backbone.forward_logits(
            editor.model, batch.input_ids, batch.attention_mask, batch.pixel_values
        )
    return logits, ctx


def test_round_trip_gives_identical_outputs(tiny_vlm, tiny_images, tmp_path):
    model, processor = tiny_vlm.model, tiny_vlm.processor
    batch = encode(QUERIES, processor, tiny_vlm.backbone, tiny_images)
    first = DualEditor(model, processor, tau=0.95, heads=4)
    try:
        randomise(first)
        first.save_pretrained(tmp_path / "adapters")
        first.edit(tiny_images(EDIT[0]), EDIT[1], EDIT[2], edit_id="ball")
        first.save_memory(tmp_path / "memory")
        expected, ctx = edited_logits(first, batch)
        assert ctx.open.tolist() == [True, False]
    finally:
        first.detach()
    meta = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert list(meta) == sorted(meta)
    assert meta["model_type"] == model.config.model_type and meta["hidden_size"] == 32
    assert meta["depth"] == 6 and meta["config"]["text_layer"] == 3
    assert set(meta["versions"]) == {"dualedit", "transformers", "torch"}
    assert "base_model" in meta

    second = DualEditor.from_pretrained(model, processor, tmp_path / "adapters")
    try:
        assert second.config == first.config
        second.load_memory(tmp_path / "memory")
        assert [e.id for e in second.edits()] == ["ball"]
        got, _ = edited_logits(second, batch)
        assert torch.equal(got, expected)
    finally:
        second.detach()
    # Run-time fields may change on loading; the architecture may not.
    looser = DualEditor.from_pretrained(model, processor, tmp_path / "adapters", tau=0.5)
    looser.detach()
    assert looser.config.tau == 0.5 and looser.config.width == first.config.width
    with pytest.raises(ValueError, match="\\['width'\\] differ from the saved adapters"):
        DualEditor.from_pretrained(model, processor, tmp_path / "adapters", width=16)


def write_format_1(path, meta, *, drop=None):
    """Rewrite an adapter config as a format-1 folder had it (no method, no checksums)."""
    old = legacy(json.loads(json.dumps(meta)))
    old.pop("method", None)
    old.pop("base_fingerprint", None)
    old["format"] = 1
    if drop is not None:
        del old["config"][drop]
    path.write_text(json.dumps(old, indent=2, sort_keys=True))


@pytest.mark.parametrize("saved", [False, True])
def test_text_prompt_end_is_saved_and_old_files_load_the_released_way(
    tiny_llava, tiny_images, tmp_path, saved
):
    model, processor = tiny_llava
    first = DualEditor(model, processor, text_prompt_end=saved)
    first.save_pretrained(tmp_path / "adapters")
    first.detach()
    path = tmp_path / "adapters" / "adapter_config.json"
    meta = json.loads(path.read_text())
    assert meta["config"]["text_prompt_end"] is saved
    loaded = DualEditor.from_pretrained(model, processor, tmp_path / "adapters")
    loaded.detach()
    assert loaded.config.text_prompt_end is saved
    # A file written before the field existed holds adapters trained on the released positions.
    # Today a saved config without the field is refused (no silent default) ...
    rewrite_json(path, lambda m: m["config"].pop("text_prompt_end"))
    with pytest.raises(ValueError, match="config lacks field\\(s\\) \\['text_prompt_end'\\]"):
        DualEditor.from_pretrained(model, processor, tmp_path / "adapters")
    # ... but a format-1 folder, written before the field existed, gets what it meant then.
    write_format_1(path, meta, drop="text_prompt_end")
    old = DualEditor.from_pretrained(model, processor, tmp_path / "adapters")
    old.detach()
    assert old.config.text_prompt_end is False


def test_text_keys_are_saved_and_old_files_load_as_all(tiny_llava, tmp_path):
    model, processor = tiny_llava
    first = DualEditor(model, processor, text_keys="text")
    first.save_pretrained(tmp_path / "adapters")
    first.detach()
    path = tmp_path / "adapters" / "adapter_config.json"
    meta = json.loads(path.read_text())
    assert meta["config"]["text_keys"] == "text"
    loaded = DualEditor.from_pretrained(model, processor, tmp_path / "adapters")
    loaded.detach()
    assert loaded.config.text_keys == "text" and loaded.memory.text_keys == "text"
    # Today a saved config without the field is refused (no silent default) ...
    rewrite_json(path, lambda m: m["config"].pop("text_keys"))
    with pytest.raises(ValueError, match="config lacks field\\(s\\) \\['text_keys'\\]"):
        DualEditor.from_pretrained(model, processor, tmp_path / "adapters")
    # ... but a format-1 folder, written before the field existed, gets what it meant then.
    write_format_1(path, meta, drop="text_keys")
    old = DualEditor.from_pretrained(model, processor, tmp_path / "adapters")
    old.detach()
    assert old.config.text_keys == "all"


def test_gate_key_prompt_end_and_image_is_saved_and_loaded(tiny_llava, tmp_path):
    model, processor = tiny_llava
    first = DualEditor(model, processor, gate_key="prompt_end_and_image", tau=0.5)
    first.save_pretrained(tmp_path / "adapters")
    first.detach()
    meta = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert meta["config"]["gate_key"] == "prompt_end_and_image"
    loaded = DualEditor.from_pretrained(model, processor, tmp_path / "adapters")
    loaded.detach()
    assert loaded.config.gate_key == "prompt_end_and_image" and loaded.config.tau == 0.5
    other = DualEditor.from_pretrained(
        model, processor, tmp_path / "adapters", gate_key="prompt_end_image"
    )
    other.detach()
    assert other.config.gate_key == "prompt_end_image"


@pytest.mark.parametrize("arch", ["llava", "blip2"])
def test_gate_key_files_without_it_load_as_prompt_end_image(arch, tiny_factory, tmp_path):
    """The default gate key is per architecture now; a file that names none keeps the key it
    was saved under, "prompt_end_image", not the new default."""
    model, processor = tiny_factory(arch)
    first = DualEditor(model, processor, tau=0.5)
    expected = "prompt_end_image_groups" if arch == "blip2" else "prompt_end_image"
    assert first.config.gate_key == expected
    first.save_pretrained(tmp_path / "adapters")
    first.detach()
    path = tmp_path / "adapters" / "adapter_config.json"
    meta = json.loads(path.read_text())
    assert meta["config"]["gate_key"] == expected
    # Today a saved config without the field is refused (no silent default) ...
    rewrite_json(path, lambda m: m["config"].pop("gate_key"))
    with pytest.raises(ValueError, match="config lacks field\\(s\\) \\['gate_key'\\]"):
        DualEditor.from_pretrained(model, processor, tmp_path / "adapters")
    # ... but a format-1 folder, written before the field existed, gets what it meant then.
    write_format_1(path, meta, drop="gate_key")
    old = DualEditor.from_pretrained(model, processor, tmp_path / "adapters")
    old.detach()
    assert old.config.gate_key == "prompt_end_image"


def test_loading_checks_the_base_and_the_weights(tiny_llava, tiny_blip2, tiny_images, tmp_path):
    llava, llava_processor = tiny_llava
    editor = DualEditor(llava, llava_processor)
    try:
        editor.save_pretrained(tmp_path / "llava")
        editor.edit(tiny_images(EDIT[0]), EDIT[1], EDIT[2])
        editor.save_memory(tmp_path / "llava-memory")
    finally:
        editor.detach()
    blip2, blip2_processor = tiny_blip2
    with pytest.raises(ValueError, match="model_type 'llava'.*this model has 'blip-2'"):
        DualEditor.from_pretrained(blip2, blip2_processor, tmp_path / "llava")
    other = DualEditor(blip2, blip2_processor)
    try:
        with pytest.raises(ValueError, match="model_type is 'llava', this memory needs 'blip-2'"):
            other.load_memory(tmp_path / "llava-memory")
    finally:
        other.detach()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        DualEditor.from_pretrained(llava, llava_processor, tmp_path / "nowhere")

    config_path = tmp_path / "llava" / "adapter_config.json"
    meta = json.loads(config_path.read_text())
    rewrite_json(config_path, lambda m: m.update(hidden_size=64))
    with pytest.raises(ValueError, match="hidden_size 64 .*this model has 32"):
        DualEditor.from_pretrained(llava, llava_processor, tmp_path / "llava")
    config_path.write_text(json.dumps(meta))

    weights_path = tmp_path / "llava" / "adapter_model.safetensors"

    def change(weights):
        weights.pop("visual.out.bias")
        weights["text.extra"] = torch.zeros(1)

    rewrite_tensors(weights_path, change, manifest="adapter_config.json")
    with pytest.raises(
        ValueError, match="missing keys \\['visual.out.bias'\\], unexpected keys \\['text.extra'\\]"
    ):
        DualEditor.from_pretrained(llava, llava_processor, tmp_path / "llava")
    assert not any(layer._forward_hooks for layer in llava.model.language_model.layers)


def test_the_harness_drives_the_editor(tiny_vlm, tiny_image_dir, tmp_path):
    from dualedit.data.mmedit import MMEditDataset
    from dualedit.eval import evaluate

    records = [
        {
            "src": "what color is the ball",
            "rephrase": "which colour is the ball",
            "alt": "blue",
            "image": "red.png",
            "image_rephrase": "green.png",
            "loc": "nq question: what is the capital of the united states",
            "loc_ans": "the city",
            "m_loc": "yellow.png",
            "m_loc_q": "what shape is this",
            "m_loc_a": "square",
        },
        {
            "src": "how many dogs are there",
            "rephrase": "what number of dogs are there",
            "alt": "3",
            "image": "green.png",
            "image_rephrase": "red.png",
            "loc": "nq question: what sport was supported",
            "loc_ans": "the kite",
            "m_loc": "blue.png",
            "m_loc_q": "how many are in this picture",
            "m_loc_a": "2",
        },
    ]
    path = tmp_path / "vqa" / "vqa_eval.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps([{**r, "pred": "red"} for r in records]))
    dataset = MMEditDataset(path, image_root=tiny_image_dir)
    model, processor = tiny_vlm.model, tiny_vlm.processor
    editor = DualEditor(model, processor, tau=0.999)
    opened = []  # per harness call: how many inputs passed the gate
    context = editor.context

    @contextlib.contextmanager
    def recording(batch):
        with context(batch) as ctx:
            yield ctx
        opened.append(0 if ctx.open is None else int(ctx.open.sum()))

    editor.context = recording
    try:
        randomise(editor)
        for protocol in ("single", "sequential"):
            results = evaluate(
                model,
                processor,
                dataset,
                editor,
                protocol=protocol,
                n_values=(1, 2),
                batch_size=4,
                progress=False,
            )
            for run in results.runs:
                # Locality inputs are far from every edit: the gate leaves them bit-exact.
                assert run.means["t_loc"] == 100.0 and run.means["m_loc"] == 100.0
            assert len(editor.memory) == 0  # restored
        assert results.method == "dualedit" and results.editor_options["tau"] == 0.999
        # Edited inputs were seen: each Rel sample is its edit's own sample (similarity 1).
        assert sum(opened) >= 2 * 2 and 0 in opened
    finally:
        editor.detach()


def test_folders_of_the_previous_version_load_as_dualedit(tiny_vlm, tiny_images, tmp_path):
    """Adapter folders written before editor folders named their method (format 1, as the
    demo's cache and `dualedit train` left them until 2026-12-01) load through `load_editor`."""
    from dualedit.editors import load_editor

    model, processor = tiny_vlm.model, tiny_vlm.processor
    batch = encode(QUERIES, processor, tiny_vlm.backbone, tiny_images)
    first = DualEditor(model, processor, tau=0.95, heads=4)
    try:
        randomise(first)
        first.save_pretrained(tmp_path / "old")
        first.edit(tiny_images(EDIT[0]), EDIT[1], EDIT[2])
        expected, _ = edited_logits(first, batch)
    finally:
        first.detach()
    path = tmp_path / "old" / "adapter_config.json"
    meta = json.loads(path.read_text())
    meta["versions"] = {"dualedit": "0.1.0", "transformers": meta["versions"]["transformers"]}
    write_format_1(path, meta)
    meta = json.loads(path.read_text())
    loaded = load_editor(model, processor, tmp_path / "old")
    try:
        assert type(loaded) is DualEditor and loaded.config == first.config
        loaded.edit(tiny_images(EDIT[0]), EDIT[1], EDIT[2])
        got, _ = edited_logits(loaded, batch)
        assert torch.equal(got, expected)
    finally:
        loaded.detach()
    # An unknown format is refused with the file's name.
    meta["format"] = 7
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="adapter_config.json: editor folder format 7"):
        load_editor(model, processor, tmp_path / "old")
