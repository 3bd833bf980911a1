r"""Weights of diffusers' ``UNet2DModel`` <-> a workdir of this library's :class:`~diffusion_jax.models.UNet`.

    python -m diffusion_jax.convert --from_diffusers ddpm-cifar10-32 --workdir /tmp/ddpm_cifar10 \
        [--config configs/cifar10.py]
    python -m diffusion_jax.convert --workdir /tmp/ddpm_cifar10 --to_diffusers /tmp/exported

A diffusers directory holds ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or ``.bin``,
or sharded with an ``.index.json``), at its top or in ``unet/``, and ``scheduler_config.json`` at
its top or in ``scheduler/``. Import reads the U-Net's config and builds the matching
``model`` section (or raises :class:`UnsupportedDiffusersModel` naming every option this U-Net
cannot express), the scheduler's settings into ``diffusion`` (beta schedule, T, prediction type) and
``sample`` (clipping, reverse variance, timestep spacing, sampler), maps every tensor by one name
table (:func:`diffusers_name`; conv kernels OIHW -> HWIO, linear weights transposed), and writes
the run with :func:`diffusion_jax.trainer.write_run` (EMA = the converted weights): ``sample.py``,
``evaluate.py``, :func:`diffusion_jax.generate.make_guided_sampler` and ``train.py`` read it like
any trained run. ``--config`` supplies the sections a diffusers directory does not describe (data,
optimiser, EMA, training, checkpoints); without it the data section records only the image shape
(``source="arrays"`` with no path: set the data for ``evaluate.py`` or further training).

Conventions bridged: diffusers' ``flip_sin_to_cos=True`` ([cos, sin] embedding) by permuting the
rows of the first time-embedding layer; a class embedding of K rows gains our null class K as a zero
row (so ``y = None`` is the unconditional model). Export writes the pipeline layout
(``model_index.json``, ``unet/``, ``scheduler/``) that ``DDPMPipeline.from_pretrained`` loads.
Reading ``.safetensors`` needs ``safetensors`` (``pip install 'diffusion_jax[convert]'``); ``.bin``
files need ``torch``, imported only for them.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
from etils import epath

from diffusion_jax import config_utils
from diffusion_jax.models.unet import GROUPS, NORM_EPS

WEIGHTS_NAME = "diffusion_pytorch_model"
# UNet2DModel's own defaults (diffusers 0.42), for keys an older config.json leaves out.
UNET_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896),
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "num_train_timesteps": None,
}
# DDPMScheduler's defaults (DDIMScheduler shares those it has).
SCHEDULER_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "variance_type": "fixed_small",
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "prediction_type": "epsilon",
    "thresholding": False,
    "timestep_spacing": "leading",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
    "set_alpha_to_one": True,
}
# diffusers name -> ours (all but VARIANCES one-to-one, so export inverts them).
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "quadratic", "squaredcos_cap_v2": "cosine",
                  "sigmoid": "sigmoid"}  # fmt: skip
PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
SPACINGS = {"leading": "leading", "trailing": "trailing", "linspace": "uniform"}
VARIANCES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small",
             "fixed_large": "fixed_large", "fixed_large_log": "fixed_large",
             "learned_range": "learned_range"}  # fmt: skip
SAMPLERS = {"DDPMScheduler": "ddpm", "DDIMScheduler": "ddim"}
# The DDPM U-Net's conventions: GroupNorm(32, eps=1e-6); timestep_embedding's frequencies are
# exp(-ln(10000) k / (half - 1)), diffusers' freq_shift = 1.
_GROUPS, _NORM_EPS, _FREQ_SHIFT = GROUPS, NORM_EPS, 1
# Our module (within a block) -> diffusers' module.
_SUBMODULES = {"temb_proj": "time_emb_proj", "nin_shortcut": "conv_shortcut", "norm": "group_norm",
               "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}  # fmt: skip
_OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


class UnsupportedDiffusersModel(ValueError):
    """A diffusers config uses options this library's U-Net or processes cannot express."""


class DiffusersModel(NamedTuple):
    """A diffusers directory as read: the U-Net's config and the scheduler's (None when absent) as
    their JSON files give them (:data:`UNET_DEFAULTS` fill what they omit), and the weights, float32
    numpy arrays by diffusers' names."""

    unet_config: dict[str, Any]
    scheduler_config: dict[str, Any] | None
    state_dict: dict[str, np.ndarray]


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------


