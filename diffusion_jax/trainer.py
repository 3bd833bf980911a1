"""Training a DDPM: one jit-compiled, sharded step, and :func:`train_and_evaluate` around it.

The step (Ho et al. Algorithm 1) draws t and eps for the whole global batch from
``fold_in(rng, step)``, so the same seed gives the same run on any number of devices or hosts. It
takes one optimiser step (or one micro-step of gradient accumulation), updates the EMA of the
parameters (and, with ``ema.posthoc_sigma_rels``, EDM2's power-function EMAs), and drops the update
of a batch whose loss or gradient is not finite.

:func:`train_and_evaluate` runs it in the loop every trainer shares (:mod:`diffusion_jax.training_loop`:
restore or start afresh, log scalars to TensorBoard, save Orbax checkpoints, optionally trace a few
steps with ``jax.profiler``, and on SIGTERM or a preemption notice save and return) and adds this
trainer's periodic work: sample grids from the EMA weights and, with post-hoc EMA on, snapshots of
the power-function EMAs every ``ema.posthoc_every_steps`` into ``<workdir>/posthoc_ema/`` (all
kept; see :mod:`diffusion_jax.posthoc_ema`).

Latent diffusion (a ``latent`` section, :class:`config_utils.LatentConfig`): the batches stay
images; the step encodes them with the frozen autoencoder's EMA parameters (an argument of the
step, like the process) to scaled posterior samples (:func:`latent.make_latent_encoder`) and
trains on those, so the model's examples have the latent shape (:func:`config_utils.model_data_shape`),
which the checkpoints record. Sample grids are decoded to images.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

import diffusion_jax as dj
from diffusion_jax import (
    checkpoints,
    config_utils,
    images,
    latent,
    posthoc_ema,
    sharding,
    training_loop,
)
from diffusion_jax.config_utils import Config
from diffusion_jax.train_state import (
    TrainState,
    gradient_step,
    make_optimizer,
    with_posthoc_emas,
)
from diffusion_jax.training_loop import NonFiniteLossError as NonFiniteLossError  # re-exported

RNG_STREAMS = ("init", "train", "sample", "data")
# Folded into a step's key for the posterior sample of a latent run's batch.
_ENCODE_STREAM = 1_000_003
Metrics = dict[str, jax.Array]


def rng_streams(seed: int) -> dict[str, jax.Array]:
    """One seed split once into named PRNG keys: ``init`` (parameters), ``train`` (t, eps, dropout;
    folded with the step), ``sample`` (the sample grids) and ``data`` (the input pipeline's seed)."""
    keys = jax.random.split(jax.random.key(seed), len(RNG_STREAMS))
    return dict(zip(RNG_STREAMS, keys, strict=True))


def init_state(
    model: nn.Module, config: Config, data_shape: tuple[int, ...], tx: optax.GradientTransformation
) -> TrainState:
    """The step-0 :class:`TrainState` (pure; run under ``jax.eval_shape`` or ``jax.jit``), with
    the power-function EMAs of ``ema.posthoc_sigma_rels`` when there are any."""
    streams = rng_streams(config.seed)
    params = config_utils.init_params(model, config, data_shape, streams["init"])
    state = TrainState.create(params, tx, streams["train"])
    return with_posthoc_emas(state, len(config.ema.posthoc_sigma_rels))


def write_run(
    workdir: str | epath.PathLike,
    config: Any,
    params: Any,
    data_shape: tuple[int, ...],
    *,
    step: int = 0,
    ema_params: Any | None = None,
) -> None:
    """Writes ``params`` as checkpoint ``step`` of a run of ``config`` in ``workdir``, as
    :func:`train_and_evaluate` would have: ``sample.py``, ``evaluate.py`` and
    :func:`checkpoints.load_sampler` read it, and ``train.py`` continues from it (fresh optimiser
    state). ``ema_params`` (default: ``params``) is what sampling uses.

    For weights made elsewhere: converted ones (:mod:`diffusion_jax.convert`) or a reconstructed
    EMA. With ``ema.posthoc_sigma_rels`` set, the power-function EMAs start as ``ema_params``. The
    trees must have exactly the structure and shapes of ``config``'s model for ``data_shape`` (one
    example, e.g. (H, W, C); for a latent run, whose ``config.latent`` must be the recorded
    (resolved) one, the latents' shape); a mismatch raises ``ValueError`` naming it.
    """
    cfg = config if isinstance(config, Config) else config_utils.parse_config(config)
    workdir = epath.Path(workdir)
    checkpoints.check_workdir(workdir, cfg)
    model = config_utils.build_model(cfg)
    tx, _ = make_optimizer(cfg.optim, cfg.train.num_steps)
    expected = jax.eval_shape(lambda: init_state(model, cfg, data_shape, tx)).params
    want = jax.tree.map(lambda a: f"{tuple(a.shape)} {jnp.dtype(a.dtype)}", expected)
    for name, tree in (("params", params), ("ema_params", ema_params)):
        if tree is None:
            continue
        got = jax.tree.map(lambda a: f"{tuple(np.shape(a))} {jnp.asarray(a).dtype}", tree)
        if got != want:
            diff = _tree_differences(want, got)
            raise ValueError(
                f"{name} do not match the model of this config for examples of shape "
                f"{data_shape}: {diff}"
            )
    params = jax.tree.map(jnp.asarray, params)
    ema = params if ema_params is None else jax.tree.map(jnp.asarray, ema_params)
    state = TrainState.create(params, tx, rng_streams(cfg.seed)["train"])
    state = state.replace(ema_params=ema, step=jnp.asarray(step, jnp.int32))
    # The state train.py resumes: with post-hoc EMA on, its power-function EMAs start from the EMA.
    state = with_posthoc_emas(state.replace(params=ema), len(cfg.ema.posthoc_sigma_rels))
    state = state.replace(params=params)
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
    manager = checkpoints.make_manager(workdir, keep=cfg.checkpoint.keep, async_save=False)
    try:
        checkpoints.save(manager, step, state, None, cfg, data_shape)
        manager.wait_until_finished()
    finally:
        manager.close()
    checkpoints.write_config(workdir, cfg)


def _tree_differences(want: Any, got: Any, limit: int = 5) -> str:
    """The first ``limit`` paths where two trees of "shape dtype" strings differ, for error messages."""
    flat_want = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(want)}
    flat_got = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(got)}
    lines = [f"missing {k}" for k in flat_want.keys() - flat_got.keys()]
    lines += [f"unexpected {k}" for k in flat_got.keys() - flat_want.keys()]
    lines += [
        f"{k}: expected {flat_want[k]}, got {flat_got[k]}"
        for k in flat_want.keys() & flat_got.keys()
        if flat_want[k] != flat_got[k]
    ]
    return "; ".join(sorted(lines)[:limit]) + (" ..." if len(lines) > limit else "")


