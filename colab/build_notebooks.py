"""Writes the notebooks in colab/ from the cell sources below, with no outputs.

    python colab/build_notebooks.py            # rewrite every colab/*.ipynb
    python colab/build_notebooks.py --check    # exit 1 if a notebook differs from this script

The notebooks are authored here, as Python strings, so that they diff and review like code; edit this
file and rerun it rather than editing the .ipynb files. ``tests/test_notebooks.py`` executes each
notebook (with ``DIFFUSION_JAX_FAST=1``) and checks that the committed copies carry no outputs.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tomllib

import nbformat

HERE = pathlib.Path(__file__).resolve().parent


def repository_url() -> str:
    """The repository's GitHub URL: ``[project.urls] Repository`` in pyproject.toml, the one place
    it is set (a fork changes it there and reruns this script; the README's badges and TPU example
    must agree, which tests/test_readme.py checks)."""
    with open(HERE.parent / "pyproject.toml", "rb") as f:
        url = tomllib.load(f)["project"]["urls"]["Repository"]
    if not url.startswith("https://github.com/") or url.rstrip("/").count("/") != 4:
        raise ValueError(
            f"pyproject.toml's [project.urls] Repository = {url!r}: the Colab badges need a "
            "GitHub repository URL, https://github.com/<owner>/<name>."
        )
    return url.rstrip("/")


# The repository the notebooks install from on Colab, as GitHub's owner/name.
GITHUB_REPO = repository_url().removeprefix("https://github.com/")


def badge(name: str) -> str:
    url = f"https://colab.research.google.com/github/{GITHUB_REPO}/blob/main/colab/{name}.ipynb"
    return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"


INSTALL = f"""\
# Installs diffusion_jax from its repository when it is not importable here (a fresh Colab runtime);
# inside a clone with the package installed (as in the tests) this cell does nothing.
# REPO is pyproject.toml's [project.urls] Repository; to install another copy, change it here.
import importlib.metadata
import os

REPO = "https://github.com/{GITHUB_REPO}"
if not os.path.exists("configs/digits.py"):  # the configs live in the repository, not the package
    if not os.path.isdir("diffusion_jax_repo"):
        !git clone -q --depth 1 {{REPO}} diffusion_jax_repo
    %cd diffusion_jax_repo
try:
    importlib.metadata.version("diffusion_jax")  # installed (with its dependencies)?
except importlib.metadata.PackageNotFoundError:
    %pip install -q ".[notebooks]"
"""

SWITCH_DOC = """\
`FAST` is the size switch: the test suite sets `DIFFUSION_JAX_FAST=1` and this notebook then runs in
about a minute on two CPU cores, with fewer training steps, fewer sampling steps and fewer variants
(the pictures are rougher). Left unset (the Colab default) it trains and samples for longer and the
pictures are worth looking at. `DIFFUSION_JAX_WORKDIR` chooses where runs are written."""

# --------------------------------------------------------------------------------------------------
# Shared by quickstart and sampling_tour: the same config, so that the sampling tour reuses the run
# the quickstart trained (the trainer resumes a finished run in no time) and trains it otherwise.
DIGITS_CONFIG = """\
from configs import digits

config = digits.get_config()  # configs/digits.py: class-conditional U-Net, T = 1000, linear betas
if FAST:
    config.model.attn_resolutions = ()  # no self-attention: half the compile time
    config.train.num_steps = 80
    config.train.batch_size = 32
    config.data.num_threads = 0  # no background reader on a 2-core machine
    config.optim.warmup_steps = 10
    config.sample.num_samples = 0  # the notebook draws its own samples
# Otherwise the default's 1500 steps of batch 64: ~5 minutes on 2 CPU cores, under one on a GPU.
config.checkpoint.every_steps = config.train.num_steps
config.sample.every_steps = 0  # sample grids only at the end of training
print(f"{config.train.num_steps} steps of batch {config.train.batch_size}")"""

TRAIN_DIGITS = """\
import warnings

from diffusion_jax import trainer

with warnings.catch_warnings():  # without ipywidgets tqdm warns, then draws a text bar
    warnings.simplefilter("ignore")
    from tqdm.auto import tqdm

bar = tqdm(total=config.train.num_steps, desc="training")
start = time.time()
state = trainer.train_and_evaluate(config, WORKDIR, hooks=[lambda step: bar.update(step - bar.n)])
bar.update(int(state.step) - bar.n)  # a finished run found in WORKDIR resumes at its last step
bar.close()
print(f"step {int(state.step)} in {time.time() - start:.0f} s; checkpoints in {WORKDIR}")"""


def setup(extra_imports: str = "", time_module: bool = True) -> str:
    """The imports, the FAST switch and the workdir root, shared by every notebook."""
    return SETUP.format(time="import time\n" if time_module else "", extra=extra_imports)


SETUP = """\
import os
{time}
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import diffusion_jax as dj
{extra}
FAST = os.environ.get("DIFFUSION_JAX_FAST") == "1"
ROOT = os.environ.get("DIFFUSION_JAX_WORKDIR", "/tmp/diffusion_jax_notebooks")
print(f"JAX {{jax.__version__}} on {{jax.devices()[0].platform}} ({{jax.device_count()}} device(s)); FAST={{FAST}}")"""

SHOW = '''\
from diffusion_jax.images import image_grid


def show(images, columns=None, title=None, ax=None, scale=1.0):
    """Images [N, H, W, 1] in [-1, 1] as one grid (white lines between the tiles)."""
    grid = image_grid(np.asarray(images), columns=columns)[..., 0]
    if ax is None:
        height, width = grid.shape
        _, ax = plt.subplots(figsize=(scale * width / 16, scale * height / 16))
    ax.imshow(grid, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=10)
    return ax'''

# --------------------------------------------------------------------------------------------------
QUICKSTART = [
    (
        "md",
        f"""\
# diffusion_jax quickstart

{badge("quickstart")}

Train a denoising diffusion model (DDPM, Ho et al. 2020) on the 8x8 handwritten digits that ship
with scikit-learn, watch the forward process destroy a digit, sample new digits and watch them
appear from noise, then save, reload and call the sampler from plain JAX.

Everything runs on whatever JAX finds: a CPU, a Colab GPU (*Runtime > Change runtime type*) or a TPU.

{SWITCH_DOC}""",
    ),
    ("code", INSTALL),
    ("code", setup() + '\nWORKDIR = os.path.join(ROOT, "digits")'),
    ("code", SHOW),
    (
        "md",
        r"""## 1. The forward process on a real digit

DDPM destroys data by adding Gaussian noise over $T = 1000$ steps with variances $\beta_1, \dots,
\beta_T$. With $\alpha_t = 1 - \beta_t$ and $\bar\alpha_t = \prod_{s \le t} \alpha_s$, any step can
be drawn directly from the data (eq. 4 of the paper):

$$q(x_t \mid x_0) = \mathcal{N}\big(x_t;\ \sqrt{\bar\alpha_t}\, x_0,\ (1 - \bar\alpha_t) I\big),
\qquad x_t = \sqrt{\bar\alpha_t}\, x_0 + \sqrt{1 - \bar\alpha_t}\, \epsilon .$$

`dj.q_sample(schedule, x0, t, noise)` is that line. **In code, timesteps count from 0**: `t = 0` is
the paper's $t = 1$ and `t = 999` the paper's $t = T$. Pixels live in $[-1, 1]$.""",
    ),
    (
        "code",
        """\
from diffusion_jax import data

images, labels = data.load_digits("train")  # [1500, 8, 8, 1] in [-1, 1], labels 0..9
schedule = dj.make_schedule("linear", 1000)  # Ho et al.: beta from 1e-4 to 0.02

x0 = jnp.asarray(images[:1])
noise = jax.random.normal(jax.random.key(0), x0.shape)
ts = [0, 50, 100, 200, 300, 500, 700, 999]
fig, axes = plt.subplots(1, len(ts), figsize=(1.4 * len(ts), 2.0))
for ax, t in zip(axes, ts, strict=True):
    x_t = dj.q_sample(schedule, x0, jnp.array([t]), noise)
    ax.imshow(np.asarray(x_t[0, ..., 0]), cmap="gray", vmin=-1, vmax=1)
    ax.set_title(f"t = {t}\\n" + r"$\\bar\\alpha_t$" + f" = {float(schedule.alphas_cumprod[t]):.3f}", fontsize=9)
    ax.set_axis_off()
