"""pytest set-up of the benchmark suites: ``pytest benchmarks/ --benchmark`` (the design card's command).

``--benchmark`` runs the suites as benchmarks: pytest-benchmark's ``--benchmark-only``, one table per case
group (its default ``--benchmark-group-by=group``; the harness sets each case's group), and any other
``--benchmark-*`` option of the plugin still applies (``--benchmark-json=...``). Without a CUDA device each
suite is one skip that names the device it needs; without pytest-benchmark installed every suite skips
with that reason instead of erroring on the missing ``benchmark`` fixture. These suites live outside
tests/, so the README's test command (``python -m pytest -q tests``) never collects them.
"""
from __future__ import annotations

import pytest

NO_PLUGIN = ("pytest-benchmark is not installed (pip install pytest-benchmark, or blipfast[bench]): the suites "
             "time with its `benchmark` fixture")


def pytest_addoption(parser):
    parser.getgroup("blipfast").addoption(
        "--benchmark", action="store_true", default=False,
        help="run blipfast's benchmark suites (pytest-benchmark's --benchmark-only, grouped by case group); "
             "without a CUDA device each suite skips with the reason")


def _have_plugin(config) -> bool:
    return config.pluginmanager.hasplugin("benchmark")  # pytest-benchmark's entry point (not -p no:benchmark)


def pytest_configure(config):
    # runs before pytest-benchmark's own pytest_configure (trylast), which reads the option
    if config.getoption("--benchmark") and _have_plugin(config):
        config.option.benchmark_only = True


def pytest_collection_modifyitems(config, items):
    if _have_plugin(config):
        return
    for item in items:
        if "benchmark" in getattr(item, "fixturenames", ()):
            no_device = getattr(item, "callspec", None) is not None and item.callspec.params.get("case", 0) is None
            reason = NO_PLUGIN + ("; the suite also needs a CUDA device (none here)" if no_device else "")
            item.add_marker(pytest.mark.skip(reason=reason))
