"""Logging set-up shared by the command-line entry points (train.py, evaluate.py, sample.py, ...)."""

from __future__ import annotations

import logging as std_logging

from absl import logging


class WarningsOnlyFromOrbax(std_logging.Filter):
    """Orbax logs several INFO lines per checkpoint; keep its warnings and errors only."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def quiet_orbax() -> None:
    """Drops Orbax's INFO lines from absl's log handler (call at the start of ``main``)."""
    handler = logging.get_absl_handler()
    if not any(isinstance(f, WarningsOnlyFromOrbax) for f in handler.filters):
        handler.addFilter(WarningsOnlyFromOrbax())
