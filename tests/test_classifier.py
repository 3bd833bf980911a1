"""The noise-aware classifier and its loss; classifier guidance with a trained one; its trainer
(train_classifier) in the training loop it shares with the diffusion trainer."""

import json
import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_models import check_forward_mode

import diffusion_jax as dj
from diffusion_jax.models import NoisyClassifier

SCHEDULE = dj.make_schedule("linear", 100)


def test_classifier_loss_matches_hand_computation():
    x0 = jnp.zeros((3, 4, 4, 1))
    t = jnp.array([0, 50, 99])
    noise = jax.random.normal(jax.random.key(0), x0.shape)
    logits = jnp.array([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    seen = {}

    def logits_fn(x_t, tt):
        seen["x_t"], seen["t"] = x_t, tt
        return logits

    nll, hits = dj.classifier_loss(
        SCHEDULE, logits_fn, x0, jnp.array([0, 0, 1]), jax.random.key(1), t=t, noise=noise
    )
    p = np.exp(np.asarray(logits)) / np.exp(np.asarray(logits)).sum(1, keepdims=True)
    np.testing.assert_allclose(nll, -np.log(p[[0, 1, 2], [0, 0, 1]]), rtol=1e-6)
    np.testing.assert_array_equal(hits, [1.0, 0.0, 0.0])  # ties go to the first class
    np.testing.assert_allclose(seen["x_t"], dj.q_sample(SCHEDULE, x0, t, noise), atol=1e-7)
    np.testing.assert_array_equal(seen["t"], t)
    with pytest.raises(ValueError, match=r"logits must have shape \[B, num_classes\]"):
        dj.classifier_loss(SCHEDULE, lambda x, t: logits[0], x0, jnp.zeros(3), jax.random.key(0))


def test_trained_noisy_classifier_guides_the_sampler():
    """Two classes of 8x8 images (a bright left or right half). A classifier trained on noised
    images is accurate at low noise, near chance at high noise, and its guidance turns an
    unconditional denoiser (of the 50/50 mixture) toward the asked class."""
    model = NoisyClassifier(num_classes=2, ch=32, ch_mult=(1, 2), num_res_blocks=1)
    left = jnp.zeros((8, 8, 1)).at[:, :4].set(0.8).at[:, 4:].set(-0.8)
    templates = jnp.stack([left, -left])  # class 0: left half bright; class 1: right half

    def batch(key, n=64):
        y = jax.random.bernoulli(key, 0.5, (n,)).astype(jnp.int32)
        return templates[y], y

    params = jax.jit(model.init)(
        jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32)
    )["params"]
    opt = optax.adam(3e-3)
    opt_state = opt.init(params)

    @jax.jit
    def train_step(params, opt_state, key):
        x0, y = batch(jax.random.fold_in(key, 0))

        def loss_fn(p):
            nll, _ = dj.classifier_loss(
                SCHEDULE, lambda x, t: model.apply({"params": p}, x, t), x0, y, key
            )
            return nll.mean()

        grads = jax.grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state

    for step in range(150):
        params, opt_state = train_step(params, opt_state, jax.random.key(step))
    logits_fn = lambda p, x, t: model.apply({"params": p["classifier"]}, x, t)

    @jax.jit
    def accuracy(t_value):
        x0, y = batch(jax.random.key(123), 256)
        t = jnp.full((256,), t_value)
        _, hits = dj.classifier_loss(
            SCHEDULE,
            lambda x, tt: logits_fn({"classifier": params}, x, tt),
            x0,
            y,
            jax.random.key(7),
            t=t,
        )
        return hits.mean()

    assert float(accuracy(5)) > 0.95
    assert float(accuracy(99)) < 0.75  # x_T carries almost no information about the class

    def mixture_eps(p, x_t, t, **_):
        """Optimal eps for data that is exactly one of the two templates, 50/50."""
        abar = SCHEDULE.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        d2 = jnp.sum(
            (x_t[:, None] - jnp.sqrt(abar[:, None]) * templates[None]) ** 2, axis=(2, 3, 4)
        )
        w = jax.nn.softmax(-d2 / (2 * (1 - abar[:, 0, 0])), axis=-1)
        x0_hat = jnp.einsum("bk,khwc->bhwc", w, templates)
        return (x_t - jnp.sqrt(abar) * x0_hat) / jnp.sqrt(1 - abar)

    y = jnp.ones((64,), jnp.int32)
    for scale, expect in ((0.0, (0.3, 0.7)), (5.0, (0.9, 1.0))):
        sample = dj.make_sampler(
            mixture_eps, SCHEDULE, sampler="ddpm", cond_fn=dj.classifier_guidance(logits_fn, scale)
        )
        x = sample({"classifier": params}, jax.random.key(3), (64, 8, 8, 1), y=y)
        frac_right = float(
            jnp.mean(x[:, :, 4:].mean(axis=(1, 2, 3)) > x[:, :, :4].mean(axis=(1, 2, 3)))
        )
        assert expect[0] <= frac_right <= expect[1], (scale, frac_right)


def test_noisy_classifier_forward_mode_equals_reverse_mode(monkeypatch):
    """jax.jvp / jax.jacfwd through the classifier (ResBlocks, attention, downsampling, pooling)
    give plain reverse mode's directional derivatives (``test_models.check_forward_mode``)."""
    model = NoisyClassifier(num_classes=3, ch=32, ch_mult=(1, 2), attn_resolutions=(4,))
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    t = jnp.array([5, 80])
    params = jax.jit(model.init)(jax.random.key(1), x, t)["params"]
    check_forward_mode(lambda p, x: model.apply({"params": p}, x, t), params, x, monkeypatch)


# ----------------------------------------------------------------------------------------------
# train_classifier: the shared training loop (issue 22) under a 4-step run of a tiny classifier.


def classifier_config(**overrides):
    """4 steps of a one-level classifier on the 8x8 digits, two micro-batches per optimiser update,
    EMA decay 0.5 (no warm-up), checkpoints every 2 steps, a log line only at the end."""
    from configs import digits_classifier

    config = digits_classifier.get_config()
    config.data.num_threads = 0
    config.diffusion.num_timesteps = 100
    config.classifier.ch_mult = (1,)
    config.classifier.dropout = 0.0
    config.optim.learning_rate = 1e-2
    config.optim.warmup_steps = 0
    config.optim.lr_schedule = "constant"
    config.optim.grad_accum_steps = 2
    config.ema.decay = 0.5
    config.ema.warmup = False
    config.train.batch_size = 8
    config.train.num_steps = 4
    config.train.log_every_steps = 50
    config.checkpoint.every_steps = 2
    config.checkpoint.keep = 10
    for key, value in overrides.items():
        section, name = key.split(".")
        setattr(config[section], name, value)
    return config


def saved_state(workdir, step: int) -> dict:
    """The whole TrainState saved as checkpoint ``step`` of ``workdir``, as numpy."""
    import warnings

    import orbax.checkpoint as ocp

    with ocp.PyTreeCheckpointer() as checkpointer, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sharding info not provided")  # one CPU device
        state = checkpointer.restore(workdir / "checkpoints" / str(step) / "state")
    return jax.tree.map(np.asarray, state)


def checkpoint_steps(workdir) -> list[int]:
    directory = workdir / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir()) if directory.exists() else []


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    from _train_helpers import cache_dir, compilation_cache

    with compilation_cache(cache_dir(tmp_path_factory)) as directory:
        yield directory


