"""EditMemory: many edits, ids, lookup, bytes, files."""

import json
import time

import pytest
from folder_tools import legacy, rewrite_json
import torch
import torch.nn.functional as F

from dualedit.editors.dualedit import EditMemory
from dualedit.editors.dualedit.gate import IMAGE_GROUPS

HIDDEN = 8
# Bytes of one edit's key parts: three float32 parts of HIDDEN and the image groups.
KEY_BYTES = (3 + IMAGE_GROUPS) * HIDDEN * 4


def memory(**kwargs):
    return EditMemory(HIDDEN, text_layer=3, visual_layer=4, model_type="llava", **kwargs)


def edit(seed, n=5, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(n, HIDDEN, generator=g).to(dtype)
    visual = torch.randn(n, HIDDEN, generator=g).to(dtype)
    keys = {
        "prompt_end": torch.randn(HIDDEN, generator=g),
        "last_position": text[-1].float(),
        "image_mean": torch.randn(HIDDEN, generator=g),
        "image_groups": torch.randn(IMAGE_GROUPS * HIDDEN, generator=g),
    }
    return text, visual, keys


def test_add_list_remove_clear_and_stable_ids():
    m = memory()
    a = m.add(*edit(0), prompt="what is it?", target=" blue", image="red.png")
    b = m.add(*edit(1, n=3))
    c = m.add(*edit(2), edit_id="fact-17")
    assert (a, b, c) == (0, 1, "fact-17") and m.ids == [0, 1, "fact-17"] and len(m) == 3
    info = m.entries()
    assert [e.id for e in info] == [0, 1, "fact-17"]
    assert (info[0].prompt, info[0].target, info[0].image) == ("what is it?", " blue", "red.png")
    assert (info[1].text_positions, info[1].visual_positions) == (3, 3)
    # 3 positions x 8 x 4 bytes, twice (two layers), plus the float32 key parts.
    assert info[1].nbytes == 2 * 3 * HIDDEN * 4 + KEY_BYTES == m.nbytes(1)
    assert m.total_bytes() == sum(e.nbytes for e in info)
    m.remove(0)
    assert m.ids == [1, "fact-17"] and 0 not in m and "fact-17" in m
    with pytest.raises(KeyError, match="no edit with id 0"):
        m.remove(0)
    m.clear()
    assert len(m) == 0
    assert m.add(*edit(3)) == 2  # ids are never reused


def test_shared_states_are_counted_once():
    m = memory()
    text, _, keys = edit(0)
    eid = m.add(text, text, keys)
    assert m.nbytes(eid) == 5 * HIDDEN * 4 + KEY_BYTES


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t, v, k: (t[:, :4], v, k), "text states have shape \\(5, 4\\)"),
        (lambda t, v, k: (t, v[:0], k), "visual states have shape \\(0, 8\\)"),
        (lambda t, v, k: (t, v, {"prompt_end": k["prompt_end"]}), "missing gate key"),
        (lambda t, v, k: (t, v, {**k, "last_position": k["prompt_end"][:3]}), "gate key"),
        (lambda t, v, k: (t, v, {**k, "image_groups": k["prompt_end"]}), "'image_groups' has"),
    ],
)
def test_bad_edits_are_rejected(change, message):
    with pytest.raises(ValueError, match=message):
        memory().add(*change(*edit(0)))


def test_bad_ids_are_rejected():
    m = memory()
    m.add(*edit(0), edit_id="x")
    for bad, message in (("x", "already"), ("", "1..64"), ("y" * 65, "1..64"), (1.5, "int or")):
        with pytest.raises(ValueError, match=message):
            m.add(*edit(1), edit_id=bad)


def test_lookup_is_the_nearest_edit_by_cosine():
    m = memory()
    for seed in range(6):
        m.add(*edit(seed))
    m.remove(2)
    queries = torch.stack([edit(4)[2]["prompt_end"] * 3.0, edit(0)[2]["prompt_end"] + 0.01])
    positions, similarity = m.lookup(queries, "prompt_end")
    assert [m.ids[p] for p in positions.tolist()] == [4, 0]
    assert similarity[0] == pytest.approx(1.0, abs=1e-6) and similarity[1] < 1.0
    # Brute force over the stored keys agrees, for both key kinds.
    for kind in ("prompt_end", "last_position"):
        query = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(9))
        stored = torch.stack([edit(seed)[2][kind] for seed in (0, 1, 3, 4, 5)])
        brute = F.cosine_similarity(query[:, None], stored[None], dim=-1)
        positions, similarity = m.lookup(query, kind)
        assert positions.tolist() == brute.argmax(dim=1).tolist()
        torch.testing.assert_close(similarity, brute.max(dim=1).values)
    with pytest.raises(ValueError, match="empty"):
        memory().lookup(queries, "prompt_end")


