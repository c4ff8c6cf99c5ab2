"""The harness end to end on tiny LLaVA / BLIP-2 and a tiny MMEdit-format dataset."""

import contextlib
import json

import pytest
import torch

from dualedit.backbones import get_backbone
from dualedit.data.mmedit import MMEditDataset
from dualedit.data.prompts import encode
from dualedit.editors import Editor, make_editor
from dualedit.eval import evaluate, markdown_table, write_results
from dualedit.eval.protocols import checkpoints
from dualedit.eval.scorers import token_accuracy

QUESTIONS = [
    ("what color is the ball", "which colour is the ball", "red.png", "green.png", "blue"),
    ("what shape is the kite", "which shape is the kite", "blue.png", "yellow.png", "star"),
    ("how many dogs are there", "what number of dogs are there", "green.png", "red.png", "3"),
]
ALTS = [question[-1] for question in QUESTIONS]
# (loc, loc_ans, m_loc_q, m_loc_a): different per record, so that batches of them differ.
LOCALITY = [
    ("nq question: what is the capital of the united states", "the city", "what shape is this",
     "square"),
    ("nq question: who was the leader during the mexican civil war", "a man", "what is this",
     "a ball"),
    ("nq question: what sport was supported", "the kite", "how many are in this picture", "2"),
]


def write_dataset(tmp_path, image_dir, hard=True):
    """vqa/vqa_eval.json with three records; images from the conftest's tiny image folder."""
    records = []
    for (src, rephrase, image, image_rephrase, alt), (loc, loc_ans, m_loc_q, m_loc_a) in zip(
        QUESTIONS, LOCALITY
    ):
        raw = {
            "src": src, "pred": "red", "rephrase": rephrase, "alt": alt, "image": image,
            "image_rephrase": image_rephrase, "loc": loc, "loc_ans": loc_ans,
            "m_loc": "yellow.png", "m_loc_q": m_loc_q, "m_loc_a": m_loc_a,
        }
        if hard:
            raw.update(
                hard_m_loc="blue.png", hard_m_loc_q="what color is this", hard_m_loc_a="blue"
            )
        records.append(raw)
    path = tmp_path / "vqa" / "vqa_eval.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(records))
    return MMEditDataset(path, image_root=image_dir)


@pytest.fixture
def dataset(tmp_path, tiny_image_dir):
    return write_dataset(tmp_path, tiny_image_dir)


@pytest.mark.parametrize("scorer", ["paper", "easyedit"])
def test_none_keeps_locality_and_matches_a_direct_forward(tiny_vlm, dataset, scorer):
    model, processor = tiny_vlm.model, tiny_vlm.processor
    editor = make_editor("none", model, processor)
    results = evaluate(model, processor, dataset, editor, scorer=scorer, batch_size=2,
                       progress=False)
    (run,) = results.runs
    assert run.n_edits is None and len(run.records) == 3
    for key in ("t_loc", "m_loc", "m_loc_hard"):
        assert run.means[key] == 100.0, key
    assert set(run.means) == {"rel", "t_gen", "v_gen", "t_loc", "m_loc", "m_loc_hard", "gen_em",
                              "avg"}
    five = [run.means[k] for k in ("rel", "t_gen", "v_gen", "t_loc", "m_loc")]
    assert run.means["avg"] == pytest.approx(sum(five) / 5)
    # Rel per record is the token accuracy of one unbatched forward of the Rel sample.
    backbone = get_backbone(model)
    for position, record in enumerate(dataset):
        batch = encode([dataset.samples(record)["rel"]], processor, backbone, dataset.images)
        with torch.no_grad():
            logits = backbone.forward_logits(model, batch.input_ids, batch.attention_mask,
                                             batch.pixel_values)
        expected = token_accuracy(logits, batch.target_ids, batch.target_mask).item()
        assert run.records[position]["rel"] == pytest.approx(expected)
        # one-token targets: generation exact match agrees with teacher-forced accuracy.
        assert run.records[position]["gen_em"] == expected
    assert results.scorer == scorer and results.method == "none"
    assert results.records_per_s > 0 and results.wall_s > 0


