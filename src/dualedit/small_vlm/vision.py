"""The vision side of pretraining: warm-up with linear heads, then frozen features.

Stage 1 trains the vision tower alone to classify every image question kind of the corpus (name,
shape, color, ...) through throw-away linear heads on pooled tower outputs. A small ViT learns
shapes far faster from these direct labels than through a language model's loss (an earlier
trial: shape stuck near 50% after 12 minutes of end-to-end training).

Stage 2 keeps the tower frozen, as LLaVA and BLIP-2 do with their pretrained encoders, so its
outputs are computed once per image (`tower_features`) and the language side trains on them
(`image_embeddings` runs the trainable connector exactly as the model's own forward does).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm


def vision_tower(model: nn.Module) -> nn.Module:
    """The pixel encoder: CLIP vision model (LLaVA) or BLIP-2 ViT."""
    if model.config.model_type == "llava":
        return model.model.vision_tower
    return model.vision_model


def tower_outputs(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """What the connector reads. [b, 3, H, W] -> LLaVA [b, patches, v] (CLS dropped, layer -1,
    strategy 'default'); BLIP-2 [b, 1 + patches, v] (all tokens, after the final norm)."""
    hidden = vision_tower(model)(pixel_values=pixel_values).last_hidden_state  # [b, 1 + p, v]
    return hidden[:, 1:] if model.config.model_type == "llava" else hidden


@torch.no_grad()
def tower_features(model: nn.Module, pixel_values: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """`tower_outputs` of every image, in batches, without gradients."""
    tower = vision_tower(model)
    was_training = tower.training
    tower.eval()
    chunks = [tower_outputs(model, pixel_values[i:i + batch_size])
              for i in range(0, len(pixel_values), batch_size)]
    tower.train(was_training)
    return torch.cat(chunks)  # [n, tokens, vision_hidden]


def image_embeddings(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """The connector on tower features: what the model scatters into its image positions.

    LLaVA: the projector, [b, p, v] -> [b, p, hidden]. BLIP-2: Q-Former over the learned queries,
    then the language projection, [b, 1 + p, v] -> [b, queries, hidden].
    """
    if model.config.model_type == "llava":
        return model.model.multi_modal_projector(features)
    queries = model.query_tokens.expand(features.shape[0], -1, -1)  # [b, q, qformer_hidden]
    mask = torch.ones(features.shape[:2], dtype=torch.long)
    out = model.qformer(query_embeds=queries, encoder_hidden_states=features,
                        encoder_attention_mask=mask, return_dict=True).last_hidden_state
    return model.language_projection(out)  # [b, q, hidden]


def logits_from_features(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         features: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """The model's logits with precomputed tower features instead of pixels.

    Same computation as `model(input_ids, attention_mask, pixel_values)` (checked in the tests).
    input_ids [b, s], features [b, tokens, v] -> [b, s, vocab].
    """
    embeds = model.get_input_embeddings()(input_ids)  # [b, s, hidden]
    images = image_embeddings(model, features).to(embeds.dtype)  # [b, n_image, hidden]
    mask = (input_ids == image_token_id)[..., None].expand_as(embeds)
    embeds = embeds.masked_scatter(mask, images)
    if model.config.model_type == "llava":
        return model(inputs_embeds=embeds, attention_mask=attention_mask).logits
    return model.language_model(inputs_embeds=embeds, attention_mask=attention_mask).logits


def augment(pixels: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a shift of up to `shift` px (edges replicated).

    Both keep the world's rendering distribution (mirror-symmetric shapes and rotations, random
    positions), so they only add renderings. [b, 3, H, W] -> [b, 3, H, W].
    """
    b, _, h, w = pixels.shape
    flip = torch.rand(b, generator=generator) < 0.5
    out = torch.where(flip[:, None, None, None], pixels.flip(3), pixels)
    if shift == 0:
        return out
    padded = nn.functional.pad(out, (shift,) * 4, mode="replicate")  # [b, 3, H + 2s, W + 2s]
    dy = torch.randint(0, 2 * shift + 1, (b,), generator=generator).tolist()
    dx = torch.randint(0, 2 * shift + 1, (b,), generator=generator).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


def _pooled(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """What the warm-up heads read: the mean of the last layer's patch tokens, plus CLS for BLIP-2.

    LLaVA's language model sees the patch tokens only (CLS dropped), so its heads must not lean
    on CLS; BLIP-2's Q-Former reads every token. [b, 3, H, W] -> [b, pooled_width(model)].
    """
    hidden = vision_tower(model)(pixel_values=pixel_values).last_hidden_state  # [b, 1 + p, v]
    patches = hidden[:, 1:].mean(dim=1)  # [b, v]
    if model.config.model_type == "llava":
        return patches
    return torch.cat([hidden[:, 0], patches], dim=-1)  # [b, 2v]


def pooled_width(model: nn.Module) -> int:
    width = model.config.vision_config.hidden_size
    return width if model.config.model_type == "llava" else 2 * width


def warm_up_vision(model: nn.Module, pixel_values: torch.Tensor, labels: dict[str, torch.Tensor],
                   *, steps: int, batch_size: int, lr: float, weight_decay: float, shift: int,
                   grad_clip: float, generator: torch.Generator, progress: bool = False) -> nn.ModuleDict:
    """Stage 1: train the vision tower with one linear head per question kind.

    Args:
        pixel_values: [n_images, 3, H, W], the corpus training images.
        labels: kind -> [n_images] class index (-100 where unknown), from `corpus.vision_labels`.
        steps, batch_size, lr, weight_decay, grad_clip: AdamW with warm-up and cosine decay.
        shift: augmentation shift in px (0: flips only).

    Returns:
        the trained heads (for measuring held-out accuracy; the model does not keep them).
    """
    width = pooled_width(model)
    head_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):  # deterministic heads, global RNG untouched
        torch.manual_seed(head_seed)
        heads = nn.ModuleDict({kind: nn.Linear(width, int(y.max()) + 1)
                               for kind, y in labels.items()})
    tower = vision_tower(model)
    tower.train()
    params = [p for p in tower.parameters()] + [p for p in heads.parameters()]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    order, pos = torch.randperm(len(pixel_values), generator=generator), 0
    bar = tqdm(range(steps), desc="vision warm-up", disable=not progress, leave=False)
    for step in bar:
        scale = min(1.0, (step + 1) / warm) * 0.5 * (1.0 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
        if pos + batch_size > len(order):
            order, pos = torch.randperm(len(pixel_values), generator=generator), 0
        rows = order[pos:pos + batch_size]
        pos += batch_size
        features = _pooled(model, augment(pixel_values[rows], shift, generator))  # [b, width]
        loss = sum(nn.functional.cross_entropy(head(features), labels[kind][rows], ignore_index=-100)
                   for kind, head in heads.items())
        loss.backward()
        nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return heads


@torch.no_grad()
def head_accuracy(model: nn.Module, heads: nn.ModuleDict, pixel_values: torch.Tensor,
                  labels: dict[str, torch.Tensor], batch_size: int = 256) -> dict[str, float]:
    """Accuracy of each warm-up head on some images (e.g. the held-out renderings)."""
    tower = vision_tower(model)
    was_training = tower.training
    tower.eval()
    pooled = torch.cat([_pooled(model, pixel_values[i:i + batch_size])
                        for i in range(0, len(pixel_values), batch_size)])
    tower.train(was_training)
    out = {}
    for kind, head in heads.items():
        y = labels[kind]
        known = y != -100
        right = head(pooled).argmax(-1)[known] == y[known]
        out[kind] = float(right.float().mean()) if known.any() else float("nan")
    return out
