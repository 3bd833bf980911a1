r"""Post-hoc EMA: the power-function averages of Karras et al. 2024, "Analyzing and Improving the
Training Dynamics of Diffusion Models" (EDM2), Section 3 and Appendix C.

A power-function EMA with exponent gamma averages the training trajectory theta(tau) with the
profile (Eq. 121)

    p_{t,gamma}(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)   on 0 < tau <= t,

whose relative width is sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))) (Eq. 123).
Training tracks it with theta_hat <- beta theta_hat + (1 - beta) theta, beta = (1 - 1/t)^(gamma + 1)
after update t = 1, 2, ... (Eq. 127); ``t`` counts optimiser updates from 1, as EDM2 counts
images after each update (its ``cur_nimg`` / ``batch_size``). The first update has beta = 0, so the
starting value never matters. In discrete time this average is *exactly* the continuous one of
the piecewise-constant path theta(tau) = theta_ceil(tau): unrolling the recursion gives update tau
the weight (tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1), the integral of p_{t,gamma} over
(tau - 1, tau] (:func:`power_ema_weights`). So Appendix C's closed-form inner products apply to the
discrete averages without approximation.

After training, snapshots of a few profiles (EDM2: sigma_rel 0.05 and 0.10) at many steps t_i are
combined, sum_i x_i theta_hat_i, to approximate the average of any other sigma_rel at a snapshot's
step: x solves the least-squares problem min || sum_i x_i p_i - p_r ||_2 over profiles, A x = b with
A_ij = <p_i, p_j> and b_i = <p_i, p_r> (Eq. 151, Algorithm 3), then is normalised to sum to 1 as
EDM2 does. What that guarantees: the reconstruction equals the requested average exactly (up to
rounding in the solve) when the requested profile is one of the snapshots', and otherwise differs
from it by the integral of the profile residual r = sum_i x_i p_i - p_r against the trajectory,
so by at most ||r||_2 times the L2 norm of theta minus any constant over the updates (Cauchy-Schwarz,
as r integrates to 0); :func:`solve_coefficients` reports ||r|| / ||p_r||.

Training keeps the profiles of ``ema.posthoc_sigma_rels`` and saves them every
``ema.posthoc_every_steps`` batches (and at the end) under ``<workdir>/posthoc_ema/``;
:func:`reconstruct` and the command below make a new EMA from them::

    python -m diffusion_jax.posthoc_ema --workdir W --sigma_rel 0.08 --output_workdir OUT [--step S]

which writes a workdir that ``sample.py``, ``evaluate.py`` and ``checkpoints.load_sampler`` read.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.typing import ArrayLike

# Where the trainer saves the snapshots: <workdir>/posthoc_ema/checkpoints/<step>/, every one kept.
SNAPSHOT_DIR = "posthoc_ema"
# The widest power-function profile: gamma = 0, the uniform average over [0, t] (sigma_rel^2 = 1/12).
MAX_SIGMA_REL = math.sqrt(1.0 / 12.0)
RECORD_FILE = "posthoc_ema.json"  # what an output workdir was reconstructed from

Params = Any


# ------------------------------------------------------------------------------------------------
# The profiles (float64 numpy).


def gamma_to_sigma_rel(gamma: ArrayLike) -> np.ndarray:
    """sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))) of the profile with exponent
    ``gamma`` >= 0 (EDM2 Eq. 123): its standard deviation relative to its length t."""
    gamma = np.asarray(gamma, np.float64)
    if np.any(gamma < 0):
        raise ValueError(f"gamma={gamma} must be >= 0 (gamma = 0 is the uniform average).")
    return np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: ArrayLike) -> np.ndarray:
    """The exponent gamma >= 0 of the profile of relative width ``sigma_rel`` in (0, 1/sqrt(12)]:
    the largest real root of gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2) = 0, s =
    sigma_rel (EDM2 Eq. 126, Algorithm 2). sigma_rel 0.05 -> 16.97, 0.10 -> 6.94."""
    s = np.asarray(sigma_rel, np.float64)
    if np.any(~(s > 0)) or np.any(s > MAX_SIGMA_REL * (1 + 1e-12)):
        raise ValueError(
            f"sigma_rel={sigma_rel} must lie in (0, {MAX_SIGMA_REL:.4f}]: 1/sqrt(12) is the widest "
            "power-function profile (gamma = 0, the uniform average of the whole run)."
        )
    inv = s.reshape(-1) ** -2.0
    roots = [np.roots([1.0, 7.0, 16.0 - v, 12.0 - v]) for v in inv]
    gamma = np.array([r[np.abs(r.imag) < 1e-9].real.max() for r in roots])
    return np.maximum(gamma, 0.0).reshape(s.shape)


def power_ema_step_size(gamma: ArrayLike, num_updates: ArrayLike) -> jax.Array:
    """1 - beta, beta = (1 - 1/t)^(gamma + 1) at update t = ``num_updates`` >= 1 (EDM2 Eq. 127), as
    -expm1((gamma + 1) log1p(-1/t)) in float32: accurate where 1 - 1/t is not (t beyond ~10^4)."""
    t = jnp.maximum(jnp.asarray(num_updates, jnp.float32), 1.0)
    return -jnp.expm1((jnp.asarray(gamma, jnp.float32) + 1.0) * jnp.log1p(-1.0 / t))


def power_ema_weights(num_updates: int, gamma: float) -> np.ndarray:
    """Weights [t] of the parameters after updates 1..t in the power-function EMA after update
    t = ``num_updates``: (tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1), which is
    integral_{tau-1}^{tau} p_{t,gamma}. They sum to 1."""
    tau = np.arange(num_updates + 1, dtype=np.float64) / num_updates
    return np.diff(tau ** (np.float64(gamma) + 1.0))


def profile_inner_products(
    t_a: ArrayLike, gamma_a: ArrayLike, t_b: ArrayLike, gamma_b: ArrayLike
) -> np.ndarray:
    """<p_{t_a,gamma_a}, p_{t_b,gamma_b}> = integral of the product of two profiles (EDM2 Eq. 151):
    (gamma_a + 1)(gamma_b + 1) (t_min / t_max)^gamma_long / ((gamma_a + gamma_b + 1) t_max), where
    gamma_long is the exponent of the longer profile. Arguments broadcast; float64."""
    t_a, t_b = np.asarray(t_a, np.float64), np.asarray(t_b, np.float64)
    gamma_a, gamma_b = np.asarray(gamma_a, np.float64), np.asarray(gamma_b, np.float64)
    t_max = np.maximum(t_a, t_b)
    exponent = np.where(t_a < t_b, gamma_b, gamma_a)
    ratio = np.minimum(t_a, t_b) / t_max
    return (gamma_a + 1) * (gamma_b + 1) * ratio**exponent / ((gamma_a + gamma_b + 1) * t_max)


def solve_coefficients(
    t_in: ArrayLike, gamma_in: ArrayLike, t_out: float, gamma_out: float
) -> tuple[np.ndarray, float]:
    """(x [n], relative error): the coefficients of n snapshot profiles (updates ``t_in`` [n],
    exponents ``gamma_in`` [n]) whose combination sum_i x_i p_i best approximates p_{t_out,
    gamma_out} in L2 (EDM2 Algorithm 3), normalised to sum to 1; and ||sum_i x_i p_i - p_out|| /
    ||p_out|| of the normalised x, from the same closed-form inner products. float64."""
    t_in, gamma_in = np.broadcast_arrays(np.asarray(t_in, np.float64), gamma_in)
    t_in, gamma_in = t_in.reshape(-1), np.asarray(gamma_in, np.float64).reshape(-1)
    if t_in.size == 0 or np.any(t_in <= 0) or not t_out > 0:
        raise ValueError(f"need snapshots with t > 0 and t_out > 0; got t_in={t_in}, t_out={t_out}")
    a = profile_inner_products(t_in[:, None], gamma_in[:, None], t_in[None, :], gamma_in[None, :])
    b = profile_inner_products(t_in, gamma_in, t_out, gamma_out)
    x = np.linalg.solve(a, b)
    x = x / np.sum(x)
    target = float(profile_inner_products(t_out, gamma_out, t_out, gamma_out))
    residual = max(float(x @ a @ x - 2 * x @ b + target), 0.0)
    return x, math.sqrt(residual / target)


def combine(trees: Iterable[Params], coefficients: ArrayLike) -> Params:
    """sum_i coefficients[i] * trees[i], accumulated in float64 numpy and returned in the dtypes of
    the first tree's leaves. ``trees`` (host or device arrays, one structure) may be a generator,
    so that only one is in memory at a time."""
    coefficients = np.asarray(coefficients, np.float64).reshape(-1)
    total, dtypes = None, None
    for c, tree in zip(coefficients, trees, strict=True):
        tree = jax.tree.map(np.asarray, tree)
        if total is None:
            total = jax.tree.map(lambda a: np.zeros(a.shape, np.float64), tree)
            dtypes = jax.tree.map(lambda a: a.dtype, tree)
        total = jax.tree.map(lambda s, a, c=c: s + c * a.astype(np.float64), total, tree)
    if total is None:
        raise ValueError("combine needs at least one tree")
    return jax.tree.map(lambda s, d: s.astype(d), total, dtypes)


# ------------------------------------------------------------------------------------------------
# Snapshots of a run, and the reconstruction.


def snapshot_manager(workdir: epath.PathLike, *, async_save: bool = True) -> Any:
    """The Orbax manager of ``<workdir>/posthoc_ema/checkpoints/``: it keeps every snapshot (each
    with its checksums, as the run's checkpoints). The trainer saves the tuple of averages of
    ``ema.posthoc_sigma_rels`` there with :func:`checkpoints.save`, one step per snapshot. Its
    multi-process barriers have their own names: the run's manager saves at the same steps."""
    from diffusion_jax import checkpoints

    return checkpoints.make_manager(
        epath.Path(workdir) / SNAPSHOT_DIR, keep=None, async_save=async_save,
        barrier_prefix=SNAPSHOT_DIR,
    )  # fmt: skip


def snapshot_steps(workdir: epath.PathLike) -> list[int]:
    """The steps (batches) of the committed snapshots of a run, oldest first."""
    import orbax.checkpoint as ocp

    from diffusion_jax import checkpoints

    directory = epath.Path(workdir) / SNAPSHOT_DIR / checkpoints.CHECKPOINT_DIR
    if not directory.exists():
        raise FileNotFoundError(
            f"no post-hoc EMA snapshots in {workdir} (no {directory}): train with "
            "ema.posthoc_sigma_rels set, e.g. (0.05, 0.10), to save them."
        )
    manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(create=False),
        item_names=("state", "config"),
    )
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


