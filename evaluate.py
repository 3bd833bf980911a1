r"""Evaluate a trained DDPM: ``python evaluate.py --workdir /tmp/diffusion_digits``.

Computes the chosen metrics for the EMA weights of the newest readable (or ``--checkpoint_step``)
checkpoint (a damaged newest one is skipped with a warning naming it), prints them beside their
data-vs-data floors, and writes them to ``<workdir>/eval/step_<step>_<sampler><steps>.json`` and
TensorBoard (``<workdir>/tensorboard``, tags ``eval/...``). All the work is in :func:`diffusion_jax.evaluation.pipeline.evaluate_workdir`.

    python evaluate.py --workdir /tmp/diffusion_digits --metrics fd,pr,bpd --sampler ddim --num_steps 50
    python evaluate.py --workdir /tmp/diffusion_digits --sampler ddpm --num_steps 0   # all T steps
    python evaluate.py --workdir /tmp/diffusion_dino --metrics ed,swd,fd,pr          # 2-D points
    python evaluate.py --workdir /tmp/cifar --metrics fd --num_samples 50000 \
        --inception_weights ~/pt_inception.npz --export                               # FID + npz/PNGs
    python evaluate.py --workdir /tmp/cifar --metrics fd --num_samples 50000 \
        --inception_weights ~/pt_inception.npz --reference_stats ~/fid_stats_cifar10_train.npz
"""

import json
import sys

from absl import app, flags, logging

from diffusion_jax import cli_logging
from diffusion_jax.sampling.solvers import SAMPLERS

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir (checkpoints/, config.json).")
flags.DEFINE_integer("checkpoint_step", None, "Checkpoint step to evaluate (default: the newest).")
flags.DEFINE_list("metrics", ["fd", "pr", "bpd"], "Any of fd, pr, ed, swd, bpd (comma-separated).")
flags.DEFINE_enum("sampler", "ddim", SAMPLERS, "The sampler.")
flags.DEFINE_integer(
    "num_steps", 50, "Sampler steps; 0 = the process's default (all T steps of a DDPM schedule)."
)
flags.DEFINE_float("eta", 0.0, "DDIM eta (0: deterministic).")
flags.DEFINE_integer("num_samples", None, "Samples to draw (default: the held-out split's size).")
flags.DEFINE_integer("batch_size", 256, "Sampling batch size (with --seed it fixes the samples).")
flags.DEFINE_integer("seed", 0, "Sampling seed: batch i uses fold_in(key(seed), i).")
flags.DEFINE_integer("bpd_examples", None, "Held-out examples for bits/dim (default: all).")
flags.DEFINE_integer("bpd_batch_size", 64, "Batch size of the bits/dim computation.")
flags.DEFINE_string(
    "bpd_variance", None, "fixed_small | fixed_large | learned_range (default: auto)."
)
flags.DEFINE_string("inception_weights", None, "Inception-v3 .npz for FID on RGB images.")
flags.DEFINE_string(
    "reference_stats",
    None,
    "FID reference statistics .npz (mu, sigma; e.g. fid_stats_cifar10_train.npz): fd against "
    "them instead of the training split's Inception features.",
)
flags.DEFINE_bool("export", False, "Also write the samples as uint8 .npz (arr_0) and PNGs.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cli_logging.quiet_orbax()
    from diffusion_jax import checkpoints
    from diffusion_jax.evaluation import pipeline

    try:
        result = pipeline.evaluate_workdir(
            FLAGS.workdir,
            step=FLAGS.checkpoint_step,
            export=FLAGS.export,
            metrics=tuple(FLAGS.metrics),
            sampler=FLAGS.sampler,
            num_steps=FLAGS.num_steps or None,
            eta=FLAGS.eta,
            num_samples=FLAGS.num_samples,
            batch_size=FLAGS.batch_size,
            seed=FLAGS.seed,
            bpd_examples=FLAGS.bpd_examples,
            bpd_batch_size=FLAGS.bpd_batch_size,
            bpd_variance=FLAGS.bpd_variance,
            inception_weights=FLAGS.inception_weights,
            reference_stats=FLAGS.reference_stats,
        )
    except (
        FileNotFoundError,
        checkpoints.CorruptCheckpointError,
        checkpoints.CheckpointUnavailableError,
        checkpoints.CheckpointRestoreError,
    ) as e:  # no checkpoint, a damaged --checkpoint_step, storage errors: the message says which
        sys.exit(f"evaluate.py: {e}")
    summary = {k: v for k, v in result.items() if k != "bpd_per_timestep"}
    logging.info("Result:\n%s", json.dumps(summary, indent=2, default=str))
    print(
        f"step {result['step']}, {FLAGS.sampler} {result.get('num_steps', FLAGS.num_steps or 'default')} steps:"
    )
    print(pipeline.format_result(result))


if __name__ == "__main__":
    app.run(main)
