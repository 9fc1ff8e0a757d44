"""The ``verl.plugins`` entry point of entropy-gpu: verl imports this module on ``import verl``.

It does nothing unless ``ENTROPY_GPU_VERL`` is set (``kernels``: serve verl's entropy /
log-prob functions from entropy_gpu; ``corrpo``: that plus CorR-PO's estimator and hooks).
verl logs a failing plugin only at debug level, so a failure is also logged as a warning.
"""

import logging

from entropy_gpu.integrations.verl import ENV_VAR, plugin

try:
    plugin()
except Exception:
    logging.getLogger(__name__).warning(
        "%s was set but entropy_gpu could not patch verl", ENV_VAR, exc_info=True
    )
    raise
