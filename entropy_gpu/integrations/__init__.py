"""Trainer integrations. Each module imports its trainer library; import the one you use
(``entropy_gpu.integrations.trl``). Integrations use the public API only, never
``entropy_gpu.kernels``."""