fig.suptitle(f"q(x_t | x_0) for a real '{labels[0]}'", fontsize=10)
plt.show()""",
    ),
    (
        "md",
        r"""## 2. Train the default model

A network $\epsilon_\theta(x_t, t, y)$ learns to predict the noise that was added, by Algorithm 1:
draw a digit $x_0$ with its label $y$, a step $t$ and noise $\epsilon$, and take a gradient step on
the simple loss (eq. 14)

$$L_\text{simple} = \mathbb{E}_{t, x_0, \epsilon}\, \big\| \epsilon - \epsilon_\theta\big(\sqrt{\bar\alpha_t} x_0 + \sqrt{1-\bar\alpha_t}\,\epsilon,\ t,\ y\big) \big\|^2 .$$

`configs/digits.py` is the default config: a small class-conditional U-Net; 10% of the labels are
replaced by a "no class" label so the same network can also sample without a label (and with
classifier-free guidance, see `sampling_tour.ipynb`). `trainer.train_and_evaluate(config, workdir)`
is what `python train.py --config configs/digits.py --workdir ...` runs: it keeps an EMA of the
weights, writes Orbax checkpoints and TensorBoard logs to the workdir, and resumes from the newest
checkpoint when run again. `hooks` are called after every step; here one drives a progress bar.""",
    ),
    ("code", DIGITS_CONFIG),
    ("code", TRAIN_DIGITS),
    (
        "md",
        r"""## 3. Sample, and watch digits appear

Sampling runs the learned reverse process from pure noise $x_T \sim \mathcal{N}(0, I)$. Here DDIM
(Song et al. 2021) with $\eta = 0$ takes a few dozen of the 1000 steps; at each step the network's
noise estimate also gives a prediction of the final image,
$\hat x_0 = (x_t - \sqrt{1 - \bar\alpha_t}\,\epsilon_\theta(x_t, t)) / \sqrt{\bar\alpha_t}$.
The whole chain is one compiled `lax.scan`; `trajectory_steps` asks it to also return the
intermediate $x_t$ and $\hat x_0$ at chosen sampler steps (`S - 1` is the first, pure noise).""",
    ),
    (
        "code",
        """\
from diffusion_jax import config_utils

cfg = config_utils.parse_config(config)  # the typed config the trainer used
model = config_utils.build_model(cfg)
denoise_fn = config_utils.denoise_fn_for(model)  # (params, x_t, t, y) -> predicted noise
S = 20 if FAST else 100  # sampler steps
record = [S - 1 - round(k * (S - 1) / 7) for k in range(8)]  # 8 sampler steps, x_T first
sampler = dj.make_sampler(
    denoise_fn, config_utils.build_schedule(cfg), sampler="ddim", num_steps=S, trajectory_steps=record
)
y = jnp.tile(jnp.arange(10), 10)  # one class per column
start = time.time()
x0, frames, x0_preds = jax.jit(sampler, static_argnums=2)(state.ema_params, jax.random.key(1), (100, 8, 8, 1), y=y)
print(f"100 digits, {S} DDIM steps, compiled and run in {time.time() - start:.1f} s")
show(x0, columns=10, title="samples: digit classes 0 to 9, one per column", scale=1.2)
plt.show()""",
    ),
    (
        "code",
        """\
fig, axes = plt.subplots(2, 1, figsize=(7, 8.5))
pick = jnp.arange(5)  # the first five samples, classes 0..4
for ax, series, name in ((axes[0], frames, "x_t"), (axes[1], x0_preds, "predicted x_0")):
    # rows: samples; columns: sampler steps from x_T (left) to the end (right)
    strip = jnp.concatenate([series[:, pick], x0[None, pick]]).transpose(1, 0, 2, 3, 4)
    show(strip.reshape(-1, 8, 8, 1), columns=len(record) + 1, ax=ax,
         title=f"{name} at sampler steps {record} (left to right), then the sample")
plt.show()""",
    ),
    (
        "md",
        """## 4. Save and reload

The trainer already saved the run: `WORKDIR/checkpoints/<step>/` holds the parameters, the EMA
parameters, the optimizer state and the config. `checkpoints.load_ema_params` reads back only the
EMA weights (what samples should use) and the typed config; `checkpoints.load_sampler` also builds
the sampler, with any `config.sample` entry overridden.""",
    ),
    (
        "code",
        """\
from diffusion_jax import checkpoints

print(sorted(os.listdir(WORKDIR)), sorted(os.listdir(os.path.join(WORKDIR, "checkpoints"))))
params, loaded_cfg = checkpoints.load_ema_params(WORKDIR)
same = jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), params, state.ema_params))
print("reloaded EMA weights equal the trained ones:", same)
assert same and loaded_cfg.model == cfg.model

run = checkpoints.load_sampler(WORKDIR, sampler="ddim", num_steps=S)
print(f"examples of shape {run.data_shape}; sampler: DDIM, {S} steps")""",
    ),
    (
        "md",
        """## 5. `sample(params, rng, shape)` is plain JAX

A sampler is a pure function: no hidden state, the same key gives the same digits, and it composes
with `jax.jit` and `jax.vmap` like any other JAX function. Below, `vmap` over four keys draws four
independent sets of the ten classes in one compiled program.""",
    ),
    (
        "code",
        """\
def ten_digits(key):
    return run.sample(run.params, key, (10, *run.data_shape), y=jnp.arange(10))


many = jax.jit(jax.vmap(ten_digits))
keys = jax.random.split(jax.random.key(2), 4)
batches = many(keys)  # [4, 10, 8, 8, 1]
again = many(keys)
print(batches.shape, "deterministic:", bool(jnp.array_equal(batches, again)))
show(batches.reshape(40, 8, 8, 1), columns=10, title="jit(vmap(sample)) over 4 keys", scale=1.2)
plt.show()""",
    ),
    (
        "md",
        """## Next

* `sampling_tour.ipynb`: DDPM, DDIM, Heun and DPM-Solver++ side by side, classifier-free guidance,
  inpainting and image-to-image on this model.
* `toy_2d.ipynb`: the same ideas on 142 points shaped like a dinosaur, one design choice at a time.
* `schedules.ipynb`: what the noise schedule does.
* From a shell: `python train.py --config configs/digits.py --workdir /tmp/diffusion_digits`.""",
    ),
]

# --------------------------------------------------------------------------------------------------
TOY_2D = [
    (
        "md",
        f"""\
# Diffusion in two dimensions: the Datasaurus dino

{badge("toy_2d")}

The dataset is 142 points that draw a dinosaur (the "dino" of the Datasaurus Dozen). Each **point**
is one training example $x_0 \\in \\mathbb{{R}}^2$, so we can look at the whole data distribution,
and at every sample a model draws, in one scatter plot. This is the walkthrough of tiny-diffusion
(github.com/tanelp/tiny-diffusion) in diffusion_jax: the forward process, then a denoiser MLP built
up one step at a time (no timestep, then the timestep, then Fourier features of the input), then the
noise schedule. Each model is judged by eye and by a distance between 1000 samples and the data.

{SWITCH_DOC}""",
    ),
    ("code", INSTALL),
    (
        "code",
        setup("from diffusion_jax import data\nfrom diffusion_jax.evaluation import distances\n")
        + """

points, _ = data.load_points("dino", num_points=8000, seed=0)  # the 142 points, jittered, standardised
reference, _ = data.load_points("dino", "test", num_points=1000, seed=0)  # an independent draw, to compare with
print(points.shape, "mean", points.mean(0).round(3), "std", points.std(0).round(3))


def scatter(ax, pts, title=None, limit=3.2):
    ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.6, color="tab:blue")
    ax.set_xlim(-limit, limit)
    ax.set_ylim(-limit, limit)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)""",
    ),
    (
        "md",
        r"""## 1. The forward process