def test_ten_thousand_edits_stay_cheap():
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(10_000, 64, generator=g)
    m = EditMemory(64, text_layer=1, visual_layer=2, model_type="blip-2")
    state = torch.zeros(1, 64)
    for k in keys:
        m.add(state, state, {"prompt_end": k, "last_position": k, "image_mean": k})
    wanted = torch.tensor([17, 9_999, 4_242, 0])
    queries = keys[wanted] + 0.01 * torch.randn(4, 64, generator=g)
    m.lookup(queries, "prompt_end")  # builds the stacked key matrix once
    started = time.perf_counter()
    for _ in range(10):
        positions, similarity = m.lookup(queries, "prompt_end")
    per_lookup = (time.perf_counter() - started) / 10
    assert positions.tolist() == wanted.tolist() and (similarity > 0.99).all()
    assert per_lookup < 0.05, f"{per_lookup * 1e3:.1f} ms per lookup"


def test_states_are_padded_per_input():
    m = memory()
    m.add(*edit(0, n=5))
    m.add(*edit(1, n=2))
    states = m.states(torch.tensor([1, 0, 1]))
    assert states.text.shape == (3, 5, HIDDEN) and states.visual.shape == (3, 5, HIDDEN)
    assert states.text_mask.sum(dim=1).tolist() == [2, 5, 2]
    assert torch.equal(states.text[0, :2], edit(1, n=2)[0])
    assert torch.count_nonzero(states.text[0, 2:]) == 0
    assert torch.equal(states.keys["prompt_end"][1], edit(0)[2]["prompt_end"])
    assert len(states.select(torch.tensor([2]))) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_and_load_round_trip(tmp_path, dtype):
    m = memory()
    m.add(*edit(0, dtype=dtype), prompt="q", target=" a", image="red.png")
    m.add(*edit(1, n=2, dtype=dtype), edit_id="named")
    m.add(*edit(2, dtype=dtype))
    m.remove(0)
    m.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory.json", "memory.safetensors"]
    index = json.loads((tmp_path / "memory.json").read_text())
    assert list(index) == sorted(index) and index["ids"] == ["named", 1]
    for lazy in (False, True):  # read whole, or memory-mapped with states read on use
        loaded = EditMemory.load(tmp_path, lazy=lazy)
        assert loaded.ids == m.ids and loaded.entries() == m.entries()
        for i in range(2):
            a, b = m.states([i]), loaded.states([i])
            assert b.text.dtype == dtype
            assert torch.equal(a.text, b.text) and torch.equal(a.visual, b.visual)
            assert all(torch.equal(a.keys[k], b.keys[k]) for k in a.keys)
        assert loaded.add(*edit(5)) == 2  # the id counter survives the file