class Reconstruction(NamedTuple):
    """A reconstructed EMA: ``params`` (host arrays), the run's ``config`` and ``data_shape``, the
    ``step`` (batches) it is the average at, its ``sigma_rel`` and ``gamma``, the ``coefficients``
    as (snapshot step, snapshot sigma_rel, x) rows, and the profile's ``relative_error``
    ||sum_i x_i p_i - p|| / ||p||."""

    params: Params
    config: Any
    data_shape: tuple[int, ...]
    step: int
    sigma_rel: float
    gamma: float
    coefficients: list[tuple[int, float, float]]
    relative_error: float


def reconstruct(
    workdir: epath.PathLike, sigma_rel: float, step: int | None = None
) -> Reconstruction:
    """The power-function EMA of relative width ``sigma_rel`` at snapshot ``step`` (default: the
    newest) of the run in ``workdir``, from all its post-hoc EMA snapshots at steps <= ``step``
    (EDM2's ``reconstruct_phema.py``). Each snapshot is checked against its checksums before it is
    read, and read once; the sum is accumulated in float64 on the host."""
    from diffusion_jax import checkpoints, config_utils

    workdir = epath.Path(workdir)
    gamma = float(sigma_rel_to_gamma(sigma_rel))
    steps = snapshot_steps(workdir)
    if step is None and steps:
        step = steps[-1]
    if step not in steps:
        raise ValueError(
            f"no post-hoc EMA snapshot at step {step} in {workdir}; a reconstruction is made at a "
            f"snapshot's step, one of {steps}."
        )
    directory = workdir / SNAPSHOT_DIR / checkpoints.CHECKPOINT_DIR

    snapshots = []  # (step, optimiser updates, sigma_rels) of the snapshots used
    for s in steps[: steps.index(step) + 1]:
        run = checkpoints.read_checkpoint(directory / str(s), s, lambda run: run, ("config",))
        config = config_utils.parse_config(run["config"])
        t = s // config.optim.grad_accum_steps  # the profiles' time counts optimiser updates
        if t > 0:
            snapshots.append((s, t, config.ema.posthoc_sigma_rels))
    if not snapshots or snapshots[-1][0] != step:
        raise ValueError(f"snapshot {step} of {workdir} was saved before the first update")
    data_shape = tuple(run["data_shape"])  # config and run: the record of `step`, read last
    rows = [(s, t, sr) for s, t, sigma_rels in snapshots for sr in sigma_rels]
    x, error = solve_coefficients(
        [t for _, t, _ in rows], sigma_rel_to_gamma([sr for _, _, sr in rows]), snapshots[-1][1],
        gamma,
    )  # fmt: skip

    model = config_utils.build_model(config)
    abstract = jax.eval_shape(
        lambda: config_utils.init_params(model, config, data_shape, jax.random.key(0))
    )

    def averages() -> Iterator[Params]:
        for s, _, sigma_rels in snapshots:
            step_dir = directory / str(s)
            read = functools.partial(_restore_averages, step_dir, abstract, len(sigma_rels))
            yield from checkpoints.read_checkpoint(step_dir, s, read, ("state",))

    params = combine(averages(), x)
    coefficients = [(s, float(sr), float(c)) for (s, _, sr), c in zip(rows, x, strict=True)]
    return Reconstruction(
        params, config, data_shape, step, float(sigma_rel), gamma, coefficients, error
    )


