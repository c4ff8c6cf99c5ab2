"""Test helpers that change saved folders behind dualedit's back.

`rewrite_json` / `rewrite_tensors` change a file and re-sign its manifest (new size, SHA-256
and checksum), as a buggy or malicious writer would: what is left to catch the change is the
semantic check of the loader. `legacy` strips what folders written before checksums lacked.
Hand edits without re-signing are caught by the checksums (tests/test_reliability_*.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load, save

from dualedit.folders import manifest_checksum, tensor_entry

CHECK_FIELDS = ("files", "revision", "checksum")


def _sign(data: dict) -> dict:
    if "checksum" in data:
        data["checksum"] = manifest_checksum(data)
    return data


def rewrite_json(path, change, *, manifest=None) -> dict:
    """`change(data)` on a JSON file and write it back; a manifest re-signs itself, and a
    covered file is re-signed in `manifest` (a file name in the same folder)."""
    path = Path(path)
    data = json.loads(path.read_text())
    change(data)
    text = json.dumps(_sign(data), indent=1, sort_keys=True)
    path.write_text(text)
    if manifest is not None:
        _resign(path.parent / manifest, path.name, {"bytes": len(text.encode()),
                                                     "sha256": _sha(text.encode())})
    return data


def rewrite_tensors(path, change, *, manifest) -> dict:
    """`change(tensors)` on a safetensors file, written back, re-signed in `manifest`."""
    path = Path(path)
    tensors = load(path.read_bytes())
    change(tensors)
    data = save(tensors)
    path.write_bytes(data)
    old = json.loads((path.parent / manifest).read_text())["files"][path.name]
    blocks = old.get("blocks", {}).get("bytes")  # block checksums stay if the file had them
    _resign(path.parent / manifest, path.name, tensor_entry(data, tensors, blocks=blocks))
    return tensors


def legacy(data: dict) -> dict:
    """A manifest as written before checksums (no files, revision, checksum)."""
    for name in CHECK_FIELDS:
        data.pop(name, None)
    return data


def _resign(manifest: Path, name: str, entry: dict) -> None:
    data = json.loads(manifest.read_text())
    data["files"][name] = entry
    manifest.write_text(json.dumps(_sign(data), indent=1, sort_keys=True))


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()
