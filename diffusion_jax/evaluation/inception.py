"""Inception-v3 pool3 features for FID, in Flax, with weights loaded from a local file.

The architecture is the one of the TensorFlow FID graph (``pool_3``, 2048-d), as re-implemented by
pytorch-fid's ``FIDInceptionA/C/E_1/E_2`` blocks: torchvision's Inception-v3 without auxiliary
logits, average pools that exclude padding in the A, C and E_1 blocks, a max pool in the last E
block's pool branch, batch-norm epsilon 1e-3, and a 1008-way classifier. Input: images NHWC in
[-1, 1] (grayscale repeated to RGB), quantized to 8 bits as the saved files would be, resized to
299 x 299 bilinearly (half-pixel centres, no antialiasing, as ``F.interpolate(...,
align_corners=False)``). Convolutions and the classifier ask for ``Precision.HIGHEST``: float32
on a TPU or GPU too, not bfloat16 / TF32 passes (not measured on either; a CPU is unaffected).

**Weights** are not downloaded here. The usual ones are pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth`` (a PyTorch state dict converted from the TF FID graph,
https://github.com/mseitzer/pytorch-fid/releases). Convert it once, where PyTorch is installed::

    import numpy as np, torch
    sd = torch.load("pt_inception-2015-12-05-6726825d.pth", map_location="cpu")
    np.savez("pt_inception.npz", **{k: v.numpy() for k, v in sd.items()})

and pass ``pt_inception.npz`` to :meth:`InceptionFeatures.from_file` (or ``evaluate.py
--inception_weights``). The state-dict names (``Mixed_5b.branch1x1.conv.weight``,
``...bn.running_var``, ``fc.weight``) map one-to-one onto this module's parameters.

**Reference statistics** (``mu`` [2048], ``sigma`` [2048, 2048] in an ``.npz``: what pytorch-fid's
``--save-stats`` writes, and the format of the published TTUR files such as
``fid_stats_cifar10_train.npz``) are read by :func:`load_reference_statistics`.

**Verified against pytorch-fid 0.3.0** (``tests/test_inception_torch.py``): a pytorch-fid
``InceptionV3([3])`` (``resize_input``, ``normalize_input``) with random weights and batch-norm
statistics, saved as ``torch.save(state_dict)`` like the real file and converted by the snippet
above and :func:`load_variables`, gives the same pool3 features as :class:`InceptionFeatures` on
the same 8-bit images, to 1e-4 of the feature scale (reference run in float64; measured 5e-7 for
32x32 inputs up-sized to 299 and 4e-7 for a 240x400 one, as close as pytorch-fid's own float32 run:
5e-7, 7e-7). Statistics that pytorch-fid's ``save_fid_stats`` writes from our exported PNGs match
ours. No disagreement was found (the network and preprocessing are as they were). Not verified: the
real weights' values (the same code path, other numbers), and the TensorFlow graph itself
(pytorch-fid reports FIDs close to, not identical to, the TF original's).
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

FEATURE_DIM = 2048
NUM_CLASSES = 1008  # the TF graph's classifier (1000 ImageNet classes + 8 unused)
INPUT_SIZE = 299
NUM_PARAMS = 23_850_960  # torchvision inception_v3 (27,161,264) - AuxLogits (3,326,696) + 8 * 2049


def _pad(padding: int | tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    return ((ph, ph), (pw, pw))


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, running statistics) -> ReLU; torchvision's block."""

    features: int
    kernel_size: int | tuple[int, int]
    strides: int = 1
    padding: int | tuple[int, int] = 0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = (k, k) if isinstance(k, int) else k
        x = nn.Conv(
            self.features, kernel, strides=(self.strides, self.strides),
            padding=_pad(self.padding), use_bias=False, precision=jax.lax.Precision.HIGHEST,
            name="conv",
        )(x)  # fmt: skip
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    """3x3 average pool, stride 1, padding 1, excluding the padding (count_include_pad=False)."""
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


class InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(64, 1, name="branch1x1")(x)
        b5 = BasicConv2d(48, 1, name="branch5x5_1")(x)
        b5 = BasicConv2d(64, 5, padding=2, name="branch5x5_2")(b5)
        b3 = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
        b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(b3)
        b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_3")(b3)
        bp = BasicConv2d(self.pool_features, 1, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(384, 3, strides=2, name="branch3x3")(x)
        bd = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, 3, strides=2, name="branch3x3dbl_3")(bd)
        bp = nn.max_pool(x, (3, 3), (2, 2))
        return jnp.concatenate([b3, bd, bp], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = BasicConv2d(192, 1, name="branch1x1")(x)
        b7 = BasicConv2d(c7, 1, name="branch7x7_1")(x)
        b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv2d(c7, 1, name="branch7x7dbl_1")(x)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv2d(192, 1, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(192, 1, name="branch3x3_1")(x)
        b3 = BasicConv2d(320, 3, strides=2, name="branch3x3_2")(b3)
        b7 = BasicConv2d(192, 1, name="branch7x7x3_1")(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(192, 3, strides=2, name="branch7x7x3_4")(b7)
        bp = nn.max_pool(x, (3, 3), (2, 2))
        return jnp.concatenate([b3, b7, bp], axis=-1)


class InceptionE(nn.Module):
    """``pool="avg"``: pytorch-fid's FIDInceptionE_1; ``"max"``: FIDInceptionE_2 (the TF graph's quirk)."""

    pool: str = "avg"

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(320, 1, name="branch1x1")(x)
        b3 = BasicConv2d(384, 1, name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [
                BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
            ],
            axis=-1,
        )
        bd = BasicConv2d(448, 1, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(384, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [
                BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
            ],
            axis=-1,
        )
        if self.pool == "avg":
            pooled = _avg_pool_3x3(x)
        else:
            pooled = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
        bp = BasicConv2d(192, 1, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
    """``x [B, H, W, 3]`` (already in [-1, 1], H, W >= 75) -> (pool3 features [B, 2048], logits [B, 1008]).

    Resizing and channel handling are done by :func:`preprocess`.
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = BasicConv2d(32, 3, strides=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, 3, name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
        x = nn.max_pool(x, (3, 3), (2, 2))
        x = BasicConv2d(80, 1, name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, 3, name="Conv2d_4a_3x3")(x)
        x = nn.max_pool(x, (3, 3), (2, 2))
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        x = InceptionC(128, name="Mixed_6b")(x)
        x = InceptionC(160, name="Mixed_6c")(x)
        x = InceptionC(160, name="Mixed_6d")(x)
        x = InceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE("avg", name="Mixed_7b")(x)
        x = InceptionE("max", name="Mixed_7c")(x)
        features = jnp.mean(x, axis=(1, 2))
        logits = nn.Dense(NUM_CLASSES, precision=jax.lax.Precision.HIGHEST, name="fc")(features)
        return features, logits


def preprocess(images: jax.Array, size: int | None = INPUT_SIZE) -> jax.Array:
    """Images [B, H, W, C in (1, 3)] in [-1, 1] -> [B, size, size, 3]: 8-bit quantization, gray
    repeated to RGB, bilinear resize (half-pixel centres, no antialiasing; ``size=None`` keeps H, W)."""
    x = jnp.asarray(images, jnp.float32)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"images must be NHWC with 1 or 3 channels, got shape {x.shape}.")
    x = jnp.round((jnp.clip(x, -1.0, 1.0) + 1.0) * 127.5) / 127.5 - 1.0  # as the saved uint8 files
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    if size is not None and x.shape[1:3] != (size, size):
        x = jax.image.resize(x, (x.shape[0], size, size, 3), "bilinear", antialias=False)
    return x


def variables_from_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """pytorch-fid / torchvision state dict (name -> array) -> Flax ``{"params", "batch_stats"}``.

    ``X.conv.weight`` [O, I, kh, kw] -> ``params/X/conv/kernel`` [kh, kw, I, O]; ``X.bn.weight``,
    ``.bias`` -> ``params/X/bn/scale``, ``bias``; ``.running_mean``, ``.running_var`` ->
    ``batch_stats/X/bn/mean``, ``var``; ``fc.weight`` [1008, 2048] -> ``params/fc/kernel``
    transposed. ``num_batches_tracked`` and ``AuxLogits.*`` are ignored.
    """
    params: dict[str, Any] = {}
    stats: dict[str, Any] = {}

    def put(tree, path, value):
        for key in path[:-1]:
            tree = tree.setdefault(key, {})
        tree[path[-1]] = np.asarray(value, np.float32)

    for name, value in state_dict.items():
        parts = name.split(".")
        if parts[0] == "AuxLogits" or parts[-1] == "num_batches_tracked":
            continue
        value = np.asarray(value)
        if parts[0] == "fc":
            put(params, ["fc", "kernel" if parts[1] == "weight" else "bias"],
                value.T if parts[1] == "weight" else value)  # fmt: skip
        elif parts[-2] == "conv" and parts[-1] == "weight":
            put(params, parts[:-1] + ["kernel"], np.transpose(value, (2, 3, 1, 0)))
        elif parts[-2] == "bn":
            target, leaf = {
                "weight": (params, "scale"), "bias": (params, "bias"),
                "running_mean": (stats, "mean"), "running_var": (stats, "var"),
            }[parts[-1]]  # fmt: skip
            put(target, parts[:-1] + [leaf], value)
        else:
            raise ValueError(f"unexpected entry {name!r} in the Inception state dict.")
    return {"params": params, "batch_stats": stats}


def load_variables(path: str) -> dict[str, Any]:
    """Inception variables from an ``.npz`` of the pytorch-fid state dict (see module docstring),
    checked against the architecture's shapes."""
    with np.load(path) as f:
        variables = variables_from_state_dict({k: f[k] for k in f.files})
    expected = jax.eval_shape(
        lambda: InceptionV3().init(jax.random.key(0), jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3)))
    )
    got_shapes = jax.tree.map(lambda a: a.shape, variables)
    want_shapes = jax.tree.map(lambda a: a.shape, dict(expected))
    if got_shapes != want_shapes:
        missing = {
            jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(want_shapes)
        }
        present = {
            jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(got_shapes)
        }
        raise ValueError(
            f"{path} does not match the Inception-v3 architecture: missing {sorted(missing - present)[:5]}, "
            f"unexpected {sorted(present - missing)[:5]} (or shapes differ)."
        )
    return variables


def load_reference_statistics(
    path: str | os.PathLike, feature_dim: int = FEATURE_DIM
) -> tuple[np.ndarray, np.ndarray]:
    """(mu [D], sigma [D, D]) float64 from a FID reference ``.npz`` with keys ``mu`` and ``sigma``.

    The format of pytorch-fid's ``--save-stats`` output and of the published TTUR statistics
    (``fid_stats_cifar10_train.npz``); other keys are ignored. Local or any ``etils.epath`` path.
    Raises ``FileNotFoundError`` for a missing file, ``ValueError`` naming the problem for one that
    is not such an ``.npz``, lacks a key, or holds arrays of the wrong shape (D must be
    ``feature_dim``) or non-finite values.
    """
    name = os.fspath(path)
    hint = "(pytorch-fid writes one: python -m pytorch_fid --save-stats IMAGE_DIR OUT.npz)"
    if not epath.Path(name).exists():
        raise FileNotFoundError(f"no FID reference statistics file at {name}.")
    try:
        data = np.load(io.BytesIO(epath.Path(name).read_bytes()), allow_pickle=False)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"cannot read {name} as an .npz of FID statistics {hint}: {e}") from e
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{name} holds a single array, not an .npz of mu and sigma {hint}.")
    with data:
        missing = [k for k in ("mu", "sigma") if k not in data.files]
        if missing:
            raise ValueError(
                f"{name} has no {' or '.join(missing)} (keys: {sorted(data.files)}); FID "
                f"reference statistics are mu [{feature_dim}] and sigma "
                f"[{feature_dim}, {feature_dim}] {hint}."
            )
        mu, sigma = np.asarray(data["mu"]), np.asarray(data["sigma"])
    d = feature_dim
    if mu.shape != (d,) or sigma.shape != (d, d):
        raise ValueError(
            f"{name}: mu has shape {mu.shape} and sigma {sigma.shape}; Inception pool3 statistics "
            f"are mu [{d}] and sigma [{d}, {d}] (pytorch-fid's --dims 2048, the default)."
        )
    mu, sigma = mu.astype(np.float64), sigma.astype(np.float64)
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise ValueError(f"{name}: mu or sigma contains non-finite values.")
    return mu, sigma


class InceptionFeatures:
    """``features(images [N, H, W, C] in [-1, 1]) -> [N, 2048]`` float64 numpy, batched and jitted.

    ``variables`` as from :func:`load_variables`; ``size`` is the network's input size (299; a
    smaller one, >= 75, only for tests).
    """

    def __init__(
        self, variables: Mapping[str, Any], *, batch_size: int = 100, size: int | None = INPUT_SIZE
    ):
        self.variables = jax.device_put(dict(variables))
        self.batch_size = batch_size
        model = InceptionV3()
        self._apply: Callable[..., Any] = jax.jit(
            lambda v, x: model.apply(v, preprocess(x, size))[0]
        )

    @classmethod
    def from_file(cls, path: str, **kwargs: Any) -> InceptionFeatures:
        return cls(load_variables(path), **kwargs)

    def __call__(self, images: np.ndarray | Sequence[Any]) -> np.ndarray:
        images = np.asarray(images, np.float32)
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            n = len(chunk)
            if n < self.batch_size and len(images) > self.batch_size:  # one compiled shape
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch_size - n, 0)])
            out.append(
                np.asarray(jax.device_get(self._apply(self.variables, chunk)), np.float64)[:n]
            )
        return np.concatenate(out)
