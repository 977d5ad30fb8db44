"""tests/mutations.py stays runnable: every mutation's text occurs exactly once in the file it
names (a refactor that moves the code must move the mutation too), and every test it expects to
fail exists."""

from __future__ import annotations

import ast

import pytest
from mutations import MUTATIONS, REPO


@pytest.mark.parametrize("mut", MUTATIONS, ids=[m.id for m in MUTATIONS])
def test_mutation_applies_exactly_once(mut):
    assert (REPO / mut.path).read_text().count(mut.old) == 1, mut.path


@pytest.mark.parametrize("mut", MUTATIONS, ids=[m.id for m in MUTATIONS])
def test_mutation_names_existing_tests(mut):
    for node in mut.tests:
        path, name = node.split("::")[0], node.split("::")[1].split("[")[0]
        tree = ast.parse((REPO / path).read_text())
        names = {f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)}
        assert name in names, node
