"""Test setup: the Triton kernels run on CPU tensors through Triton's interpreter.

TRITON_INTERPRET must be set before any kernel module is imported (triton.jit reads
it at decoration time), hence here, at the top of the first conftest.
"""

import os

# ENTROPY_GPU_TEST_DEVICE=cuda runs the device-aware tests on a GPU, kernels compiled.
if os.environ.get("ENTROPY_GPU_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences a Triton 3.9 notice
os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may come from a model hub at run time

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", deadline=None, max_examples=60, derandomize=True)
settings.register_profile("dev", deadline=None, max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture
def one_thread():
    """One torch thread for the test: on tiny matrices extra OpenMP threads only add
    contention on a shared CPU (LAPACK calls slow down by an order of magnitude under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def cli_model(tmp_path_factory) -> str:
    """A saved tiny Llama with peaked answers and SmolLM2's tokenizer, for CLI runs (read only)."""
    from tests.sia_helpers import peaky_tiny_llama, smollm2_tokenizer

    path = tmp_path_factory.mktemp("tiny-llama-peaky")
    peaky_tiny_llama(seed=7).save_pretrained(path)
    smollm2_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture
def saved_figures(monkeypatch):
    """Every figure saved during the test (after it is drawn)."""
    from matplotlib.figure import Figure

    figures = []
    real = Figure.savefig

    def savefig(fig, *args, **kwargs):
        real(fig, *args, **kwargs)
        figures.append(fig)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return figures


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama saved with SmolLM2's tokenizer (and chat template), loadable by path."""
    from entropy_gpu.analysis.models import load_tokenizer, tiny_llama

    folder = tmp_path_factory.mktemp("tiny")
    tiny_llama(vocab_size=49152, hidden_size=32, layers=2, heads=2).save_pretrained(folder)
    load_tokenizer().save_pretrained(folder)
    return folder
