"""Every example of README.md and docs/*.md runs as written, and prints what the page shows.

Each page runs in a fresh temporary folder, its fenced blocks in page order, one namespace for all its python
blocks (a later block may use the names of an earlier one, as a reader who pastes them one by one would):

- ```python blocks are executed (one torch thread, so printed numbers follow one summation order);
- ```bash blocks are executed command by command in this process (fast: no interpreter start per command):
  ``blipfast ARGS`` runs ``blipfast.cli.main(ARGS)`` and must return 0, ``python -m blipfast.testing.X ARGS``
  runs that module as ``__main__``, ``cd DIR`` and ``head -N FILE`` do what the shell does, ``a && b`` runs both,
  ``\\`` continues a line and ``#`` starts a comment. Any other command in a block that runs fails the test: such
  a block must be marked (below);
- ```yaml blocks are `blipfast train --config` files: each must be a valid one;
- a ```text block right after a block that ran is that block's output (stdout and stderr in order, tqdm bars left
  out) and is compared line by line: numbers with a decimal point within 5 units of their last shown digit (or
  1e-4 of their size: float rounding differs between CPUs), every other character exactly; a number of seconds
  (``4.4 s``) is a timing and not compared.

The pages show what a CPU prints: on a machine with a GPU the test hides it (``torch.cuda.is_available()`` is
false while a page runs), so that the commands' "CUDA when present" defaults pick the CPU there too. The files
that ``python -m blipfast.testing.X DIR`` writes are made once per test session and copied for each page (the
writers are seeded).

A block that must not run here is marked by an HTML comment on the line before its fence (invisible on the
rendered page): ``<!-- docs-test: skip (REASON) -->``, e.g. GPU-only code, pip installs, commands that need real
checkpoints or run for minutes. The README's ``<!-- main-command: ... -->`` / ``<!-- test-command: ... -->``
blocks are the set-up commands that .ci/run itself runs, so they are not run here either. Every ``blipfast ...``
command line of a block that does not run (also after ``torchrun ... -m blipfast.cli``) is still parsed by
blipfast's argument parser, so a renamed or removed flag fails here.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import runpy
import shlex
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from tests.helpers.runtime import ROOT

DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md"] + sorted(DOCS.glob("*.md"))

pytestmark = pytest.mark.skipif(not (DOCS / "index.md").is_file(), reason="docs/ is not here (an sdist): run from "
                                "a checkout")

_FENCE = re.compile(r"^(\s*)```(\w*)\s*$")
_MARK = re.compile(r"^\s*<!--\s*docs-test:\s*(\w+)\s*(.*?)\s*-->\s*$")
_SETUP_MARK = re.compile(r"^<!-- (main-command|test-command):")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
_SECONDS = re.compile(r"\b\d+(?:\.\d+)? s\b")
_TQDM = re.compile(r"\d+%\|")


@dataclass
class Block:
    lang: str
    code: str
    line: int  # 1-based line of the opening fence
    skip: str | None = None  # why the block does not run here
    output: str | None = None  # the ```text block that follows it
    output_line: int = 0


@dataclass
class Page:
    path: Path
    blocks: list = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.relative_to(ROOT).as_posix()


def parse(path: Path) -> Page:
    """The fenced blocks of a page with their skip marks, each ```text block attached to the block before it."""
    lines = path.read_text().splitlines()
    page, i = Page(path), 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m or not m.group(2):
            i += 1
            continue
        indent, lang, start = len(m.group(1)), m.group(2), i
        body = []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        i += 1  # the closing fence
        code = "\n".join(body) + "\n"
        prev = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        if lang == "text" and page.blocks and page.blocks[-1].output is None and prev.strip() == "```" \
                and page.blocks[-1].lang != "text":
            page.blocks[-1].output, page.blocks[-1].output_line = code, start + 1
            continue
        block = Block(lang, code, start + 1)
        mark = _MARK.match(prev)
        if mark:
            verb, reason = mark.groups()
            assert verb == "skip", f"{page.name}:{start}: unknown docs-test mark {verb!r} (known: skip)"
            assert reason.strip("() "), f"{page.name}:{start}: a docs-test skip needs a reason"
            block.skip = reason.strip("() ")
        elif _SETUP_MARK.match(prev):
            block.skip = "a set-up command: .ci/run runs it"
        page.blocks.append(block)
    return page


