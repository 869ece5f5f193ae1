"""Periodic statistics in the log, and a live terminal status panel (rich) for interactive runs."""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

from bridge.stats import Stats, family_line

log = logging.getLogger("bridge.stats")


class StatsReporter:
    """Logs Stats.summary_line() every `every_s` seconds until stopped (0 disables it)."""

    def __init__(self, stats: Stats, every_s: float):
        self.stats = stats
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="stats", daemon=True)

    def __enter__(self) -> StatsReporter:
        if self.every_s > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        log.info(self.stats.summary_line())

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            log.info(self.stats.summary_line())


def render(stats: Stats, title: str):
    from rich.markup import escape
    from rich.table import Table

    snap = stats.snapshot()
    table = Table(title=title, show_header=False, expand=False)
    table.add_row("uptime", f"{snap.uptime_s / 60:.1f} min")
    table.add_row("jobs / submits", f"{snap.jobs_done} / {snap.images_done}")
    table.add_row("kudos", f"{snap.kudos:.1f} ({snap.kudos_per_hour:.0f}/h)")
    table.add_row("jobs/hour", f"{snap.jobs_per_hour:.0f}")
    table.add_row("faulted / dropped", f"{snap.faulted} / {snap.dropped}")
    if snap.reward_unknown:
        table.add_row("reward unknown", f"{snap.reward_unknown} delivered, the horde's answer lost")
    for name, family in snap.families.items():
        table.add_row(name, family_line(family))
    table.add_row("in flight", str(snap.in_flight))
    # Model names come from the horde: shown as text, never read as rich markup ("[link=...]").
    table.add_row("last job", escape(snap.last_job) if snap.last_job else "-")
    return table


def live_status(
    stats: Stats, *, enabled: bool, title: str = "AI Horde worker", console=None
) -> AbstractContextManager:
    """A rich Live panel when enabled and stdout is a terminal; otherwise nothing. While it shows, every
    log line goes through the panel's console, printed above the panel: the two never interleave."""
    if console is None and (not enabled or not sys.stdout.isatty()):
        return nullcontext()
    from rich.console import Console
    from rich.live import Live

    class _Renderable:
        def __rich__(self):
            return render(stats, title)

    live = Live(_Renderable(), console=console or Console(), refresh_per_second=1, transient=True)
    return _logs_above(live)


@contextmanager
def _logs_above(live) -> Iterator[None]:
    """Point the terminal's log handlers at the panel's console while it is live (a StreamHandler keeps
    the stream it was given, so Live's own stdout/stderr redirection would not reach it)."""
    import logging

    terminal = (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)  # before Live swaps sys.stderr
    with live:
        moved = []
        for handler in logging.getLogger().handlers:
            if type(handler) is logging.StreamHandler and handler.stream in terminal:
                moved.append((handler, handler.setStream(_ConsoleStream(live.console))))
        try:
            yield
        finally:
            for handler, stream in moved:
                handler.setStream(stream)


class _ConsoleStream:
    """A file-like object that prints whole lines through a rich console (above a Live panel)."""

    def __init__(self, console) -> None:
        self._console = console

    def write(self, text: str) -> int:
        if text.strip():
            self._console.print(text.rstrip("\n"), markup=False, highlight=False, soft_wrap=True)
        return len(text)

    def flush(self) -> None:
        pass
