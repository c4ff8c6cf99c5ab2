"""dualedit.folders: whole-folder writes and reads, checksums, interrupted and concurrent writers.

The folder of most tests holds one tensor file `t.safetensors` (tensor "x" filled with a value)
and its manifest `m.json` (the same value under "value"), so a reader that mixed two versions
would see two values. Other processes are started with `subprocess` (`sys.executable -c`), never
forked, and synchronise through marker files.
"""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from folder_tools import rewrite_json, rewrite_tensors

from dualedit import folders
from dualedit.editors.memory import EditStore, Field
from dualedit.folders import (
    ConcurrentChange,
    FolderLocked,
    check_finite,
    folder_lock,
    lock_path,
    manifest_checksum,
    read_folder,
    remove_stale_staging,
    sha256_bytes,
    write_folder,
)

MANIFEST = "m.json"
TENSORS = "t.safetensors"
STORE_FILES = {"index_file": "s.json", "tensors_file": "s.safetensors"}
CHILD_TIMEOUT_S = 90


def write(directory, value, *, extra=None, drop=(), **kwargs):
    """A new version of the folder: x = [value] * 4, manifest {"value": value}; returns its
    revision."""
    with write_folder(directory, manifest=MANIFEST, **kwargs) as writer:
        writer.tensors(TENSORS, {"x": torch.full((4,), float(value)), **(extra or {})})
        writer.manifest(MANIFEST, {"value": value}, covers=[TENSORS])
        writer.drop(*drop)
    return writer.revision


def read(directory, **kwargs):
    """(manifest, tensors) of one version of the folder."""

    def inner(reader):
        return reader.read_manifest(MANIFEST), reader.tensors(TENSORS, **kwargs)

    return read_folder(directory, inner)


def staging_of(directory, pid="*"):
    directory = Path(directory)
    return sorted(directory.parent.glob(f".{directory.name}.{pid}.*.staging"))


# -- other processes --------------------------------------------------------------------------

PRELUDE = """
import os, signal, sys, time
from pathlib import Path
import torch
from dualedit.folders import folder_lock, write_folder

MANIFEST, TENSORS = "m.json", "t.safetensors"

def write(directory, value):
    with write_folder(directory, manifest=MANIFEST) as writer:
        writer.tensors(TENSORS, {"x": torch.full((4,), float(value))})
        writer.manifest(MANIFEST, {"value": value}, covers=[TENSORS])

def wait_for(condition, what, timeout=60):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            sys.exit(f"child: timed out waiting for {what}")
        time.sleep(0.01)
"""


