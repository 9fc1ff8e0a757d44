"""The verl.plugins entry point (entropy_gpu.integrations.verl_plugin, running
entropy_gpu.integrations.verl.plugin): nothing unless ENTROPY_GPU_VERL is set."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# verl imports Megatron and Ray, which warn about optional accelerators on a CPU machine.
pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

verl = pytest.importorskip("verl", reason="verl is not installed (bash scripts/setup.sh dev installs it)")

from entropy_gpu.integrations import verl as ev  # noqa: E402
from tests.integrations.verl.common import ORIGINALS  # noqa: E402


def test_plugin_entry_point_does_nothing_unless_enabled():
    # This process imported verl without ENTROPY_GPU_VERL: verl's own functions.
    assert os.environ.get(ev.ENV_VAR, "") == ""
    assert ORIGINALS["entropy_from_logits"].__module__ == "verl.utils.torch_functional"
    code = (
        "import verl, verl.utils.torch_functional as F; from entropy_gpu.integrations import verl as ev; "
        "print(F.entropy_from_logits is ev.entropy_from_logits, "
        "F.logprobs_from_logits is ev.logprobs_from_logits)"
    )
    env = dict(os.environ, ENTROPY_GPU_VERL="kernels")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "True True"


@pytest.mark.parametrize("value", ["corpo", "kernels,corpo", ",", "yes"])
def test_an_unknown_value_is_a_one_line_error_naming_the_valid_ones(value):
    from entropy_gpu.integrations.verl.plugin import PluginValueError, wanted_parts

    with pytest.raises(PluginValueError, match="expected 'kernels'.*'corrpo'") as exc:
        wanted_parts(value)
    assert len(str(exc.value).splitlines()) == 1


@pytest.mark.parametrize(("value", "parts"), [
    ("", set()), (" Off ", set()), ("0", set()), ("1", {"1"}), ("kernels, corrpo", {"kernels", "corrpo"}),
    ("CORRPO", {"corrpo"}),
])
def test_known_values(value, parts):
    from entropy_gpu.integrations.verl.plugin import wanted_parts

    assert wanted_parts(value) == parts


def test_a_typo_stops_import_verl_with_one_line_and_exit_2():
    """verl swallows a plugin's Exception (debug log): a typo must not train without entropy_gpu."""
    code = "import verl; print('imported')"
    env = dict(os.environ, ENTROPY_GPU_VERL="corpo")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2, (out.stdout, out.stderr[-2000:])
    assert "imported" not in out.stdout and "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if "entropy_gpu: error:" in line]
    assert len(errors) == 1 and "'corpo'" in errors[0] and "'kernels'" in errors[0], out.stderr[-2000:]
