"""Fixtures shared by the network test files.

``single_thread`` is opt-in (``pytestmark = pytest.mark.usefixtures("single_thread")``) so that test
files which do not ask for it keep torch's default thread count.
"""

import pytest
import torch


@pytest.fixture
def single_thread():
    """Tiny tensors run many times faster on one thread than on two contended cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
