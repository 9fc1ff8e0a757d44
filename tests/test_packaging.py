"""Packaging: the kernels install as entropy_gpu.kernels, never as a top-level
`kernels` module (transformers probes for Hugging Face's `kernels` by that name)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import entropy_gpu

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_subpackage_and_no_top_level_kernels():
    import entropy_gpu.kernels.token_stats as ts

    assert Path(ts.__file__).parent.name == "kernels"
    assert importlib.util.find_spec("kernels") is None


def test_transformers_does_not_see_a_kernels_package(tmp_path):
    code = ("import importlib.util, entropy_gpu.kernels; "
            "from transformers.utils import is_kernels_available; "
            "print(importlib.util.find_spec('kernels') is None, is_kernels_available())")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["True", "False"]


def test_public_api_has_docstrings_and_version():
    assert entropy_gpu.__version__
    for name in entropy_gpu.__all__:
        obj = getattr(entropy_gpu, name)
        if callable(obj):
            assert obj.__doc__ and len(obj.__doc__) > 20, name
