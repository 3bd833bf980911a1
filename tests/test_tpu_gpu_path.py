"""The TPU VM and GPU user's path, as far as a CPU can follow it: a 2-process job on a gs:// workdir,
SIGTERM to every process and a bit-exact resume, a profiler trace and an HLO dump from train.py,
clear errors for buckets this setup cannot write, and the README's TPU/GPU commands (syntax, flags
and config keys; they cannot run here).

The gs:// bucket is served from a local folder by tests/_local_gcs.py; the 2-process runs train the
small MLP of test_train_distributed.py (a U-Net would only add compile time).
"""

from __future__ import annotations

import importlib
import os
import pathlib
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
from _train_helpers import (
    POINTS,
    ROOT,
    cache_dir,
    finish,
    free_port,
    load_state,
    start_worker,
    stopped_at,
    worker_env,
)

from diffusion_jax import checkpoints, sharding

SECTION = "## Running on TPU VMs and GPUs"
SCRIPTS = sorted((ROOT / "scripts").glob("*.sh")) + sorted((ROOT / "scripts").glob("*.sbatch"))
LONG_RUN = [
    *POINTS, "--set", "train.num_steps=120", "--set", "checkpoint.every_steps=1000",
    "--set", "sample.num_samples=8", "--set", "train.log_every_steps=40",
]  # fmt: skip


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return cache_dir(tmp_path_factory)


def start_two_processes(
    cache, workdir: str, out_prefix: pathlib.Path, *extra, per_process=((), ())
):
    """Starts processes 0 and 1 of one jax.distributed job training LONG_RUN."""
    port = free_port()
    args = ["--workdir", workdir, *LONG_RUN, *extra, "--num_processes", "2", "--port", str(port)]
    return [
        start_worker(
            [*args, "--process_id", str(i), "--out", f"{out_prefix}{i}.npz", *per_process[i]],
            cache,
            num_devices=2,
        )
        for i in range(2)
    ]