def _refuse(problems: list[str], what: str) -> None:
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise UnsupportedDiffusersModel(f"cannot convert this {what}:\n{lines}")


def model_from_diffusers(unet_config: Mapping[str, Any]) -> tuple[dict[str, Any], tuple[int, ...]]:
    """(our ``model`` section for :class:`UNet`, the data shape (H, W, C)) of a ``UNet2DModel``
    config; raises :class:`UnsupportedDiffusersModel` listing every option it cannot express."""
    c = {**UNET_DEFAULTS, **unet_config}
    problems = []

    def need(key: str, want: Any, why: str) -> None:
        if c[key] != want:
            default = "" if key in unet_config else ", diffusers' default"
            problems.append(f"{key}={c[key]!r}{default}: {why} (needs {want!r})")

    name = c.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        problems.append(f"_class_name={name!r}: only UNet2DModel converts")
    need("act_fn", "silu", "the DDPM U-Net uses swish (SiLU)")
    need("norm_num_groups", _GROUPS, f"GroupNorm has {_GROUPS} groups here")
    need("norm_eps", _NORM_EPS, "GroupNorm's epsilon is DDPM's here")
    if c["attn_norm_num_groups"] not in (None, _GROUPS):
        problems.append(f"attn_norm_num_groups={c['attn_norm_num_groups']!r}: needs None or 32")
    need("time_embedding_type", "positional", "only the sinusoidal embedding is implemented")
    need("freq_shift", _FREQ_SHIFT, "timestep_embedding's frequencies are "
         "exp(-ln(10000) k / (half - 1)) (DDPM's); freq_shift=0 divides by half, which no "
         "reordering of weights absorbs")  # fmt: skip
    need("center_input_sample", False, "inputs are taken in [-1, 1] as they are")
    need("mid_block_type", "UNetMidBlock2D", "the middle is ResBlock, attention, ResBlock")
    need("add_attention", True, "the middle block always has attention here")
    need("mid_block_scale_factor", 1, "blocks add their residuals unscaled here")
    need("downsample_padding", 0, "downsampling pads after only (TF 'SAME', as DDPM)")
    need("downsample_type", "conv", "downsampling is a stride-2 conv")
    need("upsample_type", "conv", "upsampling is nearest x2 then conv")
    need("class_embed_type", None, "class labels are a learned table (num_class_embeds)")
    if c["resnet_time_scale_shift"] not in ("default", "scale_shift"):
        problems.append(
            f"resnet_time_scale_shift={c['resnet_time_scale_shift']!r}: needs 'default' or "
            "'scale_shift'"
        )
    scale_shift = c["resnet_time_scale_shift"] == "scale_shift"
    if scale_shift and c["attn_norm_num_groups"] is None:
        problems.append(
            "resnet_time_scale_shift='scale_shift' with attn_norm_num_groups=None: diffusers' "
            "middle attention then has no GroupNorm, ours always has one (needs 32)"
        )
    channels = [int(ch) for ch in c["block_out_channels"]]
    ch = channels[0]
    if c["time_embedding_dim"] not in (None, 4 * ch):
        problems.append(f"time_embedding_dim={c['time_embedding_dim']!r}: needs {4 * ch} (4 x ch)")
    if any(x % ch for x in channels) or ch % _GROUPS:
        problems.append(
            f"block_out_channels={channels}: each must be a multiple of the first, and the first "
            f"of {_GROUPS}"
        )
    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    levels = len(channels)
    if len(down) != levels or len(up) != levels:
        problems.append("down_block_types, up_block_types and block_out_channels differ in length")
    for kind in set(down) - {"DownBlock2D", "AttnDownBlock2D"}:
        problems.append(f"down block type {kind!r}: only DownBlock2D and AttnDownBlock2D")
    for kind in set(up) - {"UpBlock2D", "AttnUpBlock2D"}:
        problems.append(f"up block type {kind!r}: only UpBlock2D and AttnUpBlock2D")
    attn_levels = [i for i, kind in enumerate(down) if kind == "AttnDownBlock2D"]
    up_attn_levels = [levels - 1 - j for j, kind in enumerate(up) if kind == "AttnUpBlock2D"]
    if sorted(up_attn_levels) != attn_levels:
        problems.append(
            f"attention at down levels {attn_levels} but up levels {sorted(up_attn_levels)}: "
            "attention goes by resolution here, so the up blocks must mirror the down blocks"
        )
    size = c["sample_size"]
    if isinstance(size, (list, tuple)):
        size = size[0] if len(set(size)) == 1 else None
    if not isinstance(size, int):
        problems.append(f"sample_size={c['sample_size']!r}: needs one int (square images)")
        size = 0
    in_ch, out_ch = int(c["in_channels"]), int(c["out_channels"])
    if in_ch not in (1, 3):
        problems.append(f"in_channels={in_ch}: images with 1 or 3 channels only")
    if out_ch not in (in_ch, 2 * in_ch):
        problems.append(
            f"out_channels={out_ch}: needs in_channels ({in_ch}), or twice it for learned variance"
        )
    head_dim = c["attention_head_dim"]
    if head_dim is not None:
        attn_channels = {channels[i] for i in attn_levels} | {channels[-1]}
        bad = sorted(x for x in attn_channels if x % int(head_dim))
        if bad:
            problems.append(f"attention_head_dim={head_dim} does not divide channels {bad}")
    _refuse(problems, "UNet2DModel")
    kwargs = {
        "ch": ch,
        "ch_mult": tuple(x // ch for x in channels),
        "num_res_blocks": int(c["layers_per_block"]),
        "attn_resolutions": tuple(size // 2**i for i in attn_levels),
        "dropout": float(c["dropout"]),
        "out_channels": in_ch,
        "learn_sigma": out_ch == 2 * in_ch,
        "resblock_scale_shift": scale_shift,
        "num_classes": c["num_class_embeds"],
        "resamp_with_conv": True,
    }
    if head_dim is None:  # diffusers: one head of all the channels in every block
        kwargs["num_heads"] = 1
    else:
        kwargs["num_head_channels"] = int(head_dim)
    return kwargs, (size, size, in_ch)


def diffusion_from_scheduler(
    scheduler_config: Mapping[str, Any] | None, learn_sigma: bool
) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """(our ``diffusion`` section, the ``sample`` keys, notes on sampler settings not carried) of a
    diffusers scheduler config (None: DDPMScheduler's defaults, with a note); raises
    :class:`UnsupportedDiffusersModel` for a forward process or prediction we cannot express."""
    notes = []
    if scheduler_config is None:
        notes.append("no scheduler_config.json: assumed DDPMScheduler's defaults (DDPM's)")
        scheduler_config = {}
    s = {**SCHEDULER_DEFAULTS, **scheduler_config}
    problems = []
    if s["trained_betas"] is not None:
        problems.append("trained_betas: explicit betas are not a config option here")
    if s["rescale_betas_zero_snr"]:
        problems.append("rescale_betas_zero_snr=True: a zero-SNR last step is not supported")
    if s["beta_schedule"] not in BETA_SCHEDULES:
        problems.append(
            f"beta_schedule={s['beta_schedule']!r}: needs one of {list(BETA_SCHEDULES)}"
        )
    if s["prediction_type"] not in PREDICTIONS:
        problems.append(
            f"prediction_type={s['prediction_type']!r}: needs one of {list(PREDICTIONS)}"
        )
    variance = s["variance_type"]
    if variance not in VARIANCES:
        problems.append(f"variance_type={variance!r}: needs one of {list(VARIANCES)}")
    elif VARIANCES[variance] == "learned_range" and not learn_sigma:
        problems.append(
            "variance_type='learned_range' needs a U-Net with out_channels = 2 x in_channels"
        )
    _refuse(problems, "scheduler")
    schedule = BETA_SCHEDULES[s["beta_schedule"]]
    diffusion = {
        "process": "vp",
        "discrete": True,
        "schedule": schedule,
        "num_timesteps": int(s["num_train_timesteps"]),
        "prediction": PREDICTIONS[s["prediction_type"]],
        "loss": "hybrid" if learn_sigma else "simple",
    }
    if schedule != "cosine":
        diffusion |= {"beta_start": float(s["beta_start"]), "beta_end": float(s["beta_end"])}
    sample = {"clip_denoised": bool(s["clip_sample"]), "variance": VARIANCES[variance]}
    if s["thresholding"]:
        notes.append("thresholding=True: samples clip x0_hat to [-1, 1] instead")
    if s["clip_sample"] and s["clip_sample_range"] != 1.0:
        notes.append(f"clip_sample_range={s['clip_sample_range']}: samples clip to [-1, 1]")
    spacing = s["timestep_spacing"]
    if spacing in SPACINGS and (s["steps_offset"] == 0 or spacing != "leading"):
        sample["spacing"] = SPACINGS[spacing]
    else:
        notes.append(
            f"timestep_spacing={spacing!r}, steps_offset={s['steps_offset']}: not carried "
            "(the sampler's default spacing)"
        )
    if not s["set_alpha_to_one"]:
        notes.append("set_alpha_to_one=False: DDIM's last step still lands on alpha-bar = 1")
    sampler = SAMPLERS.get(scheduler_config.get("_class_name", "DDPMScheduler"))
    if sampler is None:
        notes.append(f"{scheduler_config['_class_name']}: sampler not carried (ddpm)")
    else:
        sample["sampler"] = sampler
    return diffusion, sample, notes


def config_from_diffusers(
    unet_config: Mapping[str, Any],
    scheduler_config: Mapping[str, Any] | None,
    base_config: Any = None,
) -> tuple[config_utils.Config, tuple[int, ...], list[str]]:
    """(our checked :class:`Config`, the data shape (H, W, C), notes on settings not carried).

    ``model`` and ``diffusion`` come from the diffusers configs, as do ``sample``'s clipping,
    variance, spacing and sampler; everything else from ``base_config`` (a ConfigDict or mapping
    such as ``configs/cifar10.py``'s; default: the defaults, with the data section recording only
    the image shape), whose data must have the model's image size and channels.
    """
    model, data_shape = model_from_diffusers(unet_config)
    diffusion, sample, notes = diffusion_from_scheduler(scheduler_config, model["learn_sigma"])
    base = _plain_dict(base_config)
    base_model = base.get("model", {})
    for key in ("dtype", "remat"):  # how to compute, not what: the base's
        if key in base_model:
            model[key] = base_model[key]
    size, _, channels = data_shape
    labels = model["num_classes"] is not None
    if base_config is None:
        data = {"source": "arrays", "image_size": size, "channels": channels, "use_labels": labels}
    else:
        data = dict(base.get("data", {}))
        given = {"image_size": data.get("image_size"), "channels": data.get("channels")}
        if given != {"image_size": size, "channels": channels}:
            raise UnsupportedDiffusersModel(
                f"the base config's data has image_size={given['image_size']}, channels="
                f"{given['channels']} but the diffusers model takes {size}x{size}x{channels}: "
                "choose a config for this data (or set --config.data.image_size/channels)."
            )
        data["use_labels"] = labels
        if labels and data.get("num_classes", 0) not in (0, model["num_classes"]):
            raise UnsupportedDiffusersModel(
                f"the base config's data.num_classes={data['num_classes']} but the model has "
                f"num_class_embeds={model['num_classes']}."
            )
    values = {
        **base,
        "model": {"name": "unet", **model},
        "diffusion": diffusion,
        "data": data,
        "sample": {**base.get("sample", {}), **sample},
    }
    return config_utils.parse_config(values), data_shape, notes


def _plain_dict(config: Any) -> dict[str, Any]:
    """A ConfigDict or mapping (None: empty) as nested plain dicts."""
    if config is None:
        return {}
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    return {k: _plain_dict(v) if isinstance(v, Mapping) else v for k, v in config.items()}


def diffusers_from_config(config: config_utils.Config, data_shape: tuple[int, ...]) -> dict:
    """The ``UNet2DModel`` config.json and ``DDPMScheduler`` scheduler_config.json of a run of our
    U-Net on the discrete VP process: the inverse of :func:`config_from_diffusers`. Raises
    :class:`UnsupportedDiffusersModel` for what diffusers cannot express."""
    if config.model.name != "unet":
        _refuse([f"model.name={config.model.name!r}: only the U-Net exports"], "run for diffusers")
    d = config.diffusion
    kw = config.model.kwargs
    model = config_utils.build_model(config)
    problems = []
    if not d.is_discrete_vp:
        problems.append(
            f"diffusion.process={d.process!r}, discrete={d.discrete}: needs discrete vp"
        )
    inverse = lambda table, value: next((k for k, v in table.items() if v == value), None)
    schedule, prediction = inverse(BETA_SCHEDULES, d.schedule), inverse(PREDICTIONS, d.prediction)
    if schedule is None:
        problems.append(f"diffusion.schedule={d.schedule!r}: diffusers has no such beta_schedule")
    if prediction is None:
        problems.append(f"diffusion.prediction={d.prediction!r}: needs eps, x0 or v")
    if not model.resamp_with_conv:
        problems.append("model.resamp_with_conv=False: diffusers resamples with convolutions")
    if model.self_condition:
        problems.append("model.self_condition=True: diffusers' pipelines do not self-condition")
    size, _, in_ch = data_shape
    levels = len(model.ch_mult)
    channels = [model.ch * m for m in model.ch_mult]
    attn = [size // 2**i in model.attn_resolutions for i in range(levels)]
    attn_channels = {c for c, a in zip(channels, attn, strict=True) if a} | {channels[-1]}
    if model.num_head_channels is not None:
        head_dim = model.num_head_channels
    elif model.num_heads == 1:
        head_dim = None  # diffusers: one head per block
    elif len(attn_channels) == 1:
        head_dim = attn_channels.pop() // model.num_heads
    else:
        head_dim = None
        problems.append(
            f"model.num_heads={model.num_heads} over attention blocks of {sorted(attn_channels)} "
            "channels: diffusers has one attention_head_dim for all; use num_head_channels"
        )
    _refuse(problems, "run for diffusers")
    unet = {
        **UNET_DEFAULTS,
        "_class_name": "UNet2DModel",
        "sample_size": size,
        "in_channels": in_ch,
        "out_channels": (model.out_channels or in_ch) * (2 if model.learn_sigma else 1),
        "freq_shift": _FREQ_SHIFT,
        "flip_sin_to_cos": False,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "block_out_channels": channels,
        "layers_per_block": model.num_res_blocks,
        "downsample_padding": 0,
        "dropout": model.dropout,
        "attention_head_dim": head_dim,
        "attn_norm_num_groups": _GROUPS,
        "norm_eps": _NORM_EPS,
        "resnet_time_scale_shift": "scale_shift" if model.resblock_scale_shift else "default",
        "num_class_embeds": kw.get("num_classes"),
    }
    for key in ("down_block_types", "up_block_types", "block_out_channels"):
        unet[key] = list(unet[key])
    # diffusers splits off the variance channels only for a learned variance type.
    variance = "learned_range" if model.learn_sigma else config_utils.sample_variance(config)
    scheduler = {
        "_class_name": "DDPMScheduler",
        "num_train_timesteps": d.num_timesteps,
        "beta_schedule": schedule,
        "prediction_type": prediction,
        "clip_sample": config.sample.clip_denoised,
        "variance_type": variance,
        "timestep_spacing": inverse(SPACINGS, config.sample.spacing) or "leading",
    }
    if d.schedule != "cosine":  # None: DDPM's 1e-4 and 0.02 scaled by 1000 / T (schedules.py)
        scale = 1000.0 / d.num_timesteps
        scheduler["beta_start"] = scale * 1e-4 if d.beta_start is None else d.beta_start
        scheduler["beta_end"] = scale * 0.02 if d.beta_end is None else d.beta_end
    return {"unet": unet, "scheduler": scheduler}


# ---------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------


def diffusers_name(path: tuple[str, ...], num_levels: int) -> str:
    """The diffusers module of our module ``path`` (e.g. ("down_1_attn_0", "q") ->
    "down_blocks.1.attentions.0.to_q"): the one name table, used both ways."""
    top, rest = path[0], [_SUBMODULES.get(p, p) for p in path[1:]]
    fixed = {"temb_dense0": "time_embedding.linear_1", "temb_dense1": "time_embedding.linear_2",
             "label_emb": "class_embedding", "norm_out": "conv_norm_out", "conv_in": "conv_in",
             "conv_out": "conv_out", "mid_attn": "mid_block.attentions.0"}  # fmt: skip
    if top in fixed:
        return ".".join([fixed[top], *rest])
    if m := re.fullmatch(r"mid_res_(\d+)", top):
        return ".".join([f"mid_block.resnets.{m[1]}", *rest])
    m = re.fullmatch(r"(down|up)_(\d+)_(res|attn|downsample|upsample)(?:_(\d+))?", top)
    if m is None:
        raise ValueError(f"no diffusers name for our module {'/'.join(path)}")
    side, level, kind, index = m[1], int(m[2]), m[3], m[4]
    block = level if side == "down" else num_levels - 1 - level  # diffusers counts up blocks down
    inner = {"res": f"resnets.{index}", "attn": f"attentions.{index}"}.get(kind, f"{kind}rs.0")
    return ".".join([f"{side}_blocks.{block}.{inner}", *rest])


def _leaf_pairs(expected: Any, num_levels: int) -> list[tuple[tuple[str, ...], str, str]]:
    """(our leaf path, diffusers tensor name, kind) for every leaf of our parameter tree."""
    pairs = []
    for keys, leaf in jax.tree_util.tree_leaves_with_path(expected):
        path = tuple(k.key for k in keys)
        module, param = path[:-1], path[-1]
        prefix = diffusers_name(module, num_levels)
        if param == "embedding":
            kind, name = "embed", "weight"
        elif param in ("scale", "bias") and len(leaf.shape) == 1 and path[-2].startswith("norm"):
            kind, name = "norm", "weight" if param == "scale" else "bias"
        elif param == "bias":
            kind, name = "bias", "bias"
        elif len(leaf.shape) == 4:
            kind, name = "conv", "weight"
        elif module[-1] == "nin_shortcut":
            kind, name = "shortcut", "weight"  # diffusers: a 1x1 conv
        elif module == ("temb_dense0",):
            kind, name = "temb_in", "weight"
        else:
            kind, name = "dense", "weight"
        pairs.append((path, f"{prefix}.{name}", kind))
    return pairs


def _swap_halves(a: np.ndarray) -> np.ndarray:
    half = a.shape[0] // 2
    return np.concatenate([a[half:], a[:half]], axis=0)


def _to_ours(kind: str, w: np.ndarray, flip_sin_to_cos: bool) -> np.ndarray:
    if kind == "conv":
        return w.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if kind == "shortcut":
        return w.reshape(w.shape[0], w.shape[1]).T  # [O, I, 1, 1] -> [I, O]
    if kind == "dense":
        return w.T
    if kind == "temb_in":  # rows of [cos, sin] -> our [sin, cos]
        return _swap_halves(w.T) if flip_sin_to_cos else w.T
    return w  # norm scale/bias, biases, embedding rows


def _to_theirs(kind: str, w: np.ndarray) -> np.ndarray:
    if kind == "conv":
        return w.transpose(3, 2, 0, 1)
    if kind == "shortcut":
        return w.T[:, :, None, None]
    if kind in ("dense", "temb_in"):
        return w.T
    return w


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def canonical_names(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``state_dict`` with diffusers' old attention names (``query``/``key``/``value``/
    ``proj_attn``, checkpoints before diffusers 0.14) renamed to ``to_q``/``to_k``/``to_v``/``to_out.0``."""
    pattern = re.compile(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)(\.)")
    return {pattern.sub(lambda m: m[1] + _OLD_ATTENTION[m[2]] + m[3], k): v
            for k, v in state_dict.items()}  # fmt: skip


def _expected_params(config: config_utils.Config, data_shape: tuple[int, ...]) -> Any:
    model = config_utils.build_model(config)
    init = lambda: config_utils.init_params(model, config, data_shape, jax.random.key(0))
    return jax.eval_shape(init)


def params_from_diffusers(
    state_dict: Mapping[str, Any],
    config: config_utils.Config,
    data_shape: tuple[int, ...],
    *,
    flip_sin_to_cos: bool = False,
) -> dict[str, Any]:
    """Our U-Net's parameters (float32 numpy) from a ``UNet2DModel`` state dict (numpy or torch
    tensors by name), for the model of ``config`` on examples of ``data_shape``. Every diffusers
    tensor must be used and every parameter filled with exactly its shape, or ``ValueError``
    names the ones that differ."""
    state = canonical_names({k: np.asarray(v, np.float32) for k, v in state_dict.items()})
    expected = _expected_params(config, data_shape)
    num_levels = len(config.model.kwargs.get("ch_mult", (1, 2, 2, 2)))
    params: dict[str, Any] = {}
    used, problems = set(), []
    for path, name, kind in _leaf_pairs(expected, num_levels):
        want = tuple(_get(expected, path).shape)
        if name not in state:
            problems.append(f"missing {name} (for {'/'.join(path)})")
            continue
        value = _to_ours(kind, state[name], flip_sin_to_cos)
        used.add(name)
        if kind == "embed":  # our null class: a zero row after diffusers' K classes
            value = np.concatenate([value, np.zeros_like(value[:1])])
        if value.shape != want:
            problems.append(f"{name}: shape {state[name].shape} gives {value.shape}, need {want}")
        _set(params, path, np.ascontiguousarray(value))
    unused = sorted(set(state) - used)
    problems += [f"unexpected {name} {state[name].shape}" for name in unused[:10]]
    if problems:
        more = f"\n  ... ({len(unused) - 10} more unexpected)" if len(unused) > 10 else ""
        raise ValueError(
            "the diffusers weights do not fit the U-Net of this config:\n  "
            + "\n  ".join(problems[:20])
            + more
        )
    return params


def params_to_diffusers(params: Any, config: config_utils.Config) -> dict[str, np.ndarray]:
    """A ``UNet2DModel`` state dict (float32 numpy by name) of our U-Net's ``params``: the inverse
    of :func:`params_from_diffusers` (a class table keeps our null class as row K only when it
    is not zero, e.g. after label-dropout training; then num_class_embeds must be K + 1)."""
    num_levels = len(config.model.kwargs.get("ch_mult", (1, 2, 2, 2)))
    out = {}
    for path, name, kind in _leaf_pairs(params, num_levels):
        value = np.asarray(_get(params, path), np.float32)
        if kind == "embed" and not np.any(value[-1]):
            value = value[:-1]
        out[name] = np.ascontiguousarray(_to_theirs(kind, value))
    return out


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def _read_json(path: epath.Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _safetensors() -> Any:
    try:
        import safetensors.numpy
    except ImportError:
        raise ImportError(
            "diffusers' .safetensors files need safetensors: pip install 'diffusion_jax[convert]'"
        ) from None
    return safetensors.numpy


def _load_file(path: epath.Path) -> dict[str, np.ndarray]:
    if path.name.endswith(".safetensors"):
        return _safetensors().load(path.read_bytes())
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"reading {path.name} (a PyTorch pickle) needs torch: pip install torch, or save the "
            "model with safe_serialization=True (.safetensors) and convert that."
        ) from None
    with path.open("rb") as f:
        state = torch.load(f, map_location="cpu", weights_only=True)
    return {k: v.detach().float().numpy() for k, v in state.items()}


def _weights(unet_dir: epath.Path) -> dict[str, np.ndarray]:
    for suffix in (".safetensors", ".bin"):
        single = unet_dir / f"{WEIGHTS_NAME}{suffix}"
        if single.exists():
            return _load_file(single)
        index = unet_dir / f"{WEIGHTS_NAME}{suffix}.index.json"
        if index.exists():
            state = {}
            for shard in sorted(set(_read_json(index)["weight_map"].values())):
                state.update(_load_file(unet_dir / shard))
            return state
    found = sorted(p.name for p in unet_dir.iterdir())
    raise FileNotFoundError(
        f"no {WEIGHTS_NAME}.safetensors or .bin (or a sharded .index.json) in {unet_dir}; it "
        f"holds {found}."
    )


def read_diffusers(directory: epath.PathLike) -> DiffusersModel:
    """A diffusers ``UNet2DModel`` directory (the model at its top or in ``unet/``; the scheduler's
    ``scheduler_config.json`` at its top or in ``scheduler/``)."""
    directory = epath.Path(directory)
    unet_dir = next(
        (d for d in (directory, directory / "unet") if (d / "config.json").exists()), None
    )
    if unet_dir is None:
        raise FileNotFoundError(
            f"{directory} has no config.json at its top or in unet/: pass a diffusers UNet2DModel "
            "directory (e.g. a download of google/ddpm-cifar10-32)."
        )
    unet_config = _read_json(unet_dir / "config.json")
    scheduler_config = None
    for path in (
        directory / "scheduler_config.json",
        directory / "scheduler/scheduler_config.json",
    ):
        if path.exists():
            scheduler_config = _read_json(path)
            break
    return DiffusersModel(unet_config, scheduler_config, _weights(unet_dir))


def convert_diffusers(
    directory: epath.PathLike,
    workdir: epath.PathLike,
    base_config: Any = None,
    *,
    log: Callable[[str], None] = logging.warning,
) -> config_utils.Config:
    """Converts a diffusers ``UNet2DModel`` directory into a run in ``workdir`` (checkpoint 0, EMA =
    the weights) and returns its config; settings not carried are passed to ``log``. See
    :func:`config_from_diffusers` for ``base_config``."""
    from diffusion_jax import trainer

    source = read_diffusers(directory)
    config, data_shape, notes = config_from_diffusers(
        source.unet_config, source.scheduler_config, base_config
    )
    params = params_from_diffusers(
        source.state_dict,
        config,
        data_shape,
        flip_sin_to_cos=bool({**UNET_DEFAULTS, **source.unet_config}["flip_sin_to_cos"]),
    )
    for note in notes:
        log(f"not carried over: {note}")
    trainer.write_run(workdir, config, params, data_shape, step=0)
    return config


def export_diffusers(
    workdir: epath.PathLike, directory: epath.PathLike, step: int | None = None
) -> dict[str, Any]:
    """Writes a run's EMA parameters (checkpoint ``step``, default the newest) as a diffusers
    pipeline directory: ``model_index.json``, ``unet/`` (config.json and
    ``diffusion_pytorch_model.safetensors``) and ``scheduler/scheduler_config.json``. Returns the
    two configs written."""
    from diffusion_jax import checkpoints

    save = _safetensors().save

    run = checkpoints.load_sampler(workdir, step)
    configs = diffusers_from_config(run.config, run.data_shape)
    state = params_to_diffusers(jax.device_get(run.params), run.config)
    classes = configs["unet"]["num_class_embeds"]
    if classes is not None and state["class_embedding.weight"].shape[0] != classes:
        configs["unet"]["num_class_embeds"] = state["class_embedding.weight"].shape[0]
        logging.warning("the null class %d is kept as diffusers class %d", classes, classes)
    directory = epath.Path(directory)
    (directory / "unet").mkdir(parents=True, exist_ok=True)
    (directory / "scheduler").mkdir(parents=True, exist_ok=True)
    (directory / "unet" / f"{WEIGHTS_NAME}.safetensors").write_bytes(save(state))
    (directory / "unet" / "config.json").write_text(json.dumps(configs["unet"], indent=2))
    (directory / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(configs["scheduler"], indent=2)
    )
    index = {
        "_class_name": "DDPMPipeline",
        "unet": ["diffusers", "UNet2DModel"],
        "scheduler": ["diffusers", "DDPMScheduler"],
    }
    (directory / "model_index.json").write_text(json.dumps(index, indent=2))
    return configs


def main(argv: list[str]) -> None:
    from absl import flags

    flags_ = flags.FLAGS
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {argv[1:]}")
    if bool(flags_.from_diffusers) == bool(flags_.to_diffusers):
        raise SystemExit("give exactly one of --from_diffusers DIR and --to_diffusers DIR.")
    try:
        if flags_.from_diffusers:
            config = convert_diffusers(flags_.from_diffusers, flags_.workdir, flags_.config)
            print(
                f"wrote {flags_.workdir}: model {dict(config.model.kwargs)}, "
                f"diffusion {config.diffusion.schedule}/{config.diffusion.prediction}, "
                f"sampler {config.sample.sampler}"
            )
        else:
            export_diffusers(flags_.workdir, flags_.to_diffusers, flags_.checkpoint_step)
            print(f"wrote {flags_.to_diffusers}")
    except UnsupportedDiffusersModel as e:
        raise SystemExit(f"ERROR {e}") from None


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    flags.DEFINE_string("from_diffusers", None, "A diffusers UNet2DModel directory to import.")
    flags.DEFINE_string("to_diffusers", None, "Export the run in --workdir to this directory.")
    flags.DEFINE_string("workdir", None, "The run to write (import) or read (export).")
    flags.DEFINE_integer("checkpoint_step", None, "Export this checkpoint (default: the newest).")
    config_flags.DEFINE_config_file(
        "config", None, "Optional base config (configs/*.py) for data, optimiser, training.",
        lock_config=True,
    )  # fmt: skip
    flags.mark_flags_as_required(["workdir"])


if __name__ == "__main__":
    from absl import app

    from diffusion_jax import cli_logging

    _define_flags()
    cli_logging.quiet_orbax()
    app.run(main, flags_parser=cli_logging.parse_config_flags)
