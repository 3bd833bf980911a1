"""diffusers ``UNet2DModel`` weights -> a workdir of our U-Net, checked against diffusers itself.

Randomly initialised diffusers models (every weight perturbed, so none is trivially zero or one),
saved with ``save_pretrained`` and converted: our forward pass equals theirs, our DDPM / DDIM
samplers loaded from the converted workdir equal hand-written diffusers scheduler loops from the
same x_T (and, for DDPM, the same per-step noise), and the export writes a directory diffusers
loads back to the same function. Skipped where torch, diffusers or safetensors are not installed.
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")
pytest.importorskip("diffusers")


def _diffusers():
    """diffusers' U-Net and schedulers. It imports torchvision when installed, for models not used
    here; a torchvision built for another torch fails to register its ops, so it is kept out."""
    import diffusers.utils.import_utils as import_utils

    import_utils._torchvision_available = False
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

    return UNet2DModel, DDPMScheduler, DDIMScheduler


from diffusion_jax import checkpoints, config_utils, convert  # noqa: E402
from diffusion_jax.schedules import betas_for_schedule  # noqa: E402

# google/ddpm-cifar10-32's config.json (diffusers 0.0.4 era keys).
CIFAR10 = {
    "act_fn": "silu",
    "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 32,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
# The same block layout, narrower, one block per level and at 16x16, for the forward comparisons.
NARROW = {
    **CIFAR10,
    "block_out_channels": [32, 64, 64, 64],
    "layers_per_block": 1,
    "sample_size": 16,
}
# Attention heads > 1 (head dim 16: 2 heads at 32 channels, 4 in the middle), a class table,
# diffusers' [cos, sin] embedding order, scale-shift norm and learned variance (6 = 2 x 3 outputs).
FEATURES = {
    **CIFAR10,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D"],
    "attention_head_dim": 16,
    "num_class_embeds": 5,
    "flip_sin_to_cos": True,
    "resnet_time_scale_shift": "scale_shift",
    "attn_norm_num_groups": 32,
    "out_channels": 6,
    "sample_size": 8,
}
T = 1000


def _random_unet(config: dict, seed: int):
    UNet2DModel = _diffusers()[0]
    torch.manual_seed(seed)
    model = UNet2DModel(**config).eval()
    with torch.no_grad():
        for p in model.parameters():  # norms near 1, everything else (zero biases too) nonzero
            p.add_(0.05 * torch.randn_like(p))
    return model


def _save(model, directory, scheduler_config: dict) -> None:
    DDPMScheduler = _diffusers()[1]
    model.save_pretrained(directory)
    DDPMScheduler(**scheduler_config).save_pretrained(directory)


@pytest.fixture(scope="module")
def narrow(tmp_path_factory):
    """(diffusers model, its directory): the CIFAR-10 architecture at width 32, linear betas."""
    model = _random_unet(NARROW, seed=0)
    directory = tmp_path_factory.mktemp("narrow")
    _save(model, directory, {"num_train_timesteps": T, "variance_type": "fixed_small"})
    return model, directory


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    """(diffusers model, its directory, converted workdir): FEATURES, cosine betas, learned range
    variance."""
    model = _random_unet(FEATURES, seed=1)
    directory = tmp_path_factory.mktemp("features_diffusers")
    scheduler = {"beta_schedule": "squaredcos_cap_v2", "variance_type": "learned_range"}
    _save(model, directory, scheduler)
    workdir = tmp_path_factory.mktemp("features_run") / "run"
    convert.convert_diffusers(directory, workdir)
    return model, directory, workdir


def _theirs(model, x_nhwc, t, y=None) -> np.ndarray:
    with torch.no_grad():
        x = torch.from_numpy(np.asarray(x_nhwc).transpose(0, 3, 1, 2).copy())
        labels = None if y is None else torch.from_numpy(np.asarray(y))
        out = model(x, torch.from_numpy(np.asarray(t)), class_labels=labels).sample
    return out.numpy().transpose(0, 2, 3, 1)


def _assert_close_relative(ours, theirs, tol: float) -> None:
    err, scale = np.max(np.abs(np.asarray(ours) - theirs)), np.max(np.abs(theirs))
    assert err <= tol * scale, f"max error {err:.3g} > {tol} x max |theirs| {scale:.3g}"


def _ours(directory, data_shape):
    source = convert.read_diffusers(directory)
    config, shape, _ = convert.config_from_diffusers(source.unet_config, source.scheduler_config)
    assert shape == data_shape
    flip = source.unet_config["flip_sin_to_cos"]  # save_pretrained writes every key
    params = convert.params_from_diffusers(source.state_dict, config, shape, flip_sin_to_cos=flip)
    return config, params


def test_forward_matches_diffusers(narrow):
    model, directory = narrow
    config, params = _ours(directory, (16, 16, 3))
    assert config.model.kwargs["attn_resolutions"] == (8,)  # AttnDownBlock2D at level 1
    x = np.random.default_rng(0).standard_normal((2, 16, 16, 3), np.float32)
    t = np.array([3, 712])
    ours = jax.jit(config_utils.build_model(config).apply)({"params": params}, x, t)
    _assert_close_relative(ours, _theirs(model, x, t), 1e-4)


def test_bin_with_old_attention_names_converts_identically(narrow, tmp_path):
    """A .bin (torch pickle) written with the pre-0.14 names query/key/value/proj_attn."""
    model, directory = narrow
    old = {}
    for name, value in model.state_dict().items():
        for new, was in (("to_q", "query"), ("to_k", "key"), ("to_v", "value")):
            name = name.replace(f".{new}.", f".{was}.")
        old[name.replace(".to_out.0.", ".proj_attn.")] = value
    assert any(".query." in k for k in old) and not any(".to_q." in k for k in old)
    torch.save(old, tmp_path / "diffusion_pytorch_model.bin")
    shutil.copy(directory / "config.json", tmp_path / "config.json")
    (tmp_path / "scheduler").mkdir()
    shutil.copy(directory / "scheduler_config.json", tmp_path / "scheduler")
    _, from_bin = _ours(tmp_path, (16, 16, 3))
    _, from_safetensors = _ours(directory, (16, 16, 3))
    jax.tree.map(np.testing.assert_array_equal, from_bin, from_safetensors)


def test_cifar10_architecture_maps_exactly():
    """google/ddpm-cifar10-32's U-Net: every tensor maps onto ours with its exact shape, and both
    count the DDPM paper's 35,746,307 parameters (shapes only: nothing is run)."""
    UNet2DModel = _diffusers()[0]
    with torch.device("meta"):
        state = UNet2DModel(**CIFAR10).state_dict()
    zeros = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in state.items()}
    config, shape, _ = convert.config_from_diffusers(CIFAR10, None)
    assert shape == (32, 32, 3)
    assert config.model.kwargs["ch_mult"] == (1, 2, 2, 2)
    params = convert.params_from_diffusers(zeros, config, shape)
    count = lambda tree: sum(int(np.prod(np.shape(a))) for a in jax.tree.leaves(tree))
    assert count(params) == sum(v.numel() for v in state.values()) == 35_746_307


