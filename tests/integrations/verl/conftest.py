"""The ``patched`` fixture of the verl tests: verl served by entropy_gpu for one test."""

import pytest


@pytest.fixture
def patched():
    from entropy_gpu.integrations.verl import patch_verl, unpatch_verl

    unpatch_verl()
    names = patch_verl()
    yield names
    unpatch_verl()
