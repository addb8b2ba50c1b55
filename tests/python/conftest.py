import os
import sys

import pytest

# The module is built into build/python (the README's PYTHONPATH); make running pytest from the
# repository root work without setting it by hand.
_here = os.path.dirname(os.path.abspath(__file__))
_build = os.path.join(_here, "..", "..", "build", "python")
if os.path.isdir(_build) and _build not in sys.path:
    sys.path.insert(0, _build)


def pytest_sessionstart(session):
    """A run asked (QLLM_ISA) for an instruction set this CPU lacks is skipped (exit code 77)."""
    import qllm

    try:
        qllm.info()
    except qllm.Error as e:
        if "not supported" in str(e):
            pytest.exit(f"skipped: {e}", returncode=77)
        raise


@pytest.fixture(autouse=True)
def _seed():
    import numpy as np
    import torch

    np.random.seed(0)
    torch.manual_seed(0)