def make_train_step(
    model: nn.Module,
    config: Config,
    tx: optax.GradientTransformation,
    learning_rate_fn: optax.Schedule,
    param_shardings: Any = None,
) -> Callable[[TrainState, dict[str, jax.Array], dj.Process], tuple[TrainState, Metrics]]:
    """``train_step(state, batch, process) -> (state, metrics)`` for one global batch (``process``:
    the noise :class:`dj.Process`, an argument so that its tables are not baked into the program).

    ``param_shardings`` (the parameters' shardings, when some are FSDP-sharded): the step gathers
    the parameters whole for the forward and backward passes and hands the gradients back sharded
    like the parameters, so the compiler reduce-scatters them (see :func:`sharding.fsdp_gather`).

    ``batch``: {"x": [B, ...] in [-1, 1], "label": int32 [B] (class-conditional models only)}.
    With ``model.self_condition`` the loss self-conditions (:func:`dj.losses.self_condition_input`).
    ``metrics``: scalar ``loss`` (mean over the batch), ``grad_norm`` (global L2 norm before
    clipping), ``learning_rate`` and ``finite`` (False: the update was dropped).
    """
    diffusion, accum = config.diffusion, config.optim.grad_accum_steps
    num_classes = config.model.num_classes
    # Self-conditioning's first-pass x_0 is clipped as the run's sampler clips its estimates.
    self_condition, clip_denoised = config.model.self_condition, config.sample.clip_denoised

    def loss_fn(params, batch, rng, process):
        loss_rng, dropout_rng, label_rng = jax.random.split(rng, 3)
        y = None
        if num_classes is not None:
            y = batch["label"]
            if diffusion.label_dropout > 0:  # the null class, for classifier-free guidance
                drop = jax.random.bernoulli(label_rng, diffusion.label_dropout, y.shape)
                y = jnp.where(drop, num_classes, y)

        def model_fn(x_t, t, x_self_cond=None):
            variables = {"params": params}
            return model.apply(
                variables, x_t, t, y, train=True, x_self_cond=x_self_cond,
                rngs={"dropout": dropout_rng},
            )  # fmt: skip

        if diffusion.loss == "hybrid":
            per_example = dj.hybrid_loss(
                process, model_fn, batch["x"], loss_rng,
                prediction=diffusion.prediction, lambda_vlb=diffusion.lambda_vlb,
                self_condition=self_condition, clip_denoised=clip_denoised,
            )  # fmt: skip
        else:
            per_example = dj.diffusion_loss(
                process, model_fn, batch["x"], loss_rng, prediction=diffusion.prediction,
                loss_type=diffusion.loss_type, min_snr_gamma=diffusion.min_snr_gamma,
                time_sampling=diffusion.time_sampling, time_loc=diffusion.time_loc,
                time_scale=diffusion.time_scale, self_condition=self_condition,
                clip_denoised=clip_denoised,
            )  # fmt: skip
        return jnp.mean(per_example)

    def params_loss(params, rng, batch, process):
        if param_shardings is not None:
            params = sharding.fsdp_gather(params, param_shardings)
        return loss_fn(params, batch, rng, process), {}

    def train_step(state: TrainState, batch: dict[str, jax.Array], process: dj.Process):
        return gradient_step(
            state, params_loss, (batch, process), tx, config.ema, learning_rate_fn, accum,
            grad_shardings=param_shardings,
        )  # fmt: skip

    return train_step


