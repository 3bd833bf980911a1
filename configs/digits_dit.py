r"""The digits model with a DiT backbone (Peebles & Xie 2023) instead of the U-Net.

    python train.py --config configs/digits_dit.py --workdir /tmp/diffusion_digits_dit

A small diffusion transformer on the 8x8 digits: patch 2 (16 tokens), hidden size 128, 4 adaLN-Zero
blocks of 4 heads, the fixed sin-cos position embedding; 1,272,324 parameters. Everything else is
configs/digits.py: the DDPM process with eps prediction, 1500 steps of batch 64, labels dropped 10%
of the time for classifier-free guidance, DDIM-100 samples. Measured on 2 CPU cores shared with
five other jobs (load average 3-10): 11m47s wall, of which 14 s the first step's compilation and
15 s per 10x10 sample grid (three grids); 4m58s of CPU time in all, so a few minutes on two idle
cores (not measured). Final training loss 0.083.

For the paper's models use ``dit_model(size="S/2")`` (``DIT_SIZES`` in
``diffusion_jax/models/dit.py``: S, B, L and XL with patch 2, 4 or 8), as configs/cifar10_dit.py
does; ``hidden_size``, ``depth``, ``num_heads`` or ``patch_size``, when set, override the preset.
"""

import ml_collections
from ml_collections import config_dict

from configs import digits


def dit_model(**kwargs) -> ml_collections.ConfigDict:
    """A ``model`` section for :class:`diffusion_jax.models.DiT` (every key it reads, with defaults)."""
    model = ml_collections.ConfigDict()
    model.name = "dit"
    model.size = config_dict.placeholder(str)  # "S/2", "B/4", ...: the paper's presets
    model.hidden_size = config_dict.placeholder(int)  # each set one overrides the preset
    model.depth = config_dict.placeholder(int)
    model.num_heads = config_dict.placeholder(int)
    model.patch_size = config_dict.placeholder(int)
    model.mlp_ratio = 4.0
    model.pos_embed = "sincos"  # sincos (fixed, the paper's) | learned
    model.num_classes = config_dict.placeholder(int)
    model.learn_sigma = False
    model.dtype = "float32"  # compute dtype; "bfloat16" on TPU / recent GPUs
    model.remat = False  # recompute each block on the backward pass (saves memory)
    model.update(kwargs)
    return model


def get_config() -> ml_collections.ConfigDict:
    config = digits.get_config()
    config.model = dit_model(hidden_size=128, depth=4, num_heads=4, patch_size=2, num_classes=10)
    return config
