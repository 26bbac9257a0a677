"""The ``lymph`` entry point (``lymph.cli:main``)."""

from __future__ import annotations

import os

import pytest

import lymph.cli as cli


def test_main_prefers_small_pages_unless_the_user_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    # numpy reads NUMPY_MADVISE_HUGEPAGE at import: main sets it before any command runs
    # (docs/benchmarks.md, issue 17), a user's own value wins
    seen: list[str | None] = []
    monkeypatch.setattr(cli, "app", lambda: seen.append(os.environ.get("NUMPY_MADVISE_HUGEPAGE")))
    monkeypatch.setenv("NUMPY_MADVISE_HUGEPAGE", "1")
    cli.main()
    monkeypatch.delenv("NUMPY_MADVISE_HUGEPAGE")
    cli.main()
    assert seen == ["1", "0"]
