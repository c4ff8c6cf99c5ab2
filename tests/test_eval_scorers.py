"""Metric functions against values computed by hand on small logits."""

import math

import pytest
import torch

from dualedit.eval.scorers import (
    EasyEditScorer,
    PaperScorer,
    answer_agreement,
    average,
    exact_match,
    get_scorer,
    token_accuracy,
    topk_agreement,
)


def one_hot_logits(tokens: list[list[int]], vocab: int) -> torch.Tensor:
    """Logits [b, s, V] whose argmax at each position is the given token."""
    logits = torch.zeros(len(tokens), len(tokens[0]), vocab)
    for b, row in enumerate(tokens):
        for p, tok in enumerate(row):
            logits[b, p, tok] = 1.0
    return logits


def test_token_accuracy_by_hand():
    # argmax per position: 1, 3, 4, 2; positions 1 and 2 predict the target tokens 3 and 0.
    logits = one_hot_logits([[1, 3, 4, 2]], vocab=5)  # [1, 4, 5]
    target_mask = torch.tensor([[False, True, True, False]])
    target_ids = torch.tensor([[-100, 3, 0, -100]])
    assert token_accuracy(logits, target_ids, target_mask).tolist() == [0.5]
    # the position before the target (0, argmax 1) must not count even if its id matches.
    target_ids = torch.tensor([[-100, 3, 4, -100]])
    assert token_accuracy(logits, target_ids, target_mask).tolist() == [1.0]


def test_token_accuracy_batch_and_empty_mask():
    logits = one_hot_logits([[0, 1, 2], [2, 2, 2]], vocab=3)  # [2, 3, 3]
    target_ids = torch.tensor([[1, 1, 2], [0, 0, 0]])
    mask = torch.tensor([[True, True, True], [False, False, False]])
    acc = token_accuracy(logits, target_ids, mask)
    assert acc[0].item() == pytest.approx(2 / 3)
    assert math.isnan(acc[1].item())


def test_answer_agreement_ignores_prompt_positions():
    unedited = one_hot_logits([[1, 2, 3, 4]], vocab=5)
    edited = one_hot_logits([[0, 2, 3, 0]], vocab=5)  # differs at 0 (prompt) and 3 (answer)
    mask = torch.tensor([[False, True, True, True]])
    assert answer_agreement(edited, unedited, mask).item() == pytest.approx(2 / 3)
    mask = torch.tensor([[False, True, True, False]])
    assert answer_agreement(edited, unedited, mask).item() == 1.0


def test_topk_agreement_is_ordered():
    unedited = torch.tensor([[[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]]])  # [1, 2, 4]
    # position 0: ranks 2 and 3 swapped; position 1: identical.
    edited = torch.tensor([[[4.0, 3.0, 1.0, 2.0], [1.0, 2.0, 3.0, 4.0]]])
    valid = torch.tensor([[True, True]])
    assert topk_agreement(edited, unedited, valid, k=1).item() == 1.0
    assert topk_agreement(edited, unedited, valid, k=2).item() == 1.0
    assert topk_agreement(edited, unedited, valid, k=4).item() == pytest.approx(6 / 8)
    # k larger than the vocabulary is clipped to it.
    assert topk_agreement(edited, unedited, valid, k=10).item() == pytest.approx(6 / 8)
    # a padded position does not count.
    assert topk_agreement(edited, unedited, torch.tensor([[False, True]]), k=4).item() == 1.0


def crafted_batch(vocab: int = 12):
    """Unedited and edited logits for one sample [1, 4, V] that agree on the answer's argmax.

    Position 0 (prompt) has a different argmax; position 3 (answer) keeps its argmax but
    swaps ranks 5 and 6; position 4 is padding with a different argmax.
    """
    torch.manual_seed(0)
    base = torch.arange(vocab, dtype=torch.float32).flip(0)  # ranks 0..V-1 = ids 0..V-1
    unedited = base.repeat(1, 5, 1).clone()  # [1, 5, V]
    edited = unedited.clone()
    edited[0, 0, 7] = 100.0  # prompt position: argmax 0 -> 7
    edited[0, 3, 5], edited[0, 3, 6] = unedited[0, 3, 6], unedited[0, 3, 5]  # swap ranks 5/6
    edited[0, 4, 9] = 100.0  # padding
    target_mask = torch.tensor([[False, False, True, True, False]])
    target_ids = torch.tensor([[-100, -100, 0, 1, -100]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 0]])
    return unedited, edited, target_ids, target_mask, attention_mask


