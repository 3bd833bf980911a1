"""The Inception-v3 port and the Frechet distance against pytorch-fid itself (issue 22).

pytorch-fid's weights file cannot be fetched here, so its ``InceptionV3([3])`` (pool3,
``resize_input``, ``normalize_input``) is built with ``load_state_dict_from_url`` replaced and given
random, sanely scaled weights and batch-norm statistics. Its state dict is saved with
``torch.save`` like the real ``pt_inception-2015-12-05-6726825d.pth`` and converted by the
documented snippet and :func:`inception.load_variables`, the path a user takes with the real file.
The reference forward pass runs in float64 (pytorch-fid itself computes in float32).

The FD statistics files come from pytorch-fid's own writer (``save_fid_stats``), reading PNGs that
``export.save_pngs`` wrote, so the file format and pytorch-fid's image loading are covered too.
"""

import copy
import importlib.util
import sys
import types

import numpy as np
import pytest

from diffusion_jax.evaluation import distances, export, inception

TOL = 1e-4  # of the feature scale (max |feature|)


def _import_pytorch_fid():
    """pytorch_fid.inception and .fid_score, or a skip. A torchvision whose compiled operators do
    not load (a CUDA wheel beside a CPU torch fails on ``import torchvision``, in registering
    ``torchvision::nms``) is imported without its package ``__init__``: pytorch-fid only needs the
    pure-Python model code of ``torchvision.models`` and ``torchvision.transforms``."""
    pytest.importorskip("torch")
    if (
        importlib.util.find_spec("pytorch_fid") is None
        or importlib.util.find_spec("torchvision") is None
    ):
        pytest.skip("pytorch-fid (and torchvision) are not installed")
    try:
        import torchvision  # noqa: F401
    except RuntimeError:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        spec = importlib.util.find_spec("torchvision")
        package = types.ModuleType("torchvision")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        sys.modules["torchvision"] = package
        import torchvision.models
        import torchvision.transforms
        import torchvision.version

        package.__version__ = torchvision.version.__version__
        package.models, package.transforms = torchvision.models, torchvision.transforms
    from pytorch_fid import fid_score
    from pytorch_fid import inception as fid_inception

    return fid_inception, fid_score


@pytest.fixture(scope="module")
def pytorch_fid():
    return _import_pytorch_fid()


def _build_pytorch_fid_inception(fid_inception, state_dict=None):
    """pytorch-fid's ``InceptionV3([3])`` and the Inception-v3 inside it, built without a download:
    ``load_state_dict_from_url`` returns ``state_dict`` (default: the model's own initial one)."""
    built = []
    make = fid_inception._inception_v3

    def capture(*args, **kwargs):
        built.append(make(*args, **kwargs))
        return built[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fid_inception, "_inception_v3", capture)
        mp.setattr(
            fid_inception,
            "load_state_dict_from_url",
            lambda *a, **k: built[-1].state_dict() if state_dict is None else state_dict,
        )
        model = fid_inception.InceptionV3([3], resize_input=True, normalize_input=True)
    return model.eval(), built[-1]


@pytest.fixture(scope="module")
def converted(pytorch_fid, tmp_path_factory):
    """(pytorch-fid model with random weights, its .pth file, our features from the .npz)."""
    import torch

    fid_inception, _ = pytorch_fid
    model, net = _build_pytorch_fid_inception(fid_inception)
    gen = torch.Generator().manual_seed(0)

    def rand(shape, low, high):
        return torch.rand(shape, generator=gen, dtype=torch.float32) * (high - low) + low

    with torch.no_grad():  # He-scaled convs, BN near identity: activations neither vanish nor grow
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                std = (2.0 / m.weight[0].numel()) ** 0.5
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * std)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(rand(m.weight.shape, 0.75, 1.25))
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(rand(m.running_var.shape, 0.75, 1.25))
            elif isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 0.02)
    directory = tmp_path_factory.mktemp("pt_inception")
    pth, npz = directory / "pt_inception.pth", directory / "pt_inception.npz"
    torch.save(net.state_dict(), pth)
    # The conversion documented in inception.py, as a user runs it on the real file:
    sd = torch.load(pth, map_location="cpu")
    np.savez(npz, **{k: v.numpy() for k, v in sd.items()})
    return model, pth, inception.InceptionFeatures.from_file(str(npz), batch_size=2)