$q(x_t \mid x_0) = \mathcal{N}(\sqrt{\bar\alpha_t}\, x_0, (1 - \bar\alpha_t) I)$ moves every point
towards the origin and blurs it, until at $t = T$ the cloud is a standard Gaussian. Code counts
timesteps from 0 (`t = 0` is the paper's $t = 1$). We use $T = 100$ steps here; the library's
`linear` schedule rescales DDPM's betas by $1000 / T$, so $\bar\alpha_T$ is near 0 for any $T$.""",
    ),
    (
        "code",
        """\
T = 100
schedule = dj.make_schedule("linear", T)
x0 = jnp.asarray(reference)
noise = jax.random.normal(jax.random.key(0), x0.shape)
ts = [0, 10, 20, 40, 60, 99]
fig, axes = plt.subplots(1, len(ts), figsize=(2.2 * len(ts), 2.5))
for ax, t in zip(axes, ts, strict=True):
    x_t = dj.q_sample(schedule, x0, jnp.full((len(x0),), t), noise)
    scatter(ax, np.asarray(x_t), f"t = {t}, " + r"$\\bar\\alpha_t$" + f" = {float(schedule.alphas_cumprod[t]):.3f}")
plt.show()""",
    ),
    (
        "md",
        r"""## 2. Training and sampling, in a few lines

Algorithm 1 is `dj.diffusion_loss`: draw $t$ and $\epsilon$, form $x_t$, and return
$\|\epsilon - \epsilon_\theta(x_t, t)\|^2$ per example. The loop below runs a chunk of Adam steps as
one compiled `lax.scan` (so Python is not in the loop). The schedule is an ordinary argument of the
compiled function: training the same network under another schedule does not recompile.

Sampling is Algorithm 2, ancestral sampling through all $T$ steps:
$x_{t-1} = \frac{1}{\sqrt{\alpha_t}}\big(x_t - \frac{\beta_t}{\sqrt{1-\bar\alpha_t}}\epsilon_\theta(x_t, t)\big) + \sigma_t z$,
with `clip_denoised=False` since points are not confined to $[-1, 1]$.

The distance is the **energy distance** $2\,\mathbb{E}|X - Y| - \mathbb{E}|X - X'| - \mathbb{E}|Y - Y'|$
(`diffusion_jax.evaluation.distances`), zero only for equal distributions, with the sliced
Wasserstein distance beside it. Two independent draws from the data set the floor: what a perfect
model would score at this sample size.""",
    ),
    (
        "code",
        """\
from functools import partial

import optax

NUM_STEPS = 2000 if FAST else 20_000
CHUNK = 1000
BATCH = 256
tx = optax.adam(optax.warmup_cosine_decay_schedule(0.0, 2e-3, 100, NUM_STEPS, 1e-4))
train_points = jnp.asarray(points)


@partial(jax.jit, static_argnums=0)
def train_chunk(model, params, opt_state, schedule, key, first_step):
    def step(carry, i):
        params, opt_state = carry
        batch_key, loss_key = jax.random.split(jax.random.fold_in(key, first_step + i))
        x0 = train_points[jax.random.randint(batch_key, (BATCH,), 0, len(train_points))]

        def loss_fn(p):
            model_fn = lambda x_t, t: model.apply({"params": p}, x_t, t)
            return dj.diffusion_loss(schedule, model_fn, x0, loss_key).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), jnp.arange(CHUNK))
    return params, opt_state, losses


def train(model, schedule, seed=0):
    params = model.init(jax.random.key(seed), train_points[:1], jnp.zeros((1,), jnp.int32))["params"]
    opt_state, losses = tx.init(params), []
    for first in range(0, NUM_STEPS, CHUNK):
        params, opt_state, chunk = train_chunk(model, params, opt_state, schedule, jax.random.key(seed + 1), first)
        losses.append(chunk)
    return params, np.concatenate(losses)


def sample_points(model, params, schedule, n=1000, seed=0):
    denoise_fn = lambda p, x_t, t: model.apply({"params": p}, x_t, t)
    sample = dj.make_sampler(denoise_fn, schedule, sampler="ddpm", clip_denoised=False)
    return np.asarray(jax.jit(sample, static_argnums=2)(params, jax.random.key(seed), (n, 2)))


def scores(samples):
    return (distances.energy_distance(samples, reference), distances.sliced_wasserstein(samples, reference))


floor = scores(data.load_points("dino", num_points=1000, seed=1)[0])
print(f"floor (data vs data): energy {floor[0]:.4f}, sliced W2 {floor[1]:.4f}")""",
    ),
    (
        "md",
        r"""## 3. The denoiser, one improvement at a time

All three are `dj.MLPDenoiser`: a residual MLP with 3 hidden layers of 128 units.

1. **No timestep** (`time_embedding="none"`): the network must guess the noise without knowing how
   much was added. The best it can do is an average over all $t$.
2. **With the timestep** (`"sinusoidal"`): $t$ enters through the DDPM/Transformer sinusoidal embedding.
3. **With Fourier features of the input** (`fourier_features=16`): $x$ is replaced by
   $\sin(\omega_k x), \cos(\omega_k x)$ at 16 fixed frequencies per coordinate, which lets a small
   MLP represent the sharp edges of a low-dimensional shape (Tancik et al. 2020).""",
    ),
    (
        "code",
        """\
variants = {
    "no timestep": dj.MLPDenoiser(time_embedding="none"),
    "+ timestep": dj.MLPDenoiser(time_embedding="sinusoidal"),
    "+ Fourier features": dj.MLPDenoiser(time_embedding="sinusoidal", fourier_features=16),
}
results = {}
for name, model in variants.items():
    start = time.time()
    params, losses = train(model, schedule)
    samples = sample_points(model, params, schedule)
    results[name] = (samples, losses, scores(samples))
    print(f"{name:20s} final loss {losses[-500:].mean():.3f}  ({time.time() - start:.0f} s)")

fig, axes = plt.subplots(1, 4, figsize=(13, 3.4))
scatter(axes[0], reference, "data (1000 jittered points)")
for ax, (name, (samples, _, (energy, sw))) in zip(axes[1:], results.items(), strict=True):
    scatter(ax, samples, f"{name}\\nenergy {energy:.3f}, SW {sw:.3f}")
plt.show()""",
    ),
    (
        "code",
        """\
print(f"{'model':22s} {'energy distance':>16s} {'sliced W2':>10s}")
for name, (_, _, (energy, sw)) in results.items():
    print(f"{name:22s} {energy:16.4f} {sw:10.4f}")
print(f"{'floor (data vs data)':22s} {floor[0]:16.4f} {floor[1]:10.4f}")

fig, ax = plt.subplots(figsize=(6, 2.8))
for name, (_, losses, _) in results.items():
    ax.plot(np.convolve(losses, np.ones(100) / 100, mode="valid"), label=name)
ax.set_xlabel("training step")
ax.set_ylabel("L_simple (running mean)")
ax.legend()
plt.show()""",
    ),
    (
        "md",
        r"""Without the timestep the samples only fill a blurry region around the dino: the network cannot
tell a nearly clean point from a very noisy one. The timestep gives the outline; Fourier features
sharpen it. Read the distances against the floor, which is what two draws of the data itself score.
In a full run (20,000 steps each, `FAST` off) the energy distances were 0.150, 0.0078 and 0.0069
for the three models, against a floor of 0.0045; with `FAST` on the last two are too undertrained
to tell apart reliably.

## 4. The noise schedule

Where the schedule ends matters. The reverse process starts from $\mathcal{N}(0, I)$, so
$\bar\alpha_T$ should be close to 0; but in two dimensions a point is destroyed far sooner than an
image is (there is no redundancy across thousands of pixels to average noise over), so a schedule
that spends many steps at very low $\bar\alpha_t$ wastes them. And for standardised data
$x_T = \sqrt{\bar\alpha_T} x_0 + \sqrt{1 - \bar\alpha_T}\epsilon$ already has mean 0 and
covariance near $I$ even when $\bar\alpha_T$ is not small: only its shape differs from the
Gaussian the sampler starts from. Below the Fourier-feature MLP is
trained again under schedules ending at different $\bar\alpha_T$: the library's default linear
(DDPM's betas rescaled to $T$), cosine, and two linear schedules with a smaller final $\beta$, whose
$\bar\alpha_T$ is higher. The network and optimiser are unchanged, and the compiled training
chunk is reused.""",
    ),
    (
        "code",
        """\
schedules = {
    "linear (default)": schedule,
    "cosine": dj.make_schedule("cosine", T),
    "linear, beta_T = 0.1": dj.make_schedule("linear", T, beta_start=1e-4, beta_end=0.1),
    "linear, beta_T = 0.04": dj.make_schedule("linear", T, beta_start=1e-4, beta_end=0.04),
}
if FAST:  # two fewer training runs
    schedules.pop("cosine")
    schedules.pop("linear, beta_T = 0.1")
fourier = variants["+ Fourier features"]
schedule_results = {"linear (default)": results["+ Fourier features"]}
for name, sched in schedules.items():
    if name not in schedule_results:
        params, losses = train(fourier, sched)
        samples = sample_points(fourier, params, sched)
        schedule_results[name] = (samples, losses, scores(samples))

fig, axes = plt.subplots(1, len(schedules) + 1, figsize=(3.2 * (len(schedules) + 1), 3.4))
for name, sched in schedules.items():
    axes[0].plot(np.asarray(sched.alphas_cumprod), label=name)
axes[0].set_xlabel("t")
axes[0].set_title(r"$\\bar\\alpha_t$", fontsize=9)
axes[0].legend(fontsize=7)
for ax, (name, (samples, _, (energy, sw))) in zip(axes[1:], schedule_results.items(), strict=True):
    scatter(ax, samples, f"{name}\\nenergy {energy:.3f}, SW {sw:.3f}")
plt.show()

print(f"{'schedule':24s} {'alpha-bar_T':>12s} {'energy distance':>16s} {'sliced W2':>10s} {'|x| > 4':>8s}")
for name, (samples, _, (energy, sw)) in schedule_results.items():
    stray = int(np.sum(np.abs(samples).max(axis=1) > 4))  # points far outside the data
    print(f"{name:24s} {float(schedules[name].alphas_cumprod[-1]):12.2e} {energy:16.4f} {sw:10.4f} {stray:8d}")
print(f"{'floor (data vs data)':24s} {'':12s} {floor[0]:16.4f} {floor[1]:10.4f}")""",
    ),
    (
        "md",
        r"""Compare the rows: the measured distances, not the argument above, are the evidence. In a full run
(`FAST` off) the linear schedule ending at $\bar\alpha_T = 0.13$ came closest to the data (energy
distance 0.0046 against a floor of 0.0045, sliced W2 0.104 against 0.100), ahead of the default
linear (0.0069, 0.116) and the one ending at 0.0056 (0.0069, 0.118). Cosine scored 0.0063 on the
energy distance but 1.78 on sliced W2: a few of its points land far outside the picture (the
`|x| > 4` column counts them), which the squared distance punishes and the energy distance hardly
notices. The likely cause: at $T = 100$ cosine's last $\beta$ is clipped at 0.999, so the first
reverse step divides the network's error by $\sqrt{\alpha_T} \approx 0.03$. With `FAST` on (few
training steps) such differences are within the noise of training.

From here: `python train.py --config configs/toy2d.py --workdir /tmp/dino` trains the
same Fourier-feature MLP with the full trainer (checkpoints, EMA, TensorBoard), and
`python evaluate.py --workdir /tmp/dino --metrics ed,swd` scores it with these distances.""",
    ),
]

