"""EditStore: ids, order, the stacked cache, nearest / top-k by cosine, files and damaged files."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from dualedit.editors.memory import EditStore, Field, argmax_rows, read_index, top_k_rows
from folder_tools import rewrite_json, rewrite_tensors

WIDTH = 6
FILES = {"index_file": "store.json", "tensors_file": "store.safetensors"}


def store(**kwargs):
    return EditStore(
        {"key": Field(WIDTH), "states": Field(WIDTH, sequence=True), "value": Field(3)}, **kwargs
    )


def tensors(seed, rows=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {
        "key": torch.randn(WIDTH, generator=g),
        "states": torch.randn(rows, WIDTH, generator=g).to(dtype),
        "value": torch.randn(3, generator=g),
    }


def filled(n=5):
    s = store()
    for seed in range(n):
        s.add(tensors(seed, rows=seed + 1), {"prompt": f"q{seed}", "image": None})
    return s


def test_ids_are_given_or_counted_and_never_reused():
    s = store()
    assert s.add(tensors(0)) == 0 and s.add(tensors(1), edit_id="fact-1") == "fact-1"
    assert s.add(tensors(2), edit_id=7) == 7 and s.add(tensors(3)) == 8  # counts on above 7
    assert s.ids == [0, "fact-1", 7, 8] and len(s) == 4 and "fact-1" in s and 1 not in s
    s.remove(8)
    assert s.add(tensors(4)) == 9  # 8 is not given again
    s.clear()
    assert len(s) == 0 and s.add(tensors(5)) == 10
    for bad, message in (("", "1..64"), ("x" * 65, "1..64"), (True, "int or"), (1.0, "int or")):
        with pytest.raises(ValueError, match=message):
            s.add(tensors(6), edit_id=bad)
    assert s.add(tensors(6), edit_id="y" * 64) == "y" * 64


def test_duplicate_ids_are_refused_by_name():
    s = store()
    s.add(tensors(0), edit_id="fact-1")
    s.add(tensors(1))
    for taken in ("fact-1", 0):
        with pytest.raises(ValueError, match=f"edit id {taken!r} is already in the store"):
            s.add(tensors(2), edit_id=taken)
    assert s.ids == ["fact-1", 0]


def test_remove_keeps_the_order_of_the_others():
    s = filled(5)
    s.remove(2)
    s.remove(0)
    assert s.ids == [1, 3, 4] and [s.position(i) for i in s.ids] == [0, 1, 2]
    assert [s.info(i)["prompt"] for i in s.ids] == ["q1", "q3", "q4"]
    kept = s.tensors("key")
    assert all(torch.equal(k, tensors(seed)["key"]) for k, seed in zip(kept, (1, 3, 4)))
    assert [t.shape[0] for t in s.tensors("states", [2, 0])] == [5, 2]
    with pytest.raises(KeyError, match="no edit with id 2"):
        s.remove(2)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: {**t, "key": t["key"][:4]}, "'key' has shape \\(4,\\)"),
        (lambda t: {**t, "states": t["states"][:0]}, "'states' has shape \\(0, 6\\)"),
        (lambda t: {**t, "states": t["states"][0]}, "'states' has shape \\(6,\\)"),
        (lambda t: {"key": t["key"], "states": t["states"]}, "missing tensor\\(s\\) \\['value'\\]"),
        (lambda t: {**t, "extra": t["key"]}, "unexpected \\['extra'\\]"),
    ],
)
def test_malformed_edits_are_refused(change, message):
    s = store()
    with pytest.raises(ValueError, match=message):
        s.add(change(tensors(0)))
    assert len(s) == 0 and s.add(tensors(0)) == 0  # a refused edit takes no id


def test_info_must_be_json_able_and_is_a_copy():
    s = store()
    with pytest.raises(ValueError, match="not JSON-able"):
        s.add(tensors(0), {"image": object()})
    info = {"prompt": "q"}
    eid = s.add(tensors(0), info)
    info["prompt"] = "changed"
    s.info(eid)["prompt"] = "changed too"
    assert s.info(eid) == {"prompt": "q"}


def test_a_tensor_under_two_names_is_kept_and_counted_once():
    s = EditStore({"a": Field(WIDTH, sequence=True), "b": Field(WIDTH, sequence=True)})
    h = torch.randn(5, WIDTH)
    shared = s.add({"a": h, "b": h})
    apart = s.add({"a": h, "b": h.clone()})
    assert s.nbytes(shared) == 5 * WIDTH * 4 and s.nbytes(apart) == 2 * 5 * WIDTH * 4
    assert s.tensors("a")[0] is s.tensors("b")[0]


def test_fields_holding_the_same_tensors_are_written_once(tmp_path):
    def two():
        return EditStore({"a": Field(WIDTH, sequence=True), "b": Field(WIDTH, sequence=True)})

    s = two()
    h = [torch.randn(n, WIDTH) for n in (3, 5)]
    for t in h:
        s.add({"a": t, "b": t})
    s.save(tmp_path, **FILES)
    assert json.loads((tmp_path / "store.json").read_text())["same_as"] == {"b": "a"}
    assert set(load_file(str(tmp_path / "store.safetensors"))) == {"a"}  # 8 rows, once
    loaded = two()
    loaded.read(tmp_path, **FILES)
    assert all(torch.equal(x, y) for x, y in zip(loaded.tensors("b"), h))
    assert loaded.tensors("a")[1] is loaded.tensors("b")[1]  # shared again in memory
    # One edit apart: both written.
    s.add({"a": h[0], "b": h[0].clone()})
    s.save(tmp_path / "apart", **FILES)
    assert "same_as" not in json.loads((tmp_path / "apart" / "store.json").read_text())
    # A damaged mapping is refused by name.
    rewrite_json(tmp_path / "store.json", lambda d: d.update(same_as={"b": "key"}))
    with pytest.raises(ValueError, match="same_as"):
        two().read(tmp_path, **FILES)


def test_field_dtype_converts_on_add():
    s = EditStore({"key": Field(WIDTH, dtype=torch.float32)})
    s.add({"key": torch.ones(WIDTH, dtype=torch.bfloat16)})
    assert s.tensors("key")[0].dtype == torch.float32 and s.nbytes(0) == WIDTH * 4


def test_stacked_is_cached_until_the_next_change():
    s = filled(3)
    first = s.stacked("key")
    assert first.shape == (3, WIDTH) and s.stacked("key") is first
    assert torch.equal(first, torch.stack([tensors(seed)["key"] for seed in range(3)]))
    assert s.stacked("key", cache=False) is not first
    for change in (lambda: s.add(tensors(9)), lambda: s.remove(0), s.clear):
        before = s.stacked("key")
        change()
        after = s.stacked("key")
        assert after is not before and after.shape[0] == len(s)
    assert s.stacked("key").shape == (0, WIDTH)
    with pytest.raises(ValueError, match="'states' is not a vector field"):
        s.stacked("states")


def test_stacked_under_inference_mode_is_kept_apart():
    s = filled(2)
    with torch.inference_mode():
        inside = s.stacked("key")
    outside = s.stacked("key")
    assert inside.is_inference() and not outside.is_inference()


def brute_cosine(queries, stored):
    return torch.stack(
        [torch.stack([F.cosine_similarity(q, k, dim=0) for k in stored]) for q in queries]
    )  # [batch, n]


def test_nearest_and_top_k_agree_with_brute_force_cosine():
    s = filled(6)
    s.remove(3)
    stored = [tensors(seed)["key"] for seed in (0, 1, 2, 4, 5)]
    g = torch.Generator().manual_seed(7)
    queries = torch.randn(4, WIDTH, generator=g)
    queries[0] = stored[3] * 5.0  # the same direction as edit 4, another norm
    brute = brute_cosine(queries, stored)  # [4, 5]
    positions, similarity = s.nearest(queries, "key")
    assert positions.tolist() == brute.argmax(dim=1).tolist() and positions[0].item() == 3
    torch.testing.assert_close(similarity, brute.max(dim=1).values)
    assert similarity[0].item() == pytest.approx(1.0, abs=1e-6)
    positions, similarity = s.top_k(queries, "key", 3)
    order = brute.argsort(dim=1, descending=True)[:, :3]
    assert positions.shape == (4, 3) and positions.tolist() == order.tolist()
    torch.testing.assert_close(similarity, brute.gather(1, order))
    assert s.top_k(queries, "key", 50)[0].shape == (4, 5)  # capped at the number of edits
    with pytest.raises(ValueError, match="k must be a positive int"):
        s.top_k(queries, "key", 0)


def test_lookup_refuses_an_empty_store_and_wrong_queries():
    with pytest.raises(ValueError, match="empty"):
        store().nearest(torch.ones(1, WIDTH), "key")
    s = filled(2)
    with pytest.raises(ValueError, match="expected \\[batch, 6\\]"):
        s.nearest(torch.ones(1, WIDTH + 1), "key")
    with pytest.raises(ValueError, match="not a vector field"):
        s.top_k(torch.ones(1, WIDTH), "states", 1)


def test_precomputed_similarity_picks_like_nearest():
    similarity = torch.tensor([[0.1, 0.9, 0.3], [0.5, -1.0, 0.7]])
    positions, best = argmax_rows(similarity)
    assert positions.tolist() == [1, 2] and best.tolist() == pytest.approx([0.9, 0.7])
    positions, best = top_k_rows(similarity, 2)
    assert positions.tolist() == [[1, 2], [2, 0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_and_read_round_trip(tmp_path, dtype):
    s = store()
    s.add(tensors(0, rows=2, dtype=dtype), {"prompt": "q", "target": " a", "image": "x.png"})
    s.add(tensors(1, rows=5, dtype=dtype), edit_id="named")
    s.add(tensors(2, rows=1, dtype=dtype))
    s.remove(0)
    s.save(tmp_path, **FILES, meta={"format": 1, "what": "test"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store.json", "store.safetensors"]
    index = json.loads((tmp_path / "store.json").read_text())
    assert list(index) == sorted(index) and index["states_lengths"] == [5, 1]
    assert index["ids"] == ["named", 1] and index["next_id"] == 2 and index["what"] == "test"
    saved = load_file(str(tmp_path / "store.safetensors"))
    assert saved["states"].shape == (6, WIDTH) and saved["key"].shape == (2, WIDTH)
    loaded = store()
    meta = loaded.read(tmp_path, **FILES)
    assert meta["what"] == "test" and loaded.ids == s.ids
    assert [loaded.info(i) for i in loaded.ids] == [s.info(i) for i in s.ids]
    for name in s.fields:
        for a, b in zip(s.tensors(name), loaded.tensors(name), strict=True):
            assert b.dtype == a.dtype and torch.equal(a, b)
    assert loaded.add(tensors(3)) == 2  # the id counter survives the file
    empty = tmp_path / "empty"
    store().save(empty, **FILES)
    assert len(store().read(empty, **FILES)["ids"]) == 0


def test_read_fills_missing_vectors_and_shares_equal_tensors(tmp_path):
    s = EditStore({"a": Field(WIDTH, sequence=True), "b": Field(WIDTH, sequence=True)})
    h = torch.randn(3, WIDTH)
    s.add({"a": h, "b": h})
    s.save(tmp_path, **FILES)
    wider = EditStore({**s.fields, "new": Field(2)})
    with pytest.raises(ValueError, match="missing \\['new'\\]"):
        wider.read(tmp_path, **FILES)
    wider.read(tmp_path, **FILES, fill={"new": float("nan")}, share=[("a", "b")])
    assert wider.tensors("new")[0].isnan().all() and wider.tensors("a")[0] is wider.tensors("b")[0]


def damage(tmp_path, index=None, tensors=None):
    """Save a store, then change its files and re-sign them (folder_tools): the store's own
    checks must catch what the checksums no longer do."""
    s = filled(3)
    s.save(tmp_path, **FILES)
    if tensors is not None:
        rewrite_tensors(tmp_path / "store.safetensors", tensors, manifest="store.json")
    if index is not None:
        rewrite_json(tmp_path / "store.json", index)


@pytest.mark.parametrize(
    "index, tensors, file, message",
    [
        (lambda d: d["states_lengths"].__setitem__(0, 2), None, "store.safetensors",
         "states has 6 positions along dim 0 .* lists 7 \\(states_lengths\\)"),
        (None, lambda d: d.pop("value"), "store.safetensors", "missing \\['value'\\]"),
        (None, lambda d: d.update(other=torch.ones(1)), "store.safetensors",
         "unexpected \\['other'\\]"),
        (None, lambda d: d.update(key=d["key"][:2]), "store.safetensors", "key has 2 positions"),
        (lambda d: d["ids"].__setitem__(2, 0), None, "store.json", "ids not unique: \\[0\\]"),
        (lambda d: d["info"].pop(), None, "store.json", "disagree in length"),
        (lambda d: d.pop("next_id"), None, "store.json", "missing field\\(s\\) \\['next_id'\\]"),
        (lambda d: d["ids"].__setitem__(1, 1.5), None, "store.json", "int or a str"),
        (lambda d: d["states_lengths"].__setitem__(1, 0), None, "store.json", "positive ints"),
    ],
)
def test_damaged_files_are_refused_naming_the_file(tmp_path, index, tensors, file, message):
    damage(tmp_path, index, tensors)
    target = filled(1)
    with pytest.raises(ValueError, match=f"{file}: .*{message}"):
        target.read(tmp_path, **FILES)
    assert target.ids == [0]  # a refused file leaves the store as it was


def test_truncated_and_missing_files_are_refused_naming_the_file(tmp_path):
    damage(tmp_path)
    text = (tmp_path / "store.json").read_text()
    (tmp_path / "store.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="store.json: not valid JSON"):
        store().read(tmp_path, **FILES)
    (tmp_path / "store.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="store.json: expected a JSON object"):
        read_index(tmp_path / "store.json")
    damage(tmp_path)
    raw = (tmp_path / "store.safetensors").read_bytes()
    (tmp_path / "store.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="store.safetensors: damaged"):
        store().read(tmp_path, **FILES)
    (tmp_path / "store.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="store.safetensors"):
        store().read(tmp_path, **FILES)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        store().read(tmp_path, index_file="missing.json", tensors_file="x")


def test_meta_may_not_overwrite_the_store_fields(tmp_path):
    with pytest.raises(ValueError, match="\\['ids', 'states_lengths'\\]"):
        filled(1).save(tmp_path, **FILES, meta={"ids": [], "states_lengths": []})


def test_add_many_stores_all_in_order_or_none():
    s = filled(2)  # ids 0, 1
    ids = s.add_many([tensors(10), tensors(11), tensors(12)], [{"prompt": "a"}, None, None],
                     edit_ids=[None, "named", None])
    assert ids == [2, "named", 3] and s.ids == [0, 1, 2, "named", 3]
    assert s.info(2) == {"prompt": "a"} and s.info(3) == {}
    assert torch.equal(s.stacked("key")[2], tensors(10)["key"])
    before = (list(s.ids), s.stacked("key").clone())
    bad = dict(tensors(21), value=torch.zeros(4))  # wrong width in the middle of the batch
    with pytest.raises(ValueError, match=r"edit 5: tensor 'value' has shape \(4,\)"):
        s.add_many([tensors(20), bad, tensors(22)])
    with pytest.raises(ValueError, match="edit id 'x' is given twice"):
        s.add_many([tensors(20), tensors(21)], edit_ids=["x", "x"])
    with pytest.raises(ValueError, match="is already in the store"):
        s.add_many([tensors(20), tensors(21)], edit_ids=[None, "named"])
    with pytest.raises(ValueError, match="2 edits, 1 infos"):
        s.add_many([tensors(20), tensors(21)], [None])
    assert s.ids == before[0] and torch.equal(s.stacked("key"), before[1])  # nothing stored
    assert s.add(tensors(30)) == 4  # the refused batches took no ids
