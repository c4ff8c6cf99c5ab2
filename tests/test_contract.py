"""The editor contract, run over every registered method and both tiny backbones.

A method gets these tests by registering (`editors.registry.METHODS`). A trained method is set
up with its trained tensors drawn at random (seeded) instead of trained, so that its edits change
what the model computes; untrained methods run with their default config.
"""

from __future__ import annotations

import json

import pytest
import torch

from dualedit.data.mmedit import MMEditDataset
from dualedit.data.prompts import Sample, encode, encode_prompts
from dualedit.data.requests import EditRequest
from dualedit.editors import METHODS, Editor, load_editor, make_editor
from dualedit.eval import evaluate

METHOD_NAMES = sorted(METHODS)

REQUESTS = [
    EditRequest("red.png", "what color is the ball? the answer is:", "blue"),
    EditRequest("blue.png", "what shape is the kite? the answer is:", "star"),
    EditRequest("green.png", "how many dogs are there? the answer is:", "3"),
]


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().view(-1).view(torch.uint8).clone()


def state_bytes(model) -> dict[str, torch.Tensor]:
    return {k: as_bytes(v) for k, v in model.state_dict().items()}


def same_state(model, saved) -> bool:
    now = state_bytes(model)
    return now.keys() == saved.keys() and all(torch.equal(now[k], saved[k]) for k in saved)


def contract_editor(name: str, model, processor) -> Editor:
    """A method's editor on a tiny model; its learned tensors (those it has before any edit)
    drawn at random, as if trained."""
    editor = make_editor(name, model, processor)
    tensors = editor.state_tensors()
    if tensors:  # learned parameters, present before any edit
        generator = torch.Generator().manual_seed(0)
        drawn = {
            k: (torch.randn(t.shape, generator=generator) * 0.3).to(t.dtype)
            for k, t in tensors.items()
        }
        editor.load_state(editor.folder_meta(), drawn, "contract test")
        now = editor.state_tensors()
        assert all(torch.equal(now[k], drawn[k]) for k in drawn)
    return editor


def edit_batch(processor, backbone, images, requests=REQUESTS):
    return encode([r.sample() for r in requests], processor, backbone, images)


@pytest.fixture(params=METHOD_NAMES)
def method(request) -> str:
    return request.param


@pytest.fixture
def setup(method, tiny_vlm, tiny_factory):
    """(editor, model, processor, backbone) on a fresh tiny model the test may change."""
    model, processor = tiny_factory(tiny_vlm.name)
    editor = contract_editor(method, model, processor)
    yield editor, model, processor, editor.backbone
    editor.detach()


def test_restore_is_byte_identical(setup, tiny_images):
    editor, model, _, _ = setup
    editor.detach()
    before = state_bytes(model)
    flags = [p.requires_grad for p in model.parameters()]
    editor = contract_editor(editor.name, model, editor.processor)
    editor.apply(REQUESTS[:2], tiny_images)
    editor.apply(REQUESTS[2:], tiny_images)
    editor.restore()
    editor.detach()
    assert same_state(model, before)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert editor.edits() == []


def test_edits_accumulate_and_change_the_edited_prompt(setup, tiny_images):
    editor, model, processor, backbone = setup
    batch = edit_batch(processor, backbone, tiny_images)
    with torch.no_grad():
        base = editor.logits(batch)  # [3, seq, vocab]
    first = editor.apply(REQUESTS[:1], tiny_images)
    second = editor.apply(REQUESTS[1:2], tiny_images)
    ids = [info.id for info in editor.edits()]
    assert ids == first + second and len(set(ids)) == 2
    assert [info.target for info in editor.edits()] == ["blue", "star"]
    with torch.no_grad():
        edited = editor.logits(batch)
        with editor.disabled():
            unedited = editor.logits(batch)
    assert torch.equal(unedited, base)  # disabled() is the unedited model
    if editor.batched:  # `none`: apply changes nothing the model computes
        assert torch.equal(edited, base)
    else:
        assert not torch.allclose(edited[:2], base[:2])


def test_unknown_options_are_refused_by_name(method, tiny_vlm):
    with pytest.raises(ValueError, match="no_such_option"):
        make_editor(method, tiny_vlm.model, tiny_vlm.processor, no_such_option=1)


def test_save_and_load_give_identical_outputs(setup, tiny_images, tmp_path):
    editor, model, processor, backbone = setup
    editor.apply(REQUESTS[:2], tiny_images, ids=["a", "b"])
    batch = edit_batch(processor, backbone, tiny_images)
    with torch.no_grad():
        saved_logits = editor.logits(batch)
    saved_ids = [info.id for info in editor.edits()]
    editor.save_pretrained(tmp_path / "editor")
    meta = json.loads((tmp_path / "editor" / "adapter_config.json").read_text())
    assert meta["method"] == editor.name
    editor.restore()
    editor.detach()
    before = state_bytes(model)
    loaded = load_editor(model, processor, tmp_path / "editor")
    try:
        assert type(loaded) is type(editor)
        assert [info.id for info in loaded.edits()] == saved_ids
        with torch.no_grad():
            assert torch.equal(loaded.logits(batch), saved_logits)
        loaded.restore()
    finally:
        loaded.detach()
    assert same_state(model, before)  # a weight editor's loaded edits are restored too


