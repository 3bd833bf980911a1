"""Evaluate a training workdir's checkpoint: sample quality, distances and bits/dim, with floors.

What ``python evaluate.py --workdir ...`` runs; importable and testable without flags::

    from diffusion_jax.evaluation import pipeline
    result = pipeline.evaluate_workdir("/tmp/diffusion_digits", metrics=("fd", "pr", "bpd"),
                                       sampler="ddim", num_steps=50)

Reference and floors: every sample metric compares the model's samples with the **training split**
(digits: the first 1500 images), and is reported beside its **floor** (``*_floor``), the same metric
between the training split and the **held-out split** (digits: the last 297 images) at the same
sample size: fresh data from the held-out split scores this. The number of samples defaults to the
held-out size, so the figures are directly comparable (FD and precision/recall depend on it). When
the splits differ in distribution, as the digits' do (the last 297 were written by other people),
a model of the training split can score below that floor; ``*_train_floor`` is then the better
reference: the metric between ``floor_examples`` random training examples and the other training
examples (no shift between them, only sampling error), averaged over ``train_floor_repeats``
random splits (``*_train_floor_std``: its spread, a guide to the sampling error of the model's
figure too). Computed when the training split holds at least twice ``floor_examples``.

Metrics (``metrics=``):

- ``fd``: Frechet distance of features: the digits classifier's (:mod:`.digits`) for the digits,
  Inception-v3 pool3 (:mod:`.inception`, weights from a local file) for RGB images, the coordinates
  themselves for points. With ``reference_stats`` (an ``.npz`` of Inception ``mu``, ``sigma``, e.g.
  ``fid_stats_cifar10_train.npz``), FID against those statistics instead of the training split's
  features; its floor is then the held-out split against them (no within-train floor).
- ``pr``: improved precision/recall (k = 3) on the same features.
- ``ed``, ``swd``: energy distance and sliced 2-Wasserstein distance, on points (2-D toys).
- ``bpd``: the negative variational bound in bits/dim on the held-out split (quantized to 8 bits),
  all T terms (:mod:`.likelihood`); learned variance if the model has it, else ``fixed_large``
  (much tighter than ``fixed_small``); x0_hat clipped to [-1, 1] as improved-diffusion's
  ``image_nll.py`` does; conditional on the true label for a class-conditional model. For a
  continuous process (flow, EDM, continuous VP): the probability-flow ODE's log-likelihood of the
  uniformly dequantized data with a Hutchinson trace (score_sde's method), also an upper bound.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from etils import epath

from diffusion_jax.evaluation import digits as digits_lib
from diffusion_jax.evaluation import distances
from diffusion_jax.evaluation.export import export_samples, generate_samples
from diffusion_jax.evaluation.likelihood import evaluate_bpd, make_bpd_fn, make_ode_bpd_fn

METRICS = ("fd", "pr", "ed", "swd", "bpd")
FeatureFn = Callable[[np.ndarray], np.ndarray]


def load_split(
    data_cfg: Any, split: str, *, limit: int | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """All of ``split`` through the data pipeline's evaluation path: (x [N, ...], labels [N] or None)."""
    from diffusion_jax import data

    cfg = dataclasses.replace(data.to_data_config(data_cfg), eval_split=split)
    xs, ys = [], []
    count = 0
    for batch in data.make_eval_iterator(cfg, batch_size=1024):
        xs.append(np.asarray(batch["x"]))
        if "label" in batch:
            ys.append(np.asarray(batch["label"]))
        count += len(xs[-1])
        if limit is not None and count >= limit:
            break
    x = np.concatenate(xs)[:limit]
    return x, (np.concatenate(ys)[:limit] if ys else None)


