"""``python -m entropy_gpu.cli`` (and ``torchrun -m entropy_gpu.cli``): the ``entropy-gpu`` command."""

import sys

from . import main

sys.exit(main())
