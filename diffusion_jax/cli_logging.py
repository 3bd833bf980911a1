"""Logging set-up and flag parsing shared by the command-line entry points (train.py, evaluate.py,
sample.py, ...)."""

from __future__ import annotations

import logging as std_logging
import sys

from absl import app, logging


class WarningsOnlyFromOrbax(std_logging.Filter):
    """Orbax logs several INFO lines per checkpoint; keep its warnings and errors only."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def quiet_orbax() -> None:
    """Drops Orbax's INFO lines from absl's log handler (call at the start of ``main``)."""
    handler = logging.get_absl_handler()
    if not any(isinstance(f, WarningsOnlyFromOrbax) for f in handler.filters):
        handler.addFilter(WarningsOnlyFromOrbax())


def parse_config_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, after checking the ``--config.a.b`` overrides against the config's keys
    (ml_collections answers a misspelt section with a bare KeyError); ``app.run``'s ``flags_parser``."""
    from diffusion_jax import config_utils

    try:
        config_utils.check_command_line(argv)
    except config_utils.ConfigError as e:
        sys.exit(f"FATAL Flags parsing error: {e}")
    return app.parse_flags_with_usage(argv)
