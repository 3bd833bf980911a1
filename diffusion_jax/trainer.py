"""Training a DDPM: one jit-compiled, sharded step, and :func:`train_and_evaluate` around it.

The step (Ho et al. Algorithm 1) draws t and eps for the whole global batch from
``fold_in(rng, step)``, so the same seed gives the same run on any number of devices or hosts. It
takes one optimiser step (or one micro-step of gradient accumulation), updates the EMA of the
parameters (and, with ``ema.posthoc_sigma_rels``, EDM2's power-function EMAs), and drops the update
of a batch whose loss or gradient is not finite.

:func:`train_and_evaluate` restores the newest checkpoint in ``workdir`` or starts afresh, then
loops: log scalars to TensorBoard, save Orbax checkpoints, draw sample grids from the EMA weights,
optionally trace a few steps with ``jax.profiler``, and on SIGTERM or a preemption notice save and
return. With post-hoc EMA on it also saves snapshots of the power-function EMAs every
``ema.posthoc_every_steps`` into ``<workdir>/posthoc_ema/`` (all kept; see
:mod:`diffusion_jax.posthoc_ema`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pathlib
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

import diffusion_jax as dj
from diffusion_jax import checkpoints, config_utils, images, posthoc_ema, sharding
from diffusion_jax.config_utils import Config, ProfileConfig
from diffusion_jax.train_state import (
    TrainState,
    ema_decay,
    global_norm,
    make_optimizer,
    select_tree,
    update_ema,
    update_posthoc_emas,
    with_posthoc_emas,
)

RNG_STREAMS = ("init", "train", "sample", "data")
Metrics = dict[str, jax.Array]


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradient norm became NaN or infinite (``train.on_nonfinite = "stop"``)."""


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
    EMA. The trees must have exactly the structure and shapes of ``config``'s model for
    ``data_shape`` (one example, e.g. (H, W, C)); a mismatch raises ``ValueError`` naming it.
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
    ``metrics``: scalar ``loss`` (mean over the batch), ``grad_norm`` (global L2 norm before
    clipping), ``learning_rate`` and ``finite`` (False: the update was dropped).
    """
    diffusion, accum = config.diffusion, config.optim.grad_accum_steps
    num_classes = config.model.num_classes

    def loss_fn(params, batch, rng, process):
        loss_rng, dropout_rng, label_rng = jax.random.split(rng, 3)
        y = None
        if num_classes is not None:
            y = batch["label"]
            if diffusion.label_dropout > 0:  # the null class, for classifier-free guidance
                drop = jax.random.bernoulli(label_rng, diffusion.label_dropout, y.shape)
                y = jnp.where(drop, num_classes, y)

        def model_fn(x_t, t):
            variables = {"params": params}
            return model.apply(variables, x_t, t, y, train=True, rngs={"dropout": dropout_rng})

        if diffusion.loss == "hybrid":
            per_example = dj.hybrid_loss(
                process, model_fn, batch["x"], loss_rng,
                prediction=diffusion.prediction, lambda_vlb=diffusion.lambda_vlb,
            )  # fmt: skip
        else:
            per_example = dj.diffusion_loss(
                process, model_fn, batch["x"], loss_rng, prediction=diffusion.prediction,
                loss_type=diffusion.loss_type, min_snr_gamma=diffusion.min_snr_gamma,
                time_sampling=diffusion.time_sampling, time_loc=diffusion.time_loc,
                time_scale=diffusion.time_scale,
            )  # fmt: skip
        return jnp.mean(per_example)

    def params_loss(params, batch, rng, process):
        if param_shardings is not None:
            params = sharding.fsdp_gather(params, param_shardings)
        return loss_fn(params, batch, rng, process)

    def train_step(state: TrainState, batch: dict[str, jax.Array], process: dj.Process):
        loss, grads = jax.value_and_grad(params_loss)(
            state.params, batch, state.step_rng(), process
        )
        if param_shardings is not None:
            grads = jax.lax.with_sharding_constraint(grads, param_shardings)
        grad_norm = global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        step = state.step + 1
        ema = update_ema(state.ema_params, params, ema_decay(config.ema, step // accum))
        if accum > 1:  # the optimiser (and so the EMA) moves once every `accum` batches
            ema = select_tree(step % accum == 0, ema, state.ema_params)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        params, ema, opt_state = select_tree(
            finite, (params, ema, opt_state), (state.params, state.ema_params, state.opt_state)
        )
        first_bad = (~finite) & (state.first_nonfinite_step < 0)
        new_state = state.replace(
            step=step,
            params=params,
            ema_params=ema,
            opt_state=opt_state,
            nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32),
            first_nonfinite_step=jnp.where(first_bad, step, state.first_nonfinite_step),
        )
        if config.ema.posthoc_sigma_rels:  # of the parameters kept: a dropped batch repeats them
            moved = step % accum == 0 if accum > 1 else True
            emas = update_posthoc_emas(state.posthoc_emas, params, config.ema, step // accum, moved)
            new_state = new_state.replace(posthoc_emas=emas)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": jnp.asarray(learning_rate_fn(state.step // accum), jnp.float32),
            "finite": finite,
        }
        return new_state, metrics

    return train_step


def make_sample_grid_fn(
    model: nn.Module,
    config: Config,
    data_shape: tuple[int, ...],
    mesh: jax.sharding.Mesh,
    num_samples: int | None = None,
    **sampler_overrides: Any,
) -> Callable[[Any], jax.Array]:
    """Jitted ``sample_grid(ema_params) -> [num_samples, *data_shape]``, always from the same noise.

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
    state donated. ``sample_grid(ema_params)`` is None when ``sample.num_samples = 0``.
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
    """The model, optimiser and jitted programs of a training run on ``mesh`` (nothing is run)."""
    model = config_utils.build_model(cfg)
    process = jax.tree.map(np.asarray, config_utils.build_process(cfg))
    tx, lr_fn = make_optimizer(cfg.optim, cfg.train.num_steps)
    abstract_state = jax.eval_shape(lambda: init_state(model, cfg, data_shape, tx))
    state_shardings = sharding.state_shardings(abstract_state, mesh, cfg.sharding.fsdp_min_size)
    fsdp = sharding.is_fsdp(state_shardings.params)
    train_step = jax.jit(
        make_train_step(model, cfg, tx, lr_fn, state_shardings.params if fsdp else None),
        in_shardings=(state_shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    sample_grid = None
    if cfg.sample.num_samples > 0:
        sample_grid = make_sample_grid_fn(model, cfg, data_shape, mesh)
    batch_keys = ("x", "label") if cfg.model.num_classes is not None else ("x",)
    return Programs(
        model, tx, lr_fn, process, abstract_state, state_shardings, batch_keys, train_step,
        sample_grid,
    )  # fmt: skip


class _Termination:
    """Remembers a SIGTERM in a single-process run.

    Multi-process runs (every pod slice, and any run where ``jax.distributed`` is initialised) leave
    SIGTERM to JAX's preemption notifier instead: each process reports the signal to the
    coordination service, and :func:`checkpoints.reached_preemption` becomes True on every process
    at the same step, so all of them save that step and stop together.
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame):
        del signum, frame
        logging.warning(
            "SIGTERM received: saving a checkpoint at the end of this step, then exiting."
        )
        self.requested = True

    @contextlib.contextmanager
    def installed(self) -> Iterator[_Termination]:
        install = (
            not jax.distributed.is_initialized()
            and threading.current_thread() is threading.main_thread()
        )
        if install:
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        try:
            yield self
        finally:
            if install:
                signal.signal(signal.SIGTERM, self._previous)


class _Writer:
    """TensorBoard scalars and images (process 0 only; other processes do nothing).

    tensorboardX writes gs:// logdirs itself, through google-cloud-storage (checked at start by
    :func:`checkpoints.check_storage`), re-uploading the event file at every flush.
    """

    def __init__(self, logdir: epath.Path, active: bool):
        self._writer = None
        if active:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(logdir=os.fspath(logdir))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self._writer:
            for name, value in values.items():
                self._writer.add_scalar(name, value, step)
            self._writer.flush()

    def image(self, step: int, name: str, picture_uint8: np.ndarray) -> None:
        if self._writer:
            self._writer.add_image(name, picture_uint8, step, dataformats="HWC")
            self._writer.flush()

    def __enter__(self) -> _Writer:
        return self

    def __exit__(self, *exc_info) -> None:
        if self._writer:
            self._writer.close()


class _Profiler:
    """A ``jax.profiler`` trace of the steps ``[start_step, start_step + num_steps)`` on process 0,
    into ``logdir/plugins/profile/<time>/`` where TensorBoard's profile plugin finds it.

    JAX writes traces to local folders; for a bucket logdir the trace goes to a temporary folder
    first and is copied over when it stops.
    """

    def __init__(self, config: ProfileConfig, logdir: epath.Path, active: bool):
        self.first, self.last = config.start_step, config.start_step + config.num_steps - 1
        self.active = active and config.num_steps > 0
        self.logdir = logdir
        self.remote = "://" in os.fspath(logdir)
        self._tracing_into: str | None = None

    def before_step(self, step: int) -> None:
        if self.active and step == self.first:
            self._tracing_into = tempfile.mkdtemp() if self.remote else os.fspath(self.logdir)
            jax.profiler.start_trace(self._tracing_into)
            logging.info("Profiling steps %d to %d", self.first, self.last)

    def after_step(self, step: int, state: Any) -> None:
        if self._tracing_into is not None and step >= self.last:
            jax.block_until_ready(state)
            self.stop()

    def stop(self) -> None:
        """Ends a running trace (also when the run stops early) and puts it under ``logdir``."""
        if self._tracing_into is None:
            return
        local, self._tracing_into = pathlib.Path(self._tracing_into), None
        jax.profiler.stop_trace()
        if self.remote:
            for path in local.rglob("*"):
                if path.is_file():
                    target = self.logdir / path.relative_to(local).as_posix()
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(path.read_bytes())
            shutil.rmtree(local)
        logging.info("Wrote a profile to %s (TensorBoard: Profile tab)", self.logdir / "plugins")


def _format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _summarize(metrics: list[Metrics]) -> dict[str, float]:
    """Means over a log interval of the metrics of finite steps (host numpy)."""
    finite = [m for m in jax.device_get(metrics) if bool(m["finite"])]
    out = {}
    for key in ("loss", "grad_norm", "learning_rate"):
        values = [float(m[key]) for m in finite]
        out[key] = float(np.mean(values)) if values else float("nan")
    return out


def _check_finite(
    state: TrainState, config: Config, last_saved: int | None, workdir: epath.Path
) -> int:
    """Number of dropped (non-finite) steps so far; raises in ``on_nonfinite = "stop"`` mode."""
    count, first = (
        int(v) for v in jax.device_get((state.nonfinite_steps, state.first_nonfinite_step))
    )
    if count and config.train.on_nonfinite == "stop":
        saved = (
            f"the last checkpoint (step {last_saved}) in {workdir / checkpoints.CHECKPOINT_DIR} is untouched"
            if last_saved is not None
            else "no checkpoint was written"
        )
        raise NonFiniteLossError(
            f"the loss or gradient became non-finite (NaN or inf) at step {first}; stopping, and "
            f"{saved}. Lower optim.learning_rate, check the data, or set train.on_nonfinite='skip' "
            "to drop such steps instead."
        )
    return count


def _check_labels(labels: np.ndarray, num_classes: int, step: int) -> None:
    """Raises if a host batch has labels outside [0, num_classes) (the model's embedding would give
    NaN there at the step; label num_classes is its null class)."""
    low, high = int(np.min(labels)), int(np.max(labels))
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
    early; rerun the same command to continue.
    """
    from diffusion_jax import data

    cfg = config if isinstance(config, Config) else config_utils.parse_config(config)
    checkpoints.check_storage(workdir)
    workdir = epath.Path(workdir)
    is_main = jax.process_index() == 0
    mesh = sharding.make_mesh()
    local_batch = sharding.check_batch_size(cfg.train.batch_size, mesh)
    checkpoints.check_workdir(workdir, cfg)
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)

    info = data.dataset_info(cfg.data)
    data_shape = tuple(info.shape)
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
    process = jax.device_put(programs.process, sharding.replicated(mesh))
    num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(programs.abstract_state.params))
    logging.info("Model %s with %s parameters", cfg.model.name, f"{num_params:,}")

    data_seed = int(jax.random.randint(rng_streams(cfg.seed)["data"], (), 0, 2**31 - 1))
    train_iter = data.make_train_iterator(
        cfg.data,
        batch_size=local_batch,
        seed=data_seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )

    with contextlib.ExitStack() as stack:
        if hasattr(train_iter, "close"):  # grain's reader threads and worker processes
            stack.callback(train_iter.close)
        manager = checkpoints.make_manager(
            workdir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save
        )
        # Exits in reverse order: wait for the last save (and its checksums) even when the run
        # failed, then release Orbax's threads and event loop, then the data iterator.
        stack.callback(manager.close)
        stack.callback(manager.wait_until_finished)  # runs first: never exit mid-save
        snapshots = None  # the post-hoc EMA snapshots' manager, when the run keeps them
        if cfg.ema.posthoc_sigma_rels:
            snapshots = posthoc_ema.snapshot_manager(workdir, async_save=cfg.checkpoint.async_save)
            stack.callback(snapshots.close)
            stack.callback(snapshots.wait_until_finished)
        writer = stack.enter_context(_Writer(workdir / "tensorboard", active=is_main))
        termination = stack.enter_context(_Termination().installed())
        profiler = _Profiler(cfg.profile, workdir / "tensorboard", active=is_main)
        stack.callback(profiler.stop)
        return _train_loop(
            cfg, workdir, mesh, programs, process, train_iter, manager, snapshots, writer,
            termination, profiler, data_shape, hooks,
        )  # fmt: skip