def spawn(code, *args):
    """A child Python process running PRELUDE + `code` with `args` in sys.argv[1:]."""
    script = PRELUDE + textwrap.dedent(code)
    return subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(child):
    """(stdout, stderr) of a child once it ended (killed if it hangs)."""
    try:
        return child.communicate(timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        child.kill()
        out, err = child.communicate()
        pytest.fail(f"child process hung\nstdout: {out}\nstderr: {err}")


def wait_until(condition, child, what, timeout=60):
    """Poll `condition` until true; fails (with the child's output) if the child ended first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if child.poll() is not None:
            out, err = child.communicate()
            pytest.fail(f"child ended before {what} (rc {child.returncode})\n{out}\n{err}")
        if time.monotonic() > deadline:
            child.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


# -- round trip -------------------------------------------------------------------------------


def test_round_trip_writes_a_signed_manifest_and_reads_it_back(tmp_path):
    """A written folder reads back the same tensors and record; the manifest lists each covered
    file with its real size, SHA-256, dtypes and shapes, a fresh "revision" per write and a
    "checksum" of itself; nothing but the folder and its lock file is left beside it."""
    d = tmp_path / "d"
    revision = write(d, 3, extra={"y": torch.arange(6, dtype=torch.int64).reshape(2, 3)})
    manifest, tensors = read(d)
    assert torch.equal(tensors["x"], torch.full((4,), 3.0))
    assert torch.equal(tensors["y"], torch.arange(6).reshape(2, 3))
    assert manifest["value"] == 3 and manifest["revision"] == revision
    assert re.fullmatch(r"[0-9a-f]{16}", revision)
    data = (d / TENSORS).read_bytes()
    assert manifest["files"] == {
        TENSORS: {
            "bytes": len(data),
            "sha256": sha256_bytes(data),
            "tensors": {
                "x": {"dtype": "float32", "shape": [4]},
                "y": {"dtype": "int64", "shape": [2, 3]},
            },
        }
    }
    assert manifest["checksum"] == manifest_checksum(manifest)
    assert json.loads((d / MANIFEST).read_text()) == manifest
    assert sorted(os.listdir(d)) == [MANIFEST, TENSORS]
    assert lock_path(d) == tmp_path / ".d.lock"
    assert sorted(os.listdir(tmp_path)) == [".d.lock", "d"]  # no staging or old folder left

    second = write(d, 4)
    manifest, tensors = read(d)
    assert second != revision and manifest["revision"] == second and manifest["value"] == 4
    assert set(tensors) == {"x"} and torch.equal(tensors["x"], torch.full((4,), 4.0))
    assert sorted(os.listdir(tmp_path)) == [".d.lock", "d"]


@pytest.mark.parametrize(
    "umask, file_mode, dir_mode",
    [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)],
    ids=["umask-022", "umask-027"],
)
def test_written_files_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    """Files get 0o666 and the folder 0o777 less the process's umask (not staging's 0o600/0o700
    or a fixed mode), on the first write and on a rewrite."""
    old = os.umask(umask)
    try:
        d = tmp_path / "d"
        for value in (1, 2):
            write(d, value)
            assert (d.stat().st_mode & 0o777) == dir_mode
            for name in (MANIFEST, TENSORS):
                assert ((d / name).stat().st_mode & 0o777) == file_mode, name
    finally:
        os.umask(old)


def test_writer_refuses_bad_names_and_manifests(tmp_path):
    """A file name with a slash or a leading dot, a manifest covering a file not written before
    it, or a record using a field the folder writes itself are refused, and the failed write
    leaves nothing behind."""
    d = tmp_path / "d"
    cases = [
        (lambda w: w.text("a/b.txt", "x"), "a plain name expected"),
        (lambda w: w.text(".hidden", "x"), "a plain name expected"),
        (lambda w: w.manifest(MANIFEST, {}, covers=[TENSORS]), "were not written before it"),
        (lambda w: w.manifest(MANIFEST, {"revision": "mine"}), r"\['revision'\] are written"),
    ]
    for action, message in cases:
        with pytest.raises(ValueError, match=message), write_folder(d, manifest=MANIFEST) as w:
            action(w)
        assert not d.exists() and staging_of(d) == []


def test_a_write_that_raises_leaves_the_old_folder(tmp_path):
    """An error inside the `with` block swaps nothing in: the old version reads back, the
    staging folder is removed and the lock is released."""
    d = tmp_path / "d"
    revision = write(d, 1)
    with pytest.raises(RuntimeError, match="boom"), write_folder(d, manifest=MANIFEST) as writer:
        writer.tensors(TENSORS, {"x": torch.full((4,), 2.0)})
        writer.manifest(MANIFEST, {"value": 2}, covers=[TENSORS])
        raise RuntimeError("boom")
    manifest, tensors = read(d)
    assert manifest["value"] == 1 and manifest["revision"] == revision
    assert torch.equal(tensors["x"], torch.ones(4))
    assert staging_of(d) == []
    with folder_lock(d, timeout=0):
        pass


# -- damaged files ----------------------------------------------------------------------------


def test_a_flipped_byte_in_a_tensor_file_is_refused_by_name(tmp_path):
    """One changed byte of the tensor data (the file still parses) is caught by the SHA-256:
    "damaged", naming the file."""
    d = tmp_path / "d"
    write(d, 1)
    data = bytearray((d / TENSORS).read_bytes())
    data[-1] ^= 0x01
    (d / TENSORS).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=re.escape(f"{d / TENSORS}: damaged")):
        read(d)


def test_a_truncated_tensor_file_is_refused_by_name(tmp_path):
    """A tensor file cut short is "damaged" (named, with its size and the recorded size)."""
    d = tmp_path / "d"
    write(d, 1)
    data = (d / TENSORS).read_bytes()
    (d / TENSORS).write_bytes(data[:-3])
    with pytest.raises(ValueError, match=re.escape(f"{d / TENSORS}: damaged")) as error:
        read(d)
    assert f"{len(data) - 3} bytes" in str(error.value)
    assert f"records {len(data)} bytes" in str(error.value)


def test_a_missing_tensor_file_is_refused_by_name(tmp_path):
    """A covered file deleted from the folder: FileNotFoundError naming it."""
    d = tmp_path / "d"
    write(d, 1)
    (d / TENSORS).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"{d / TENSORS} not found")):
        read(d)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m.pop("value"),
        lambda m: m.update(value=2),
        lambda m: m.pop("revision"),
        lambda m: m.pop("checksum"),
        lambda m: m["files"][TENSORS].update(bytes=m["files"][TENSORS]["bytes"] + 1),
    ],
    ids=["field-removed", "value-changed", "revision-removed", "checksum-removed", "size-edited"],
)
def test_a_hand_edited_manifest_is_refused_by_name(tmp_path, edit):
    """A manifest changed without re-signing (a field removed or changed, its checksum removed)
    is "damaged or edited by hand", naming the manifest."""
    d = tmp_path / "d"
    write(d, 1)
    manifest = json.loads((d / MANIFEST).read_text())
    edit(manifest)
    (d / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    with pytest.raises(ValueError, match=re.escape(f"{d / MANIFEST}: damaged or edited by hand")):
        read(d)


def test_a_manifest_listing_other_shapes_is_refused(tmp_path):
    """A re-signed manifest whose tensor listing disagrees with the (intact) tensor file names
    the tensor that differs."""
    d = tmp_path / "d"
    write(d, 1)
    rewrite_json(d / MANIFEST, lambda m: m["files"][TENSORS]["tensors"]["x"].update(shape=[5]))
    with pytest.raises(ValueError, match=re.escape(f"{d / TENSORS}: tensors ['x'] differ from")):
        read(d)


def test_nonfinite_tensors_are_refused_unless_allowed_by_name(tmp_path):
    """A properly re-signed tensor file holding NaN (or infinity) passes the checksums but is
    refused naming the tensor; `allow_nonfinite` lets only the named tensors through, and
    `check=False` leaves the check to the caller."""
    d = tmp_path / "d"
    write(d, 1, extra={"y": torch.zeros(3)})
    rewrite_tensors(d / TENSORS, lambda t: t["x"].__setitem__(0, float("nan")), manifest=MANIFEST)
    with pytest.raises(ValueError, match=re.escape(f"{d / TENSORS}: tensor 'x' holds 1 NaN")):
        read(d)
    _, tensors = read(d, allow_nonfinite=["x"])
    assert torch.isnan(tensors["x"][0]) and torch.equal(tensors["x"][1:], torch.ones(3))

    rewrite_tensors(d / TENSORS, lambda t: t["y"].fill_(float("inf")), manifest=MANIFEST)
    with pytest.raises(ValueError, match="tensor 'y' holds 3 NaN or infinite"):
        read(d, allow_nonfinite=["x"])
    _, tensors = read(d, allow_nonfinite=["x", "y"])
    assert torch.isinf(tensors["y"]).all()
    _, tensors = read(d, check=False)
    assert torch.isinf(tensors["y"]).all()


def test_check_finite_names_the_first_bad_tensor_and_skips_integers(tmp_path):
    """check_finite: finite floats and integer tensors pass; the message names where and which
    tensor, and how many values are bad; `allow` skips a name."""
    where = tmp_path / "w.safetensors"
    check_finite({"a": torch.ones(3), "i": torch.arange(3)}, where)
    bad = {"a": torch.ones(3), "b": torch.tensor([float("nan"), float("-inf"), 1.0])}
    with pytest.raises(ValueError, match=re.escape(f"{where}: tensor 'b' holds 2 NaN")):
        check_finite(bad, where)
    check_finite(bad, where, allow=["b"])


# -- files the write does not manage ----------------------------------------------------------


def test_unmanaged_files_are_carried_over_and_drop_removes_a_file(tmp_path):
    """A user's README and a sub-folder in the folder survive later writes (same content, not
    listed in the manifest); a file written before but not now is kept until `drop` names it."""
    d = tmp_path / "d"
    with write_folder(d, manifest=MANIFEST) as writer:
        writer.text("extra.txt", "from the first write")
        writer.tensors(TENSORS, {"x": torch.ones(4)})
        writer.manifest(MANIFEST, {"value": 1}, covers=[TENSORS, "extra.txt"])
    (d / "README.md").write_text("notes of the user")
    (d / "sub" / "deeper").mkdir(parents=True)
    (d / "sub" / "deeper" / "n.txt").write_text("nested")

    write(d, 2)
    assert (d / "README.md").read_text() == "notes of the user"
    assert (d / "sub" / "deeper" / "n.txt").read_text() == "nested"
    assert (d / "extra.txt").read_text() == "from the first write"  # not dropped: carried
    manifest, _ = read(d)
    assert manifest["value"] == 2 and list(manifest["files"]) == [TENSORS]

    write(d, 3, drop=["extra.txt"])
    assert sorted(os.listdir(d)) == ["README.md", MANIFEST, "sub", TENSORS]
    assert (d / "README.md").read_text() == "notes of the user"
    assert (d / "sub" / "deeper" / "n.txt").read_text() == "nested"
    assert read(d)[0]["value"] == 3


# -- interrupted writes -----------------------------------------------------------------------

KILLED_WRITER = """
directory = sys.argv[1]
print(os.getpid(), flush=True)
with write_folder(directory, manifest=MANIFEST) as writer:
    writer.tensors(TENSORS, {"x": torch.full((4,), 99.0)})
    os.kill(os.getpid(), signal.SIGKILL)
    writer.manifest(MANIFEST, {"value": 99}, covers=[TENSORS])