def _uint8_images(shape, seed):
    """Smooth random 8-bit images (a coarse random field up-sampled, plus noise): the resize then
    matters, as on real images."""
    rng = np.random.default_rng(seed)
    n, h, w, c = shape
    ramp_h = np.stack([np.interp(np.linspace(0, 3, h), range(4), e) for e in np.eye(4)], 1)
    ramp_w = np.stack([np.interp(np.linspace(0, 3, w), range(4), e) for e in np.eye(4)], 1)
    field = np.einsum("hi,nijc,wj->nhwc", ramp_h, rng.uniform(0, 255, (n, 4, 4, c)), ramp_w)
    field += rng.normal(0, 20, (n, h, w, c))
    return np.clip(np.round(field), 0, 255).astype(np.uint8)


def _pytorch_fid_features(model, images_uint8):
    """pytorch-fid's pool3 features in float64: input in [0, 1] NCHW, as its ToTensor gives."""
    import torch

    x = torch.from_numpy(images_uint8.astype(np.float64) / 255.0).permute(0, 3, 1, 2)
    with torch.no_grad():
        return copy.deepcopy(model).double()(x)[0].flatten(1).numpy()


@pytest.mark.parametrize("shape", [(2, 32, 32, 3), (1, 240, 400, 3)], ids=["32x32", "240x400"])
def test_pool3_features_match_pytorch_fid(converted, shape):
    """CIFAR-sized images up-sized to 299, and one up-sized in height and down-sized in width."""
    model, _, ours = converted
    images = _uint8_images(shape, seed=shape[1])
    want = _pytorch_fid_features(model, images)
    got = ours(images.astype(np.float32) / 127.5 - 1.0)  # [-1, 1] on the 8-bit grid
    assert got.shape == want.shape == (shape[0], inception.FEATURE_DIM)
    scale = np.max(np.abs(want))
    assert 0.1 < scale < 100 and np.mean(want > 0) > 0.5  # sane activations: the test can see
    err = np.max(np.abs(got - want))
    assert err <= TOL * scale, f"max error {err:.3g} = {err / scale:.3g} of the feature scale"
    if shape[0] > 1:  # different images give features far apart compared with the tolerance
        assert np.max(np.abs(want[0] - want[1])) > 100 * TOL * scale


