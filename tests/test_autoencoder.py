"""The KL autoencoder of latent diffusion (models.AutoencoderKL), its trainer through train.py's
dispatch (trainers.train), the latent scale factor it measures, and a latent diffusion run that
samples decoded images through checkpoints.load_sampler."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import checkpoints, config_utils, latent, trainers
from diffusion_jax.models import AutoencoderKL
from diffusion_jax.models.autoencoder import kl_to_standard_normal, sample_posterior


@pytest.mark.parametrize(
    "kwargs, image_shape, latent_shape",
    [
        (dict(out_channels=1, ch_mult=(1, 2), z_channels=2), (8, 8, 1), (4, 4, 2)),
        (dict(out_channels=3, ch_mult=(1, 2, 2), z_channels=4, num_res_blocks=2), (16, 8, 3), (4, 2, 4)),
    ],
)  # fmt: skip
def test_encode_decode_shapes(kwargs, image_shape, latent_shape):
    model = AutoencoderKL(ch=32, **kwargs)
    x = jnp.zeros((2, *image_shape))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    assert model.factor == 2 ** (len(kwargs["ch_mult"]) - 1)
    assert model.latent_shape(image_shape) == latent_shape
    mean, logvar = jax.eval_shape(lambda v, x: model.apply(v, x, method=model.encode), variables, x)
    assert mean.shape == logvar.shape == (2, *latent_shape)
    decoded = jax.eval_shape(lambda v, z: model.apply(v, z, method=model.decode), variables, mean)
    assert decoded.shape == x.shape and decoded.dtype == jnp.float32
    recon, _, _ = jax.eval_shape(lambda v, x: model.apply(v, x, jax.random.key(1)), variables, x)
    assert recon.shape == x.shape
    with pytest.raises(ValueError, match="multiples of"):
        model.latent_shape((image_shape[0] + 1, *image_shape[1:]))


def test_logvar_is_clipped_as_in_ldm():
    model = AutoencoderKL(out_channels=1, ch=32, ch_mult=(1,), num_res_blocks=0, z_channels=1)
    x = jnp.ones((1, 4, 4, 1))
    params = jax.jit(model.init)(jax.random.key(0), x)["params"]
    encode = jax.jit(lambda p: model.apply({"params": p}, x, method=model.encode))
    bias = params["encoder"]["conv_out"]["bias"]
    for shift, bound in ((1e4, 20.0), (-1e4, -30.0)):
        shifted = jax.tree.map(lambda a: a, params)
        shifted["encoder"]["conv_out"]["bias"] = bias.at[1].add(shift)  # channel 1: logvar
        np.testing.assert_array_equal(encode(shifted)[1], bound)


def test_kl_matches_the_float64_closed_form():
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(3, 2, 2, 4)) * 2
    logvar = rng.normal(size=(3, 2, 2, 4))
    expected = 0.5 * np.sum(mean**2 + np.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
    got = jax.jit(kl_to_standard_normal)(mean.astype(np.float32), logvar.astype(np.float32))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    np.testing.assert_allclose(kl_to_standard_normal(np.zeros((2, 3)), np.zeros((2, 3))), 0.0)


def test_posterior_sample_has_the_posterior_mean_and_variance():
    """n draws of each of 4 (mean, logvar) pairs: the sample mean within 5 standard errors
    (sigma / sqrt(n)), the sample variance within 5 of its standard errors (var sqrt(2 / (n - 1)))."""
    n = 40_000
    means = jnp.array([0.0, 1.5, -3.0, 0.25])
    logvars = jnp.array([0.0, -2.0, 1.0, -8.0])
    z = jax.jit(sample_posterior)(
        jnp.broadcast_to(means, (n, 4)), jnp.broadcast_to(logvars, (n, 4)), jax.random.key(0)
    )
    z = np.asarray(z, np.float64)
    var = np.exp(np.asarray(logvars, np.float64))
    assert np.all(np.abs(z.mean(0) - means) < 5 * np.sqrt(var / n))
    assert np.all(np.abs(z.var(0, ddof=1) - var) < 5 * var * np.sqrt(2 / (n - 1)))


# ----------------------------------------------------------------------------------------------
# Training: the autoencoder through train.py's dispatch, then a latent diffusion model on it.


def autoencoder_config(**overrides):
    """A one-level (f = 2) autoencoder on the 8x8 digits, 50 steps of batch 16, no attention."""
    from configs import digits_autoencoder

    config = digits_autoencoder.get_config()
    config.data.num_threads = 0
    config.autoencoder.num_res_blocks = 0
    config.autoencoder.mid_attention = False
    config.optim.learning_rate = 3e-3
    config.optim.warmup_steps = 0
    config.optim.lr_schedule = "constant"
    config.ema.decay = 0.5
    config.ema.warmup = False
    config.train.batch_size = 16
    config.train.num_steps = 50
    config.train.log_every_steps = 25
    config.checkpoint.every_steps = 50
    config.eval.stats_examples = 300
    config.eval.num_images = 4
    for key, value in overrides.items():
        section, name = key.split(".")
        setattr(config[section], name, value)
    return config


def latent_config(autoencoder_workdir):
    """A one-level U-Net on the autoencoder's 4x4x2 latents, 6 steps, T = 50, DDIM-5 samples."""
    from configs import digits_latent

    config = digits_latent.get_config()
    config.latent.autoencoder_workdir = str(autoencoder_workdir)
    config.data.num_threads = 0
    config.model.ch_mult = (1,)
    config.model.num_res_blocks = 0
    config.model.attn_resolutions = ()
    config.diffusion.num_timesteps = 50
    config.optim.warmup_steps = 0
    config.train.batch_size = 8
    config.train.num_steps = 6
    config.train.log_every_steps = 6
    config.checkpoint.every_steps = 6
    config.sample.num_samples = 0
    config.sample.num_steps = 5
    return config


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    from _train_helpers import cache_dir, compilation_cache

    with compilation_cache(cache_dir(tmp_path_factory)) as directory:
        yield directory