def feature_fn_for(
    data_cfg: Any, data_shape: tuple[int, ...], inception_weights: str | None = None
) -> tuple[str, FeatureFn | None]:
    """(name, features(x [N, *data_shape]) -> [N, D] float) for the sample metrics, or (reason, None)."""
    if len(data_shape) == 1:
        return "coordinates", lambda x: np.asarray(x, np.float64)
    if data_cfg.source == "digits" and data_cfg.resize_method != "pad":
        if tuple(data_shape) == digits_lib.IMAGE_SHAPE:
            return "digits-mlp-64", digits_lib.digits_features
        if tuple(data_shape) == (8, 8, 1):
            return "digits-mlp-64", lambda x: digits_lib.digits_features(
                digits_lib.upsample_digits(x)
            )
    if inception_weights:
        from diffusion_jax.evaluation import inception

        extractor = inception.InceptionFeatures.from_file(inception_weights)
        return "inception-v3-pool3", extractor
    return (
        f"no feature extractor for {data_cfg.source} images of shape {data_shape}: pass "
        "inception_weights (see diffusion_jax/evaluation/inception.py)",
        None,
    )


class _Timer:
    def __init__(self):
        self.times: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Span:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.times[name] = round(time.perf_counter() - self.t0, 2)

        return _Span()


def _sample_metrics(
    metrics: Sequence[str],
    reference: np.ndarray,
    feats: np.ndarray,
    *,
    suffix: str = "",
    k: int,
    num_projections: int = 256,
) -> dict[str, float]:
    """Each metric between ``reference`` and ``feats`` [N, D], named ``{metric}{suffix}``."""
    out: dict[str, float] = {}
    if "fd" in metrics:
        out["fd" + suffix] = distances.frechet_distance_from_features(reference, feats)
    if "pr" in metrics:
        pr = distances.precision_recall(reference, feats, k=k)
        out["precision" + suffix], out["recall" + suffix] = pr["precision"], pr["recall"]
    if "ed" in metrics:
        out["ed" + suffix] = distances.energy_distance(reference, feats)
    if "swd" in metrics:
        out["swd" + suffix] = distances.sliced_wasserstein(
            reference, feats, num_projections=num_projections
        )
    return out


def _levels_walked(config: Any, sampler: str, num_steps: int | None) -> int:
    """The number of noise levels ``sampler`` walks with ``num_steps`` (None: the process's default,
    all T steps of DDPM's process, 18 on a continuous one)."""
    from diffusion_jax import config_utils

    sample = dataclasses.replace(config.sample, sampler=sampler, num_steps=num_steps)
    return config_utils.sampler_num_steps(dataclasses.replace(config, sample=sample))


