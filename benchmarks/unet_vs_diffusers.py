"""Our DDPM U-Net against diffusers' ``UNet2DModel`` of the identical architecture, side by side.

    pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu  # CPU-only boxes
    pip install -e ".[bench]"                    # diffusers (and torch, if not installed above)
    python -m benchmarks.unet_vs_diffusers --out /tmp/unet_vs_diffusers.json
    python -m benchmarks.unet_vs_diffusers --quick --chain_steps 50   # fewer rounds and cases
    python -m benchmarks.unet_vs_diffusers --quick --tiny             # smoke test: tiny net, seconds

A plain ``pip install torch`` pulls several GB of CUDA packages; on a CPU-only machine take the CPU
wheel from the index above (on the project's dev box ``pip install torch==2.13.0`` finds a CPU build
on disk). Without torch or diffusers the JAX half still runs and the comparison columns stay empty.

The model is configs/cifar10.py's (35,746,307 parameters): ch 128, ch_mult (1, 2, 2, 2), two res
blocks per level, attention at 16x16, dropout 0.1; diffusers' twin is ``UNet2DModel`` with
block_out_channels (128, 256, 256, 256), layers_per_block 2, DownBlock2D / AttnDownBlock2D, silu,
one head, downsample_padding 0, flip_sin_to_cos False, freq_shift 1, GroupNorm(32, eps 1e-6). Both
parameter counts are asserted equal. Float32 throughout on the CPU.

How it measures. Each framework runs in its own worker process (separate allocators and thread
pools: issue 7 measured the JAX batch-32 step ~20% slower sharing a process with torch), both
started with the same environment (``GLIBC_TUNABLES``: one malloc arena, no mmap, no trimming,
unless ``--no_malloc_tunables``; on the CPU, ``diffusion_jax.env.CPU_XLA_FLAGS`` added to
``XLA_FLAGS`` where that module suggests it, unless ``--no_xla_flags``). The parent sends each case to
both workers in turn, alternating who goes first, for ``--rounds`` rounds after a warm-up; a round's
time is the median of ``--reps`` calls. It prints per-round ours/theirs ratios and the 1-minute load
average at each round (the worker being timed counts for 1-2 of it; the two never run together),
and the median, min and max over rounds.

Cases: forward (eval mode, no grad) at batch 1/8/32; training step (draw t and eps, eps-MSE,
backward, Adam 2e-4, dropout on) at batch 8/32 -- ours one jitted, donated program, theirs eager
``loss.backward(); opt.step()``; sampling chains at batch 8 with ``--chain_steps`` steps: DDIM for
fewer than 1000 steps, ancestral DDPM for 1000 (ours one compiled ``make_sampler`` program, theirs
the usual ``DDIMScheduler`` / ``DDPMScheduler`` loop), reported per step and as a ratio to a bare
forward at batch 8. Once per worker: compile seconds of our training step and of the DDPM sampler
at 10 and 1000 steps; peak memory of a training step -- ours from XLA's
``compiled.memory_analysis()`` (arguments + outputs + temporaries - aliased) and, for both, the
growth of the process's peak RSS (VmHWM, reset through /proc/self/clear_refs) over its first step
at the largest batch (torch after a batch-1 step has made Adam's moments, which ours holds before
its step; later batches reuse the kept heap and report none); the FLOPs of our programs (XLA's
cost analysis of the lowered program; used for both sides as the architecture is identical)
divided by the time, as a fraction of the best dense float32 matmul (3072^2) either framework
reached in the same run.

``--device gpu`` (unverified: no GPU has been lent to this project's sessions; smoke-tested on the
CPU with ``--tiny``): forward and training step of the cifar10 config at ``--gpu_batch`` (default
128) in bfloat16 compute (float32 params; diffusers under ``torch.autocast(bfloat16)``), each timed
call running ``--inner`` (default 10) steps back to back with one sync at the end; images/s and
model FLOP utilisation (FLOPs from XLA's cost analysis of the lowered program, as the optimised GPU
HLO hides cuDNN convolutions) against a bf16 8192^2 matmul measured in the same run; device peak
memory (XLA's ``peak_bytes_in_use``, torch's ``max_memory_allocated``). ``--torch_compile`` runs the
peer through ``torch.compile``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from benchmarks.common import model_settings, worker_env

PARAMS_CIFAR10 = 35_746_307
GPU_INNER = 10  # GPU steps per timed call by default: one step is near the dispatch cost


# ----------------------------------------------------------------------------- timing helpers


def _peak_rss_reset() -> int:
    """Reset the peak-RSS mark (VmHWM) and return the current RSS in bytes (-1 if unsupported)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status("VmRSS")
    except OSError:
        return -1


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return -1


