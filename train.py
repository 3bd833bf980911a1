r"""Train a DDPM: ``python train.py --config configs/digits.py --workdir /tmp/diffusion_digits``.

Override config entries with ``--config.train.num_steps=500`` etc. The same command runs on a CPU,
a GPU, a TPU VM and every host of a multi-host slice; all the work is in
:func:`diffusion_jax.trainer.train_and_evaluate`.
"""

import logging as std_logging

from absl import app, flags, logging
from ml_collections import config_flags

from diffusion_jax import sharding

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Training config file (configs/*.py).", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and sample pictures.")
flags.mark_flags_as_required(["config", "workdir"])


class _WarningsOnlyFromOrbax(std_logging.Filter):
    """Orbax logs several INFO lines per checkpoint; keep its warnings and errors only."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_WarningsOnlyFromOrbax())
    sharding.initialize_distributed()  # before any other JAX call
    from diffusion_jax import trainer

    logging.info("Config:\n%s", FLAGS.config)
    trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
