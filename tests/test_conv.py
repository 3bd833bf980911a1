"""models/conv.py: the same values as ``lax.conv_general_dilated``, and a kernel gradient (the CPU
tap form included) equal to a float64 numpy computation of d(conv)/d(w)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from diffusion_jax.models import UNet
from diffusion_jax.models import conv as conv_lib

DN = ("NHWC", "HWIO", "NHWC")


def numpy_conv(x, w, strides, pad):
    """float64 direct convolution (cross-correlation, as lax): x [B,H,W,Ci], w [kh,kw,Ci,Co]."""
    xp = np.pad(x, ((0, 0), pad[0], pad[1], (0, 0)))
    kh, kw = w.shape[:2]
    ho = (xp.shape[1] - kh) // strides[0] + 1
    wo = (xp.shape[2] - kw) // strides[1] + 1
    out = np.zeros((x.shape[0], ho, wo, w.shape[3]))
    for i in range(kh):
        for j in range(kw):
            win = xp[:, i : i + strides[0] * (ho - 1) + 1 : strides[0]]
            win = win[:, :, j : j + strides[1] * (wo - 1) + 1 : strides[1]]
            out += np.einsum("bhwc,co->bhwo", win, w[i, j])
    return out


def numpy_kernel_grad(x, g, kshape, strides, pad):
    """float64 d<g, conv(x, w)>/dw = sum over positions of x_pad[tap-shifted window] g."""
    xp = np.pad(x, ((0, 0), pad[0], pad[1], (0, 0)))
    kh, kw = kshape
    ho, wo = g.shape[1:3]
    dw = np.zeros((kh, kw, x.shape[3], g.shape[3]))
    for i in range(kh):
        for j in range(kw):
            win = xp[:, i : i + strides[0] * (ho - 1) + 1 : strides[0]]
            win = win[:, :, j : j + strides[1] * (wo - 1) + 1 : strides[1]]
            dw[i, j] = np.einsum("bhwc,bhwo->co", win, g)
    return dw


CASES = [  # (x shape, kernel hw, Co, strides, padding as given, explicit padding)
    ((2, 8, 8, 5), (3, 3), 4, (1, 1), "SAME", ((1, 1), (1, 1))),
    ((2, 8, 8, 5), (3, 3), 4, (1, 1), ((1, 1), (1, 1)), ((1, 1), (1, 1))),
    ((2, 8, 6, 3), (3, 3), 4, (2, 2), ((0, 1), (0, 1)), ((0, 1), (0, 1))),  # DDPM Downsample
    ((1, 7, 7, 2), (5, 3), 3, (1, 1), "VALID", ((0, 0), (0, 0))),
    ((3, 6, 6, 4), (1, 1), 2, (1, 1), "SAME", ((0, 0), (0, 0))),
]


@pytest.mark.parametrize("tap_min_rows", [1, 10**9], ids=["taps", "xla"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_values_and_gradients_match_float64(case, tap_min_rows, monkeypatch):
    monkeypatch.setattr(conv_lib, "TAP_MIN_ROWS", tap_min_rows)
    monkeypatch.setattr(conv_lib, "xla_kernel_grad_on_ynnpack", lambda: True)
    shape, k, co, strides, padding, pad = CASES[case]
    rng = np.random.default_rng(case)
    x = rng.normal(size=shape).astype(np.float32)
    w = rng.normal(size=(*k, shape[3], co)).astype(np.float32)

    def f(x, w):
        return conv_lib.conv_general_dilated(x, w, strides, padding, dimension_numbers=DN)

    y = jax.jit(f)(x, w)
    ref = numpy_conv(x.astype(np.float64), w.astype(np.float64), strides, pad)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-4)
    same = lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=DN)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(same))  # the forward is XLA's own

    g = rng.normal(size=ref.shape).astype(np.float32)
    dx, dw = jax.jit(jax.vjp(f, x, w)[1])(jnp.asarray(g))
    dw_ref = numpy_kernel_grad(x.astype(np.float64), g.astype(np.float64), k, strides, pad)
    scale = np.abs(dw_ref).max()
    np.testing.assert_allclose(np.asarray(dw), dw_ref, rtol=0, atol=1e-5 * scale)
    dx_ref = jax.vjp(
        lambda x: lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=DN), x
    )[1](jnp.asarray(g))[0]
    np.testing.assert_allclose(np.asarray(dx), np.asarray(dx_ref), rtol=1e-5, atol=1e-5)


def test_cpu_kernel_gradient_takes_the_tap_matmuls(monkeypatch):
    """Above TAP_MIN_ROWS, where XLA would put its kernel-gradient convolution on YNNPACK, the
    compiled CPU kernel gradient has no convolution, only dots; elsewhere it is XLA's."""
    x = jnp.ones((2, 8, 8, 4))
    w = jnp.ones((3, 3, 4, 4))

    def dw_text():
        def loss(w):
            return conv_lib.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN).sum()

        return jax.jit(jax.grad(loss)).lower(w).compile().as_text()

    monkeypatch.setattr(conv_lib, "xla_kernel_grad_on_ynnpack", lambda: True)
    monkeypatch.setattr(conv_lib, "TAP_MIN_ROWS", 1)
    taps = dw_text()
    monkeypatch.setattr(conv_lib, "TAP_MIN_ROWS", 10**9)
    xla = dw_text()
    monkeypatch.setattr(conv_lib, "TAP_MIN_ROWS", 1)
    monkeypatch.setattr(conv_lib, "xla_kernel_grad_on_ynnpack", lambda: False)
    eigen = dw_text()
    assert " convolution(" in xla and " convolution(" in eigen
    assert " convolution(" not in taps and " dot(" in taps


