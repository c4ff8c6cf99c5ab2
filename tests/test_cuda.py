"""DualEdit on a CUDA device (skipped without one): the same edited outputs and gate decisions
as on the CPU in float32, bfloat16 edits and cached generation on the GPU, a memory saved from
the GPU loads on the CPU, and adapter training on the GPU leaves the base model unchanged."""

from __future__ import annotations

import pytest
import torch
from test_dualedit_editor import EDIT, OTHER, RELATED, UNRELATED, randomise_outputs
from test_train_loop import CONFIG, settings
from test_train_data import write_tiny_mmedit

from dualedit.data.prompts import Sample, encode, encode_prompts
from dualedit.editors.dualedit import DualEditor, train_dualedit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")

ARCHS = ["llava", "blip2"]


def edited_logits(model, processor, images, device):
    """(base logits, edited logits, gate open) for RELATED and UNRELATED after two edits."""
    model.to(device)
    editor = DualEditor(model, processor, tau=0.999)
    try:
        randomise_outputs(editor, std=3.0)
        editor.edit(images(EDIT[0]), EDIT[1], EDIT[2])
        editor.edit(images(OTHER[0]), OTHER[1], OTHER[2])
        batch = encode([RELATED, UNRELATED], processor, editor.backbone, images).to(device)
        inputs = (model, batch.input_ids, batch.attention_mask, batch.pixel_values)
        with torch.no_grad():
            with editor.disabled():
                base = editor.backbone.forward_logits(*inputs)
            with editor.context(batch) as ctx:
                edited = editor.backbone.forward_logits(*inputs)
        return base.float().cpu(), edited.float().cpu(), ctx.open.cpu().tolist()
    finally:
        editor.detach()


@pytest.mark.parametrize("arch", ARCHS)
def test_float32_on_cuda_matches_the_cpu(arch, tiny_factory, tiny_images):
    cpu = edited_logits(*tiny_factory(arch), tiny_images, "cpu")
    gpu = edited_logits(*tiny_factory(arch), tiny_images, "cuda")
    assert cpu[2] == gpu[2] == [True, False]
    torch.testing.assert_close(gpu[0], cpu[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gpu[1], cpu[1], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(gpu[1][0], gpu[0][0])  # the edit changes the related row


@pytest.mark.parametrize("arch", ARCHS)
def test_bfloat16_on_cuda_edits_and_generates_with_the_cache(arch, tiny_factory, tiny_images):
    model, processor = tiny_factory(arch)
    model.to("cuda", torch.bfloat16)
    editor = DualEditor(model, processor, tau=0.999, text_prompt_end=False, text_keys="all")
    try:
        randomise_outputs(editor, seed=1, std=3.0)
        assert editor.text_adapter.dtype == torch.bfloat16
        assert next(editor.adapters.parameters()).device.type == "cuda"
        editor.edit(tiny_images(EDIT[0]), EDIT[1], EDIT[2])
        assert editor.memory.states([0]).text.device.type == "cuda"
        questions = [Sample(s.image, s.prompt, "") for s in (RELATED, UNRELATED)]
        prompts = encode_prompts(
            questions,
            processor,
            editor.backbone,
            tiny_images,
        ).to("cuda")
        inputs = (prompts.input_ids, prompts.attention_mask, prompts.pixel_values)
        kwargs = {"max_new_tokens": 4, "do_sample": False, "num_beams": 1}
        with torch.no_grad():
            with editor.disabled():
                base = editor.backbone.generate(model, *inputs, **kwargs)
            cached = editor.generate_from(*inputs, **kwargs)
            uncached = editor.generate_from(*inputs, use_cache=False, **kwargs)
        assert torch.equal(cached[1], base[1])  # unrelated: gate closed, unedited
        assert torch.equal(uncached, cached)  # the KV cache keeps the prompt pass's decision
    finally:
        editor.detach()


def test_memory_saved_on_cuda_loads_on_the_cpu(tiny_factory, tiny_images, tmp_path):
    model, processor = tiny_factory("llava")
    model.to("cuda")
    editor = DualEditor(model, processor)
    try:
        editor.edit(tiny_images(EDIT[0]), EDIT[1], EDIT[2])
        gpu_states = editor.memory.states([0])
        editor.save_memory(tmp_path / "memory")
    finally:
        editor.detach()
    cpu_model, _ = tiny_factory("llava")
    cpu_editor = DualEditor(cpu_model, processor)
    try:
        cpu_editor.load_memory(tmp_path / "memory")
        cpu_states = cpu_editor.memory.states([0])
        assert cpu_states.text.device.type == "cpu"
        torch.testing.assert_close(cpu_states.text, gpu_states.text.cpu())
    finally:
        cpu_editor.detach()


def test_training_on_cuda_trains_only_the_adapters(tiny_factory, tmp_path):
    data = write_tiny_mmedit(tmp_path / "data", n=10)
    model, processor = tiny_factory("blip2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_dualedit(
        model,
        processor,
        data,
        config=CONFIG,
        settings=settings(max_steps=6, eval_every=3),
        out_dir=tmp_path / "run",
        progress=False,
    )
    assert next(model.parameters()).device.type == "cuda"  # accelerate's default device
    after = {k: v.cpu() for k, v in model.state_dict().items()}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert result.steps == 6 and result.best_dir.is_dir()
