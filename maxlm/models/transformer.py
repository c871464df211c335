"""The decoder: embed -> N x (RMSNorm, attention, RMSNorm, SwiGLU) -> RMSNorm -> logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from maxlm.models.attention import Attention
from maxlm.models.layers import RMSNorm, SwiGLU, dense, model_inv_freq, param
from maxlm.models.moe import MoE
from maxlm.sharding import constrain

REMAT_POLICIES = {
  "none": None,
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots_saveable": jax.checkpoint_policies.dots_saveable,
  "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
_ACT = ("activation_batch", "activation_length", "activation_embed")


def compute_dtype(cfg) -> jnp.dtype:
  """The activation dtype: `auto` means bfloat16 on TPU/GPU and float32 on CPU."""
  if cfg.dtype == "auto":
    return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
  return jnp.dtype(cfg.dtype)


class Block(nnx.Module):
  """One pre-norm decoder block with residual connections; the MLP is a MoE when model.num_experts > 0."""

  def __init__(self, cfg, *, rngs: nnx.Rngs, inv_freq):
    pdt = jnp.dtype(cfg.param_dtype)
    self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.rms_norm_eps, rngs=rngs, param_dtype=pdt)
    self.attn = Attention(cfg, rngs=rngs, inv_freq=inv_freq)
    self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.rms_norm_eps, rngs=rngs, param_dtype=pdt)
    if cfg.num_experts:
      self.mlp = MoE(cfg, rngs=rngs)
    else:
      self.mlp = SwiGLU(cfg.d_model, cfg.mlp_dim, std=cfg.init_std,
                        out_std=cfg.init_std / (2 * cfg.num_layers) ** 0.5, rngs=rngs, param_dtype=pdt)

  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None,
               token_mask: jax.Array | None = None,
               attention_mask: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(x after the block, aux): aux holds the MoE's float32 statistics, {} for a dense MLP."""
    x = x + self.attn(self.attn_norm(x), positions, segment_ids, attention_mask)
    if isinstance(self.mlp, MoE):
      y, aux = self.mlp.forward(self.mlp_norm(x), token_mask)
    else:
      y, aux = self.mlp(self.mlp_norm(x)), {}
    return constrain(x + y, _ACT), aux


class Transformer(nnx.Module):
  """Llama-family decoder-only language model; `cfg` is the `model` section of a maxlm config."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    pdt = jnp.dtype(cfg.param_dtype)
    inv_freq = model_inv_freq(cfg)
    self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), std=cfg.init_std, dtype=pdt)
    if cfg.scan_layers:
      @nnx.split_rngs(splits=cfg.num_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def make_blocks(r: nnx.Rngs) -> Block:
        return Block(cfg, rngs=r, inv_freq=inv_freq)
      self.layers = make_blocks(rngs)
    else:
      self.layers = nnx.List([Block(cfg, rngs=rngs, inv_freq=inv_freq) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.rms_norm_eps, rngs=rngs, param_dtype=pdt)
    if not cfg.tie_embeddings:
      self.lm_head = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), std=cfg.init_std, dtype=pdt)
    self.tie_embeddings = cfg.tie_embeddings
    self.scan_layers = cfg.scan_layers
    self.scan_unroll = cfg.scan_unroll
    self.remat = cfg.remat
    self.num_experts = cfg.num_experts
    self.moe_aux_loss_coef = float(cfg.moe_aux_loss_coef)  # read by the training objective (train/step.py)
    self.dtype = compute_dtype(cfg)

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
    """tokens [batch, seq] int -> logits [batch, seq, vocab] in the compute dtype."""
    return self.forward(tokens, positions, segment_ids)[0]

  def forward(self, tokens: jax.Array, positions: jax.Array | None = None,
              segment_ids: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(logits, aux): aux = the MoE statistics (moe_aux_loss, moe_dropped) averaged over layers, {} if dense.

    The training loss uses this; padding (segment id 0) is left out of the MoE's statistics and capacity.
    """
    x, aux = self.hidden(tokens, positions, segment_ids)
    return self.head(x), aux

  def hidden(self, tokens: jax.Array, positions: jax.Array | None = None,
             segment_ids: jax.Array | None = None,
             attention_mask: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(final-normed hidden states [batch, seq, d_model], aux): forward without the output projection, so a caller
    that needs a few positions' logits (scoring a continuation) projects only those.

    attention_mask [batch|1, seq, seq] (True = visible), if given, is every layer's attention pattern in place of
    causal-within-segment (with einsum attention, whatever model.attention says): several continuations of one
    context share it in one row (maxlm.eval.packing). segment_ids then only mark padding (0) for the MoE."""
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    token_mask = None if segment_ids is None else segment_ids > 0
    # The lookup reads the table gathered whole (in the compute dtype, as FSDP gathers any weight before use):
    # a gather from a vocab/embed-sharded table has no efficient SPMD lowering and XLA would rematerialise it.
    table = constrain(self.embed[...].astype(self.dtype), (None, None))
    x = constrain(table[tokens], _ACT)

    def run_block(block: Block, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
      return block(x, positions, segment_ids, token_mask, attention_mask)

    if self.remat != "none":
      run_block = nnx.remat(run_block, policy=REMAT_POLICIES[self.remat])

    if self.scan_layers:
      graphdef, stacked = nnx.split(self.layers)

      def body(x, layer_state):
        return run_block(nnx.merge(graphdef, layer_state), x)  # the aux dict is stacked as the scan output

      # scan_unroll > 1 runs several layers per loop iteration (same parameters, same math); fully unrolled
      # is ~10% faster on XLA:CPU, which otherwise zero-fills and copies the loop's stacked buffers.
      x, aux = jax.lax.scan(body, x, stacked, unroll=self.scan_unroll)
      aux = {k: jnp.mean(v) for k, v in aux.items()}
    else:
      per_layer = []
      for block in self.layers:
        x, layer_aux = run_block(block, x)
        per_layer.append(layer_aux)
      aux = {k: jnp.mean(jnp.stack([a[k] for a in per_layer])) for k in per_layer[0]}

    return self.final_norm(x), aux

  def head(self, x: jax.Array) -> jax.Array:
    """Logits [..., vocab] of final-normed hidden states x [..., d_model] (the output projection alone)."""
    head = self.embed[...].T if self.tie_embeddings else self.lm_head[...]
    logits = dense(x, head.astype(self.dtype))
    if logits.ndim != 3:
      return logits
    return constrain(logits, ("activation_batch", "activation_length", "activation_vocab"))
