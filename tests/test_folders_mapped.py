"""Large edit stores read lazily: memory-mapped, each edit's rows verified against the file's
block checksums when first used; damaged blocks and NaN refused then, naming the file."""

import json

import pytest
import torch

import dualedit.editors.memory_files as memory_files
from dualedit.editors.memory import EditStore, Field
from dualedit.folders.mapped import LazyRows, MappedTensor
from folder_tools import rewrite_tensors

WIDTH = 8
ROWS = 16  # 16 x 8 float32 = 512 bytes of states per edit
FILES = {"index_file": "store.json", "tensors_file": "store.safetensors"}


def store():
    return EditStore({"key": Field(WIDTH), "states": Field(WIDTH, sequence=True)})


def saved(tmp_path, monkeypatch, n=12, block=1024):
    monkeypatch.setattr(memory_files, "BLOCK_BYTES", block)
    s = store()
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        s.add({"key": torch.randn(WIDTH, generator=g),
               "states": torch.randn(ROWS, WIDTH, generator=g)}, {"prompt": f"q{i}"})
    s.save(tmp_path, **FILES)
    return s


def states_offset(path, name="states"):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return 8 + n + json.loads(raw[8:8 + n])[name]["data_offsets"][0]


def test_a_lazy_store_reads_each_edit_on_first_use_and_equals_the_eager_one(tmp_path,
                                                                            monkeypatch):
    s = saved(tmp_path, monkeypatch)
    entry = json.loads((tmp_path / "store.json").read_text())["files"]["store.safetensors"]
    assert entry["blocks"]["bytes"] == 1024 and len(entry["blocks"]["sha256"]) >= 6
    lazy, eager = store(), store()
    lazy.read(tmp_path, **FILES, lazy=True)
    eager.read(tmp_path, **FILES, lazy=False)
    column = lazy._columns["states"]
    assert all(isinstance(t, LazyRows) for t in column)  # nothing read yet
    assert lazy.lengths("states") == [ROWS] * 12
    assert lazy.nbytes(0) == eager.nbytes(0)
    positions, _ = lazy.nearest(torch.stack(s.tensors("key")[3:5]), "key")
    assert positions.tolist() == [3, 4]  # keys are read at once
    got = lazy.tensors("states", [4])
    assert torch.equal(got[0], s.tensors("states")[4])
    assert column[4]._tensor is not None and column[5]._tensor is None
    for a, b in zip(lazy.tensors("states"), eager.tensors("states"), strict=True):
        assert torch.equal(a, b)
    # A row written into changes the memory, never the file (a private mapping).
    lazy.tensors("states", [0])[0][0, 0] = 1e6
    again = store()
    again.read(tmp_path, **FILES, lazy=False)
    assert torch.equal(again.tensors("states")[0], s.tensors("states")[0])
    # Saving a lazily read store writes every edit.
    lazy.save(tmp_path / "copy", **FILES)
    copy = store()
    copy.read(tmp_path / "copy", **FILES)
    assert len(copy) == 12 and copy.tensors("states")[0][0, 0] == 1e6


def test_a_damaged_block_is_refused_when_its_edit_is_first_used(tmp_path, monkeypatch):
    saved(tmp_path, monkeypatch)
    path = tmp_path / "store.safetensors"
    at = states_offset(path) + 9 * ROWS * WIDTH * 4 + 5  # inside edit 9's states
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="store.safetensors: damaged"):
        store().read(tmp_path, **FILES, lazy=False)  # read whole: refused on load
    lazy = store()
    lazy.read(tmp_path, **FILES, lazy=True)  # the keys and the header are intact
    assert lazy.tensors("states", [0])[0].shape == (ROWS, WIDTH)
    with pytest.raises(ValueError, match="store.safetensors: damaged \\(block"):
        lazy.tensors("states", [9])
    # The keys are verified on load: a damaged key is refused at once.
    saved(tmp_path / "k", monkeypatch)
    path = tmp_path / "k" / "store.safetensors"
    raw = bytearray(path.read_bytes())
    raw[states_offset(path, "key") + 3] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="store.safetensors: damaged \\(block"):
        store().read(tmp_path / "k", **FILES, lazy=True)


def test_nan_states_and_a_wrong_size_are_refused_naming_the_file(tmp_path, monkeypatch):
    saved(tmp_path, monkeypatch)
    rewrite_tensors(tmp_path / "store.safetensors",
                    lambda t: t["states"].__setitem__((7 * ROWS, 0), float("nan")),
                    manifest="store.json")
    lazy = store()
    lazy.read(tmp_path, **FILES, lazy=True)
    assert torch.isfinite(lazy.tensors("states", [6])[0]).all()
    with pytest.raises(ValueError, match="store.safetensors: tensor 'states' holds 1 NaN"):
        lazy.tensors("states", [7])
    path = tmp_path / "store.safetensors"
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(ValueError, match="store.safetensors: damaged"):
        store().read(tmp_path, **FILES, lazy=True)


def test_small_files_are_read_whole_unless_asked(tmp_path, monkeypatch):
    saved(tmp_path, monkeypatch)
    auto = store()
    auto.read(tmp_path, **FILES)  # below LAZY_MIN_BYTES: read and verified whole
    assert not any(isinstance(t, LazyRows) for t in auto._columns["states"])
    index, tensors, _ = EditStore.read_files(tmp_path, **FILES, lazy=True)
    assert isinstance(tensors["states"], MappedTensor)
    assert tensors["states"].shape == (12 * ROWS, WIDTH)
    assert torch.equal(tensors["states"].rows(ROWS, 2 * ROWS), auto.tensors("states")[1])
