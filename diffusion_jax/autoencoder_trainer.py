r"""Training the KL autoencoder of latent diffusion (Rombach et al. 2022, sec. 3.1).

    python train.py --config configs/digits_autoencoder.py --workdir /tmp/digits_autoencoder

The network is :class:`diffusion_jax.models.AutoencoderKL`; the loss (:func:`autoencoder_loss`) is
a reconstruction term, L1 or L2 summed over the pixels, plus ``kl_weight`` times
KL(q(z | x) || N(0, I)) summed over the latent dimensions, averaged over the batch, as in LDM's
``LPIPSWithDiscriminator`` without its perceptual and adversarial terms: the perceptual (LPIPS)
term needs a pretrained feature network, and the library has none offline (its Inception port,
:mod:`diffusion_jax.evaluation.inception`, comes without weights). The decoder is trained on
posterior samples, as LDM does.

Only the step is this module's: the loop is the one every trainer runs
(:func:`training_loop.run`: resume, non-finite checks, logging, Orbax checkpoints with
``config.json``, SIGTERM and preemption saves), and the step ends with the same update
(:func:`train_state.apply_gradients`). Every ``eval.every_steps`` (0: only at the end) and at the
last step it measures, with the EMA parameters:

* the **latent scale factor**: 1 / std of the posterior samples z = mean + exp(logvar / 2) * eps
  (the latents a latent diffusion model learns, :mod:`diffusion_jax.latent`) of the first
  ``eval.stats_examples`` training examples, in float64 over all their elements, as LDM's
  0.18215 is 1/std of its first batch's samples; written to ``<workdir>/latent_stats.json`` with
  the step, the std, the mean and the number of examples;
* the reconstruction MSE (per pixel, from the posterior mean) on the held-out split, and a
  TensorBoard picture of held-out images over their reconstructions.

:func:`checkpoints.load_autoencoder` reads a trained one back.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from diffusion_jax import config_utils, images, latent, sharding, training_loop
from diffusion_jax.config_utils import (
    CheckpointConfig,
    ConfigError,
    EmaConfig,
    OptimConfig,
    TrainConfig,
)
from diffusion_jax.models import AutoencoderKL
from diffusion_jax.models.autoencoder import kl_to_standard_normal, sample_posterior
from diffusion_jax.train_state import TrainState, gradient_step, make_optimizer

RECONSTRUCTIONS = ("l1", "l2")


@dataclasses.dataclass(frozen=True)
class AutoencoderLossConfig:
    """``reconstruction``: "l1" (LDM's) or "l2", summed over the pixels of an example;
    ``kl_weight``: the weight of the KL term (LDM: 1e-6 on 256x256 RGB images)."""

    reconstruction: str = "l1"
    kl_weight: float = 1e-6

    def __post_init__(self):
        if self.reconstruction not in RECONSTRUCTIONS:
            raise ConfigError(
                f"autoencoder.loss.reconstruction={self.reconstruction!r} is not one of "
                f"{RECONSTRUCTIONS}."
            )
        if not self.kl_weight >= 0:
            raise ConfigError(f"autoencoder.loss.kl_weight={self.kl_weight!r} must be >= 0.")


@dataclasses.dataclass(frozen=True)
class AutoencoderEvalConfig:
    """Measure the latent statistics and the held-out reconstruction error every ``every_steps``
    batches (0: only at the end) and at the last step, the statistics over the first
    ``stats_examples`` training examples; ``num_images`` held-out images in the TensorBoard
    picture (0: none)."""

    every_steps: int = 0
    stats_examples: int = 4096
    num_images: int = 32

    def __post_init__(self):
        if self.every_steps < 0 or self.stats_examples < 1 or self.num_images < 0:
            raise ConfigError(
                f"eval: every_steps={self.every_steps} and num_images={self.num_images} must be "
                f">= 0, stats_examples={self.stats_examples} >= 1."
            )


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
    """An autoencoder training run; built only by :func:`parse_autoencoder_config`.

    ``autoencoder``: keyword arguments of :class:`AutoencoderKL` (``out_channels`` defaults to the
    data's channels); ``loss``: its ``autoencoder.loss`` subsection.
    """

    seed: int
    data: Any
    autoencoder: Mapping[str, Any]
    loss: AutoencoderLossConfig
    optim: OptimConfig
    ema: EmaConfig
    train: TrainConfig
    checkpoint: CheckpointConfig
    eval: AutoencoderEvalConfig

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready nested dict that :func:`parse_autoencoder_config` turns back into this config."""
        out: dict[str, Any] = {
            "seed": self.seed,
            "autoencoder": {**self.autoencoder, "loss": dataclasses.asdict(self.loss)},
        }
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value) and f.name != "loss":
                out[f.name] = dataclasses.asdict(value)
        return json.loads(json.dumps(out))

    def build_model(self) -> AutoencoderKL:
        return config_utils.build_autoencoder(self.autoencoder)


# The sections shared with a diffusion run's config, checked by the same dataclasses.
_SECTIONS = {
    "optim": OptimConfig,
    "ema": EmaConfig,
    "train": TrainConfig,
    "checkpoint": CheckpointConfig,
    "eval": AutoencoderEvalConfig,
}


def parse_autoencoder_config(cfg: Any) -> AutoencoderConfig:
    """Checks an autoencoder config (ConfigDict or nested mapping); unknown keys and bad values
    raise :class:`ConfigError` naming them."""
    values = config_utils.as_dict(cfg)
    seed, data_cfg = config_utils.parse_seed_and_data(values, ("autoencoder", *_SECTIONS))
    section = dict(values.get("autoencoder", {}))
    loss = config_utils.parse_section(
        AutoencoderLossConfig, section.get("loss", {}), "autoencoder.loss"
    )
    kwargs = config_utils.autoencoder_module_kwargs(section)
    sections = {
        k: config_utils.parse_section(c, values.get(k, {}), k) for k, c in _SECTIONS.items()
    }
    if sections["ema"].posthoc_sigma_rels:
        raise ConfigError(
            "ema.posthoc_sigma_rels: post-hoc EMA is kept for diffusion runs only; drop the key "
            "from the autoencoder's config."
        )
    return AutoencoderConfig(seed=seed, data=data_cfg, autoencoder=kwargs, loss=loss, **sections)


def _with_channels(config: AutoencoderConfig, channels: int) -> AutoencoderConfig:
    given = config.autoencoder.get("out_channels")
    if given is not None and given != channels:
        raise ConfigError(
            f"autoencoder.out_channels={given} but the data ({config.data.source}) have "
            f"{channels} channels; drop the key or set it to {channels}."
        )
    kwargs = {**config.autoencoder, "out_channels": channels}
    return dataclasses.replace(config, autoencoder=kwargs)


def autoencoder_loss(
    x: jax.Array,
    reconstruction: jax.Array,
    mean: jax.Array,
    logvar: jax.Array,
    *,
    kind: str = "l1",
    kl_weight: float = 1e-6,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """LDM's autoencoder objective per example: sum over pixels of |x - x_rec| ("l1") or
    (x - x_rec)^2 ("l2"), plus ``kl_weight`` * KL(N(mean, exp(logvar)) || N(0, I)) summed over the
    latent dimensions (:func:`kl_to_standard_normal`). Returns (loss [B], {"reconstruction" [B],
    "kl" [B], "mse" [B]: the mean squared error per pixel})."""
    if kind not in RECONSTRUCTIONS:
        raise ValueError(f"reconstruction loss {kind!r} is not one of {RECONSTRUCTIONS}.")
    diff = (x - reconstruction).astype(jnp.float32).reshape(x.shape[0], -1)
    rec = jnp.sum(jnp.abs(diff) if kind == "l1" else jnp.square(diff), axis=-1)
    kl = kl_to_standard_normal(mean, logvar)
    return rec + kl_weight * kl, {
        "reconstruction": rec,
        "kl": kl,
        "mse": jnp.mean(jnp.square(diff), axis=-1),
    }


def make_autoencoder_step(
    model: AutoencoderKL,
    config: AutoencoderConfig,
    tx: optax.GradientTransformation,
    learning_rate_fn: optax.Schedule,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict]]:
    """``step(state, batch) -> (state, metrics)``: :func:`autoencoder_loss` of a posterior sample's
    reconstruction, then the update every trainer's step ends with
    (:func:`train_state.apply_gradients`).

    ``batch``: {"x": [B, H, W, C] in [-1, 1]}. ``metrics``: ``loss``, ``reconstruction``, ``kl``
    (batch means), ``mse`` (per pixel), ``grad_norm``, ``learning_rate`` and ``finite``.
    """
    accum = config.optim.grad_accum_steps

    def loss_fn(params, rng, batch):
        sample_rng, dropout_rng = jax.random.split(rng)
        x = batch["x"]
        recon, mean, logvar = model.apply(
            {"params": params}, x, sample_rng, train=True, rngs={"dropout": dropout_rng}
        )
        loss, terms = autoencoder_loss(
            x, recon, mean, logvar, kind=config.loss.reconstruction,
            kl_weight=config.loss.kl_weight,
        )  # fmt: skip
        return jnp.mean(loss), jax.tree.map(jnp.mean, terms)

    def step(state: TrainState, batch: dict[str, jax.Array]):
        return gradient_step(state, loss_fn, (batch,), tx, config.ema, learning_rate_fn, accum)

    return step


def _split(data_cfg: Any, split: str, limit: int | None = None) -> np.ndarray:
    """The first ``limit`` (all: None) images of ``split``, in order, through the evaluation path."""
    from diffusion_jax import data

    cfg = dataclasses.replace(data.to_data_config(data_cfg), eval_split=split)
    xs, count = [], 0
    for batch in data.make_eval_iterator(cfg, batch_size=256):
        xs.append(np.asarray(batch["x"]))
        count += len(xs[-1])
        if limit is not None and count >= limit:
            break
    return np.concatenate(xs)[:limit]


def _in_batches(fn: Callable[..., Any], x: np.ndarray, batch_size: int) -> list[Any]:
    """[fn(x_i, i)] over the batches x_i of ``x`` in order, the last one padded with zeros to
    ``batch_size`` (one compiled program for all) and its outputs cut back to its size."""
    out = []
    for i, start in enumerate(range(0, len(x), batch_size)):
        xb = x[start : start + batch_size]
        padded = np.concatenate([xb, np.zeros((batch_size - len(xb), *xb.shape[1:]), xb.dtype)])
        n = len(xb)
        out.append(jax.tree.map(lambda a: np.asarray(a)[:n], fn(padded, i)))  # noqa: B023
    return out


def measure_latents(
    model: AutoencoderKL, params: Any, x: np.ndarray, *, seed: int = 0, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """(posterior samples z = mean + exp(logvar / 2) eps, posterior means) of images ``x``, each
    [N, H/f, W/f, z_channels] float32; the eps of batch ``i`` (of ``batch_size``) are
    ``normal(fold_in(key(seed), i), the batch's latent shape)``."""
    encode_fn = latent.encode_fn_for(model)

    @jax.jit
    def encode(params, xb, rng):
        mean, logvar = encode_fn(params, xb)
        return sample_posterior(mean, logvar, rng), mean

    def batch(xb: np.ndarray, i: int):
        return encode(params, xb, jax.random.fold_in(jax.random.key(seed), i))

    n = min(batch_size, len(x))
    samples, means = zip(*_in_batches(batch, np.asarray(x, np.float32), n), strict=True)
    return np.concatenate(samples), np.concatenate(means)


def _evaluate(
    model: AutoencoderKL, cfg: AutoencoderConfig, workdir: epath.Path, step: int, state: TrainState
) -> dict[str, Any]:
    """The periodic measurement (see the module docstring): writes ``latent_stats.json`` and
    returns TensorBoard values."""
    params = sharding.to_host(state.ema_params)
    train_x = _split(cfg.data, cfg.data.split, cfg.eval.stats_examples)
    samples, means = measure_latents(model, params, train_x, seed=cfg.seed)
    stats = {
        **latent.latent_statistics(samples, means),
        "num_examples": len(train_x),
        "step": step,
        "latents": "posterior samples mean + exp(logvar / 2) * eps of the first num_examples "
        f"examples of the {cfg.data.split!r} split; scale_factor = 1 / std over all elements",
    }
    out: dict[str, Any] = {"eval/latent_std": stats["std"]}
    held_out = _split(cfg.data, cfg.data.eval_split)
    reconstruct = jax.jit(lambda p, xb: model.apply({"params": p}, xb)[0])  # z = posterior mean
    n = min(256, len(held_out))
    recon = np.concatenate(_in_batches(lambda xb, i: reconstruct(params, xb), held_out, n))
    mse = float(np.mean(np.square(recon.astype(np.float64) - held_out)))
    stats["heldout_mse"] = mse
    out["eval/heldout_mse"] = mse
    if cfg.eval.num_images and jax.process_index() == 0:
        n = min(cfg.eval.num_images, len(held_out))
        rows = np.concatenate([held_out[:n], np.clip(recon[:n], -1, 1)])
        out["eval/reconstructions"] = images.picture(rows, columns=min(n, 16))
    logging.info(
        "Step %d: held-out reconstruction MSE %.5f; latents' std %.4f (scale factor %.4f, mean "
        "%.4f) over %d training examples", step, mse, stats["std"], stats["scale_factor"],
        stats["mean"], len(train_x),
    )  # fmt: skip
    if jax.process_index() == 0:
        path = workdir / latent.LATENT_STATS_FILE
        tmp = path.parent / (path.name + ".tmp")
        tmp.write_text(json.dumps(stats, indent=2, sort_keys=True))
        tmp.replace(path)
    return out


def train_autoencoder(
    config: Any, workdir: str | epath.PathLike, *, hooks: Sequence[Callable[[int], None]] = ()
) -> TrainState:
    """Trains the autoencoder of ``config`` into ``workdir`` (resuming if it has checkpoints, under
    the same checks as :func:`trainer.train_and_evaluate`) and returns the final state.

    At the last step (and every ``eval.every_steps``) it writes ``<workdir>/latent_stats.json``
    (see the module docstring); a rerun of a finished run whose statistics are missing or older
    measures them again. Stopped early by SIGTERM or a preemption notice, it saves and returns;
    rerun to continue. ``hooks``: called as ``hook(step)`` after every step.
    """
    from diffusion_jax import data

    cfg = config if isinstance(config, AutoencoderConfig) else parse_autoencoder_config(config)
    info = data.dataset_info(cfg.data)
    data_shape = tuple(info.shape)
    if len(data_shape) != 3:
        raise ValueError(
            f"the autoencoder takes images [H, W, C]; the data have shape {data_shape}."
        )
    cfg = _with_channels(cfg, data_shape[-1])
    model = cfg.build_model()
    latent_shape = model.latent_shape(data_shape)
    workdir, mesh, _ = training_loop.prepare(workdir, cfg)

    tx, lr_fn = make_optimizer(cfg.optim, cfg.train.num_steps)
    keys = jax.random.split(jax.random.key(cfg.seed), 3)  # parameters, steps, data

    def init():
        x = jnp.zeros((1, *data_shape), jnp.float32)
        return TrainState.create(model.init(keys[0], x)["params"], tx, keys[1])

    abstract = jax.eval_shape(init)
    shardings = sharding.state_shardings(abstract, mesh)
    step_fn = jax.jit(
        make_autoencoder_step(model, cfg, tx, lr_fn),
        in_shardings=(shardings, sharding.batch_sharding(mesh)),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(abstract.params))
    logging.info(
        "AutoencoderKL with %s parameters: %s images -> %s latents (f=%d); %d steps",
        f"{num_params:,}", data_shape, latent_shape, model.factor, cfg.train.num_steps,
    )  # fmt: skip
    evaluate = lambda step, state: _evaluate(model, cfg, workdir, step, state)  # noqa: E731
    task = training_loop.Task(
        config=cfg,
        data_shape=data_shape,
        init_state=init,
        abstract_state=abstract,
        state_shardings=shardings,
        train_step=step_fn,
        step_args=(),
        batch_keys=("x",),
        metrics_to_log=(
            ("loss", "loss", ".4f"),
            ("reconstruction", "rec", ".4f"),
            ("kl", "kl", ".2f"),
            ("mse", "mse", ".5f"),
            ("grad_norm", "grad_norm", ".3f"),
            ("learning_rate", "lr", ".2e"),
        ),
        data_seed=int(jax.random.randint(keys[2], (), 0, 2**31 - 1)),
        periodic=(training_loop.Periodic(cfg.eval.every_steps, evaluate),),
    )
    state = training_loop.run(task, workdir, mesh, hooks=hooks)
    step = int(state.step)
    stats = latent.read_latent_stats(workdir)
    if step >= cfg.train.num_steps and (stats is None or stats.get("step") != step):
        evaluate(step, state)  # e.g. a rerun of a run that stopped between its save and this
    return state
