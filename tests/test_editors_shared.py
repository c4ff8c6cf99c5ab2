"""The shared machinery of hook-based methods, on both tiny backbones: `HookSet` (owned handles,
explicit and automatic per-call contexts) and `LayerTrace` (retain, stop, edit, retain_grad)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dualedit.data.prompts import Sample, encode, encode_prompts
from dualedit.editors import HookSet, LayerTrace, StackCall
from dualedit.editors.calls import decoder_stack

RELATED = Sample("red.png", "what color is the ball? the answer is:", " blue")
OTHER = Sample("blue.png", "how many dogs are there in the picture? the answer is:", " two")
TEXT = Sample(None, "what is the name of the city? the answer is:", " two")


def hook_count(module: nn.Module) -> int:
    return len(module._forward_hooks) + len(module._forward_pre_hooks)


def forward_of(vlm, batch):
    return lambda: vlm.backbone.forward_logits(
        vlm.model, batch.input_ids, batch.attention_mask, batch.pixel_values
    )


class Recorder:
    """An `open_automatic` callback that records each StackCall and opens a numbered context."""

    def __init__(self):
        self.seen: list[StackCall] = []

    def __call__(self, seen: StackCall) -> str:
        self.seen.append(seen)
        return f"auto-{len(self.seen)}"


# -- HookSet: handles ------------------------------------------------------------------------


def test_hook_set_removes_exactly_its_own_handles(tiny_vlm, tiny_images):
    layer = tiny_vlm.backbone.layer(tiny_vlm.model, 1)
    before = hook_count(layer)
    calls = {"foreign": 0, "mine": 0, "mine_pre": 0}

    def count(key):
        def hook(*args):
            calls[key] += 1

        return hook

    foreign = layer.register_forward_hook(count("foreign"))
    try:
        hooks = HookSet()
        assert not hooks.attached
        with hooks:
            assert hooks.forward_hook(layer, count("mine")) is None
            hooks.forward_pre_hook(layer, count("mine_pre"))
            assert hooks.attached and hook_count(layer) == before + 3
            batch = encode([RELATED], tiny_vlm.processor, tiny_vlm.backbone, tiny_images)
            with torch.no_grad():
                forward_of(tiny_vlm, batch)()
            assert calls == {"foreign": 1, "mine": 1, "mine_pre": 1}
        assert not hooks.attached
        assert hook_count(layer) == before + 1  # someone else's hook stays
        with torch.no_grad():
            forward_of(tiny_vlm, batch)()
        assert calls == {"foreign": 2, "mine": 1, "mine_pre": 1}
        hooks.remove()  # removing twice is a no-op
        assert hook_count(layer) == before + 1
    finally:
        foreign.remove()
    assert hook_count(layer) == before


# -- HookSet: explicit contexts --------------------------------------------------------------


def test_explicit_context_is_cleared_and_never_nests():
    hooks = HookSet()
    assert hooks.current() is None and hooks.idle
    with hooks.call("outer") as ctx:
        assert ctx == "outer" and hooks.current() == "outer" and hooks.explicit == "outer"
        with pytest.raises(RuntimeError, match="already open"):
            with hooks.call("inner"):
                pass
        assert hooks.current() == "outer"  # the refused call leaves the open one alone
    assert hooks.current() is None and hooks.idle
    with pytest.raises(ZeroDivisionError), hooks.call("raising"):
        raise ZeroDivisionError
    assert hooks.explicit is None and hooks.idle
    with pytest.raises(TypeError):
        with hooks.call(None):
            pass


# -- HookSet: automatic contexts -------------------------------------------------------------


def watch_layer(hooks: HookSet, vlm, index: int = 0) -> list:
    """Record `hooks.current()` each time decoder layer `index` runs."""
    seen: list = []
    layer = vlm.backbone.layer(vlm.model, index)
    hooks.forward_hook(layer, lambda *args: seen.append(hooks.current()))
    return seen


@pytest.mark.parametrize("padding", ["left", "right"])
def test_automatic_context_from_a_plain_model_call(tiny_vlm, tiny_images, padding):
    vlm, images = tiny_vlm, tiny_images
    prompts = encode_prompts([RELATED, OTHER], vlm.processor, vlm.backbone, images, padding)
    assert not prompts.attention_mask.all()  # one row is padded
    recorder = Recorder()
    with HookSet() as hooks:
        hooks.automatic_contexts(vlm.model, vlm.backbone, recorder)
        in_layer = watch_layer(hooks, vlm)
        with pytest.raises(RuntimeError, match="already registered"):
            hooks.automatic_contexts(vlm.model, vlm.backbone, recorder)
        with torch.no_grad():
            vlm.model(**prompts.model_inputs())
        assert len(recorder.seen) == 1
        seen = recorder.seen[0]
        assert not seen.continuation
        assert torch.equal(seen.input_ids, prompts.input_ids)  # with the image placeholders
        assert torch.equal(seen.attention_mask, prompts.attention_mask.bool())
        assert in_layer == ["auto-1"]
        assert hooks.automatic is None and hooks.idle  # dropped after the pass
        # Inside an explicit call no automatic context is opened.
        with torch.no_grad(), hooks.call("explicit"):
            vlm.model(**prompts.model_inputs())
        assert len(recorder.seen) == 1 and in_layer == ["auto-1", "explicit"]


def test_automatic_context_of_a_text_only_call(tiny_vlm, tiny_images):
    """BLIP-2 runs its OPT language model alone (ids reach the decoder stack directly)."""
    vlm = tiny_vlm
    batch = encode([TEXT], vlm.processor, vlm.backbone, tiny_images)
    recorder = Recorder()
    with HookSet() as hooks:
        hooks.automatic_contexts(vlm.model, vlm.backbone, recorder)
        with torch.no_grad():
            forward_of(vlm, batch)()
        assert hooks.idle
    assert len(recorder.seen) == 1
    assert torch.equal(recorder.seen[0].input_ids, batch.input_ids)
    assert torch.equal(recorder.seen[0].attention_mask, batch.attention_mask.bool())


def test_automatic_context_is_dropped_when_the_pass_raises(tiny_vlm, tiny_images):
    vlm = tiny_vlm
    batch = encode([RELATED], vlm.processor, vlm.backbone, tiny_images)
    recorder = Recorder()

    def fail(*args):
        raise ZeroDivisionError

    with HookSet() as hooks:
        hooks.automatic_contexts(vlm.model, vlm.backbone, recorder)
        in_layer = watch_layer(hooks, vlm, 1)
        hooks.forward_hook(vlm.backbone.layer(vlm.model, 2), fail)
        with torch.no_grad(), pytest.raises(ZeroDivisionError):
            forward_of(vlm, batch)()
        assert in_layer == ["auto-1"]
        assert hooks.automatic is None and hooks.idle


def test_wanted_false_leaves_plain_calls_alone(tiny_vlm, tiny_images):
    vlm = tiny_vlm
    batch = encode([RELATED], vlm.processor, vlm.backbone, tiny_images)
    recorder, want = Recorder(), [False]
    with HookSet() as hooks:
        hooks.automatic_contexts(vlm.model, vlm.backbone, recorder, wanted=lambda: want[0])
        in_layer = watch_layer(hooks, vlm)
        with torch.no_grad():
            forward_of(vlm, batch)()
            want[0] = True
            forward_of(vlm, batch)()
    assert len(recorder.seen) == 1 and in_layer == [None, "auto-1"]


def test_a_kv_cache_decode_step_is_a_continuation(tiny_vlm, tiny_images):
    vlm = tiny_vlm
    prompts = encode_prompts([RELATED, OTHER], vlm.processor, vlm.backbone, tiny_images)
    recorder = Recorder()
    greedy = {"do_sample": False, "num_beams": 1, "max_new_tokens": 3, "use_cache": True}
    with HookSet() as hooks:
        hooks.automatic_contexts(vlm.model, vlm.backbone, recorder)
        in_layer = watch_layer(hooks, vlm)
        with torch.no_grad():
            pad = vlm.processor.tokenizer.pad_token_id
            vlm.model.generate(**prompts.model_inputs(), pad_token_id=pad, **greedy)
        assert hooks.idle
    first, *steps = recorder.seen
    assert not first.continuation and torch.equal(first.input_ids, prompts.input_ids)
    assert torch.equal(first.attention_mask, prompts.attention_mask.bool())
    assert len(steps) == 2 and all(s.continuation and s.input_ids is None for s in steps)
    assert in_layer == ["auto-1", "auto-2", "auto-3"]  # each pass its own context


# -- LayerTrace ------------------------------------------------------------------------------


def test_retain_gives_the_decoder_layers_hidden_states(tiny_vlm, tiny_images, tiny_factory):
    # A model of its own: `output_hidden_states` makes transformers leave a capturing hook on
    # every decoder layer.
    model, processor = tiny_factory(tiny_vlm.name)
    vlm = tiny_vlm._replace(model=model, processor=processor)
    batch = encode([RELATED, OTHER], vlm.processor, vlm.backbone, tiny_images)
    depth = vlm.backbone.depth(vlm.model)
    with torch.no_grad():
        out = vlm.model(**batch.model_inputs(), output_hidden_states=True)
        # LLaVA returns the language model's hidden states itself; BLIP-2 its OPT model's.
        lm_out = getattr(out, "language_model_outputs", None) or out
        hidden = lm_out.hidden_states  # embeddings, layers 0..depth-2, final-normed last layer
        with LayerTrace(vlm.model, vlm.backbone, range(depth)) as trace:
            logits = vlm.model(**batch.model_inputs()).logits
        stack = decoder_stack(vlm.model, vlm.backbone)
        final_norm = getattr(stack, "norm", None) or stack.final_layer_norm  # Llama / OPT
        last = final_norm(trace.outputs[depth - 1])
    assert len(hidden) == depth + 1 and sorted(trace.outputs) == list(range(depth))
    for i in range(depth - 1):
        assert torch.equal(trace.outputs[i], hidden[i + 1]), i
    assert torch.equal(last, hidden[depth])
    assert torch.equal(logits, out.logits)  # a retaining trace changes nothing
    assert not any(t.requires_grad for t in trace.outputs.values())


def test_stop_ends_the_forward_before_the_head(tiny_vlm, tiny_images):
    vlm = tiny_vlm
    batch = encode([RELATED], vlm.processor, vlm.backbone, tiny_images)
    depth = vlm.backbone.depth(vlm.model)
    counts = {"head": 0, "last_layer": 0}

    def count(key):
        def hook(*args):
            counts[key] += 1

        return hook

    with HookSet() as watch, torch.no_grad():
        watch.forward_hook(vlm.model.get_output_embeddings(), count("head"))
        watch.forward_hook(vlm.backbone.layer(vlm.model, depth - 1), count("last_layer"))
        with LayerTrace(vlm.model, vlm.backbone, [3, 1], stop=True) as trace:
            outputs = dict(trace.run(forward_of(vlm, batch)))
            assert counts == {"head": 0, "last_layer": 0}
            assert sorted(outputs) == [1, 3] and outputs[3].shape[:2] == batch.input_ids.shape
            with pytest.raises(RuntimeError, match="without running decoder layer 3"):
                trace.run(lambda: None)
        with LayerTrace(vlm.model, vlm.backbone, [3]) as trace:
            trace.run(forward_of(vlm, batch))  # no stop: the whole forward
        assert counts == {"head": 1, "last_layer": 1}
        assert torch.equal(trace.outputs[3], outputs[3])
    with pytest.raises(RuntimeError, match="outside"):
        trace.run(forward_of(vlm, batch))
    with pytest.raises(ValueError, match="out of range"):
        LayerTrace(vlm.model, vlm.backbone, [depth])


def test_edit_replaces_an_output_until_the_trace_exits(tiny_vlm, tiny_images):
    vlm = tiny_vlm
    batch = encode([RELATED, OTHER], vlm.processor, vlm.backbone, tiny_images)
    forward = forward_of(vlm, batch)
    given: list[torch.Tensor] = []

    def shift(index, h):
        given.append(h.clone())
        return h + 1.0  # a new tensor

    with torch.no_grad():
        base = forward()
        with LayerTrace(vlm.model, vlm.backbone, [2, 4]) as plain:
            forward()
        with LayerTrace(vlm.model, vlm.backbone, [2], edit=shift) as edited:
            shifted = forward()
        after = forward()
        with LayerTrace(vlm.model, vlm.backbone, [2], edit=lambda i, h: h[:, :1]):
            with pytest.raises(ValueError, match="layer 2"):
                forward()
    assert torch.equal(given[0], plain.outputs[2])  # the edit saw the unedited output...
    assert torch.equal(edited.outputs[2], plain.outputs[2] + 1.0)  # ...and replaced it
    assert not torch.allclose(shifted, base)
    assert torch.equal(after, base)  # the model's own outputs once the trace has exited


@pytest.mark.parametrize("frozen", [False, True])
def test_retain_grad_gives_the_gradient_of_a_layer_output(
    tiny_vlm, tiny_images, tiny_factory, frozen
):
    model, processor = tiny_factory(tiny_vlm.name)
    model.requires_grad_(not frozen)
    vlm = tiny_vlm._replace(model=model, processor=processor)
    batch = encode([RELATED], processor, vlm.backbone, tiny_images)
    forward = forward_of(vlm, batch)
    # Reference: the gradient of a zero added to layer 3's output is the gradient w.r.t. it.
    shape = (*batch.input_ids.shape, vlm.backbone.hidden_size(model))  # [1, seq, hidden]
    delta = torch.zeros(shape, requires_grad=True)
    with LayerTrace(model, vlm.backbone, [3], retain=False, edit=lambda i, h: h + delta):
        forward()[0, -1].logsumexp(-1).backward()
    with LayerTrace(model, vlm.backbone, [1, 3], retain_grad=True) as trace:
        logits = forward()
    assert trace.outputs[3].requires_grad
    logits[0, -1].logsumexp(-1).backward()
    grad = trace.outputs[3].grad  # [1, seq, hidden]
    assert grad is not None and grad.abs().sum() > 0
    torch.testing.assert_close(grad, delta.grad)
    assert trace.outputs[1].grad is not None and trace.outputs[1].grad.abs().sum() > 0
    with torch.no_grad(), LayerTrace(model, vlm.backbone, [1], retain_grad=True):
        with pytest.raises(RuntimeError, match="grad mode"):
            forward()
