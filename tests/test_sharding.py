"""Sharding rules on one process: the mesh, FSDP partition specs, batch checks, global batches."""

from __future__ import annotations

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