# --------------------------------------------------------------------------------------------------
SAMPLING_TOUR = [
    (
        "md",
        f"""\
# A tour of sampling: four samplers, guidance, inpainting and image-to-image

{badge("sampling_tour")}

One trained class-conditional digits model (the quickstart's; if `quickstart.ipynb` ran in this
runtime its run is reused, otherwise it is trained here), sampled many ways. Every sampler,
guidance and editing mode below is `make_sampler` or one of its siblings around the same denoiser
`(params, x_t, t, y) -> eps`, and each compiles to one program.

{SWITCH_DOC}""",
    ),
    ("code", INSTALL),
    ("code", setup() + '\nWORKDIR = os.path.join(ROOT, "digits")'),
    ("code", SHOW),
    ("code", DIGITS_CONFIG),
    ("code", TRAIN_DIGITS),
    (
        "code",
        """\
from diffusion_jax import config_utils, data

cfg = config_utils.parse_config(config)
denoise_fn = config_utils.denoise_fn_for(config_utils.build_model(cfg))  # (params, x_t, t, y=None)
schedule = config_utils.build_schedule(cfg)
params = state.ema_params
NULL = cfg.model.num_classes  # label 10: "no class"
test_images, test_labels = data.load_digits("test")  # 297 digits the model never saw""",
    ),
    (
        "md",
        r"""## 1. Four samplers at several step counts

* `ddpm`: ancestral sampling (Ho et al. Algorithm 2), stochastic; respaced to $S$ steps.
* `ddim`: Song et al. eq. 12 with $\eta = 0$, deterministic given $x_T$.
* `heun`: Karras et al.'s second-order solver of the probability-flow ODE; two network evaluations
  per step (but the last), so $2S - 1$ in all.
* `dpm_solver_2m`: DPM-Solver++(2M), second order from one evaluation per step plus the previous one.

Same key, same labels (0 to 9 in each row); only the sampler and $S$ change. Each cell is a
separately compiled chain, which on a CPU costs a few seconds of compilation each.""",
    ),
    (
        "code",
        """\
SAMPLERS = ["ddpm", "ddim", "heun", "dpm_solver_2m"]
STEPS = [5, 20] if FAST else [5, 10, 25, 50]
y = jnp.arange(10)
key = jax.random.key(0)
fig, axes = plt.subplots(len(SAMPLERS), len(STEPS), figsize=(2.6 * len(STEPS), 1.5 * len(SAMPLERS)), squeeze=False)
for row, name in enumerate(SAMPLERS):
    for col, steps in enumerate(STEPS):
        sample = dj.make_sampler(denoise_fn, schedule, sampler=name, num_steps=steps)
        start = time.time()
        x = jax.jit(sample, static_argnums=2)(params, key, (10, 8, 8, 1), y=y)
        nfe = 2 * steps - 1 if name == "heun" else steps
        show(x, columns=5, ax=axes[row, col], title=f"{name}, {steps} steps ({nfe} evals)")
        print(f"{name:14s} {steps:3d} steps: {time.time() - start:5.1f} s (compile + run)")
plt.tight_layout()
plt.show()""",
    ),
    (
        "md",
        r"""## 2. Classifier-free guidance

The model was trained with 10% of its labels replaced by the null label $\varnothing$, so it
predicts both $\epsilon_\theta(x_t, t, y)$ and $\epsilon_\theta(x_t, t, \varnothing)$. Guidance
(Ho & Salimans 2022) samples with

$$\tilde\epsilon = \epsilon_\theta(x_t, t, \varnothing) + w\,\big(\epsilon_\theta(x_t, t, y) - \epsilon_\theta(x_t, t, \varnothing)\big):$$

$w = 0$ is the unconditional model, $w = 1$ the conditional one, $w > 1$ trades diversity for
digits that look more like their class. `dj.classifier_free_guidance` batches both evaluations into
one call; `guidance_scale` is an ordinary traced argument, so every scale reuses one compiled program.""",
    ),
    (
        "code",
        """\
guided = dj.make_sampler(dj.classifier_free_guidance(denoise_fn, null_label=NULL), schedule, sampler="ddim", num_steps=20)
draw = jax.jit(lambda p, k, w: guided(p, k, (20, 8, 8, 1), y=jnp.tile(jnp.arange(10), 2), guidance_scale=w))
scales = [0.0, 1.0, 3.0] if FAST else [0.0, 1.0, 2.0, 4.0, 8.0]
fig, axes = plt.subplots(len(scales), 1, figsize=(5.5, 1.5 * len(scales)))
for ax, w in zip(axes, scales, strict=True):
    show(draw(params, jax.random.key(3), w), columns=10, ax=ax, title=f"guidance scale w = {w:g} (same noise in every row)")
plt.show()""",
    ),
    (
        "md",
        r"""## 3. Inpainting

Keep part of a real test digit and let the model fill in the rest (`dj.make_inpainter`). After every
reverse step the known pixels are replaced by the original noised to the same level,
$q(x_{t-1} \mid x_0)$, so only the unknown region is generated; with `resample > 1` each step is
repeated after going back up one step (RePaint, Lugmayr et al. 2022), which helps the two regions
agree. The label here is the null label: the model sees only the kept half.""",
    ),
    (
        "code",
        """\
originals = jnp.asarray(test_images[:10])
mask = jnp.zeros((1, 8, 8, 1)).at[:, :4].set(1.0)  # 1 where known: the top half
inpaint = dj.make_inpainter(denoise_fn, schedule, sampler="ddpm", num_steps=25 if FAST else 100, resample=2 if FAST else 5)
filled = jax.jit(inpaint)(params, jax.random.key(4), originals, mask)
shown_mask = originals * mask + (1 - mask) * 0.0  # grey where unknown
fig, axes = plt.subplots(3, 1, figsize=(5.5, 3.6))
show(originals, columns=10, ax=axes[0], title="test digits")
show(shown_mask, columns=10, ax=axes[1], title="what the model sees (grey: unknown)")
show(filled, columns=10, ax=axes[2], title="inpainted bottom half")
plt.show()""",
    ),
    (
        "md",
        r"""## 4. Image-to-image (SDEdit)

`dj.make_img2img(..., strength=s)` noises a real image to the step nearest $s \cdot S$ with
$q(x_t \mid x_0)$ and runs the sampler from there (Meng et al. 2022): small $s$ keeps the image,
large $s$ keeps only its coarse layout. Asking for a different class than the input's turns a digit
into another one drawn in a similar place. With the linear schedule little of the input survives
past the middle ($\bar\alpha_t$ is 0.03 at `t = 600`), so strengths above about 0.6 start from
almost pure noise and, with the same key, give almost the same digits.""",
    ),
    (
        "code",
        """\
strengths = [0.3, 0.6] if FAST else [0.2, 0.3, 0.4, 0.5, 0.7]
targets = (jnp.asarray(test_labels[:10]) + 1) % 10  # each digit's successor: 0 -> 1, ..., 9 -> 0
fig, axes = plt.subplots(1 + len(strengths), 1, figsize=(5.5, 1.25 * (1 + len(strengths))))
show(originals, columns=10, ax=axes[0], title=f"test digits {np.asarray(test_labels[:10])}")
for ax, s in zip(axes[1:], strengths, strict=True):
    edit = jax.jit(dj.make_img2img(denoise_fn, schedule, strength=s, sampler="ddim", num_steps=20))
    show(edit(params, jax.random.key(5), originals, y=targets), columns=10, ax=ax,
         title=f"strength {s}, asked for {np.asarray(targets)}")
plt.show()""",
    ),
]