@pytest.mark.parametrize("hw", [(32, 32), (28, 40), (600, 450)])
def test_preprocess_matches_pytorch_fid_resize_and_normalisation(pytorch_fid, hw):
    """F.interpolate(bilinear, 299, align_corners=False) of x / 255, then 2x - 1; grayscale is
    repeated to RGB as pytorch-fid's ``convert("RGB")`` does. Float32 here, float64 there: the
    sample positions are rounded to float32 (in torch's own float32 resize too, which is as far from
    its float64 one), so up-sizing agrees to 1e-5 and down-sizing to 3e-4, 1/25 of an 8-bit level;
    a wrong pixel-centre convention is off by 1e-2 or more."""
    import torch
    import torch.nn.functional as F

    rgb = _uint8_images((2, *hw, 3), seed=1)
    gray = rgb[..., :1]
    for images, channels in ((rgb, 3), (gray, 1)):
        x = torch.from_numpy(np.repeat(images, 3 // channels, -1).astype(np.float64) / 255.0)
        x = F.interpolate(
            x.permute(0, 3, 1, 2), size=(299, 299), mode="bilinear", align_corners=False
        )
        want = (2 * x - 1).permute(0, 2, 3, 1).numpy()
        got = np.asarray(inception.preprocess(images.astype(np.float32) / 127.5 - 1.0))
        atol = 1e-5 if max(hw) <= 299 else 3e-4
        np.testing.assert_allclose(got, want, rtol=0, atol=atol)


def test_statistics_from_pytorch_fid_files_match_ours(pytorch_fid, converted, tmp_path):
    """PNGs written by export.save_pngs, read by pytorch-fid's own pipeline (PIL, ToTensor, its
    float32 model loaded from the .pth as the real file is) and saved with its ``save_fid_stats``;
    load_reference_statistics reads that file, and it equals our features' mean and covariance."""
    import torch

    fid_inception, fid_score = pytorch_fid
    _, pth, ours = converted
    images = _uint8_images((4, 32, 32, 3), seed=7)
    png_dir = tmp_path / "png"
    export.save_pngs(png_dir, images)
    stats_path = str(tmp_path / "stats.npz")
    file_sd = torch.load(pth, map_location="cpu")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fid_inception, "load_state_dict_from_url", lambda *a, **k: file_sd)
        fid_score.save_fid_stats([str(png_dir), stats_path], 2, "cpu", 2048, num_workers=0)
    mu, sigma = inception.load_reference_statistics(stats_path)
    our_mu, our_sigma = distances.feature_statistics(ours(images.astype(np.float32) / 127.5 - 1))
    assert np.max(np.abs(our_mu - mu)) <= TOL * np.max(np.abs(mu))
    assert np.max(np.abs(our_sigma - sigma)) <= TOL * np.max(np.abs(sigma))


@pytest.mark.filterwarnings("ignore:The `disp` argument:DeprecationWarning")  # pytorch-fid's sqrtm
def test_frechet_distance_matches_pytorch_fid(pytorch_fid):
    """distances.frechet_distance against pytorch-fid's calculate_frechet_distance (scipy sqrtm of
    S1 S2), float64, on random well-conditioned covariances and a near-identical pair."""
    _, fid_score = pytorch_fid
    rng = np.random.default_rng(0)
    d = 64
    for case in range(3):
        a, b = rng.standard_normal((d, 2 * d)), rng.standard_normal((d, 2 * d))
        sigma1, sigma2 = a @ a.T / (2 * d), b @ b.T / (2 * d) * rng.uniform(0.5, 2)
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d) * 0.3
        if case == 2:  # nearly the same Gaussian: FD is a small difference of large traces
            sigma2 = sigma1 + 1e-3 * np.eye(d)
            mu2 = mu1 + 1e-3
        want = float(fid_score.calculate_frechet_distance(mu1, sigma1, mu2, sigma2))
        got = distances.frechet_distance(mu1, sigma1, mu2, sigma2)
        assert got == pytest.approx(want, rel=1e-7, abs=1e-9 * np.trace(sigma1))


# ----------------------------------------------------------------------------------------------
# Reference statistics files (no torch needed)


def test_load_reference_statistics_reads_mu_sigma_and_names_each_defect(tmp_path):
    rng = np.random.default_rng(0)
    d = 8
    a = rng.standard_normal((d, d))
    mu, sigma = rng.standard_normal(d), a @ a.T
    good = tmp_path / "stats.npz"
    np.savez_compressed(good, mu=mu, sigma=sigma, extra=np.zeros(3))  # as pytorch-fid writes it
    got_mu, got_sigma = inception.load_reference_statistics(good, feature_dim=d)
    np.testing.assert_array_equal(got_mu, mu)
    np.testing.assert_array_equal(got_sigma, sigma)
    assert got_mu.dtype == got_sigma.dtype == np.float64

    def check(name, match, **arrays):
        path = tmp_path / name
        np.savez(path, **arrays)
        with pytest.raises(ValueError, match=match):
            inception.load_reference_statistics(path, feature_dim=d)

    check("no_sigma.npz", r"no sigma \(keys: \['mu'\]\)", mu=mu)
    check("short_mu.npz", r"mu has shape \(7,\)", mu=mu[:7], sigma=sigma)
    check("flat_sigma.npz", r"sigma \(64,\)", mu=mu, sigma=sigma.ravel())
    check("nan.npz", "non-finite", mu=mu * np.nan, sigma=sigma)
    with pytest.raises(ValueError, match=r"mu \[2048\]"):  # the default D is Inception's 2048
        inception.load_reference_statistics(good)
    np.save(tmp_path / "array.npy", mu)
    with pytest.raises(ValueError, match="single array"):
        inception.load_reference_statistics(tmp_path / "array.npy", feature_dim=d)
    (tmp_path / "junk.npz").write_bytes(b"not an npz")
    with pytest.raises(ValueError, match="cannot read"):
        inception.load_reference_statistics(tmp_path / "junk.npz", feature_dim=d)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        inception.load_reference_statistics(tmp_path / "missing.npz", feature_dim=d)