"""


def test_a_writer_killed_mid_write_leaves_the_old_folder_whole(tmp_path):
    """A writer killed (SIGKILL) after writing its tensor file but before the block ends: the
    old folder reads back unchanged and complete, the lock is free again, the dead writer's
    staging folder is left; the next write removes it but keeps a live writer's."""
    d = tmp_path / "d"
    revision = write(d, 1)
    child = spawn(KILLED_WRITER, d)
    out, err = finish(child)
    assert child.returncode == -signal.SIGKILL, err
    pid = int(out.split()[0])

    manifest, tensors = read(d)
    assert manifest["value"] == 1 and manifest["revision"] == revision
    assert torch.equal(tensors["x"], torch.ones(4))
    assert sorted(os.listdir(d)) == [MANIFEST, TENSORS]
    left = staging_of(d, pid)
    assert len(left) == 1 and os.listdir(left[0]) == [TENSORS]  # killed after the tensor file
    with folder_lock(d, timeout=0):  # a dead writer's lock is released
        pass

    live = tmp_path / f".d.{os.getpid()}.0123abcd.staging"  # a writer still running
    live.mkdir()
    write(d, 2)
    assert staging_of(d, pid) == [] and live.is_dir()
    assert remove_stale_staging(d) == [] and live.is_dir()
    assert read(d)[0]["value"] == 2


