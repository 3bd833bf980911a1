r"""Draw samples from a trained run: a PNG grid, an ``.npz`` of uint8 images and a JSON record.

    python sample.py --workdir /tmp/diffusion_digits                       # the run's own sampler
    python sample.py --workdir /tmp/diffusion_digits --sampler dpm_solver_2m --num_steps 20 \
        --guidance_scale 2 --labels 3 --num_samples 64 --seed 1
    python sample.py --workdir /tmp/diffusion_digits --labels none        # unconditional (null label)
    python sample.py --workdir /tmp/diffusion_digits --sampler ddpm --num_steps 0 \
        --variance fixed_large                                           # DDPM with beta_t variance
    python sample.py --workdir /tmp/diffusion_digits --classifier_workdir /tmp/digits_classifier \
        --classifier_scale 2                                             # classifier guidance
    python sample.py ... --classifier_scale 2 --guidance_scale 0         # ... of the model's unconditional mode

Uses the EMA parameters of the newest readable (or ``--checkpoint_step``) checkpoint: its files
are checked against the checksums saved with it, a damaged newest one is skipped with a warning
naming it, and a damaged ``--checkpoint_step`` stops with a message naming it. Samplers: ddpm, ddim,
euler, heun, dpm_solver_2m (``--num_steps 0``: all T steps); ``--variance`` (fixed_small,
fixed_large or learned_range) is the ddpm sampler's reverse variance. Files go to
``<workdir>/generated/<sampler><steps>[_<variance>]_w<guidance>[_c<classifier scale>]_seed<seed>.{png,npz,json}``
unless ``--output_dir`` says otherwise; ``arr_0`` holds the images, ``arr_1`` the labels. Batch ``i``
uses ``fold_in(key(seed), i)``, so a seed and ``--batch_size`` fix the samples.
"""

import sys
import time

from absl import app, flags

from diffusion_jax import cli_logging
from diffusion_jax.reverse import VARIANCES
from diffusion_jax.sampling.solvers import SAMPLERS

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir (checkpoints/), local or gs://.")
flags.DEFINE_integer("checkpoint_step", None, "Checkpoint step (default: the newest).")
flags.DEFINE_enum("sampler", None, SAMPLERS, "The sampler (default: the run's).")
flags.DEFINE_integer(
    "num_steps", None, "Sampler steps; 0 = the process's default (default: the run's)."
)
flags.DEFINE_float("eta", None, "DDIM eta (default: the run's).")
flags.DEFINE_enum(
    "variance", None, VARIANCES, "The ddpm sampler's reverse variance (default: the run's)."
)
flags.DEFINE_integer("num_samples", 100, "How many samples.")
flags.DEFINE_integer("batch_size", 100, "Samples per compiled call.")
flags.DEFINE_string("labels", "all", "all (0..K-1 cycled) | none (unconditional) | e.g. 3 or 1,7.")
flags.DEFINE_float(
    "guidance_scale", 1.0, "Classifier-free guidance w (0: unconditional, 1: plain conditional)."
)
flags.DEFINE_string(
    "classifier_workdir", None, "A train_classifier.py workdir for classifier guidance."
)
flags.DEFINE_float(
    "classifier_scale", 0.0, "Classifier-guidance scale s (times grad log p(y|x_t))."
)
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_integer("columns", None, "Grid columns (default: one class per column, else square).")
flags.DEFINE_string("output_dir", None, "Where to write (default: <workdir>/generated).")
flags.mark_flags_as_required(["workdir"])


def _guided_sampler_and_labels(generate):
    guided = generate.make_guided_sampler(
        FLAGS.workdir,
        step=FLAGS.checkpoint_step,
        sampler=FLAGS.sampler,
        num_steps=FLAGS.num_steps,
        eta=FLAGS.eta,
        variance=FLAGS.variance,
        guidance_scale=FLAGS.guidance_scale,
        classifier_workdir=FLAGS.classifier_workdir,
        classifier_scale=FLAGS.classifier_scale,
    )
    if FLAGS.classifier_workdir and FLAGS.labels.strip().lower() == "none":
        raise ValueError(
            "classifier guidance steers toward class labels, so --labels=none does not apply; to "
            "guide the unconditional mode of a label-dropout model use --guidance_scale=0."
        )
    labels = generate.parse_labels(
        FLAGS.labels, FLAGS.num_samples, guided.num_classes, guided.null_label
    )
    return guided, labels


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cli_logging.quiet_orbax()
    from diffusion_jax import checkpoints, config_utils, generate
    from diffusion_jax.evaluation import export

    try:
        guided, labels = _guided_sampler_and_labels(generate)
    except (
        ValueError,  # bad flags, or a damaged --checkpoint_step (CorruptCheckpointError)
        FileNotFoundError,
        checkpoints.CheckpointUnavailableError,
        checkpoints.CheckpointRestoreError,
    ) as e:  # the message says which flag, step or file
        sys.exit(f"sample.py: {e}")
    start = time.time()
    samples = export.generate_samples(
        guided.sample,
        guided.params,
        num_samples=FLAGS.num_samples,
        batch_size=min(FLAGS.batch_size, FLAGS.num_samples),
        image_shape=guided.data_shape,
        seed=FLAGS.seed,
        labels=labels,
        guidance_scale=FLAGS.guidance_scale,
    )
    seconds = time.time() - start
    s = guided.config.sample
    sampler, steps = s.sampler, guided.num_steps
    name = f"{sampler}{steps}"
    if FLAGS.variance:
        name += f"_{FLAGS.variance}"
    name += f"_w{FLAGS.guidance_scale:g}"
    if FLAGS.classifier_workdir:
        name += f"_c{FLAGS.classifier_scale:g}"
    name += f"_seed{FLAGS.seed}"
    columns = FLAGS.columns
    if columns is None and FLAGS.labels.strip().lower() == "all" and guided.num_classes:
        columns = guided.num_classes
    paths = generate.write_samples(
        FLAGS.output_dir or f"{str(FLAGS.workdir).rstrip('/')}/generated",
        name,
        samples,
        labels,
        columns=columns,
        metadata={
            "workdir": str(FLAGS.workdir),
            "checkpoint_step": guided.step,
            "sampler": sampler,
            "num_steps": steps,
            "eta": s.eta,
            "variance": config_utils.sample_variance(guided.config),
            "guidance_scale": FLAGS.guidance_scale,
            "classifier_workdir": FLAGS.classifier_workdir,
            "classifier_scale": FLAGS.classifier_scale,
            "labels": FLAGS.labels,
            "seed": FLAGS.seed,
            "batch_size": FLAGS.batch_size,
            "seconds": round(seconds, 2),
        },
    )
    print(f"{FLAGS.num_samples} samples in {seconds:.1f}s (compilation included):")
    for kind, path in paths.items():
        print(f"  {kind}: {path}")


if __name__ == "__main__":
    app.run(main)
