"""Evaluation: bits/dim from the variational bound, Frechet distance, precision/recall, sample export.

Not imported by ``import diffusion_jax``; import it explicitly::

    from diffusion_jax import evaluation as ev

    bpd = ev.make_bpd_fn(denoise_fn, schedule, variance="fixed_large")   # -> {"total_bpd": [B], ...}
    log_p, x_T = ev.ode_log_likelihood(denoise_fn, process, params, x0, rng)  # continuous processes
    fd = ev.frechet_distance_from_features(real_feats, fake_feats)
    pr = ev.precision_recall(real_feats, fake_feats, k=3)
    feats = ev.digits_features(images_16x16)            # the default dataset's feature extractor
    ev.export_samples("/tmp/samples", images)           # uint8 .npz (arr_0) + PNGs for FID tools

Modules: ``likelihood`` (bits/dim: the variational bound, and the probability-flow ODE's
likelihood), ``distances`` (FD, precision/recall, energy distance, sliced Wasserstein, floors),
``digits`` (the digits classifier's features), ``inception`` (Inception-v3 pool features for FID,
weights from a local file), ``export`` (npz/PNG), ``pipeline`` (evaluate a training workdir: what
``evaluate.py`` runs).
"""

from diffusion_jax.evaluation.digits import (
    digits_accuracy,
    digits_features,
    digits_logits_and_features,
    digits_to_images,
    load_digits_split,
    train_digits_classifier,
    upsample_digits,
)
from diffusion_jax.evaluation.distances import (
    energy_distance,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_features,
    knn_radii,
    precision_recall,
    sliced_wasserstein,
    split_floor,
)
from diffusion_jax.evaluation.export import (
    export_samples,
    from_uint8,
    generate_samples,
    load_npz,
    load_pngs,
    save_npz,
    save_pngs,
    to_rgb,
    to_uint8,
)
from diffusion_jax.evaluation.likelihood import (
    dequantize_8bit,
    evaluate_bpd,
    make_bpd_fn,
    make_ode_bpd_fn,
    ode_bits_per_dim,
    ode_log_likelihood,
    quantize_8bit,
)

__all__ = [
    "dequantize_8bit",
    "digits_accuracy",
    "digits_features",
    "digits_logits_and_features",
    "digits_to_images",
    "energy_distance",
    "evaluate_bpd",
    "export_samples",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_from_features",
    "from_uint8",
    "generate_samples",
    "knn_radii",
    "load_digits_split",
    "load_npz",
    "load_pngs",
    "make_bpd_fn",
    "make_ode_bpd_fn",
    "ode_bits_per_dim",
    "ode_log_likelihood",
    "precision_recall",
    "quantize_8bit",
    "save_npz",
    "save_pngs",
    "sliced_wasserstein",
    "split_floor",
    "to_rgb",
    "to_uint8",
    "train_digits_classifier",
    "upsample_digits",
]
