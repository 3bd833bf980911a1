r"""2-D points: a residual MLP learns the Datasaurus "dino" (or moons, circles, a Gaussian mixture).

    python train.py --config configs/toy2d.py --workdir /tmp/diffusion_dino
    python train.py --config configs/toy2d.py --workdir /tmp/moons --config.data.source=moons

About 75 seconds on 2 CPU cores (20k steps at ~330 steps/s, plus start-up); ``<workdir>/samples/step_*.png`` is a scatter plot of 1000 samples.
"""

import ml_collections
from ml_collections import config_dict

from configs import digits


def get_config() -> ml_collections.ConfigDict:
    config = digits.get_config()
    config.data.source = "dino"
    config.data.num_points = 8000
    config.data.use_labels = False

    config.model = ml_collections.ConfigDict()
    config.model.name = "mlp"
    config.model.hidden = 128
    config.model.num_layers = 3
    config.model.time_embedding = "sinusoidal"
    config.model.fourier_features = 16
    config.model.dropout = 0.0

    config.diffusion.num_timesteps = 100
    config.diffusion.label_dropout = 0.0
    config.optim.learning_rate = 2e-3
    config.optim.warmup_steps = 100
    config.optim.lr_schedule = "cosine"
    config.ema.decay = 0.995
    config.train.batch_size = 256
    config.train.num_steps = 20_000
    config.train.log_every_steps = 1000
    config.checkpoint.every_steps = 5000
    config.sample.every_steps = 5000
    config.sample.num_samples = 1000
    config.sample.sampler = "ddpm"
    config.sample.num_steps = config_dict.placeholder(int)  # all T steps
    config.sample.clip_denoised = False  # points are not confined to [-1, 1]
    return config
