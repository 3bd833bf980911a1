r"""Training the noise-aware classifier p(y | x_t, t) that classifier guidance needs (Dhariwal & Nichol 2021).

    python train_classifier.py --config configs/digits_classifier.py --workdir /tmp/digits_classifier

The classifier (:class:`diffusion_jax.models.NoisyClassifier`) sees x_t ~ q(x_t | x_0) at t ~ U{0..T-1}
of the same forward process as the diffusion model it will guide (``config.diffusion`` must match
that model's schedule), and minimises the cross-entropy of the true label (:func:`dj.classifier_loss`).
Only the step is this module's: the loop is the one the diffusion trainer runs
(:func:`training_loop.run`: resume, non-finite checks, logging, Orbax checkpoints with
``config.json``, SIGTERM and preemption saves), and the step ends with the same update
(:func:`train_state.apply_gradients`: Adam, the EMA once per optimiser update under gradient
accumulation, non-finite batches dropped). At the end it writes the held-out accuracy at several
noise levels to ``<workdir>/eval.json``; :func:`load_classifier` gives back ``(classifier_fn,
params, config)`` ready for :func:`dj.classifier_guidance`.
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

import diffusion_jax as dj
from diffusion_jax import checkpoints, config_utils, sharding, training_loop
from diffusion_jax.config_utils import (
    CheckpointConfig,
    ConfigError,
    DiffusionConfig,
    EmaConfig,
    OptimConfig,
    TrainConfig,
)
from diffusion_jax.models import NoisyClassifier
from diffusion_jax.train_state import TrainState, gradient_step, make_optimizer

# Fractions of T at which the held-out accuracy is reported (t = round(f * (T - 1))).
EVAL_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)
EVAL_FILE = "eval.json"


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """A classifier training run; built only by :func:`parse_classifier_config`.

    ``classifier``: keyword arguments of :class:`NoisyClassifier` (``num_classes`` defaults to the
    data's). ``diffusion``: the forward process (only the schedule keys matter here).
    """

    seed: int
    data: Any
    classifier: Mapping[str, Any]
    diffusion: DiffusionConfig
    optim: OptimConfig
    ema: EmaConfig
    train: TrainConfig
    checkpoint: CheckpointConfig

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready nested dict that :func:`parse_classifier_config` turns back into this config."""
        out: dict[str, Any] = {"seed": self.seed, "classifier": dict(self.classifier)}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                out[f.name] = dataclasses.asdict(value)
        return json.loads(json.dumps(out))

    def build_model(self) -> NoisyClassifier:
        return NoisyClassifier(**config_utils.module_kwargs(self.classifier))


# The sections shared with a diffusion run's config, checked by the same dataclasses.
_SECTIONS = {
    "diffusion": DiffusionConfig,
    "optim": OptimConfig,
    "ema": EmaConfig,
    "train": TrainConfig,
    "checkpoint": CheckpointConfig,
}


def parse_classifier_config(cfg: Any) -> ClassifierConfig:
    """Checks a classifier config (ConfigDict or nested mapping); unknown keys and bad values raise
    :class:`ConfigError` naming them."""
    values = config_utils.as_dict(cfg)
    seed, data_cfg = config_utils.parse_seed_and_data(values, ("classifier", *_SECTIONS))
    if not data_cfg.use_labels:
        raise ConfigError("a classifier needs labels: set data.use_labels=True.")
    classifier = config_utils.check_module_kwargs(
        NoisyClassifier, values.get("classifier", {}), "classifier", "classifier"
    )
    sections = {
        k: config_utils.parse_section(c, values.get(k, {}), k) for k, c in _SECTIONS.items()
    }
    if sections["ema"].posthoc_sigma_rels:
        raise ConfigError(
            "ema.posthoc_sigma_rels: post-hoc EMA is kept for diffusion runs only; drop the key "
            "from the classifier's config."
        )
    return ClassifierConfig(seed=seed, data=data_cfg, classifier=classifier, **sections)


def _with_num_classes(config: ClassifierConfig, num_classes: int | None) -> ClassifierConfig:
    if num_classes is None:
        raise ValueError(
            f"the data ({config.data.source}) have no labels to train a classifier on."
        )
    given = config.classifier.get("num_classes")
    if given is not None and given != num_classes:
        raise ConfigError(
            f"classifier.num_classes={given} but the data ({config.data.source}) have "
            f"{num_classes} classes; drop the key or set it to {num_classes}."
        )
    return dataclasses.replace(config, classifier={**config.classifier, "num_classes": num_classes})


def make_classifier_step(
    model: NoisyClassifier,
    config: ClassifierConfig,
    tx: optax.GradientTransformation,
    learning_rate_fn: optax.Schedule,
) -> Callable[[TrainState, dict[str, jax.Array], dj.Schedule], tuple[TrainState, dict]]:
    """``step(state, batch, schedule) -> (state, metrics)``: cross-entropy on noised images, then
    the update every trainer's step ends with (:func:`train_state.apply_gradients`).

    ``batch``: {"x": [B, H, W, C] in [-1, 1], "label": int32 [B]}. ``metrics``: ``loss`` (nats),
    ``accuracy`` (on the noised batch, t ~ uniform), ``grad_norm``, ``learning_rate`` (scalars)
    and ``finite`` (False: the update was dropped).
    """
    accum = config.optim.grad_accum_steps

    def loss_fn(params, rng, batch, schedule):
        loss_rng, dropout_rng = jax.random.split(rng)

        def logits_fn(x_t, t):
            return model.apply(
                {"params": params}, x_t, t, train=True, rngs={"dropout": dropout_rng}
            )

        nll, hits = dj.classifier_loss(schedule, logits_fn, batch["x"], batch["label"], loss_rng)
        return jnp.mean(nll), {"accuracy": jnp.mean(hits)}

    def step(state: TrainState, batch: dict[str, jax.Array], schedule: dj.Schedule):
        return gradient_step(
            state, loss_fn, (batch, schedule), tx, config.ema, learning_rate_fn, accum
        )

    return step


def heldout_accuracy(
    classifier_fn: Callable[[Any, jax.Array, jax.Array], jax.Array],
    params: Any,
    schedule: dj.Schedule,
    eval_batches: Any,
    *,
    fractions: tuple[float, ...] = EVAL_FRACTIONS,
    seed: int = 0,
) -> dict[int, float]:
    """{t: accuracy} of ``classifier_fn(params, x_t, t) -> logits`` on x_t ~ q(x_t | x_0) for the
    held-out batches, at t = round(f (T - 1)) for each fraction f (one fixed noise draw per batch)."""
    num_timesteps = schedule.betas.shape[0]
    timesteps = sorted({int(round(f * (num_timesteps - 1))) for f in fractions})

    @jax.jit
    def hits(params, x0, labels, rng):
        out = []
        for t in timesteps:
            tt = jnp.full((x0.shape[0],), t, jnp.int32)
            x_t = dj.q_sample(
                schedule, x0, tt, jax.random.normal(jax.random.fold_in(rng, t), x0.shape)
            )
            logits = classifier_fn(params, x_t, schedule.model_timesteps[tt])
            out.append(jnp.sum(jnp.argmax(logits, -1) == labels))
        return jnp.stack(out)

    total, count = np.zeros(len(timesteps)), 0
    for i, batch in enumerate(eval_batches):
        rng = jax.random.fold_in(jax.random.key(seed), i)
        total += np.asarray(hits(params, jnp.asarray(batch["x"]), jnp.asarray(batch["label"]), rng))
        count += len(batch["label"])
    if count == 0:
        raise ValueError("the held-out split is empty: nothing to evaluate the classifier on.")
    return {t: float(h / count) for t, h in zip(timesteps, total, strict=True)}


def train_classifier(
    config: Any, workdir: str | epath.PathLike, *, hooks: Sequence[Callable[[int], None]] = ()
) -> dict[str, Any]:
    """Trains the noise-aware classifier of ``config`` into ``workdir`` (resuming if it has
    checkpoints, under the same checks as :func:`trainer.train_and_evaluate`).

    Returns (and writes to ``<workdir>/eval.json``) the held-out accuracy of the EMA parameters at
    several timesteps: {"step": int, "accuracy": {t: float}}. Stopped early by SIGTERM or a
    preemption notice, it saves, skips the evaluation and returns {"step": int, "accuracy": None};
    rerun to continue. ``hooks``: called as ``hook(step)`` after every step.
    """
    from diffusion_jax import data

    cfg = config if isinstance(config, ClassifierConfig) else parse_classifier_config(config)
    info = data.dataset_info(cfg.data)
    cfg = _with_num_classes(cfg, info.num_classes)
    data_shape = tuple(info.shape)
    if len(data_shape) != 3:
        raise ValueError(
            f"the classifier takes images [H, W, C]; the data have shape {data_shape}."
        )
    workdir, mesh, _ = training_loop.prepare(workdir, cfg)

    model = cfg.build_model()
    schedule_local = config_utils.build_schedule(cfg)
    schedule = jax.device_put(jax.tree.map(np.asarray, schedule_local), sharding.replicated(mesh))
    tx, lr_fn = make_optimizer(cfg.optim, cfg.train.num_steps)
    keys = jax.random.split(jax.random.key(cfg.seed), 3)  # parameters, steps, data

    def init():
        return TrainState.create(_init_params(model, data_shape, keys[0]), tx, keys[1])

    abstract = jax.eval_shape(init)
    shardings = sharding.state_shardings(abstract, mesh)
    step_fn = jax.jit(
        make_classifier_step(model, cfg, tx, lr_fn),
        in_shardings=(shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(abstract.params))
    logging.info(
        "NoisyClassifier with %s parameters; %d steps", f"{num_params:,}", cfg.train.num_steps
    )
    task = training_loop.Task(
        config=cfg,
        data_shape=data_shape,
        init_state=init,
        abstract_state=abstract,
        state_shardings=shardings,
        train_step=step_fn,
        step_args=(schedule,),
        batch_keys=("x", "label"),
        metrics_to_log=(
            ("loss", "loss", ".4f"),
            ("accuracy", "noisy-batch accuracy", ".3f"),
            ("grad_norm", "grad_norm", ".3f"),
            ("learning_rate", "lr", ".2e"),
        ),
        data_seed=int(jax.random.randint(keys[2], (), 0, 2**31 - 1)),
    )
    state = training_loop.run(task, workdir, mesh, hooks=hooks)
    step = int(state.step)
    if step < cfg.train.num_steps:  # stopped early: the rerun evaluates
        return {"step": step, "accuracy": None}

    eval_iter = data.make_eval_iterator(cfg.data, batch_size=256)
    accuracy = heldout_accuracy(
        _apply_fn(model), sharding.to_host(state.ema_params), schedule_local, eval_iter
    )
    result = {"step": step, "accuracy": accuracy}
    logging.info(
        "Held-out accuracy (EMA) by timestep: %s",
        ", ".join(f"t={t}: {a:.3f}" for t, a in accuracy.items()),
    )
    if jax.process_index() == 0:
        (workdir / EVAL_FILE).write_text(json.dumps(result, indent=2))
    return result


def _init_params(model: NoisyClassifier, data_shape: tuple[int, ...], rng: jax.Array) -> Any:
    x = jnp.zeros((1, *data_shape), jnp.float32)
    return model.init({"params": rng}, x, jnp.zeros((1,), jnp.int32))["params"]


def _apply_fn(model: NoisyClassifier) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
    return lambda params, x_t, t: model.apply({"params": params}, x_t, t, train=False)


def load_classifier(
    workdir: epath.PathLike, step: int | None = None
) -> tuple[Callable[[Any, jax.Array, jax.Array], jax.Array], Any, ClassifierConfig]:
    """(classifier_fn(params, x_t, t) -> logits [B, K], EMA params, config) of a classifier workdir,
    for :func:`dj.classifier_guidance`; the newest checkpoint unless ``step`` is given."""
    step_dir, run = checkpoints.read_run(workdir, step)
    if "classifier" not in run["config"]:
        raise ValueError(f"{workdir} is not a classifier workdir (no 'classifier' config section).")
    cfg = parse_classifier_config(run["config"])
    model = cfg.build_model()
    data_shape = tuple(run["data_shape"])
    params = checkpoints.restore_ema_params(
        step_dir, lambda: _init_params(model, data_shape, jax.random.key(0))
    )
    return _apply_fn(model), params, cfg
