"""What an editor needs to know about a VLM architecture, behind one small interface.

One subclass per architecture (llava.py, blip2.py), looked up by `config.model_type` in
registry.py. A backbone is built from the model's config and holds it (`self.config`); its methods
take the model (or, where only the config matters, the model or its config) so one backbone object
serves any model of its architecture.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PretrainedConfig


def config_of(model_or_config: Any) -> PretrainedConfig:
    """The config of a model, or the argument itself when it already is a config."""
    if isinstance(model_or_config, PretrainedConfig):
        return model_or_config
    config = getattr(model_or_config, "config", None)
    if not isinstance(config, PretrainedConfig):
        raise TypeError(
            f"expected a transformers model or config, got {type(model_or_config).__name__}"
        )
    return config


def layer_output_tensor(output: Any) -> torch.Tensor:
    """The hidden states from a decoder layer's output.

    transformers 5.x decoder layers return a plain tensor; older versions return a tuple whose
    first element is the hidden states. Hooks that read layer outputs go through this.

    Example:
        >>> h = layer_output_tensor(output)  # [batch, seq, hidden]
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"unexpected decoder layer output of type {type(output).__name__}")


def replace_layer_output(output: Any, hidden: torch.Tensor) -> Any:
    """A decoder layer output of the same structure as `output` with `hidden` as its states.

    For forward hooks that return a new tensor instead of writing into the hooked output.
    """
    if isinstance(output, torch.Tensor):
        return hidden
    if isinstance(output, tuple) and output:
        return (hidden,) + tuple(output[1:])
    if isinstance(output, list) and output:
        return [hidden] + list(output[1:])
    raise TypeError(f"unexpected decoder layer output of type {type(output).__name__}")


