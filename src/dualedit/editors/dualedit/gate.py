"""The gate: when DualEdit acts. What the similarity gate compares (gate keys), how it decides
for a call (`decide`: nearest stored edit, cosine similarity, open when it reaches tau), what it
reports (`GateDecision`), and which of an edit's positions the text adapter attends to.

Every edit and every input yields the same key *parts*, all read at the text layer:
"prompt_end" (the state at the last prompt token), "last_position" (at the last non-pad position,
the released code's key) and "image_mean" (the mean state over the image positions; zero without
an image). A gate key kind (`DualEditConfig.gate_key`) is a unit vector built from parts:
"prompt_end" and "last_position" are the part itself, normalised; "prompt_end_image" is the
concatenation of the normalised last-prompt-token state and the normalised image mean, so the
cosine of two inputs with images is the mean of the two cosines, and an input without an image
scores at most 1/sqrt(2) against an edit with one (and the other way round).
"prompt_end_and_image" is built from the same two parts but its similarity is the *minimum* of
the two part cosines (`similarity_matrix`): the question and the image must both match. Its
vector is the normalised prompt_end followed by the normalised image mean and one "no image"
slot, so two inputs without an image have image cosine 1 and an input without an image against
an edit with one has image cosine 0 (never edited by an image edit).
"image_groups" (`IMAGE_GROUPS` contiguous groups of the image positions, in order, each group's
mean state normalised, concatenated; zero without an image) keeps where in the image sequence a
state sits, which the plain mean loses: BLIP-2's query tokens are slots, so the groups separate
entities better (on the built-in world's BLIP-2, at N = 200 stored edits, more V-Gen and M-Loc
right at once); LLaVA's patches move with the object and gain nothing.
"prompt_end_image_groups" is "prompt_end_image" with the image groups in place of the image mean:
the mean of the prompt-end cosine and the mean over groups of the group cosines.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from dualedit.editors.base import EditId

logger = logging.getLogger(__name__)

#: Groups of image positions in the "image_groups" part.
IMAGE_GROUPS = 4
#: Parts stored per edit (memory files hold one tensor each).
KEY_PARTS: tuple[str, ...] = ("prompt_end", "last_position", "image_mean", "image_groups")
#: Parts every stored edit must be given; the others are unknown (NaN) for edits without them.
REQUIRED_PARTS: tuple[str, ...] = ("prompt_end", "last_position", "image_mean")
#: Width of each part in multiples of the hidden size.
PART_WIDTH: dict[str, int] = {"image_groups": IMAGE_GROUPS}
#: Which parts each gate key kind is built from.
KIND_PARTS: dict[str, tuple[str, ...]] = {
    "prompt_end": ("prompt_end",),
    "last_position": ("last_position",),
    "prompt_end_image": ("prompt_end", "image_mean"),
    "prompt_end_and_image": ("prompt_end", "image_mean"),
    "prompt_end_image_groups": ("prompt_end", "image_groups"),
}
#: Kinds whose similarity is the minimum of the part cosines, not one cosine of whole vectors.
MIN_KINDS: frozenset[str] = frozenset({"prompt_end_and_image"})
#: The learned key kind (`heads.GateHeads`: fitted heads, not a fixed formula) and its parts.
LEARNED = "learned"
LEARNED_PARTS: tuple[str, ...] = ("prompt_end", "image_mean", "image_groups")


def kind_parts(kind: str) -> tuple[str, ...]:
    """The key parts a gate key kind is built from (ValueError: an unknown kind)."""
    if kind == LEARNED:
        return LEARNED_PARTS
    if kind not in KIND_PARTS:
        raise ValueError(f"unknown gate key kind {kind!r}; expected one of "
                         f"{(*KIND_PARTS, LEARNED)}")
    return KIND_PARTS[kind]


def key_parts(
    h: torch.Tensor,
    prompt_end: torch.Tensor,
    last: torch.Tensor,
    image_mask: torch.Tensor,
    parts: tuple[str, ...] = KEY_PARTS,
) -> dict[str, torch.Tensor]:
    """The key parts of each row of a text-layer output.

    Args:
        h: [batch, seq, hidden] text-layer output.
        prompt_end, last: [batch] index of the last prompt token / last non-pad position.
        image_mask: [batch, seq] bool, image positions (no padding).
        parts: which parts to compute.

    Returns:
        {part: [batch, width] float32}, detached; width = hidden * `part_width(part)`.
    """
    rows = torch.arange(h.shape[0], device=h.device)
    out = {}
    if "prompt_end" in parts:
        out["prompt_end"] = h[rows, prompt_end.to(h.device)].detach().float()
    if "last_position" in parts:
        out["last_position"] = h[rows, last.to(h.device)].detach().float()
    if "image_mean" in parts:
        weight = image_mask.to(h.device, torch.float32)  # [batch, seq]
        total = torch.einsum("bs,bsh->bh", weight, h.detach().float())  # [batch, hidden]
        out["image_mean"] = total / weight.sum(dim=1, keepdim=True).clamp(min=1.0)
    if "image_groups" in parts:
        out["image_groups"] = _image_groups(h.detach().float(), image_mask.to(h.device))
    return out


def part_width(part: str) -> int:
    """A key part's width in multiples of the hidden size."""
    return PART_WIDTH.get(part, 1)