_RSS_MEASURED = False


def _rss_growth(base: int) -> int | None:
    """Peak RSS (VmHWM) now minus ``base``, once per process: None after the first call.

    With the benchmark's malloc settings the heap keeps every page it was given, so only the first
    training step a worker runs (the largest batch: the parent sets that up first) shows its size.
    """
    global _RSS_MEASURED
    if base <= 0 or _RSS_MEASURED:
        return None
    _RSS_MEASURED = True
    return _proc_status("VmHWM") - base


def _times(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


# ----------------------------------------------------------------------------- JAX worker


class JaxWorker:
    def __init__(self, args: argparse.Namespace):
        import jax
        import jax.numpy as jnp
        import optax

        import diffusion_jax as dj
        from diffusion_jax.models import UNet

        self.jax, self.jnp = jax, jnp
        self.gpu = args.device == "gpu"
        if self.gpu and jax.default_backend() != "gpu" and not args.tiny:
            raise SystemExit(f"--device gpu: JAX sees no GPU (backend {jax.default_backend()!r})")
        self.size = 8 if args.tiny else 32
        dtype = jnp.bfloat16 if self.gpu else jnp.float32
        self.model = UNet(**model_settings(args.tiny), dtype=dtype)
        x = jnp.zeros((1, self.size, self.size, 3))
        self.params = jax.jit(self.model.init)(jax.random.key(0), x, jnp.zeros((1,), jnp.int32))[
            "params"
        ]
        self.num_params = sum(p.size for p in jax.tree.leaves(self.params))
        self.schedule = dj.make_schedule("linear", 1000)
        self.tx = optax.adam(2e-4)
        model, schedule, tx = self.model, self.schedule, self.tx

        def make_train_step(model):
            def train_step(params, opt_state, x0, rng):
                loss_rng, dropout_rng = jax.random.split(rng)

                def loss_fn(p):
                    def model_fn(x_t, t):
                        return model.apply(
                            {"params": p}, x_t, t, train=True, rngs={"dropout": dropout_rng}
                        )

                    per_example = dj.diffusion_loss(schedule, model_fn, x0, loss_rng)
                    return jnp.mean(per_example)

                loss, grads = jax.value_and_grad(loss_fn)(params)
                updates, opt_state = tx.update(grads, opt_state, params)
                return optax.apply_updates(params, updates), opt_state, loss

            return train_step

        self.train_step = jax.jit(make_train_step(model), donate_argnums=(0, 1))
        self.forward = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t))
        self.denoise = lambda p, x, t: model.apply({"params": p}, x, t)
        self.compiled: dict[str, Any] = {}
        self.state: dict[int, Any] = {}
        self.flops: dict[str, float] = {}

    def _train_compiled(self, batch: int):
        key = f"train_{batch}"
        if key not in self.compiled:
            jax, jnp = self.jax, self.jnp
            params = jax.tree.map(jnp.copy, self.params)
            opt_state = self.tx.init(params)
            x = jnp.zeros((batch, self.size, self.size, 3))
            t0 = time.perf_counter()
            lowered = self.train_step.lower(params, opt_state, x, jax.random.key(1))
            compiled = lowered.compile()
            self.compile_s = time.perf_counter() - t0
            self.compiled[key] = compiled
            self.flops[key] = _xla_flops(
                self.train_step.lower(params, opt_state, x, jax.random.key(1))
            )
            mem = compiled.memory_analysis()
            self.xla_mem = self.xla_temp = None
            if mem is not None:
                self.xla_mem = (
                    mem.argument_size_in_bytes
                    + mem.output_size_in_bytes
                    + mem.temp_size_in_bytes
                    - mem.alias_size_in_bytes
                )
                self.xla_temp = mem.temp_size_in_bytes
            rng = jax.random.normal(jax.random.key(2), x.shape)
            self.state[batch] = [params, opt_state, rng, 0]
        return self.compiled[key]

    def setup_train(self, batch: int) -> dict[str, Any]:
        compiled = self._train_compiled(batch)
        info = {"compile_s": self.compile_s, "flops": self.flops[f"train_{batch}"]}
        info["xla_peak_bytes"], info["xla_temp_bytes"] = self.xla_mem, self.xla_temp
        base = _peak_rss_reset()  # the first run allocates the step's buffers (see _rss_growth)
        self.run_train(batch)
        info["rss_peak_growth_bytes"] = _rss_growth(base)
        if self.gpu:  # the allocator's high-water mark so far (the largest batch runs first)
            stats = self.jax.devices()[0].memory_stats() or {}
            info["device_peak_bytes"] = stats.get("peak_bytes_in_use")
        del compiled
        return info

    def run_train(self, batch: int, n: int = 1) -> None:
        """``n`` training steps, dispatched back to back, one sync at the end."""
        jax = self.jax
        st = self.state[batch]
        params, opt_state, x, i = st
        for j in range(n):
            params, opt_state, loss = self.compiled[f"train_{batch}"](
                params, opt_state, x, jax.random.key(i + j)
            )
        jax.block_until_ready(loss)
        st[:] = [params, opt_state, x, i + n]

    def run_forward(self, batch: int, n: int = 1) -> None:
        key = f"fwd_{batch}"
        jax, jnp = self.jax, self.jnp
        if key not in self.compiled:
            x = jax.random.normal(jax.random.key(3), (batch, self.size, self.size, 3))
            t = jnp.full((batch,), 500, jnp.int32)
            lowered = self.forward.lower(self.params, x, t)
            self.compiled[key] = (lowered.compile(), x, t)
            self.flops[key] = _xla_flops(lowered)
        compiled, x, t = self.compiled[key]
        jax.block_until_ready([compiled(self.params, x, t) for _ in range(n)])

    def _sampler(self, steps: int, batch: int):
        import diffusion_jax as dj

        sampler = "ddpm" if steps == self.schedule.num_timesteps else "ddim"
        sample = dj.make_sampler(self.denoise, self.schedule, sampler=sampler, num_steps=steps)
        shape = (batch, self.size, self.size, 3)
        t0 = time.perf_counter()
        compiled = self.jax.jit(sample, static_argnums=2).lower(
            self.params, self.jax.random.key(4), shape
        )
        compiled = compiled.compile()
        return compiled, time.perf_counter() - t0

    def compile_sampler(self, steps: int) -> dict[str, Any]:
        compiled, seconds = self._sampler(steps, 8)
        del compiled
        return {"compile_s": seconds}

    def run_chain(self, steps: int, batch: int) -> None:
        key = f"chain_{steps}_{batch}"
        if key not in self.compiled:
            self.compiled[key], _ = self._sampler(steps, batch)
        self.jax.block_until_ready(self.compiled[key](self.params, self.jax.random.key(5)))

    def matmul(self) -> float:
        jax, jnp = self.jax, self.jnp
        n = 8192 if self.gpu else 3072
        dtype = jnp.bfloat16 if self.gpu else jnp.float32
        a = jax.random.normal(jax.random.key(6), (n, n), dtype)
        f = jax.jit(lambda a, b: a @ b)
        jax.block_until_ready(f(a, a))
        inner = GPU_INNER if self.gpu else 1  # on a GPU one product (~1.5 ms) is near dispatch cost
        best = min(_times(lambda: jax.block_until_ready([f(a, a) for _ in range(inner)]), 5))
        return 2 * n**3 * inner / best