# --------------------------------------------------------------------------------------------------
SCHEDULES = [
    (
        "md",
        f"""\
# Noise schedules

{badge("schedules")}

The forward process $q(x_t \\mid x_{{t-1}}) = \\mathcal{{N}}(\\sqrt{{1 - \\beta_t}}\\, x_{{t-1}}, \\beta_t I)$
is fixed by its variances $\\beta_t$. What the samples see is $\\bar\\alpha_t = \\prod_{{s \\le t}}(1 - \\beta_s)$,
the share of signal variance left at step $t$, or the signal-to-noise ratio
$\\mathrm{{SNR}}(t) = \\bar\\alpha_t / (1 - \\bar\\alpha_t)$. This notebook plots the five named schedules
of `dj.make_schedule` and shows what each does to one real digit at the same $t$. No training: it
runs in seconds anywhere. (`FAST` changes nothing here; it is read for uniformity.)""",
    ),
    ("code", INSTALL),
    ("code", setup(time_module=False)),
    (
        "md",
        r"""## 1. $\beta_t$, $\bar\alpha_t$ and log SNR

* `linear` (Ho et al.): $\beta$ evenly from $10^{-4}$ to $0.02$ at $T = 1000$ (both scaled by $1000/T$).
* `quadratic`: evenly spaced in $\sqrt\beta$ between the same endpoints.
* `sigmoid`: a sigmoid from $-6$ to $6$ mapped onto the endpoints.
* `geometric`: evenly spaced in $\log\beta$.
* `cosine` (Nichol & Dhariwal 2021): $\bar\alpha_t = f(t)/f(0)$ with $f(t) = \cos^2\big(\frac{t/T + s}{1 + s}\frac{\pi}{2}\big)$, $s = 0.008$, $\beta$ clipped at 0.999.

Code counts $t$ from 0: index `t` is the paper's step $t + 1$.""",
    ),
    (
        "code",
        """\
T = 1000
NAMES = ["linear", "cosine", "quadratic", "sigmoid", "geometric"]
schedules = {name: dj.make_schedule(name, T) for name in NAMES}
t = np.arange(T)
fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
for name, s in schedules.items():
    axes[0].plot(t, np.asarray(s.betas), label=name)
    axes[1].plot(t, np.asarray(s.alphas_cumprod), label=name)
    axes[2].plot(t, np.log(np.asarray(s.snr)), label=name)
axes[0].set_yscale("log")
for ax, title in zip(axes, [r"$\\beta_t$ (log scale)", r"$\\bar\\alpha_t$", r"$\\log \\mathrm{SNR}(t)$"], strict=True):
    ax.set_title(title)
    ax.set_xlabel("t (0-based)")
axes[1].legend()
plt.show()

print(f"{'schedule':10s} " + " ".join(f"{'abar@' + str(k):>10s}" for k in (99, 249, 499, 749, 999)))
for name, s in schedules.items():
    print(f"{name:10s} " + " ".join(f"{float(s.alphas_cumprod[k]):10.2e}" for k in (99, 249, 499, 749, 999)))""",
    ),
    (
        "md",
        r"""The cosine schedule destroys information more evenly: its log SNR falls almost linearly through
the middle, where the linear schedule has already reached nearly pure noise by $t \approx 600$ and
spends the remaining steps there. The quadratic, sigmoid and geometric schedules keep small $\beta$
for longer, so more of their steps sit at high SNR. With DDPM's endpoints the geometric schedule
never gets there: it ends at $\bar\alpha_T \approx 0.02$, so its $x_T$ still carries some of the
image while sampling starts from pure noise (raise `beta_end` to use it).

## 2. The same digit, the same noise, the same $t$

$x_t = \sqrt{\bar\alpha_t}\, x_0 + \sqrt{1 - \bar\alpha_t}\,\epsilon$ with one fixed $\epsilon$, so
only the schedule differs between rows.""",
    ),
    (
        "code",
        """\
from diffusion_jax import data

images, labels = data.load_digits("test")
x0 = jnp.asarray(images[3:4])
noise = jax.random.normal(jax.random.key(0), x0.shape)
ts = [0, 100, 250, 400, 550, 700, 850, 999]
fig, axes = plt.subplots(len(NAMES), len(ts), figsize=(1.3 * len(ts), 1.45 * len(NAMES)))
for row, (name, s) in enumerate(schedules.items()):
    for col, step in enumerate(ts):
        x_t = dj.q_sample(s, x0, jnp.array([step]), noise)
        ax = axes[row, col]
        ax.imshow(np.asarray(x_t[0, ..., 0]), cmap="gray", vmin=-1, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"SNR {float(s.snr[step]):.2g}", fontsize=7)
        if col == 0:
            ax.set_ylabel(name, fontsize=9)
        if row == len(NAMES) - 1:
            ax.set_xlabel(f"t = {step}", fontsize=8)
fig.suptitle(f"one '{labels[3]}' under each schedule (columns: equal t)", fontsize=10)
plt.tight_layout()
plt.show()""",
    ),
    (
        "md",
        r"""## 3. Fewer steps: respacing

Samplers that take $S < T$ steps use `dj.respace(schedule, timesteps)`, which keeps $\bar\alpha$
exactly at the chosen steps and recomputes $\beta$ between them, so the respaced chain has the
same marginals $q(x_t \mid x_0)$ at the kept steps. `make_sampler(..., num_steps=S)` does this for
you; the plot shows the kept $\bar\alpha_t$ of the linear schedule for $S = 10$.""",
    ),
    (
        "code",
        """\
linear = schedules["linear"]
kept = dj.space_timesteps(T, 10)
short = dj.respace(linear, kept)
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(t, np.asarray(linear.alphas_cumprod), label="linear, T = 1000")
ax.plot(np.asarray(short.model_timesteps), np.asarray(short.alphas_cumprod), "o", label="respaced to 10 steps")
ax.set_xlabel("t (0-based)")
ax.set_title(r"$\\bar\\alpha_t$")
ax.legend()
plt.show()
print("kept steps:", list(np.asarray(short.model_timesteps)), "new betas:", np.asarray(short.betas).round(3))""",
    ),
]

