"""The examples in module docstrings run, so they cannot drift from the code they show.

A test file rather than `--doctest-modules`: collection then imports only these pure-Python
modules, never a module that needs torch, a broker or a Redis server.
"""

from __future__ import annotations

import doctest

import pytest

from rtrec.model import datasets, histories, metrics

MODULES = [metrics, datasets, histories]


@pytest.mark.parametrize("module", MODULES, ids=[m.__name__ for m in MODULES])
def test_docstring_examples_run(module) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{module.__name__} has no doctests any more"
    assert result.failed == 0, f"{result.failed} of {result.attempted} doctests failed in {module.__name__}"
