"""The cross-attention adapter and the position selection of the hooks (no model needed)."""

import pytest
import torch
import torch.nn.functional as F

from dualedit.editors.dualedit import CrossAttentionAdapter, apply_adapter, text_positions
from dualedit.editors.dualedit.hooks import last_positions


def randomised(adapter, seed=0):
    """The adapter with every parameter drawn at random (the output projection included)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return adapter


def states(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_identity_at_initialisation():
    adapter = CrossAttentionAdapter(16, 8, 2)
    h, h_e = states(1, 2, 5, 16), states(2, 2, 7, 16)
    mask = torch.ones(2, 7, dtype=torch.bool)
    assert torch.equal(adapter(h, h_e, mask), h)
    assert torch.count_nonzero(adapter.delta(h, h_e, mask)) == 0
    assert adapter.out.weight.abs().sum() == 0 and adapter.query.weight.abs().sum() > 0


def test_matches_a_reference_attention_and_ignores_padding():
    adapter = randomised(CrossAttentionAdapter(16, 8, 2))
    h, h_e = states(1, 2, 5, 16), states(2, 2, 7, 16)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    out = adapter(h, h_e, mask)
    # Reference: torch's attention on the normalised, projected inputs, row by row, unpadded.
    for b in range(2):
        m = int(mask[b].sum())
        q = adapter.query(adapter.norm_query(h[b])).view(5, 2, 4).transpose(0, 1)
        e = adapter.norm_edit(h_e[b, :m])
        k = adapter.key(e).view(m, 2, 4).transpose(0, 1)
        v = adapter.value(e).view(m, 2, 4).transpose(0, 1)
        mixed = F.scaled_dot_product_attention(q, k, v).transpose(0, 1).reshape(5, 8)
        torch.testing.assert_close(out[b], h[b] + adapter.out(mixed))
    # Padded edit positions do not matter, whatever they hold.
    noisy = h_e.clone()
    noisy[1, 3:] = 1e4
    torch.testing.assert_close(adapter(h, noisy, mask), out, rtol=0, atol=0)
    assert not torch.allclose(out, h)


def test_bfloat16_adapter_and_dtype_conversion():
    adapter = randomised(CrossAttentionAdapter(16, 8, 2, dtype=torch.bfloat16))
    h = states(1, 1, 3, 16)  # float32 input: the update comes back in float32
    out = adapter(h, states(2, 1, 4, 16), torch.ones(1, 4, dtype=torch.bool))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert adapter.dtype == torch.bfloat16


def test_text_positions_follow_the_released_rule():
    # LLaVA-like rows: BOS, 3 image tokens, text, answer; right and left padding; text-only.
    image_mask = torch.tensor(
        [
            [0, 1, 1, 1, 0, 0, 0, 0, 0],  # right padded: prompt ends at 6, answer 7
            [0, 0, 1, 1, 1, 0, 0, 0, 0],  # left padded by one
            [0, 0, 0, 0, 0, 0, 0, 0, 0],  # text only, left padded by two
        ],
        dtype=torch.bool,
    )
    attention = torch.tensor(
        [[1, 1, 1, 1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1, 1, 1]]
    )
    prompt_end = torch.tensor([6, 7, 6])
    got = text_positions(image_mask, attention, prompt_end).int()
    expected = torch.tensor(
        [
            [0, 0, 0, 0, 1, 1, 0, 0, 0],
            [0, 0, 0, 0, 0, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 1, 0, 0, 0],
        ]
    )
    assert torch.equal(got, expected)
    assert last_positions(attention).tolist() == [7, 8, 8]
    # The option adds exactly each row's last prompt token, never an answer or pad position.
    wider = text_positions(image_mask, attention, prompt_end, include_prompt_end=True).int()
    expected[torch.arange(3), prompt_end] = 1
    assert torch.equal(wider, expected)


def test_apply_adapter_touches_only_the_selected_positions():
    adapter = randomised(CrossAttentionAdapter(16, 8, 2))
    h = states(3, 3, 6, 16)
    mask = torch.tensor(
        [[0, 1, 1, 0, 1, 0], [0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.bool
    )
    h_e, e_mask = states(4, 3, 5, 16), torch.ones(3, 5, dtype=torch.bool)
    out = apply_adapter(adapter, h, mask, h_e, e_mask)
    assert torch.equal(out[~mask], h[~mask])  # bit for bit elsewhere, whole row 1 included
    for b in (0, 2):
        selected = mask[b].nonzero().squeeze(1)
        direct = adapter(h[b : b + 1, selected], h_e[b : b + 1], e_mask[b : b + 1])
        torch.testing.assert_close(out[b, selected], direct[0])
    assert not torch.equal(out[0, 1], h[0, 1])
    empty = torch.zeros_like(mask)
    assert apply_adapter(adapter, h, empty, h_e, e_mask) is h


def test_inputs_sharing_an_edit_match_one_copy_per_input():
    # Two distinct edits (the second padded), four inputs: edit_index maps inputs to edits, and
    # the result equals giving every input its own copy of its edit's states.
    adapter = randomised(CrossAttentionAdapter(16, 8, 2))
    h = states(7, 4, 6, 16)
    mask = torch.tensor(
        [[0, 1, 1, 0, 1, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1]],
        dtype=torch.bool,
    )
    h_e = states(8, 2, 5, 16)
    e_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    edit_index = torch.tensor([1, 0, 0, 1])
    shared = apply_adapter(adapter, h, mask, h_e, e_mask, edit_index)
    copies = apply_adapter(adapter, h, mask, h_e[edit_index], e_mask[edit_index])
    torch.testing.assert_close(shared, copies)
    assert torch.equal(shared[~mask], h[~mask])
    # Rows 0 and 3 use edit 1: replacing edit 0's states changes row 1 only.
    other = h_e.clone()
    other[0] = states(9, 5, 16)
    changed = apply_adapter(adapter, h, mask, other, e_mask, edit_index)
    assert torch.equal(changed[[0, 3]], shared[[0, 3]])
    assert not torch.allclose(changed[1], shared[1])


def test_gradients_reach_only_the_adapter():
    adapter = CrossAttentionAdapter(16, 8, 2)
    h = states(5, 2, 4, 16)
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    out = apply_adapter(adapter, h, mask, states(6, 2, 3, 16), torch.ones(2, 3, dtype=torch.bool))
    out.square().sum().backward()
    assert adapter.out.weight.grad is not None and adapter.out.weight.grad.abs().sum() > 0
    assert adapter.query.weight.grad is not None
    assert h.grad is None


@pytest.mark.parametrize("width, heads", [(8, 3), (10, 4)])
def test_width_must_split_over_heads(width, heads):
    with pytest.raises(ValueError, match="not divisible"):
        CrossAttentionAdapter(16, width, heads)