def with_latent_encoding(
    train_step: Callable[..., tuple[TrainState, Metrics]], config: Config
) -> Callable[..., tuple[TrainState, Metrics]]:
    """``step(state, batch, process, autoencoder_params)``: ``train_step`` on the latents of the
    batch's images, z = scale_factor * (mean + exp(logvar / 2) * eps) under the frozen autoencoder
    of ``config.latent`` (resolved), eps from ``fold_in(state.step_rng(), _ENCODE_STREAM)``."""
    lat = config.latent
    encode = latent.make_latent_encoder(
        latent.encode_fn_for(config_utils.build_autoencoder(lat.autoencoder)), lat.scale_factor
    )

    def step(state: TrainState, batch: dict[str, jax.Array], process: Any, autoencoder_params: Any):
        rng = jax.random.fold_in(state.step_rng(), _ENCODE_STREAM)
        z = encode(autoencoder_params, batch["x"], rng)
        return train_step(state, {**batch, "x": z}, process)

    return step


def make_sample_grid_fn(
    model: nn.Module,
    config: Config,
    data_shape: tuple[int, ...],
    mesh: jax.sharding.Mesh,
    num_samples: int | None = None,
    **sampler_overrides: Any,
) -> Callable[[Any], jax.Array]:
    """Jitted ``sample_grid(ema_params) -> [num_samples, *data_shape]``, always from the same noise.

    For a latent run ``data_shape`` is the images' and ``ema_params`` {"diffusion": ...,
    "autoencoder": ...} (:func:`latent.make_latent_sampler`).

    ``num_samples`` defaults to ``config.sample.num_samples``; ``sampler_overrides`` replace entries
    of ``config.sample`` (sampler, num_steps, eta). Class-conditional models get the labels 0, 1,
    2, ... in turn. The samples are split over ``mesh`` when their number divides its devices.
    """
    sampler = config_utils.build_sampler(config, model, **sampler_overrides)
    n = config.sample.num_samples if num_samples is None else num_samples
    shape = (n, *data_shape)
    num_classes = config.model.num_classes
    seed = config.seed

    def sample_grid(params):
        rng = rng_streams(seed)["sample"]
        if num_classes is None:
            return sampler(params, rng, shape)
        return sampler(params, rng, shape, y=jnp.arange(n, dtype=jnp.int32) % num_classes)

    divisible = n % mesh.devices.size == 0
    out = sharding.batch_sharding(mesh) if divisible else sharding.replicated(mesh)
    return jax.jit(sample_grid, out_shardings=out)


