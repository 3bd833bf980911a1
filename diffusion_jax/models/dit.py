"""DiT, the diffusion transformer of Peebles & Xie (2023), "Scalable Diffusion Models with
Transformers" (``facebookresearch/DiT``, ``models.py``): a second denoiser beside the U-Net.

The image [B, H, W, C] is cut into p x p patches, each a token (a Dense of its p*p*C values, which
is the paper's stride-p convolution written as a matmul), plus a 2-D position embedding. ``depth``
adaLN-Zero blocks follow: LayerNorm without parameters, then ``h * (1 + scale) + shift`` and a
``gate`` on each residual branch, all regressed from ``c = embed(t) + embed(y)`` by a Dense that
starts at zero, so every fresh block is the identity (section 3.2). A final adaLN layer and a
zero-initialised Dense give p*p*out values per token, and unpatchify puts them back on the grid.

``t`` is [B] the process's network time (DDPM's 0-based step, 0 = the paper's t = 1; 1000 t for
flow; 250 ln sigma for EDM: :meth:`Process.model_time`); the net only embeds its value. The time
embedding is the library's DDPM sinusoid (:func:`timestep_embedding`, [sin, cos]); the official
code uses GLIDE's [cos, sin] with frequencies over ``half`` instead of ``half - 1``: the same
features up to order and a slight change of frequencies, which the first Dense absorbs.

Parameter counts: with ``pos_embed="learned"`` the trainable parameters are exactly the official
code's total, ``sum(p.numel() for p in model.parameters())`` in its ``train.py`` (32,963,360 for
DiT-S/2, 130,512,416 for DiT-B/2 and 675,129,632 for DiT-XL/2 on 32x32x4 latents, 1000 classes,
learned sigma). That total includes the fixed sin-cos table, a frozen ``nn.Parameter``; with
``pos_embed="sincos"`` (the paper's choice) the table is a constant here, not a parameter, and the
count is the official total less N * hidden_size (N = HW / p^2 tokens).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from diffusion_jax.models.layers import (
    check_images,
    check_timesteps,
    default_init,
    labels_or_null,
    timestep_embedding,
    with_self_condition,
)
from diffusion_jax.ops import Dense

Dtype = Any
NORM_EPS = 1e-6  # LayerNorm epsilon, as in DiT
POS_EMBEDS = ("sincos", "learned")

# The paper's Table 1 (hidden size, depth, heads) with patch sizes 2, 4, 8: "S/2" is DiT-S/2.
_WIDTHS = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
DIT_SIZES: dict[str, dict[str, int]] = {
    f"{name}/{patch}": dict(hidden_size=width, depth=depth, num_heads=heads, patch_size=patch)
    for name, (width, depth, heads) in _WIDTHS.items()
    for patch in (2, 4, 8)
}


def patchify(x: jax.Array, patch_size: int) -> jax.Array:
    """Cut x [B, H, W, C] into tokens [B, (H/p) (W/p), p p C], row-major over the patch grid.

    Each token lists its patch's pixels row by row, channels innermost.
    """
    b, height, width, c = x.shape
    p = patch_size
    h, w = height // p, width // p
    # One axis change per reshape: explicit sharding (AxisType.Explicit) infers each step's output
    # sharding, but not that of a reshape splitting or merging two axes at once.
    x = x.reshape(b, h, p, width, c).reshape(b, h, p, w, p, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)  # [B, h, w, p, p, C]
    return x.reshape(b, h, w, p * p * c).reshape(b, h * w, p * p * c)


def unpatchify(tokens: jax.Array, patch_size: int, height: int, width: int) -> jax.Array:
    """The inverse of :func:`patchify`: tokens [B, (H/p) (W/p), p p C] -> [B, H, W, C]."""
    b, _, features = tokens.shape
    p = patch_size
    h, w, c = height // p, width // p, features // (p * p)
    x = tokens.reshape(b, h, w, features).reshape(b, h, w, p, p, c)  # one axis change per reshape
    x = x.transpose(0, 1, 3, 2, 4, 5)  # [B, h, p, w, p, C]
    return x.reshape(b, height, w, p, c).reshape(b, height, width, c)


def sincos_pos_embed(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """The fixed 2-D sin-cos position embedding of DiT (after MAE): float32 [grid_h * grid_w, dim].

    Token (i, j) (row i, column j, row-major) gets ``[e(j), e(i)]``, each half the 1-D embedding
    ``e(pos) = [sin(pos * w_k), cos(pos * w_k)]`` with ``w_k = 10000 ** (-k / (dim / 4))``,
    k = 0..dim/4 - 1 (the official ``get_2d_sincos_pos_embed``, which puts the column first).
    Computed in float64. ``dim`` must be a multiple of 4.
    """
    if dim % 4:
        raise ValueError(f"the sin-cos position embedding needs hidden_size % 4 == 0, got {dim}.")
    omega = 1.0 / 10000.0 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

    def one_d(pos: np.ndarray) -> np.ndarray:
        out = pos.reshape(-1)[:, None] * omega[None, :]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    emb = np.concatenate([one_d(cols.astype(np.float64)), one_d(rows.astype(np.float64))], axis=1)
    return emb.astype(np.float32)


def layer_norm(x: jax.Array, eps: float = NORM_EPS) -> jax.Array:
    """LayerNorm over the last axis without scale or bias, in float32: float32 [..., D]."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """adaLN: ``x * (1 + scale) + shift`` for x [B, N, D] and per-example shift, scale [B, D]."""
    shift, scale = shift.astype(jnp.float32), scale.astype(jnp.float32)
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


class Attention(nn.Module):
    """Multi-head self-attention over the tokens: one qkv Dense (3D), softmax(q k^T / sqrt(d)) v,
    and an output Dense, as timm's ``Attention`` with ``qkv_bias=True``. x [B, N, D] -> [B, N, D].

    The product is ``jax.nn.dot_product_attention``, whose logits and softmax are float32 whatever
    the compute dtype (TPU and GPU get their fused kernels).
    """

    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, dim = x.shape
        d = dim // self.num_heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        qkv = Dense(3 * dim, kernel_init=default_init(), name="qkv", **kw)(x)
        qkv = qkv.reshape(b, n, 3, self.num_heads, d)  # timm's order: (q, k, v), then heads
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        out = jax.nn.dot_product_attention(q, k, v)  # [B, N, heads, d]; logits scaled by d**-0.5
        return Dense(dim, kernel_init=default_init(), name="proj", **kw)(out.reshape(b, n, dim))


class DiTBlock(nn.Module):
    """One adaLN-Zero block: x [B, N, D] (float32), c [B, D] -> float32 [B, N, D].

    ``shift, scale, gate`` for the attention and for the MLP (six D-vectors) come from
    ``Dense(6D)(silu(c))``, which starts at zero: a fresh block returns x exactly. The MLP is
    Dense(mlp_ratio D) - tanh-approximate GELU - Dense(D). The residual stream stays float32.
    """

    num_heads: int
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        mod = Dense(6 * dim, kernel_init=default_init(0.0), name="adaLN_modulation", **kw)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(
            mod(nn.silu(c)), 6, axis=-1
        )

        def gated(gate: jax.Array, h: jax.Array) -> jax.Array:
            return gate.astype(jnp.float32)[:, None, :] * h.astype(jnp.float32)

        h = modulate(layer_norm(x), shift_msa, scale_msa).astype(self.dtype)
        x = x + gated(gate_msa, Attention(self.num_heads, name="attn", **kw)(h))
        h = modulate(layer_norm(x), shift_mlp, scale_mlp).astype(self.dtype)
        h = Dense(int(dim * self.mlp_ratio), kernel_init=default_init(), name="mlp_fc1", **kw)(h)
        h = nn.gelu(h, approximate=True)
        h = Dense(dim, kernel_init=default_init(), name="mlp_fc2", **kw)(h)
        return x + gated(gate_mlp, h)


class LabelEmbedder(nn.Module):
    """The class table [num_embeddings, features] (``nn.Embed``'s ``embedding``, N(0, 0.02^2) as in
    DiT): y [B] -> [B, features] in ``dtype``. The rows are picked by a one-hot product rather than
    a gather, so that a batch sharded in its type (``AxisType.Explicit``) needs no annotation."""

    num_embeddings: int
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, y: jax.Array) -> jax.Array:
        shape = (self.num_embeddings, self.features)
        table = self.param("embedding", nn.initializers.normal(0.02), shape, self.param_dtype)
        return jax.nn.one_hot(y, self.num_embeddings, dtype=self.dtype) @ table.astype(self.dtype)


class DiT(nn.Module):
    """The DiT denoiser: ``(x [B, H, W, C], t [B], y [B] | None) -> float32 [B, H, W, out]``.

    ``out = out_channels or C``, doubled when ``learn_sigma`` (first half the eps/x0/v prediction,
    second half the improved-DDPM variance interpolation v), as for the U-Net. ``size`` names one
    of the paper's models (:data:`DIT_SIZES`: "S/2", "B/4", "XL/8", ...; the number is the patch
    size); ``hidden_size``, ``depth``, ``num_heads`` and ``patch_size``, when set, override it, and
    without a ``size`` all four must be set. H and W must be multiples of the patch size.
    ``pos_embed``: "sincos" (the paper's fixed table, not a parameter) or "learned" (a parameter
    [N, D] that starts from that table; the model then only takes inputs of its init size).
    With ``num_classes`` set, label ``num_classes`` is the null class (classifier-free guidance)
    and ``y = None`` means it for every example. ``dtype`` is the compute dtype of the matmuls
    (LayerNorm, softmax and the residual stream stay float32); parameters are ``param_dtype``.
    ``remat`` recomputes each block on the backward pass to save memory. The Dense layers come from
    ``diffusion_jax.ops``, whose platform picks their gradients; ``jax.grad`` and ``jax.jvp`` both
    go through the net. ``self_condition`` (Analog Bits self-conditioning) patchifies the previous
    x_0 estimate ``x_self_cond`` [B, H, W, C] (zeros when None) with x, so each token has p p 2C
    values.
    """

    size: str | None = None
    hidden_size: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    patch_size: int | None = None
    mlp_ratio: float = 4.0
    pos_embed: str = "sincos"
    frequency_embedding_size: int = 256
    out_channels: int | None = None
    num_classes: int | None = None
    learn_sigma: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    self_condition: bool = False

    def dims(self) -> dict[str, int]:
        """``hidden_size``, ``depth``, ``num_heads``, ``patch_size``: the ``size`` preset's, with
        every field that is set taking precedence; a ValueError names what is missing."""
        if self.size is not None and self.size not in DIT_SIZES:
            raise ValueError(f"size={self.size!r} is not one of the DiT sizes {tuple(DIT_SIZES)}.")
        dims = dict(DIT_SIZES[self.size]) if self.size is not None else {}
        for key in ("hidden_size", "depth", "num_heads", "patch_size"):
            if getattr(self, key) is not None:
                dims[key] = getattr(self, key)
        missing = [k for k in ("hidden_size", "depth", "num_heads", "patch_size") if k not in dims]
        if missing:
            raise ValueError(
                f"DiT needs {missing}: set size (one of {tuple(DIT_SIZES)}, e.g. size='S/2') "
                "or give hidden_size, depth, num_heads and patch_size."
            )
        return dims

    def _check_config(self, dims: dict[str, int]) -> None:
        for key in ("hidden_size", "depth", "num_heads", "patch_size"):
            if dims[key] < 1:
                raise ValueError(f"{key} must be >= 1, got {dims[key]}.")
        if dims["hidden_size"] % dims["num_heads"]:
            raise ValueError(
                f"num_heads={dims['num_heads']} must divide hidden_size={dims['hidden_size']}."
            )
        if self.pos_embed not in POS_EMBEDS:
            raise ValueError(f"pos_embed={self.pos_embed!r} is not one of {POS_EMBEDS}.")
        if dims["hidden_size"] % 4:
            raise ValueError(
                f"hidden_size={dims['hidden_size']} must be a multiple of 4 (the 2-D sin-cos "
                "position embedding gives a quarter of it to each of sin and cos of rows and columns)."
            )
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}.")
        if self.out_channels is not None and self.out_channels < 1:
            raise ValueError(f"out_channels must be None or >= 1, got {self.out_channels}.")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes must be None or >= 1, got {self.num_classes}.")

    @nn.compact
    def __call__(
        self,
        x: ArrayLike,
        t: ArrayLike,
        y: ArrayLike | None = None,
        *,
        train: bool = False,
        x_self_cond: ArrayLike | None = None,
    ) -> jax.Array:
        """Predict from x [B, H, W, C] at timesteps t [B] (labels y [B]; with ``self_condition``,
        the x_0 estimate x_self_cond [B, H, W, C]) -> float32 [B, H, W, out].

        ``train`` is accepted for the shared denoiser signature; DiT has no dropout.
        """
        del train
        dims = self.dims()
        self._check_config(dims)
        dim, p = dims["hidden_size"], dims["patch_size"]
        x = check_images(x)
        batch, height, width, in_ch = x.shape
        if height % p or width % p:
            raise ValueError(
                f"H and W must be multiples of patch_size={p}, got H={height}, W={width}; pad or "
                "resize the input, or choose a patch size that divides both."
            )
        t = check_timesteps(t, batch)
        y = labels_or_null(y, batch, self.num_classes)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        # Patch embedding (a stride-p conv as a Dense over each patch's values) + positions.
        x_in = with_self_condition(x, x_self_cond, self.self_condition)
        tokens = patchify(x_in.astype(self.dtype), p)
        tokens = Dense(dim, kernel_init=default_init(), name="x_embedder", **kw)(tokens)
        table = sincos_pos_embed(dim, height // p, width // p)
        if self.pos_embed == "learned":
            pos = self.param(
                "pos_embed", lambda _, shape: jnp.asarray(table, self.param_dtype), table.shape
            )
        else:
            pos = jnp.asarray(table)
        h = tokens.astype(jnp.float32) + pos.astype(jnp.float32)  # the residual stream, float32

        # Conditioning c = MLP(sinusoid(t)) + class embedding.
        emb_init = nn.initializers.normal(0.02)
        c = timestep_embedding(t, self.frequency_embedding_size)
        c = Dense(dim, kernel_init=emb_init, name="t_embedder_0", **kw)(c)
        c = Dense(dim, kernel_init=emb_init, name="t_embedder_1", **kw)(nn.silu(c))
        if y is not None:
            c = c + LabelEmbedder(self.num_classes + 1, dim, name="y_embedder", **kw)(y)

        block = nn.remat(DiTBlock) if self.remat else DiTBlock
        for i in range(dims["depth"]):
            h = block(dims["num_heads"], self.mlp_ratio, name=f"blocks_{i}", **kw)(h, c)

        # Final adaLN layer and the zero-initialised projection to p * p * out values per token.
        out_ch = (self.out_channels or in_ch) * (2 if self.learn_sigma else 1)
        mod = Dense(2 * dim, kernel_init=default_init(0.0), name="final_adaLN_modulation", **kw)
        shift, scale = jnp.split(mod(nn.silu(c)), 2, axis=-1)
        h = modulate(layer_norm(h), shift, scale).astype(self.dtype)
        h = Dense(p * p * out_ch, kernel_init=default_init(0.0), name="final_linear", **kw)(h)
        return unpatchify(h, p, height, width).astype(jnp.float32)
