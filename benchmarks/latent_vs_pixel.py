r"""Latent vs pixel diffusion on the digits at equal training wall time: the Frechet distance ratio.

    python -m benchmarks.latent_vs_pixel --workdir /tmp/latent_vs_pixel                # 5 min each
    python -m benchmarks.latent_vs_pixel --seconds 60 --workdir /tmp/lvp60
    python -m benchmarks.latent_vs_pixel --tiny --workdir /tmp/lvp_tiny               # smoke test

1. Trains the autoencoder of ``configs/digits_autoencoder.py`` in ``<workdir>/autoencoder``
   (skipped if it is done; its time is reported, not counted in the budget).
2. Trains ``configs/digits.py`` (pixels) and ``configs/digits_latent.py`` (the same U-Net family on
   the autoencoder's 4x4x2 latents) for ``--seconds`` of wall time each, compilation included, in
   ``<workdir>/pixel`` and ``<workdir>/latent``: a hook sends the process SIGTERM when the budget
   is spent, and the trainer saves and returns as on a preemption. Both use a constant learning
   rate after warm-up (a cosine schedule would depend on a step count fixed in advance). A workdir
   that already holds a run is evaluated as it is.
3. Evaluates both EMA checkpoints with :func:`diffusion_jax.evaluation.pipeline.evaluate_params`:
   digits FD (and its held-out floor) of ``--num_samples`` class-conditional samples from
   ``--sampler`` at ``--num_steps``.

Prints a markdown table, the ratio FD(latent) / FD(pixel) (below 1: latent is better at this
budget), and writes the numbers to ``<workdir>/latent_vs_pixel.json``. Cost: the autoencoder
(5 minutes on 2 shared CPU cores), 2 x ``--seconds`` and two evaluations (about a minute each).

Measured with ``--seconds 120`` on 2 CPU cores shared with other jobs (the autoencoder of
configs/digits_autoencoder.py already trained: held-out MSE 0.0147, scale factor 0.452), DDIM 50,
297 samples:

| model | steps in 120s | digits FD | held-out floor |
| --- | --- | --- | --- |
| pixel | 501 | 17.20 | 21.32 |
| latent | 801 | 20.65 | 21.32 |

FD(latent) / FD(pixel) = 1.20: the latent model takes 1.6x as many steps in the same time but
its samples are worse; one seed, and the within-train floor's spread (+- 1.5) is about the
sampling error of each FD. The default 300 s budget is not yet measured.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time


def _stop_after(seconds: float):
    """A trainer hook that asks the run to stop (SIGTERM: save and return) once ``seconds`` passed."""
    start, fired = time.time(), []

    def hook(step: int) -> None:
        if not fired and time.time() - start > seconds:
            fired.append(step)
            os.kill(os.getpid(), signal.SIGTERM)

    return hook


def configs(autoencoder_workdir: str, tiny: bool):
    """(autoencoder, pixel, latent) ConfigDicts."""
    from configs import digits, digits_autoencoder, digits_latent

    ae, pixel, lat = (m.get_config() for m in (digits_autoencoder, digits, digits_latent))
    lat.latent.autoencoder_workdir = autoencoder_workdir
    for cfg in (pixel, lat):
        cfg.optim.lr_schedule = "constant"
        cfg.train.num_steps = 1_000_000  # the wall-time budget stops it
        cfg.checkpoint.every_steps = 1_000_000
        cfg.sample.num_samples = 0
    if tiny:
        ae.autoencoder.num_res_blocks = 0
        ae.autoencoder.mid_attention = False
        ae.train.batch_size = 16
        ae.train.num_steps = 20
        ae.train.log_every_steps = 10
        ae.eval.stats_examples = 64
        ae.eval.num_images = 0
        for cfg in (pixel, lat):
            cfg.data.num_threads = 0
            cfg.model.ch_mult = (1,)
            cfg.model.num_res_blocks = 0
            cfg.model.attn_resolutions = ()
            cfg.diffusion.num_timesteps = 50
            cfg.sample.num_steps = 5
            cfg.train.batch_size = 16
            cfg.train.log_every_steps = 10
            cfg.optim.warmup_steps = 0
    return ae, pixel, lat


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/latent_vs_pixel")
    parser.add_argument("--seconds", type=float, default=300.0, help="training wall time of each")
    parser.add_argument("--num_samples", type=int, default=None, help="default: held-out size")
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--num_steps", type=int, default=50)
    parser.add_argument("--tiny", action="store_true", help="tiny networks, a 20 s budget")
    args = parser.parse_args(argv)
    if args.tiny:
        args.seconds = min(args.seconds, 20.0)
        args.num_steps = min(args.num_steps, 5)
        args.num_samples = args.num_samples or 64

    from diffusion_jax import checkpoints, cli_logging, latent, trainers
    from diffusion_jax.evaluation import pipeline

    cli_logging.quiet_orbax()
    ae_dir = os.path.join(args.workdir, "autoencoder")
    ae_cfg, pixel_cfg, latent_cfg = configs(ae_dir, args.tiny)
    result: dict = {"seconds_budget": args.seconds, "sampler": args.sampler}
    t0 = time.time()
    if latent.read_latent_stats(ae_dir) is None:
        trainers.train(ae_cfg, ae_dir)
    result["autoencoder_seconds"] = round(time.time() - t0, 1)
    stats = latent.read_latent_stats(ae_dir)
    result["autoencoder_heldout_mse"] = stats["heldout_mse"]
    result["scale_factor"] = stats["scale_factor"]

    rows = {}
    for name, cfg in (("pixel", pixel_cfg), ("latent", latent_cfg)):
        workdir = os.path.join(args.workdir, name)
        t0 = time.time()
        if not os.path.exists(os.path.join(workdir, checkpoints.CHECKPOINT_DIR)):
            trainers.train(cfg, workdir, hooks=[_stop_after(args.seconds)])
        seconds = time.time() - t0
        run = checkpoints.load_sampler(workdir)
        metrics = pipeline.evaluate_params(
            run.params, run.config, run.data_shape, metrics=("fd",), sampler=args.sampler,
            num_steps=args.num_steps, num_samples=args.num_samples,
        )  # fmt: skip
        rows[name] = {
            "steps": run.step,
            "train_seconds": round(seconds, 1),
            "fd": metrics["fd"],
            "fd_floor": metrics["fd_floor"],
        }
    result["runs"] = rows
    result["fd_ratio_latent_over_pixel"] = rows["latent"]["fd"] / rows["pixel"]["fd"]

    print(f"| model | steps in {args.seconds:.0f}s | train seconds | digits FD | held-out floor |")
    print("| --- | --- | --- | --- | --- |")
    for name, row in rows.items():
        print(
            f"| {name} | {row['steps']} | {row['train_seconds']} | {row['fd']:.3f} | "
            f"{row['fd_floor']:.3f} |"
        )
    print(
        f"\nFD(latent) / FD(pixel) = {result['fd_ratio_latent_over_pixel']:.3f} "
        f"({args.sampler}, {args.num_steps} steps); autoencoder: held-out MSE "
        f"{stats['heldout_mse']:.4f}, scale factor {stats['scale_factor']:.4f}"
    )
    os.makedirs(args.workdir, exist_ok=True)
    with open(os.path.join(args.workdir, "latent_vs_pixel.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