def test_bfloat16_kernel_gradient_close_to_float32(monkeypatch):
    monkeypatch.setattr(conv_lib, "TAP_MIN_ROWS", 1)
    monkeypatch.setattr(conv_lib, "xla_kernel_grad_on_ynnpack", lambda: True)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 8, 8, 8)).astype(np.float32)
    w = rng.normal(size=(3, 3, 8, 8)).astype(np.float32)
    g = rng.normal(size=(2, 8, 8, 8)).astype(np.float32)

    def dw(dtype):
        f = lambda w: conv_lib.conv_general_dilated(  # noqa: E731
            jnp.asarray(x, dtype), w, (1, 1), "SAME", dimension_numbers=DN
        )
        out = jax.vjp(f, jnp.asarray(w, dtype))[1](jnp.asarray(g, dtype))[0]
        assert out.dtype == dtype
        return np.asarray(out, np.float32)

    ref = numpy_kernel_grad(
        x.astype(np.float64), g.astype(np.float64), (3, 3), (1, 1), ((1, 1),) * 2
    )
    err = np.abs(dw(jnp.bfloat16) - ref).max() / np.abs(ref).max()
    assert err < 2e-2, err  # bf16 inputs (8 mantissa bits), float32 accumulation
    assert np.abs(dw(jnp.float32) - ref).max() / np.abs(ref).max() < 1e-5


def test_unet_gradients_unchanged_by_the_tap_path(monkeypatch):
    """The whole U-Net: parameter gradients with the tap path equal XLA's to float32 rounding."""
    model = UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    t = jnp.array([3, 700])

    @jax.jit  # eager init dispatches op by op: ~4 s more
    def init(key):
        params = model.init(key, x, t)["params"]
        leaves, treedef = jax.tree.flatten(params)  # zero-initialised convs would hide gradients
        keys = jax.random.split(jax.random.key(2), len(leaves))
        leaves = [
            p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)
        ]
        return jax.tree.unflatten(treedef, leaves)

    params = init(jax.random.key(1))

    def grads():
        loss = lambda p: jnp.sum(model.apply({"params": p}, x, t) ** 2)  # noqa: E731
        return jax.jit(jax.grad(loss))(params)

    monkeypatch.setattr(conv_lib, "xla_kernel_grad_on_ynnpack", lambda: True)
    monkeypatch.setattr(conv_lib, "TAP_MIN_ROWS", 1)
    taps = grads()
    monkeypatch.setattr(conv_lib, "TAP_MIN_ROWS", 10**9)
    xla = grads()
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(taps), jax.tree.leaves(xla), strict=True
    ):
        scale = float(jnp.abs(b).max()) + 1e-12
        assert float(jnp.abs(a - b).max()) <= 1e-4 * scale, jax.tree_util.keystr(path)


def test_unsupported_layouts_fall_back_to_lax():
    x = jnp.ones((1, 3, 8, 8))  # NCHW
    w = jnp.ones((4, 3, 3, 3))  # OIHW
    dn = ("NCHW", "OIHW", "NCHW")
    y = conv_lib.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn)
    ref = lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(ref))


SHARDED = r"""
import jax, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from diffusion_jax.models import conv as conv_lib
conv_lib.TAP_MIN_ROWS = 1
conv_lib.xla_kernel_grad_on_ynnpack = lambda: True
rng = np.random.default_rng(0)
x = rng.normal(size=(8, 6, 6, 4)).astype(np.float32)
w = rng.normal(size=(3, 3, 4, 4)).astype(np.float32)
g = rng.normal(size=(8, 6, 6, 4)).astype(np.float32)
dn = ("NHWC", "HWIO", "NHWC")
def f(x, w):
    return conv_lib.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn)
ref = jax.vjp(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn), x, w)[1](g)
for axis_type in (AxisType.Auto, AxisType.Explicit):
    mesh = jax.make_mesh((4,), ("data",), axis_types=(axis_type,))
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
    args = put(x, P("data")), put(w, P()), put(g, P("data"))
    grads = jax.jit(lambda x, w, g: jax.vjp(f, x, w)[1](g))
    for a, b in zip(grads(*args), ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
    taps = "optimization_barrier" in grads.lower(*args).as_text()
    assert taps == (axis_type == AxisType.Auto), (axis_type, taps)
print("ok")
"""


def test_sharded_batch_auto_and_explicit():
    """Batch sharded over 4 (fake CPU) devices: the same gradients; the taps under automatic
    sharding, XLA's own under explicit sharding (the taps' dots would need an output sharding)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