# ---- running one block --------------------------------------------------------------------------------------


def _commands(code: str) -> list[list[str]]:
    """The commands of a bash block as argument lists (continuations joined, comments dropped, && split)."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            out.append(words[:cut])
            words = words[cut + 1:]
    return [c for c in out if c]


def _blipfast_argv(words: list[str]) -> list[str] | None:
    """The blipfast arguments of a command line (``blipfast ...``, ``python -m blipfast.cli ...``, ``torchrun ...
    -m blipfast.cli ...``), else None."""
    if words[0] == "blipfast":
        return words[1:]
    if "-m" in words and words.index("-m") + 1 < len(words) and words[words.index("-m") + 1] == "blipfast.cli":
        return words[words.index("-m") + 2:]
    return None


def _write_demo(words: list[str], cache: Path) -> None:
    """``python -m blipfast.testing.X ARGS``: the module's files, written once per session (in a folder of the
    cache, run there with the same relative arguments) and copied into the current folder; what it printed too.
    The writers are seeded, so a copy is what a second run would write."""
    key = cache / re.sub(r"[^\w.-]+", "_", shlex.join(words[2:]))
    if not key.is_dir():
        work = Path(str(key) + ".partial")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        old_argv, old_cwd, buf = sys.argv, os.getcwd(), io.StringIO()
        sys.argv = [words[2]] + words[3:]
        try:
            os.chdir(work)
            with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()), \
                    warnings.catch_warnings():
                # runpy warns when the module was imported before (by an earlier example): harmless here
                warnings.simplefilter("ignore", RuntimeWarning)
                runpy.run_module(words[2], run_name="__main__", alter_sys=False)
        finally:
            sys.argv = old_argv
            os.chdir(old_cwd)
        (cache / (key.name + ".out")).write_text(buf.getvalue())
        work.rename(key)
    shutil.copytree(key, ".", dirs_exist_ok=True)
    print((cache / (key.name + ".out")).read_text(), end="")


def _run_command(words: list[str], where: str, cache: Path) -> None:
    from blipfast import cli

    argv = _blipfast_argv(words)
    if argv is not None and words[0] in ("blipfast", "python"):
        rc = cli.main(argv)
        assert rc == 0, f"{where}: `{shlex.join(words)}` exited {rc}"
    elif words[:2] == ["python", "-m"] and len(words) > 2 and words[2].startswith("blipfast.testing."):
        assert all(not os.path.isabs(w) for w in words[3:]), f"{where}: write the demo files to a relative path"
        _write_demo(words, cache)
    elif words[0] == "cd" and len(words) == 2:
        os.chdir(words[1])
    elif words[0] == "head" and len(words) == 3 and re.fullmatch(r"-\d+", words[1]):
        with open(words[2]) as fh:
            for _, line in zip(range(int(words[1][1:])), fh):
                print(line, end="")
    else:
        pytest.fail(f"{where}: the docs test cannot run `{shlex.join(words)}`; mark the block with "
                    f"<!-- docs-test: skip (REASON) --> if it must not run here")


def run_block(block: Block, page: Page, scope: dict, cache: Path) -> str:
    """Run one block; its stdout and stderr, in order."""
    where = f"{page.name}:{block.line}"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        if block.lang == "python":
            exec(compile(block.code, where, "exec"), scope)
        else:
            for words in _commands(block.code):
                _run_command(words, where, cache)
    return buf.getvalue()


def check_config(block: Block, page: Page, folder: Path) -> None:
    """A ```yaml block is a `blipfast train --config` file: read it as the trainer does (unknown keys and wrong
    types are refused)."""
    from blipfast.train.config import read_config_file

    path = folder / f"config-{block.line}.yaml"
    path.write_text(block.code)
    try:
        read_config_file(str(path))
    except ValueError as e:
        pytest.fail(f"{page.name}:{block.line}: not a valid blipfast train config: {e}")


def parse_only(block: Block, page: Page) -> None:
    """Parse every blipfast command line of a block that does not run (argparse exits on an unknown flag)."""
    from blipfast import cli

    for words in _commands(block.code):
        argv = _blipfast_argv(words)
        if argv is not None:
            try:
                cli.build_parser().parse_args(argv)
            except SystemExit as e:
                pytest.fail(f"{page.name}:{block.line}: `{shlex.join(words)}` does not parse ({e})")


# ---- comparing output ---------------------------------------------------------------------------------------


def _normalise(text: str) -> list[str]:
    lines = [ln.rsplit("\r", 1)[-1].rstrip() for ln in text.splitlines()]
    return [_SECONDS.sub("<seconds> s", ln) for ln in lines if ln and not _TQDM.search(ln)]


def _same_line(got: str, want: str) -> bool:
    if _NUMBER.sub("#", got) != _NUMBER.sub("#", want):
        return False
    for g, w in zip(_NUMBER.findall(got), _NUMBER.findall(want)):
        if "." not in w and "e" not in w.lower():
            if g != w:
                return False
            continue
        digits = len(w.split(".")[1].lower().split("e")[0]) if "." in w else 0
        scale = 10 ** int(w.lower().split("e")[1]) if "e" in w.lower() else 1
        if abs(float(g) - float(w)) > max(5 * 10 ** -digits * scale, 1e-4 * abs(float(w))):
            return False
    return True


def check_output(got: str, block: Block, page: Page) -> None:
    got_lines, want_lines = _normalise(got), _normalise(block.output)
    where = f"{page.name}:{block.output_line}"
    shown = "\n".join(got_lines)
    assert len(got_lines) == len(want_lines), f"{where}: {len(got_lines)} lines printed, the page shows " \
                                              f"{len(want_lines)}:\n{shown}"
    for n, (g, w) in enumerate(zip(got_lines, want_lines)):
        assert _same_line(g, w), f"{where}: line {n + 1} differs:\n  printed: {g}\n  page:    {w}\n\n{shown}"


# ---- the tests ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("docs-demo-files")


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_page_examples(path, tmp_path, monkeypatch, demo_cache):
    page = parse(path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BLIPFAST_BACKEND", raising=False)  # the examples show the default dispatch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the pages show what a CPU prints
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    scope: dict = {"__name__": "__docs__"}
    try:
        for block in page.blocks:
            if block.lang == "yaml":
                check_config(block, page, tmp_path)
            if block.lang not in ("python", "bash"):
                continue
            if block.skip:
                parse_only(block, page)
                continue
            out = run_block(block, page, scope, demo_cache)
            if block.output is not None:
                check_output(out, block, page)
    finally:
        torch.set_num_threads(threads)


def test_every_runnable_language_is_known():
    """A typo in a fence's language would silently drop an example from the test."""
    known = {"python", "bash", "text", "yaml", "toml", "json"}
    for path in PAGES:
        for block in parse(path).blocks:
            assert block.lang in known, f"{path.name}:{block.line}: fence language {block.lang!r} (known: {known})"


def test_the_harness_compares_what_it_should():
    """The comparison this module relies on: a changed word or integer fails, float rounding and timings do not."""
    assert _same_line("step 0: loss 4.167, 60984 params", "step 0: loss 4.166, 60984 params")
    assert not _same_line("step 0: loss 4.266, 60984 params", "step 0: loss 4.166, 60984 params")
    assert not _same_line("step 0: loss 4.166, 60985 params", "step 0: loss 4.166, 60984 params")
    assert not _same_line("step 1: loss 4.166", "step 0: loss 4.166")
    assert not _same_line("a red bus", "a blue bus")
    assert _normalise("done in 4.4 s\nx: 100%|###| 4/4\n") == _normalise("done in 1.2 s\n")
    assert _commands("blipfast a --b 'c d' && head -2 f  # note\nblipfast x \\\n  --y\n") == \
        [["blipfast", "a", "--b", "c d"], ["head", "-2", "f"], ["blipfast", "x", "--y"]]
    assert _blipfast_argv(shlex.split("torchrun --nproc-per-node 8 -m blipfast.cli train --steps 2")) == \
        ["train", "--steps", "2"]
