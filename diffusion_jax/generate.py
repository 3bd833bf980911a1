"""Samples from a trained workdir with the sampler, guidance and labels chosen at call time.

:func:`make_guided_sampler` loads a run's EMA parameters (and optionally a noise-aware classifier's)
and returns a pure ``sample(params, rng, shape, y=labels, guidance_scale=w)``;
:func:`parse_labels` turns a command-line label spec into per-sample labels; :func:`write_samples`
writes a PNG grid, an ``.npz`` of uint8 images (``arr_0`` [N, H, W, C], ``arr_1`` labels, the layout of
the improved-diffusion / guided-diffusion samplers) and a JSON of how they were made. ``sample.py``
is the command-line front end.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
from etils import epath

import diffusion_jax as dj
from diffusion_jax import checkpoints, config_utils, images


class GuidedSampler(NamedTuple):
    """``sample(params, rng, (n, *data_shape), y=labels [n], guidance_scale=w)`` and what it needs.

    ``config`` is the run's, with the sampler chosen here in ``config.sample``. ``params`` holds the
    diffusion model's EMA parameters, or {"model": ..., "classifier": ...} with
    classifier guidance. ``num_classes`` is None for an unconditional model without a classifier;
    ``null_label`` (= num_classes) is the "no class" label of a model trained with label dropout.
    """

    sample: Callable[..., jax.Array]
    params: Any
    config: config_utils.Config
    data_shape: tuple[int, ...]
    num_classes: int | None
    null_label: int | None
    num_steps: int  # the sampler's number of levels
    step: int  # the training step of the checkpoint whose EMA parameters these are


_SCHEDULE_KEYS = ("process", "discrete", "schedule", "num_timesteps", "beta_start", "beta_end")


def make_guided_sampler(
    workdir: epath.PathLike,
    *,
    step: int | None = None,
    sampler: str | None = None,
    num_steps: int | None = None,
    eta: float | None = None,
    variance: str | None = None,
    guidance_scale: float = 1.0,
    classifier_workdir: epath.PathLike | None = None,
    classifier_scale: float = 0.0,
) -> GuidedSampler:
    """A trained run's sampler with classifier-free guidance (when ``guidance_scale != 1``) and/or
    classifier guidance (a classifier workdir and ``classifier_scale``); None keeps the run's
    ``config.sample`` choice (``num_steps=0`` means all T steps). ``variance`` is the ddpm
    sampler's reverse variance (see :class:`config_utils.SampleConfig`)."""
    run = checkpoints.load_sampler(workdir, step)
    params, config, data_shape = run.params, run.config, run.data_shape
    model_classes = config.model.num_classes
    can_drop_labels = model_classes is not None and config.diffusion.label_dropout > 0
    if guidance_scale != 1.0 and not can_drop_labels:
        raise ValueError(
            f"--guidance_scale={guidance_scale} needs a class-conditional model trained with label "
            f"dropout (diffusion.label_dropout > 0); {workdir} has model.num_classes={model_classes}, "
            f"label_dropout={config.diffusion.label_dropout}. Use --guidance_scale=1."
        )
    denoise = config_utils.denoise_fn_for(config_utils.build_model(config))
    if (
        model_classes is None
    ):  # an unconditional model ignores the labels (they are the classifier's)
        unconditional = denoise
        denoise = lambda p, x_t, t, y=None, **kw: unconditional(p, x_t, t, **kw)  # x_self_cond
    if guidance_scale != 1.0:
        denoise = dj.classifier_free_guidance(denoise, null_label=model_classes)
    else:  # the labels go to the model as they are; guidance_scale is accepted and ignored
        plain = denoise
        denoise = lambda p, x_t, t, guidance_scale=1.0, **kw: plain(p, x_t, t, **kw)

    cond_fn, num_classes = None, model_classes
    if classifier_workdir is not None and config.latent is not None:
        raise ValueError(
            f"{workdir} is a latent diffusion run: a noise-aware classifier of images cannot guide "
            "its sampler, which works on the autoencoder's latents."
        )
    if classifier_workdir is not None:
        from diffusion_jax import classifier_trainer

        classifier_fn, classifier_params, classifier_config = classifier_trainer.load_classifier(
            classifier_workdir
        )
        _check_same_schedule(config, classifier_config, workdir, classifier_workdir)
        num_classes = classifier_config.classifier["num_classes"]
        if model_classes is not None and num_classes != model_classes:
            raise ValueError(
                f"the classifier has {num_classes} classes but the model {model_classes}."
            )
        model_denoise = denoise
        denoise = lambda p, x_t, t, **kw: model_denoise(p["model"], x_t, t, **kw)
        cond_fn = dj.classifier_guidance(
            lambda p, x_t, t: classifier_fn(p["classifier"], x_t, t), classifier_scale
        )
        params = {"model": params, "classifier": classifier_params}
    elif classifier_scale:
        raise ValueError(
            "--classifier_scale needs --classifier_workdir (a train_classifier.py run)."
        )

    overrides = {"sampler": sampler, "eta": eta, "variance": variance}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if num_steps is not None:
        overrides["num_steps"] = num_steps or None  # 0: all T steps
    config = dataclasses.replace(config, sample=dataclasses.replace(config.sample, **overrides))
    sample = config_utils.build_sampler(config, denoise_fn=denoise, cond_fn=cond_fn)
    null_label = model_classes if can_drop_labels else None
    num_steps = config_utils.sampler_num_steps(config)
    return GuidedSampler(
        sample, params, config, data_shape, num_classes, null_label, num_steps, run.step
    )