def test_empty_memory_round_trips_and_read_checks_the_model(tmp_path):
    memory().save(tmp_path / "empty")
    assert len(EditMemory.load(tmp_path / "empty")) == 0
    m = memory()
    m.add(*edit(0))
    m.save(tmp_path / "one")
    other = EditMemory(HIDDEN, text_layer=2, visual_layer=4, model_type="llava")
    other.add(*edit(1))
    with pytest.raises(ValueError, match="text_layer is 3, this memory needs 2"):
        other.read(tmp_path / "one")
    assert len(other) == 1  # a refused file leaves the memory as it was
    with pytest.raises(FileNotFoundError, match="memory.json"):
        EditMemory.load(tmp_path / "missing")
    # A hand edit is caught by the checksum; a re-signed one by the lengths check.
    index = json.loads((tmp_path / "one" / "memory.json").read_text())
    index["text_lengths"] = [4]
    (tmp_path / "one" / "memory.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="memory.json: damaged or edited by hand"):
        EditMemory.load(tmp_path / "one")
    rewrite_json(tmp_path / "one" / "memory.json", lambda index: index.update(text_lengths=[4]))
    with pytest.raises(ValueError, match="edit 0 keeps 4 text and 5 visual positions"):
        EditMemory.load(tmp_path / "one")


def test_prompt_end_image_lookup_is_the_mean_of_the_two_cosines():
    m = memory()
    for seed in range(5):
        m.add(*edit(seed))
    g = torch.Generator().manual_seed(11)
    end, image = torch.randn(3, HIDDEN, generator=g), torch.randn(3, HIDDEN, generator=g)
    image[2] = 0.0  # an input without an image
    query = torch.cat([F.normalize(end, dim=-1), F.normalize(image, dim=-1)], dim=-1)
    stored = [edit(seed)[2] for seed in range(5)]
    ends = torch.stack([k["prompt_end"] for k in stored])  # [5, hidden]
    cos_end = F.cosine_similarity(end[:, None], ends[None], dim=-1)
    cos_image = F.cosine_similarity(
        image[:, None], torch.stack([k["image_mean"] for k in stored])[None], dim=-1
    )
    brute = torch.cat([(cos_end[:2] + cos_image[:2]) / 2, cos_end[2:] / 2**0.5])  # [3, 5]
    positions, similarity = m.lookup(query, "prompt_end_image")
    assert positions.tolist() == brute.argmax(dim=1).tolist()
    torch.testing.assert_close(similarity, brute.max(dim=1).values)
    # It differs from the prompt-end key alone (the image part counts).
    assert not torch.allclose(similarity, m.lookup(end, "prompt_end")[1])


def test_text_keys_are_saved_and_checked(tmp_path):
    m = memory(text_keys="text")
    m.add(*edit(0))
    m.save(tmp_path)
    assert json.loads((tmp_path / "memory.json").read_text())["text_keys"] == "text"
    assert EditMemory.load(tmp_path).text_keys == "text"
    with pytest.raises(ValueError, match="text_keys is 'text', this memory needs 'all'"):
        memory().read(tmp_path)
    with pytest.raises(ValueError, match="text_keys must be one of"):
        memory(text_keys="image")


def test_format_1_files_load_without_the_image_part(tmp_path):
    """Files written before text_keys and the image_mean part: text keys "all"; the combined
    gate key is refused with a message, the others work."""
    from safetensors.torch import load_file, save_file

    m = memory()
    m.add(*edit(0))
    m.save(tmp_path)
    index = legacy(json.loads((tmp_path / "memory.json").read_text()))
    index["format"] = 1
    del index["text_keys"]
    (tmp_path / "memory.json").write_text(json.dumps(index))
    tensors = load_file(str(tmp_path / "memory.safetensors"))
    del tensors["key.image_mean"]
    save_file(tensors, str(tmp_path / "memory.safetensors"))
    loaded = EditMemory.load(tmp_path)
    assert loaded.text_keys == "all"
    similarity = loaded.lookup(edit(0)[2]["prompt_end"][None], "prompt_end")[1]
    assert similarity.item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="needs the key part\\(s\\) \\['image_mean'\\]"):
        loaded.lookup(torch.ones(1, 2 * HIDDEN), "prompt_end_image")


def test_prompt_end_and_image_lookup_is_the_smaller_of_the_two_cosines():
    """Both parts must match: the similarity is min(prompt-end cosine, image cosine), and the
    nearest edit is chosen by it. An input without an image has image cosine 0 against an edit
    with one and 1 against an edit without one."""
    from dualedit.editors.dualedit.gate import gate_vectors

    m = memory()
    stored = [edit(seed)[2] for seed in range(5)]
    stored[4] = {**stored[4], "image_mean": torch.zeros(HIDDEN)}  # a text-only edit
    for seed in range(5):
        m.add(*edit(seed)[:2], stored[seed])
    g = torch.Generator().manual_seed(11)
    end, image = torch.randn(3, HIDDEN, generator=g), torch.randn(3, HIDDEN, generator=g)
    image[2] = 0.0  # an input without an image
    query = gate_vectors({"prompt_end": end, "image_mean": image}, "prompt_end_and_image")
    cos_end = F.cosine_similarity(
        end[:, None], torch.stack([k["prompt_end"] for k in stored])[None], dim=-1
    )  # [3, 5]
    cos_image = torch.nan_to_num(F.cosine_similarity(
        image[:, None], torch.stack([k["image_mean"] for k in stored])[None], dim=-1
    ))  # [3, 5]; 0 where one side has no image
    cos_image[2, 4] = 1.0  # neither has an image
    brute = torch.minimum(cos_end, cos_image)
    positions, similarity = m.lookup(query, "prompt_end_and_image")
    assert positions.tolist() == brute.argmax(dim=1).tolist()
    torch.testing.assert_close(similarity, brute.max(dim=1).values)
    assert positions[2].item() == 4 and similarity[2] == pytest.approx(cos_end[2, 4].item())


