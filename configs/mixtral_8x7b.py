"""Mixtral-8x7B's real shape (46.7B parameters, ~12.9B active per token). Meant for a TPU pod or GPU cluster.

Intended layout: 256 chips as mesh fsdp=32 x expert=8, i.e.
  maxlm train --config=configs/mixtral_8x7b.py --config.mesh.data=1 --config.mesh.fsdp=32 --config.mesh.expert=8
Each expert lives on one slice of the expert axis (its weights further split over fsdp along `embed`), the
capacity dispatch all-to-alls tokens between the 8 expert groups, and everything else is ZeRO-3 over all 256
chips (the batch outside the MoE layers is split over fsdp x expert = 256). The file keeps mesh.expert=1 so
it also loads (and --dry_run works) on any device count.

Inspect without allocating:  maxlm train --config=configs/mixtral_8x7b.py --dry_run
"""

from maxlm.configs import base


def get_config():
  c = base.get_config()
  m = c.model
  m.vocab_size = 32000
  m.d_model = 4096
  m.num_layers = 32
  m.num_heads = 32
  m.num_kv_heads = 8
  m.mlp_dim = 14336  # of each expert
  m.num_experts = 8
  m.num_experts_per_tok = 2
  m.moe_aux_loss_coef = 0.01  # Switch Transformer's weight for E * sum_e f_e * P_e (1.0 when balanced)
  # Capacity dispatch is the path that shards experts over mesh.expert; 1.25 (Switch/GShard's usual
  # training value) drops a few % of assignments while the router balances early on, ~0 once balanced
  # (watch moe_dropped). 0 = dropless ragged_dot: exact, but with mesh.expert > 1 every expert shard sees the
  # whole batch's tokens (gathered) instead of an all-to-all of its own.
  m.moe_capacity_factor = 1.25
  m.max_seq_len = 32768
  m.rope_theta = 1e6
  m.rms_norm_eps = 1e-5
  m.tie_embeddings = False
  # Save the attention projections (no batch dims); recompute the experts' einsums, the dispatch and the
  # attention core in the backward pass: ~3 GB of saved activations per chip at 1 row x 4096 tokens.
  m.remat = "dots_with_no_batch_dims_saveable"
  c.mesh.data = 1
  c.mesh.fsdp = -1  # FSDP over every device; see the docstring for the intended fsdp x expert split
  c.data.seq_len = 4096  # capacity C = ceil(1.25 * 4096 * 2 / 8) = 1280 tokens per expert per row
  c.data.batch_size = 256  # ~1M tokens per step; divisible by fsdp x expert = 256
  # Mixtral's tokenizer from a local checkpoint directory (no downloads). To start from the published weights
  # instead: maxlm convert --from-hf Mixtral-8x7B-v0.1 --workdir DIR.
  c.data.tokenizer = "Mixtral-8x7B-v0.1/tokenizer.json"
  c.train.steps = 100000
  c.train.learning_rate = 2e-4
  c.train.warmup_steps = 2000
  return c