def evaluate_params(
    params: Any,
    config: Any,
    data_shape: tuple[int, ...],
    *,
    metrics: Sequence[str] = ("fd", "pr", "bpd"),
    sampler: str = "ddim",
    num_steps: int | None = 50,
    eta: float = 0.0,
    num_samples: int | None = None,
    batch_size: int = 256,
    seed: int = 0,
    k: int = 3,
    bpd_examples: int | None = None,
    bpd_batch_size: int = 64,
    bpd_variance: str | None = None,
    ode_bpd_steps: int = 100,
    inception_weights: str | None = None,
    reference_stats: str | None = None,
    max_reference: int = 50_000,
    train_floor_repeats: int = 5,
    export_dir: str | None = None,
) -> dict[str, Any]:
    """Metrics of a model given its (EMA) ``params`` and typed training ``config``; returns a flat dict.

        See the module docstring for the metrics, references and floors. ``num_samples`` defaults to the
        held-out split's size; samples come from ``config``'s sampler with ``sampler``/``num_steps``/
        ``eta`` overridden, batch ``i`` seeded with ``fold_in(key(seed), i)``; class-conditional models
        get labels drawn uniformly with ``seed``. ``bpd_examples`` limits bits/dim to the first examples
        of the held-out split (all by default: T network evaluations per example on the discrete VP process;
    on a continuous one, bits/dim come from the probability-flow ODE with ``ode_bpd_steps`` RK4 steps). ``export_dir`` also
        writes the samples as npz + PNGs there.
    """
    from diffusion_jax import config_utils

    unknown = set(metrics) - set(METRICS)
    if unknown or not metrics:
        raise ValueError(f"unknown or no metrics {sorted(unknown)}; choose from {METRICS}.")
    is_points = len(data_shape) == 1
    if is_points and "bpd" in metrics:
        raise ValueError("bpd is defined for 8-bit image data; use ed/swd/fd/pr for points.")
    if getattr(config, "latent", None) is not None and "bpd" in metrics:
        metrics = [m for m in metrics if m != "bpd"]
        logging.warning(
            "Skipping bpd: a latent diffusion model's bound would be of its latents, not of the "
            "images (the autoencoder's decoder has no likelihood)."
        )
        if not metrics:
            raise ValueError("bpd does not apply to a latent diffusion model; use fd/pr.")
    if not is_points and ({"ed", "swd"} & set(metrics)):
        raise ValueError("ed and swd are for low-dimensional points; use fd/pr for images.")
    timer = _Timer()
    result: dict[str, Any] = {
        "data_source": config.data.source,
        "data_shape": list(data_shape),
        "reference_split": config.data.split,
        "held_out_split": config.data.eval_split,
    }
    num_classes = config.model.num_classes
    with timer("load_data"):
        held_out, held_out_labels = load_split(config.data, config.data.eval_split)
    result["held_out_examples"] = len(held_out)

    sample_metrics = [m for m in metrics if m != "bpd"]
    if reference_stats is not None and "fd" not in metrics:
        raise ValueError("reference_stats are FID statistics: add fd to the metrics, or drop them.")
    if sample_metrics:
        name, feature_fn = feature_fn_for(config.data, data_shape, inception_weights)
        if feature_fn is None:
            raise ValueError(name)
        result["features"] = name
        stats = None  # FD against published (mu, sigma) instead of the training split's features
        if reference_stats is not None:
            if name != "inception-v3-pool3":
                raise ValueError(
                    f"reference_stats are Inception-v3 pool3 statistics, but these samples get "
                    f"{name} features: pass inception_weights (RGB images only)."
                )
            from diffusion_jax.evaluation import inception

            stats = inception.load_reference_statistics(reference_stats)  # before sampling
            result["fd_reference"] = str(reference_stats)
        split_metrics = [m for m in sample_metrics if stats is None or m != "fd"]
        n = len(held_out) if num_samples is None else int(num_samples)
        sample_fn = config_utils.build_sampler(
            config, sampler=sampler, num_steps=num_steps, eta=eta
        )
        labels = None
        if num_classes is not None:  # conditional samples, labels uniform, no guidance
            labels = np.asarray(
                jax.random.randint(jax.random.key(seed + 1), (n,), 0, num_classes), np.int32
            )
        with timer("sampling"):
            samples = generate_samples(
                sample_fn, params, num_samples=n, batch_size=min(batch_size, n),
                image_shape=tuple(data_shape), seed=seed, labels=labels,
            )  # fmt: skip
        result.update(sampler=sampler, num_steps=_levels_walked(config, sampler, num_steps))
        result.update(eta=eta, num_samples=n, seed=seed)
        result["class_conditional_samples"] = labels is not None
        if not np.all(np.isfinite(samples)):
            raise FloatingPointError("the sampler produced non-finite values.")
        if export_dir:
            meta = dict(
                sampler=sampler, num_steps=num_steps, eta=eta, seed=seed, batch_size=batch_size
            )
            result["export"] = export_samples(export_dir, samples, metadata=meta)
        if split_metrics:
            with timer("load_reference"):
                reference, _ = load_split(config.data, config.data.split, limit=max_reference)
            result["reference_examples"] = len(reference)
        floor_n = min(n, len(held_out))
        result["floor_examples"] = floor_n
        with timer("features"):
            ref_f = feature_fn(reference) if split_metrics else None
            sample_f, held_out_f = feature_fn(samples), feature_fn(held_out[:floor_n])
        with timer("distances"):
            if stats is not None:
                for key, f in (("fd", sample_f), ("fd_floor", held_out_f)):
                    fitted = distances.feature_statistics(f)
                    result[key] = distances.frechet_distance(*stats, *fitted)
            if split_metrics:
                result.update(_sample_metrics(split_metrics, ref_f, sample_f, k=k))
                floor = _sample_metrics(split_metrics, ref_f, held_out_f, suffix="_floor", k=k)
                result.update(floor)
            if split_metrics and len(ref_f) >= 2 * floor_n:  # within-train floor: no split shift
                repeats = []
                for r in range(train_floor_repeats):
                    order = np.random.default_rng([seed, r]).permutation(len(ref_f))
                    part, rest = ref_f[order[:floor_n]], ref_f[order[floor_n:]]
                    repeats.append(_sample_metrics(split_metrics, rest, part, k=k))
                for name in repeats[0]:
                    values = [rep[name] for rep in repeats]
                    result[name + "_train_floor"] = float(np.mean(values))
                    result[name + "_train_floor_std"] = float(np.std(values, ddof=1))

    if "bpd" in metrics:
        model = config_utils.build_model(config)
        process = config_utils.build_process(config)
        denoise_fn = config_utils.denoise_fn_for(model)
        if process.is_discrete:  # the exact variational bound over all T steps
            variance = bpd_variance or (
                "learned_range" if config.model.learn_sigma else "fixed_large"
            )
            bpd_fn = make_bpd_fn(
                denoise_fn, process.schedule, prediction=config.diffusion.prediction,
                variance=variance, clip_denoised=True,
            )  # fmt: skip
            method = f"variational bound, {variance}, T={process.num_timesteps}"
        else:  # the probability-flow ODE's likelihood of dequantized data
            if bpd_variance is not None:
                raise ValueError(
                    "bpd_variance applies to the discrete VP process's variational bound; a "
                    f"{process.kind!r} process's bits/dim come from its probability-flow ODE."
                )
            variance = None
            bpd_fn = make_ode_bpd_fn(
                denoise_fn, process, prediction=config.diffusion.prediction,
                num_steps=ode_bpd_steps,
            )  # fmt: skip
            method = f"probability-flow ODE, {ode_bpd_steps} RK4 steps, dequantized"
        x = held_out if bpd_examples is None else held_out[:bpd_examples]
        y = None
        if num_classes is not None and held_out_labels is not None:
            y = held_out_labels[: len(x)]  # class-conditional: -log p(x | y), the true labels
        result["bpd_conditional"] = y is not None
        with timer("bpd"):
            bpd = evaluate_bpd(
                bpd_fn, params, jax.random.key(seed + 2), x,
                batch_size=min(bpd_batch_size, len(x)), labels=y,
            )  # fmt: skip
        result.update(
            bpd=bpd["bpd"], bpd_stderr=bpd["bpd_stderr"], bpd_examples=bpd["num_examples"],
            bpd_variance=variance, bpd_method=method,
        )  # fmt: skip
        if "vb_bpd" in bpd:
            result.update(
                bpd_prior=bpd["prior_bpd"], bpd_decoder=bpd["decoder_bpd"],
                bpd_timesteps=process.num_timesteps,
            )  # fmt: skip
            result["bpd_per_timestep"] = [float(v) for v in bpd["vb_bpd"]]
    result["seconds"] = timer.times
    return result