def _restore_averages(
    step_dir: epath.Path, abstract: Any, num: int, run: dict[str, Any]
) -> tuple[Params, ...]:
    """The ``num`` averages saved in a snapshot, as host numpy arrays (whatever mesh wrote them);
    ``run``, its record, is what :func:`checkpoints.read_checkpoint` passes (not needed here)."""
    del run
    import orbax.checkpoint as ocp

    target = tuple(abstract for _ in range(num))
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    with ocp.PyTreeCheckpointer() as ckptr:
        restored = ckptr.restore(
            step_dir / "state", args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args)
        )
    return tuple(restored)


def write_reconstruction(
    workdir: epath.PathLike,
    sigma_rel: float,
    output_workdir: epath.PathLike,
    step: int | None = None,
) -> Reconstruction:
    """:func:`reconstruct`, written to ``output_workdir`` as checkpoint ``step`` of the run's config
    (post-hoc EMA off) by :func:`trainer.write_run`, with the reconstructed average as both params
    and EMA params, so that ``sample.py``, ``evaluate.py`` and ``checkpoints.load_sampler`` read it;
    ``posthoc_ema.json`` there records what it was made from."""
    import dataclasses

    from diffusion_jax import trainer

    rec = reconstruct(workdir, sigma_rel, step)
    config = dataclasses.replace(
        rec.config, ema=dataclasses.replace(rec.config.ema, posthoc_sigma_rels=())
    )
    trainer.write_run(
        output_workdir, config, rec.params, rec.data_shape, step=rec.step, ema_params=rec.params
    )
    if jax.process_index() == 0:
        record = {
            "source_workdir": str(workdir),
            "step": rec.step,
            "sigma_rel": rec.sigma_rel,
            "gamma": rec.gamma,
            "relative_error": rec.relative_error,
            "coefficients": [
                {"step": s, "sigma_rel": sr, "coefficient": c} for s, sr, c in rec.coefficients
            ],
        }
        (epath.Path(output_workdir) / RECORD_FILE).write_text(json.dumps(record, indent=1))
    return rec


