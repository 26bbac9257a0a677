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


def test_main_refuses_a_malformed_huge_page_setting(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    called: list[bool] = []
    monkeypatch.setattr(cli, "app", lambda: called.append(True))
    monkeypatch.setenv("NUMPY_MADVISE_HUGEPAGE", "abc")
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 1 and not called
    err = capsys.readouterr().err
    assert err.startswith("error: environment variable NUMPY_MADVISE_HUGEPAGE: expected 0 or 1")


def test_trap_signals_turns_sighup_into_an_interrupt_unless_nohup() -> None:
    import signal

    from lymph.signals import Terminated, trap_signals

    old = signal.getsignal(signal.SIGHUP)
    try:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        with pytest.raises(Terminated) as e, trap_signals():
            signal.raise_signal(signal.SIGHUP)
        assert e.value.exit_code == 129 and isinstance(e.value, KeyboardInterrupt)
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL  # restored on the way out
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # `nohup lymph ...`: stays ignored
        with trap_signals():
            signal.raise_signal(signal.SIGHUP)  # nothing happens
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, old)
