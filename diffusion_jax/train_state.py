"""The training state (parameters, their EMA, optimiser state, step, PRNG key) and the optimiser.

:class:`TrainState` is a plain pytree of arrays, so ``jax.jit`` shards it, Orbax saves it and a
restored copy continues bit-for-bit. The model and the optimiser are not in it; the training step
closes over them. With post-hoc EMA on (``ema.posthoc_sigma_rels``) the state is a
:class:`PosthocTrainState`, which also carries the power-function averages; with it off the state,
its checkpoints and the step are exactly those of runs from before post-hoc EMA existed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from diffusion_jax.config_utils import EmaConfig, OptimConfig
from diffusion_jax.posthoc_ema import power_ema_step_size, sigma_rel_to_gamma

Params = Any


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; all leaves are arrays.

    ``step``: batches consumed so far (int32 []); the step's randomness is ``fold_in(rng, step)``.
    ``rng``: key data (uint32) of the training stream, fixed for the run.
    ``nonfinite_steps``: batches whose loss or gradient was not finite (their update was dropped).
    ``first_nonfinite_step``: the step count just after the first such batch, -1 if none.
    """

    step: jax.Array
    params: Params
    ema_params: Params
    opt_state: optax.OptState
    rng: jax.Array
    nonfinite_steps: jax.Array
    first_nonfinite_step: jax.Array

    @classmethod
    def create(cls, params: Params, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
        """Step 0: the EMA starts as a copy of ``params``; ``rng`` is a typed PRNG key."""
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            ema_params=jax.tree.map(jnp.copy, params),
            opt_state=tx.init(params),
            rng=jax.random.key_data(rng),
            nonfinite_steps=jnp.zeros((), jnp.int32),
            first_nonfinite_step=jnp.full((), -1, jnp.int32),
        )

    def step_rng(self) -> jax.Array:
        """The typed PRNG key of the current step: ``fold_in(rng, step)``."""
        return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)


@flax.struct.dataclass
class PosthocTrainState(TrainState):
    """A :class:`TrainState` that also carries ``posthoc_emas``: one power-function EMA of the
    parameters per entry of ``ema.posthoc_sigma_rels``, in that order (EDM2 Sec. 3.1)."""

    posthoc_emas: tuple[Params, ...]


def with_posthoc_emas(state: TrainState, num_profiles: int) -> TrainState:
    """``state`` with ``num_profiles`` power-function EMAs, each starting as a copy of the
    parameters (the first update weighs the start by 0); ``state`` itself when 0."""
    if num_profiles == 0:
        return state
    fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(TrainState)}
    emas = tuple(jax.tree.map(jnp.copy, state.params) for _ in range(num_profiles))
    return PosthocTrainState(**fields, posthoc_emas=emas)


def learning_rate_schedule(cfg: OptimConfig, total_updates: int) -> optax.Schedule:
    """Learning rate per optimiser update: linear warm-up from 0 over ``warmup_steps`` updates, then
    constant, or cosine / linear decay to ``learning_rate * end_lr_factor`` at ``total_updates``."""
    peak, warmup = cfg.learning_rate, cfg.warmup_steps
    end = peak * cfg.end_lr_factor
    decay_steps = max(total_updates - warmup, 1)
    if cfg.lr_schedule == "constant":
        after = optax.constant_schedule(peak)
    elif cfg.lr_schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.end_lr_factor)
    else:
        after = optax.linear_schedule(peak, end, decay_steps)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def make_optimizer(
    cfg: OptimConfig, num_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimiser, learning-rate schedule): global-norm clipping, then Adam or AdamW, wrapped in
    ``optax.MultiSteps`` when ``grad_accum_steps > 1``. ``num_steps`` counts batches."""
    lr = learning_rate_schedule(cfg, max(num_steps // cfg.grad_accum_steps, 1))
    if cfg.optimizer == "adamw":
        opt = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    else:
        opt = optax.adam(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    if cfg.grad_clip_norm > 0:
        opt = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), opt)
    if cfg.grad_accum_steps > 1:
        opt = optax.MultiSteps(opt, every_k_schedule=cfg.grad_accum_steps).gradient_transformation()
    return opt, lr


def global_norm(tree: Any) -> jax.Array:
    """sqrt of the sum of squares of every leaf (``optax.tree.norm``; ``global_norm`` before 0.2.5)."""
    tree_lib = getattr(optax, "tree", None)
    return tree_lib.norm(tree) if hasattr(tree_lib, "norm") else optax.global_norm(tree)


def ema_decay(cfg: EmaConfig, num_updates: jax.Array) -> jax.Array:
    """The EMA decay at update ``num_updates`` (1-based): ``decay``, or with warm-up
    min(decay, (1 + n) / (10 + n)) as in TensorFlow's ExponentialMovingAverage."""
    decay = jnp.asarray(cfg.decay, jnp.float32)
    if not cfg.warmup:
        return decay
    n = jnp.asarray(num_updates, jnp.float32)
    return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


def update_ema(ema_params: Params, params: Params, decay: jax.Array) -> Params:
    """ema <- decay * ema + (1 - decay) * params (``optax.incremental_update``)."""
    return optax.incremental_update(params, ema_params, 1.0 - decay)


