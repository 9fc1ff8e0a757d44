"""Per-token parameter-gradient measures of the sampled token's raw logit: the exact one
(``exact``: one backward per token, for small models; ``batched_exact``: the same norms for a
whole padded batch from vmapped backwards), its fast estimates (``estimate``:
forward-mode JVPs, same-position backward) and what both share (``model_parts``).
CorR-PO (``entropy_gpu.corrpo``) and the analyses (``entropy_gpu.analysis``) import them
from here. Imports torch only, never ``entropy_gpu.kernels``."""
