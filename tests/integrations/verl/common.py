"""What the verl tests share; imported after their ``pytest.importorskip("verl")``."""

import verl.utils.torch_functional as verl_F

from entropy_gpu.integrations.verl import patching

# verl's own functions, read when the test modules are collected, before any test patches them.
ORIGINALS = {name: getattr(verl_F, name) for name in patching._TORCH_FUNCTIONAL}
