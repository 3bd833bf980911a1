r"""Sample quality and bits/dim of the digits model, per sampler and number of steps; or of several
training objectives at equal training cost, per number of network evaluations (NFE).

    python -m benchmarks.quality                                   # the full default budget
    python -m benchmarks.quality --train_steps 300 --bpd_examples 32 --workdir /tmp/q300
    python -m benchmarks.quality --tiny --workdir /tmp/qtiny     # smoke test: configs/tiny.py, seconds
    python -m benchmarks.quality --objectives ddpm_eps,ddpm_v,flow,edm --workdir /tmp/qobj
    python -m benchmarks.quality --variants ddpm_eps,dit --train_seconds 600 --workdir /tmp/qbb

**One model** (the default): trains ``configs/digits.py`` (a class-conditional U-Net on the 8x8
digits) for ``--train_steps`` batches (default: the config's) through
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

**Variants** (``--variants``, alias ``--objectives``, a comma-separated subset of :data:`VARIANTS`):
each one is a config with the same data and optimiser, trained for the same number of steps or,
with ``--train_seconds``, for the same CPU time (each variant's steps from its measured CPU seconds
per step, all threads: steadier than wall time on a shared machine), in
its own ``<workdir>/<variant>`` (resumed, or skipped if done). The objectives share the U-Net:

- ``ddpm_eps``: ``configs/digits.py`` (discrete VP, T = 1000, eps prediction);
- ``ddpm_v``: the same with ``diffusion.prediction = "v"``;
- ``flow``: ``configs/digits_flow.py`` (rectified flow, velocity, logit-normal t);
- ``edm``: ``configs/digits_edm.py`` (EDM preconditioning, log-normal sigma);

and ``dit`` is ``configs/digits_dit.py`` (``ddpm_eps`` with the DiT backbone); the ``_selfcond``
variants turn on self-conditioning (``model.self_condition``).

Each is evaluated at the NFE budgets ``--nfe`` (default 5, 10, 20, 50) with DPM-Solver++(2M) and
with the config's own sampler (DDIM for the DDPM objectives, Euler for flow, Heun for EDM at
``(NFE + 1) // 2`` steps, i.e. 2 steps - 1 evaluations), plus the T-step ancestral ``ddpm`` chain
for the discrete objectives. Digits FD as above, of class-conditional samples (uniform labels,
what :func:`~diffusion_jax.evaluation.pipeline.evaluate_params` draws) and, for rows with NFE up
to ``--unconditional_max_nfe`` (default 100, so not the 1000-step chain), of unconditional samples
(the null label ``num_classes``, which label dropout trained; the same initial noise, so the two
columns are paired). ``evaluate_params`` has no label option, so the benchmark samples those
itself with the library's pieces (``build_sampler``, ``generate_samples``, the same features).
Every FD is also divided by the held-out floor. Bits/dim per objective only with
``--bpd_examples`` > 0 (for flow and EDM it is the probability-flow ODE's, with a Hutchinson trace:
``--ode_bpd_steps`` RK4 steps of 2 evaluations each per example).

Prints a markdown table and writes it with the raw numbers to ``<workdir>/quality.json``. Cost on
2 shared CPU cores: see the table's timings; the 1000-step ancestral run and bits/dim (T network
evaluations per example) dominate the evaluation.
"""

from __future__ import annotations

import argparse
import json
import os
import time

RUNS = [("ddpm", 1000)] + [(s, n) for s in ("ddim", "heun", "dpm_solver_2m") for n in (10, 25, 50)]

# variant -> (configs module, keys changed after its get_config(), as "section.key": value). The
# first four are training objectives with the same U-Net; "dit" is the same data and process with
# the DiT backbone.
VARIANTS = {
    "ddpm_eps": ("digits", {}),
    "ddpm_v": ("digits", {"diffusion.prediction": "v"}),
    "flow": ("digits_flow", {}),
    "edm": ("digits_edm", {}),
    "dit": ("digits_dit", {}),
    "ddpm_eps_selfcond": ("digits", {"model.self_condition": True}),
    "dit_selfcond": ("digits_dit", {"model.self_condition": True}),
}
OBJECTIVES = VARIANTS  # the name of earlier tables' --objectives
NFE_BUDGETS = (5, 10, 20, 50)


