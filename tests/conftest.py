"""pytest's hooks and fixtures for the whole suite: the Triton interpreter without a GPU, GPU skipping, per-test seeds
from the run's seed, the extension rule (tests marked ``extension``), the one-thread fixture. What tests share beyond hooks and fixtures (the tolerance rule, the
check functions of each op, tiny models and runs) lives in tests/helpers/.

Inputs are fresh random each run: the seed comes from BLIPFAST_TEST_SEED or is drawn at start-up and
printed in pytest's header, so a failure can be replayed with BLIPFAST_TEST_SEED=<seed>.
"""
from __future__ import annotations

import os
import random

import pytest
import torch

# Without a GPU the Triton kernels run under Triton's interpreter on CPU tensors. The variable must be
# set before any kernel module is imported (triton.jit reads it at decoration time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The first-use self-test of the fused kernels (docs/selftest.md) is off in the suite, so that a test on a GPU
# counts, times and syncs only what it runs itself; tests/selftest/ switches it on where it is the subject.
os.environ.setdefault("BLIPFAST_SELFTEST", "0")

from tests.helpers.runtime import HAS_CUDA  # noqa: E402  (after TRITON_INTERPRET)
from tests.helpers.runtime import extension_setup  # noqa: E402
from tests.helpers.tolerance import SEED  # noqa: E402


def pytest_report_header(config):
    return f"blipfast test seed: {SEED} (replay with BLIPFAST_TEST_SEED={SEED})"


def pytest_configure(config):
    config.addinivalue_line("markers", "extension: needs the compiled extension blipfast._C (require_extension: "
                                       "skips without it on a machine without a CUDA device, fails with a CUDA device)")


def pytest_runtest_setup(item):
    extension_setup(item)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed(request):
    """Seed torch/random per test from the run seed and the test's name (fresh each run, replayable)."""
    s = (SEED * 1000003 + sum(map(ord, request.node.nodeid))) % 2**31
    torch.manual_seed(s)
    random.seed(s)
    yield


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (``pytestmark = pytest.mark.usefixtures("one_thread")`` in the modules of
    tiny models): tiny ops run faster on one thread, much faster on a shared, loaded machine, and runs are
    bit-identical."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
