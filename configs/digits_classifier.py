r"""A noise-aware classifier for classifier guidance of the default digits model.

    python train_classifier.py --config configs/digits_classifier.py --workdir /tmp/digits_classifier
    python sample.py --workdir /tmp/diffusion_digits --classifier_workdir /tmp/digits_classifier \
        --classifier_scale 2 --guidance_scale 1 --sampler ddpm

The data and the forward process (``diffusion``) are those of ``configs/digits.py``: a classifier
guides only a model trained on the same schedule. The network is the encoder half of a small U-Net
(``diffusion_jax.models.NoisyClassifier``); ``num_classes`` comes from the data. Held-out accuracy
by timestep goes to ``<workdir>/eval.json``.
"""

import ml_collections

from configs import digits


def get_config() -> ml_collections.ConfigDict:
    base = digits.get_config()
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data = base.data
    config.diffusion = base.diffusion  # only the schedule keys are used
    config.diffusion.label_dropout = 0.0

    config.classifier = ml_collections.ConfigDict()
    config.classifier.ch = 32
    config.classifier.ch_mult = (1, 2)
    config.classifier.num_res_blocks = 1
    config.classifier.attn_resolutions = ()
    config.classifier.dropout = 0.1

    config.optim = base.optim
    config.optim.learning_rate = 1e-3
    config.ema = base.ema
    config.train = base.train
    config.train.num_steps = 1000
    config.checkpoint = base.checkpoint
    return config
