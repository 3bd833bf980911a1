r"""The default: a small class-conditional U-Net on scikit-learn's 8x8 handwritten digits.

    python train.py --config configs/digits.py --workdir /tmp/diffusion_digits

No download (the 1797 digits ship inside scikit-learn; the first 1500 train). 1500 steps of batch
64 with a 0.7M-parameter U-Net at the digits' native 8x8 (upsampling to 16x16 costs 4x the compute
for no new detail). On 2 CPU cores it takes about 5 minutes (4m42s measured, compilation included,
on two cores shared with other jobs) and leaves a 10x10 grid of samples, one digit class per
column, in ``<workdir>/samples/step_*.png``; on one GPU well under a minute. Labels are dropped 10%
of the time, so the model also samples unconditionally (label 10) and with classifier-free
guidance. Override any key on the command line, e.g. ``--config.train.num_steps=500``.

This file lists every key of a training config; the other configs import it and change what
differs. Step counts are in batches.
"""

import ml_collections
from ml_collections import config_dict

from diffusion_jax import data


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    # Input pipeline (diffusion_jax.data.default_data_config() documents every key).
    config.data = data.default_data_config()
    config.data.source = "digits"
    config.data.image_size = 8  # the digits' own size
    config.data.channels = 1

    # The denoiser: "unet" (images) or "mlp" (points); other keys are that module's arguments.
    config.model = ml_collections.ConfigDict()
    config.model.name = "unet"
    config.model.ch = 32
    config.model.ch_mult = (1, 2)  # feature maps of 8x8 and 4x4
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (4,)
    config.model.dropout = 0.0
    config.model.num_classes = 10  # class-conditional; placeholder(int) (None) for unconditional
    config.model.dtype = "float32"  # compute dtype; "bfloat16" on TPU / recent GPUs
    config.model.remat = False  # recompute residual blocks on the backward pass (saves memory)
    # config.model.self_condition = True  # feed the denoiser its previous x_0 estimate (Analog Bits)

    # Noise process and loss (configs/digits_flow.py and digits_edm.py show the other processes).
    config.diffusion = ml_collections.ConfigDict()
    config.diffusion.process = "vp"  # vp | flow | edm
    config.diffusion.schedule = "linear"  # vp: linear | cosine | quadratic | sigmoid | geometric
    config.diffusion.num_timesteps = 1000
    config.diffusion.beta_start = config_dict.placeholder(float)  # None: DDPM's, scaled by 1000/T
    config.diffusion.beta_end = config_dict.placeholder(float)
    config.diffusion.discrete = True  # vp: DDPM's T integer steps (False: continuous t)
    config.diffusion.sigma_min = 0.002  # edm's noise range (and karras spacing's on flow)
    config.diffusion.sigma_max = 80.0
    config.diffusion.rho = 7.0
    config.diffusion.sigma_data = 0.5  # edm preconditioning
    config.diffusion.prediction = "eps"  # eps | x0 | v | flow | edm
    config.diffusion.time_sampling = "uniform"  # uniform | logit_normal | log_normal
    config.diffusion.time_loc = 0.0  # logit_normal / log_normal location and scale
    config.diffusion.time_scale = 1.0
    config.diffusion.loss = "simple"  # simple | hybrid (with model.learn_sigma)
    config.diffusion.loss_type = "l2"
    config.diffusion.min_snr_gamma = config_dict.placeholder(float)
    config.diffusion.lambda_vlb = 1e-3
    config.diffusion.label_dropout = 0.1  # > 0: classifier-free guidance training

    # Optimiser.
    config.optim = ml_collections.ConfigDict()
    config.optim.optimizer = "adam"  # adam | adamw
    config.optim.learning_rate = 2e-3
    config.optim.lr_schedule = "cosine"  # constant | cosine | linear (after warm-up)
    config.optim.warmup_steps = 100
    config.optim.end_lr_factor = 0.05
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999
    config.optim.eps = 1e-8
    config.optim.weight_decay = 0.0
    config.optim.grad_clip_norm = 1.0  # 0: no clipping
    config.optim.grad_accum_steps = 1

    config.ema = ml_collections.ConfigDict()
    config.ema.decay = 0.999
    config.ema.warmup = True
    config.ema.posthoc_sigma_rels = ()  # EDM2 post-hoc EMA widths to track, e.g. (0.05, 0.10); () off
    config.ema.posthoc_every_steps = (
        1000  # their snapshot interval (python -m diffusion_jax.posthoc_ema)
    )

    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 64
    config.train.num_steps = 1500
    config.train.log_every_steps = 100
    config.train.on_nonfinite = "stop"  # stop | skip

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 500
    config.checkpoint.keep = 3
    config.checkpoint.async_save = True

    config.sample = ml_collections.ConfigDict()
    config.sample.every_steps = 500  # 0: only at the end
    config.sample.num_samples = 100  # 0: no samples
    config.sample.sampler = "ddim"  # ddpm | ddim | euler | heun | dpm_solver_2m | dpm_solver_3m
    config.sample.num_steps = 100  # respaced; placeholder(int) (None): all T steps
    config.sample.spacing = config_dict.placeholder(str)  # None: the sampler's default
    config.sample.eta = 0.0
    config.sample.clip_denoised = True
    config.sample.rho = config_dict.placeholder(float)  # karras spacing (None: the process's)
    config.sample.s_churn = 0.0  # heun: EDM's stochastic churn (S_churn, S_tmin, S_tmax, S_noise)
    config.sample.s_tmin = 0.0
    config.sample.s_tmax = float("inf")
    config.sample.s_noise = 1.0
    # ddpm's reverse variance: fixed_small | fixed_large | learned_range (None: the model's own).
    config.sample.variance = config_dict.placeholder(str)

    config.sharding = ml_collections.ConfigDict()
    config.sharding.fsdp_min_size = 0  # > 0: shard parameters with at least this many elements

    # A jax.profiler trace of num_steps steps from start_step, for TensorBoard (0 steps: none).
    config.profile = ml_collections.ConfigDict()
    config.profile.start_step = 10
    config.profile.num_steps = 0

    return config
