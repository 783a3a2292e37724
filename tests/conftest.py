"""Test setup: Triton's interpreter when no GPU is visible, offline data, seeds, skip markers.

TRITON_INTERPRET must be set before triton is first imported, so this runs at collection start.
"""
import os
import sys
from pathlib import Path

# The repo root on sys.path: tests import the project's packages and each other's helpers
# (tests.numerics), also when pytest is started from another folder or the project is not installed.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before tests/conftest.py could set TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"

# Offline copies of the data the project downloads on a user's machine (see ../shared/data/README.md).
_shared = Path(__file__).resolve().parents[2] / "shared" / "data"
if _shared.is_dir():
    os.environ.setdefault("GPT2_DATA_CACHE", str(_shared))
    if (_shared / "tiktoken_cache").is_dir():
        os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(_shared / "tiktoken_cache"))

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRET:  # one clear message instead of hundreds of InterpreterErrors
    from kernels import interpreter_incompatibility  # noqa: E402

    if interpreter_incompatibility():
        pytest.exit(f"cannot run the kernel tests on the CPU: {interpreter_incompatibility()}", returncode=2)
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def device():
    """Where kernels run: the GPU when there is one, else the CPU (Triton in its interpreter)."""
    return "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: with 2+ threads on a busy 2-core CI box, thread hand-offs cost more than the math
    (seen: a plain reference 10x slower). Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
