"""pytest plugin loaded by ``make mutate`` only (``-p tests._mutation_plugin`` in pyproject's ``[tool.mutmut]``).

mutmut forks every mutant's test run from a server process that has collected the tests. OpenMP's thread pool does
not survive a fork: a child that enters a parallel region waits forever at the team barrier for threads that exist
only in the parent. One torch thread (set after ``tests/conftest.py`` has asked for two) keeps every op serial, so
the forked runs never enter a parallel region; with one mutant per core this costs nothing.
"""

from __future__ import annotations

import pytest
import torch


def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    """After the initial conftests (which set two threads), before any test module is imported."""
    _one_thread()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Again before each test, in case a test module changed it at import."""
    _one_thread()
