"""`edit_and_ask` (the `dualedit edit` command) on saved tiny LLaVA / BLIP-2 folders with saved
adapters: answers before and after, the gate's decision per question, prompts, argument errors."""

import math
import subprocess
import sys

import pytest
import torch

from dualedit.cli import main
from dualedit.editing import edit_and_ask, question_prompt
from dualedit.editors.dualedit import DualEditor

QUESTION = "what color is the ball?"
UNRELATED = "how many dogs are there in the picture?"


@pytest.fixture(scope="module", params=["llava", "blip2"])
def saved(request, tmp_path_factory):
    """(model folder, adapter folder) of a tiny model and adapters with non-zero outputs (seed 1
    flips the ball question's answer on both tiny models), tau 0.999."""
    from conftest import TINY_BUILDERS

    root = tmp_path_factory.mktemp(f"saved_{request.param}")
    model, processor = TINY_BUILDERS[request.param]()
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    editor = DualEditor(model, processor, tau=0.999)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for adapter in (editor.text_adapter, editor.visual_adapter):
            for p in adapter.out.parameters():
                p.copy_(torch.randn(p.shape, generator=generator))
    editor.save_pretrained(root / "adapters")
    editor.detach()
    return root / "model", root / "adapters"


def test_question_prompt():
    assert question_prompt("What is it?") == "What is it? The answer is:"
    assert question_prompt(" What is it? the answer is: ") == "What is it? the answer is:"
    assert question_prompt("a photo of", task="caption") == "a photo of"
    with pytest.raises(ValueError, match="non-empty"):
        question_prompt("  ")
    with pytest.raises(ValueError, match="unknown task"):
        question_prompt("x", task="vqa2")


def test_edit_and_ask_reports_before_after_and_the_gate(saved, tiny_image_dir):
    model_dir, adapter_dir = saved
    red, blue = tiny_image_dir / "red.png", tiny_image_dir / "blue.png"
    rows = edit_and_ask(
        model_dir, adapter_dir, red, QUESTION, "blue",
        questions=[QUESTION, UNRELATED], ask_images=[red, blue], max_new_tokens=4,
    )  # fmt: skip
    related, unrelated = rows
    assert related["prompt"] == QUESTION + " The answer is:" and related["image"] == str(red)
    assert related["edited"] and related["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert related["after"] != related["before"]
    assert not unrelated["edited"] and unrelated["similarity"] < 0.999
    assert unrelated["after"] == unrelated["before"]
    assert all(isinstance(row["before"], str) and row["before"] for row in rows)
    # Default: the edit's own question on the edit's image.
    (own,) = edit_and_ask(model_dir, adapter_dir, red, QUESTION, "blue", max_new_tokens=4)
    assert own["question"] == QUESTION and own["after"] == related["after"]


def test_cli_edit_prints_the_report(saved, tiny_image_dir, capsys):
    model_dir, adapter_dir = saved
    code = main([
        "edit", "--model", str(model_dir), "--editor", str(adapter_dir),
        "--image", str(tiny_image_dir / "red.png"), "--prompt", QUESTION, "--target", "blue",
        "--max-new-tokens", "3",
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "before:" in out and "after:" in out and "(gate similarity 1.000, edited)" in out


def test_edit_and_ask_rejects_bad_arguments(saved, tiny_image_dir):
    model_dir, adapter_dir = saved
    red = tiny_image_dir / "red.png"
    with pytest.raises(ValueError, match="max_new_tokens"):
        edit_and_ask(model_dir, adapter_dir, red, QUESTION, "blue", max_new_tokens=0)
    with pytest.raises(ValueError, match="2 images for 3 questions"):
        edit_and_ask(
            model_dir, adapter_dir, red, QUESTION, "blue",
            questions=["a?", "b?", "c?"], ask_images=[red, red],
        )  # fmt: skip
    with pytest.raises(FileNotFoundError, match="missing.png"):
        edit_and_ask(model_dir, adapter_dir, tiny_image_dir / "missing.png", QUESTION, "blue")
    with pytest.raises(ValueError, match="target"):
        edit_and_ask(model_dir, adapter_dir, red, QUESTION, " ")


def test_text_only_edit(saved):
    model_dir, adapter_dir = saved
    (row,) = edit_and_ask(
        model_dir, adapter_dir, None, "what is the capital of the country?", "one",
        max_new_tokens=2,
    )  # fmt: skip
    assert row["image"] is None and row["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert row["edited"] and not math.isnan(row["similarity"])


def test_package_root_exports_lazily():
    code = (
        "import sys, dualedit\n"
        "assert 'torch' not in sys.modules, 'import dualedit pulled in torch'\n"
        "from dualedit import DualEditConfig, DualEditor, TrainSettings, load_vlm, train_dualedit\n"
        "from dualedit.editors.dualedit import DualEditor as Inner\n"
        "assert DualEditor is Inner and callable(load_vlm) and callable(train_dualedit)\n"
        "assert {'DualEditor', 'load_vlm', 'edit_and_ask'} <= set(dir(dualedit))\n"
        "try:\n    dualedit.DualEdit\nexcept AttributeError:\n    pass\n"
        "else:\n    raise SystemExit('unknown name resolved')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_an_untrained_method_edits_without_a_folder(saved, tiny_image_dir, capsys):
    model_dir, _ = saved
    red = tiny_image_dir / "red.png"
    rows = edit_and_ask(
        model_dir, None, red, QUESTION, "blue", max_new_tokens=1, method="ft-l",
        options={"steps": 30, "lr": 0.05},
    )
    assert rows[0]["after"] == "blue" != rows[0]["before"]  # the fine-tuned MLP answers
    assert rows[0]["edited"] is None and math.isnan(rows[0]["similarity"])  # no gate to ask
    args = ["-q", "edit", "--model", str(model_dir), "--method", "ft-l", "--option", "steps=30",
            "--option", "lr=0.05", "--image", str(red), "--prompt", QUESTION, "--target", "blue",
            "--max-new-tokens", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "after:  'blue'" in out and "gate similarity" not in out
    # A trained method needs its folder; the error comes before the model is loaded.
    assert main(["-q", "edit", "--model", "nowhere", "--method", "dualedit", "--prompt", "q",
                 "--target", "t"]) == 2
    assert "--editor DIR" in capsys.readouterr().err
