"""The ``verl.plugins`` entry point of entropy-gpu: verl imports this module on ``import verl``.

It does nothing unless ``ENTROPY_GPU_VERL`` is set (``kernels``: serve verl's entropy /
log-prob functions from entropy_gpu; ``corrpo``: that plus CorR-PO's estimator and hooks).
verl catches a failing plugin's ``Exception`` and logs it only at debug level, so:

- an unknown value of ``ENTROPY_GPU_VERL`` (a typo such as ``corpo``) prints one error line
  naming the valid values and exits the process with status 2 (``SystemExit`` is not an
  ``Exception``, so verl does not swallow it): the run asked for entropy_gpu and would
  otherwise train without it;
- any other failure to patch is logged as a warning with its traceback, then re-raised.
"""

import logging
import sys

from entropy_gpu.integrations.verl import ENV_VAR, plugin
from entropy_gpu.integrations.verl.plugin import PluginValueError

try:
    plugin()
except PluginValueError as exc:
    print(f"entropy_gpu: error: {exc}", file=sys.stderr, flush=True)
    raise SystemExit(2) from None
except Exception:
    logging.getLogger(__name__).warning(
        "%s was set but entropy_gpu could not patch verl", ENV_VAR, exc_info=True
    )
    raise