def test_prompt_end_and_image_keeps_out_an_input_that_matches_only_the_image():
    """Same image, an unrelated question (orthogonal prompt-end state): the mean key scores it
    0.5, above a threshold of 0.4; the min key scores it 0, and the question alone likewise."""
    from dualedit.editors.dualedit.gate import gate_vectors

    m = memory()
    text, visual, keys = edit(0)
    keys["prompt_end"] = torch.eye(HIDDEN)[0]
    m.add(text, visual, keys)
    image = keys["image_mean"][None]
    other_question = torch.eye(HIDDEN)[1][None]
    parts = {"prompt_end": other_question, "image_mean": image}
    _, mean = m.lookup(gate_vectors(parts, "prompt_end_image"), "prompt_end_image")
    _, both = m.lookup(gate_vectors(parts, "prompt_end_and_image"), "prompt_end_and_image")
    assert mean.item() == pytest.approx(0.5, abs=1e-6) and mean.item() >= 0.4
    assert both.item() == pytest.approx(0.0, abs=1e-6)
    same_question = {"prompt_end": keys["prompt_end"][None], "image_mean": -image}
    _, question_only = m.lookup(
        gate_vectors(same_question, "prompt_end_and_image"), "prompt_end_and_image"
    )
    assert question_only.item() == pytest.approx(-1.0, abs=1e-5)


def test_similarity_rows_agree_with_the_matrix():
    """The per-row similarity (edits given per input, as in training) is the matrix diagonal."""
    from dualedit.editors.dualedit.config import GATE_KEYS
    from dualedit.editors.dualedit.gate import (
        gate_vectors,
        similarity_matrix,
        similarity_rows,
    )

    g = torch.Generator().manual_seed(3)
    widths = {"prompt_end": 1, "last_position": 1, "image_mean": 1, "image_groups": IMAGE_GROUPS}
    parts = [
        {p: torch.randn(4, w * HIDDEN, generator=g) for p, w in widths.items()} for _ in range(2)
    ]
    parts[0]["image_mean"][1] = 0.0
    parts[0]["image_groups"][1] = 0.0
    from dualedit.editors.dualedit.heads import GateHeads

    heads = GateHeads(HIDDEN, width=8)  # the learned kind's (random) heads
    for kind in GATE_KEYS:
        a, b = gate_vectors(parts[0], kind, heads), gate_vectors(parts[1], kind, heads)
        torch.testing.assert_close(
            similarity_rows(a, b, kind), similarity_matrix(a, b, kind).diagonal()
        )


def test_lookup_form_gives_the_similarity_matrix_of_every_kind():
    """The transposed matrix the memory keeps for lookups (`lookup_matrix`) scores as
    `similarity_matrix` does, for every gate key (an input without an image included), and the
    memory's lookup picks the same edits."""
    from dualedit.editors.dualedit.config import GATE_KEYS
    from dualedit.editors.dualedit.gate import (
        gate_vectors,
        lookup_matrix,
        lookup_similarity,
        similarity_matrix,
    )
    from dualedit.editors.dualedit.heads import GateHeads

    g = torch.Generator().manual_seed(5)
    widths = {"prompt_end": 1, "last_position": 1, "image_mean": 1, "image_groups": IMAGE_GROUPS}
    queries = {p: torch.randn(3, w * HIDDEN, generator=g) for p, w in widths.items()}
    stored = {p: torch.randn(50, w * HIDDEN, generator=g) for p, w in widths.items()}
    queries["image_mean"][2] = 0.0
    queries["image_groups"][2] = 0.0
    heads = GateHeads(HIDDEN, width=8)
    for kind in GATE_KEYS:
        q, k = gate_vectors(queries, kind, heads), gate_vectors(stored, kind, heads)
        matrix = lookup_matrix(k, kind)
        assert matrix.shape == (k.shape[1], 50) and matrix.is_contiguous()
        torch.testing.assert_close(lookup_similarity(q, matrix, kind),
                                   similarity_matrix(q, k, kind))
    store = memory()
    store.set_gate_heads(heads)
    for i in range(50):
        store.add(torch.randn(2, HIDDEN, generator=g), torch.randn(3, HIDDEN, generator=g),
                  {p: stored[p][i] for p in widths})
    for kind in GATE_KEYS:
        positions, similarity = store.lookup(gate_vectors(queries, kind, heads), kind)
        expected = similarity_matrix(gate_vectors(queries, kind, heads),
                                     store.key_matrix(kind), kind).max(dim=1)
        assert positions.tolist() == expected.indices.tolist()
        torch.testing.assert_close(similarity, expected.values)


