"""Progress bars (horse_pl.progress): silent unless shown, one bar per stage, inner bars transient, CI quiet."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from horse_pl import progress


def _console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=False, width=120), out


def test_track_yields_every_item_with_or_without_bars():
    assert list(progress.track(iter(range(5)), "plain")) == [0, 1, 2, 3, 4]
    console, out = _console()
    with progress.shown(True, console):
        assert list(progress.track(range(5), "counted")) == [0, 1, 2, 3, 4]
        with progress.task("whole", None) as advance:
            advance()
    text = out.getvalue()
    assert "counted" in text and "5/5" in text and "whole" in text


def test_without_shown_nothing_is_written(capsys):
    with progress.task("quiet", 3) as advance:
        advance()
    list(progress.track(range(3), "quiet"))
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_inner_bars_go_away_and_outer_bars_stay():
    console, _ = _console()
    with progress.shown(True, console):
        bars = progress._shown.get()
        for _ in progress.track(range(2), "turns"):
            for _ in progress.track(range(3), "capture"):
                pass
            assert [t.description for t in bars.tasks] == ["turns"]
        list(progress.track(range(2), "save"))
        assert [(t.description, t.completed) for t in bars.tasks] == [("turns", 2), ("save", 2)]


def test_a_stage_left_by_an_error_stays_where_it_stopped():
    console, _ = _console()
    with progress.shown(True, console):
        bars = progress._shown.get()
        with pytest.raises(RuntimeError):
            for i in progress.track(range(4), "capture"):
                if i == 2:
                    raise RuntimeError("boom")
        assert bars.tasks[0].completed == 2 and bars.tasks[0].total == 4


@pytest.mark.parametrize("ci, tty, expected", [("true", True, False), ("", True, True), ("", False, False),
                                               ("0", True, True)])
def test_bars_are_wanted_on_a_terminal_outside_ci(monkeypatch, ci, tty, expected):
    monkeypatch.setenv("CI", ci)
    monkeypatch.setattr("sys.stderr.isatty", lambda: tty, raising=False)
    assert progress.wanted() is expected


def test_shown_off_and_nested_shown_keep_one_display():
    console, out = _console()
    with progress.shown(False, console):
        list(progress.track(range(2), "hidden"))
    assert out.getvalue() == ""
    with progress.shown(True, console):
        outer = progress._shown.get()
        with progress.shown(True):
            assert progress._shown.get() is outer
