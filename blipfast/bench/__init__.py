"""Benchmarks behind ``blipfast bench`` and ``pytest benchmarks/``: one module per capability, each
exposing ``cases(config)`` (what to time) built on the timing core in ``common``."""