def test_two_processes_on_a_gs_workdir_stop_together_on_sigterm_and_resume_bit_exactly(
    cache, tmp_path
):
    """As on a pod slice whose workers all get SIGTERM (a maintenance event, a spot preemption):
    both save one same step to the bucket and exit 0; the rerun continues and ends where an
    uninterrupted run ends, bit for bit."""
    bucket = tmp_path / "bucket_root"
    gcs = ["--local_gcs", str(bucket)]
    url, run = "gs://bucket/runs/moons", bucket / "bucket" / "runs" / "moons"

    # The uninterrupted reference run (local workdir) trains alongside.
    reference_run = start_two_processes(cache, str(tmp_path / "local"), tmp_path / "uninterrupted")
    outs = finish(
        start_two_processes(
            cache, url, tmp_path / "stopped", *gcs,
            per_process=(("--term_at", "10"), ("--term_at", "10")),
        )
    )  # fmt: skip
    stops = [stopped_at(out) for out in outs]
    assert stops[0] == stops[1] and 10 <= stops[0] < 120, stops
    step = stops[0]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [str(step)]
    saved = run / "checkpoints" / str(step)
    assert (saved / "commit_success.txt").is_file()  # Orbax's gs:// commit marker, not a rename
    assert sorted(p.name for p in (saved / "data").glob("*.json")) == [
        "process_0-of-2.json", "process_1-of-2.json",
    ]  # fmt: skip
    assert (run / "config.json").is_file()

    outs = finish(start_two_processes(cache, url, tmp_path / "resumed", *gcs))
    assert all(f"Resuming from the checkpoint at step {step} in {url}" in out for out in outs)
    assert [p.name for p in (run / "samples").iterdir()] == ["step_00000120.png"]
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one per start

    finish(reference_run)
    resumed, reference = (
        load_state(tmp_path / "resumed0.npz"),
        load_state(tmp_path / "uninterrupted0.npz"),
    )
    assert resumed.keys() == reference.keys() and int(resumed[".step"]) == 120
    different = [k for k in reference if not np.array_equal(resumed[k], reference[k])]
    assert not different, different
    p1 = load_state(tmp_path / "resumed1.npz")
    assert all(np.array_equal(p1[k], resumed[k]) for k in resumed)

    # A sampling user reads the EMA weights back from the bucket.
    code = (
        "import sys, numpy as np, jax; sys.path.insert(0, 'tests'); from _local_gcs import install; "
        f"install({str(bucket)!r}); from diffusion_jax import checkpoints; "
        f"p, c = checkpoints.load_ema_params({url!r}); "
        "print(sum(float(np.abs(x).sum()) for x in jax.tree.leaves(p)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=worker_env(cache),
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    ema_total = sum(float(np.abs(v).sum()) for k, v in reference.items() if k.startswith(".ema"))
    assert float(out.stdout.split()[-1]) == pytest.approx(ema_total, rel=1e-6)


def test_train_py_on_two_machines_with_explicit_flags_writes_a_profile_and_an_xla_dump(tmp_path):
    """The README's multi-machine GPU command, as two local processes: ``--coordinator_address``,
    ``--num_processes`` and ``--process_id`` join them; ``--config.profile.*`` puts process 0's
    jax.profiler trace where TensorBoard's profile plugin looks; ``--xla_dump_to`` dumps the
    compiled programs (no compilation cache here: a cache hit compiles nothing, so dumps nothing)."""
    workdir, port = tmp_path / "w", free_port()
    env = worker_env(tmp_path / "unused", num_devices=None)
    env.pop("JAX_COMPILATION_CACHE_DIR")
    procs = []
    for i in range(2):
        cmd = [
            sys.executable, "train.py", "--config", "configs/toy2d.py", "--workdir", str(workdir),
            f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
            "--xla_dump_to", str(tmp_path / f"xla{i}"), "--config.train.num_steps=6",
            "--config.train.log_every_steps=3", "--config.model.hidden=16",
            "--config.model.num_layers=1", "--config.sample.num_samples=0",
            "--config.profile.start_step=3", "--config.profile.num_steps=2",
        ]  # fmt: skip
        procs.append(
            subprocess.Popen(
                cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outs = finish(procs)
    assert all("2 process(es), 2 device(s)" in out for out in outs)
    assert "Profiling steps 3 to 4" in outs[0] and "Profiling" not in outs[1]
    (trace,) = (workdir / "tensorboard" / "plugins" / "profile").glob("*/*.xplane.pb")
    assert trace.stat().st_size > 0
    for i in range(2):
        dumps = sorted(os.listdir(tmp_path / f"xla{i}"))
        assert any("train_step" in d and d.endswith("after_optimizations.txt") for d in dumps), (
            dumps
        )


def test_partial_multi_process_settings_fail_naming_what_is_missing(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="coordinator_address=None, num_processes=2, process_id=0"):
        sharding.initialize_distributed(num_processes=2, process_id=0)


def test_bucket_workdirs_fail_early_naming_what_to_install(monkeypatch):
    checkpoints.check_storage("/tmp/run")  # local folders need nothing
    with pytest.raises(ValueError, match="only local .* and gs:// buckets"):
        checkpoints.check_storage("s3://bucket/run")
    monkeypatch.setattr(checkpoints, "_installed", lambda module: False)
    with pytest.raises(
        ImportError, match="gcsfs and google-cloud-storage: pip install gcsfs, or the gcs extra"
    ):
        checkpoints.check_storage("gs://bucket/run")
    checkpoints.check_storage("/tmp/run")


# ---- the README's TPU/GPU commands and scripts/: syntax, flags and config keys ------------------


def section_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return re.findall(r"```bash\n(.*?)\n```", text[start:end], flags=re.S)


def train_py_invocations(script: str) -> list[list[str]]:
    """The arguments of each ``python train.py`` in a shell text, also inside quoted --command=..."""
    text = script.replace("\\\n", " ")
    calls = []
    for match in re.finditer(r"python3? train\.py\b([^\n]*)", text):
        rest = match.group(1)
        for quote in "\"'":  # inside --command="..." (or '...'): stop at the closing quote
            if rest.count(quote) % 2:
                rest = rest[: rest.rindex(quote)]
        args = []
        for token in shlex.split(rest, comments=True):
            if token in ("&&", "||", ";", "|"):
                break
            args.append(token)
        calls.append(args)
    return calls


def train_py_flags() -> set[str]:
    source = (ROOT / "train.py").read_text()
    return set(re.findall(r"(?:DEFINE_\w+|DEFINE_config_file)\(\s*\"(\w+)\"", source))


def check_train_args(args: list[str]) -> None:
    known = train_py_flags()
    config_file = None
    for i, arg in enumerate(args):
        if arg == "--config":
            config_file = args[i + 1]
    assert config_file and (ROOT / config_file).is_file(), args
    config = importlib.import_module(f"configs.{pathlib.Path(config_file).stem}").get_config()
    for arg in args:
        if not arg.startswith("--"):
            continue
        name = arg[2:].split("=", 1)[0]
        if name.startswith("config."):
            node = config
            for key in name.split(".")[1:]:
                assert key in node, f"{name} is not a key of {config_file}"
                node = node[key]
        else:
            assert name in known, f"--{name} is not a train.py flag ({sorted(known)})"


def test_readme_tpu_gpu_section_has_the_commands():
    text = "\n".join(section_commands())
    for needle in (
        'pip install -e ".[tpu,gcs]"', 'pip install -e ".[cuda12,gcs]"', "python -m diffusion_jax.env",
        "--worker=all", "sbatch scripts/slurm_gpu.sbatch", "--coordinator_address=",
        "gs://", "--config.profile.num_steps=", "--xla_dump_to",
    ):  # fmt: skip
        assert needle in text, needle
    extras = [e for group in re.findall(r"\.\[([\w,]+)\]", text) for e in group.split(",")]
    assert "gcs" in extras, extras
    for extra in extras:
        assert f"\n{extra} = " in (ROOT / "pyproject.toml").read_text(), extra


@pytest.mark.parametrize("index", range(len(section_commands())))
def test_readme_tpu_gpu_command_is_valid_bash_with_real_flags(index, tmp_path):
    script = section_commands()[index]
    path = tmp_path / "block.sh"
    path.write_text(script + "\n")
    out = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, f"{script}\n{out.stderr}"
    for args in train_py_invocations(script):
        check_train_args(args)
    for line in script.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        for at, word in enumerate(words):  # scripts/X ARGS... CONFIG WORKDIR [train.py flags]
            if word.endswith("launch_tpu_pod.sh"):
                assert words[at + 1] in ("install", "env", "train", "stop"), line
                skip = 3 if words[at + 1] == "train" else None  # train NAME ZONE
            elif word.endswith("slurm_gpu.sbatch"):
                skip = 0
            else:
                continue
            if skip is not None:
                config, workdir, *extra = words[at + 1 + skip :]
                check_train_args(["--config", config, "--workdir", workdir, *extra])


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_are_valid_bash_and_call_train_py_with_real_flags(script):
    out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert os.access(script, os.X_OK), f"{script.name} is not executable"
    known = train_py_flags()
    calls = train_py_invocations(script.read_text())
    assert calls, f"{script.name} does not run train.py"
    for args in calls:
        for arg in args:
            if arg.startswith("--") and not arg.startswith("--config."):
                assert arg[2:].split("=", 1)[0] in known, arg


def test_scripts_send_the_documented_commands(tmp_path):
    """The launch scripts with stand-ins for ``gcloud`` and ``srun`` that print what they were asked
    to run: the same train.py command on every TPU worker (flags quoted for the remote shell), and
    one ``srun`` per step under Slurm."""
    for tool in ("gcloud", "srun"):
        (tmp_path / tool).write_text('#!/bin/bash\nprintf "%s\\n" "$*"\n')
        (tmp_path / tool).chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", REPO="https://x/dj.git")

    def run(*cmd):
        out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=True)
        return out.stdout.splitlines()

    flags = ["configs/cifar10.py", "gs://b/run", "--config.model.dtype=bfloat16"]
    (line,) = run("scripts/launch_tpu_pod.sh", "train", "my-tpu", "zone-a", *flags)
    assert line.startswith("compute tpus tpu-vm ssh my-tpu --zone=zone-a --worker=all --command=")
    remote = line.split("--command=", 1)[1]
    assert remote == (
        "cd diffusion_jax && python3 train.py --config configs/cifar10.py --workdir gs://b/run "
        "--config.model.dtype=bfloat16"
    )
    (args,) = train_py_invocations(remote)
    check_train_args(args)
    (line,) = run("scripts/launch_tpu_pod.sh", "install", "my-tpu", "zone-a")
    assert "git clone https://x/dj.git diffusion_jax" in line and "pip install -e '.[tpu]'" in line

    env_line, train_line = run("bash", "scripts/slurm_gpu.sbatch", *flags)
    assert env_line == "python -m diffusion_jax.env --distributed"
    check_train_args(train_line.split()[2:])
