"""The README's "Python API" code block, run verbatim against a fake cache: a tiny saved LLaVA,
a freshly saved DualEdit editor (with non-zero outputs, so that the edit changes the answer) and a
one-record world file, under a temporary HOME."""

import json
import re
import runpy
from pathlib import Path

import pytest
import torch

from dualedit.editors.dualedit import DualEditor

README = Path(__file__).resolve().parents[1] / "README.md"


def python_api_block() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 1, "the Python API section has exactly one python code block"
    return blocks[0]


@pytest.fixture
def fake_cache(tmp_path, monkeypatch, tiny_factory, tiny_image_dir):
    """~/.cache/dualedit as `make demo` leaves it, with tiny stand-ins, under HOME=tmp_path."""
    cache = tmp_path / ".cache" / "dualedit"
    model, processor = tiny_factory("llava")
    model.save_pretrained(cache / "models" / "llava-seed0")
    processor.save_pretrained(cache / "models" / "llava-seed0")
    editor = DualEditor(model, processor, tau=0.999)
    generator = torch.Generator().manual_seed(1)  # flips the ball question's answer
    with torch.no_grad():
        for adapter in (editor.text_adapter, editor.visual_adapter):
            for p in adapter.out.parameters():
                p.copy_(torch.randn(p.shape, generator=generator))
    editor.save_pretrained(cache / "trained" / "dualedit" / "llava-vqa-seed0" / "best")
    editor.detach()
    world = cache / "world-seed0"
    (world / "images" / "edit").mkdir(parents=True)
    (world / "images" / "edit" / "vqa_eval_00000.png").write_bytes(
        (tiny_image_dir / "red.png").read_bytes()
    )
    record = {
        "src": "what color is the ball?",
        "pred": "red",
        "rephrase": "which color is the ball?",
        "alt": "blue",
        "image": "edit/vqa_eval_00000.png",
        "image_rephrase": "edit/vqa_eval_00000.png",
        "loc": "nq question: what is the capital of the country",
        "loc_ans": "one",
        "m_loc": "edit/vqa_eval_00000.png",
        "m_loc_q": "how many dogs are there?",
        "m_loc_a": "two",
    }
    (world / "vqa").mkdir()
    (world / "vqa" / "vqa_eval.json").write_text(json.dumps([record]), encoding="utf-8")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("DUALEDIT_CACHE", raising=False)
    return cache


def test_readme_python_api_runs_as_written(fake_cache, tmp_path, capsys):
    script = tmp_path / "readme_example.py"
    script.write_text(python_api_block(), encoding="utf-8")
    runpy.run_path(str(script), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    answers = {line.split(":", 1)[0]: line.split(":", 1)[1] for line in lines if ":" in line}
    assert {"before", "after", "disabled", "removed", "ft-l"} <= set(answers)
    before = answers["before"]
    assert answers["after"].split("| target")[0].strip() != before.strip()  # the edit acts
    assert answers["disabled"] == before and answers["removed"] == before
    assert any(
        line.startswith("GateDecision(edit_id=0,") and "edited=True" in line for line in lines
    )
    assert any(line.startswith("[EditInfo(id=0, prompt=") for line in lines)


def test_readme_adding_a_method_registers_it(monkeypatch, tiny_llava, tiny_images, tmp_path):
    import dualedit.editors.registry as registry
    from dualedit.data.requests import EditRequest

    monkeypatch.setattr(registry, "METHODS", dict(registry.METHODS))
    section = README.read_text(encoding="utf-8").split("\n## Adding a method\n", 1)[1]
    (block,) = re.findall(r"```python\n(.*?)```", section.split("\n## ", 1)[0], flags=re.DOTALL)
    script = tmp_path / "adding_a_method.py"
    script.write_text(block, encoding="utf-8")
    namespace = runpy.run_path(str(script), run_name="__main__")
    spec = registry.get_method("my-method")
    assert spec.editor is namespace["MyEditor"] and not spec.trainable
    editor = registry.make_editor("my-method", *tiny_llava, strength=2.0)
    assert editor.config.strength == 2.0
    assert editor.apply([EditRequest("red.png", "what is it?", "a ball")], tiny_images) == [0]
    with pytest.raises(ValueError, match="strenght"):
        registry.make_editor("my-method", *tiny_llava, strenght=2.0)