@dataclasses.dataclass(frozen=True)
class Programs:
    """What :func:`train_and_evaluate` compiles, built for a mesh (real devices, or a TPU topology's
    compile-only devices in :mod:`diffusion_jax.aot`).

    ``train_step(state, batch, process)`` is jitted with the state sharded by ``state_shardings``
    (replicated, or FSDP above ``sharding.fsdp_min_size``), the batch split along ``data`` and the
    state donated; a latent run's takes the autoencoder's parameters last (replicated).
    ``sample_grid(ema_params)`` is None when ``sample.num_samples = 0``. ``model_shape``: the shape
    of one of the model's examples (the data's, or the latents' of a latent run).
    """

    model: nn.Module
    tx: optax.GradientTransformation
    lr_fn: optax.Schedule
    process: dj.Process  # host numpy arrays
    abstract_state: TrainState
    state_shardings: Any
    batch_keys: tuple[str, ...]
    train_step: Any
    sample_grid: Any
    model_shape: tuple[int, ...]

    def abstract_state_args(self) -> TrainState:
        """The state as ``jax.ShapeDtypeStruct`` with its shardings (restore and compile targets)."""
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            self.abstract_state,
            self.state_shardings,
        )

    def abstract_train_args(
        self, mesh: jax.sharding.Mesh, batch_size: int, data_shape: tuple[int, ...]
    ) -> tuple[Any, ...]:
        """``(state, batch, process)`` as ``jax.ShapeDtypeStruct``: what ``train_step.lower`` takes."""
        split = sharding.batch_sharding(mesh)
        batch = {"x": jax.ShapeDtypeStruct((batch_size, *data_shape), jnp.float32, sharding=split)}
        if "label" in self.batch_keys:
            batch["label"] = jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=split)
        process = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding.replicated(mesh)),
            self.process,
        )
        return self.abstract_state_args(), batch, process


def build_programs(cfg: Config, mesh: jax.sharding.Mesh, data_shape: tuple[int, ...]) -> Programs:
    """The model, optimiser and jitted programs of a training run on ``mesh`` (nothing is run);
    ``data_shape``: one example of the data (for a latent run, the images)."""
    model = config_utils.build_model(cfg)
    model_shape = config_utils.model_data_shape(cfg, data_shape)
    process = jax.tree.map(np.asarray, config_utils.build_process(cfg))
    tx, lr_fn = make_optimizer(cfg.optim, cfg.train.num_steps)
    abstract_state = jax.eval_shape(lambda: init_state(model, cfg, model_shape, tx))
    state_shardings = sharding.state_shardings(abstract_state, mesh, cfg.sharding.fsdp_min_size)
    fsdp = sharding.is_fsdp(state_shardings.params)
    step = make_train_step(model, cfg, tx, lr_fn, state_shardings.params if fsdp else None)
    in_shardings = (state_shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh))
    if cfg.latent is not None:
        step = with_latent_encoding(step, cfg)
        in_shardings += (sharding.replicated(mesh),)
    train_step = jax.jit(
        step,
        in_shardings=in_shardings,
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    sample_grid = None
    if cfg.sample.num_samples > 0:
        sample_grid = make_sample_grid_fn(model, cfg, data_shape, mesh)
    batch_keys = ("x", "label") if cfg.model.num_classes is not None else ("x",)
    return Programs(
        model, tx, lr_fn, process, abstract_state, state_shardings, batch_keys, train_step,
        sample_grid, model_shape,
    )  # fmt: skip


def _check_labels(batch: dict[str, np.ndarray], step: int, *, num_classes: int) -> None:
    """Raises if a host batch has labels outside [0, num_classes) (the model's embedding would give
    NaN there at the step; label num_classes is its null class)."""
    low, high = int(np.min(batch["label"])), int(np.max(batch["label"]))
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"the batch of step {step} has labels in [{low}, {high}] but model.num_classes="
            f"{num_classes}: labels must lie in [0, {num_classes}). Set model.num_classes to the "
            "data's number of classes, or fix the labels."
        )


