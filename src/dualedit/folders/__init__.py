"""Saved folders written as a whole and read as a whole, with a checksum on every file.

Every folder dualedit saves (an editor, an edit memory, a training checkpoint) is written the
same way:

- **Whole-folder replace.** `write_folder` builds the new folder beside the old one
  (`.{name}.{pid}.{random}.staging`), flushes it to disk and swaps it in with one atomic
  exchange of the two directory entries (Linux `renameat2(RENAME_EXCHANGE)`; elsewhere two
  renames). A writer killed at any point leaves the old folder whole; the old one is removed
  after the swap. Files of the old folder the write does not manage (a user's README, a
  sub-folder) are carried over.
- **One writer at a time.** Writers of one folder serialise on a `filelock` lock file beside it
  (`.{name}.lock`); a writer that waited past its timeout gets `FolderLocked` naming the folder.
- **Manifests.** A folder's JSON manifest (e.g. `adapter_config.json`) lists the files it covers
  with their size and SHA-256 (`"files"`), tensor files also with each tensor's dtype and shape,
  and the write's `"revision"` (a random id). `read_folder` verifies every file it is asked for
  against its manifest, refuses NaN and infinite values (unless a caller allows them by name),
  and names the file and what is wrong.
- **Large files read lazily.** A tensor file written with block checksums (edit memories) is
  memory-mapped when it is large (`FolderReader.tensors_lazy`, `mapped.py`): its header and
  size are checked at once, each range of rows the first time it is used, against the checksums
  of the 1 MiB blocks it covers; a damaged block is refused then, naming the file.
- **Readers never see a mix.** A reader opens the folder once and reads every file through that
  handle, so all files come from one write even while a writer swaps a new folder in; a file that
  vanished under it makes it read again.
- **Lost updates refused.** A caller that loaded a folder and saves it again passes the revision
  it loaded (`expect_revision`): if another process saved the folder in between, the save is
  refused (`ConcurrentChange`) instead of silently dropping that process's work.

Modules: lock.py, checks.py, write.py, read.py, mapped.py. It imports nothing of dualedit but `io`.
"""

from dualedit.folders.checks import (
    MANIFEST_FIELDS,
    check_finite,
    manifest_checksum,
    sha256_bytes,
    tensor_entry,
)
from dualedit.folders.lock import LOCK_TIMEOUT_S, FolderLocked, folder_lock, lock_path
from dualedit.folders.read import (
    READ_ATTEMPTS,
    FolderChanged,
    FolderReader,
    read_folder,
)
from dualedit.folders.write import (
    ConcurrentChange,
    FolderWriter,
    current_revision,
    remove_stale_staging,
    replace_folder,
    write_folder,
)

__all__ = [
    "LOCK_TIMEOUT_S",
    "MANIFEST_FIELDS",
    "READ_ATTEMPTS",
    "ConcurrentChange",
    "FolderChanged",
    "FolderLocked",
    "FolderReader",
    "FolderWriter",
    "check_finite",
    "current_revision",
    "folder_lock",
    "lock_path",
    "manifest_checksum",
    "read_folder",
    "remove_stale_staging",
    "replace_folder",
    "sha256_bytes",
    "tensor_entry",
    "write_folder",
]