def format_reconstruction(rec: Reconstruction) -> str:
    """A table of the coefficients and the profile's relative error, for printing."""
    lines = [
        f"sigma_rel {rec.sigma_rel:.4f} (gamma {rec.gamma:.3f}) at step {rec.step}, from "
        f"{len(rec.coefficients)} snapshot averages:",
        f"  {'step':>10} {'sigma_rel':>10} {'coefficient':>14}",
    ]
    lines += [f"  {s:>10d} {sr:>10.4f} {c:>14.6g}" for s, sr, c in rec.coefficients]
    lines.append(
        f"relative L2 error of the reconstructed profile ||sum x_i p_i - p|| / ||p||: "
        f"{rec.relative_error:.3e}"
    )
    return "\n".join(lines)


def _main() -> None:
    from absl import app, flags

    from diffusion_jax import cli_logging

    flags.DEFINE_string("workdir", None, "Training workdir with posthoc_ema/ snapshots (or gs://).")
    flags.DEFINE_float(
        "sigma_rel", None, "Relative width of the EMA to reconstruct, in (0, 0.2887]."
    )
    flags.DEFINE_string("output_workdir", None, "Where to write the reconstructed checkpoint.")
    flags.DEFINE_integer("step", None, "Snapshot step to reconstruct at (default: the newest).")
    flags.mark_flags_as_required(["workdir", "sigma_rel", "output_workdir"])
    FLAGS = flags.FLAGS

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
        cli_logging.quiet_orbax()
        rec = write_reconstruction(FLAGS.workdir, FLAGS.sigma_rel, FLAGS.output_workdir, FLAGS.step)
        print(format_reconstruction(rec))
        print(f"Wrote {FLAGS.output_workdir} (checkpoint {rec.step}; sample.py --workdir reads it)")

    app.run(main)


if __name__ == "__main__":
    _main()