def _xla_flops(stage) -> float:
    """FLOPs by XLA's cost analysis of a lowered or compiled program (NaN if not reported)."""
    cost = stage.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0]
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


# ----------------------------------------------------------------------------- torch worker


class TorchWorker:
    def __init__(self, args: argparse.Namespace):
        import diffusers.utils.import_utils as diffusers_imports
        import torch

        # diffusers imports torchvision when installed, for models not used here; a torchvision
        # built for another torch (a CUDA wheel beside a CPU torch) fails in registering its ops.
        diffusers_imports._torchvision_available = False
        from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

        self.torch = torch
        self.dev = "cuda" if args.device == "gpu" and torch.cuda.is_available() else "cpu"
        s = model_settings(args.tiny)
        self.size = 8 if args.tiny else 32
        chans = [s["ch"] * m for m in s["ch_mult"]]
        res = [self.size // 2**i for i in range(len(chans))]
        attn = [r in s["attn_resolutions"] for r in res]
        torch.manual_seed(0)
        self.model = UNet2DModel(
            sample_size=self.size,
            in_channels=3,
            out_channels=3,
            block_out_channels=tuple(chans),
            layers_per_block=s["num_res_blocks"],
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
            act_fn="silu",
            attention_head_dim=None,
            downsample_padding=0,
            flip_sin_to_cos=False,
            freq_shift=1,
            norm_num_groups=32,
            norm_eps=1e-6,
            dropout=s["dropout"],
        ).to(self.dev)
        self.num_params = sum(p.numel() for p in self.model.parameters())
        # --torch_compile: the peer at its best (torch.compile, default mode); eager otherwise.
        self.net = torch.compile(self.model) if args.torch_compile else self.model
        self.opt = torch.optim.Adam(self.model.parameters(), lr=2e-4)
        betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
        abar = torch.cumprod(1 - betas, 0)
        self.sqrt_abar = abar.sqrt().float().to(self.dev)
        self.sqrt_1m_abar = (1 - abar).sqrt().float().to(self.dev)
        sched = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4)
        self.schedulers = {
            "ddpm": DDPMScheduler(beta_end=0.02, clip_sample=True, **sched),
            "ddim": DDIMScheduler(beta_end=0.02, clip_sample=True, **sched),
        }
        self.x = {}

    def _amp(self):
        """bfloat16 autocast on a GPU (as ours computes in bfloat16 there); float32 on the CPU."""
        if self.dev == "cuda":
            return self.torch.autocast("cuda", dtype=self.torch.bfloat16)
        return contextlib.nullcontext()

    def _sync(self):
        if self.dev == "cuda":
            self.torch.cuda.synchronize()

    def run_train(self, batch: int, n: int = 1) -> None:
        """``n`` training steps, one sync at the end."""
        torch = self.torch
        F = torch.nn.functional
        if ("train", batch) not in self.x:
            self.x["train", batch] = torch.randn(batch, 3, self.size, self.size, device=self.dev)
        x0 = self.x["train", batch]
        self.model.train()
        for _ in range(n):
            t = torch.randint(0, 1000, (batch,), device=self.dev)
            noise = torch.randn_like(x0)
            x_t = (
                self.sqrt_abar[t].view(-1, 1, 1, 1) * x0
                + self.sqrt_1m_abar[t].view(-1, 1, 1, 1) * noise
            )
            with self._amp():
                loss = F.mse_loss(self.net(x_t, t).sample.float(), noise)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        loss.item()
        self._sync()

    def setup_train(self, batch: int) -> dict[str, Any]:
        if not self.opt.state:  # Adam's moments exist before ours is measured too: make them
            self.run_train(1)
        base = _peak_rss_reset()
        self.run_train(batch)
        info: dict[str, Any] = {"rss_peak_growth_bytes": _rss_growth(base)}
        if self.dev == "cuda":
            info["device_peak_bytes"] = self.torch.cuda.max_memory_allocated()
        return info

    def run_forward(self, batch: int, n: int = 1) -> None:
        torch = self.torch
        if ("fwd", batch) not in self.x:
            self.x["fwd", batch] = torch.randn(batch, 3, self.size, self.size, device=self.dev)
        self.model.eval()
        t = torch.full((batch,), 500, device=self.dev)
        with torch.no_grad(), self._amp():
            for _ in range(n):
                out = self.net(self.x["fwd", batch], t).sample
        out.sum().item()
        self._sync()

    def run_chain(self, steps: int, batch: int) -> None:
        torch = self.torch
        sched = self.schedulers["ddpm" if steps == 1000 else "ddim"]
        sched.set_timesteps(steps)
        self.model.eval()
        gen = torch.Generator(device=self.dev).manual_seed(5)
        x = torch.randn(batch, 3, self.size, self.size, generator=gen, device=self.dev)
        with torch.no_grad():
            for t in sched.timesteps:
                with self._amp():
                    eps = self.net(x, t).sample.float()
                x = sched.step(eps, t, x, generator=gen).prev_sample
        x.sum().item()
        self._sync()

    def matmul(self) -> float:
        torch = self.torch
        n = 8192 if self.dev == "cuda" else 3072
        dtype = torch.bfloat16 if self.dev == "cuda" else torch.float32
        a = torch.randn(n, n, dtype=dtype, device=self.dev)

        inner = GPU_INNER if self.dev == "cuda" else 1

        def mm():
            for _ in range(inner):
                b = a @ a
            self._sync()
            return b

        mm()
        return 2 * n**3 * inner / min(_times(mm, 5))


