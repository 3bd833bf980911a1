"""Sharding rules on one process: the mesh, FSDP partition specs, batch checks, global batches."""

from __future__ import annotations

import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from diffusion_jax import sharding


def fake_mesh(num_devices: int):
    return types.SimpleNamespace(devices=np.empty((num_devices,), object))


def test_mesh_spans_every_device_on_one_data_axis():
    mesh = sharding.make_mesh()
    assert mesh.axis_names == ("data",)
    assert mesh.devices.size == jax.device_count()


@pytest.mark.parametrize(
    "shape, shards, min_size, spec",
    [
        ((3, 3, 64, 128), 4, 1, P(None, None, None, "data")),  # the largest divisible axis
        ((3, 3, 64, 128), 4, 0, P()),  # FSDP off
        ((3, 3, 64, 128), 4, 10**6, P()),  # too small to shard
        ((128,), 4, 1, P("data")),
        ((6, 10), 4, 1, P()),  # no axis divisible by 4
        ((), 4, 1, P()),  # scalars (step, counters) stay replicated
        ((3, 3, 64, 128), 1, 1, P()),  # one device: nothing to shard over
    ],
)
def test_fsdp_partition_spec(shape, shards, min_size, spec):
    assert sharding.param_partition_spec(shape, shards, min_size) == spec


def test_state_shardings_follow_shapes():
    mesh = sharding.make_mesh()
    tree = {
        "w": jax.ShapeDtypeStruct((8, 4), jnp.float32),
        "step": jax.ShapeDtypeStruct((), jnp.int32),
    }
    out = sharding.state_shardings(tree, mesh, fsdp_min_size=1)
    assert all(isinstance(s, jax.sharding.NamedSharding) for s in jax.tree.leaves(out))
    assert out["step"].spec == P()


@pytest.mark.parametrize(
    "batch, devices, processes, per_process", [(8, 4, 1, 8), (8, 4, 2, 4), (128, 8, 2, 64)]
)
def test_check_batch_size_gives_the_per_process_batch(batch, devices, processes, per_process):
    assert sharding.check_batch_size(batch, fake_mesh(devices), processes) == per_process


def test_check_batch_size_explains_an_uneven_batch():
    with pytest.raises(
        ValueError,
        match=r"train.batch_size=130 must be divisible by the number of devices \(8: 2 process\(es\) x 4\); use e.g. 128 or 136",
    ):
        sharding.check_batch_size(130, fake_mesh(8), 2)


def test_global_batch_from_process_local_data():
    mesh = sharding.make_mesh()
    local = {
        "x": np.arange(16, dtype=np.float32).reshape(4, 2, 2),
        "label": np.arange(4, dtype=np.int32),
    }
    out = sharding.global_batch(local, mesh)
    assert out["x"].shape == (4, 2, 2) and out["x"].sharding.spec == P("data")
    np.testing.assert_array_equal(sharding.to_host(out)["label"], local["label"])


ANY_SHARDING = r"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import diffusion_jax as dj
from diffusion_jax import sharding
model = dj.UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_heads=2,
                dropout=0.0)
shape = (8, 8, 8, 3)
x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
t = np.arange(8, dtype=np.int32) * 120
@jax.jit
def init(key):  # perturbed, so that no output or gradient is zero by construction
    params = model.init(key, x, t)["params"]
    return jax.tree.map(lambda p: p + 0.05 * jax.random.normal(key, p.shape), params)
params = init(jax.random.key(0))
def denoise(p, x_t, t, y=None):
    return model.apply({"params": p}, x_t, t, train=False)
def loss(p, x, t):
    return jnp.mean(denoise(p, x, t) ** 2)
samplers = {  # DDPM's process, and EDM's with Heun's stochastic churn (its noise drawn per step)
    "ddim": dj.make_sampler(denoise, dj.make_schedule("linear", 1000), sampler="ddim", num_steps=3),
    "edm_heun": dj.make_sampler(denoise, dj.make_process("edm"), sampler="heun", num_steps=3,
                                prediction="edm", s_churn=2.0),
}
keys = jax.random.split(jax.random.key(3), 2)
refs = {name: [np.asarray(jax.jit(f, static_argnums=2)(params, k, shape)) for k in keys]
        for name, f in samplers.items()}
ref_out, ref_grads = np.asarray(jax.jit(denoise)(params, x, t)), jax.jit(jax.grad(loss))(params, x, t)
v = np.random.default_rng(1).normal(size=shape).astype(np.float32)
ref_grad_x = np.asarray(jax.jit(jax.grad(loss, argnums=1))(params, x, t))
def directional(p, x, t, v):
    return jax.jvp(lambda x: loss(p, x, t), (x,), (v,))
def close(a, b, tol, what, scale=None):
    scale = float(np.max(np.abs(b))) if scale is None else scale
    err = float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) / scale
    assert err <= tol, (what, err)
grad_scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(ref_grads))  # some are ~0
abstract = jax.eval_shape(lambda: params)
for axis_type in (AxisType.Auto, AxisType.Explicit):
    mesh = jax.make_mesh((4,), ("data",), axis_types=(axis_type,))
    batch = NamedSharding(mesh, P("data"))
    # FSDP-sharded params under automatic sharding; explicit sharding wants them on the mesh whole
    # (a caller holding FSDP shards there gathers them with jax.sharding.reshard(params, P())).
    fsdp_min_size = 1 if axis_type == AxisType.Auto else 0
    p = jax.device_put(params, sharding.state_shardings(abstract, mesh, fsdp_min_size))
    with jax.set_mesh(mesh):
        for name, sample in samplers.items():
            if name != "ddim" and axis_type == AxisType.Explicit:
                continue  # one program under explicit sharding is enough; each costs a compile
            ref = refs[name]
            s = jax.jit(sample, static_argnums=2, out_shardings=batch)(p, keys[0], shape)
            assert s.sharding.spec[0] == "data"
            close(s, ref[0], 1e-3, (axis_type, name))
            if axis_type == AxisType.Auto:
                both = jax.jit(lambda p, k: jax.vmap(lambda k: sample(p, k, shape))(k))(p, keys)
                close(both[0], ref[0], 1e-3, (name, "vmap 0"))
                close(both[1], ref[1], 1e-3, (name, "vmap 1"))
        if axis_type == AxisType.Auto:  # FSDP training is the trainer tests' own
            continue
        xs, ts = jax.device_put(x, batch), jax.device_put(t, batch)
        out = jax.jit(denoise)(p, xs, ts)
        assert out.sharding.spec[0] == "data", out.sharding
        close(out, ref_out, 1e-5, "explicit forward")
        grads = jax.jit(jax.grad(loss))(p, xs, ts)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            close(a, b, 1e-4, "explicit gradient", grad_scale)
        # forward mode: the directional derivative along v is <d loss / d x, v>
        _, along_v = jax.jit(directional)(p, xs, ts, jax.device_put(v, batch))
        close(along_v, np.vdot(ref_grad_x, v), 1e-4, "explicit jvp")
print("ok")
"""


def test_unet_and_sampler_under_any_sharding():
    """On 4 fake CPU devices, automatic (FSDP params) and explicit (``AxisType.Explicit``) sharding:
    the U-Net's forward, gradient and forward-mode directional derivative (``jax.jvp``) on a
    batch-sharded input, and ``sample`` on DDPM's and EDM's processes (jit with a batch-sharded
    output, and vmap over keys) match the unsharded computation."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    proc = subprocess.run(
        [sys.executable, "-c", ANY_SHARDING], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