def test_evaluate_params_computes_fd_against_reference_statistics(tmp_path, monkeypatch):
    """With reference_stats, fd and its floor are the Frechet distances from the file's (mu, sigma)
    to the samples' and the held-out split's features, and the training split is not read for fd
    alone. Inception is replaced by a fixed random projection to 64-d (statistics files of that D
    accepted) and the sampler by random images: the wiring is under test, the features are above."""
    from _train_helpers import tiny_config

    from diffusion_jax import config_utils
    from diffusion_jax.evaluation import pipeline

    config = config_utils.parse_config(tiny_config())  # 8x8 digits
    params = None  # the sampler below ignores them
    rng = np.random.default_rng(0)

    def generate_samples(sample_fn, params, *, num_samples, image_shape, **kwargs):
        return rng.uniform(-1, 1, (num_samples, *image_shape)).astype(np.float32)

    monkeypatch.setattr(pipeline, "generate_samples", generate_samples)
    dim = 64
    projection = rng.standard_normal((64, dim))
    seen = []

    def features(x):
        seen.append(np.asarray(x))
        return np.asarray(x, np.float64).reshape(len(x), -1) @ projection

    monkeypatch.setattr(
        pipeline, "feature_fn_for", lambda *a, **k: ("inception-v3-pool3", features)
    )
    splits = []
    load_split = pipeline.load_split
    monkeypatch.setattr(
        pipeline,
        "load_split",
        lambda cfg, split, **kw: splits.append(split) or load_split(cfg, split, **kw),
    )
    load_stats = inception.load_reference_statistics
    monkeypatch.setattr(inception, "load_reference_statistics", lambda p: load_stats(p, dim))
    a = rng.standard_normal((dim, 32))
    mu, sigma = rng.standard_normal(dim), a @ a.T
    path = tmp_path / "fid_stats.npz"
    np.savez_compressed(path, mu=mu, sigma=sigma)
    options = dict(sampler="ddim", num_steps=5, num_samples=16, reference_stats=str(path))
    result = pipeline.evaluate_params(params, config, (8, 8, 1), metrics=("fd",), **options)
    samples, held_out = seen
    assert splits == [config.data.eval_split] and "reference_examples" not in result
    assert result["fd_reference"] == str(path) and len(held_out) == result["floor_examples"] == 16
    for key, x in (("fd", samples), ("fd_floor", held_out)):
        want = distances.frechet_distance(mu, sigma, *distances.feature_statistics(features(x)))
        assert result[key] == pytest.approx(want, rel=1e-12), key
    assert not any(k.startswith("fd_train_floor") for k in result)

    seen.clear()
    result = pipeline.evaluate_params(params, config, (8, 8, 1), metrics=("fd", "pr"), **options)
    assert config.data.split in splits and 0 <= result["precision"] <= 1
    want = distances.frechet_distance(mu, sigma, *distances.feature_statistics(features(seen[1])))
    assert result["fd"] == pytest.approx(want, rel=1e-12)  # still against the file, not the split

    np.savez(path, mu=mu)  # malformed: refused before any sampling
    monkeypatch.setattr(pipeline, "generate_samples", lambda *a, **k: pytest.fail("sampled"))
    with pytest.raises(ValueError, match="no sigma"):
        pipeline.evaluate_params(params, config, (8, 8, 1), metrics=("fd",), **options)
    with pytest.raises(ValueError, match="add fd"):
        pipeline.evaluate_params(params, config, (8, 8, 1), metrics=("pr",), **options)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="digits-mlp-64 features: pass inception_weights"):
        pipeline.evaluate_params(params, config, (8, 8, 1), metrics=("fd",), **options)
