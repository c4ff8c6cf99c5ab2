"""The training loop is method-neutral: a second, tiny method written here (a bias vector added to
the frozen model's logits) trains through `train.loop.train` as DualEdit does: its loss falls, its
own folder is saved as best/, the run meta names it, a resumed run ends exactly where an
uninterrupted one does, and a checkpoint of another method is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from folder_tools import rewrite_json
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from test_train_data import write_tiny_mmedit
from torch import nn

from dualedit.backbones import get_backbone
from dualedit.train import CheckpointMismatch, Trainable, TrainSettings, base_model_meta, train
from dualedit.train.checkpoint import STATE_FILE, checkpoint_dir
from dualedit.train.meta import BASE_MODEL_KEYS

BIAS_FILE = "bias.safetensors"


class LogitBias(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(vocab))


class BiasTrainable:
    """A bias added to the frozen model's logits at the answer positions of the edit samples
    (the rel rows): it can only learn the answers' prior, which is enough to lower the loss."""

    name = "logit-bias"

    def __init__(self, model, processor):
        self.model, self.backbone = model, get_backbone(model)
        self.flags = [(p, p.requires_grad) for p in model.parameters()]
        for p, _ in self.flags:
            p.requires_grad_(False)
        self.vocab = model.get_output_embeddings().weight.shape[0]
        self.module = LogitBias(self.vocab)
        self.closed, self.finished, self.modes = 0, [], set()

    def parameters(self):
        return self.module.parameters()

    def _answers(self, batch):
        """Biased and frozen logits at the rel rows' target positions, targets, rows."""
        self.modes.add(self.model.training)
        images = batch.images
        mask = images.target_mask.clone()  # [4n, seq]
        mask[batch.n :] = False  # rel rows only
        with torch.no_grad():
            frozen = self.backbone.forward_logits(
                self.model, images.input_ids, images.attention_mask, images.pixel_values
            )[mask]  # [k, vocab]
        return frozen + self.module.bias, frozen, images.target_ids[mask], mask.nonzero()[:, 0]

    def loss(self, batch):
        logits, _, targets, _ = self._answers(batch)
        nll = F.cross_entropy(logits.float(), targets)
        l2 = 1e-3 * self.module.bias.pow(2).sum()
        return nll + l2, {"nll": nll, "l2": l2}

    def metrics(self, batch):
        logits, frozen, targets, rows = self._answers(batch)
        hits = (logits.argmax(-1) == targets).double()  # [k]
        same = (logits.argmax(-1) == frozen.argmax(-1)).double()  # [k]
        count = torch.bincount(rows, minlength=batch.n).double()  # [n]
        per_row = lambda values: values.new_zeros(batch.n).index_add(0, rows, values) / count
        return {"rel": per_row(hits), "same": per_row(same)}

    def run_meta(self):
        return {"vocab": self.vocab, **base_model_meta(self.model, self.backbone)}

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        save_file({"bias": self.module.bias.detach().clone()}, str(directory / BIAS_FILE))

    def finish(self, best_dir, dataset, val_idx):
        self.finished.append((best_dir, list(val_idx)))
        return {"edits": len(val_idx)}

    def close(self) -> None:
        for p, flag in self.flags:
            p.requires_grad_(flag)
        self.closed += 1


class OtherBias(BiasTrainable):
    name = "other-bias"


@pytest.fixture(scope="module")
def tiny_train(tmp_path_factory):
    return write_tiny_mmedit(tmp_path_factory.mktemp("tiny_mmedit"), n=10)


def settings(**changes):
    base = {
        "lr": 0.2,
        "batch_size": 4,
        "max_steps": 6,
        "eval_every": 3,
        "val_edits": 2,
        "log_every": 1,
        "checkpoint_every": 3,
        "patience": None,
        "seed": 2,
    }
    return TrainSettings(**{**base, **changes})


def run(make, model, processor, data, out_dir, **changes):
    trainable = make(model, processor)
    resume = changes.pop("resume", True)
    result = train(
        trainable,
        model,
        processor,
        data,
        settings=settings(**changes),
        out_dir=out_dir,
        resume=resume,
        progress=False,
    )
    return trainable, result


