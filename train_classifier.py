r"""Train a noise-aware classifier for classifier guidance.

    python train_classifier.py --config configs/digits_classifier.py --workdir /tmp/digits_classifier

Resumes from ``<workdir>/checkpoints`` when rerun (SIGTERM saves and stops: rerun to continue);
override config keys on the command line, e.g. ``--config.train.num_steps=200``. Then guide a
diffusion model with it:
``python sample.py --workdir RUN --classifier_workdir /tmp/digits_classifier --classifier_scale 2``.
"""

from absl import app, flags
from ml_collections import config_flags

from diffusion_jax import cli_logging

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Classifier config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, config.json and eval.json go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cli_logging.quiet_orbax()
    from diffusion_jax import classifier_trainer, sharding

    sharding.initialize_distributed()
    result = classifier_trainer.train_classifier(FLAGS.config, FLAGS.workdir)
    if result["accuracy"] is None:  # stopped by SIGTERM or a preemption notice, after saving
        print(f"stopped at step {result['step']}; run the same command again to continue")
        return
    print(
        "held-out accuracy by timestep: "
        + ", ".join(f"t={t}: {a:.3f}" for t, a in result["accuracy"].items())
    )


if __name__ == "__main__":
    app.run(main, flags_parser=cli_logging.parse_config_flags)