def test_remove_stale_staging_removes_only_dead_writers_of_this_folder(tmp_path):
    """Staging folders of dead pids of this folder go; a live pid's, another folder's (even one
    whose name starts alike) and unrelated dot-folders stay."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    d = tmp_path / "d"
    d.mkdir()
    gone = [tmp_path / f".d.{dead_pid}.ab12.staging"]
    kept = [
        tmp_path / f".d.{os.getpid()}.ab12.staging",
        tmp_path / f".d.x.{dead_pid}.ab12.staging",
        tmp_path / f".dd.{dead_pid}.ab12.staging",
        tmp_path / f".d.{dead_pid}.ab12.old",
    ]
    for path in gone + kept:
        path.mkdir()
        (path / "f").write_text("x")
    assert remove_stale_staging(d) == gone
    assert all(not p.exists() for p in gone) and all(p.is_dir() for p in kept)


# -- two processes ----------------------------------------------------------------------------

REWRITER = """
directory, count = sys.argv[1], int(sys.argv[2])
for value in range(1, count + 1):
    write(directory, value)
"""


def test_a_reader_never_sees_a_mix_of_two_writes(tmp_path):
    """While another process rewrites the folder many times (the tensor's value equals the
    manifest's "value"), every read in a loop sees a matching pair, and the reads saw several
    versions (the writes really overlapped them)."""
    d = tmp_path / "d"
    write(d, 0)
    count = 50
    child = spawn(REWRITER, d, count)
    seen, reads = set(), 0
    try:
        while child.poll() is None:
            manifest, tensors = read(d)
            values = set(tensors["x"].tolist())
            assert values == {float(manifest["value"])}, (manifest["value"], values)
            seen.add(manifest["value"])
            reads += 1
    finally:
        _, err = finish(child)
    assert child.returncode == 0, err
    manifest, tensors = read(d)
    assert manifest["value"] == count and torch.equal(tensors["x"], torch.full((4,), 50.0))
    assert len(seen - {0}) >= 5, (reads, sorted(seen))
    assert staging_of(d) == []


STORE_SAVER = """
from dualedit.editors.memory import EditStore, Field
from dualedit.folders import ConcurrentChange

directory, name, value, barrier = sys.argv[1], sys.argv[2], float(sys.argv[3]), Path(sys.argv[4])
files = {"index_file": "s.json", "tensors_file": "s.safetensors"}
store = EditStore({"key": Field(4)})
store.read(directory, **files)
store.add({"key": torch.full((4,), value)}, {"by": name}, edit_id=name)
(barrier / f"loaded-{name}").touch()
wait_for(lambda: len(list(barrier.glob("loaded-*"))) == 2, "the other process to load")
try:
    store.save(directory, **files)
except ConcurrentChange as error:
    print("refused", error)
else:
    print("saved")
"""


def key_store():
    return EditStore({"key": Field(4)})


def test_two_processes_loading_then_saving_one_store_lose_no_edit(tmp_path):
    """Two processes load one store, each adds an edit, and (both loaded before either saves)
    both save: exactly one save succeeds, the other raises ConcurrentChange and writes nothing,
    so the folder holds the first edits plus the winner's; the loser loading again and repeating
    its edit then saves all of them."""
    d = tmp_path / "store"
    first = key_store()
    first.add({"key": torch.zeros(4)}, edit_id=0)
    first.add({"key": torch.ones(4)}, edit_id=1)
    first.save(d, **STORE_FILES)
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    values = {"A": 10.0, "B": 20.0}
    children = {name: spawn(STORE_SAVER, d, name, value, barrier) for name, value in values.items()}
    outcome = {}
    for name, child in children.items():
        out, err = finish(child)
        assert child.returncode == 0, f"{name}: {err}"
        outcome[name] = out.strip()
    winners = [name for name, out in outcome.items() if out == "saved"]
    losers = [name for name, out in outcome.items() if out.startswith("refused")]
    assert len(winners) == 1 and len(losers) == 1, outcome
    (winner,), (loser,) = winners, losers
    assert "saved by another process after this one loaded it" in outcome[loser]
    assert "nothing was written" in outcome[loser] and str(d) in outcome[loser]

    store = key_store()
    store.read(d, **STORE_FILES)
    assert store.ids == [0, 1, winner] and store.info(winner) == {"by": winner}
    keys = store.tensors("key")
    assert torch.equal(keys[2], torch.full((4,), values[winner]))
    assert torch.equal(keys[0], torch.zeros(4)) and torch.equal(keys[1], torch.ones(4))

    store.add({"key": torch.full((4,), values[loser])}, {"by": loser}, edit_id=loser)
    store.save(d, **STORE_FILES)
    again = key_store()
    again.read(d, **STORE_FILES)
    assert again.ids == [0, 1, winner, loser]


def test_a_store_refuses_to_save_over_a_newer_save(tmp_path):
    """In one process: two stores load one folder; the first saves (and may save again, it
    tracks its own revision); the second's save is refused and leaves the folder as the first
    saved it; after loading again it saves."""
    d = tmp_path / "store"
    seed = key_store()
    seed.add({"key": torch.ones(4)}, edit_id="a")
    seed.save(d, **STORE_FILES)
    one, two = key_store(), key_store()
    one.read(d, **STORE_FILES)
    two.read(d, **STORE_FILES)
    one.add({"key": torch.full((4,), 2.0)}, edit_id="b")
    one.save(d, **STORE_FILES)
    one.add({"key": torch.full((4,), 3.0)}, edit_id="c")
    one.save(d, **STORE_FILES)  # its own save is not another process's
    saved = (d / "s.json").read_bytes()

    two.add({"key": torch.full((4,), 4.0)}, edit_id="d")
    with pytest.raises(ConcurrentChange, match="saved by another process"):
        two.save(d, **STORE_FILES)
    assert (d / "s.json").read_bytes() == saved and staging_of(d) == []

    two.read(d, **STORE_FILES)
    two.add({"key": torch.full((4,), 4.0)}, edit_id="d")
    two.save(d, **STORE_FILES)
    check = key_store()
    check.read(d, **STORE_FILES)
    assert check.ids == ["a", "b", "c", "d"]


def test_a_store_swapped_between_its_index_and_tensors_is_read_again(tmp_path, monkeypatch):
    """A writer swapping a new version in after a reader read the index but before it looked for
    the tensor file makes the reader read again (the new version), not report a missing file."""
    d = tmp_path / "store"
    old = key_store()
    old.add({"key": torch.ones(4)}, edit_id="old")
    old.save(d, **STORE_FILES)
    original = folders.FolderReader.read_manifest
    swapped = []

    def read_manifest_then_swap(self, name, **kwargs):
        record = original(self, name, **kwargs)
        if not swapped:
            swapped.append(True)
            new = key_store()
            new.add({"key": torch.full((4,), 2.0)}, edit_id="new")
            new.save(d, **STORE_FILES)  # swaps in, removes the folder this reader holds
        return record

    monkeypatch.setattr(folders.FolderReader, "read_manifest", read_manifest_then_swap)
    index, tensors, _ = EditStore.read_files(d, **STORE_FILES)
    assert index["ids"] == ["new"] and torch.equal(tensors["key"], torch.full((1, 4), 2.0))


LOCK_HOLDER = """
directory, held, release = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
with folder_lock(directory):
    held.touch()
    wait_for(release.exists, "the release file")
"""


def test_a_held_lock_makes_other_writers_fail_naming_the_folder(tmp_path):
    """While another process holds `folder_lock(d)`: `folder_lock(d, timeout=0)` raises
    FolderLocked naming the folder, a short timeout waits that long first, and a write with
    timeout=0 is refused and changes nothing; once released, the lock is taken at once."""
    d = tmp_path / "d"
    write(d, 1)
    held, release = tmp_path / "held", tmp_path / "release"
    child = spawn(LOCK_HOLDER, d, held, release)
    try:
        wait_until(held.exists, child, "the child to hold the lock")
        named = re.escape(str(d))
        with pytest.raises(FolderLocked, match=named) as error, folder_lock(d, timeout=0):
            pytest.fail("took a lock another process holds")
        assert "another process is writing this folder" in str(error.value)
        assert isinstance(error.value, TimeoutError)

        start = time.monotonic()
        with pytest.raises(FolderLocked, match="after waiting 0.3 s"), folder_lock(d, timeout=0.3):
            pass
        assert time.monotonic() - start >= 0.25

        with pytest.raises(FolderLocked, match=re.escape(str(d))):
            write(d, 2, timeout=0)
        assert read(d)[0]["value"] == 1 and staging_of(d) == []
    finally:
        release.touch()
        _, err = finish(child)
    assert child.returncode == 0, err
    with folder_lock(d, timeout=0):
        pass
    write(d, 3, timeout=0)
    assert read(d)[0]["value"] == 3


def test_a_store_loaded_from_a_folder_without_revisions_refuses_a_newer_save(tmp_path):
    """A folder written before revisions loads with revision ""; a save by another process
    since (which adds a revision) makes this one's save refused, not silently overwritten."""
    d = tmp_path / "store"
    first = key_store()
    first.add({"key": torch.ones(4)}, edit_id="a")
    first.save(d, **STORE_FILES)
    rewrite_legacy = json.loads((d / STORE_FILES["index_file"]).read_text())
    for name in ("files", "revision", "checksum"):
        rewrite_legacy.pop(name)
    (d / STORE_FILES["index_file"]).write_text(json.dumps(rewrite_legacy))
    one, two = key_store(), key_store()
    one.read(d, **STORE_FILES)
    two.read(d, **STORE_FILES)
    one.add({"key": torch.full((4,), 2.0)}, edit_id="b")
    one.save(d, **STORE_FILES)
    two.add({"key": torch.full((4,), 3.0)}, edit_id="c")
    with pytest.raises(ConcurrentChange):
        two.save(d, **STORE_FILES)