def worker_main(args: argparse.Namespace) -> None:
    """Serve JSON requests on stdin: {"op": name, "args": [...], "reps": n} -> one JSON line."""
    w = JaxWorker(args) if args.worker == "jax" else TorchWorker(args)
    out = sys.stdout
    sys.stdout = sys.stderr  # library prints must not corrupt the protocol
    out.write(json.dumps({"num_params": w.num_params}) + "\n")
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        op, a = req["op"], req.get("args", [])
        try:
            if op.startswith("run_"):
                fn = getattr(w, op)
                result: Any = _times(lambda fn=fn, a=a: fn(*a), req.get("reps", 1))
            elif op == "flops":
                result = getattr(w, "flops", {})
            else:
                result = getattr(w, op)(*a)
        except Exception as e:  # report, keep serving
            result = {"error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps({"result": result}) + "\n")
        out.flush()


# ----------------------------------------------------------------------------- parent


class Worker:
    def __init__(self, kind: str, args: argparse.Namespace, env: dict[str, str]):
        cmd = [sys.executable, "-m", __spec__.name, "--worker", kind, "--device", args.device]
        if args.tiny:
            cmd.append("--tiny")
        if args.torch_compile:
            cmd.append("--torch_compile")
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True
        )
        self._hello = None

    @property
    def hello(self) -> Any:
        if self._hello is None:
            self._hello = self._read()
        return self._hello

    def _read(self) -> Any:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker exited with {self.proc.wait()}")
        return json.loads(line)

    def __call__(self, op: str, *a: Any, reps: int = 1) -> Any:
        self.proc.stdin.write(json.dumps({"op": op, "args": list(a), "reps": reps}) + "\n")
        self.proc.stdin.flush()
        result = self._read()["result"]
        if isinstance(result, dict) and "error" in result:
            raise RuntimeError(f"{op}{a}: {result['error']}")
        return result

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def _have_torch() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("torch", "diffusers"))