def _train_loop(
    cfg: Config,
    workdir: epath.Path,
    mesh: jax.sharding.Mesh,
    programs: Programs,
    process: dj.Process,
    train_iter: Any,
    manager: Any,
    snapshots: Any,
    writer: _Writer,
    termination: _Termination,
    profiler: _Profiler,
    data_shape: tuple[int, ...],
    hooks: Sequence[Callable[[int], None]],
) -> TrainState:
    """Restore or initialise, then step, log, save and sample until ``train.num_steps``."""
    is_main = jax.process_index() == 0
    num_steps = cfg.train.num_steps

    target = programs.abstract_state_args()
    restored = checkpoints.restore_latest(manager, target, train_iter, cfg)
    if restored is not None:
        state, start = restored
        logging.info("Resuming from the checkpoint at step %d in %s", start, manager.directory)
    else:
        init = jax.jit(
            lambda: init_state(programs.model, cfg, data_shape, programs.tx),
            out_shardings=programs.state_shardings,
        )
        state, start = init(), 0
        logging.info("Starting from scratch (no checkpoint in %s)", manager.directory)
    last_saved = start if restored is not None else None
    if snapshots is not None:
        _drop_snapshots_after(snapshots, start)

    batch_keys, train_step, sample_grid = (
        programs.batch_keys,
        programs.train_step,
        programs.sample_grid,
    )

    def save(step: int) -> None:
        nonlocal last_saved
        _check_finite(state, cfg, last_saved, workdir)  # never save a run that must stop
        checkpoints.save(manager, step, state, train_iter, cfg, data_shape)
        checkpoints.write_config(workdir, cfg)  # only now: a start that fails leaves it as it was
        last_saved = step

    def save_snapshot(step: int) -> None:
        _check_finite(state, cfg, last_saved, workdir)
        checkpoints.save(snapshots, step, state.posthoc_emas, None, cfg, data_shape)

    def draw_samples(step: int) -> None:
        t0 = time.time()
        samples = sharding.to_host(sample_grid(state.ema_params))
        if is_main:
            picture = images.picture(np.asarray(samples), columns=cfg.model.num_classes)
            path = workdir / "samples" / f"step_{step:08d}.png"
            images.save_png(path, picture)
            writer.image(step, "samples", picture)
            logging.info("Wrote %s (%.1fs)", path, time.time() - t0)

    pending: list[Metrics] = []
    interval_start, interval_step, paused = time.time(), start, 0.0
    step = start
    for step in range(start + 1, num_steps + 1):
        profiler.before_step(step)
        with jax.profiler.StepTraceAnnotation("train", step_num=step):  # steps in the profile
            local = next(train_iter)
            if "label" in batch_keys:
                _check_labels(local["label"], cfg.model.num_classes, step)
            batch = sharding.global_batch({k: local[k] for k in batch_keys}, mesh)
            with jax.transfer_guard("disallow"):
                state, metrics = train_step(state, batch, process)
        profiler.after_step(step, state)
        pending.append(metrics)
        if step == start + 1:  # the first step compiles; time the rest
            jax.block_until_ready(metrics)
            logging.info("First step (with compilation) took %.1fs", time.time() - interval_start)
            interval_start, interval_step, pending = time.time(), step, []
        for hook in hooks:
            hook(step)

        if pending and (step % cfg.train.log_every_steps == 0 or step == num_steps):
            summary = _summarize(pending)
            nonfinite = _check_finite(state, cfg, last_saved, workdir)
            elapsed = time.time() - interval_start - paused
            steps_per_sec = (step - interval_step) / max(elapsed, 1e-9)
            scalars = {
                "train/loss": summary["loss"],
                "train/grad_norm": summary["grad_norm"],
                "train/learning_rate": summary["learning_rate"],
                "train/steps_per_sec": steps_per_sec,
                "train/images_per_sec": steps_per_sec * cfg.train.batch_size,
                "train/nonfinite_steps": float(nonfinite),
            }
            writer.scalars(step, scalars)
            if is_main:
                logging.info(
                    "step %d/%d | loss %.4f | grad_norm %.3f | lr %.2e | %.2f steps/s, %.0f examples/s | ETA %s%s",
                    step, num_steps, summary["loss"], summary["grad_norm"], summary["learning_rate"],
                    steps_per_sec, steps_per_sec * cfg.train.batch_size,
                    _format_duration((num_steps - step) / max(steps_per_sec, 1e-9)),
                    f" | {nonfinite} non-finite steps skipped" if nonfinite else "",
                )  # fmt: skip
            pending, interval_start, interval_step, paused = [], time.time(), step, 0.0

        preempted = termination.requested or checkpoints.reached_preemption(manager, step)
        pause_start = time.time()
        if step % cfg.checkpoint.every_steps == 0 or step == num_steps or preempted:
            save(step)
        if snapshots is not None and (step % cfg.ema.posthoc_every_steps == 0 or step == num_steps):
            save_snapshot(step)
        if preempted:
            manager.wait_until_finished()
            logging.warning(
                "Stopped at step %d on a termination request; checkpoint saved. Run the same "
                "command again to continue.", step,
            )  # fmt: skip
            return state
        every = cfg.sample.every_steps
        if sample_grid is not None and (step == num_steps or (every and step % every == 0)):
            draw_samples(step)
        paused += time.time() - pause_start

    if start >= num_steps:
        logging.info(
            "Nothing to do: the checkpoint is at step %d and train.num_steps=%d.", start, num_steps
        )
    _check_finite(state, cfg, last_saved, workdir)
    manager.wait_until_finished()
    return state