class Backbone(ABC):
    """Where a VLM keeps its decoder layers and image positions, and how its prompts look.

    Layer indices are 0-based positions in `decoder_layers(model)`.
    """

    model_type: ClassVar[str]
    image_token: ClassVar[str] = "<image>"

    def __init__(self, config: PretrainedConfig):
        config = config_of(config)
        if config.model_type != self.model_type:
            raise ValueError(
                f"{type(self).__name__} needs config.model_type {self.model_type!r}, "
                f"got {config.model_type!r}"
            )
        self.config = config

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model_type={self.model_type!r})"

    # -- language model structure -------------------------------------------------------------

    @abstractmethod
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The language model's decoder layers, in order."""

    def depth(self, model: nn.Module) -> int:
        """The number of decoder layers."""
        return len(self.decoder_layers(model))

    def hidden_size(self, model_or_config: Any) -> int:
        """The width of the decoder layers' output."""
        return int(config_of(model_or_config).text_config.hidden_size)

    def layer(self, model: nn.Module, index: int) -> nn.Module:
        """Decoder layer `index` (0-based), with an error naming the depth when out of range."""
        layers = self.decoder_layers(model)
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"layer index must be an int, got {type(index).__name__}")
        if not 0 <= index < len(layers):
            raise ValueError(
                f"layer {index} out of range: {self.model_type} model has {len(layers)} decoder "
                f"layers (0..{len(layers) - 1})"
            )
        return layers[index]

    def self_attention(self, model: nn.Module, layer: int) -> nn.Module:
        """The self-attention module of decoder layer `layer` (LLaMA and OPT: `self_attn`); its
        forward returns (output, weights), the weights only under eager attention."""
        module = getattr(self.layer(model, layer), "self_attn", None)
        if not isinstance(module, nn.Module):
            raise ValueError(f"decoder layer {layer} of {self!r} has no self_attn module")
        return module

    @abstractmethod
    def mlp(self, model: nn.Module, layer: int) -> nn.Module:
        """The feed-forward block of decoder layer `layer` (parameters to train for FT-L)."""

    def ffn_ends(self, model: nn.Module, layer: int) -> tuple[nn.Module, nn.Module]:
        """(module whose input is the feed-forward block's input, module whose output is its
        output) of layer `layer`: the same MLP module where the block is one (LLaMA)."""
        mlp = self.mlp(model, layer)
        return mlp, mlp

    @abstractmethod
    def mlp_linears(self, model: nn.Module, layer: int) -> dict[str, nn.Linear]:
        """The linear maps of layer `layer`'s feed-forward block by their module names, input
        side first (LLaMA: gate_proj, up_proj, down_proj; OPT: fc1, fc2): what MEND and KE
        edit."""

    @abstractmethod
    def mlp_out(self, model: nn.Module, layer: int) -> nn.Linear:
        """The last linear map of layer `layer`'s feed-forward block (its output projection)."""

    @abstractmethod
    def language_model_head(self, model: nn.Module) -> nn.Module:
        """The output projection to the vocabulary."""

    @abstractmethod
    def final_norm(self, model: nn.Module) -> nn.Module:
        """The norm applied after the last decoder layer, before the head."""

    # -- vision side --------------------------------------------------------------------------

    @abstractmethod
    def vision_modules(self, model: nn.Module) -> list[nn.Module]:
        """Modules that turn pixels into image-token embeddings (encoder and projection)."""

    @abstractmethod
    def vision_blocks(self, model: nn.Module) -> nn.ModuleList:
        """The vision encoder's transformer blocks, first to last."""

    @abstractmethod
    def vision_adapter(self, model: nn.Module) -> dict[str, nn.Module | nn.Parameter]:
        """What maps vision features into the language model (FT-V's default targets): LLaVA's
        multi-modal projector; BLIP-2's Q-Former, its query tokens and language projection."""

    def vision_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """All parameters of the vision side (for FT-V), including any outside `vision_modules`."""
        return [p for module in self.vision_modules(model) for p in module.parameters()]

    # -- image positions and prompts ----------------------------------------------------------

    @abstractmethod
    def image_token_id(self, model_or_config: Any) -> int:
        """The id of the image placeholder token in `input_ids`."""

    @abstractmethod
    def num_image_tokens(self, model_or_config: Any) -> int:
        """How many image placeholder positions one image takes in `input_ids`."""

    def image_mask(self, model_or_config: Any, input_ids: torch.Tensor) -> torch.Tensor:
        """Boolean mask of image positions. input_ids [batch, seq] -> [batch, seq]."""
        return input_ids == self.image_token_id(model_or_config)

    @abstractmethod
    def prompt_text(self, prompt: str, has_image: bool) -> str:
        """The text given to the processor for a protocol prompt."""

    # -- running the model --------------------------------------------------------------------

    def forward_logits(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits of a teacher-forced forward; text-only when `pixel_values` is None.

        input_ids/attention_mask [batch, seq], pixel_values [batch, 3, H, W] -> [batch, seq, vocab].
        """
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if pixel_values is not None:
            kwargs["pixel_values"] = pixel_values.to(self._vision_dtype(model))
        return model(**kwargs).logits

    def generate(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """New tokens only, [batch, new] (left-padded prompts; see `encode_prompts`)."""
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if pixel_values is not None:
            kwargs["pixel_values"] = pixel_values.to(self._vision_dtype(model))
        out = model.generate(**kwargs, **generate_kwargs)  # [batch, seq + new] or [batch, new]
        return _new_tokens(out, input_ids)

    def _vision_dtype(self, model: nn.Module) -> torch.dtype:
        return next(self.vision_modules(model)[0].parameters()).dtype

    # -- running part of the decoder (training: a frozen prefix shared by several passes) -------

    def layer_input(
        self,
        model: nn.Module,
        layer_index: int,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The input of decoder layer `layer_index` in a teacher-forced forward: [batch, seq, hidden].

        The forward stops there (a forward pre-hook), so the vision side and the layers before
        `layer_index` run once and nothing after. Run it under `torch.no_grad()` for a frozen
        prefix; hooks on later layers never fire.
        """
        layer = self.layer(model, layer_index)
        captured: list[torch.Tensor] = []

        def hook(module: nn.Module, args: Any, kwargs: Any) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            captured.append(hidden)
            raise _StopForward

        handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.forward_logits(model, input_ids, attention_mask, pixel_values)
        except _StopForward:
            return captured[0]
        finally:
            handle.remove()
        raise RuntimeError(f"the forward finished without reaching decoder layer {layer_index}")

    def run_layers(
        self,
        model: nn.Module,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        start: int,
        stop: int,
        *,
        keep: tuple[int, ...] = (),
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Run decoder layers [start, stop) on `hidden_states`, the input of layer `start`.

        Forward hooks on those layers fire as in a full forward (the DualEdit adapters act).

        Args:
            hidden_states: [batch, seq, hidden], e.g. from `layer_input(model, start, ...)`.
            attention_mask: [batch, seq], 0 on padding (the same as for the full forward).
            keep: layer indices in [start, stop) whose outputs to return as well.

        Returns:
            (output of layer stop - 1 [batch, seq, hidden], {layer: its output}).
        """
        depth = self.depth(model)
        if not 0 <= start <= stop <= depth:
            raise ValueError(f"run_layers: need 0 <= start {start} <= stop {stop} <= depth {depth}")
        layers = self.decoder_layers(model)
        kwargs = self.layer_kwargs(model, hidden_states, attention_mask)
        kept: dict[int, torch.Tensor] = {}
        for index in range(start, stop):
            hidden_states = layer_output_tensor(layers[index](hidden_states, **kwargs))
            if index in keep:
                kept[index] = hidden_states
        return hidden_states, kept

    def run_from(
        self,
        model: nn.Module,
        layer_index: int,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits from the input of decoder layer `layer_index`: layers [layer_index, depth), the
        final norm and the head, as the model's own forward computes them.

        Args:
            hidden_states: [batch, seq, hidden], the input of layer `layer_index`.
            attention_mask: [batch, seq], 0 on padding.
            logits_at: optional bool [batch, seq]: only these positions go through the final norm
                and the head (both act per position), e.g. a batch's `target_mask`.

        Returns:
            [batch, seq, vocab], or [k, vocab] for the k positions of `logits_at` in row-major
            order.

        Example:
            >>> with torch.no_grad():
            ...     h = backbone.layer_input(model, 3, input_ids, attention_mask, pixel_values)
            >>> logits = backbone.run_from(model, 3, h, attention_mask)  # == the full forward's
        """
        hidden, _ = self.run_layers(
            model, hidden_states, attention_mask, layer_index, self.depth(model)
        )
        if logits_at is not None:
            hidden = hidden[logits_at.to(hidden.device).bool()]  # [k, hidden]
        return self.head_logits(model, hidden)

    @abstractmethod
    def layer_kwargs(
        self, model: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor
    ) -> dict[str, Any]:
        """Keyword arguments every decoder layer takes in a cache-free forward (causal mask,
        positions), built as the language model's own forward builds them."""

    @abstractmethod
    def head_logits(self, model: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        """Final norm (and any output projection) and the head: [..., hidden] -> [..., vocab]."""


class _StopForward(Exception):
    """Raised by `layer_input`'s pre-hook to end a forward at the layer it captures."""


def _new_tokens(out: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    # Decoder-only generate() returns prompt + new tokens; strip the prompt when it is there.
    seq = input_ids.shape[1]
    if out.shape[1] >= seq and torch.equal(out[:, :seq], input_ids.to(out.device)):
        return out[:, seq:]
    return out