def _drop_snapshots_after(snapshots: Any, step: int) -> None:
    """Deletes the post-hoc EMA snapshots saved after ``step`` (the step the run continues from):
    they belong to steps that will be trained again. All processes call it."""
    stale = [s for s in snapshots.all_steps() if s > step]
    for s in stale:
        snapshots.delete(s)
    if stale:
        logging.warning(
            "Deleted the post-hoc EMA snapshots of steps %s, after the checkpoint the run "
            "continues from (step %d); they will be saved again.", stale, step,
        )  # fmt: skip


def train_and_evaluate(
    config: Any, workdir: str | epath.PathLike, *, hooks: Sequence[Callable[[int], None]] = ()
) -> TrainState:
    """Trains the model of ``config`` (a ConfigDict from ``configs/`` or a parsed :class:`Config`),
    writing checkpoints, ``config.json`` (with each checkpoint), TensorBoard logs and sample PNGs
    into ``workdir``.

    Resumes from the newest checkpoint in ``workdir`` if there is one, after checking ``config``
    against ``config.json`` and the checkpoint's own config (a change of what defines the run
    raises ``ValueError``; see :func:`checkpoints.check_compatible`). Returns the final state.
    ``hooks`` are called as ``hook(step)`` on every process after every step (notebook progress
    bars, tests that inject failures). On SIGTERM or a TPU preemption notice it saves and returns
    early; rerun the same command to continue. The loop itself is :func:`training_loop.run`.
    """
    from diffusion_jax import data

    cfg = config if isinstance(config, Config) else config_utils.parse_config(config)
    cfg, autoencoder = checkpoints.resolve_latent(cfg)  # before the workdir's config is checked
    workdir, mesh, local_batch = training_loop.prepare(workdir, cfg)

    info = data.dataset_info(cfg.data)
    data_shape = tuple(info.shape)
    if autoencoder is not None and autoencoder.image_shape != data_shape:
        raise ValueError(
            f"the autoencoder in {cfg.latent.autoencoder_workdir} was trained on images of shape "
            f"{autoencoder.image_shape}, but the data ({cfg.data.source}) have shape {data_shape}."
        )
    num_classes = cfg.model.num_classes
    if num_classes is not None and info.num_classes is None:
        raise ValueError(
            f"model.num_classes={num_classes} but the data ({cfg.data.source}) have no labels."
        )
    if num_classes is not None and info.num_classes > num_classes:
        raise ValueError(
            f"the data ({cfg.data.source}) have {info.num_classes} classes, labels in "
            f"[0, {info.num_classes - 1}], but model.num_classes={num_classes}: set "
            f"model.num_classes={info.num_classes}."
        )
    logging.info(
        "%d process(es), %d device(s) (%s); global batch %d, %d per process; data %s, %d examples of shape %s",
        jax.process_count(), mesh.devices.size, jax.devices()[0].platform, cfg.train.batch_size,
        local_batch, cfg.data.source, info.num_examples, data_shape,
    )  # fmt: skip

    programs = build_programs(cfg, mesh, data_shape)
    model_shape = programs.model_shape
    process = jax.device_put(programs.process, sharding.replicated(mesh))
    step_args: tuple[Any, ...] = (process,)
    autoencoder_params = None
    if autoencoder is not None:
        autoencoder_params = jax.device_put(autoencoder.params, sharding.replicated(mesh))
        step_args += (autoencoder_params,)
        logging.info(
            "Latent diffusion on the autoencoder of %s (step %d): %s images -> %s latents, "
            "scale factor %.5f", cfg.latent.autoencoder_workdir, cfg.latent.autoencoder_step,
            data_shape, model_shape, cfg.latent.scale_factor,
        )  # fmt: skip
    num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(programs.abstract_state.params))
    logging.info("Model %s with %s parameters", cfg.model.name, f"{num_params:,}")

    with contextlib.ExitStack() as stack:
        periodic = []
        on_start = None
        if cfg.ema.posthoc_sigma_rels:
            snapshots = posthoc_ema.snapshot_manager(workdir, async_save=cfg.checkpoint.async_save)
            stack.callback(snapshots.close)
            stack.callback(snapshots.wait_until_finished)
            on_start = functools.partial(_drop_snapshots_after, snapshots)
            snapshot = functools.partial(_save_snapshot, snapshots, cfg, model_shape)
            periodic.append(
                training_loop.Periodic(cfg.ema.posthoc_every_steps, snapshot, saves=True)
            )
        if programs.sample_grid is not None:
            draw = functools.partial(
                _draw_samples, programs.sample_grid, cfg, workdir, autoencoder=autoencoder_params
            )
            periodic.append(training_loop.Periodic(cfg.sample.every_steps, draw))
        check_batch = None
        if "label" in programs.batch_keys:
            check_batch = functools.partial(_check_labels, num_classes=num_classes)
        task = training_loop.Task(
            config=cfg,
            data_shape=model_shape,
            init_state=lambda: init_state(programs.model, cfg, model_shape, programs.tx),
            abstract_state=programs.abstract_state,
            state_shardings=programs.state_shardings,
            train_step=programs.train_step,
            step_args=step_args,
            batch_keys=programs.batch_keys,
            metrics_to_log=(
                ("loss", "loss", ".4f"),
                ("grad_norm", "grad_norm", ".3f"),
                ("learning_rate", "lr", ".2e"),
            ),
            data_seed=int(jax.random.randint(rng_streams(cfg.seed)["data"], (), 0, 2**31 - 1)),
            periodic=tuple(periodic),
            check_batch=check_batch,
            on_start=on_start,
            profile=cfg.profile,
        )
        return training_loop.run(task, workdir, mesh, hooks=hooks)