def test_heads_classes_flip_scale_shift_forward(features):
    """Attention heads > 1, a class embedding, [cos, sin] time features, scale-shift norm and
    learned-variance outputs: the converted forward equals diffusers'."""
    model, _, workdir = features
    run = checkpoints.load_sampler(workdir)
    kw = run.config.model.kwargs
    assert (kw["num_head_channels"], kw["num_classes"], kw["learn_sigma"]) == (16, 5, True)
    assert run.config.diffusion.loss == "hybrid" and run.config.diffusion.schedule == "cosine"
    x = np.random.default_rng(1).standard_normal((3, 8, 8, 3), np.float32)
    t, y = np.array([0, 250, 999]), np.array([4, 0, 2])
    ours = jax.jit(config_utils.build_model(run.config).apply)({"params": run.params}, x, t, y)
    _assert_close_relative(ours, _theirs(model, x, t, y), 1e-4)


def _x_T_and_loop_key(rng, shape):
    """The x_T and per-step key of ``make_sampler``'s ``sample(params, rng, shape)``."""
    init_rng, loop_rng = jax.random.split(rng)
    return np.asarray(jax.random.normal(init_rng, shape, jnp.float32)), loop_rng


def _nchw(a) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a).transpose(0, 3, 1, 2).copy())


def test_ddpm_sampler_matches_diffusers_loop(features, monkeypatch):
    """Our ddpm sampler (learned range variance, class labels, 10 leading-spaced steps of T=1000
    cosine) from the converted workdir equals DDPMScheduler's loop fed the same x_T and noise."""
    from diffusers.schedulers import scheduling_ddpm

    model, directory, workdir = features
    run = checkpoints.load_sampler(workdir, sampler="ddpm", num_steps=10)
    assert run.config.sample.spacing == "leading"
    shape, rng, y = (2, 8, 8, 3), jax.random.key(7), np.array([1, 3])
    ours = np.asarray(run.sample(run.params, rng, shape, y=jnp.asarray(y)))

    x_T, loop_rng = _x_T_and_loop_key(rng, shape)
    scheduler = _diffusers()[1].from_pretrained(directory)
    scheduler.set_timesteps(10)
    noises = [
        _nchw(jax.random.normal(jax.random.fold_in(loop_rng, i), shape, jnp.float32))
        for i in range(9, -1, -1)
    ]
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, **k: noises.pop(0))
    x = _nchw(x_T)
    labels = torch.from_numpy(y)
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = model(x, t, class_labels=labels).sample
            x = scheduler.step(out, t, x).prev_sample
    assert len(noises) == 1  # t = 0 adds none
    np.testing.assert_allclose(ours, x.numpy().transpose(0, 2, 3, 1), atol=1e-3)