def test_saved_memory_serves_the_min_key_and_old_files_refuse_it(tmp_path):
    """The min key reads the stored parts: a saved and loaded memory looks up the same, and a
    format-1 file (no image part) refuses it by name."""
    from safetensors.torch import load_file, save_file

    from dualedit.editors.dualedit.gate import gate_vectors

    m = memory()
    for seed in range(3):
        m.add(*edit(seed))
    query = gate_vectors(
        {"prompt_end": torch.randn(2, HIDDEN), "image_mean": torch.randn(2, HIDDEN)},
        "prompt_end_and_image",
    )
    m.save(tmp_path / "new")
    loaded = EditMemory.load(tmp_path / "new")
    for got, want in zip(
        loaded.lookup(query, "prompt_end_and_image"), m.lookup(query, "prompt_end_and_image")
    ):
        torch.testing.assert_close(got, want)
    index = legacy(json.loads((tmp_path / "new" / "memory.json").read_text()))
    index["format"] = 1
    del index["text_keys"]
    (tmp_path / "new" / "memory.json").write_text(json.dumps(index))
    tensors = load_file(str(tmp_path / "new" / "memory.safetensors"))
    del tensors["key.image_mean"]
    save_file(tensors, str(tmp_path / "new" / "memory.safetensors"))
    old = EditMemory.load(tmp_path / "new")
    with pytest.raises(ValueError, match="'prompt_end_and_image' needs the key part"):
        old.lookup(query, "prompt_end_and_image")


def test_image_groups_are_the_normalised_means_of_contiguous_image_positions():
    """Per row: the image positions in order, cut into IMAGE_GROUPS groups (rank * groups //
    count), each group's mean normalised; zero without an image; padding and text ignored."""
    from dualedit.editors.dualedit.gate import key_parts

    g = torch.Generator().manual_seed(5)
    h = torch.randn(3, 16, HIDDEN, generator=g)
    mask = torch.zeros(3, 16, dtype=torch.bool)
    mask[0, 2:10] = True  # 8 image positions: groups of 2
    mask[1, 1:11] = True  # 10 positions: groups of 3, 2, 3, 2
    parts = key_parts(h, torch.tensor([12, 13, 3]), torch.tensor([15, 15, 5]), mask)
    groups = parts["image_groups"].view(3, IMAGE_GROUPS, HIDDEN)
    assert IMAGE_GROUPS == 4  # the expected cuts below
    cuts_per_row = {0: [(2, 4), (4, 6), (6, 8), (8, 10)], 1: [(1, 4), (4, 6), (6, 9), (9, 11)]}
    for row, cuts in cuts_per_row.items():
        for k, (a, b) in enumerate(cuts):
            expected = F.normalize(h[row, a:b].mean(dim=0), dim=-1)
            torch.testing.assert_close(groups[row, k], expected)
    assert torch.equal(groups[2], torch.zeros(IMAGE_GROUPS, HIDDEN))


def test_prompt_end_image_groups_lookup_is_the_mean_of_question_and_group_cosines():
    from dualedit.editors.dualedit.gate import gate_vectors

    m = memory()
    stored = [edit(seed)[2] for seed in range(4)]
    for seed in range(4):
        m.add(*edit(seed))
    g = torch.Generator().manual_seed(9)
    end = torch.randn(2, HIDDEN, generator=g)
    groups = F.normalize(torch.randn(2, IMAGE_GROUPS, HIDDEN, generator=g), dim=-1)
    query = gate_vectors({"prompt_end": end, "image_groups": groups.flatten(1)},
                         "prompt_end_image_groups")
    ends = torch.stack([k["prompt_end"] for k in stored])  # [4, hidden]
    edit_groups = F.normalize(
        torch.stack([k["image_groups"] for k in stored]).view(4, IMAGE_GROUPS, HIDDEN), dim=-1
    )  # stored parts need not be unit per group; the gate compares directions
    cos_end = F.cosine_similarity(end[:, None], ends[None], dim=-1)  # [2, 4]
    cos_groups = torch.einsum("qkh,ekh->qek", groups, edit_groups).mean(dim=-1)  # [2, 4]
    positions, similarity = m.lookup(query, "prompt_end_image_groups")
    brute = (cos_end + cos_groups) / 2
    assert positions.tolist() == brute.argmax(dim=1).tolist()
    torch.testing.assert_close(similarity, brute.max(dim=1).values)


