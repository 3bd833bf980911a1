"""The environment check on CPU with 1 and 4 fake devices."""

import json
import os
import subprocess
import sys

import jaxlib
import numpy as np
import pytest

from diffusion_jax import env as env_lib
from diffusion_jax.env import (
    CPU_MALLOC_TUNABLES,
    CPU_XLA_FLAGS,
    cpu_malloc_hint,
    cpu_xla_flags_hint,
)

# The suggested flag where this jaxlib knows it (XLA aborts on unknown flags); none elsewhere.
_XLA_FLAGS_IF_KNOWN = (
    CPU_XLA_FLAGS if jaxlib.__version__.startswith(env_lib.CPU_XLA_FLAGS_JAXLIB) else ""
)


@pytest.mark.parametrize("devices", [1, 4])
def test_env_check_reports_devices(devices):
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {_XLA_FLAGS_IF_KNOWN}",
        GLIBC_TUNABLES=CPU_MALLOC_TUNABLES,
    )
    cmd = [sys.executable, "-m", "diffusion_jax.env", "--json", "--batch_size", "6"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    report = json.loads(out.stdout)
    assert report["backend"] == "cpu"
    assert report["local_device_count"] == devices == report["global_device_count"]
    assert report["process_count"] == 1
    divides = any("does not divide" in w for w in report["warnings"])
    assert divides == (devices == 4), report["warnings"]
    text = subprocess.run(
        cmd[:3] + ["--batch_size", "8"], env=env, capture_output=True, text=True, check=True
    )
    assert f"{devices} local device(s), {devices} in all" in text.stdout
    assert "no problems found" in text.stdout


def test_env_check_with_distributed_runs_as_one_process_outside_a_cluster():
    """``--distributed`` joins a multi-process run as train.py does; with none it reports one process."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROC", "JAX_PROCESS_ID", "SLURM_"))
    }
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    cmd = [sys.executable, "-m", "diffusion_jax.env", "--json", "--distributed"]
    report = json.loads(
        subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    )
    assert (report["process_count"], report["global_device_count"]) == (1, 2)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc settings: Linux only")
def test_cpu_malloc_hint_names_the_missing_settings(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    hint = cpu_malloc_hint("cpu")
    assert hint is not None and f"GLIBC_TUNABLES={CPU_MALLOC_TUNABLES}" in hint
    # The two settings without one arena still page-fault each step's temporaries (issue 7).
    monkeypatch.setenv(
        "GLIBC_TUNABLES", "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
    )
    assert cpu_malloc_hint("cpu") is not None
    monkeypatch.setenv("GLIBC_TUNABLES", CPU_MALLOC_TUNABLES)
    assert cpu_malloc_hint("cpu") is None
    monkeypatch.delenv("GLIBC_TUNABLES")
    assert cpu_malloc_hint("gpu") is None and cpu_malloc_hint("tpu") is None


def test_cpu_xla_flags_hint_only_where_verified_and_unset(monkeypatch):
    monkeypatch.setattr(jaxlib, "__version__", "0.10.2")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    hint = cpu_xla_flags_hint("cpu")
    assert hint is not None and f'XLA_FLAGS="{CPU_XLA_FLAGS}"' in hint
    assert cpu_xla_flags_hint("gpu") is None and cpu_xla_flags_hint("tpu") is None
    # Any value of the flag is the user's choice; an unverified jaxlib may not know the flag at
    # all (XLA aborts on unknown flags), so it is not suggested there.
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot")
    assert cpu_xla_flags_hint("cpu") is None
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setattr(jaxlib, "__version__", "0.11.0")
    assert cpu_xla_flags_hint("cpu") is None
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    assert f"export XLA_FLAGS={CPU_XLA_FLAGS}" in readme
    assert f"export GLIBC_TUNABLES={CPU_MALLOC_TUNABLES}" in readme


_CONV_PROBE = """
import json, jax, jax.numpy as jnp
from diffusion_jax.env import ynn_fused_convolutions
x = jax.random.normal(jax.random.key(0), (2, 8, 8, 32))
w = jax.random.normal(jax.random.key(1), (3, 3, 32, 32)) / 17
def loss(x, w):
    dn = ("NHWC", "HWIO", "NHWC")
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn)
    return jnp.sum(jnp.sin(y))
f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
hlo = f.lower(x, w).compile().as_text()
v, (dx, dw) = f(x, w)
print(json.dumps({"v": float(v), "dx": dx.ravel().tolist(), "dw": dw.ravel().tolist(),
                  "ynn_convs": ynn_fused_convolutions(hlo)}))
"""


@pytest.mark.skipif(
    not jaxlib.__version__.startswith(env_lib.CPU_XLA_FLAGS_JAXLIB),
    reason="the flag is only suggested for verified jaxlib versions",
)
def test_cpu_xla_flag_is_accepted_and_keeps_the_values():
    """The suggested flag parses (XLA aborts on unknown flags), takes convolutions off YNNPACK
    (:func:`ynn_fused_convolutions` finds none in the compiled value and gradient) and leaves a
    convolution's value and gradients as they were, up to float32 rounding."""
    outs = {}
    for flags in ("", CPU_XLA_FLAGS):
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)
        proc = subprocess.run(
            [sys.executable, "-c", _CONV_PROBE], env=env, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs[flags] = json.loads(proc.stdout.strip().splitlines()[-1])
    plain, flagged = outs[""], outs[CPU_XLA_FLAGS]
    for key in ("v", "dx", "dw"):
        np.testing.assert_allclose(flagged[key], plain[key], rtol=1e-5, atol=1e-5)
    assert flagged["ynn_convs"] == 0, flagged["ynn_convs"]
    if plain["ynn_convs"] == 0:  # YNNPACK takes no convolutions on this CPU: the flag is a no-op
        pytest.skip("YNNPACK takes no convolutions on this CPU; values checked only")


def test_ynn_fused_convolutions_counts_convolutions_inside_ynnpack_fusions():
    """On a hand-written HLO text: a convolution called from a YNNPACK fusion counts, one in a
    plain fusion or a YNNPACK fusion of a dot does not."""
    hlo = """
%ynn_conv (p0: f32[1,4,4,2], p1: f32[3,3,2,2]) -> f32[1,4,4,2] {
  ROOT %c = f32[1,4,4,2]{3,2,1,0} convolution(%p0, %p1), window={size=3x3}
}

%ynn_dot (p0: f32[2,2], p1: f32[2,2]) -> f32[2,2] {
  ROOT %d = f32[2,2]{1,0} dot(%p0, %p1)
}

%loop_conv (p0: f32[1,4,4,2], p1: f32[3,3,2,2]) -> f32[1,4,4,2] {
  ROOT %c = f32[1,4,4,2]{3,2,1,0} convolution(%p0, %p1), window={size=3x3}
}

ENTRY %main (a: f32[1,4,4,2], b: f32[3,3,2,2], m: f32[2,2]) -> f32[1,4,4,2] {
  %ynn_fusion = f32[1,4,4,2]{3,2,1,0} fusion(%a, %b), kind=kCustom, calls=%ynn_conv
  %ynn_fusion.1 = f32[2,2]{1,0} fusion(%m, %m), kind=kCustom, calls=%ynn_dot
  ROOT %fusion = f32[1,4,4,2]{3,2,1,0} fusion(%a, %b), kind=kLoop, calls=%loop_conv
}
"""
    assert env_lib.ynn_fused_convolutions(hlo) == 1
    assert env_lib.ynn_fused_convolutions(hlo.replace("calls=%ynn_conv", "calls=%ynn_dot")) == 0
