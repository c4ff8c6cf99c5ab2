"""Shared by the analysis tests."""

import torch


def hook_ids(data):
    """Every module's hook ids after one plain forward: transformers installs output-capturing
    hooks of its own on LLaVA's vision tower in the first forward (LLaVA asks it for hidden
    states) and keeps them; an analysis must add nothing to those."""
    _, batch = next(data.batches("rel", 1))
    with torch.no_grad():
        data.backbone.forward_logits(data.model, batch.input_ids, batch.attention_mask,
                                     batch.pixel_values)
    return {name: (list(m._forward_hooks), list(m._forward_pre_hooks))
            for name, m in data.model.named_modules()}
