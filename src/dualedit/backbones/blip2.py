"""BLIP-2 with an OPT decoder (`Blip2ForConditionalGeneration`, model_type "blip-2"), 5.x.

Layout: model.vision_model -> model.qformer (with the learned model.query_tokens) ->
model.language_projection -> embeddings scattered into the positions of
`config.image_token_index` in `input_ids`; the processor puts one placeholder per query token at
the very front, before BOS. The language model is model.language_model (OPTForCausalLM): decoder
layers at .model.decoder.layers, head at .lm_head. The model does NOT check the placeholder count
(a wrong count silently drops image content), its forward needs pixel_values (text-only inputs run
the language model alone), and generate() does not call the model's own forward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask

from dualedit.backbones.base import Backbone, _new_tokens, config_of


class Blip2Backbone(Backbone):
    """BLIP-2: ViT, Q-Former with query tokens, linear projection, OPT decoder."""

    model_type = "blip-2"

    def __init__(self, config: Any):
        super().__init__(config)
        if config_of(config).text_config.model_type != "opt":
            raise ValueError(
                "Blip2Backbone supports an OPT language model, got text_config.model_type "
                f"{config_of(config).text_config.model_type!r}"
            )

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.language_model.model.decoder.layers

    def mlp(self, model: nn.Module, layer: int) -> nn.Module:
        """OPT has no MLP submodule: fc1 and fc2 sit on the layer itself.

        Returns a ModuleList [fc1, fc2] that holds the layer's own modules (not copies): its
        parameters are the layer's feed-forward parameters. It is not called in the forward, so
        hook `mlp_out` (fc2) rather than this container.
        """
        block = self.layer(model, layer)
        return nn.ModuleList([block.fc1, block.fc2])

    def mlp_linears(self, model: nn.Module, layer: int) -> dict[str, nn.Linear]:
        block = self.layer(model, layer)
        return {"fc1": block.fc1, "fc2": block.fc2}

    def mlp_out(self, model: nn.Module, layer: int) -> nn.Linear:
        return self.layer(model, layer).fc2

    def ffn_ends(self, model: nn.Module, layer: int) -> tuple[nn.Module, nn.Module]:
        block = self.layer(model, layer)
        return block.fc1, block.fc2

    def language_model_head(self, model: nn.Module) -> nn.Module:
        return model.language_model.lm_head

    def final_norm(self, model: nn.Module) -> nn.Module:
        decoder = model.language_model.model.decoder
        # OPT-350m style (post-norm) models have no final layer norm.
        return decoder.final_layer_norm if decoder.final_layer_norm is not None else nn.Identity()

    def vision_modules(self, model: nn.Module) -> list[nn.Module]:
        """[vision model, Q-Former, language projection]; query_tokens: `vision_parameters`."""
        return [model.vision_model, model.qformer, model.language_projection]

    def vision_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return super().vision_parameters(model) + [model.query_tokens]

    def vision_blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.vision_model.encoder.layers

    def vision_adapter(self, model: nn.Module) -> dict[str, nn.Module | nn.Parameter]:
        return {
            "qformer": model.qformer,
            "query_tokens": model.query_tokens,
            "language_projection": model.language_projection,
        }

    def image_token_id(self, model_or_config: Any) -> int:
        index = config_of(model_or_config).image_token_index
        if index is None:
            raise ValueError(
                "BLIP-2 config.image_token_index is None: set it to the tokenizer's id of "
                "'<image>' (the processor's query placeholder)"
            )
        return int(index)

    def num_image_tokens(self, model_or_config: Any) -> int:
        return int(config_of(model_or_config).num_query_tokens)

    def prompt_text(self, prompt: str, has_image: bool) -> str:
        """The prompt as is; with an image the processor prepends the query placeholders."""
        return prompt

    def forward_logits(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if pixel_values is None:
            # Blip2ForConditionalGeneration.forward always encodes pixels; text runs the LM alone.
            return model.language_model(input_ids=input_ids, attention_mask=attention_mask).logits
        return super().forward_logits(model, input_ids, attention_mask, pixel_values)

    def generate(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        if pixel_values is None:
            out = model.language_model.generate(
                input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs
            )
            return _new_tokens(out, input_ids)
        return super().generate(model, input_ids, attention_mask, pixel_values, **generate_kwargs)

    def layer_kwargs(
        self, model: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor
    ) -> dict[str, Any]:
        """As OPTDecoder.forward without a cache: the causal mask and positions counted over the
        attended tokens (OPT adds its position embeddings before layer 0; layers only pass them
        on to the attention kernel)."""
        decoder = model.language_model.model.decoder
        attention_mask = attention_mask.to(hidden_states.device)
        position_ids = (torch.cumsum(attention_mask, dim=1) * attention_mask - 1).long()
        # The cache goes positionally: its keyword is `past_key_values` up to transformers 5.17
        # and `cache` in later releases.
        causal_mask = create_causal_mask(decoder.config, hidden_states, attention_mask, None)
        return {"attention_mask": causal_mask, "position_ids": position_ids}

    def head_logits(self, model: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        decoder = model.language_model.model.decoder
        if decoder.final_layer_norm is not None:
            hidden_states = decoder.final_layer_norm(hidden_states)
        if decoder.project_out is not None:
            hidden_states = decoder.project_out(hidden_states)
        return model.language_model.lm_head(hidden_states)