@pytest.mark.parametrize("arch", ["llava", "blip2"])
def test_ft_l_single_raises_rel_and_restores(arch, tiny_factory, dataset):
    model, processor = tiny_factory(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base = evaluate(model, processor, dataset, make_editor("none", model, processor),
                    generation=False, progress=False)
    editor = make_editor("ft-l", model, processor, steps=20, lr=1e-2)
    edited = evaluate(model, processor, dataset, editor, progress=False)
    assert base.runs[0].means["rel"] < 50.0
    assert edited.runs[0].means["rel"] == 100.0
    assert edited.runs[0].means["gen_em"] == 100.0
    assert [r["gen_text"] for r in edited.runs[0].records] == ["blue", "star", "3"]
    assert edited.editor_options["layer"] == 5  # the last decoder layer
    assert edited.editor_options["steps"] == 20 and edited.editor_options["lr"] == 1e-2
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the harness left the weights alone: the unedited scores come out again.
    again = evaluate(model, processor, dataset, make_editor("none", model, processor),
                     generation=False, progress=False)
    assert again.runs[0].records == base.runs[0].records


def test_sequential_reports_per_n(tiny_factory, dataset, tmp_path):
    model, processor = tiny_factory("llava")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    editor = make_editor("ft-l", model, processor, steps=10, lr=1e-2)
    results = evaluate(model, processor, dataset, editor, protocol="sequential",
                       n_values=(1, 2, 10), scorer="easyedit", progress=False)
    assert [run.n_edits for run in results.runs] == [1, 2, 3]
    assert [len(run.records) for run in results.runs] == [1, 2, 3]
    assert [r["index"] for r in results.runs[-1].records] == [0, 1, 2]
    # the first record's edit was made before the others, and they were fine-tuned on top.
    assert results.runs[0].records[0]["rel"] == 1.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    path = write_results(results, tmp_path / "run" / "results.json")
    data = json.loads(path.read_text())
    assert data["protocol"] == "sequential" and data["scorer"] == "easyedit"
    assert data["method"] == "ft-l" and data["editor_options"]["steps"] == 10
    assert data["backbone"]["model_type"] == "llava"
    assert data["dataset"] == {"path": str(dataset.path), "task": "vqa", "split": "eval", "n": 3,
                               "n_total": 3}
    assert data["prompt_protocol"]["name"] == "mmedit-paper-code"
    assert set(data["versions"]) == {"dualedit", "transformers", "torch"}
    assert data["settings"]["n_values"] == [1, 2, 10]
    assert [run["n_edits"] for run in data["runs"]] == [1, 2, 3]
    assert "T-Loc" in markdown_table(results).splitlines()[0]
    rows = markdown_table(results).strip().splitlines()[2:]
    assert [row.split(" | ")[0] for row in rows] == [
        f"| ft-l (seq N={n}) [easyedit]" for n in (1, 2, 3)
    ]


class Recorder(Editor):
    """An identity editor that is not `batched`: records its calls and whether every decoder
    forward runs inside its context."""

    name = "recorder"

    def __init__(self, model, processor, backbone):
        super().__init__(model, processor, backbone)
        self.applied_indices, self.restores, self.inside, self.outside = [], 0, False, 0
        self.batches = []

    def apply(self, requests, images, *, ids=None):
        # The records' targets identify them: the method is given requests, not records.
        self.applied_indices.append([ALTS.index(r.target) for r in requests])
        return self._hold(requests, ids)

    def disabled(self):
        return contextlib.nullcontext()

    def restore(self):
        self.restores += 1

    def context(self, batch):
        editor = self

        class Inside:
            def __enter__(self):
                editor.inside = True
                phase = "edited" if editor.applied_indices else "unedited"
                editor.batches.append((phase, type(batch).__name__, batch.input_ids.clone()))

            def __exit__(self, *exc):
                editor.inside = False

        return Inside()


@pytest.mark.parametrize("protocol", ["single", "sequential"])
def test_identity_editor_scores_exactly_100_and_forwards_run_in_its_context(
    tiny_blip2, dataset, protocol
):
    # BLIP-2's logits change by ~1e-7 with the padding length: unedited references must come
    # from the same batches as the scoring, or ordered top-10 agreement would flip on noise.
    model, processor = tiny_blip2
    backbone = get_backbone(model)
    editor = Recorder(model, processor, backbone)

    def check(module, args):
        if not editor.inside:
            editor.outside += 1

    handle = backbone.decoder_layers(model)[0].register_forward_pre_hook(check)
    try:
        results = evaluate(model, processor, dataset, editor, protocol=protocol, n_values=(1, 3),
                           scorer="easyedit", batch_size=2, progress=False)
    finally:
        handle.remove()
    for run in results.runs:
        for key in ("t_loc", "m_loc", "m_loc_hard"):
            assert run.means[key] == 100.0, (run.n_edits, key)
    assert editor.outside == 0
    assert {kind for _, kind, _ in editor.batches} == {"EncodedBatch", "PromptBatch"}
    # every scored batch holding a locality sample was run, identical, before any edit.
    loc_tokens = torch.tensor(processor.tokenizer.convert_tokens_to_ids(["nq", "this"]))
    references = [ids for phase, _, ids in editor.batches if phase == "unedited"]
    scored = [
        ids for phase, kind, ids in editor.batches
        if phase == "edited" and kind == "EncodedBatch" and torch.isin(ids, loc_tokens).any()
    ]
    assert references and len(scored) >= len(references)
    for ids in scored:
        assert any(ref.shape == ids.shape and torch.equal(ref, ids) for ref in references)
    assert editor.applied_indices == [[0], [1], [2]]
    assert editor.restores >= (4 if protocol == "single" else 2)


def test_limit_and_no_hard_fields(tiny_llava, tmp_path, tiny_image_dir):
    model, processor = tiny_llava
    dataset = write_dataset(tmp_path, tiny_image_dir, hard=False)
    results = evaluate(model, processor, dataset, make_editor("none", model, processor), limit=2,
                       generation=False, progress=False)
    assert results.dataset["n"] == 2 and len(results.runs[0].records) == 2
    assert "m_loc_hard" not in results.runs[0].means and "gen_em" not in results.runs[0].means
    assert "Hard M-Loc" not in markdown_table(results)


def test_argument_errors(tiny_llava, dataset):
    model, processor = tiny_llava
    editor = make_editor("none", model, processor)
    with pytest.raises(ValueError, match="unknown protocol"):
        evaluate(model, processor, dataset, editor, protocol="batch")
    with pytest.raises(ValueError, match="unknown scorer"):
        evaluate(model, processor, dataset, editor, scorer="rouge")
    with pytest.raises(ValueError, match="another model"):
        evaluate(object(), processor, dataset, editor)
    with pytest.raises(ValueError, match="limit"):
        evaluate(model, processor, dataset, editor, limit=0)


def test_checkpoints():
    assert checkpoints((1, 10, 100), 25) == [1, 10, 25]
    assert checkpoints((10, 1, 10), 100) == [1, 10]
    with pytest.raises(ValueError):
        checkpoints((0,), 5)
    with pytest.raises(ValueError):
        checkpoints((), 5)
