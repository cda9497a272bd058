"""The benchmark and evaluation harness of a gradprobe source checkout; never installed with the package.

``harness/`` holds what every benchmark shares (timing, CPU-load checks, environment, result files,
the peers runner); the modules beside it are the benchmarks and evaluations, and ``cli.py`` is what
``gradprobe bench`` / ``gradprobe eval`` forward to.
"""