def _check_same_schedule(config, classifier_config, workdir, classifier_workdir) -> None:
    model_d, clf_d = config.diffusion, classifier_config.diffusion
    for key in _SCHEDULE_KEYS:
        if getattr(model_d, key) != getattr(clf_d, key):
            raise ValueError(
                f"the classifier in {classifier_workdir} was trained on diffusion.{key}="
                f"{getattr(clf_d, key)!r} but the model in {workdir} on {getattr(model_d, key)!r}: "
                "a classifier guides only a model with the same forward process."
            )


def parse_labels(
    spec: str, num_samples: int, num_classes: int | None, null_label: int | None
) -> np.ndarray | None:
    """Per-sample int32 labels [num_samples] from a spec: "all" (0, 1, ..., K-1, 0, ...), a
    comma-separated list such as "3" or "1,7" (repeated), or "none" (the null label: unconditional
    samples of a model trained with label dropout). None for an unconditional model."""
    spec = spec.strip().lower()
    if num_classes is None:
        if spec not in ("all", "none"):
            raise ValueError(
                f"--labels={spec!r}: this model is unconditional (and no classifier was given)."
            )
        return None
    if spec == "all":
        return (np.arange(num_samples) % num_classes).astype(np.int32)
    if spec == "none":
        if null_label is None:
            raise ValueError(
                "--labels=none needs a model trained with label dropout (diffusion.label_dropout > 0)."
            )
        return np.full((num_samples,), null_label, np.int32)
    try:
        values = [int(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise ValueError(
            f"--labels={spec!r}: expected 'all', 'none' or integers like '3' or '1,7'."
        ) from None
    bad = [v for v in values if not 0 <= v < num_classes]
    if not values or bad:
        raise ValueError(f"--labels={spec!r}: class labels must lie in 0..{num_classes - 1}.")
    return np.resize(np.asarray(values, np.int32), num_samples)


def write_samples(
    directory: epath.PathLike,
    name: str,
    samples: np.ndarray,
    labels: np.ndarray | None,
    *,
    columns: int | None = None,
    metadata: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Writes ``name``.png (grid), ``name``.npz (uint8 ``arr_0``, labels ``arr_1``) and ``name``.json.

    ``samples``: [N, H, W, C] in [-1, 1], or [N, 2] points (then a scatter plot, float32 ``arr_0``).
    Works for local and ``gs://`` directories. Returns {"png", "npz", "json"} paths.
    """
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    samples = np.asarray(samples)
    arrays = [images.to_uint8(samples) if samples.ndim == 4 else samples.astype(np.float32)]
    if labels is not None:
        arrays.append(np.asarray(labels, np.int32))
    buffer = io.BytesIO()
    np.savez(buffer, *arrays)
    paths = {k: directory / f"{name}.{k}" for k in ("png", "npz", "json")}
    paths["npz"].write_bytes(buffer.getvalue())
    images.save_png(paths["png"], images.picture(samples, columns=columns))
    info = {
        "layout": "arr_0: uint8 [N, H, W, C] = round((x + 1) * 127.5); arr_1: int32 labels"
        if samples.ndim == 4
        else "arr_0: float32 [N, D] points; arr_1: int32 labels",
        "shape": list(samples.shape),
        **(metadata or {}),
    }
    paths["json"].write_text(json.dumps(info, indent=2, sort_keys=True))
    return {k: str(v) for k, v in paths.items()}
