import io
import logging

from rich.console import Console

from bridge.logs import setup_logging
from bridge.stats import Stats
from bridge.status_ui import live_status


def test_log_lines_print_above_the_live_panel_never_through_it(capsys):
    setup_logging(0, None, [])
    terminal = io.StringIO()
    console = Console(file=terminal, force_terminal=True, width=100)
    try:
        with live_status(Stats(), enabled=True, console=console):
            logging.getLogger("bridge").info("a line while the panel shows")
        logging.getLogger("bridge").info("a line after the panel")
    finally:
        setup_logging(0, None, [])
    shown = terminal.getvalue()
    # Through the panel's console (which prints it above the panel), not written beside it on stderr.
    assert "a line while the panel shows" in shown and "uptime" in shown
    err = capsys.readouterr().err
    assert "a line while the panel shows" not in err and "a line after the panel" in err


def test_no_panel_without_a_terminal():
    assert type(live_status(Stats(), enabled=True)).__name__ == "nullcontext"
