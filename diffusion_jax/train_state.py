"""The training state (parameters, their EMA, optimiser state, step, PRNG key) and the optimiser.

:class:`TrainState` is a plain pytree of arrays, so ``jax.jit`` shards it, Orbax saves it and a
restored copy continues bit-for-bit. The model and the optimiser are not in it; the training step
closes over them.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from diffusion_jax.config_utils import EmaConfig, OptimConfig

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


def select_tree(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
    """Leafwise ``where(pred, a, b)`` for two pytrees of the same structure; ``pred`` is a scalar bool."""
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)
