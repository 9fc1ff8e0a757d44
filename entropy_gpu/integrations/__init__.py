"""Trainer integrations. Each module imports its trainer library; import the one you use
(``entropy_gpu.integrations.trl``). Integrations use the public API only, never
``entropy_gpu.kernels``."""

from ._quiet import quiet_known_library_noise

# Before any trainer library is imported (verl imports this package from its plugin hook).
quiet_known_library_noise()
