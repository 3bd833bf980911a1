"""sample.py / diffusion_jax.generate and train_classifier.py / diffusion_jax.classifier_trainer.

A 2-step run of the tiny class-conditional digits U-Net (T = 100, label dropout 0.1) is the model;
the samples are not meant to look like digits, only to be exactly what the library computes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import _train_helpers as helpers
import jax
import numpy as np
import pytest

ROOT = helpers.ROOT


def _override(config, overrides: dict):
    """Sets "section.key" entries of a ConfigDict."""
    for key, value in overrides.items():
        section, name = key.split(".")
        setattr(getattr(config, section), name, value)
    return config


def _tiny_run_config(**overrides):
    config = helpers.tiny_config()
    config.train.num_steps = 2
    config.checkpoint.every_steps = 2
    config.sample.num_samples = 0
    return _override(config, overrides)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    from diffusion_jax import trainer

    workdir = tmp_path_factory.mktemp("digits_run")
    with helpers.compilation_cache(helpers.cache_dir(tmp_path_factory)):
        trainer.train_and_evaluate(_tiny_run_config(), workdir)
    return workdir


def _classifier_config(num_steps: int, **overrides):
    from configs import digits_classifier

    config = digits_classifier.get_config()
    config.diffusion.num_timesteps = 100  # the tiny run's forward process
    config.data.num_threads = 0
    config.train.batch_size = 64
    config.train.num_steps = num_steps
    config.train.log_every_steps = 50
    config.checkpoint.every_steps = 50
    config.ema.decay = 0.9
    return _override(config, overrides)


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    from diffusion_jax import classifier_trainer

    workdir = tmp_path_factory.mktemp("classifier_run")
    with helpers.compilation_cache(helpers.cache_dir(tmp_path_factory)):
        result = classifier_trainer.train_classifier(_classifier_config(150), workdir)
    return workdir, result


# ----------------------------------------------------------------------------------------------
# Labels and files.


def test_parse_labels():
    from diffusion_jax.generate import parse_labels

    np.testing.assert_array_equal(parse_labels("all", 12, 10, 10), [*range(10), 0, 1])
    np.testing.assert_array_equal(parse_labels("1,7", 5, 10, 10), [1, 7, 1, 7, 1])
    np.testing.assert_array_equal(parse_labels(" 3 ", 2, 10, None), [3, 3])
    np.testing.assert_array_equal(parse_labels("none", 3, 10, 10), [10, 10, 10])
    assert parse_labels("all", 4, None, None) is None
    with pytest.raises(ValueError, match=r"must lie in 0\.\.9"):
        parse_labels("12", 4, 10, 10)
    with pytest.raises(ValueError, match="label dropout"):
        parse_labels("none", 4, 10, None)
    with pytest.raises(ValueError, match="unconditional"):
        parse_labels("3", 4, None, None)
    with pytest.raises(ValueError, match="expected 'all', 'none' or integers"):
        parse_labels("seven", 4, 10, 10)


def test_write_samples_layout(tmp_path):
    from diffusion_jax import generate

    x = np.linspace(-1, 1, 2 * 4 * 4 * 1, dtype=np.float32).reshape(2, 4, 4, 1)
    paths = generate.write_samples(tmp_path / "out", "s", x, np.array([3, 4]), metadata={"seed": 5})
    with np.load(paths["npz"]) as f:
        assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (2, 4, 4, 1)
        np.testing.assert_array_equal(f["arr_0"], np.rint((x + 1) * 127.5).astype(np.uint8))
        np.testing.assert_array_equal(f["arr_1"], [3, 4])
    info = json.loads(open(paths["json"]).read())
    assert info["seed"] == 5 and info["shape"] == [2, 4, 4, 1]
    from PIL import Image

    assert Image.open(paths["png"]).size[0] > 4


# ----------------------------------------------------------------------------------------------
# Guided samplers from a workdir: exact reductions to the plain sampler.


def _draw(sample, params, labels, **kwargs):
    return np.asarray(
        jax.jit(sample, static_argnums=2)(
            params, jax.random.key(3), (4, 8, 8, 1), y=labels, **kwargs
        )
    )


def test_guidance_scale_one_and_zero_are_the_conditional_and_unconditional_models(digits_run):
    from diffusion_jax import checkpoints, generate

    plain = checkpoints.load_sampler(digits_run, sampler="ddim", num_steps=3)
    labels = np.array([0, 3, 5, 9], np.int32)
    cond = _draw(plain.sample, plain.params, labels)
    uncond = _draw(plain.sample, plain.params, np.full(4, 10, np.int32))
    assert not np.allclose(cond, uncond)  # the labels matter, so the checks below can fail

    one = generate.make_guided_sampler(digits_run, sampler="ddim", num_steps=3, guidance_scale=1.0)
    assert one.num_classes == 10 and one.null_label == 10
    np.testing.assert_array_equal(_draw(one.sample, one.params, labels, guidance_scale=1.0), cond)
    zero = generate.make_guided_sampler(digits_run, sampler="ddim", num_steps=3, guidance_scale=0.0)
    np.testing.assert_allclose(
        _draw(zero.sample, zero.params, labels, guidance_scale=0.0), uncond, atol=1e-5
    )
    two = _draw(zero.sample, zero.params, labels, guidance_scale=2.0)  # w is a traced argument
    np.testing.assert_allclose(two, _draw(zero.sample, zero.params, labels, guidance_scale=2.0))
    assert not np.allclose(two, cond, atol=1e-3)


def test_unconditional_points_run_refuses_guidance_and_labels(tmp_path):
    import ml_collections

    from diffusion_jax import generate, trainer

    config = _tiny_run_config(**{"train.num_steps": 1, "checkpoint.every_steps": 1})
    config.data.source, config.data.use_labels = "moons", False
    config.model = ml_collections.ConfigDict({"name": "mlp", "hidden": 16, "num_layers": 1})
    config.diffusion.label_dropout = 0.0
    workdir = tmp_path / "points"
    trainer.train_and_evaluate(config, workdir)
    with pytest.raises(ValueError, match="num_classes=None.*Use --guidance_scale=1"):
        generate.make_guided_sampler(workdir, guidance_scale=2.0)
    with pytest.raises(ValueError, match="needs --classifier_workdir"):
        generate.make_guided_sampler(workdir, classifier_scale=1.0)
    guided = generate.make_guided_sampler(workdir, sampler="ddim", num_steps=2)
    assert guided.num_classes is None and guided.null_label is None and guided.data_shape == (2,)
    labels = generate.parse_labels("all", 5, guided.num_classes, guided.null_label)
    points = guided.sample(guided.params, jax.random.key(0), (5, 2), guidance_scale=1.0)
    paths = generate.write_samples(tmp_path / "out", "p", np.asarray(points), labels)
    with np.load(paths["npz"]) as f:
        assert f.files == ["arr_0"] and f["arr_0"].dtype == np.float32
        np.testing.assert_array_equal(f["arr_0"], np.asarray(points))


# ----------------------------------------------------------------------------------------------
# The noise-aware classifier.


def test_classifier_learns_and_its_accuracy_falls_with_noise(classifier_run):
    workdir, result = classifier_run
    accuracy = {int(t): a for t, a in result["accuracy"].items()}
    assert result["step"] == 150 and sorted(accuracy) == [0, 25, 50, 74, 99]
    assert json.loads((workdir / "eval.json").read_text())["step"] == 150
    # 297 held-out digits, 10 balanced classes: chance is 0.1 with standard error
    # sqrt(0.1 * 0.9 / 297) = 0.017; 5 standard errors either side decide.
    se = math.sqrt(0.1 * 0.9 / 297)
    assert accuracy[0] > 0.1 + 5 * se + 0.3, accuracy  # well above chance on clean digits
    assert accuracy[99] < 0.1 + 5 * se, accuracy  # x_T carries (almost) no label information
    assert accuracy[0] > accuracy[50] > accuracy[99] - 5 * se, accuracy


def test_classifier_training_resumes_exactly(tmp_path_factory, classifier_run):
    from diffusion_jax import classifier_trainer

    workdir = tmp_path_factory.mktemp("resumed")
    with helpers.compilation_cache(helpers.cache_dir(tmp_path_factory)):
        classifier_trainer.train_classifier(_classifier_config(100), workdir)
        resumed = classifier_trainer.train_classifier(_classifier_config(150), workdir)
    assert resumed == classifier_run[1]  # same held-out accuracies as the uninterrupted run
    _, params_a, _ = classifier_trainer.load_classifier(workdir)
    _, params_b, _ = classifier_trainer.load_classifier(classifier_run[0])
    jax.tree.map(np.testing.assert_array_equal, params_a, params_b)


def test_classifier_config_errors(tmp_path, classifier_run):
    from diffusion_jax import classifier_trainer
    from diffusion_jax.config_utils import ConfigError

    with pytest.raises(
        ConfigError, match="classifier.num_res_block.*Did you mean 'num_res_blocks'"
    ):
        classifier_trainer.parse_classifier_config({"classifier": {"num_res_block": 3}})
    with pytest.raises(ConfigError, match="needs labels"):
        classifier_trainer.parse_classifier_config({"data": {"use_labels": False}})
    with pytest.raises(ConfigError, match="num_classes=7 but the data"):
        classifier_trainer.train_classifier(
            _classifier_config(1, **{"classifier.num_classes": 7}), tmp_path / "x"
        )
    with pytest.raises(ValueError, match=r"incompatible config(.|\n)*num_timesteps: 100 -> 50"):
        classifier_trainer.train_classifier(
            _classifier_config(1, **{"diffusion.num_timesteps": 50}), classifier_run[0]
        )


def test_classifier_guidance_from_workdirs(digits_run, classifier_run, tmp_path):
    from diffusion_jax import checkpoints, classifier_trainer, generate

    labels = np.array([1, 2, 3, 4], np.int32)
    plain = checkpoints.load_sampler(digits_run, sampler="ddpm", num_steps=5)
    off = generate.make_guided_sampler(
        digits_run, sampler="ddpm", num_steps=5, classifier_workdir=classifier_run[0]
    )
    assert set(off.params) == {"model", "classifier"}
    np.testing.assert_array_equal(  # scale 0 adds exactly nothing to the mean
        _draw(off.sample, off.params, labels), _draw(plain.sample, plain.params, labels)
    )
    on = generate.make_guided_sampler(
        digits_run, sampler="ddpm", num_steps=5, classifier_workdir=classifier_run[0],
        classifier_scale=50.0,
    )  # fmt: skip
    guided = _draw(on.sample, on.params, labels)
    assert np.all(np.isfinite(guided)) and not np.allclose(
        guided, _draw(plain.sample, plain.params, labels)
    )
    # A classifier of a different forward process is refused.
    _, _, classifier_config = classifier_trainer.load_classifier(classifier_run[0])
    other = dataclasses.replace(
        classifier_config,
        diffusion=dataclasses.replace(classifier_config.diffusion, num_timesteps=50),
    )
    with pytest.raises(ValueError, match="num_timesteps=50.*same forward process"):
        generate._check_same_schedule(plain.config, other, "run", "clf")


# ----------------------------------------------------------------------------------------------
# The command line.


def test_sample_py_writes_what_the_library_computes(digits_run, tmp_path, tmp_path_factory):
    from diffusion_jax import generate
    from diffusion_jax.evaluation import export

    out = tmp_path / "gen"
    args = [
        sys.executable, str(ROOT / "sample.py"), f"--workdir={digits_run}", "--sampler=dpm_solver_2m",
        "--num_steps=3", "--num_samples=12", "--batch_size=8", "--guidance_scale=2", "--seed=4",
        f"--output_dir={out}",
    ]  # fmt: skip
    env = helpers.worker_env(helpers.cache_dir(tmp_path_factory))
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out / "dpm_solver_2m3_w2_seed4.npz") as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.shape == (12, 8, 8, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, np.arange(12) % 10)
    info = json.loads((out / "dpm_solver_2m3_w2_seed4.json").read_text())
    assert info["guidance_scale"] == 2.0 and info["seed"] == 4 and info["num_steps"] == 3
    from diffusion_jax import checkpoints

    assert info["checkpoint_step"] == checkpoints.resolve_step(digits_run)

    guided = generate.make_guided_sampler(
        digits_run, sampler="dpm_solver_2m", num_steps=3, guidance_scale=2.0
    )
    expected = export.generate_samples(
        guided.sample, guided.params, num_samples=12, batch_size=8, image_shape=(8, 8, 1),
        seed=4, labels=labels, guidance_scale=2.0,
    )  # fmt: skip
    diff = np.abs(images.astype(int) - export.to_uint8(expected).astype(int))
    assert diff.max() <= 1, diff.max()  # a rounding step apart at most (separate compilations)

    bad = subprocess.run(
        args[:3] + ["--labels=12", f"--output_dir={out}"], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode != 0 and "class labels must lie in 0..9" in bad.stderr
