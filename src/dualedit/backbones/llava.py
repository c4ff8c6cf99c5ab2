"""LLaVA (`LlavaForConditionalGeneration`, model_type "llava") in transformers 5.x.

Layout: model.model.vision_tower (CLIP) -> model.model.multi_modal_projector -> image embeddings
scattered into the positions of `config.image_token_id` in `input_ids`; language model at
model.model.language_model (Llama: layers, norm), head at model.lm_head. The processor expands one
"<image>" into one token per patch (the model checks the count). BOS comes before the image tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask

from dualedit.backbones.base import Backbone, config_of


class LlavaBackbone(Backbone):
    """LLaVA-1.5 style: CLIP vision tower, MLP projector, Llama decoder."""

    model_type = "llava"

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.language_model.layers

    def mlp(self, model: nn.Module, layer: int) -> nn.Module:
        """`layer.mlp` (LlamaMLP: gate_proj, up_proj, down_proj)."""
        return self.layer(model, layer).mlp

    def mlp_linears(self, model: nn.Module, layer: int) -> dict[str, nn.Linear]:
        mlp = self.layer(model, layer).mlp
        return {"gate_proj": mlp.gate_proj, "up_proj": mlp.up_proj, "down_proj": mlp.down_proj}

    def mlp_out(self, model: nn.Module, layer: int) -> nn.Linear:
        return self.layer(model, layer).mlp.down_proj

    def language_model_head(self, model: nn.Module) -> nn.Module:
        return model.lm_head

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.model.language_model.norm

    def vision_modules(self, model: nn.Module) -> list[nn.Module]:
        """[vision tower, multi-modal projector]."""
        return [model.model.vision_tower, model.model.multi_modal_projector]

    def vision_blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.model.vision_tower.encoder.layers

    def vision_adapter(self, model: nn.Module) -> dict[str, nn.Module | nn.Parameter]:
        return {"multi_modal_projector": model.model.multi_modal_projector}

    def image_token_id(self, model_or_config: Any) -> int:
        return int(config_of(model_or_config).image_token_id)

    def num_image_tokens(self, model_or_config: Any) -> int:
        """Patches per image; "full" feature selection keeps the CLS position as well."""
        config = config_of(model_or_config)
        vision = config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        return patches + (1 if config.vision_feature_select_strategy == "full" else 0)

    def prompt_text(self, prompt: str, has_image: bool) -> str:
        """ "<image>\\n" + prompt with an image (no chat template), the prompt alone without."""
        return f"{self.image_token}\n{prompt}" if has_image else prompt

    def layer_kwargs(
        self, model: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor
    ) -> dict[str, Any]:
        """As LlamaModel.forward without a cache: positions 0..seq-1 (padding included, as there),
        the causal mask and the rotary embeddings."""
        language_model = model.model.language_model
        seq = hidden_states.shape[1]
        position_ids = torch.arange(seq, device=hidden_states.device)[None]  # [1, seq]
        # The cache goes positionally: its keyword is `past_key_values` up to transformers 5.17
        # and `cache` in later releases.
        causal_mask = create_causal_mask(
            language_model.config,
            hidden_states,
            attention_mask.to(hidden_states.device),
            None,
            position_ids=position_ids,
        )
        return {
            "attention_mask": causal_mask,
            "position_ids": position_ids,
            "position_embeddings": language_model.rotary_emb(
                hidden_states, position_ids=position_ids
            ),
        }

    def head_logits(self, model: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        return model.lm_head(model.model.language_model.norm(hidden_states))
