"""The public Python API as a typed host app sees it."""

from __future__ import annotations

import sys
import typing
from collections.abc import Callable
from typing import Any

import pytest
from flask import Blueprint

from flask_llmauth import LLMAuth, require_scope


@pytest.mark.parametrize("scopes", [(), ("",), (["a", "b"],)])
def test_require_scope_refuses_a_check_that_checks_nothing(scopes: tuple[Any, ...]) -> None:
    """``@require_scope()`` (or a list passed as one scope) would let every caller through
    or none; like ``@require_role()`` it fails where it is written."""
    with pytest.raises(ValueError, match="at least one scope"):
        require_scope(*scopes)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="typing.get_overloads is 3.11+")
def test_exempt_returns_what_it_was_given_to_a_type_checker() -> None:
    """``@app.get(...)`` over ``@llmauth.exempt`` type-checks: a view comes back as the same
    callable and a blueprint as the same blueprint (one ``F | Blueprint`` return type was
    refused by mypy as a route's view)."""
    shapes = []
    for overload in typing.get_overloads(LLMAuth.exempt):
        hints = typing.get_type_hints(overload)
        assert hints["view"] is hints["return"]
        shapes.append(hints["return"].__bound__)
    assert sorted(map(repr, shapes)) == sorted(map(repr, [Blueprint, Callable[..., Any]]))