def workdir_path(workdir: str | os.PathLike) -> epath.Path:
    """A workdir as a path: local ones absolute (``~`` expanded), URLs (``gs://...``) as given."""
    name = os.fspath(workdir)
    return epath.Path(name if "://" in name else os.path.abspath(os.path.expanduser(name)))


def evaluate_workdir(
    workdir: str | os.PathLike,
    *,
    step: int | None = None,
    write: bool = True,
    export: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Evaluates the EMA weights of checkpoint ``step`` (default: the newest readable one, skipping
    damaged ones with a warning) of a training workdir.

    ``options`` are those of :func:`evaluate_params`. With ``write``, the result goes to
    ``<workdir>/eval/step_{step:08d}_{sampler}{num_steps}.json`` and its scalars to TensorBoard
    (``<workdir>/tensorboard``, tags ``eval/<sampler><steps>/<metric>``; floors under
    ``eval/floor/``; bits/dim under ``eval/bpd``). With ``export``, the samples are also written as
    npz + PNGs under ``<workdir>/eval/samples_step{step}_{sampler}{num_steps}/``.
    """
    from diffusion_jax import checkpoints

    workdir = workdir_path(workdir)
    loaded = checkpoints.load_sampler(workdir, step)  # the newest readable one if step is None
    step = loaded.step
    sampler = options.get("sampler", "ddim")
    num_steps = options.get("num_steps", 50)
    tag = f"{sampler}{_levels_walked(loaded.config, sampler, num_steps)}"
    eval_dir = workdir / "eval"
    if export:
        options["export_dir"] = os.fspath(eval_dir / f"samples_step{step}_{tag}")
    logging.info("Evaluating %s at step %d (%s)", workdir, step, tag)
    result = evaluate_params(loaded.params, loaded.config, loaded.data_shape, **options)
    result = {"workdir": os.fspath(workdir), "step": step, **result}
    if write and jax.process_index() == 0:
        eval_dir.mkdir(parents=True, exist_ok=True)
        path = eval_dir / f"step_{step:08d}_{tag}.json"
        tmp = eval_dir / (path.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2, default=str))
        tmp.replace(path)
        result["json"] = os.fspath(path)
        write_tensorboard(os.fspath(workdir / "tensorboard"), step, tag, result)
    return result


SCALARS = ("fd", "precision", "recall", "ed", "swd")


def write_tensorboard(logdir: str, step: int, tag: str, result: dict[str, Any]) -> None:
    """Writes a result's scalars: ``eval/<tag>/<metric>``, ``eval/floor/<metric>``, ``eval/bpd``."""
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(logdir=logdir)
    try:
        for name in SCALARS:
            if name in result:
                writer.add_scalar(f"eval/{tag}/{name}", result[name], step)
            if name + "_floor" in result:
                writer.add_scalar(f"eval/floor/{name}", result[name + "_floor"], step)
            if name + "_train_floor" in result:
                writer.add_scalar(f"eval/train_floor/{name}", result[name + "_train_floor"], step)
        if "bpd" in result and math.isfinite(result["bpd"]):
            writer.add_scalar("eval/bpd", result["bpd"], step)
        writer.flush()
    finally:
        writer.close()


def format_result(result: dict[str, Any]) -> str:
    """One readable line per metric with its floors: ``fd 6.2 (floor 21.3 at n=297; within-train floor 4.1)``."""
    lines = []
    for name in SCALARS:
        if name in result:
            floor = result.get(name + "_floor")
            extra = "" if floor is None else f" (floor {floor:.4g} at n={result['floor_examples']}"
            if name + "_train_floor" in result:
                extra += (
                    f"; within-train floor {result[name + '_train_floor']:.4g}"
                    f" +- {result[name + '_train_floor_std']:.2g}"
                )
            extra += ")" if extra else ""
            lines.append(f"{name:>9} {result[name]:.4g}{extra}")
    if "bpd" in result:
        lines.append(
            f"{'bits/dim':>9} {result['bpd']:.4f} +- {result['bpd_stderr']:.4f} "
            f"({result['bpd_examples']} held-out examples; {result['bpd_method']})"
        )
    return "\n".join(lines)
