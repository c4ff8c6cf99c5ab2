"""The editor contract: what every editing method offers the harness, the trainer and users.

An editor wraps one model. It learns of an edit only what a user gives (`EditRequest`: image,
prompt, target), never the benchmark fields it is scored on. `apply` adds edits (they accumulate)
and returns their ids; `restore` brings the model back to exactly its unedited state
(`state_dict()` byte-identical); `remove` forgets one edit where the method can. The editor owns
the forward: `logits(batch)` and `generate(batch)` default to the backbone's forward inside
`context(batch)` (hook and weight methods override nothing; prefix and routing methods override
them). Every method has a typed `Config` dataclass (unknown options refused by name) and saves
and loads its folder the same way (`save_pretrained` / `from_pretrained`, see files.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn

from dualedit.backbones import Backbone, get_backbone
from dualedit.data.prompts import EncodedBatch, PromptBatch, target_text, unknown_tokens
from dualedit.data.requests import EditRequest  # noqa: F401  (re-exported: the contract)
from dualedit.editors.files import (
    CONFIG_FILE,
    EditorFolder,
    read_editor_folder,
    write_editor_folder,
)
from dualedit.fingerprint import base_fingerprint, fingerprint_mismatch
from dualedit.folders import FolderWriter
from dualedit.options import config_fields, config_from_dict, config_to_dict

logger = logging.getLogger(__name__)

#: Loads an image by its key (for a dataset: the path relative to its image root).
ImageLoader = Callable[[str], Any]
#: An edit's id: an int given by the editor, or a caller's short string.
EditId = int | str
#: What a user may pass as an image: a PIL image, a path to one, or None (text-only).
ImageInput = Image.Image | str | os.PathLike | None


@dataclass(frozen=True)
class NoConfig:
    """A method without options."""


@dataclass(frozen=True)
class EditInfo:
    """What `Editor.edits()` reports about one edit held by the editor.

    Attributes:
        id: the edit's id.
        prompt, target: the request's prompt and new answer.
        image: the request's image key or a description of the user's image (None: text-only).
    """

    id: EditId
    prompt: str | None
    target: str | None
    image: str | None


class Editor(ABC):
    """Base class of every editing method.

    Class attributes:
        name: the registry name ("none", "ft-l", "dualedit", ...), saved in editor folders and
            recorded in results.json.
        Config: the method's frozen config dataclass (validated in `__post_init__`).
        batched: True when `apply` changes nothing the forward computes, so the harness may score
            every record in big batches without applying edits one by one.

    Args:
        model: the VLM (LLaVA or BLIP-2); never copied.
        processor: its processor.
        backbone: where its layers are (None: looked up by `config.model_type`).
        config: a `Config` instance, or None to build one from `options`.
        **options: `Config` fields (unknown ones raise `ValueError` naming them).
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type] = NoConfig
    batched: ClassVar[bool] = False

    def __init__(
        self,
        model: nn.Module,
        processor: Any,
        backbone: Backbone | None = None,
        *,
        config: Any = None,
        **options: Any,
    ):
        self.model = model
        self.processor = processor
        self.backbone = backbone if backbone is not None else get_backbone(model)
        self.config = self.make_config(config, options)
        #: The folder the editor was loaded from (None: built new); recorded in results.json.
        self.source: str | None = None
        self._held: list[EditInfo] = []
        self._next_id = 0
        #: {folder: revision} of the folders this editor was loaded from or saved to.
        self._revisions: dict[str, str | None] = {}
        #: The base model's fingerprint, computed once (the base weights are fixed for an
        #: editor's life; only its edits change what the model computes).
        self._base_fingerprint: dict[str, Any] | None = None

    @classmethod
    def make_config(cls, config: Any = None, options: dict[str, Any] | None = None) -> Any:
        """A validated `Config` from an instance, a dict, and/or keyword options.

        Raises:
            ValueError: unknown options (named), bad values, or a config of another class.
        """
        options = dict(options or {})
        where = f"method {cls.name!r}"
        if config is None:
            return config_from_dict(cls.Config, options, where=where)
        if isinstance(config, dict):
            return config_from_dict(cls.Config, {**config, **options}, where=where)
        if not isinstance(config, cls.Config):
            raise TypeError(
                f"{where}: config must be a {cls.Config.__name__} or a dict, got "
                f"{type(config).__name__}"
            )
        if not options:
            return config
        return config_from_dict(cls.Config, {**config_to_dict(config), **options}, where=where)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.model.config.model_type}, {len(self.edits())} edits)"

    def config_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict (recorded in results.json and editor folders)."""
        return config_to_dict(self.config)

    # -- edits --------------------------------------------------------------------------------

    @abstractmethod
    def apply(
        self,
        requests: Sequence[EditRequest],
        images: ImageLoader,
        *,
        ids: Sequence[EditId] | None = None,
    ) -> list[EditId]:
        """Add the edits of `requests` on top of earlier ones and return their ids.

        Args:
            requests: the edits (image key, prompt, new answer).
            images: loads a request's image by its key.
            ids: names for the new edits (short strings or ints), None for the next ints.
        """

    @abstractmethod
    def restore(self) -> None:
        """Remove every edit: the model computes and stores exactly what it did before."""

    def remove(self, edit_id: EditId) -> None:
        """Forget one edit. Methods that cannot undo one edit alone raise NotImplementedError."""
        raise NotImplementedError(
            f"method {self.name!r} cannot remove one edit (its edits are merged into the "
            "weights); restore() removes them all"
        )

    def edits(self) -> list[EditInfo]:
        """The edits held now, oldest first."""
        return list(self._held)

    @abstractmethod
    def disabled(self) -> contextlib.AbstractContextManager[None]:
        """`with editor.disabled(): ...` runs the unedited model; the edits come back after."""

    def explain(self, image: ImageInput, prompt: str) -> Any:
        """What a gated method decides for a question (e.g. DualEdit's `GateDecision`: nearest
        edit, similarity, edited or not); None for methods that decide nothing per input."""
        return None

    def detach(self) -> None:
        """Release what the editor attached to the model (hooks, `requires_grad` flags); edits in
        weights stay until `restore`. Default: nothing."""

    def _hold(
        self, requests: Sequence[EditRequest], ids: Sequence[EditId] | None = None
    ) -> list[EditId]:
        """Book `requests` as held edits with new ids (for methods without a store of their own)."""
        new = self._new_ids(len(requests), ids)
        self._held += [
            EditInfo(i, r.prompt, r.target, r.image) for i, r in zip(new, requests, strict=True)
        ]
        return new

    def _forget(self, edit_id: EditId) -> None:
        """Drop one held edit's description (KeyError naming an unknown id)."""
        kept = [info for info in self._held if info.id != edit_id]
        if len(kept) == len(self._held):
            raise KeyError(f"no edit with id {edit_id!r} ({len(self._held)} edits)")
        self._held = kept

    def _new_ids(self, n: int, ids: Sequence[EditId] | None) -> list[EditId]:
        if ids is None:
            new: list[EditId] = list(range(self._next_id, self._next_id + n))
        else:
            new = list(ids)
            if len(new) != n:
                raise ValueError(f"{len(new)} ids for {n} edits")
            taken = {info.id for info in self._held}
            clash = [i for i in new if i in taken]
            if clash or len(set(new)) != len(new):
                raise ValueError(f"edit ids {clash or new} are already in use or repeated")
        ints = [i for i in new if isinstance(i, int) and not isinstance(i, bool)]
        self._next_id = max([self._next_id, *(i + 1 for i in ints)])
        return new

    @contextlib.contextmanager
    def applied(self, requests: Sequence[EditRequest], images: ImageLoader) -> Iterator[Editor]:
        """`apply(requests)` for the duration of a `with` block, then `restore()`."""
        try:
            self.apply(requests, images)
            yield self
        finally:
            self.restore()

    # -- the forward --------------------------------------------------------------------------

    def context(self, batch: EncodedBatch | PromptBatch) -> contextlib.AbstractContextManager[Any]:
        """Wraps one forward or generate() call on `batch`: hook-based editors set per-call state
        here (and clear it in `finally`). Default: nothing."""
        return contextlib.nullcontext()

    def logits(self, batch: EncodedBatch | PromptBatch) -> torch.Tensor:
        """The edited model's logits for a batch on the model's device: [batch, seq, vocab]."""
        with self.context(batch):
            return self.backbone.forward_logits(
                self.model, batch.input_ids, batch.attention_mask, batch.pixel_values
            )

    def generate(self, batch: PromptBatch, **generate_kwargs: Any) -> torch.Tensor:
        """Greedy (or as `generate_kwargs` say) generation from left-padded prompts with the
        edits in effect: the new tokens [batch, new]."""
        with self.context(batch):
            return self.backbone.generate(
                self.model,
                batch.input_ids,
                batch.attention_mask,
                batch.pixel_values,
                **generate_kwargs,
            )

    # -- the user API ---------------------------------------------------------------------------

    def edit(
        self, image: ImageInput, prompt: str, target: str, *, edit_id: EditId | None = None
    ) -> EditId:
        """Edit the model so that `prompt` on `image` is answered `target`; returns the edit's id.

        Args:
            image: a PIL image, a path to one, or None for a text-only edit.
            prompt: the question as the model reads it (e.g. "What is it? The answer is:").
            target: the new answer (the model reads prompt + " " + target).
            edit_id: a short string id, or None for the next int id.

        Example:
            >>> eid = editor.edit("ball.png", "What colour is the ball? The answer is:", "blue")
        """
        ids = None if edit_id is None else [edit_id]
        return self.edit_many([image], [prompt], [target], edit_ids=ids)[0]

    def edit_many(
        self,
        images: Sequence[ImageInput],
        prompts: Sequence[str],
        targets: Sequence[str],
        *,
        edit_ids: Sequence[EditId] | None = None,
    ) -> list[EditId]:
        """Several edits at once (one `apply`); returns their ids in order. A target with words
        the tokenizer does not know is applied with a warning (the model learns `<unk>`)."""
        requests, loader = user_requests(images, prompts, targets)
        for i, request in enumerate(requests):
            unknown = unknown_tokens(self.processor, target_text(request.target))
            if unknown:
                logger.warning(
                    "edit %d: the target %r has %d token(s) the tokenizer does not know; they "
                    "become <unk>, and the edit teaches <unk> rather than those words",
                    i, request.target, unknown,
                )
        return self.apply(requests, loader, ids=edit_ids)

    def __enter__(self) -> Editor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # -- files ----------------------------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors a saved folder holds (adapters, edited weights). Default: none."""
        return {}

    def load_state(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> None:
        """Take over what `save_pretrained` wrote (`meta`: the folder's config JSON). Default:
        the held edits' descriptions."""
        self._held = [
            EditInfo(e["id"], e.get("prompt"), e.get("target"), e.get("image"))
            for e in meta.get("edits", [])
        ]
        ints = [e.id for e in self._held if isinstance(e.id, int)]
        self._next_id = max([0, *(i + 1 for i in ints)])

    def folder_meta(self) -> dict[str, Any]:
        """What `save_pretrained` writes besides the tensors."""
        config = self.model.config
        return {
            "method": self.name,
            "config": self.config_dict(),
            "base_model": str(getattr(config, "name_or_path", "") or ""),
            "base_fingerprint": self.base_fingerprint(),
            "model_type": config.model_type,
            "hidden_size": self.backbone.hidden_size(self.model),
            "depth": self.backbone.depth(self.model),
            "edits": [
                {"id": e.id, "prompt": e.prompt, "target": e.target, "image": e.image}
                for e in self._held
            ],
        }

    def base_fingerprint(self) -> dict[str, Any]:
        """The fingerprint of the unedited model's weights (`dualedit.fingerprint`)."""
        if self._base_fingerprint is None:
            with self.disabled():
                self._base_fingerprint = base_fingerprint(self.model)
        return self._base_fingerprint

    def write_files(self, writer: FolderWriter) -> list[str]:
        """Write the method's files besides config and tensors into a folder being saved
        (`writer.drop(name)` for one it no longer has); returns the names written. Default:
        none."""
        return []

    def load_files(self, folder: EditorFolder) -> None:
        """Take over the method's files besides config and tensors (`folder.files`). Default:
        nothing."""

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write the editor as it is now (config, tensors, the edits it holds) to `directory`,
        as a whole and under its lock (see `dualedit.folders`).

        Raises:
            dualedit.folders.ConcurrentChange: this editor was loaded from (or last saved to)
                `directory`, and another process saved it since: nothing is written, so that
                process's edits are not lost.
        """
        key = _folder_key(directory)
        revision = write_editor_folder(
            directory,
            self.folder_meta(),
            self.state_tensors(),
            extra=self.write_files,
            expect_revision=self._revisions.get(key),
        )
        self._revisions[key] = revision
        return Path(directory)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        processor: Any,
        directory: str | os.PathLike,
        backbone: Backbone | None = None,
        *,
        ignore_base_mismatch: bool = False,
        **overrides: Any,
    ) -> Editor:
        """The editor saved in `directory` on `model`, with config fields in `overrides` replaced.

        Args:
            ignore_base_mismatch: load even if `model` is not the model the editor was saved
                for (its weight fingerprint differs): for a user who knows the two are the same
                model (e.g. re-quantised).

        Raises:
            FileNotFoundError: the folder or its config is missing.
            ValueError: the folder was saved by another method (use `dualedit.load_editor`,
                which dispatches on it), for another model type or other base weights, a file
                is damaged, or its tensors do not match.
        """
        folder = read_editor_folder(directory)
        fingerprint = check_saved_model(
            folder, model, backbone, ignore_base_mismatch=ignore_base_mismatch
        )
        meta, where = folder.meta, str(Path(directory))
        if meta["method"] != cls.name:
            raise ValueError(
                f"{where}: saved by method {meta['method']!r}, not {cls.name!r} "
                "(dualedit.load_editor picks the class from the folder)"
            )
        editor = cls(model, processor, backbone, config=saved_config(cls.Config, folder, overrides))
        editor.load_state(meta, folder.tensors, where)
        editor.load_files(folder)
        editor.source = where
        editor._revisions[_folder_key(directory)] = folder.revision or ""
        editor._base_fingerprint = fingerprint
        return editor


def saved_config(config_class: type, folder: EditorFolder, overrides: dict[str, Any]) -> dict:
    """The saved config with `overrides`; every field required (no silent default)."""
    saved = folder.meta["config"]
    missing = [f for f in config_fields(config_class) if f not in saved]
    if missing and folder.meta["format"] >= 2:
        raise ValueError(
            f"{folder.path / CONFIG_FILE}: config lacks field(s) {missing}; the folder is "
            "incomplete or damaged"
        )
    return {**saved, **overrides}


def check_saved_model(
    folder: EditorFolder,
    model: nn.Module,
    backbone: Backbone | None = None,
    *,
    ignore_base_mismatch: bool = False,
) -> dict[str, Any] | None:
    """Refuse to load a folder saved for another model: model type, hidden size, depth, and the
    base weights' fingerprint (unless `ignore_base_mismatch`). Returns the model's fingerprint
    when it was computed (None otherwise), for the editor to keep.

    Raises:
        ValueError: naming the folder, what differs and the override.
    """
    meta, path = folder.meta, folder.path / CONFIG_FILE
    backbone = backbone if backbone is not None else get_backbone(model)
    now = {
        "model_type": model.config.model_type,
        "hidden_size": backbone.hidden_size(model),
        "depth": backbone.depth(model),
    }
    for key, value in now.items():
        if key in meta and meta[key] != value:
            base = meta.get("base_model") or "unnamed base"
            raise ValueError(f"{path}: saved for {key} {meta[key]!r} ({base}), this model has {value!r}")
    if "base_fingerprint" not in meta or ignore_base_mismatch:
        return None
    fingerprint = base_fingerprint(model)
    reason = fingerprint_mismatch(meta["base_fingerprint"], fingerprint)
    if reason:
        raise ValueError(
            f"{path}: saved for other base weights than this model's ({reason}; saved for "
            f"{meta.get('base_model') or 'an unnamed model'}, this is "
            f"{getattr(model.config, 'name_or_path', '') or 'an unnamed model'}). Load the "
            "model it was trained on, or pass ignore_base_mismatch=True (CLI: "
            "--ignore-base-mismatch) if you know the two are the same model"
        )
    return fingerprint


def _folder_key(directory: str | os.PathLike) -> str:
    return str(Path(directory).absolute().resolve())


def user_requests(
    images: Sequence[ImageInput], prompts: Sequence[str], targets: Sequence[str]
) -> tuple[list[EditRequest], ImageLoader]:
    """Requests (and their image loader) from a user's images, prompts and targets."""
    if not len(images) == len(prompts) == len(targets):
        raise ValueError(f"{len(images)} images, {len(prompts)} prompts and {len(targets)} targets")
    loaded: dict[str, Image.Image] = {}
    requests = []
    for i, (image, prompt, target) in enumerate(zip(images, prompts, targets, strict=True)):
        if not isinstance(prompt, str) or not isinstance(target, str) or not target.strip():
            raise ValueError(f"edit {i}: prompt and a non-empty target must be strings")
        key = None
        if image is not None:
            key = describe_image(image, i)
            loaded[key] = open_image(image, i)
        requests.append(EditRequest(key, prompt, target.lstrip()))
    return requests, loaded.__getitem__


def open_image(image: Any, i: int = 0) -> Image.Image:
    """An RGB PIL image from a PIL image or a path (errors name edit `i` and the path)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image {path} not found")
        try:
            with Image.open(path) as opened:
                return opened.convert("RGB")
        except (OSError, SyntaxError, ValueError) as error:  # PIL's errors for bad files
            raise ValueError(f"image {path} is not a readable image: {error}") from error
    raise TypeError(f"edit {i}: image must be a PIL image, a path or None, got {type(image)}")


def describe_image(image: ImageInput, i: int = 0) -> str | None:
    """A user image's key: its path, or a description of an in-memory image (unique per edit)."""
    if image is None:
        return None
    if isinstance(image, Image.Image):
        return f"<PIL image {image.size[0]}x{image.size[1]} #{i}>"
    return str(image)
