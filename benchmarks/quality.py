r"""Sample quality and bits/dim of the default digits model, per sampler and number of steps.

    python -m benchmarks.quality                                   # the full default budget
    python -m benchmarks.quality --train_steps 300 --bpd_examples 32 --workdir /tmp/q300
    python -m benchmarks.quality --tiny --workdir /tmp/qtiny     # smoke test: configs/tiny.py, seconds

Trains ``configs/digits.py`` (the default: a class-conditional U-Net on the 8x8 digits) for
``--train_steps`` batches (default: the config's) through
:func:`diffusion_jax.trainer.train_and_evaluate` (resuming, or doing nothing, if ``--workdir``
already holds that run), then evaluates the EMA weights of its last checkpoint:

- digits FD (the digits classifier's 64-d features, :mod:`diffusion_jax.evaluation.digits`; 8x8
  samples are upsampled 2x for it) and precision/recall (k = 3) of ``--num_samples`` samples
  (default 297, the held-out size; a class-conditional model gets uniformly drawn labels, no
  guidance) against the 1500 training digits, for the ancestral sampler at 1000 steps and DDIM,
  Heun and DPM-Solver++(2M) at 10/25/50 steps; beside two floors: the 297 held-out digits against
  the same 1500, and 297 random training digits against the other 1203, mean over 5 random splits
  (the held-out digits were written by other people, so a good model of the training split can
  beat the first floor; the second one's spread is also about the sampling error of each row);
- bits/dim of the first ``--bpd_examples`` held-out digits (quantized to 8 bits) from all 1000
  terms of the bound, with ``fixed_large`` variance (given the true label, for a conditional model).

Prints a markdown table and writes it with the raw numbers to ``<workdir>/quality.json``.
Cost on 2 shared CPU cores: see the table's timings; the 1000-step ancestral run and bits/dim (T
network evaluations per example) dominate the evaluation.
"""

from __future__ import annotations

import argparse
import json
import os
import time

RUNS = [("ddpm", 1000)] + [(s, n) for s in ("ddim", "heun", "dpm_solver_2m") for n in (10, 25, 50)]


def network_evaluations(sampler: str, steps: int) -> int:
    """Denoiser calls per sample: Heun's second evaluation is skipped at the last step."""
    return 2 * steps - 1 if sampler == "heun" else steps


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/diffusion_quality_benchmark")
    parser.add_argument("--train_steps", type=int, default=None, help="default: the config's")
    parser.add_argument(
        "--num_samples", type=int, default=None, help="default: held-out size (297)"
    )
    parser.add_argument("--bpd_examples", type=int, default=64)
    parser.add_argument("--runs", default=",".join(f"{s}:{n}" for s, n in RUNS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tiny", action="store_true", help="configs/tiny.py, 2 steps, ddim:2, 16 samples, no bpd"
    )
    args = parser.parse_args(argv)
    if args.tiny:
        args.train_steps, args.runs, args.bpd_examples = 2, "ddim:2", 0
        args.num_samples = args.num_samples or 16

    import logging as std_logging

    import jax
    from absl import logging

    logging.set_verbosity(logging.INFO)  # the trainer's progress lines; Orbax's INFO lines dropped
    logging.get_absl_handler().addFilter(
        lambda r: r.levelno >= std_logging.WARNING or "/orbax/" not in r.pathname
    )

    from configs import digits, tiny
    from diffusion_jax import checkpoints, trainer
    from diffusion_jax.evaluation import pipeline

    config = (tiny if args.tiny else digits).get_config()
    if args.train_steps is not None:
        config.train.num_steps = args.train_steps
        config.checkpoint.every_steps = min(config.checkpoint.every_steps, args.train_steps)
    config.sample.every_steps = 0
    t0 = time.time()
    trainer.train_and_evaluate(config, args.workdir)
    train_s = time.time() - t0
    step = pipeline.resolve_step(args.workdir, None)
    if step < config.train.num_steps:  # e.g. stopped by SIGTERM: the trainer saved and returned
        raise SystemExit(
            f"training stopped at step {step} of {config.train.num_steps}; rerun to finish."
        )
    params, cfg = checkpoints.load_ema_params(args.workdir, step)
    data_shape = (cfg.data.image_size, cfg.data.image_size, cfg.data.channels)

    rows, results = [], {}
    for run in args.runs.split(","):
        sampler, steps = run.split(":")
        steps = int(steps)
        r = pipeline.evaluate_params(
            params, cfg, data_shape, metrics=("fd", "pr"), sampler=sampler,
            num_steps=None if steps == cfg.diffusion.num_timesteps else steps,
            num_samples=args.num_samples, seed=args.seed,
        )  # fmt: skip
        results[run] = r
        rows.append(
            f"| {sampler} | {steps} | {network_evaluations(sampler, steps)} | {r['fd']:.2f} | "
            f"{r['precision']:.3f} | {r['recall']:.3f} | {r['seconds']['sampling']:.1f} |"
        )
        print(rows[-1], flush=True)
    floor = next(iter(results.values()))
    bpd = None
    if args.bpd_examples > 0:
        bpd = pipeline.evaluate_params(
            params,
            cfg,
            data_shape,
            metrics=("bpd",),
            bpd_examples=args.bpd_examples,
            seed=args.seed,
        )
    lines = [
        f"digits, {cfg.train.num_steps} training steps (checkpoint {step}, EMA), "
        f"{floor['num_samples']} samples vs the 1500 training digits; jax {jax.__version__} on "
        f"{jax.devices()[0].platform}; training took {train_s:.0f}s",
        "",
        "| sampler | steps | NFE | digits FD | precision | recall | sampling s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        f"| floor: held-out vs train | - | - | {floor['fd_floor']:.2f} | {floor['precision_floor']:.3f} "
        f"| {floor['recall_floor']:.3f} | - |",
        f"| floor: train subset vs rest (mean +- std, 5 splits) | - | - | "
        f"{floor['fd_train_floor']:.2f} +- {floor['fd_train_floor_std']:.2f} | "
        f"{floor['precision_train_floor']:.3f} +- {floor['precision_train_floor_std']:.3f} | "
        f"{floor['recall_train_floor']:.3f} +- {floor['recall_train_floor_std']:.3f} | - |",
    ]
    if bpd is not None:
        lines += [
            "",
            f"bits/dim (negative bound, all {bpd['bpd_timesteps']} terms, {bpd['bpd_variance']}): "
            f"{bpd['bpd']:.3f} +- {bpd['bpd_stderr']:.3f} on {bpd['bpd_examples']} held-out digits "
            f"(prior {bpd['bpd_prior']:.5f}, decoder {bpd['bpd_decoder']:.3f}; {bpd['seconds']['bpd']:.0f}s)",
        ]
    table = "\n".join(lines)
    print(table)
    out = {"table": table, "train_seconds": train_s, "step": step, "runs": results, "bpd": bpd}
    with open(os.path.join(args.workdir, "quality.json"), "w") as f:
        json.dump(out, f, indent=2, default=str)
    return out


if __name__ == "__main__":
    main()
