"""Host memory stays flat as the data grows: 20k and 200k streamed samples, peak RSS within 50 MB."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers.runtime import ROOT


def _peak(shards: int, per: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-m", "tests.helpers.stream_rss", str(shards), str(per)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_rss_does_not_grow_with_the_number_of_samples():
    small, large = _peak(2, 10_000), _peak(20, 10_000)
    assert (small["samples"], large["samples"]) == (20_000, 200_000)
    assert large["maxrss_mb"] - small["maxrss_mb"] < 50, (small, large)
    # the resume state holds the shuffle buffer's positions and generator, not anything per sample streamed
    assert small["state_bytes"] < 100_000 and large["state_bytes"] < 100_000
