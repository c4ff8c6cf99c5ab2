"""DualEdit's edited pass over an `EditBatch`: the training loss and the validation metrics
(`DualEditTrainable.loss` / `.metrics`, train.py).

Layers below m = min(t, v) are frozen and the adapters do not touch them, so the vision side and
those layers run once, without gradient (`Backbone.layer_input`); their output at layer m serves
1. the edit states: the unedited layers m..max(t, v) on the rel rows (the edit samples);
2. the unedited reference for the locality KL (layers m..L on the locality rows, no gradient);
3. the edited forward (layers m..L with each input's own edit, gate off), the only pass that
   builds a graph, so backward runs through layers >= m only.
Logits are computed only at the target positions (the head acts per position).

Loss per edit (paper eq. 5): l_rel + l_gen + l_loc with
l_rel = NLL(alt | image, src), l_gen = NLL(alt | image, rephrase) + NLL(alt | image_rephrase, src),
l_loc = KL(unedited || edited) on the m_loc answer positions (+ the same on t_loc unless the
released code's variant drops it). Each NLL/KL is the mean over the sample's target positions,
then the mean over edits: every edit weighs the same, and the mean over processes of equal shares
is the mean over the global batch.
"""

from __future__ import annotations

import torch

from dualedit.data.prompts import EncodedBatch
from dualedit.editors.dualedit.editor import DualEditor
from dualedit.editors.dualedit.memory import EditStates, edit_states
from dualedit.train.data import EditBatch
from dualedit.train.losses import METRICS, PassOutput, pass_output  # noqa: F401  (re-exported)


def prefix_layer(editor: DualEditor) -> int:
    """m = min(t, v): the first decoder layer the adapters can change."""
    return min(editor.config.text_layer, editor.config.visual_layer)


def edit_states_from_prefix(
    editor: DualEditor, hidden: torch.Tensor, batch: EncodedBatch, rows: slice
) -> EditStates:
    """The edit states of the `rows` of `batch` (the edit samples) from their layer-m input.

    The same states as `editor.encode_edits` computes from scratch (layers t and v of the frozen
    model, adapters off, padding masked, gate keys at the text layer), without re-running the
    vision side and the layers below m. Run it without gradient, with the editor disabled.

    Args:
        hidden: [batch, seq, hidden], the input of layer m for the whole batch.
        batch: the encoded batch (right padding).
        rows: the rows that are edit samples.
    """
    t, v = editor.config.text_layer, editor.config.visual_layer
    attention_mask = batch.attention_mask[rows]  # [n, seq]
    width = int(attention_mask.sum(dim=1).max())  # right padding: trim to the longest edit
    attention_mask = attention_mask[:, :width]
    _, kept = editor.backbone.run_layers(
        editor.model,
        hidden[rows, :width],
        attention_mask,
        prefix_layer(editor),
        max(t, v) + 1,
        keep=(t, v),
    )
    return edit_states(
        kept[t], kept[v], attention_mask, batch.image_mask[rows, :width], batch.prompt_end[rows],
        editor.config.text_keys,
    )


def edit_pass(editor: DualEditor, batch: EditBatch, *, text_loc: bool = True) -> PassOutput:
    """The edited pass of `batch` (gate off, input i with edit i), see the module docstring.

    Gradient flows into the adapters when grad mode is on; wrap in `torch.no_grad()` to validate.

    Args:
        editor: an attached DualEditor on the model.
        batch: the n edits' samples, on the model's input device.
        text_loc: also run the text-only locality samples (needed for the text KL and T-Loc).
    """
    model, backbone = editor.model, editor.backbone
    m = prefix_layer(editor)
    n = batch.n
    images = batch.images
    loc_rows = batch.rows("m_loc")
    with torch.no_grad(), editor.disabled():
        hidden = backbone.layer_input(
            model, m, images.input_ids, images.attention_mask, images.pixel_values
        )  # [4n, seq, hidden]
        edits = edit_states_from_prefix(editor, hidden, images, batch.rows("rel"))
        reference = backbone.run_from(
            model,
            m,
            hidden[loc_rows],
            images.attention_mask[loc_rows],
            logits_at=images.target_mask[loc_rows],
        )  # [k_loc, vocab]
    each = torch.arange(n, device=edits.text.device).repeat(len(images.input_ids) // n)
    logits = _edited_logits(editor, m, hidden, images, edits.select(each))  # [k, vocab]
    if not text_loc:
        return pass_output(images, logits, reference, n)
    text = batch.text
    with torch.no_grad(), editor.disabled():
        hidden = backbone.layer_input(model, m, text.input_ids, text.attention_mask)
        text_reference = backbone.run_from(
            model, m, hidden, text.attention_mask, logits_at=text.target_mask
        )  # [k_text, vocab]
    text_logits = _edited_logits(editor, m, hidden, text, edits)  # [k_text, vocab]
    return pass_output(
        images, logits, reference, n,
        text=text, text_logits=text_logits, text_reference=text_reference,
    )


def _edited_logits(
    editor: DualEditor, m: int, hidden: torch.Tensor, batch: EncodedBatch, edits: EditStates
) -> torch.Tensor:
    """Logits at `batch.target_mask` with input i edited by edit i, gate off: [k, vocab]."""
    with editor.session(
        batch.input_ids, batch.attention_mask, batch.prompt_end, edits=edits, gate=False
    ):
        return editor.backbone.run_from(
            editor.model, m, hidden, batch.attention_mask, logits_at=batch.target_mask
        )
