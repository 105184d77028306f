"""The exit codes are defined once (blipfast.options) and the troubleshooting page's table lists exactly them."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from blipfast import options

PAGE = Path(__file__).resolve().parents[2] / "docs" / "troubleshooting.md"


@pytest.mark.skipif(not PAGE.is_file(), reason="docs/ is not here (an sdist)")
def test_the_troubleshooting_page_lists_the_exit_codes():
    codes = {v for k, v in vars(options).items() if k.startswith("EXIT_")}
    assert len(codes) == len([k for k in vars(options) if k.startswith("EXIT_")]), "two names share a code"
    table = {int(m.group(1)) for m in re.finditer(r"^\| *(\d+) *\|", PAGE.read_text(), re.M)}
    assert table == codes | {1}  # 1: Python's own code for an unexpected error
