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
from dualedit.data.prompts import EncodedBatch, PromptBatch
from dualedit.data.requests import EditRequest  # noqa: F401  (re-exported: the contract)
from dualedit.editors.files import read_editor_meta, read_editor_tensors, write_editor_folder
from dualedit.options import config_from_dict, config_to_dict

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
        """Several edits at once (one `apply`); returns their ids in order."""
        requests, loader = user_requests(images, prompts, targets)
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
            "model_type": config.model_type,
            "hidden_size": self.backbone.hidden_size(self.model),
            "depth": self.backbone.depth(self.model),
            "edits": [
                {"id": e.id, "prompt": e.prompt, "target": e.target, "image": e.image}
                for e in self._held
            ],
        }

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write the editor as it is now (config, tensors, the edits it holds) to `directory`."""
        return write_editor_folder(directory, self.folder_meta(), self.state_tensors())

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        processor: Any,
        directory: str | os.PathLike,
        backbone: Backbone | None = None,
        **overrides: Any,
    ) -> Editor:
        """The editor saved in `directory` on `model`, with config fields in `overrides` replaced.

        Raises:
            FileNotFoundError: the folder or its config is missing.
            ValueError: the folder was saved by another method (use `dualedit.load_editor`,
                which dispatches on it), for another model type, or its tensors do not match.
        """
        meta = read_editor_meta(directory)
        where = str(Path(directory))
        if meta["method"] != cls.name:
            raise ValueError(
                f"{where}: saved by method {meta['method']!r}, not {cls.name!r} "
                "(dualedit.load_editor picks the class from the folder)"
            )
        if meta.get("model_type") != model.config.model_type:
            raise ValueError(
                f"{where}: saved for model_type {meta.get('model_type')!r}, this model is "
                f"{model.config.model_type!r}"
            )
        saved = meta.get("config")
        if not isinstance(saved, dict):
            raise ValueError(f"{where}: no \"config\" object")
        editor = cls(model, processor, backbone, config={**saved, **overrides})
        editor.load_state(meta, read_editor_tensors(directory), where)
        editor.source = where
        return editor


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
