"""Jitted programs kept for the life of the process, keyed by the configuration they are built
from. Training, evaluating or predicting again in one process (a notebook, a sweep, the
Predictor made twice, the test suite) then reuses the traced and compiled program: a new
`jax.jit` of the same model traces it again (2-5 s for the tiny test model, more at full
size), lowers it and fetches or compiles the executable, even with the persistent cache.

A key holds everything the program's code depends on; shapes and dtypes are not part of it, as
jit keys its compiled programs on them itself. The oldest entries go beyond MAX_ENTRIES."""
from __future__ import annotations

import collections
from typing import Any, Callable, Hashable

MAX_ENTRIES = 32
_entries: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()


def section_key(section) -> str:
    """A ConfigDict section (or a plain value) as a canonical string: equal configs, equal keys."""
    if hasattr(section, "to_json_best_effort"):
        return section.to_json_best_effort(sort_keys=True)
    return repr(section)


def get(key: Hashable, build: Callable[[], Any]) -> Any:
    """The entry for key, built by build() the first time."""
    if key in _entries:
        _entries.move_to_end(key)
        return _entries[key]
    value = _entries[key] = build()
    while len(_entries) > MAX_ENTRIES:
        _entries.popitem(last=False)
    return value


def clear() -> None:
    """Forget every entry (their compiled programs go when nothing else holds them)."""
    _entries.clear()


def frozen_module(module):
    """A copy of a Flax module built on a copy of its config: a module reads its ConfigDict
    when traced, and a kept program may be traced again (for new shapes) after the caller
    changed that ConfigDict."""
    return type(module)(module.cfg.copy_and_resolve_references())
