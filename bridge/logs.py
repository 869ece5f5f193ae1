"""Logging set-up: one format, optional file, and a filter that masks the API key in every record and keeps
every argument on one line (server text that slipped through unsanitised cannot forge log lines or send
escape sequences to the terminal)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from bridge.safe_text import one_line

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
NOISY = ("urllib3", "PIL", "diffusers", "transformers", "httpx", "filelock", "huggingface_hub")


class SecretFilter(logging.Filter):
    """Replaces each secret with *** in the rendered message, whatever code logged it."""

    def __init__(self, secrets: list[str]):
        super().__init__()
        self.secrets = [s for s in secrets if s and len(s) >= 6]

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and record.args:
            record.args = tuple(_one_line_arg(arg) for arg in record.args)
        if not self.secrets:
            return True
        message = record.getMessage()
        masked = message
        for secret in self.secrets:
            masked = masked.replace(secret, "***")
        if masked != message or record.exc_info:
            if record.exc_info:
                text = logging.Formatter().formatException(record.exc_info)
                for secret in self.secrets:
                    text = text.replace(secret, "***")
                masked = f"{masked}\n{text}"
                record.exc_info = None
                record.exc_text = None
            record.msg, record.args = masked, None
        return True


def _one_line_arg(arg: object) -> object:
    """Strings and exceptions (whose text may be anyone's) as one clean line; the rest as it is."""
    if isinstance(arg, str):
        return one_line(arg, None)
    if isinstance(arg, BaseException):
        return one_line(f"{arg}", None)
    return arg


def setup_logging(verbosity: int, log_file: Path | None, secrets: list[str], *, console=None) -> None:
    """verbosity: -1 quiet (warnings), 0 info, 1+ debug."""
    # Per-load progress bars of transformers/huggingface would interleave with the daemon's log lines.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    secret_filter = SecretFilter(secrets)
    handlers: list[logging.Handler] = []
    if console is not None:
        from rich.logging import RichHandler

        handlers.append(RichHandler(console=console, show_path=False, rich_tracebacks=False))
    else:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(logging.Formatter(FORMAT))
        handlers.append(stream)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(logging.Formatter(FORMAT))
        file_handler.setLevel(logging.DEBUG)
        handlers.append(file_handler)
    for handler in handlers:
        handler.addFilter(secret_filter)
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if log_file is not None else level)
    for handler in handlers[: 1]:
        handler.setLevel(level)
    for name in NOISY:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