def _image_groups(h: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
    """[batch, seq, hidden], [batch, seq] -> [batch, IMAGE_GROUPS * hidden]: the image positions
    of each row cut into IMAGE_GROUPS contiguous groups (rank * groups // count), each group's mean
    state normalised (zero for an empty group), concatenated."""
    mask = image_mask.bool()
    count = mask.sum(dim=1, keepdim=True).clamp(min=1)  # [batch, 1]
    rank = mask.long().cumsum(dim=1) - 1  # [batch, seq], rank among image positions
    group = (rank.clamp(min=0) * IMAGE_GROUPS // count).clamp(max=IMAGE_GROUPS - 1)
    weight = F.one_hot(group, IMAGE_GROUPS).to(h.dtype) * mask[..., None].to(h.dtype)
    sums = torch.einsum("bsk,bsh->bkh", weight, h)  # [batch, groups, hidden]
    return F.normalize(sums, dim=-1).flatten(1)  # mean direction = sum direction


def gate_vectors(parts: dict[str, torch.Tensor], kind: str, heads: Any = None) -> torch.Tensor:
    """Gate vectors of `kind` from key parts: unit [batch, hidden], [batch, 2 * hidden]
    ("prompt_end_image") or [batch, (1 + IMAGE_GROUPS) * hidden] ("prompt_end_image_groups");
    for "prompt_end_and_image" [batch, 2 * hidden + 1], two unit parts; for "learned" the
    fitted `heads`' keys [batch, 2 * width], two unit halves (compare them with
    `similarity_matrix` / `similarity_rows`, not with a dot product).

    Raises:
        ValueError: an unknown kind, a part the kind needs is missing or unknown (NaN, as in
            memory files written before the part existed), or "learned" without heads.
    """
    if kind == LEARNED:
        if heads is None:
            raise ValueError(
                "gate key 'learned' needs fitted gate heads, which this editor does not have: "
                "fit them with `dualedit calibrate --editor DIR --option gate_key=learned` "
                "(or train with that option)"
            )
        return heads.embed(parts)
    if kind not in KIND_PARTS:
        raise ValueError(f"unknown gate key kind {kind!r}; expected one of {tuple(KIND_PARTS)}")
    missing = [p for p in KIND_PARTS[kind] if p not in parts or bool(parts[p].isnan().any())]
    if missing:
        raise ValueError(
            f"gate key {kind!r} needs the key part(s) {missing}, which these edits lack (edits "
            "stored before the part existed: add them again)"
        )
    if kind == "prompt_end_image":
        return _mean_of_cosines(parts["prompt_end"], parts["image_mean"].float())
    if kind == "prompt_end_image_groups":
        return _mean_of_cosines(parts["prompt_end"], unit_groups(parts["image_groups"]))
    if kind == "prompt_end_and_image":
        image = parts["image_mean"].float()
        no_image = (image == 0).all(dim=-1, keepdim=True).to(image.dtype)  # [batch, 1]
        return torch.cat(
            [F.normalize(parts["prompt_end"].float(), dim=-1),
             F.normalize(torch.cat([image, no_image], dim=-1), dim=-1)],
            dim=-1,
        )  # [batch, 2 * hidden + 1]
    return F.normalize(parts[kind].float(), dim=-1)


def unit_groups(groups: torch.Tensor) -> torch.Tensor:
    """[batch, IMAGE_GROUPS * hidden] image groups -> the same, each group normalised and the
    whole divided by sqrt(IMAGE_GROUPS): a dot product of two is the mean of the group cosines
    (zero, no image, stays zero)."""
    unit = F.normalize(groups.float().unflatten(-1, (IMAGE_GROUPS, -1)), dim=-1).flatten(-2)
    return unit / math.sqrt(IMAGE_GROUPS)


def _mean_of_cosines(prompt_end: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """[batch, hidden], [batch, w] -> unit [batch, hidden + w]: both parts normalised, then
    concatenated and normalised, so a dot product is the mean of the two part cosines."""
    both = torch.cat(
        [F.normalize(prompt_end.float(), dim=-1), F.normalize(image, dim=-1)], dim=-1
    )
    return F.normalize(both, dim=-1)


def similarity_matrix(queries: torch.Tensor, keys: torch.Tensor, kind: str) -> torch.Tensor:
    """Gate similarity of every query to every stored key: [batch, d], [n, d] -> [batch, n].

    Both are gate vectors of `kind` (`gate_vectors`); queries are normalised here (per part for
    the min kinds), so a raw single-part key works too. Keys must already be unit (per part).
    """
    if kind == LEARNED:
        return learned_similarity(queries, keys)
    if kind in MIN_KINDS:
        q_end, q_image = _split(queries)
        k_end, k_image = _split(keys)
        return torch.minimum(q_end @ k_end.T, q_image @ k_image.T)  # [batch, n]
    return F.normalize(queries.float(), dim=-1) @ keys.T  # [batch, n]


def lookup_matrix(keys: torch.Tensor, kind: str) -> torch.Tensor:
    """Stored gate vectors [n, d] of `kind` in the form `lookup_similarity` takes: transposed and
    contiguous, [d, n] float32 (the min kinds' two parts normalised here, once), so that a lookup
    is one or two matmuls over contiguous memory with no per-call copy of the keys."""
    if kind in MIN_KINDS:
        return torch.cat(_split(keys), dim=-1).T.contiguous()  # [d, n], unit parts
    return keys.float().T.contiguous()  # [d, n]; learned: rows :w image, w: question


def lookup_similarity(queries: torch.Tensor, matrix: torch.Tensor, kind: str) -> torch.Tensor:
    """`similarity_matrix(queries, keys, kind)` from `matrix = lookup_matrix(keys, kind)`:
    [batch, d], [d, n] -> [batch, n]."""
    if kind == LEARNED:
        q_image, q_question = _halves(queries)
        half = q_image.shape[-1]
        return torch.minimum(q_image @ matrix[:half], q_question @ matrix[half:])
    if kind in MIN_KINDS:
        q_end, q_image = _split(queries)
        width = q_end.shape[-1]
        return torch.minimum(q_end @ matrix[:width], q_image @ matrix[width:])
    return F.normalize(queries.float(), dim=-1) @ matrix  # [batch, n]


def similarity_rows(queries: torch.Tensor, keys: torch.Tensor, kind: str) -> torch.Tensor:
    """Gate similarity of each query to the key of the same row: [batch, d] x2 -> [batch]."""
    if kind == LEARNED:
        q_image, q_question = _halves(queries)
        k_image, k_question = _halves(keys)
        return torch.minimum((q_image * k_image).sum(-1), (q_question * k_question).sum(-1))
    if kind in MIN_KINDS:
        q_end, q_image = _split(queries)
        k_end, k_image = _split(keys)
        return torch.minimum((q_end * k_end).sum(-1), (q_image * k_image).sum(-1))
    return (F.normalize(queries.float(), dim=-1) * keys).sum(dim=-1)


def learned_similarity(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Learned keys [batch, 2w], [n, 2w] -> [batch, n]: the smaller of the image and question
    cosines (both halves are unit, or zero for an input without an image)."""
    q_image, q_question = _halves(queries)
    k_image, k_question = _halves(keys)
    return torch.minimum(q_image @ k_image.T, q_question @ k_question.T)


def _halves(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    half = keys.shape[-1] // 2
    return keys[..., :half].float(), keys[..., half:].float()


def _split(vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A min kind's [.., 2 * hidden + 1] vectors -> unit prompt-end and image parts."""
    hidden = (vectors.shape[-1] - 1) // 2
    return (
        F.normalize(vectors[..., :hidden].float(), dim=-1),
        F.normalize(vectors[..., hidden:].float(), dim=-1),
    )


def text_key_positions(
    attention_mask: torch.Tensor,
    image_mask: torch.Tensor,
    prompt_end: torch.Tensor,
    text_keys: str,
) -> torch.Tensor:
    """Which of an edit sample's positions the text adapter attends to: every non-pad position
    ("all", the released code), the non-pad positions that are not image positions ("text": the
    prompt and target tokens, BOS included), or the last prompt token and the target tokens
    ("answer").

    attention_mask, image_mask [batch, seq], prompt_end [batch] -> [batch, seq] bool.
    """
    keep = attention_mask.bool()
    if text_keys == "text":
        keep = keep & ~image_mask.bool()
    elif text_keys == "answer":
        pos = torch.arange(keep.shape[1], device=keep.device)  # [seq]
        keep = keep & (pos[None, :] >= prompt_end.to(keep.device)[:, None])
    return keep


def compact(states: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's kept positions to the front, in order, trimmed to the longest row.

    states [n, m, hidden], keep [n, m] bool -> ([n, k, hidden], mask [n, k] bool).
    """
    counts = keep.sum(dim=1)  # [n]
    k = max(int(counts.max()), 1) if keep.numel() else 1
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :k]  # [n, k]
    packed = states.gather(1, order[:, :, None].expand(-1, -1, states.shape[-1]))  # [n, k, hidden]
    mask = torch.arange(k, device=keep.device)[None, :] < counts[:, None]  # [n, k]
    return packed * mask[:, :, None].to(packed.dtype), mask


# -- the decision ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GateDecision:
    """The gate's decision for one input (`DualEditor.explain`).

    Attributes:
        edit_id: the nearest stored edit (None: no edit stored).
        similarity: cosine similarity of the input's gate key to that edit's (NaN: none stored).
        gate_open: the similarity reaches tau (always True with the gate off and an edit stored).
        edited: some adapter changes this input: the gate is open, or the visual adapter acts on
            every image input (`gate_scope="text"`).
    """

    edit_id: EditId | None
    similarity: float
    gate_open: bool
    edited: bool


def last_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last non-pad position: [batch, seq] -> [batch] long."""
    pos = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return torch.where(attention_mask.bool(), pos, -1).max(dim=1).values


def decide(ctx: Any, h: torch.Tensor, memory: Any, config: Any) -> None:
    """Gate keys, nearest edits and the gate decision of one call, from the text layer's output
    on its first pass; written into the call context.

    Args:
        ctx: the call's `hooks.CallContext` (its masks and prompt ends; edits given by the
            caller, or None to look up `memory`); gets `decided`, `chosen`, `similarity`,
            `open` (per input: similarity >= tau, or all True with the gate off), `active`,
            and the chosen edits' `states` / `edit_index`.
        h: [batch, seq, hidden] the text layer's output.
        memory: the `EditMemory` looked up when the caller gives no edits (its `gate_heads`
            build the keys of the "learned" kind).
        config: the resolved `DualEditConfig` (gate_key, tau, use_visual, gate_scope).
    """
    ctx.decided = True
    batch, seq, _ = h.shape
    if ctx.image_mask.shape[1] != seq:
        raise ValueError(
            f"call context was opened for {ctx.image_mask.shape[1]} positions, the first "
            f"pass has {seq}"
        )
    given = ctx.image_mask.shape[0]
    if batch != given:
        # generate() with beams / several sequences per input repeats each row in place.
        if batch % given:
            raise ValueError(
                f"call context was opened for {given} inputs, the pass has {batch}"
            )
        repeat = batch // given
        ctx.image_mask = ctx.image_mask.repeat_interleave(repeat, dim=0)
        ctx.attention_mask = ctx.attention_mask.repeat_interleave(repeat, dim=0)
        ctx.prompt_end = ctx.prompt_end.repeat_interleave(repeat, dim=0)
        if ctx.edits is not None:
            rows = torch.arange(given).repeat_interleave(repeat)
            ctx.edits = ctx.edits.select(rows.to(ctx.edits.text.device))
    if ctx.edits is None and len(memory) == 0:
        return
    if ctx.edits is not None and not ctx.gate:
        # Given edits, gate off (a trainer's pass): every input takes its edit; no key needed.
        ctx.chosen = torch.full((batch,), -1, dtype=torch.long, device=h.device)
        ctx.states = ctx.edits
        ctx.similarity = torch.full((batch,), math.nan, device=h.device)
        ctx.open = torch.ones(batch, dtype=torch.bool, device=h.device)
        ctx.active = True
        return
    key_kind = config.gate_key
    parts = key_parts(
        h,
        ctx.prompt_end,
        last_positions(ctx.attention_mask),
        ctx.image_mask & ctx.attention_mask,
        kind_parts(key_kind),
    )
    heads = memory.gate_heads
    keys = gate_vectors(parts, key_kind, heads).to(h.device)  # [batch, d] unit rows (or parts)
    if ctx.edits is None:
        chosen, similarity = memory.lookup(keys, key_kind)  # [batch], [batch]
        ctx.chosen = chosen
    else:
        ctx.chosen = torch.full((batch,), -1, dtype=torch.long, device=h.device)
        ctx.states = ctx.edits
        edit_keys = {k: part.to(h.device) for k, part in ctx.edits.keys.items()}
        similarity = similarity_rows(keys, gate_vectors(edit_keys, key_kind, heads), key_kind)
    ctx.similarity = similarity
    if ctx.gate:
        ctx.open = similarity >= config.tau  # [batch]
    else:
        ctx.open = torch.ones(batch, dtype=torch.bool, device=h.device)
    ctx.active = bool(ctx.open.any()) or (
        config.use_visual and config.gate_scope == "text"
    )
    if ctx.active and ctx.states is None:
        # Gathered only when some input is edited (a closed gate costs no copy), and each
        # distinct edit once: inputs that share an edit share its states.
        distinct, ctx.edit_index = torch.unique(ctx.chosen, return_inverse=True)
        ctx.states = memory.states(distinct, device=h.device)
    if logger.isEnabledFor(logging.DEBUG):  # .tolist() waits for the device: only if shown
        logger.debug(
            "DualEdit gate: similarity %s open %s", similarity.tolist(), ctx.open.tolist()
        )



def decision_of(
    ctx: Any, row: int, ids: Sequence[EditId], visual_ungated: bool
) -> GateDecision:
    """Row `row`'s decision from a call context whose first pass has run.

    Args:
        ctx: the call's `hooks.CallContext`.
        row: the input.
        ids: the memory's ids in lookup order.
        visual_ungated: the visual adapter acts on every image input (use_visual and
            gate_scope "text").
    """
    if not ctx.decided or ctx.similarity is None:
        return GateDecision(None, math.nan, False, False)
    position = int(ctx.chosen[row])
    edit_id = ids[position] if position >= 0 else None
    gate_open = bool(ctx.open[row])
    visual = visual_ungated and bool(ctx.image_mask[row].any())
    return GateDecision(edit_id, float(ctx.similarity[row]), gate_open, gate_open or visual)
