"""Errors of `raylign.models`, in a module of their own so that `registry` and `builtin` (which
`registry` calls to build `builtin:` models) can both import them without importing each other."""

from __future__ import annotations

from raylign.errors import UserError


class ModelNotFoundError(UserError, ValueError):
    """A model name that resolves to nothing; the message lists names that work offline."""
