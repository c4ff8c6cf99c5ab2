"""Every `dualedit ...` line in the README's code blocks parses with the real command line (so
a renamed flag or subcommand cannot leave the README behind)."""

import shlex
from pathlib import Path

import pytest

from dualedit.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[str]:
    lines, fence, block = [], None, []
    for raw in README.read_text(encoding="utf-8").splitlines():
        if raw.startswith("```"):
            if fence is None:
                fence, block = raw[3:].strip(), []
            else:
                if fence in ("", "bash", "sh"):
                    joined = "\n".join(block).replace("\\\n", " ")
                    lines += [line.split("  #", 1)[0].strip() for line in joined.splitlines()]
                fence = None
        elif fence is not None:
            block.append(raw)
    return [line for line in lines if line.startswith("dualedit ")]


def test_the_readme_has_commands():
    assert len(readme_commands()) >= 10


@pytest.mark.parametrize("line", readme_commands())
def test_readme_command_parses(line):
    args = shlex.split(line)[1:]
    parsed = build_parser().parse_args(args)
    assert callable(parsed.func)