def _loadavg() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run_parent(args: argparse.Namespace) -> dict[str, Any]:
    env = worker_env(
        not args.no_malloc_tunables, xla_flags=args.device == "cpu" and not args.no_xla_flags
    )
    with_torch = _have_torch() and not args.no_torch
    ours = Worker("jax", args, env)
    theirs = Worker("torch", args, env) if with_torch else None
    report: dict[str, Any] = {
        "command": " ".join([os.path.basename(sys.executable), "-m", __spec__.name, *sys.argv[1:]]),
        "device": args.device,
        "tiny": args.tiny,
        "malloc_tunables": not args.no_malloc_tunables,
        "xla_flags": env.get("XLA_FLAGS", ""),
        "num_params": {"ours": ours.hello["num_params"]},
        "cases": {},
        "rounds_load": [],
    }
    if theirs is not None:
        report["num_params"]["theirs"] = theirs.hello["num_params"]
        assert theirs.hello["num_params"] == ours.hello["num_params"], report["num_params"]
    if not args.tiny and args.device == "cpu":
        assert ours.hello["num_params"] == PARAMS_CIFAR10, report["num_params"]
    workers = {"ours": ours, "theirs": theirs} if theirs else {"ours": ours}

    if args.device == "gpu":
        fwd_batches = train_batches = [int(b) for b in args.gpu_batch.split(",")]
        chain_batch = fwd_batches[0]
    elif args.tiny:
        fwd_batches, train_batches, chain_batch = [1], [1], 1
    else:
        fwd_batches = [1, 8, 32] if not args.quick else [8, 32]
        train_batches, chain_batch = [8, 32], 8
    chain_steps = [int(s) for s in args.chain_steps.split(",") if s]

    # Once per worker: compile, memory, warm-up of every case.
    setup: dict[str, Any] = {"train": {}, "sampler_compile_s": {}}
    for b in sorted(train_batches, reverse=True):  # largest first: RSS growth is then not hidden
        setup["train"][b] = {name: w("setup_train", b) for name, w in workers.items()}
    for steps in () if args.tiny else (10, 1000):  # tiny: the chain case compiles the same path
        setup["sampler_compile_s"][steps] = ours("compile_sampler", steps)["compile_s"]
    inner = args.inner or (GPU_INNER if args.device == "gpu" else 1)  # calls per timing, one sync
    cases = [("forward", "run_forward", [b, inner]) for b in fwd_batches]
    cases += [("train", "run_train", [b, inner]) for b in train_batches]
    cases += [("chain", "run_chain", [s, chain_batch]) for s in chain_steps]
    for _, op, a in cases:  # warm-up (and compile ours; torch.compile's autotuning)
        for w in workers.values():
            w(op, *a)
    report["setup"] = setup
    peaks = [w("matmul") for w in workers.values()]

    # Rounds: every case on both sides, alternating who goes first.
    results: dict[str, dict[str, list]] = {}
    for r in range(args.rounds):
        load = _loadavg()
        report["rounds_load"].append(load)
        order = list(workers) if r % 2 == 0 else list(reversed(workers))
        for kind, op, a in cases:
            name = f"{kind}_b{a[0]}" if kind != "chain" else f"chain{a[0]}_b{a[1]}"
            reps, per = (1, 1) if kind == "chain" else (args.reps, a[1])
            for who in order:
                t = statistics.median(workers[who](op, *a, reps=reps)) / per
                results.setdefault(name, {}).setdefault(who, []).append(t)
            results[name].setdefault("load", []).append(_loadavg())
        peaks += [w("matmul") for w in workers.values()]
        print(f"round {r + 1}/{args.rounds} done, load {load:.2f}", file=sys.stderr, flush=True)
    flops = ours("flops")
    report["matmul_peak_flops"] = max(peaks)
    report["matmul_flops_all"] = peaks
    for name, res in results.items():
        case: dict[str, Any] = {"load": res["load"]}
        for who in workers:
            case[who] = {"rounds_s": res[who], **_stats(res[who])}
        if theirs is not None:
            ratios = [a / b for a, b in zip(res["ours"], res["theirs"], strict=True)]
            case["ratio_rounds"] = ratios
            case["ratio"] = _stats(ratios)
        kind, b = name.split("_b")
        key = {"forward": f"fwd_{b}", "train": f"train_{b}"}.get(kind)
        if key in flops:
            case["flops"] = flops[key]
            for who in workers:
                achieved = flops[key] / case[who]["median"]
                case[who]["flops_per_s"] = achieved
                case[who]["frac_matmul_peak"] = achieved / report["matmul_peak_flops"]
        if kind.startswith("chain"):
            steps = int(kind[len("chain") :])
            fwd = results.get(f"forward_b{b}")
            for who in workers:
                case[who]["per_step_s"] = case[who]["median"] / steps
                if fwd:
                    case[who]["per_step_over_forward"] = case[who][
                        "per_step_s"
                    ] / statistics.median(fwd[who])
        report["cases"][name] = case
    if args.device == "gpu":
        for b in train_batches:
            c = report["cases"][f"train_b{b}"]
            for who in workers:
                c[who]["images_per_s"] = b / c[who]["median"]
                c[who]["mfu"] = c[who]["frac_matmul_peak"]
    for w in workers.values():
        w.close()
    return report