def test_a_second_method_trains_through_the_loop(tiny_factory, tiny_vlm, tiny_train, tmp_path):
    model, processor = tiny_factory(tiny_vlm.name)
    model.train()  # given back as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = BiasTrainable(model, processor)
    assert isinstance(trainable, Trainable)
    result = train(
        trainable,
        model,
        processor,
        tiny_train,
        settings=settings(max_steps=12, eval_every=4),
        out_dir=tmp_path,
        progress=False,
    )
    # The loop closed the trainable, ran it in eval mode and gave the model back.
    assert trainable.closed == 1 and trainable.modes == {False} and model.training
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    log = json.loads(result.log_path.read_text())
    train_entries = [e for e in log["entries"] if e["kind"] == "train"]
    assert set(train_entries[0]) == {"kind", "step", "lr", "steps", "grad_norm", "loss", "l2",
                                     "nll", "elapsed_s"}
    losses = [e["loss"] for e in train_entries]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < losses[0] - 1.0
    for e in train_entries:
        assert e["loss"] == pytest.approx(e["nll"] + e["l2"])
    evals = [e for e in log["entries"] if e["kind"] == "eval"]
    assert [e["step"] for e in evals] == [4, 8, 12]
    assert all(e["score"] == pytest.approx((e["rel"] + e["same"]) / 2) for e in evals)

    # The meta names the method; best/ and last/ are the method's own folders (`save`).
    assert log["meta"]["method"] == "logit-bias"
    assert set(log["meta"]) == {"method", "settings", "vocab", "dataset", "val_edits",
                                *BASE_MODEL_KEYS}
    saved = json.loads((checkpoint_dir(tmp_path) / STATE_FILE).read_text())["meta"]
    assert saved == log["meta"]
    assert result.best_dir == tmp_path / "best" and result.best_step is not None
    best = load_file(str(result.best_dir / BIAS_FILE))["bias"]
    last = load_file(str(result.last_dir / BIAS_FILE))["bias"]
    assert torch.equal(last, trainable.module.bias.detach())
    assert best.abs().sum() > 0
    if result.best_step == result.steps:
        assert torch.equal(best, last)
    # finish ran once, on a copy of the validation-best folder that then became best/ as a
    # whole, with the validation edits; its summary is returned.
    assert len(trainable.finished) == 1 and not trainable.finished[0][0].exists()
    assert len(trainable.finished[0][1]) == 2
    assert result.finish == {"edits": 2} and result.tau is result.finish


def test_resume_ends_where_an_uninterrupted_run_ends(tiny_factory, tiny_train, tmp_path):
    def fresh(out_dir, **changes):
        model, processor = tiny_factory("llava")
        return run(BiasTrainable, model, processor, tiny_train, out_dir, **changes)

    straight, straight_result = fresh(tmp_path / "straight")
    first, first_result = fresh(tmp_path / "resumed", max_steps=3)  # "killed" after step 3
    assert first_result.steps == 3 and first.closed == 1
    second, second_result = fresh(tmp_path / "resumed")
    assert second_result.resumed_from == 3 and second_result.steps == 6
    assert not torch.equal(first.module.bias, straight.module.bias)  # it did train on
    assert torch.equal(second.module.bias, straight.module.bias)  # bit for bit
    for folder in ("best", "last"):
        a = load_file(str(tmp_path / "straight" / folder / BIAS_FILE))["bias"]
        b = load_file(str(tmp_path / "resumed" / folder / BIAS_FILE))["bias"]
        assert torch.equal(a, b), folder
    logs = [
        json.loads((tmp_path / d / "train_log.json").read_text()) for d in ("straight", "resumed")
    ]
    untimed = [  # the wall time trained differs between the runs, nothing else
        [{k: v for k, v in e.items() if k != "elapsed_s"} for e in log["entries"]] for log in logs
    ]
    assert untimed[0] == untimed[1]
    assert second_result.best_score == straight_result.best_score


def test_checkpoint_of_another_method_is_refused(tiny_factory, tiny_train, tmp_path):
    model, processor = tiny_factory("llava")
    run(BiasTrainable, model, processor, tiny_train, tmp_path, max_steps=3)
    other = OtherBias(model, processor)
    with pytest.raises(CheckpointMismatch, match="another method.*'logit-bias'.*'other-bias'"):
        train(other, model, processor, tiny_train, settings=settings(), out_dir=tmp_path,
              progress=False)
    assert other.closed == 1 and all(p.requires_grad for p in model.parameters())
    # Another run meta of the same method is refused too, naming the key.
    class Wider(BiasTrainable):
        def run_meta(self):
            return {**super().run_meta(), "vocab": self.vocab + 1}

    with pytest.raises(CheckpointMismatch, match="vocab: checkpoint"):
        run(Wider, model, processor, tiny_train, tmp_path)
    # A checkpoint that names no method (written before the loop served several) is DualEdit's
    # by definition and matches: the legacy rule is "no method key, no method check".
    rewrite_json(checkpoint_dir(tmp_path) / STATE_FILE, lambda record: record["meta"].pop("method"))
    _, resumed = run(BiasTrainable, model, processor, tiny_train, tmp_path, max_steps=4)
    assert resumed.resumed_from == 3 and resumed.steps == 4


def test_trainables_that_do_not_fit_are_refused(tiny_factory, tiny_train, tmp_path):
    model, processor = tiny_factory("llava")

    class Stray(BiasTrainable):
        def parameters(self):
            yield from self.module.parameters()
            yield nn.Parameter(torch.zeros(2))  # trained but never checkpointed

    class Clash(BiasTrainable):
        def loss(self, batch):
            total, terms = super().loss(batch)
            return total, {**terms, "lr": terms["l2"]}

    class Meta(BiasTrainable):
        def run_meta(self):
            return {**super().run_meta(), "settings": {}}

    for make, message in ((Stray, "not in its module"), (Clash, r"may not be named \['lr'\]"),
                          (Meta, r"may not set \['settings'\]")):
        trainable = make(model, processor)
        with pytest.raises(ValueError, match=message):
            train(trainable, model, processor, tiny_train, settings=settings(),
                  out_dir=tmp_path / make.__name__, progress=False)
        assert trainable.closed == 1, make.__name__
    with pytest.raises(TypeError, match="not a Trainable"):
        train(object(), model, processor, tiny_train, out_dir=tmp_path / "x", progress=False)
    assert all(p.requires_grad for p in model.parameters())