def _save_snapshot(
    snapshots: Any, cfg: Config, data_shape: tuple[int, ...], step: int, state: TrainState
) -> None:
    """Saves the power-function EMAs of ``state`` as post-hoc EMA snapshot ``step``."""
    checkpoints.save(snapshots, step, state.posthoc_emas, None, cfg, data_shape)


def _draw_samples(
    sample_grid: Any,
    cfg: Config,
    workdir: epath.Path,
    step: int,
    state: TrainState,
    *,
    autoencoder: Any = None,
) -> dict[str, np.ndarray] | None:
    """Draws the sample grid from the EMA parameters (with a latent run's ``autoencoder``
    parameters, decoded) into ``samples/step_<step>.png``; returns the picture for TensorBoard
    (process 0; None on the others)."""
    t0 = time.time()
    params = state.ema_params
    if autoencoder is not None:
        params = {"diffusion": params, "autoencoder": autoencoder}
    samples = sharding.to_host(sample_grid(params))
    if jax.process_index() != 0:
        return None
    picture = images.picture(np.asarray(samples), columns=cfg.model.num_classes)
    path = workdir / "samples" / f"step_{step:08d}.png"
    images.save_png(path, picture)
    logging.info("Wrote %s (%.1fs)", path, time.time() - t0)
    return {"samples": picture}
