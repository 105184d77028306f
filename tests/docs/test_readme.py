"""The README's drop-in example runs as written, and its two set-up commands are where .ci/run finds them."""
from __future__ import annotations

import re

from tests.helpers.runtime import ROOT

README = ROOT / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def test_drop_in_example_runs():
    example = next(b for b in _blocks("python") if "Blip2QFormerModel" in b)
    exec(compile(example, "README.md:drop-in", "exec"), {})


def test_exactly_two_setup_commands_marked_for_ci():
    text = README.read_text()
    marked = re.findall(r"<!-- (main-command|test-command):[^\n]*\n```bash\n([^\n]+)\n```", text)
    assert [m[0] for m in marked] == ["main-command", "test-command"]
    main, test = (m[1] for m in marked)
    assert main.endswith("blipfast bench") and "pytest" in test
    assert main.split("&&")[0] == test.split("&&")[0]  # one install prefix: either command sets the machine up