@pytest.fixture(scope="module")
def autoencoder_run(cache, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("autoencoder")
    state = trainers.train(autoencoder_config(), workdir)
    return workdir, state


def heldout_digits():
    from diffusion_jax.evaluation.pipeline import load_split

    config = autoencoder_config()
    held_out, _ = load_split(config.data, config.data.eval_split)
    train, _ = load_split(config.data, config.data.split, limit=config.eval.stats_examples)
    return held_out, train


def test_autoencoder_trains_and_measures_its_latent_scale(autoencoder_run):
    """Reconstructions improve on the untrained network's; latent_stats.json holds 1/std of the
    posterior samples of the first stats_examples training digits, recomputed here from the
    checkpoint with the documented noise (batch i of 256: fold_in(key(seed), i))."""
    workdir, state = autoencoder_run
    assert int(state.step) == 50
    stats = json.loads((workdir / latent.LATENT_STATS_FILE).read_text())
    loaded = checkpoints.load_autoencoder(workdir)
    assert loaded.step == stats["step"] == 50 and loaded.image_shape == (8, 8, 1)
    model = config_utils.build_autoencoder(loaded.kwargs)
    held_out, train = heldout_digits()

    reconstruct = jax.jit(lambda p: model.apply({"params": p}, held_out)[0])

    def mse(params):
        return float(np.mean((np.asarray(reconstruct(params), np.float64) - held_out) ** 2))

    untrained = jax.jit(model.init)(jax.random.key(0), held_out[:1])["params"]
    assert mse(loaded.params) < 0.3 * mse(untrained)
    np.testing.assert_allclose(stats["heldout_mse"], mse(loaded.params), rtol=1e-4)

    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))
    mean, logvar = (np.asarray(a, np.float64) for a in encode(loaded.params, train))
    eps = np.concatenate(  # batch i of 256: normal(fold_in(key(seed = 0), i), [256, 4, 4, 2])
        [
            np.asarray(jax.random.normal(jax.random.fold_in(jax.random.key(0), i), (256, 4, 4, 2)))
            for i in range(2)
        ]
    )[: len(train)]
    std = np.std(mean + np.exp(0.5 * logvar) * eps)
    assert stats["num_examples"] == len(train) == 300
    np.testing.assert_allclose(stats["std"], std, rtol=1e-5)
    np.testing.assert_allclose(stats["scale_factor"], 1 / std, rtol=1e-5)


