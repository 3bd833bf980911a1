"""Issue 22, item 3: the defects found in review, each with a test that failed before its fix.

Here: the reverse variance as a config key (``sample.variance``) and a ``sample.py`` flag, and
float16 refused. Elsewhere: the exact ``normal_kl`` (tests/test_losses.py), the README's names and
repository URL (tests/test_readme.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffusion_jax as dj
from diffusion_jax import config_utils

T = 25  # a 25-step process (the default endpoints need T >= 21): each sampler compiles in ~1 s


def _points_config(**sample):
    """A checked config dict of a tiny unconditional 2-D MLP run on the T-step linear VP process."""
    from configs import toy2d

    config = toy2d.get_config()
    config.model.hidden = 16
    config.model.num_layers = 1
    config.model.fourier_features = 4
    config.diffusion.num_timesteps = T
    config.sample.sampler = "ddpm"
    values = config.to_dict()
    values["sample"].update(sample)
    return values


def _oracle(params, x_t, t, y=None):
    """A stand-in denoiser: eps_hat = 0.5 x_t (no parameters)."""
    return 0.5 * x_t


# ----------------------------------------------------------------------------------------------
# The reverse variance: a config key, defaulting to what each run did before.


def test_sample_variance_reaches_the_ddpm_sampler():
    config = config_utils.parse_config(_points_config(variance="fixed_large"))
    sample = config_utils.build_sampler(config, denoise_fn=_oracle)
    schedule = dj.make_schedule("linear", T)
    rng, shape = jax.random.key(3), (64, 2)
    got = np.asarray(sample(None, rng, shape))
    for variance in ("fixed_large", "fixed_small"):
        expected = dj.make_sampler(
            _oracle, schedule, sampler="ddpm", variance=variance, clip_denoised=False
        )
        diff = np.abs(got - np.asarray(expected(None, rng, shape))).max()
        assert diff == 0 if variance == "fixed_large" else diff > 1e-3, (variance, diff)


def test_sample_variance_defaults_to_the_model_and_old_configs_load():
    values = _points_config()
    values["sample"].pop("variance", None)  # a config.json written before the key existed
    config = config_utils.parse_config(values)
    assert config.sample.variance is None
    assert config_utils.sample_variance(config) == "fixed_small"
    assert config_utils.parse_config(config.to_dict()) == config
    values["model"]["learn_sigma"] = True
    values["diffusion"]["loss"] = "hybrid"
    learned = config_utils.parse_config(values)
    assert config_utils.sample_variance(learned) == "learned_range"
    # A learned-variance model may also sample with a fixed variance (its mean channels alone).
    values["sample"]["variance"] = "fixed_large"
    assert config_utils.sample_variance(config_utils.parse_config(values)) == "fixed_large"


@pytest.mark.parametrize(
    "variance, message",
    [
        ("learned_range", "sample.variance='learned_range' needs .*model.learn_sigma=True"),
        ("fixedlarge", "sample.variance='fixedlarge' is not one of"),
    ],
)
def test_sample_variance_refuses_what_the_model_cannot_do(variance, message):
    with pytest.raises(config_utils.ConfigError, match=message):
        config_utils.parse_config(_points_config(variance=variance))


def test_configs_sample_with_their_papers_variance():
    from configs import celeba64, cifar10, digits

    def variance(module):
        return config_utils.sample_variance(config_utils.parse_config(module.get_config()))

    # DDPM's run_cifar.py (model_var_type='fixedlarge'); DDIM's CelebA config (var_type: fixedlarge).
    assert variance(cifar10) == variance(celeba64) == "fixed_large"
    assert variance(digits) == "fixed_small"  # as before the key existed


def test_make_guided_sampler_threads_the_variance(monkeypatch):
    """sample.py's --variance reaches make_sampler through generate.make_guided_sampler."""
    from diffusion_jax import checkpoints, generate

    config = config_utils.parse_config(_points_config())
    loaded = checkpoints.LoadedSampler(None, {}, config, (2,))
    monkeypatch.setattr(checkpoints, "load_sampler", lambda workdir, step=None: loaded)
    asked = []
    monkeypatch.setattr(dj, "make_sampler", lambda *args, **kwargs: asked.append(kwargs))

    guided = generate.make_guided_sampler("run", variance="fixed_large")
    assert guided.config.sample.variance == "fixed_large"
    assert generate.make_guided_sampler("run").config.sample.variance is None
    assert [kwargs["variance"] for kwargs in asked] == ["fixed_large", "fixed_small"]
    with pytest.raises(ValueError, match="needs .*model.learn_sigma=True"):
        generate.make_guided_sampler("run", variance="learned_range")


# ----------------------------------------------------------------------------------------------
# float16: refused with the way out, for the diffusion model and the classifier alike.


@pytest.mark.parametrize("key", ["dtype", "param_dtype"])
def test_float16_is_refused_naming_bfloat16(key):
    from configs import digits_classifier
    from diffusion_jax import classifier_trainer

    values = _points_config()
    values["model"][key] = "float16"
    with pytest.raises(config_utils.ConfigError, match=f"model.{key}='float16'.*'bfloat16'"):
        config_utils.parse_config(values)
    classifier = digits_classifier.get_config().to_dict()
    classifier["classifier"][key] = "float16"
    with pytest.raises(config_utils.ConfigError, match=f"classifier.{key}='float16'.*'bfloat16'"):
        classifier_trainer.parse_classifier_config(classifier)
    values["model"][key] = "bfloat16"  # what the message asks for is accepted
    assert config_utils.parse_config(values).model.module_kwargs()[key] == jnp.bfloat16
