"""The one-thread fixture of the tests that run tiny retrieval models (the models and data are
blipfast.testing.retrieval's)."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Autouse in the modules that import it: tiny ops run faster on one intra-op thread, much faster on a shared,
    loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
