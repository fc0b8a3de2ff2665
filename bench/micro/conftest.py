"""pytest-benchmark under the project's `filterwarnings = ["error"]`.

pytest-benchmark reports its own conditions as `PytestBenchmarkWarning`: nothing saved yet to
`--benchmark-compare` against, a saved run from a different machine, a benchmark that failed
before it timed anything. As errors they abort the session (`INTERNALERROR`) or pile a second
error onto a failed benchmark, so here they are shown as warnings instead. Every other warning
is still an error.
"""

from __future__ import annotations

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    # Appended after the ini's "error", so it takes precedence; read when the warnings plugin
    # and pytest-benchmark configure, both of which run after this hook.
    config.addinivalue_line(
        "filterwarnings", "default::pytest_benchmark.logger.PytestBenchmarkWarning"
    )