@pytest.fixture(scope="module")
def stopped_and_resumed(cache, tmp_path_factory):
    """The run sent SIGTERM after step 3 (checkpoints 2 and 3), then rerun to step 4."""
    import os
    import signal

    from diffusion_jax import classifier_trainer

    workdir = tmp_path_factory.mktemp("classifier")

    def term(step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    stopped = classifier_trainer.train_classifier(classifier_config(), workdir, hooks=[term])
    after_stop = {
        "checkpoints": checkpoint_steps(workdir),
        "eval.json": (workdir / "eval.json").exists(),
        "config.json": (workdir / "config.json").exists(),
    }
    steps_run = []
    resumed = classifier_trainer.train_classifier(
        classifier_config(), workdir, hooks=[steps_run.append]
    )
    return workdir, stopped, after_stop, steps_run, resumed


def test_sigterm_saves_the_classifier_and_a_rerun_resumes(stopped_and_resumed):
    workdir, stopped, after_stop, steps_run, resumed = stopped_and_resumed
    assert stopped == {"step": 3, "accuracy": None}  # saved and returned; no evaluation
    assert after_stop == {"checkpoints": [2, 3], "eval.json": False, "config.json": True}
    assert steps_run == [4]  # from the SIGTERM checkpoint on
    assert checkpoint_steps(workdir) == [2, 3, 4]
    assert resumed["step"] == 4 and sorted(resumed["accuracy"]) == [0, 25, 50, 74, 99]
    assert json.loads((workdir / "eval.json").read_text())["step"] == 4


def test_classifier_ema_moves_once_per_optimizer_update(stopped_and_resumed):
    """grad_accum_steps=2: step 3 is a micro-batch (parameters and EMA as at step 2), step 4 an
    update, after which ema = 0.5 ema_2 + 0.5 params_4 (float64 recomputation). The old trainer
    moved the EMA at every micro-batch."""
    workdir = stopped_and_resumed[0]
    s2, s3, s4 = (saved_state(workdir, step) for step in (2, 3, 4))
    assert [int(s["step"]) for s in (s2, s3, s4)] == [2, 3, 4]
    jax.tree.map(np.testing.assert_array_equal, s3["params"], s2["params"])
    jax.tree.map(np.testing.assert_array_equal, s3["ema_params"], s2["ema_params"])
    moved = jax.tree.leaves(
        jax.tree.map(lambda a, b: np.abs(a - b).max(), s4["params"], s2["params"])
    )
    assert max(moved) > 1e-3  # the update at step 4 moved the parameters

    def expected(ema, params):
        return 0.5 * ema.astype(np.float64) + 0.5 * params.astype(np.float64)

    want = jax.tree.map(expected, s2["ema_params"], s4["params"])
    jax.tree.map(
        lambda got, w: np.testing.assert_allclose(got, w, rtol=1e-6, atol=1e-7),
        s4["ema_params"],
        want,
    )


def test_classifier_refuses_an_incompatible_checkpoint_or_workdir(stopped_and_resumed, tmp_path):
    """config.json deleted: the config saved in checkpoint 4 still refuses another network, before
    anything is restored or written; a diffusion run's workdir is refused by kind."""
    from diffusion_jax import checkpoints, classifier_trainer, config_utils

    copy = tmp_path / "copy"
    shutil.copytree(stopped_and_resumed[0], copy)
    (copy / "config.json").unlink()
    with pytest.raises(ValueError, match=r"checkpoint 4 (.|\n)*incompatible config") as e:
        classifier_trainer.train_classifier(
            classifier_config(**{"classifier.num_res_blocks": 2}), copy
        )
    assert "classifier.num_res_blocks: 1 -> 2" in str(e.value)
    assert checkpoint_steps(copy) == [2, 3, 4] and not (copy / "config.json").exists()
    assert not (copy / "checkpoints.unreadable").exists()

    from _train_helpers import tiny_config

    diffusion = tmp_path / "diffusion"
    diffusion.mkdir()
    checkpoints.write_config(diffusion, config_utils.parse_config(tiny_config()))
    with pytest.raises(ValueError, match="of a diffusion model, not of a noise-aware classifier"):
        classifier_trainer.train_classifier(classifier_config(), diffusion)


def poison_step(monkeypatch, step: int) -> None:
    """Makes the images of training step ``step`` (1-based) all NaN."""
    from diffusion_jax import data

    real = data.make_train_iterator

    def make(cfg, **kwargs):
        it = real(cfg, **kwargs)
        for i, batch in enumerate(it, start=1):
            yield dict(batch, x=np.full_like(batch["x"], np.nan)) if i == step else batch

    monkeypatch.setattr(data, "make_train_iterator", make)


def test_classifier_nonfinite_loss_stops_before_any_save(cache, tmp_path, monkeypatch):
    """on_nonfinite='stop': a NaN batch at step 1 stops the run at its first save (step 2) with no
    checkpoint and no config.json written (the old trainer wrote config.json at start and checked
    only at log steps, so it checkpointed the NaN state)."""
    from diffusion_jax import classifier_trainer, trainer

    poison_step(monkeypatch, 1)
    with pytest.raises(trainer.NonFiniteLossError, match="at step 1.*no checkpoint was written"):
        classifier_trainer.train_classifier(classifier_config(), tmp_path)
    assert checkpoint_steps(tmp_path) == []
    assert not (tmp_path / "config.json").exists()


def test_classifier_nonfinite_loss_is_skipped_and_counted(cache, tmp_path, monkeypatch, caplog):
    from diffusion_jax import classifier_trainer

    poison_step(monkeypatch, 3)
    config = classifier_config(**{"train.on_nonfinite": "skip"})
    with caplog.at_level(logging.INFO):
        result = classifier_trainer.train_classifier(config, tmp_path)
    assert result["step"] == 4 and all(np.isfinite(a) for a in result["accuracy"].values())
    assert "step 4/4 | loss" in caplog.text and "1 non-finite steps skipped" in caplog.text
    state = saved_state(tmp_path, 4)
    assert (int(state["nonfinite_steps"]), int(state["first_nonfinite_step"])) == (1, 3)
    leaves = jax.tree.leaves((state["params"], state["ema_params"], state["opt_state"]))
    assert all(np.all(np.isfinite(a)) for a in leaves if np.issubdtype(a.dtype, np.floating))
