r"""Train a DDPM: ``python train.py --config configs/digits.py --workdir /tmp/diffusion_digits``.

The config's kind picks the trainer (:func:`diffusion_jax.trainers.train`): a diffusion model (on
the data, or with a ``latent`` section on an autoencoder's latents, e.g.
``configs/digits_latent.py``), the KL autoencoder of latent diffusion (an ``autoencoder``
section, e.g. ``configs/digits_autoencoder.py``) or a noise-aware classifier (a ``classifier``
section).

Override config entries with ``--config.train.num_steps=500`` etc. The same command runs on a CPU,
a GPU, a TPU VM and every host of a multi-host slice (``jax.distributed`` starts by itself on
Cloud TPU and under Slurm; elsewhere pass ``--coordinator_address``, ``--num_processes`` and
``--process_id``); all the work is in the trainer (for a diffusion model
:func:`diffusion_jax.trainer.train_and_evaluate`). The workdir may be a bucket (``gs://bucket/run``). ``--xla_dump_to DIR`` writes the compiled XLA
programs (HLO) to a local folder; ``--config.profile.num_steps=5`` traces five steps of a diffusion
run for TensorBoard's profile plugin.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from diffusion_jax import cli_logging, sharding

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Training config file (configs/*.py).", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and sample pictures.")
flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0, for multi-process runs that JAX does not detect (not Cloud TPU or Slurm).",
)  # fmt: skip
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's id, 0..num_processes-1.")
flags.DEFINE_string(
    "xla_dump_to", None,
    "Local folder for XLA's HLO dumps of every compiled program (adds --xla_dump_to to XLA_FLAGS).",
)  # fmt: skip
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cli_logging.quiet_orbax()
    if FLAGS.xla_dump_to:  # read when the backend starts, i.e. at the first JAX call below
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={FLAGS.xla_dump_to}"
        ).strip()
    sharding.initialize_distributed(  # before any other JAX call
        FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
    )
    from diffusion_jax import env, trainers

    for hint in (env.cpu_malloc_hint(), env.cpu_xla_flags_hint()):
        if hint:
            logging.warning("%s.", hint)
    logging.info("Config:\n%s", FLAGS.config)
    trainers.train(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main, flags_parser=cli_logging.parse_config_flags)
