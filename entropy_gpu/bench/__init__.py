"""The benchmark harness behind ``entropy-gpu bench``: the suite (``suite``), the
implementations compared side by side (``impls``), reports (``report``) and the training
benchmarks (``python -m entropy_gpu.bench.train``)."""
