"""Training configs: an ``ml_collections.ConfigDict`` from ``configs/*.py`` -> one typed, checked :class:`Config`.

This is the only place that reads a ConfigDict. :func:`parse_config` rejects unknown keys (naming
the key and the nearest known one) and bad values, and returns frozen dataclasses; the U-Net, the
schedule and the samplers are then built from those by :func:`build_model`, :func:`build_schedule`
and :func:`build_sampler`, and never see a ConfigDict.

Step counts are in batches (calls of the training step); with ``optim.grad_accum_steps = k`` the
optimiser, the learning-rate schedule and the EMA advance once every k batches.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import diffusion_jax as dj
from diffusion_jax import latent as latent_lib
from diffusion_jax.models import AutoencoderKL, DiT, MLPDenoiser, UNet

MODELS: dict[str, type[nn.Module]] = {"unet": UNet, "dit": DiT, "mlp": MLPDenoiser}
# No float16: training has no loss scaling, so small float16 gradients would flush to zero;
# bfloat16 keeps float32's exponent range and needs none.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# What a run is: its checkpoints continue only under a config that agrees on these keys (a name
# covers its whole section). They fix the state's arrays (model, optimiser), what the loss means
# (diffusion), the examples and their order (data; train.batch_size, as the data position counts
# batches) and the random streams (seed); the post-hoc EMA profiles are arrays of the state, each
# averaged since step 1; a classifier run's network is its "classifier" section, an autoencoder
# run's network and loss its "autoencoder" section; a latent diffusion run's data are the latents
# of the autoencoder (checkpoint, scale factor, network) its "latent" section records. Everything
# else may change between runs: how long (train.num_steps), the learning rate and its schedule,
# EMA, logging, checkpoints, samples, sharding.
RUN_DEFINING_KEYS = (
    "seed",
    "model",
    "classifier",
    "autoencoder",
    "latent",
    "diffusion",
    "data",
    "train.batch_size",
    "optim.optimizer",
    "optim.grad_accum_steps",
    "ema.posthoc_sigma_rels",
)
# Data keys that say only where the files are and how fast they are read.
ADJUSTABLE_DATA_KEYS = (
    "data.data_dir",
    "data.download",
    "data.eval_split",
    "data.on_bad_file",
    "data.verify_images",
    "data.num_workers",
    "data.num_threads",
    "data.prefetch_batches",
)
# Other keys inside run-defining sections that say only where things are: the autoencoder's
# checkpoint is fixed by latent.autoencoder_step and checked against latent.autoencoder.
ADJUSTABLE_KEYS = (*ADJUSTABLE_DATA_KEYS, "latent.autoencoder_workdir")
# Keys of which only a property defines the run: clipping on or off changes the optimiser state's
# structure, a new clipping threshold does not.
_RUN_DEFINING_PROPERTIES: dict[str, Callable[[Any], Any]] = {
    "optim.grad_clip_norm": lambda norm: norm > 0,
}


class ConfigError(ValueError):
    """A config key is unknown, or its value has the wrong type or is out of range."""


def _choice(path: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{path}={value!r} is not one of {allowed}.")


def _at_least(path: str, value: Any, low: float, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value < low:
        raise ConfigError(f"{path}={value!r} must be >= {low}.")


def check_module_kwargs(
    module_cls: type[nn.Module], kwargs: Mapping[str, Any], section: str, where: str
) -> dict[str, Any]:
    """``kwargs`` of a Flax module from a config ``section``, lists (from JSON) as tuples so equal
    configs compare equal; an unknown key or dtype name raises :class:`ConfigError` naming it."""
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    known = _module_fields(module_cls)
    for key, value in kwargs.items():
        if key not in known:
            where = f" for model {where!r}" if where else ""
            raise ConfigError(_unknown_key_message(f"{section}.{key}", key, known, where))
        if key in ("dtype", "param_dtype"):
            if value == "float16":
                raise ConfigError(
                    f"{section}.{key}='float16' is not supported: training has no loss scaling, "
                    "so small float16 gradients would underflow to zero. Use 'bfloat16' (float32's "
                    "exponent range, no loss scaling needed) or 'float32'."
                )
            _choice(f"{section}.{key}", value, tuple(DTYPES))
    return kwargs


def module_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Checked config kwargs -> constructor arguments (dtype strings as JAX dtypes)."""
    return {k: DTYPES[v] if k in ("dtype", "param_dtype") else v for k, v in kwargs.items()}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """``name`` ("unet" | "dit" | "mlp") and the keyword arguments of that Flax module (dtype as a
    string)."""

    name: str = "unet"
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        _choice("model.name", self.name, tuple(MODELS))
        kwargs = check_module_kwargs(MODELS[self.name], self.kwargs, "model", self.name)
        object.__setattr__(self, "kwargs", kwargs)

    def module_kwargs(self) -> dict[str, Any]:
        """The constructor arguments: sequences as tuples, dtype strings as JAX dtypes."""
        return module_kwargs(self.kwargs)

    @property
    def num_classes(self) -> int | None:
        """Number of classes of a class-conditional model (None if unconditional)."""
        return self.kwargs.get("num_classes")

    @property
    def learn_sigma(self) -> bool:
        return bool(self.kwargs.get("learn_sigma", False))

    @property
    def self_condition(self) -> bool:
        """Whether the denoiser takes its previous x_0 estimate as input (Analog Bits)."""
        return bool(self.kwargs.get("self_condition", False))


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    """The noise process and the training objective (see :func:`dj.make_process`, :func:`dj.diffusion_loss`).

    ``process``: "vp" (the beta ``schedule`` with ``num_timesteps`` steps; ``discrete`` trains on the
    T integer steps as DDPM, else on continuous t), "flow" (rectified flow) or "edm" (Karras et al.
    2022, ``sigma_min``/``sigma_max``/``rho``). ``prediction``: "eps", "x0", "v", "flow" (velocity
    eps - x_0) or "edm" (the preconditioned denoiser, with ``sigma_data``). ``time_sampling``:
    "uniform", "logit_normal" (location/scale ``time_loc``/``time_scale``, SD3) or "log_normal"
    (ln(sigma/alpha) ~ N(time_loc, time_scale^2), EDM's P_mean/P_std = -1.2/1.2).
    ``loss``: "simple" (L_simple, Ho et al. eq. 14) or "hybrid" (L_simple + lambda_vlb L_vlb for a
    ``learn_sigma`` model on the discrete VP process). ``label_dropout``: fraction of labels
    replaced by the null class (classifier-free guidance training).
    """

    process: str = "vp"
    schedule: str = "linear"
    num_timesteps: int = 1000
    beta_start: float | None = None
    beta_end: float | None = None
    discrete: bool = True
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    sigma_data: float = 0.5
    prediction: str = "eps"
    time_sampling: str = "uniform"
    time_loc: float = 0.0
    time_scale: float = 1.0
    loss: str = "simple"
    loss_type: str = "l2"
    min_snr_gamma: float | None = None
    lambda_vlb: float = 1e-3
    label_dropout: float = 0.0

    def __post_init__(self):
        _choice("diffusion.process", self.process, dj.processes.PROCESSES)
        _choice("diffusion.schedule", self.schedule, dj.schedules.SCHEDULE_NAMES)
        _at_least("diffusion.num_timesteps", self.num_timesteps, 2)
        _choice("diffusion.prediction", self.prediction, dj.forward.OBJECTIVES)
        _choice("diffusion.time_sampling", self.time_sampling, dj.processes.TIME_SAMPLINGS)
        _choice("diffusion.loss", self.loss, ("simple", "hybrid"))
        _choice("diffusion.loss_type", self.loss_type, ("l2", "l1"))
        if self.min_snr_gamma is not None and not self.min_snr_gamma > 0:
            raise ConfigError(
                f"diffusion.min_snr_gamma={self.min_snr_gamma!r} must be > 0 or None."
            )
        if not 0.0 <= self.label_dropout < 1.0:
            raise ConfigError(f"diffusion.label_dropout={self.label_dropout!r} must be in [0, 1).")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ConfigError(
                f"diffusion.sigma_min={self.sigma_min!r} and sigma_max={self.sigma_max!r} must "
                "satisfy 0 < sigma_min < sigma_max."
            )
        for key in ("rho", "sigma_data", "time_scale"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"diffusion.{key}={getattr(self, key)!r} must be > 0.")
        if self.process == "flow" and self.prediction == "eps":
            raise ConfigError(
                "diffusion.prediction='eps' cannot give x_0 at the flow process's t = 1 (alpha = 0, "
                "pure noise): use 'flow' (the velocity, as rectified flow does), 'v' or 'x0'."
            )
        if self.loss == "hybrid" and not (self.process == "vp" and self.discrete):
            raise ConfigError(
                "diffusion.loss='hybrid' (learned variance) is defined on the discrete VP process "
                f"only; got process={self.process!r}, discrete={self.discrete}."
            )
        if self.schedule == "cosine" and (self.beta_start, self.beta_end) != (None, None):
            raise ConfigError(
                "diffusion.beta_start/beta_end do not apply to the cosine schedule (its betas come "
                "from alpha-bar(t) = cos^2(...)); remove them or choose another schedule."
            )

    @property
    def is_discrete_vp(self) -> bool:
        """True for the T-step DDPM process (the only one with learned variance and the exact VLB)."""
        return self.process == "vp" and self.discrete


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Adam / AdamW with linear warm-up, then a constant, cosine or linear learning rate.

    ``grad_clip_norm``: clip the global gradient norm to this (0: no clipping).
    ``grad_accum_steps``: average the gradients of this many batches per update (``optax.MultiSteps``).
    ``end_lr_factor``: the cosine / linear schedules end at ``learning_rate * end_lr_factor``.
    """

    optimizer: str = "adam"
    learning_rate: float = 2e-4
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    end_lr_factor: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip_norm: float = 1.0
    grad_accum_steps: int = 1

    def __post_init__(self):
        _choice("optim.optimizer", self.optimizer, ("adam", "adamw"))
        _choice("optim.lr_schedule", self.lr_schedule, ("constant", "cosine", "linear"))
        if not self.learning_rate > 0:
            raise ConfigError(f"optim.learning_rate={self.learning_rate!r} must be > 0.")
        _at_least("optim.warmup_steps", self.warmup_steps, 0)
        _at_least("optim.weight_decay", self.weight_decay, 0.0)
        _at_least("optim.grad_accum_steps", self.grad_accum_steps, 1)
        _at_least("optim.grad_clip_norm", self.grad_clip_norm, 0.0)
        if self.weight_decay and self.optimizer == "adam":
            raise ConfigError(
                f"optim.weight_decay={self.weight_decay} needs optim.optimizer='adamw' (Adam has none)."
            )


@dataclasses.dataclass(frozen=True)
class EmaConfig:
    """EMA of the parameters: ema <- decay * ema + (1 - decay) * params after each update.

    ``warmup``: use min(decay, (1 + n) / (10 + n)) at update n, so early EMAs track the weights.
    ``posthoc_sigma_rels``: also keep the power-function EMAs of these relative widths (EDM2 uses
    (0.05, 0.10); empty: off) and save them every ``posthoc_every_steps`` batches and at the end,
    for a post-hoc EMA of any width (:mod:`diffusion_jax.posthoc_ema`).
    """

    decay: float = 0.9999
    warmup: bool = False
    posthoc_sigma_rels: tuple[float, ...] = ()
    posthoc_every_steps: int = 1000

    def __post_init__(self):
        if not 0.0 <= self.decay < 1.0:
            raise ConfigError(f"ema.decay={self.decay!r} must be in [0, 1).")
        object.__setattr__(self, "posthoc_sigma_rels", tuple(self.posthoc_sigma_rels))
        widest = (1 / 12) ** 0.5  # gamma = 0: the uniform average
        if not all(0 < s <= widest for s in self.posthoc_sigma_rels):
            raise ConfigError(
                f"ema.posthoc_sigma_rels={self.posthoc_sigma_rels!r}: each must be in "
                f"(0, {widest:.4f}] (EDM2 uses (0.05, 0.10))."
            )
        if len(set(self.posthoc_sigma_rels)) < len(self.posthoc_sigma_rels):
            raise ConfigError(
                f"ema.posthoc_sigma_rels={self.posthoc_sigma_rels!r} repeats a width."
            )
        _at_least("ema.posthoc_every_steps", self.posthoc_every_steps, 1)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The loop: global ``batch_size`` (split over all devices and hosts), ``num_steps`` batches.

    ``on_nonfinite``: "stop" (raise, naming the step; the last checkpoint stays as it was) or "skip"
    (drop the update of that batch and count it in the ``nonfinite_steps`` scalar).
    """

    batch_size: int = 128
    num_steps: int = 10_000
    log_every_steps: int = 100
    on_nonfinite: str = "stop"

    def __post_init__(self):
        _at_least("train.batch_size", self.batch_size, 1)
        _at_least("train.num_steps", self.num_steps, 0)
        _at_least("train.log_every_steps", self.log_every_steps, 1)
        _choice("train.on_nonfinite", self.on_nonfinite, ("stop", "skip"))


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints every ``every_steps`` batches and at the end; the newest ``keep`` are kept."""

    every_steps: int = 5000
    keep: int = 3
    async_save: bool = True

    def __post_init__(self):
        _at_least("checkpoint.every_steps", self.every_steps, 1)
        _at_least("checkpoint.keep", self.keep, 1)


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """Sample grids of ``num_samples`` (0: none) from the EMA parameters every ``every_steps`` batches
    (0: only at the end).

    ``sampler``, ``num_steps`` (None: all T steps of the discrete VP process, 18 on the others),
    ``spacing`` (None: the sampler's default), ``eta`` (DDIM), ``rho`` (karras spacing; None: the
    process's) and EDM's churn ``s_churn``/``s_tmin``/``s_tmax``/``s_noise`` (heun) as in
    :func:`dj.make_sampler`. ``variance``: the ddpm sampler's reverse variance, "fixed_small"
    (the posterior's, beta-tilde_t), "fixed_large" (beta_t, the DDPM paper's CIFAR-10 setting) or
    "learned_range" (a ``model.learn_sigma`` model's own); None: "learned_range" for a
    ``learn_sigma`` model, else "fixed_small" (see :func:`sample_variance`). The other samplers
    do not use it.
    """

    every_steps: int = 0
    num_samples: int = 64
    sampler: str = "ddpm"
    num_steps: int | None = None
    spacing: str | None = None
    eta: float = 0.0
    clip_denoised: bool = True
    rho: float | None = None
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = float("inf")
    s_noise: float = 1.0
    variance: str | None = None

    def __post_init__(self):
        _at_least("sample.every_steps", self.every_steps, 0)
        _at_least("sample.num_samples", self.num_samples, 0)
        _choice("sample.sampler", self.sampler, dj.sampling.SAMPLERS)
        _at_least("sample.num_steps", self.num_steps, 1, allow_none=True)
        if self.spacing is not None:
            _choice("sample.spacing", self.spacing, dj.schedules.SPACINGS + ("karras",))
        _at_least("sample.eta", self.eta, 0.0)
        _at_least("sample.s_churn", self.s_churn, 0.0)
        _at_least("sample.s_noise", self.s_noise, 0.0)
        if self.variance is not None:
            _choice("sample.variance", self.variance, dj.sampling.VARIANCES)
        if self.s_churn > 0 and self.sampler != "heun":
            raise ConfigError(
                f"sample.s_churn={self.s_churn} (EDM's churn) needs sample.sampler='heun', got "
                f"{self.sampler!r}."
            )

    def sampler_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`dj.make_sampler` this section sets (``variance``, which
        depends on the model when None, comes from :func:`sample_variance`)."""
        names = ("sampler", "num_steps", "spacing", "eta", "clip_denoised", "rho")
        names += ("s_churn", "s_tmin", "s_tmax", "s_noise")
        return {k: getattr(self, k) for k in names}


@dataclasses.dataclass(frozen=True)
class ShardingConfig:
    """Parameters with at least ``fsdp_min_size`` elements are sharded over the ``data`` axis
    (FSDP-style, with their optimiser and EMA copies); 0 replicates every parameter."""

    fsdp_min_size: int = 0

    def __post_init__(self):
        _at_least("sharding.fsdp_min_size", self.fsdp_min_size, 0)


@dataclasses.dataclass(frozen=True)
class ProfileConfig:
    """A ``jax.profiler`` trace of ``num_steps`` training steps (0: none) from step ``start_step``
    into ``<workdir>/tensorboard/plugins/profile/``, for TensorBoard's profile plugin; process 0
    only. Steps count from 1 over the whole run, as ``train.num_steps`` does: start past the first
    step (compilation), and a run resumed after ``start_step`` traces nothing."""

    start_step: int = 10
    num_steps: int = 0

    def __post_init__(self):
        _at_least("profile.start_step", self.start_step, 1)
        _at_least("profile.num_steps", self.num_steps, 0)


@dataclasses.dataclass(frozen=True)
class LatentConfig:
    """Latent diffusion (Rombach et al. 2022): the model learns the latents of the frozen
    :class:`AutoencoderKL` trained in ``autoencoder_workdir`` (``train.py`` with an autoencoder
    config) instead of the images.

    Each training batch is encoded inside the step with the autoencoder's EMA parameters to a
    posterior sample z = scale_factor * (mean + exp(logvar / 2) * eps), as LDM does; samples are
    decoded back to images. ``autoencoder_step``: its checkpoint (None: the newest);
    ``scale_factor``: None takes 1/std of its latents from ``<autoencoder_workdir>/latent_stats.json``
    (:data:`latent.LATENT_STATS_FILE`). The trainer fills both in, and ``autoencoder`` (the
    autoencoder's network, which the user does not set), before the run starts, so that the run's
    ``config.json`` says exactly which latents it learned and samplers decode with the same.
    """

    autoencoder_workdir: str | None = None
    autoencoder_step: int | None = None
    scale_factor: float | None = None
    autoencoder: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        _at_least("latent.autoencoder_step", self.autoencoder_step, 0, allow_none=True)
        if self.scale_factor is not None and not self.scale_factor > 0:
            raise ConfigError(f"latent.scale_factor={self.scale_factor!r} must be > 0 or None.")
        object.__setattr__(
            self, "autoencoder", autoencoder_module_kwargs(self.autoencoder, "latent.autoencoder")
        )

    @property
    def resolved(self) -> bool:
        """Whether the trainer has recorded the autoencoder's step, scale factor and network."""
        return (
            self.autoencoder_step is not None
            and self.scale_factor is not None
            and bool(self.autoencoder)
        )


def autoencoder_module_kwargs(
    section: Mapping[str, Any], path: str = "autoencoder"
) -> dict[str, Any]:
    """The :class:`AutoencoderKL` keyword arguments of an autoencoder config section (its keys
    other than ``loss``), checked as :func:`check_module_kwargs` does."""
    kwargs = {k: v for k, v in section.items() if k != "loss"}
    return check_module_kwargs(AutoencoderKL, kwargs, path, "")


def build_autoencoder(kwargs: Mapping[str, Any]) -> AutoencoderKL:
    """The :class:`AutoencoderKL` of checked keyword arguments (dtype names as strings)."""
    return AutoencoderKL(**module_kwargs(kwargs))


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole training run; built only by :func:`parse_config`."""

    seed: int
    data: Any  # diffusion_jax.data.DataConfig, checked by data.to_data_config
    model: ModelConfig
    diffusion: DiffusionConfig
    optim: OptimConfig
    ema: EmaConfig
    train: TrainConfig
    checkpoint: CheckpointConfig
    sample: SampleConfig
    sharding: ShardingConfig
    profile: ProfileConfig = ProfileConfig()
    latent: LatentConfig | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready nested dict that :func:`parse_config` turns back into this config (no
        ``latent`` key for a run on the data themselves)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.name == "latent":
                continue
            if isinstance(value, ModelConfig):
                value = {"name": value.name, **value.kwargs}
            elif dataclasses.is_dataclass(value):
                value = dataclasses.asdict(value)
            out[f.name] = value
        return json.loads(json.dumps(out))  # tuples -> lists: what a JSON file gives back


_SECTIONS = {
    "diffusion": DiffusionConfig,
    "optim": OptimConfig,
    "ema": EmaConfig,
    "train": TrainConfig,
    "checkpoint": CheckpointConfig,
    "sample": SampleConfig,
    "sharding": ShardingConfig,
    "profile": ProfileConfig,
}


def _module_fields(module_cls: type[nn.Module]) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(module_cls) if f.name not in ("parent", "name"))


def _unknown_key_message(
    path: str, key: str, known: tuple[str, ...], where: str = "", kind: str = "key"
) -> str:
    near = difflib.get_close_matches(key, known, n=1)
    hint = f" Did you mean {near[0]!r}?" if near else ""
    return f"unknown config {kind} {path!r}{where}.{hint} Known keys: {sorted(known)}."


def as_dict(cfg: Any) -> dict[str, Any]:
    """A config (ConfigDict, typed config or nested mapping) as a nested dict."""
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    if isinstance(cfg, Mapping):
        return {k: as_dict(v) if isinstance(v, Mapping) else v for k, v in cfg.items()}
    raise ConfigError(f"expected a ConfigDict or a mapping, got {type(cfg).__name__}.")


def _check_type(path: str, value: Any, hint: Any) -> Any:
    """``value`` checked against a field's type hint (int, float, bool, str, X | None); ints widen to float."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{path} must not be None.")
    for option in options:
        if typing.get_origin(option) is tuple and isinstance(value, (tuple, list)):  # tuple[T, ...]
            item = typing.get_args(option)[0]
            return tuple(_check_type(f"{path}[{i}]", v, item) for i, v in enumerate(value))
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is str and isinstance(value, str):
            return value
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ConfigError(f"{path}={value!r} has type {type(value).__name__}; expected {names}.")


def parse_section(cls: type, values: Mapping[str, Any], path: str):
    """The section dataclass ``cls`` (e.g. :class:`TrainConfig`) of ``values``, each checked
    against its type hint; an unknown key raises :class:`ConfigError` naming ``path.key``."""
    hints = typing.get_type_hints(cls)
    known = tuple(hints)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(_unknown_key_message(f"{path}.{key}", key, known))
        kwargs[key] = _check_type(f"{path}.{key}", value, hints[key])
    return cls(**kwargs)


def parse_seed_and_data(values: Mapping[str, Any], sections: tuple[str, ...]) -> tuple[int, Any]:
    """(seed, checked DataConfig) of a config dict whose other top-level keys must be ``sections``."""
    from diffusion_jax import data as data_lib

    top = ("seed", "data", *sections)
    for key in values:
        if key not in top:
            raise ConfigError(_unknown_key_message(key, key, top))
    seed = _check_type("seed", values.get("seed", 0), int)
    try:
        return seed, data_lib.to_data_config(values.get("data", {}))
    except ValueError as e:
        raise ConfigError(str(e)) from e


def parse_config(cfg: Any) -> Config:
    """Checks a training config (ConfigDict or nested mapping) and returns the typed :class:`Config`.

    Missing keys take the dataclass defaults; an unknown key anywhere raises :class:`ConfigError`
    naming it. The ``data`` section is checked by ``diffusion_jax.data.to_data_config``.
    """
    values = as_dict(cfg)
    kind = run_kind(values)
    if kind != "diffusion":
        raise ConfigError(
            f"this is the config of {RUN_KINDS[kind]}, not of a diffusion model (it has a {kind!r} "
            "section); train it with train.py, which dispatches on the kind."
        )
    seed, data_cfg = parse_seed_and_data(values, ("model", "latent", *_SECTIONS))
    model_values = dict(values.get("model", {}))
    name = model_values.pop("name", "unet")
    model = ModelConfig(name=name, kwargs=model_values)
    sections = {key: parse_section(cls, values.get(key, {}), key) for key, cls in _SECTIONS.items()}
    latent = None
    if values.get("latent") is not None:
        latent_values = dict(values["latent"])
        autoencoder = latent_values.pop("autoencoder", None) or {}
        latent = parse_section(LatentConfig, latent_values, "latent")
        latent = dataclasses.replace(latent, autoencoder=autoencoder)
    config = Config(seed=seed, data=data_cfg, model=model, latent=latent, **sections)
    _check_consistency(config)
    return config


# The kinds of training run, by the config section that marks them: train.py dispatches on it, and
# a workdir of one kind never continues as another (checkpoints.check_compatible).
RUN_KINDS = {
    "diffusion": "a diffusion model",
    "classifier": "a noise-aware classifier (train_classifier.py)",
    "autoencoder": "an autoencoder (train.py with an autoencoder config)",
}


def run_kind(cfg: Any) -> str:
    """The kind of training run a config is (a key of :data:`RUN_KINDS`): "classifier" or
    "autoencoder" when it has that section, else "diffusion" (with or without a ``latent``
    section). ``cfg``: a ConfigDict, a nested mapping (e.g. a ``config.json``) or a typed config."""
    values = as_dict(cfg)
    marked = [kind for kind in RUN_KINDS if kind != "diffusion" and kind in values]
    if len(marked) > 1:
        raise ConfigError(f"a config has at most one of the sections {marked}.")
    return marked[0] if marked else "diffusion"


def describe_run(cfg: Any) -> str:
    """What a config trains, for messages: :data:`RUN_KINDS`'s words, "a latent diffusion model"
    for a diffusion config with a ``latent`` section."""
    values = as_dict(cfg)
    kind = run_kind(values)
    if kind == "diffusion" and values.get("latent") is not None:
        return "a latent diffusion model"
    return RUN_KINDS[kind]


def _check_consistency(config: Config) -> None:
    """Checks between sections: loss vs learned variance, labels vs classes."""
    if config.model.learn_sigma and not config.diffusion.is_discrete_vp:
        raise ConfigError(
            "model.learn_sigma=True (learned variance) is defined on the discrete VP process only; "
            f"diffusion.process={config.diffusion.process!r}."
        )
    if config.diffusion.loss == "hybrid" and not config.model.learn_sigma:
        raise ConfigError("diffusion.loss='hybrid' needs model.learn_sigma=True.")
    if config.model.learn_sigma and config.diffusion.loss != "hybrid":
        raise ConfigError(
            "model.learn_sigma=True needs diffusion.loss='hybrid' to train the variance."
        )
    sample_variance(config)
    if config.diffusion.label_dropout and config.model.num_classes is None:
        raise ConfigError(
            "diffusion.label_dropout > 0 needs a class-conditional model (model.num_classes)."
        )
    if config.model.num_classes is not None and not config.data.use_labels:
        raise ConfigError(
            "model.num_classes is set but data.use_labels=False: the model needs labels."
        )
    if config.latent is not None and not config.latent.autoencoder_workdir:
        raise ConfigError(
            "latent.autoencoder_workdir must name the workdir of a trained autoencoder (train.py "
            "with e.g. configs/digits_autoencoder.py); drop the latent section to train on the "
            "data themselves."
        )
    if config.latent is not None and config.model.name == "mlp":
        raise ConfigError("latent diffusion needs an image model (unet or dit), not 'mlp'.")
    if config.latent is not None and config.sample.clip_denoised:
        raise ConfigError(
            "sample.clip_denoised=True would clip the predicted x_0 to [-1, 1], but a latent "
            "diffusion model's x_0 are latents of unit variance, not images: set "
            "sample.clip_denoised=False (as LDM samples)."
        )


def sample_variance(config: Config) -> str:
    """The reverse variance ``config.sample`` asks for: its ``variance``, or the model's default
    ("learned_range" for a ``model.learn_sigma`` model, else "fixed_small"). A learned-variance
    model may also sample with a fixed variance (its variance channels are then unused);
    "learned_range" without them raises :class:`ConfigError`."""
    learned = config.model.learn_sigma
    variance = config.sample.variance
    if variance is None:
        return "learned_range" if learned else "fixed_small"
    if variance == "learned_range" and not learned:
        raise ConfigError(
            "sample.variance='learned_range' needs a model trained with learned variance "
            "(model.learn_sigma=True); this model predicts no variance: use 'fixed_small' or "
            "'fixed_large'."
        )
    return variance


def defines_run(key: str) -> bool:
    """Whether a flat config key ("optim.optimizer") is part of what a run is (see
    :data:`RUN_DEFINING_KEYS`), so that changing it needs a new workdir."""
    if key in ADJUSTABLE_KEYS:
        return False
    return key in _RUN_DEFINING_PROPERTIES or any(
        key == k or key.startswith(k + ".") for k in RUN_DEFINING_KEYS
    )


def incompatible_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Differences in the keys that define a run (:func:`defines_run`) between two
    ``Config.to_dict()``s, as 'key: old -> new'.

    A key the saved config lacks (a run from before the key existed) counts as its default value.
    """
    changes = []
    try:
        saved = parse_config(saved).to_dict()
    except ConfigError:
        pass  # compare as saved; the differences will name what changed

    def flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
        out = {}
        for k, v in d.items():
            if isinstance(v, Mapping):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    old, new = flat(saved), flat(current)
    for key in sorted(set(old) | set(new)):
        if not defines_run(key):
            continue
        a, b = old.get(key), new.get(key)
        if key in _RUN_DEFINING_PROPERTIES and a is not None and b is not None:
            differs = _RUN_DEFINING_PROPERTIES[key](a) != _RUN_DEFINING_PROPERTIES[key](b)
        else:
            differs = a != b
        if differs:
            changes.append(f"{key}: {a!r} -> {b!r}")
    return changes


def check_overrides(config: Any, argv: Sequence[str], flag: str = "config") -> None:
    """Checks the ``--config.a.b=v`` overrides in ``argv`` against the keys of ``config`` (the
    ConfigDict they override) before ml_collections applies them, which answers a misspelt section
    with a bare ``KeyError``. Raises :class:`ConfigError` naming the first unknown section or key
    and the nearest known one."""
    pattern = re.compile(rf"^-{{1,2}}(?:no)?{re.escape(flag)}\.([^=]+)")
    for arg in argv:
        match = pattern.match(arg)
        if match is None:
            continue
        parts = match.group(1).split(".")
        node = config
        for i, part in enumerate(parts):
            name = part.split("[", 1)[0]  # ch_mult[0]: an element of a sequence
            path = ".".join([*parts[:i], name])
            if not hasattr(node, "keys"):
                raise ConfigError(f"{'.'.join(parts[:i])!r} is a value, not a section: {arg}")
            if name not in node.keys():
                kind = "section" if i < len(parts) - 1 else "key"
                known = tuple(node.keys())
                raise ConfigError(_unknown_key_message(path, name, known, f" in {arg}", kind))
            node = node[name]


def check_command_line(argv: Sequence[str], flag: str = "config") -> None:
    """:func:`check_overrides` for a command line (flagfiles expanded) and the config file that its
    ``--config`` names, loaded as ml_collections loads it. A file that does not load is left for
    ml_collections to report."""
    import ml_collections
    from absl import flags
    from ml_collections.config_flags import config_flags

    argv = flags.FLAGS.read_flags_from_files(list(argv), force_gnu=False)
    path = None
    for i, arg in enumerate(argv):
        name, _, value = arg.lstrip("-").partition("=")
        if arg.startswith("-") and name == flag:
            path = value if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else None)
    if path is None:
        return
    try:
        config = config_flags.ConfigFileFlagParser(flag, lock_config=False).parse(path)
    except Exception:  # noqa: BLE001 - ml_collections reports it when it parses the flags
        return
    if isinstance(config, ml_collections.ConfigDict):
        check_overrides(config, argv, flag)


def build_model(config: Config) -> nn.Module:
    """The Flax denoiser named by ``config.model``."""
    return MODELS[config.model.name](**config.model.module_kwargs())


def build_schedule(config: Any) -> dj.Schedule:
    """The beta :class:`Schedule` of ``config.diffusion`` (a :class:`Config`, or a classifier
    config: any config with a :class:`DiffusionConfig` section)."""
    d = config.diffusion
    kwargs = {
        k: v for k, v in (("beta_start", d.beta_start), ("beta_end", d.beta_end)) if v is not None
    }
    return dj.make_schedule(d.schedule, d.num_timesteps, **kwargs)


def build_process(config: Any) -> dj.Process:
    """The noise :class:`Process` of ``config.diffusion``."""
    d = config.diffusion
    schedule = build_schedule(config) if d.process == "vp" else None
    return dj.make_process(
        d.process, schedule=schedule, discrete=d.discrete, sigma_min=d.sigma_min,
        sigma_max=d.sigma_max, rho=d.rho, sigma_data=d.sigma_data,
    )  # fmt: skip


def sampler_num_steps(config: Config) -> int:
    """How many levels ``config.sample``'s sampler walks (its ``num_steps``, or the process's default)."""
    s = config.sample
    return dj.sampling_levels(build_process(config), s.num_steps, s.spacing, rho=s.rho).num_steps


def init_params(
    model: nn.Module, config: Config, data_shape: tuple[int, ...], rng: jax.Array
) -> Any:
    """Fresh parameters of ``model`` for examples of shape ``data_shape`` ((H, W, C) or (D,))."""
    x = jnp.zeros((1, *data_shape), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    y = None if config.model.num_classes is None else jnp.zeros((1,), jnp.int32)
    return model.init({"params": rng}, x, t, y, train=False)["params"]


def denoise_fn_for(model: nn.Module) -> Callable[..., jax.Array]:
    """``denoise_fn(params, x_t, t, y=None, x_self_cond=None)``: the model in inference mode, as
    samplers expect (``x_self_cond`` only for a ``self_condition`` model)."""

    def denoise_fn(
        params: Any,
        x_t: jax.Array,
        t: jax.Array,
        y: jax.Array | None = None,
        x_self_cond: jax.Array | None = None,
    ) -> jax.Array:
        return model.apply({"params": params}, x_t, t, y, train=False, x_self_cond=x_self_cond)

    return denoise_fn


def build_sampler(
    config: Config,
    model: nn.Module | None = None,
    *,
    denoise_fn: Callable[..., jax.Array] | None = None,
    cond_fn: Callable[..., jax.Array] | None = None,
    **overrides: Any,
):
    """``sample(params, rng, shape, **model_kwargs)`` for ``config``'s model, schedule and sampler.

    ``overrides`` replace entries of ``config.sample`` (sampler, num_steps, spacing, eta,
    variance, ...); the reverse variance is :func:`sample_variance`'s. ``denoise_fn``
    (default: the model's) may wrap the model, e.g. for classifier-free guidance; ``cond_fn`` adds
    classifier guidance (see :func:`dj.make_sampler`). A ``model.self_condition`` model gets the
    chain's previous x_0 estimate as ``x_self_cond``.
    """
    s = dataclasses.replace(config.sample, **overrides)
    variance = sample_variance(dataclasses.replace(config, sample=s))
    if denoise_fn is None:
        denoise_fn = denoise_fn_for(build_model(config) if model is None else model)
    sample = dj.make_sampler(
        denoise_fn,
        build_process(config),
        prediction=config.diffusion.prediction,
        variance=variance,
        cond_fn=cond_fn,
        self_condition=config.model.self_condition,
        **s.sampler_kwargs(),
    )
    if config.latent is None:
        return sample
    if not config.latent.resolved:
        raise ConfigError(
            "the latent section has no recorded autoencoder step, scale factor and network: "
            "sample from a trained latent run's workdir (checkpoints.load_sampler), whose "
            "config.json records them."
        )
    autoencoder = build_autoencoder(config.latent.autoencoder)
    return latent_lib.make_latent_sampler(
        sample,
        latent_lib.decode_fn_for(autoencoder),
        config.latent.scale_factor,
        autoencoder.factor,
        autoencoder.z_channels,
    )


def model_data_shape(config: Config, data_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of one example the denoiser sees: the data's ``data_shape``, or for a latent run
    (:class:`LatentConfig`, resolved) the autoencoder's latent shape of it (H/f, W/f, z_channels)."""
    if config.latent is None:
        return tuple(data_shape)
    return build_autoencoder(config.latent.autoencoder).latent_shape(data_shape)