# --------------------------------------------------------------------------------------------------
PROCESSES = [
    (
        "md",
        f"""\
# Three processes side by side: DDPM, flow matching and EDM

{badge("processes")}

Diffusion models differ first in how they add noise. Here the same network is trained three ways,
each with its own objective and sampled with its own sampler: DDPM (a variance-preserving process,
Ho et al. 2020), flow matching / rectified flow (Lipman et al. 2022, Liu et al. 2022) and EDM
(Karras et al. 2022). First on the 2-D Datasaurus dino, where a distance to held-out points scores
each model, then on the 8x8 digits through the trainer and the `configs/digits*.py` configs.

{SWITCH_DOC}""",
    ),
    ("code", INSTALL),
    (
        "code",
        setup(
            "from diffusion_jax import data\n"
            "from diffusion_jax.evaluation import distances\n"
            "from diffusion_jax.processes import sample_training_times\n"
        ),
    ),
    ("code", SHOW),
    (
        "md",
        r"""## 1. Three ways to add noise

All three write $x_t = \alpha_t x_0 + \sigma_t \epsilon$, $\epsilon \sim \mathcal{N}(0, I)$, on
$t \in [0, 1]$ with $t = 1$ the noisiest, and differ in $\alpha_t, \sigma_t$, in what the network
predicts, in how training draws $t$ and in the sampler:

| | $\alpha_t$ | $\sigma_t$ | network predicts | training draws | sampler |
| --- | --- | --- | --- | --- | --- |
| DDPM (VP) | $\sqrt{\bar\alpha_t}$ | $\sqrt{1 - \bar\alpha_t}$ | $\epsilon$ | one of $T = 1000$ steps, uniformly | ancestral (`ddpm`) or `ddim` |
| flow matching | $1 - t$ | $t$ | the velocity $\epsilon - x_0$ | $t = \mathrm{sigmoid}(n)$, $n \sim \mathcal{N}(0, 1)$ | `euler` |
| EDM | $1$ | $\sigma(t)$, 0.002 to 80 | $F$ in $\hat x_0 = c_\text{skip} x_t + c_\text{out} F(c_\text{in} x_t)$ | $\ln \sigma \sim \mathcal{N}(-1.2, 1.2^2)$ | `heun` |

VP keeps $\alpha_t^2 + \sigma_t^2 = 1$ ($\bar\alpha_t$ from DDPM's linear betas); flow interpolates
on a straight line from data to noise; EDM only adds noise, up to $\sigma = 80$, and rescales the
network's input and output by $\sigma$ and the data's standard deviation $\sigma_\text{data}$. What
the three share is the log signal-to-noise ratio $\lambda(t) = 2 \log(\alpha_t / \sigma_t)$
(`process.log_snr`): two processes at equal $\lambda$ differ only by a scale of $x_t$, so $\lambda$
is the common axis. Left: $\lambda(t)$; right: where in $\lambda$ each objective spends its training
examples.""",
    ),
    (
        "code",
        """\
processes = {
    "DDPM (VP)": dj.make_process("vp", schedule=dj.make_schedule("linear", 1000)),
    "flow matching": dj.make_process("flow"),
    "EDM": dj.make_process("edm"),  # sigma_min 0.002, sigma_max 80, rho 7, sigma_data 0.5
}
TIME_SAMPLING = {  # how each objective draws t: diffusion_loss's time_sampling, time_loc, time_scale
    "DDPM (VP)": dict(time_sampling="uniform"),
    "flow matching": dict(time_sampling="logit_normal", time_loc=0.0, time_scale=1.0),
    "EDM": dict(time_sampling="log_normal", time_loc=-1.2, time_scale=1.2),
}
t = np.linspace(0.0, 1.0, 1001)[1:-1]
fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
for name, process in processes.items():
    axes[0].plot(t, process.log_snr(t, np), label=name)
    opts = TIME_SAMPLING[name]
    draws = sample_training_times(process, jax.random.key(0), 100_000, opts["time_sampling"],
                                  opts.get("time_loc", 0.0), opts.get("time_scale", 1.0))
    axes[1].hist(np.asarray(process.log_snr(draws)), bins=100, range=(-15, 15), density=True,
                 histtype="step", label=name)
axes[0].axhline(0.0, color="gray", lw=0.5)
axes[0].set_xlabel("t")
axes[0].set_title(r"log SNR $\\lambda(t) = 2 \\log(\\alpha_t / \\sigma_t)$", fontsize=10)
axes[0].legend()
axes[1].set_xlabel(r"$\\lambda$")
axes[1].set_title(r"density of $\\lambda$ at the noise levels training draws", fontsize=10)
plt.show()""",
    ),
    (
        "md",
        r"""## 2. The dino

The data are the Datasaurus dino as in `toy_2d.ipynb`: 8000 jittered copies of its 142 points,
standardised. One network, `dj.MLPDenoiser` with Fourier features of its input (the best of
`toy_2d`'s), is trained from the same initialisation with the same optimiser, batch and number of
steps under each process's objective: `dj.diffusion_loss(process, model_fn, x0, key,
prediction=..., time_sampling=...)`. The only change for the 2-D data is EDM's $\sigma_\text{data}$,
set to the data's standard deviation (about 1, not the 0.5 of images in $[-1, 1]$), since EDM's
$c_\text{in}, c_\text{out}, c_\text{skip}$ assume it. The network sees the process's own time
value (`process.model_time`): the step index for DDPM, $1000 t$ for flow, $250 \ln \sigma$ for EDM.

Each model is sampled at equal cost: the same number of network evaluations (NFE). Heun takes two
per step but the last, so $S$ Heun steps cost $2S - 1$; the DDPM network is also sampled with DDIM,
the deterministic sampler of the same process, to separate the process from the sampler.""",
    ),
    (
        "code",
        """\
from functools import partial

import optax

points, _ = data.load_points("dino", num_points=8000, seed=0)  # the training set
reference, _ = data.load_points("dino", "test", num_points=1000, seed=0)  # held out: an independent draw
SIGMA_DATA = float(points.std())
OBJECTIVES = {  # the process and what the network predicts
    "DDPM (VP)": (processes["DDPM (VP)"], "eps"),
    "flow matching": (processes["flow matching"], "flow"),
    "EDM": (dj.make_process("edm", sigma_data=SIGMA_DATA), "edm"),
}
print(f"{len(points)} training points, std {SIGMA_DATA:.3f}")

NUM_STEPS = 1000 if FAST else 10_000
CHUNK = 1000
BATCH = 256
model = dj.MLPDenoiser(time_embedding="sinusoidal", fourier_features=16)
tx = optax.adam(optax.warmup_cosine_decay_schedule(0.0, 2e-3, 100, NUM_STEPS, 1e-4))
train_points = jnp.asarray(points)


@partial(jax.jit, static_argnames="options")
def train_chunk(params, opt_state, process, key, first_step, options):
    def step(carry, i):
        params, opt_state = carry
        batch_key, loss_key = jax.random.split(jax.random.fold_in(key, first_step + i))
        x0 = train_points[jax.random.randint(batch_key, (BATCH,), 0, len(train_points))]

        def loss_fn(p):
            model_fn = lambda x_in, model_t: model.apply({"params": p}, x_in, model_t)
            return dj.diffusion_loss(process, model_fn, x0, loss_key, **dict(options)).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), jnp.arange(CHUNK))
    return params, opt_state, losses


init_params = model.init(jax.random.key(0), train_points[:1], jnp.zeros((1,)))["params"]
trained = {}
for name, (process, prediction) in OBJECTIVES.items():
    start = time.time()
    options = tuple(dict(prediction=prediction, **TIME_SAMPLING[name]).items())  # hashable: static
    params, opt_state, losses = init_params, tx.init(init_params), []
    for first in range(0, NUM_STEPS, CHUNK):
        params, opt_state, chunk = train_chunk(params, opt_state, process, jax.random.key(1), first, options)
        losses.append(chunk)
    trained[name] = params
    last = np.concatenate(losses)[-200:].mean()  # each on its own target: not comparable across rows
    print(f"{name:14s} {NUM_STEPS} steps in {time.time() - start:.0f} s, final {prediction} loss {last:.3f}")""",
    ),
    (
        "code",
        """\
ROWS = [("DDPM (VP)", "ddpm"), ("DDPM (VP)", "ddim"), ("flow matching", "euler"), ("EDM", "heun")]
NFES = [9, 49] if FAST else [9, 19, 49]


def steps_for(sampler, nfe):
    \"\"\"Sampler steps that cost ``nfe`` network evaluations (Heun: 2 per step but the last).\"\"\"
    return (nfe + 1) // 2 if sampler == "heun" else nfe


denoise_fn = lambda p, x_in, model_t: model.apply({"params": p}, x_in, model_t)
dino_samples = {}
start = time.time()
for name, sampler in ROWS:
    process, prediction = OBJECTIVES[name]
    for nfe in NFES:
        sample = dj.make_sampler(denoise_fn, process, sampler=sampler, num_steps=steps_for(sampler, nfe),
                                 prediction=prediction, clip_denoised=False)  # points are not in [-1, 1]
        x = jax.jit(sample, static_argnums=2)(trained[name], jax.random.key(2), (1000, 2))
        dino_samples[name, sampler, nfe] = np.asarray(x)
print(f"{len(dino_samples)} sets of 1000 samples in {time.time() - start:.0f} s")


def scatter(ax, pts, title, limit=3.2):
    ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.6, color="tab:blue")
    ax.set(xlim=(-limit, limit), ylim=(-limit, limit), aspect="equal", xticks=[], yticks=[])
    ax.set_title(title, fontsize=9)


energy = {key: distances.energy_distance(x, reference) for key, x in dino_samples.items()}
fig, axes = plt.subplots(len(ROWS), len(NFES) + 1, figsize=(2.6 * (len(NFES) + 1), 2.6 * len(ROWS)))
scatter(axes[0, 0], reference, "held-out data")
for row, (name, sampler) in enumerate(ROWS):
    if row:
        axes[row, 0].set_axis_off()
    for col, nfe in enumerate(NFES, start=1):
        scatter(axes[row, col], dino_samples[name, sampler, nfe],
                f"{name}, {sampler}, {nfe} NFE\\nenergy distance {energy[name, sampler, nfe]:.4f}")
fig.suptitle("1000 samples of each model at equal network evaluations (NFE)", fontsize=11)
plt.tight_layout()
plt.show()

floor = distances.energy_distance(data.load_points("dino", num_points=1000, seed=1)[0], reference)
print("energy distance to 1000 held-out points (and the number of samples with |x| > 4)")
print(f"{'process, sampler':26s}" + "".join(f"{str(nfe) + ' NFE':>16s}" for nfe in NFES))
for name, sampler in ROWS:
    cells = [f"{energy[name, sampler, nfe]:.4f} ({int(np.sum(np.abs(dino_samples[name, sampler, nfe]).max(1) > 4)):3d})"
             for nfe in NFES]
    print(f"{name + ', ' + sampler:26s}" + "".join(f"{c:>16s}" for c in cells))
print(f"{'floor (data vs data)':26s}{floor:16.4f}")""",
    ),
    (
        "md",
        r"""Read the table against the floor, the score of two independent draws of the data: it shows how far
from 0 the estimate lands by chance, so differences of that size are noise. In a full run (10,000
steps each, `FAST` off) the energy distances at 9 / 19 / 49 NFE were 0.048 / 0.014 / 0.0038 for
DDPM sampled ancestrally, 0.029 / 0.010 / 0.0052 for the same network with DDIM, 0.014 / 0.0083 /
0.0064 for flow with Euler and 0.27 / 0.017 / 0.0052 for EDM with Heun, against a floor of 0.0045.
At 49 NFE all four are within 0.002 of the floor. At 9 NFE they separate: flow with Euler is best
(rectified flow is built so that its sampling paths are close to straight, where Euler's error is
small), and EDM fails: its 5 Heun levels are $\sigma$ = 80, 17.5, 2.5, 0.17 and 0.002, so one
step goes from $\sigma = 2.5$, more than the data's standard deviation of 1, to $\sigma = 0.17$.
With `FAST` on every model is undertrained and the scatter plots are rough.

## 3. The digits

The same comparison on images, through the trainer: `configs/digits.py` (DDPM, $\epsilon$, 1000
steps), `configs/digits_flow.py` (flow, velocity, logit-normal $t$) and `configs/digits_edm.py`
(EDM, $F$, log-normal $\sigma$, $\sigma_\text{data} = 0.5$) are one config with the noise process
and objective changed: the same class-conditional U-Net, data, optimiser, batch and steps.
`checkpoints.load_sampler(workdir, sampler=..., num_steps=...)` then loads each run's EMA weights
with a sampler of our choice; all three are deterministic ODE samplers here (DDIM for DDPM), at
equal NFE, started from the same noise (times $\sigma_\text{max} = 80$ for EDM). In $x_t / \alpha_t$
against $\sigma_t / \alpha_t$ the three samplers integrate the same probability-flow ODE, whatever
the process (Song et al. 2021, DDIM sec. 4.3), so networks that had learned the data exactly would
turn the same noise into nearly the same digit in every row; where the rows differ, the networks or
the step sizes do. With `FAST` the U-Net is cut to one resolution level with three residual blocks
and trained for 100 steps, which shows the machinery, not the quality; without it the full-size
DDPM run is the quickstart's, reused when `quickstart.ipynb` ran in this runtime.""",
    ),
    (
        "code",
        """\
import importlib
import warnings

from diffusion_jax import checkpoints, trainer

with warnings.catch_warnings():  # without ipywidgets tqdm warns, then draws a text bar
    warnings.simplefilter("ignore")
    from tqdm.auto import tqdm

CONFIGS = {"DDPM (VP)": "digits", "flow matching": "digits_flow", "EDM": "digits_edm"}
SAMPLERS = {"DDPM (VP)": "ddim", "flow matching": "euler", "EDM": "heun"}


def digits_config(module):
    config = importlib.import_module(f"configs.{module}").get_config()
    if FAST:  # a one-level U-Net with three residual blocks, to cut the compile time
        config.model.attn_resolutions = ()
        config.model.ch_mult = (1,)
        config.model.num_res_blocks = 0
        config.train.num_steps = 100
        config.train.batch_size = 32
        config.data.num_threads = 0  # no background reader on a 2-core machine
        config.optim.warmup_steps = 10
        config.sample.num_samples = 0
    # Otherwise each is 1500 steps of batch 64: ~5 minutes on 2 CPU cores, under one on a GPU.
    config.checkpoint.every_steps = config.train.num_steps
    config.sample.every_steps = 0
    return config


workdirs = {}
for name, module in CONFIGS.items():
    config = digits_config(module)
    workdirs[name] = os.path.join(ROOT, module + ("_small" if FAST else ""))  # "digits": the quickstart's run
    bar = tqdm(total=config.train.num_steps, desc=name)
    start = time.time()
    state = trainer.train_and_evaluate(config, workdirs[name], hooks=[lambda step, bar=bar: bar.update(step - bar.n)])
    bar.update(int(state.step) - bar.n)  # a finished run found in its workdir resumes at its last step
    bar.close()
    print(f"{name}: step {int(state.step)} in {time.time() - start:.0f} s, in {workdirs[name]}")""",
    ),
    (
        "code",
        """\
DIGIT_NFES = [19] if FAST else [9, 19, 35]
y = jnp.tile(jnp.arange(10), 2)  # classes 0 to 9, twice
fig, axes = plt.subplots(len(CONFIGS), len(DIGIT_NFES), figsize=(5.2 * len(DIGIT_NFES), 1.5 * len(CONFIGS)), squeeze=False)
for row, (name, sampler) in enumerate(SAMPLERS.items()):
    for col, nfe in enumerate(DIGIT_NFES):
        run = checkpoints.load_sampler(workdirs[name], sampler=sampler, num_steps=steps_for(sampler, nfe))
        x = jax.jit(run.sample, static_argnums=2)(run.params, jax.random.key(3), (len(y), *run.data_shape), y=y)
        show(x, columns=10, ax=axes[row, col], title=f"{name}, {sampler}, {nfe} NFE")
fig.suptitle("class-conditional samples (classes 0 to 9 in each row), same noise in every panel", fontsize=10)
plt.tight_layout()
plt.show()""",
    ),
    (
        "md",
        """From a shell, `python train.py --config configs/digits_flow.py --workdir /tmp/diffusion_digits_flow`
(or `configs/digits_edm.py`) trains the full-size runs; `sampling_tour.ipynb` compares samplers on
one process, and `toy_2d.ipynb` the network and the noise schedule on the dino.""",
    ),
]