def test_edits_and_files_without_image_groups_refuse_only_the_group_key(tmp_path):
    """An edit given without the part, and a format-2 file (written before it existed), load;
    the kinds that need the groups name the missing part, the others work."""
    from safetensors.torch import load_file, save_file

    from dualedit.editors.dualedit.gate import gate_vectors

    m = memory()
    text, visual, keys = edit(0)
    del keys["image_groups"]
    m.add(text, visual, keys)
    with pytest.raises(ValueError, match="needs the key part\\(s\\) \\['image_groups'\\]"):
        m.lookup(torch.ones(1, (1 + IMAGE_GROUPS) * HIDDEN), "prompt_end_image_groups")
    assert m.lookup(keys["prompt_end"][None], "prompt_end")[1].item() == pytest.approx(1.0)
    full = memory()
    full.add(*edit(0))
    full.save(tmp_path)
    index = legacy(json.loads((tmp_path / "memory.json").read_text()))
    assert index["format"] == 5
    index["format"] = 2
    (tmp_path / "memory.json").write_text(json.dumps(index))
    tensors = load_file(str(tmp_path / "memory.safetensors"))
    del tensors["key.image_groups"]
    save_file(tensors, str(tmp_path / "memory.safetensors"))
    old = EditMemory.load(tmp_path)
    with pytest.raises(ValueError, match="needs the key part\\(s\\) \\['image_groups'\\]"):
        old.lookup(torch.ones(1, (1 + IMAGE_GROUPS) * HIDDEN), "prompt_end_image_groups")
    keys = edit(0)[2]
    parts = {"prompt_end": keys["prompt_end"][None], "image_mean": keys["image_mean"][None]}
    similarity = old.lookup(gate_vectors(parts, "prompt_end_image"), "prompt_end_image")[1]
    assert similarity.item() == pytest.approx(1.0)


def test_add_many_is_one_batch_of_adds_and_refuses_all_on_one_bad_edit():
    m, one = memory(), memory()
    edits = [edit(seed, n=seed + 2) for seed in range(4)]
    ids = m.add_many(*zip(*edits), edit_ids=[None, "b", None, None],
                     prompts=["p0", "p1", "p2", "p3"], targets=[" t0", None, None, " t3"])
    for (text, visual, keys), edit_id in zip(edits, [None, "b", None, None]):
        one.add(text, visual, keys, edit_id=edit_id)
    assert ids == one.ids == [0, "b", 1, 2]
    assert [e.prompt for e in m.entries()] == ["p0", "p1", "p2", "p3"]
    assert m.entries()[3].target == " t3" and m.entries()[1].target is None
    query = torch.randn(3, HIDDEN)
    for a, b in zip(m.lookup(query, "prompt_end"), one.lookup(query, "prompt_end")):
        assert torch.equal(a, b)
    text, visual, keys = edit(9)
    broken = (text[:, :3], visual, keys)
    with pytest.raises(ValueError, match=r"edit 4: text states have shape \(5, 3\)"):
        m.add_many(*zip(edit(8), broken, edit(10)))
    with pytest.raises(ValueError, match="3 text states but"):
        m.add_many(*zip(edit(8), edit(9), edit(10)), prompts=["only one"])
    assert m.ids == [0, "b", 1, 2]  # nothing of the refused batches was stored


def test_answer_keys_of_prompts_of_different_lengths_load_again(tmp_path):
    """text_keys "answer" keeps the last prompt token and the target: the gap to the visual
    count is each prompt's own length, so two edits may differ in it (files once refused)."""
    m = memory(text_keys="answer")
    for seed, (n_text, n_visual) in enumerate([(3, 9), (2, 14)]):
        text, visual, keys = edit(seed, n=n_visual)
        m.add(text[-n_text:], visual, keys)
    m.save(tmp_path)
    loaded = EditMemory.load(tmp_path)
    assert [e.text_positions for e in loaded.entries()] == [3, 2]
