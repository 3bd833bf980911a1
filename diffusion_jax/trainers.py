"""``train(config, workdir)``: the trainer of a config's kind, the one function ``train.py`` calls.

The kind is :func:`config_utils.run_kind`'s, from the config's sections: a ``classifier`` section
trains a noise-aware classifier (:mod:`diffusion_jax.classifier_trainer`), an ``autoencoder``
section the KL autoencoder of latent diffusion (:mod:`diffusion_jax.autoencoder_trainer`), and
anything else a diffusion model, on the data or, with a ``latent`` section, on an autoencoder's
latents (:mod:`diffusion_jax.trainer`). Each trainer is imported only when its kind is asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from etils import epath

from diffusion_jax import config_utils


def train(
    config: Any, workdir: str | epath.PathLike, *, hooks: Sequence[Callable[[int], None]] = ()
) -> Any:
    """Trains ``config`` (a ConfigDict from ``configs/``, or a parsed config of any kind) into
    ``workdir`` with the trainer of its kind, and returns what that trainer returns (the final
    state; the classifier's trainer: its held-out accuracy)."""
    kind = config_utils.run_kind(config)
    if kind == "autoencoder":
        from diffusion_jax import autoencoder_trainer

        return autoencoder_trainer.train_autoencoder(config, workdir, hooks=hooks)
    if kind == "classifier":
        from diffusion_jax import classifier_trainer

        return classifier_trainer.train_classifier(config, workdir, hooks=hooks)
    from diffusion_jax import trainer

    return trainer.train_and_evaluate(config, workdir, hooks=hooks)