def network_evaluations(sampler: str, steps: int) -> int:
    """Denoiser calls per sample: Heun's second evaluation is skipped at the last step."""
    return 2 * steps - 1 if sampler == "heun" else steps


def steps_for_nfe(sampler: str, nfe: int) -> int:
    """The most steps of ``sampler`` within ``nfe`` denoiser calls (at least one)."""
    return max(1, (nfe + 1) // 2) if sampler == "heun" else nfe


def objective_config(name: str, tiny: bool = False):
    """The ml_collections config of variant ``name``; with ``tiny``, configs/tiny.py with the
    variant's model (if it is another kind), diffusion and sample settings (those in which its
    config differs from digits.py)."""
    import importlib

    from configs import digits
    from configs import tiny as tiny_config

    if name not in VARIANTS:
        raise SystemExit(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    module, overrides = VARIANTS[name]
    config = importlib.import_module(f"configs.{module}").get_config()
    for key, value in overrides.items():
        section, leaf = key.split(".")
        config[section][leaf] = value
    if not tiny:
        return config
    base, small = digits.get_config(), tiny_config.get_config()
    for section in ("diffusion", "sample"):
        for key, value in config[section].items():
            if value != base[section][key]:
                small[section][key] = value
    if config.model.name != base.model.name:
        small.model = config.model
    for key, value in overrides.items():  # e.g. a model switch on the tiny U-Net
        section, leaf = key.split(".")
        small[section][leaf] = value
    return small


def equal_time_steps(config, cpu_seconds: float) -> tuple[int, float]:
    """(training steps, CPU seconds per step) for ``cpu_seconds`` of training of ``config`` on this
    machine: its step's CPU time (all threads) on random data (:func:`benchmarks.common.time_train_step`;
    data loading, logging and checkpoints are not counted). CPU time rather than wall time, so
    that other jobs on a shared machine do not skew the comparison."""
    from benchmarks.common import time_train_step

    step_s = time_train_step(config, steps=10)["step_cpu_seconds"]
    return max(1, int(cpu_seconds / step_s)), step_s


def objective_runs(cfg, nfes: list[int], ancestral: bool = True) -> list[tuple[str, int]]:
    """(sampler, steps) of one variant: dpm_solver_2m and the config's own sampler at each NFE
    budget, and (``ancestral``) the T-step ancestral chain on the discrete VP process."""
    runs = []
    if ancestral and cfg.diffusion.process == "vp" and cfg.diffusion.discrete:
        runs.append(("ddpm", cfg.diffusion.num_timesteps))
    for nfe in nfes:
        for sampler in dict.fromkeys(("dpm_solver_2m", cfg.sample.sampler)):
            runs.append((sampler, steps_for_nfe(sampler, nfe)))
    return runs


def train(config, workdir: str, train_steps: int | None) -> tuple[int, float, float]:
    """Trains (or resumes, or finds done) the run of ``config`` in ``workdir``.

    Returns (checkpoint step, seconds of this call, seconds of training so far): the latter adds
    up the calls that advanced the run, in ``<workdir>/quality_train.json`` (None for a run trained
    without that record)."""
    from diffusion_jax import checkpoints, trainer

    if train_steps is not None:
        config.train.num_steps = train_steps
        config.checkpoint.every_steps = min(config.checkpoint.every_steps, train_steps)
    config.sample.every_steps = 0
    record_path = os.path.join(workdir, "quality_train.json")
    try:
        before = checkpoints.resolve_step(workdir)
    except FileNotFoundError:
        before = 0
    record = {"seconds": None if before else 0.0}
    if before and os.path.exists(record_path):
        with open(record_path) as f:
            record = json.load(f)
    t0 = time.time()
    trainer.train_and_evaluate(config, workdir)
    seconds = time.time() - t0
    step = checkpoints.resolve_step(workdir)
    if step < config.train.num_steps:  # e.g. stopped by SIGTERM: the trainer saved and returned
        raise SystemExit(
            f"training in {workdir} stopped at step {step} of {config.train.num_steps}; rerun to finish."
        )
    if step > before:
        record = {"seconds": (record["seconds"] or 0.0) + seconds, "steps": step}
        with open(record_path, "w") as f:
            json.dump(record, f)
    return step, seconds, record["seconds"]


def _seconds(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.0f}s"


def bpd_line(bpd: dict) -> str:
    """The bits/dim result in words: the discrete VP bound adds its prior and decoder terms."""
    line = (
        f"{bpd['bpd']:.3f} +- {bpd['bpd_stderr']:.3f} on {bpd['bpd_examples']} held-out digits "
        f"({bpd['bpd_method']}; "
    )
    if "bpd_prior" in bpd:
        line += f"prior {bpd['bpd_prior']:.5f}, decoder {bpd['bpd_decoder']:.3f}; "
    return line + f"{bpd['seconds']['bpd']:.0f}s)"


class UnconditionalFD:
    """Digits FD of null-label samples (``evaluate_params`` draws uniform labels and takes none):
    the same sampler, seed, batches and features as ``evaluate_params``, labels = ``num_classes``."""

    def __init__(self, cfg, data_shape):
        from diffusion_jax.evaluation import pipeline

        name, self.feature_fn = pipeline.feature_fn_for(cfg.data, data_shape)
        if self.feature_fn is None:
            raise ValueError(name)
        reference, _ = pipeline.load_split(cfg.data, cfg.data.split)
        self.reference = self.feature_fn(reference)
        self.data_shape = tuple(data_shape)

    def __call__(self, params, cfg, sampler, num_steps, num_samples, batch_size, seed) -> dict:
        import numpy as np

        from diffusion_jax import config_utils
        from diffusion_jax.evaluation import distances
        from diffusion_jax.evaluation.export import generate_samples

        if cfg.model.num_classes is None or cfg.diffusion.label_dropout <= 0:
            raise ValueError(
                "unconditional samples need a class-conditional model with label dropout"
            )
        t0 = time.perf_counter()
        sample_fn = config_utils.build_sampler(cfg, sampler=sampler, num_steps=num_steps)
        samples = generate_samples(
            sample_fn, params, num_samples=num_samples, batch_size=min(batch_size, num_samples),
            image_shape=self.data_shape, seed=seed,
            labels=np.full((num_samples,), cfg.model.num_classes, np.int32),
        )  # fmt: skip
        sampling = time.perf_counter() - t0
        if not np.all(np.isfinite(samples)):
            raise FloatingPointError("the sampler produced non-finite values.")
        fd = distances.frechet_distance_from_features(self.reference, self.feature_fn(samples))
        return {"fd": fd, "seconds": {"sampling": round(sampling, 2)}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/diffusion_quality_benchmark")
    parser.add_argument("--train_steps", type=int, default=None, help="default: the config's")
    parser.add_argument(
        "--num_samples", type=int, default=None, help="default: held-out size (297)"
    )
    parser.add_argument(
        "--bpd_examples", type=int, default=None, help="default: 64; 0 with --objectives"
    )
    parser.add_argument(
        "--runs",
        default=None,
        help="sampler:steps,... (default: " + ",".join(f"{s}:{n}" for s, n in RUNS) + ")",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--variants", "--objectives", dest="objectives", default=None,
        help=f"compare models or objectives at equal cost: a comma-separated subset of "
        f"{','.join(VARIANTS)} (each trained in <workdir>/<variant>); --runs is then unused",
    )  # fmt: skip
    parser.add_argument(
        "--no_ancestral",
        action="store_true",
        help="with --variants: skip the T-step ancestral chain (the costliest row)",
    )
    parser.add_argument(
        "--train_seconds", type=float, default=None,
        help="with --variants: equal training time instead of equal steps; each variant's steps "
        "are this divided by its measured CPU seconds per step (all threads)",
    )  # fmt: skip
    parser.add_argument(
        "--nfe", default=None, help=f"NFE budgets with --objectives (default {NFE_BUDGETS})"
    )
    parser.add_argument(
        "--unconditional_max_nfe", type=int, default=None,
        help="with --objectives: also FD of unconditional (null-label) samples for rows with at "
        "most this NFE (default 100; 0: none)",
    )  # fmt: skip
    parser.add_argument(
        "--batch_size", type=int, default=None,
        help="samples per sampling batch (default: 256, the library's; with --objectives all "
        "samples in one batch, no padded last batch)",
    )  # fmt: skip
    parser.add_argument(
        "--ode_bpd_steps", type=int, default=100, help="RK4 steps of the flow/EDM bits/dim"
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="configs/tiny.py, 2 steps, ddim:2 (objectives: NFE 3), 16 samples, no bpd, unless given",
    )
    args = parser.parse_args(argv)
    if args.tiny:  # what is not given on the command line
        args.train_steps = 2 if args.train_steps is None else args.train_steps
        args.runs = args.runs or "ddim:2"
        args.nfe = args.nfe or "3"
        args.num_samples = args.num_samples or 16
        args.bpd_examples = 0 if args.bpd_examples is None else args.bpd_examples
    args.runs = args.runs or ",".join(f"{s}:{n}" for s, n in RUNS)
    args.nfe = args.nfe or ",".join(map(str, NFE_BUDGETS))
    if args.bpd_examples is None:
        args.bpd_examples = 0 if args.objectives else 64

    from absl import logging

    from diffusion_jax import cli_logging

    logging.set_verbosity(logging.INFO)  # the trainer's progress lines; Orbax's INFO lines dropped
    logging.use_absl_handler()  # on the root logger, which the trainer's std-logging lines reach
    cli_logging.quiet_orbax()
    if args.objectives:
        return compare_objectives(args)
    return single_model(args)


def single_model(args) -> dict:
    import jax

    from configs import digits, tiny
    from diffusion_jax import checkpoints
    from diffusion_jax.evaluation import pipeline

    config = (tiny if args.tiny else digits).get_config()
    step, train_s, _ = train(config, args.workdir, args.train_steps)
    params, cfg = checkpoints.load_ema_params(args.workdir, step)
    data_shape = (cfg.data.image_size, cfg.data.image_size, cfg.data.channels)

    rows, results = [], {}
    for run in args.runs.split(","):
        sampler, steps = run.split(":")
        steps = int(steps)
        r = pipeline.evaluate_params(
            params, cfg, data_shape, metrics=("fd", "pr"), sampler=sampler,
            num_steps=None if steps == cfg.diffusion.num_timesteps else steps,
            num_samples=args.num_samples, batch_size=args.batch_size or 256, seed=args.seed,
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
            params, cfg, data_shape, metrics=("bpd",), bpd_examples=args.bpd_examples,
            ode_bpd_steps=args.ode_bpd_steps, seed=args.seed,
        )  # fmt: skip
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
        lines += ["", f"bits/dim: {bpd_line(bpd)}"]
    table = "\n".join(lines)
    print(table)
    out = {"table": table, "train_seconds": train_s, "step": step, "runs": results, "bpd": bpd}
    with open(os.path.join(args.workdir, "quality.json"), "w") as f:
        json.dump(out, f, indent=2, default=str)
    return out


def compare_objectives(args) -> dict:
    import jax

    from diffusion_jax import checkpoints
    from diffusion_jax.evaluation import pipeline

    names = [n.strip() for n in args.objectives.split(",") if n.strip()]
    nfes = [int(n) for n in args.nfe.split(",")]
    uncond_max = 100 if args.unconditional_max_nfe is None else args.unconditional_max_nfe
    configs = {name: objective_config(name, args.tiny) for name in names}
    trained = {}
    steps = {name: args.train_steps for name in names}
    if args.train_seconds:
        for name in names:
            steps[name], step_s = equal_time_steps(configs[name], args.train_seconds)
            print(f"{name}: {1e3 * step_s:.1f} CPU ms per step -> {steps[name]} steps", flush=True)
    for name in names:  # train everything first: a crash in evaluation leaves the runs reusable
        workdir = os.path.join(args.workdir, name)
        step, call_s, train_s = train(configs[name], workdir, steps[name])
        trained[name] = (workdir, step, train_s)
        print(f"{name}: step {step} in {workdir}; training {_seconds(train_s)}", flush=True)

    rows, results, bpds, uncond, floor, cfg = [], {}, {}, None, None, None
    header = (
        "| variant | sampler | steps | NFE | FD cond. | FD / floor | FD uncond. | FD / floor "
        "| sampling s |"
    )
    print(header, flush=True)
    for name in names:
        workdir, step, _ = trained[name]
        params, cfg = checkpoints.load_ema_params(workdir, step)
        data_shape = (cfg.data.image_size, cfg.data.image_size, cfg.data.channels)
        can_uncond = cfg.model.num_classes is not None and cfg.diffusion.label_dropout > 0
        results[name] = {}
        for sampler, steps in objective_runs(cfg, nfes, not args.no_ancestral):
            nfe = network_evaluations(sampler, steps)
            n = args.num_samples or None
            batch = args.batch_size or n or 10_000  # evaluate_params takes min(batch, n)
            r = pipeline.evaluate_params(
                params, cfg, data_shape, metrics=("fd",), sampler=sampler,
                num_steps=None if sampler == "ddpm" else steps,
                num_samples=n, batch_size=batch, seed=args.seed,
            )  # fmt: skip
            floor = r["fd_floor"]
            entry = {"nfe": nfe, "conditional": r}
            u_cell = "- | -"
            if can_uncond and nfe <= uncond_max:
                if uncond is None:
                    uncond = UnconditionalFD(cfg, data_shape)
                u = uncond(params, cfg, sampler, None if sampler == "ddpm" else steps,
                           r["num_samples"], batch, args.seed)  # fmt: skip
                entry["unconditional"] = u
                u_cell = f"{u['fd']:.2f} | {u['fd'] / floor:.3f}"
            results[name][f"{sampler}:{steps}"] = entry
            sampling_s = r["seconds"]["sampling"] + entry.get("unconditional", {}).get(
                "seconds", {}
            ).get("sampling", 0.0)
            rows.append(
                f"| {name} | {sampler} | {steps} | {nfe} | {r['fd']:.2f} | {r['fd'] / floor:.3f} | "
                f"{u_cell} | {sampling_s:.1f} |"
            )
            print(rows[-1], flush=True)
        if args.bpd_examples > 0:
            bpds[name] = pipeline.evaluate_params(
                params, cfg, data_shape, metrics=("bpd",), bpd_examples=args.bpd_examples,
                ode_bpd_steps=args.ode_bpd_steps, seed=args.seed,
            )  # fmt: skip
            print(f"{name} bits/dim: {bpd_line(bpds[name])}", flush=True)

    first = next(iter(next(iter(results.values())).values()))["conditional"]
    lines = [
        f"digits, training steps of batch {cfg.train.batch_size} per variant: "
        + ", ".join(f"{name} {trained[name][1]}" for name in names)
        + " "
        f"(EMA), {first['num_samples']} samples vs the {first['reference_examples']} training "
        f"digits (conditional: uniform labels; unconditional: the null label, NFE <= {uncond_max}); "
        f"jax {jax.__version__} on {jax.devices()[0].platform}; training time: "
        + ", ".join(f"{name} {_seconds(trained[name][2])}" for name in names),
        "",
        header,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        f"| floor: held-out vs train | - | - | - | {first['fd_floor']:.2f} | 1 | - | - | - |",
        f"| floor: train subset vs rest (mean +- std, 5 splits) | - | - | - | "
        f"{first['fd_train_floor']:.2f} +- {first['fd_train_floor_std']:.2f} | "
        f"{first['fd_train_floor'] / first['fd_floor']:.3f} | - | - | - |",
    ]
    if bpds:
        lines += [""] + [f"bits/dim, {name}: {bpd_line(b)}" for name, b in bpds.items()]
    table = "\n".join(lines)
    print(table)
    out = {
        "table": table,
        "train_seconds": {name: trained[name][2] for name in names},
        "step": {name: trained[name][1] for name in names},
        "runs": results,
        "bpd": bpds,
    }
    with open(os.path.join(args.workdir, "quality.json"), "w") as f:
        json.dump(out, f, indent=2, default=str)
    return out


if __name__ == "__main__":
    main()