def _fmt_bytes(n: Any) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def print_report(rep: dict[str, Any]) -> None:
    both = "theirs" in rep["num_params"]
    print(f"command: {rep['command']}")
    malloc = "set" if rep["malloc_tunables"] else "not set"
    print(f"workers' env: GLIBC_TUNABLES {malloc}, XLA_FLAGS={rep['xla_flags']!r}")
    print(
        f"params: ours {rep['num_params']['ours']:,}"
        + (f", diffusers {rep['num_params']['theirs']:,}" if both else " (diffusers not installed)")
    )
    peak = rep["matmul_peak_flops"]
    print(f"matmul peak (best of both, this run): {peak / 1e9:.1f} GFLOP/s; load per round: "
          + ", ".join(f"{x:.2f}" for x in rep["rounds_load"]))  # fmt: skip
    head = f"{'case':<14} {'ours s (min-max)':>24} {'diffusers s (min-max)':>24} {'ratio med':>9}"
    print(head + f" {'ratio per round':>24} {'ours %peak':>10} {'theirs %peak':>12}")
    for name, c in rep["cases"].items():
        o = c["ours"]
        line = f"{name:<14} {o['median']:>8.3f} ({o['min']:.3f}-{o['max']:.3f})".ljust(39)
        if both:
            t = c["theirs"]
            line += f" {t['median']:>8.3f} ({t['min']:.3f}-{t['max']:.3f})".ljust(25)
            rr = " ".join(f"{x:.2f}" for x in c["ratio_rounds"])
            line += f" {c['ratio']['median']:>9.2f} {rr:>24}"
        else:
            line += " " * 59
        if "flops" in c:
            line += f" {100 * o['frac_matmul_peak']:>9.0f}%"
            if both:
                line += f" {100 * c['theirs']['frac_matmul_peak']:>11.0f}%"
        print(line)
    for name, c in rep["cases"].items():
        if name.startswith("chain"):
            for who in ("ours", "theirs") if both else ("ours",):
                x = c[who]
                extra = (
                    f", {x['per_step_over_forward']:.3f}x a bare forward"
                    if "per_step_over_forward" in x
                    else ""
                )
                print(f"{name} {who}: {1e3 * x['per_step_s']:.1f} ms per step{extra}")
    s = rep["setup"]
    for b, d in s["train"].items():
        o = d["ours"]
        line = (
            f"train b{b}: ours compile {o['compile_s']:.1f} s, {o['flops'] / 1e9:.1f} GFLOP/step, "
            f"XLA peak {_fmt_bytes(o['xla_peak_bytes'])} (temp {_fmt_bytes(o['xla_temp_bytes'])}), "
            f"RSS peak growth {_fmt_bytes(o['rss_peak_growth_bytes'])}"
        )
        if "theirs" in d:
            line += (
                f"; diffusers RSS peak growth {_fmt_bytes(d['theirs']['rss_peak_growth_bytes'])}"
            )
        print(line)
    print(
        "sampler compile (ddpm): "
        + ", ".join(f"{k} steps {v:.1f} s" for k, v in s["sampler_compile_s"].items())
    )
    if rep["device"] == "gpu":
        for name, c in rep["cases"].items():
            if name.startswith("train"):
                print(f"GPU bf16 {name}: " + "; ".join(
                    f"{who} {c[who]['images_per_s']:.0f} images/s, MFU {100 * c[who]['mfu']:.1f}%"
                    for who in ("ours", "theirs") if who in c))  # fmt: skip
        for b, d in s["train"].items():
            peaks = {w: d[w].get("device_peak_bytes") for w in d}
            print(f"GPU memory high-water mark after train b{b}: "
                  + ", ".join(f"{w} {_fmt_bytes(v)}" for w, v in peaks.items()))  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the report as JSON here")
    parser.add_argument("--rounds", type=int, default=None, help="default 5 (--quick 3, --tiny 1)")
    parser.add_argument(
        "--reps", type=int, default=None, help="calls per round (default 3, quick 1)"
    )
    parser.add_argument("--chain_steps", default="50,1000", help="comma-separated; '' for none")
    parser.add_argument("--quick", action="store_true", help="fewer rounds, no batch-1 forward")
    parser.add_argument("--tiny", action="store_true", help="tiny U-Net, batch 1: a smoke test")
    parser.add_argument("--no_torch", action="store_true", help="only our side")
    parser.add_argument("--no_malloc_tunables", action="store_true")
    parser.add_argument(
        "--no_xla_flags", action="store_true", help="without diffusion_jax.env.CPU_XLA_FLAGS"
    )
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--gpu_batch", default="128", help="GPU batch sizes, comma-separated")
    parser.add_argument(
        "--inner", type=int, default=None, help="steps per timed call (default 1; GPU 10)"
    )
    parser.add_argument("--torch_compile", action="store_true", help="torch.compile the peer")
    parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(args)
        return None
    if args.tiny and args.chain_steps == "50,1000":
        args.chain_steps = "2"
    if args.rounds is None:
        args.rounds = 1 if args.tiny else 3 if args.quick else 5
    if args.reps is None:
        args.reps = 1 if args.quick or args.tiny else 3
    rep = run_parent(args)
    print_report(rep)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rep, f, indent=1)
    return rep


if __name__ == "__main__":
    main()