def test_logits_are_aligned_to_the_batch(setup, tiny_images):
    editor, _, processor, backbone = setup
    editor.apply(REQUESTS[:1], tiny_images)
    batch = edit_batch(processor, backbone, tiny_images)
    with torch.no_grad():
        together = editor.logits(batch)
        assert together.shape[:2] == batch.input_ids.shape
        for row, request in enumerate(REQUESTS):
            alone = editor.logits(encode([request.sample()], processor, backbone, tiny_images))
            n = int(batch.attention_mask[row].sum())
            torch.testing.assert_close(together[row, :n], alone[0, :n], atol=1e-4, rtol=1e-4)


def test_generate_with_a_kv_cache_matches_a_greedy_forward(setup, tiny_images):
    editor, _, processor, backbone = setup
    editor.apply(REQUESTS[:1], tiny_images)
    request = REQUESTS[0]
    prompt = Sample(request.image, request.prompt, "")
    batch = encode_prompts([prompt], processor, backbone, tiny_images)
    tokenizer = processor.tokenizer
    # Three tokens whatever the edit makes likely (an edit may make EOS the first answer).
    greedy = {"do_sample": False, "num_beams": 1, "pad_token_id": tokenizer.pad_token_id,
              "min_new_tokens": 3}
    with torch.no_grad():
        cached = editor.generate(batch, max_new_tokens=3, use_cache=True, **greedy)  # [1, 3]
        uncached = editor.generate(batch, max_new_tokens=3, use_cache=False, **greedy)
    assert cached.shape == (1, 3)
    assert torch.equal(cached, uncached)


def test_sequential_protocol_with_three_edits(method, tiny_vlm, tiny_factory, tmp_path, tiny_image_dir):
    model, processor = tiny_factory(tiny_vlm.name)
    before = state_bytes(model)
    dataset = three_record_dataset(tmp_path, tiny_image_dir)
    editor = contract_editor(method, model, processor)
    seen: list = []
    original = editor.apply

    def spy(requests, images, **kw):
        seen.append((list(requests), kw))
        return original(requests, images, **kw)

    editor.apply = spy  # type: ignore[method-assign]
    try:
        results = evaluate(
            model, processor, dataset, editor, protocol="sequential", n_values=(1, 3),
            generation=True, progress=False,
        )
    finally:
        editor.detach()
    assert [run.n_edits for run in results.runs] == [1, 3]
    assert [len(run.records) for run in results.runs] == [1, 3]
    for run in results.runs:
        for key in ("rel", "t_gen", "v_gen", "t_loc", "m_loc", "gen_em"):
            assert 0.0 <= run.means[key] <= 100.0
    assert same_state(model, before)
    # The method saw each record's request once, and nothing else of the records.
    requests = [r for batch, _ in seen for r in batch]
    assert requests == [
        EditRequest(rec.image, f"{rec.src} The answer is:", rec.alt) for rec in dataset
    ]
    assert all(kw == {} for _, kw in seen)


def test_the_method_never_receives_evaluation_only_fields(method, tiny_vlm, tiny_factory, tmp_path, tiny_image_dir):
    model, processor = tiny_factory(tiny_vlm.name)
    dataset = three_record_dataset(tmp_path, tiny_image_dir)
    editor = contract_editor(method, model, processor)
    received: list = []
    loaded: list[str] = []
    original = editor.apply

    def spy(requests, images, **kw):
        received.extend(requests)

        def loader(key):
            loaded.append(key)
            return images(key)

        return original(requests, loader, **kw)

    editor.apply = spy  # type: ignore[method-assign]
    try:
        evaluate(model, processor, dataset, editor, protocol="single", generation=False,
                 progress=False)
    finally:
        editor.detach()
    if editor.batched:
        assert received == []  # `none` is scored without applying anything
        return
    assert all(type(r) is EditRequest for r in received)
    assert [r.target for r in received] == [rec.alt for rec in dataset]
    assert [r.image for r in received] == [rec.image for rec in dataset]
    forbidden = set()
    for rec in dataset:
        forbidden |= {rec.rephrase, rec.loc, rec.m_loc_q, rec.loc_ans, rec.m_loc_a}
    for r in received:
        assert not any(text and text in r.prompt for text in forbidden)
    assert set(loaded) <= {rec.image for rec in dataset}


def test_remove_where_the_method_can(setup, tiny_images):
    editor, _, processor, backbone = setup
    ids = editor.apply(REQUESTS[:2], tiny_images)
    try:
        editor.remove(ids[0])
    except NotImplementedError as error:
        assert editor.name in str(error)
        assert [info.id for info in editor.edits()] == ids
        return
    assert [info.id for info in editor.edits()] == ids[1:]
    with pytest.raises(KeyError):
        editor.remove(ids[0])


def three_record_dataset(tmp_path, image_dir) -> MMEditDataset:
    questions = [
        ("what color is the ball", "which colour is the ball", "red.png", "green.png", "blue"),
        ("what shape is the kite", "which shape is the kite", "blue.png", "yellow.png", "star"),
        ("how many dogs are there", "what number of dogs are there", "green.png", "red.png", "3"),
    ]
    records = [
        {
            "src": src, "pred": "red", "rephrase": rephrase, "alt": alt, "image": image,
            "image_rephrase": image_rephrase, "loc": f"nq question: what is the {i} capital",
            "loc_ans": "the city", "m_loc": "yellow.png", "m_loc_q": "what shape is this",
            "m_loc_a": "square",
        }
        for i, (src, rephrase, image, image_rephrase, alt) in enumerate(questions)
    ]
    path = tmp_path / "data" / "vqa" / "vqa_eval.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(records))
    return MMEditDataset(path, image_root=image_dir)