# --------------------------------------------------------------------------------------------------
BACKBONES = [
    (
        "md",
        f"""\
# A diffusion transformer, self-conditioning and latent diffusion

{badge("backbones")}

The quickstart trains the DDPM U-Net on pixels. Since 2023 most image models are **diffusion
transformers** (DiT, Peebles & Xie 2023) and run in the **latent space of an autoencoder** (latent
diffusion, Rombach et al. 2022). This notebook trains, on the 8x8 digits:

1. a DiT in place of the U-Net (`configs/digits_dit.py`), here with **self-conditioning** (Chen et
   al. 2022): the network also sees its previous estimate of $x_0$;
2. the library's KL autoencoder (`configs/digits_autoencoder.py`), then a diffusion model of its
   latents (`configs/digits_latent.py`), sampled in latent space and decoded.

Each is one `train.py` run from a shell; here the same function, `trainers.train(config, workdir)`.

{SWITCH_DOC}""",
    ),
    ("code", INSTALL),
    ("code", setup("from diffusion_jax import checkpoints, trainers\n")),
    ("code", SHOW),
    (
        "md",
        r"""## 1. DiT with self-conditioning

The DiT cuts the image into $p \times p$ patches (here $p = 2$: 16 tokens for an 8x8 digit), adds
2-D sin-cos positions and runs transformer blocks whose LayerNorms are modulated by the timestep
and class embedding (adaLN-Zero: each block starts as the identity). `model.self_condition = True`
gives the network a second input, its previous $\hat x_0$: in training, half of the examples get
the estimate of a first pass without gradient (the others zeros); in sampling, each step passes its
$\hat x_0$ to the next. Every key of the U-Net config (process, objective, sampler, guidance)
applies unchanged.""",
    ),
    (
        "code",
        """\
from configs import digits_dit

config = digits_dit.get_config()  # DiT: patch 2, width 128, 4 blocks of 4 heads
config.model.self_condition = True
if FAST:
    config.train.num_steps, config.train.batch_size = 60, 32
    config.data.num_threads = 0
    config.optim.warmup_steps = 10
config.checkpoint.every_steps = config.train.num_steps
config.sample.num_samples = 0  # we sample below
start = time.time()
trainers.train(config, os.path.join(ROOT, "digits_dit_selfcond"))
print(f"trained in {time.time() - start:.0f} s")

run = checkpoints.load_sampler(os.path.join(ROOT, "digits_dit_selfcond"), sampler="ddim", num_steps=20 if FAST else 50)
y = jnp.tile(jnp.arange(10), 4)
x = jax.jit(run.sample, static_argnums=2)(run.params, jax.random.key(0), (len(y), *run.data_shape), y=y)
print(run.config.model.name, "self-conditioned:", run.config.model.self_condition)
show(x, columns=10, title="DiT with self-conditioning, DDIM", scale=1.2)
plt.show()""",
    ),
    (
        "md",
        r"""## 2. The autoencoder of latent diffusion

`AutoencoderKL` maps an 8x8 digit to a 4x4x2 latent (half as many numbers) and back. It is trained
to reconstruct (an L1 loss) while a small KL term keeps its posterior $q(z \mid x)$ near
$\mathcal{N}(0, I)$. At the end the trainer measures the **scale factor**, $1/\mathrm{std}$ of the
latents of the training images, as Stable Diffusion's 0.18215 was measured, so that the diffusion
model sees latents of unit variance; it is written to `latent_stats.json` in the workdir.""",
    ),
    (
        "code",
        """\
import json

from configs import digits_autoencoder
from diffusion_jax import data, latent

AE_WORKDIR = os.path.join(ROOT, "digits_autoencoder")
ae_config = digits_autoencoder.get_config()
if FAST:
    ae_config.train.num_steps, ae_config.train.batch_size = 150, 32
    ae_config.data.num_threads = 0
ae_config.checkpoint.every_steps = ae_config.train.num_steps
start = time.time()
trainers.train(ae_config, AE_WORKDIR)
print(f"trained in {time.time() - start:.0f} s")
print(json.dumps(latent.read_latent_stats(AE_WORKDIR), indent=1))

ae = checkpoints.load_autoencoder(AE_WORKDIR)
model = dj.AutoencoderKL(**ae.kwargs)
images, _ = data.load_digits("test")
x = jnp.asarray(images[:20])
mean, logvar = model.apply({"params": ae.params}, x, method=model.encode)
recon = model.apply({"params": ae.params}, mean, method=model.decode)
print("latents:", mean.shape, "reconstruction MSE:", float(jnp.mean((recon - x) ** 2)))
show(jnp.concatenate([x, jnp.clip(recon, -1, 1)]), columns=20, title="held-out digits (top) and their reconstructions", scale=1.2)
plt.show()""",
    ),
    (
        "md",
        r"""## 3. Diffusion in latent space

`configs/digits_latent.py` is the digits model with a `latent` section naming the autoencoder's
workdir. Each training batch is encoded inside the jitted step by the frozen autoencoder (a
posterior sample, times the scale factor), so the U-Net learns 4x4x2 latents. The sampler runs in
latent space and decodes at the end: `sample(params, rng, shape)` takes the *image* shape and
returns images, with `params = {"diffusion": ..., "autoencoder": ...}`, so `sample.py`,
`evaluate.py` and the code below treat it like any run.""",
    ),
    (
        "code",
        """\
from configs import digits_latent

config = digits_latent.get_config()
config.latent.autoencoder_workdir = AE_WORKDIR
if FAST:
    config.train.num_steps, config.train.batch_size = 80, 32
    config.data.num_threads = 0
    config.optim.warmup_steps = 10
config.checkpoint.every_steps = config.train.num_steps
config.sample.num_samples = 0
LATENT_WORKDIR = os.path.join(ROOT, "digits_latent")
start = time.time()
trainers.train(config, LATENT_WORKDIR)
print(f"trained in {time.time() - start:.0f} s")

run = checkpoints.load_sampler(LATENT_WORKDIR, sampler="ddim", num_steps=20 if FAST else 50)
print("params:", sorted(run.params), "| image shape:", run.data_shape,
      "| scale factor:", round(run.config.latent.scale_factor, 4))
y = jnp.tile(jnp.arange(10), 4)
x = jax.jit(run.sample, static_argnums=2)(run.params, jax.random.key(0), (len(y), *run.data_shape), y=y)
show(x, columns=10, title="latent diffusion: DDIM in latent space, decoded", scale=1.2)
plt.show()""",
    ),
    (
        "md",
        """At 8x8 the autoencoder's reconstruction error costs more than the smaller input saves (see
`benchmarks/latent_vs_pixel.py`); latent diffusion pays off at larger images, e.g.
`configs/cifar10_autoencoder.py` then `configs/cifar10_latent.py` on an accelerator. From a shell:

    python train.py --config configs/digits_autoencoder.py --workdir /tmp/digits_autoencoder
    python train.py --config configs/digits_latent.py --workdir /tmp/digits_latent
    python sample.py --workdir /tmp/digits_latent""",
    ),
]

NOTEBOOKS = {
    "quickstart": QUICKSTART,
    "toy_2d": TOY_2D,
    "sampling_tour": SAMPLING_TOUR,
    "schedules": SCHEDULES,
    "processes": PROCESSES,
    "backbones": BACKBONES,
}


def build(name: str, cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
        "colab": {"name": f"{name}.ipynb", "provenance": []},
    }
    for i, (kind, source) in enumerate(cells):
        make = nbformat.v4.new_markdown_cell if kind == "md" else nbformat.v4.new_code_cell
        cell = make(source)
        cell.id = f"{name}-{i:02d}"  # stable ids: rebuilding changes nothing
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 on a difference")
    args = parser.parse_args()
    stale = []
    for name, cells in NOTEBOOKS.items():
        path = HERE / f"{name}.ipynb"
        text = nbformat.writes(build(name, cells)) + "\n"
        if path.exists() and path.read_text() == text:
            continue
        stale.append(path.name)
        if not args.check:
            path.write_text(text)
    if args.check and stale:
        print("out of date (run python colab/build_notebooks.py):", ", ".join(stale))
        return 1
    print(("would rewrite: " if args.check else "wrote: ") + (", ".join(stale) or "nothing"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