@pytest.mark.parametrize("key", ["t_loc", "m_loc"])
def test_scorers_differ_on_crafted_example(key):
    unedited, edited, target_ids, target_mask, attention_mask = crafted_batch()
    results = {}
    for scorer in (PaperScorer(), EasyEditScorer()):
        ref = scorer.predictions(key, unedited, target_ids, target_mask, attention_mask)[0]
        new = scorer.predictions(key, edited, target_ids, target_mask, attention_mask)[0]
        results[scorer.name] = scorer.locality(key, new, ref)
    assert results["paper"] == 1.0
    if key == "t_loc":
        # top-1 at 4 valid positions: position 0 differs.
        assert results["easyedit"] == pytest.approx(3 / 4)
    else:
        # top-10 at 4 valid positions = 40 pairs: position 0 shifts ranks 0..7 (8 pairs differ:
        # 7 moves to the front), position 3 swaps ranks 5 and 6 (2 pairs differ).
        assert results["easyedit"] == pytest.approx(30 / 40)


def test_record_metrics_and_average():
    unedited, edited, target_ids, target_mask, attention_mask = crafted_batch()
    scorer = get_scorer("paper")
    preds = {
        key: scorer.predictions(key, edited, target_ids, target_mask, attention_mask)[0]
        for key in ("rel", "t_gen", "v_gen", "t_loc", "m_loc")
    }
    refs = {
        key: scorer.predictions(key, unedited, target_ids, target_mask, attention_mask)[0]
        for key in ("t_loc", "m_loc")
    }
    metrics = scorer.record_metrics(preds, refs)
    # the answer positions 2, 3 predict ids 0, 0 (argmax of the base row); targets are 0, 1.
    assert metrics == {"rel": 0.5, "t_gen": 0.5, "v_gen": 0.5, "t_loc": 1.0, "m_loc": 1.0}
    assert average(metrics) == pytest.approx((0.5 * 3 + 2) / 5)
    assert average({"rel": 1, "t_gen": 2, "v_gen": 3, "t_loc": 4, "m_loc": 5, "x": 99}) == 3
    with pytest.raises(ValueError, match="m_loc"):
        average({"rel": 1, "t_gen": 2, "v_gen": 3, "t_loc": 4})


def test_get_scorer_unknown_name():
    with pytest.raises(ValueError, match="unknown scorer 'nope'"):
        get_scorer("nope")


def test_exact_match_strips_and_is_case_sensitive_by_default():
    assert exact_match(" red square\n", "red square ")
    assert not exact_match("Red square", "red square")
    assert exact_match("Red square", "red square", case_sensitive=False)
    assert not exact_match("red", "red square")


@pytest.mark.parametrize("scorer_name", ["paper", "easyedit"])
def test_scorer_predictions_agree_with_the_pure_functions(scorer_name):
    # Stored per-sample predictions (padding dropped) must give what the logit functions give.
    gen = torch.Generator().manual_seed(0)
    unedited = torch.randn(3, 6, 20, generator=gen)  # [b, s, V]
    edited = unedited + 0.7 * torch.randn(3, 6, 20, generator=gen)
    attention_mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 5 + [0]])
    target_mask = torch.zeros(3, 6, dtype=torch.bool)
    target_mask[0, 3:5] = target_mask[1, 1:3] = target_mask[2, 2:4] = True
    target_ids = torch.where(target_mask, unedited.argmax(-1), torch.full((3, 6), -100))
    scorer = get_scorer(scorer_name)
    for key, k in (("t_loc", 1), ("m_loc", 10)):
        ref = scorer.predictions(key, unedited, target_ids, target_mask, attention_mask)
        new = scorer.predictions(key, edited, target_ids, target_mask, attention_mask)
        got = [scorer.locality(key, n, r) for n, r in zip(new, ref)]
        if scorer_name == "paper":
            expected = answer_agreement(edited, unedited, target_mask)
        else:
            expected = topk_agreement(edited, unedited, attention_mask.bool(), k=k)
        assert got == pytest.approx(expected.tolist())
        assert [p.accuracy for p in new] == pytest.approx(
            token_accuracy(edited, target_ids, target_mask).tolist()
        )
    assert [p.accuracy for p in ref] == [1.0, 1.0, 1.0]