def test_latent_diffusion_samples_decoded_images(autoencoder_run, tmp_path):
    """A few steps on latents; load_sampler gives decoded images of the digits' shape, in [-1, 1],
    from a pure sample(params, rng, shape) that also runs under the caller's jit and vmap."""
    ae_workdir, _ = autoencoder_run
    workdir = tmp_path / "latent"
    state = trainers.train(latent_config(ae_workdir), workdir)
    assert int(state.step) == 6
    saved = json.loads((workdir / "config.json").read_text())["latent"]
    stats = json.loads((ae_workdir / latent.LATENT_STATS_FILE).read_text())
    assert saved["autoencoder_step"] == 50 and saved["scale_factor"] == stats["scale_factor"]
    assert saved["autoencoder"]["z_channels"] == 2

    run = checkpoints.load_sampler(workdir, sampler="ddim", num_steps=5)
    assert run.data_shape == (8, 8, 1) and set(run.params) == {"diffusion", "autoencoder"}
    y = jnp.arange(4) % 10
    sample = jax.jit(run.sample, static_argnums=2)  # the caller's own jit, and vmap inside it
    x = sample(run.params, jax.random.key(0), (4, 8, 8, 1), y=y)
    assert x.shape == (4, 8, 8, 1)
    assert np.all(np.isfinite(x)) and np.all(np.abs(np.asarray(x)) <= 1.0) and np.std(x) > 0.05
    keys = jnp.stack([jax.random.key(0), jax.random.key(1)])
    batched = jax.jit(
        jax.vmap(lambda p, k: run.sample(p, k, (4, 8, 8, 1), y=y), in_axes=(None, 0))
    )(run.params, keys)
    np.testing.assert_allclose(batched[0], x, atol=1e-4)  # the same key, the same images
    assert batched.shape == (2, 4, 8, 8, 1) and not np.allclose(batched[1], x)


def test_latent_run_refuses_a_missing_autoencoder_or_statistics(autoencoder_run, tmp_path):
    ae_workdir, _ = autoencoder_run
    with pytest.raises(FileNotFoundError, match="holds no trained autoencoder.*digits_autoencoder"):
        trainers.train(latent_config(tmp_path / "nowhere"), tmp_path / "run")
    no_stats = tmp_path / "no_stats"
    shutil.copytree(ae_workdir, no_stats)
    (no_stats / latent.LATENT_STATS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="latent_stats.json does not exist"):
        trainers.train(latent_config(no_stats), tmp_path / "run")
    config = latent_config(ae_workdir)
    config.latent.autoencoder_workdir = None
    with pytest.raises(config_utils.ConfigError, match="latent.autoencoder_workdir must name"):
        trainers.train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_workdirs_of_other_kinds_are_refused(autoencoder_run, tmp_path):
    """A diffusion config on an autoencoder's workdir (and the reverse) stops before training."""
    ae_workdir, _ = autoencoder_run
    from configs import tiny

    with pytest.raises(
        ValueError, match="holds a run of an autoencoder .*not of a diffusion model"
    ):
        trainers.train(tiny.get_config(), ae_workdir)
    with pytest.raises(ValueError, match="holds an autoencoder .*not a diffusion model"):
        checkpoints.load_sampler(ae_workdir)
    diffusion = tmp_path / "diffusion"
    diffusion.mkdir()
    (diffusion / "config.json").write_text(
        json.dumps(config_utils.parse_config(tiny.get_config()).to_dict())
    )
    with pytest.raises(ValueError, match="of a diffusion model, not of an autoencoder"):
        trainers.train(autoencoder_config(), diffusion)
    assert config_utils.run_kind(autoencoder_config()) == "autoencoder"
    assert config_utils.describe_run(latent_config(ae_workdir)) == "a latent diffusion model"