def update_posthoc_emas(
    emas: tuple[Params, ...],
    params: Params,
    cfg: EmaConfig,
    num_updates: jax.Array,
    moved: jax.Array | bool = True,
) -> tuple[Params, ...]:
    """The power-function EMAs of ``cfg.posthoc_sigma_rels`` after optimiser update ``num_updates``
    (1-based): ema <- beta ema + (1 - beta) params, beta = (1 - 1/t)^(gamma + 1) (EDM2 Eq. 127,
    gamma from sigma_rel by Eq. 126). ``moved``: whether the optimiser updated ``params`` in this
    batch; if not (gradient accumulation between updates) the EMAs stay as they are.

    Written as ema + (1 - beta)(params - ema), so that the weights keep summing to 1 in float32
    when 1 - beta is tiny (beta itself rounds there).
    """
    gammas = sigma_rel_to_gamma(cfg.posthoc_sigma_rels)
    out = []
    for ema, gamma in zip(emas, gammas, strict=True):
        step_size = jnp.where(moved, power_ema_step_size(float(gamma), num_updates), 0.0)
        out.append(
            jax.tree.map(lambda e, p, a=step_size: (e + a * (p - e)).astype(e.dtype), ema, params)
        )
    return tuple(out)


def apply_gradients(
    state: TrainState,
    loss: jax.Array,
    grads: Params,
    tx: optax.GradientTransformation,
    ema: EmaConfig,
    grad_accum_steps: int = 1,
) -> tuple[TrainState, jax.Array, jax.Array]:
    """One batch's update of ``state`` from its ``loss`` and ``grads``: (new state, global gradient
    norm before clipping, whether the update was kept). Every training step ends with it.

    The optimiser ``tx`` (from :func:`make_optimizer`) takes the gradients; with
    ``grad_accum_steps`` > 1 it moves the parameters once every that many batches, and so do the
    EMA (decay from :func:`ema_decay` of the update count) and the power-function EMAs of
    ``ema.posthoc_sigma_rels`` (``state`` a :class:`PosthocTrainState` then). A batch whose loss
    or gradient norm is not finite changes nothing but ``step`` and the non-finite counters; under
    accumulation it is not counted as a micro-batch either, and the EMA follows the optimiser's own
    update count, not ``step`` (the power-function EMAs, profiles over training time, do not).
    """
    accum = grad_accum_steps
    grad_norm = global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    step = state.step + 1
    num_updates, moved = step // accum, True
    if accum > 1:  # optax.MultiSteps moved the parameters iff its update count went up (a dropped
        # batch is not counted, so this can fall out of phase with `step % accum`)
        num_updates = opt_state.gradient_step
        moved = num_updates > state.opt_state.gradient_step
    ema_params = update_ema(state.ema_params, params, ema_decay(ema, num_updates))
    if accum > 1:  # the EMA moves with the optimiser
        ema_params = select_tree(moved, ema_params, state.ema_params)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    params, ema_params, opt_state = select_tree(
        finite,
        (params, ema_params, opt_state),
        (state.params, state.ema_params, state.opt_state),
    )
    first_bad = (~finite) & (state.first_nonfinite_step < 0)
    new_state = state.replace(
        step=step,
        params=params,
        ema_params=ema_params,
        opt_state=opt_state,
        nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32),
        first_nonfinite_step=jnp.where(first_bad, step, state.first_nonfinite_step),
    )
    if ema.posthoc_sigma_rels:
        # A profile over training time t = step // accum, of the parameters kept at every accum-th
        # batch (a dropped batch repeats them), as posthoc_ema's reconstruction assumes.
        at_update = step % accum == 0 if accum > 1 else True
        emas = update_posthoc_emas(state.posthoc_emas, params, ema, step // accum, at_update)
        new_state = new_state.replace(posthoc_emas=emas)
    return new_state, grad_norm, finite


def gradient_step(
    state: TrainState,
    loss_fn: Callable[..., tuple[jax.Array, dict[str, jax.Array]]],
    args: tuple[Any, ...],
    tx: optax.GradientTransformation,
    ema: EmaConfig,
    learning_rate_fn: optax.Schedule,
    grad_accum_steps: int = 1,
    grad_shardings: Any = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """A trainer's step after its loss: ``loss_fn(params, rng, *args) -> (scalar loss, aux scalars)``
    differentiated at ``state.params`` with ``rng = state.step_rng()``, then
    :func:`apply_gradients`. ``grad_shardings``: constrain the gradients to these (FSDP).

    Returns (new state, metrics): ``loss``, the aux scalars, ``grad_norm`` (before clipping),
    ``learning_rate`` (of this optimiser update) and ``finite`` (False: the update was dropped).
    """
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.step_rng(), *args
    )
    if grad_shardings is not None:
        grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
    accum = grad_accum_steps
    new_state, grad_norm, finite = apply_gradients(state, loss, grads, tx, ema, accum)
    metrics = {
        "loss": loss,
        **aux,
        "grad_norm": grad_norm,
        "learning_rate": jnp.asarray(learning_rate_fn(state.step // accum), jnp.float32),
        "finite": finite,
    }
    return new_state, metrics


def select_tree(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
    """Leafwise ``where(pred, a, b)`` for two pytrees of the same structure; ``pred`` is a scalar bool."""
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)