def test_ddim_sampler_matches_diffusers_loop(features):
    """Our ddim sampler (eta = 0, clipped x0_hat, 10 leading-spaced steps) from the converted
    workdir equals DDIMScheduler's loop from the same x_T, with the clipped x0_hat's eps as ours
    uses (``use_clipped_model_output``) and the mean channels of the learned-variance output."""
    model, directory, workdir = features
    run = checkpoints.load_sampler(workdir, sampler="ddim", num_steps=10, eta=0.0)
    assert run.config.sample.clip_denoised
    shape, rng, y = (2, 8, 8, 3), jax.random.key(3), np.array([2, 0])
    ours = np.asarray(run.sample(run.params, rng, shape, y=jnp.asarray(y)))

    x_T, _ = _x_T_and_loop_key(rng, shape)
    _, DDPMScheduler, DDIMScheduler = _diffusers()
    scheduler = DDIMScheduler.from_config(DDPMScheduler.from_pretrained(directory).config)
    scheduler.set_timesteps(10)
    x, labels = _nchw(x_T), torch.from_numpy(y)
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = model(x, t, class_labels=labels).sample[:, :3]
            x = scheduler.step(out, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    np.testing.assert_allclose(ours, x.numpy().transpose(0, 2, 3, 1), atol=1e-3)


def test_export_loads_back_into_diffusers(features, tmp_path):
    """Our run -> a diffusers pipeline directory -> UNet2DModel / DDPMScheduler.from_pretrained:
    the same function as the original (whose [cos, sin] order the export folds into the weights)."""
    model, _, workdir = features
    UNet2DModel, DDPMScheduler, _ = _diffusers()
    configs = convert.export_diffusers(workdir, tmp_path / "out")
    assert configs["unet"]["num_class_embeds"] == 5  # the zero null row is not exported
    exported = UNet2DModel.from_pretrained(tmp_path / "out" / "unet").eval()
    x = np.random.default_rng(2).standard_normal((2, 8, 8, 3), np.float32)
    t, y = np.array([5, 900]), np.array([0, 4])
    _assert_close_relative(_theirs(exported, x, t, y), _theirs(model, x, t, y), 1e-5)
    scheduler = DDPMScheduler.from_pretrained(tmp_path / "out" / "scheduler").config
    assert (scheduler.beta_schedule, scheduler.variance_type) == (
        "squaredcos_cap_v2",
        "learned_range",
    )
    index = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DModel"]


def test_unsupported_options_are_each_named():
    bad = {
        **CIFAR10,
        "norm_num_groups": 16,
        "act_fn": "gelu",
        "freq_shift": 0,
        "downsample_padding": 1,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    }
    with pytest.raises(convert.UnsupportedDiffusersModel) as info:
        convert.model_from_diffusers(bad)
    message = str(info.value)
    for name in ("norm_num_groups=16", "act_fn='gelu'", "freq_shift=0", "downsample_padding=1",
                 "CrossAttnDownBlock2D"):  # fmt: skip
        assert name in message, message
    scheduler = {"variance_type": "learned", "trained_betas": [0.1] * 10}
    with pytest.raises(convert.UnsupportedDiffusersModel) as info:
        convert.diffusion_from_scheduler(scheduler, learn_sigma=False)
    assert "variance_type='learned'" in str(info.value) and "trained_betas" in str(info.value)


def test_scheduler_settings_carry_over():
    """Each diffusers scheduler option lands on the matching key of our config."""
    diffusion, sample, notes = convert.diffusion_from_scheduler(
        {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
         "beta_end": 0.012, "prediction_type": "v_prediction", "clip_sample": False,
         "num_train_timesteps": 500, "timestep_spacing": "trailing", "steps_offset": 1},
        learn_sigma=False,
    )  # fmt: skip
    assert diffusion == {
        "process": "vp", "discrete": True, "schedule": "quadratic", "num_timesteps": 500,
        "prediction": "v", "loss": "simple", "beta_start": 0.00085, "beta_end": 0.012,
    }  # fmt: skip
    assert sample == {"clip_denoised": False, "variance": "fixed_small", "spacing": "trailing",
                      "sampler": "ddim"}  # fmt: skip
    assert notes == []
    # diffusers' quadratic ("scaled_linear") and cosine betas are ours.
    _, DDPMScheduler, _ = _diffusers()
    for theirs, ours in (("scaled_linear", "quadratic"), ("squaredcos_cap_v2", "cosine")):
        kwargs = {"beta_start": 0.00085, "beta_end": 0.012} if ours == "quadratic" else {}
        expected = DDPMScheduler(beta_schedule=theirs, **kwargs).betas.numpy()
        np.testing.assert_allclose(
            betas_for_schedule(ours, 1000, **kwargs), expected, rtol=1e-5, atol=1e-8
        )
