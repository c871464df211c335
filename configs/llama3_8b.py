"""Llama-3-8B's real shape (8.03B parameters). Too large for a CPU; meant for a TPU pod or GPU cluster.

Inspect without allocating:  maxlm train --config=configs/llama3_8b.py --dry_run
"""

from maxlm.configs import base


def get_config():
  c = base.get_config()
  m = c.model
  m.vocab_size = 128256
  m.d_model = 4096
  m.num_layers = 32
  m.num_heads = 32
  m.num_kv_heads = 8
  m.mlp_dim = 14336
  m.max_seq_len = 8192
  m.rope_theta = 500000.0
  m.rms_norm_eps = 1e-5
  m.tie_embeddings = False
  m.remat = "dots_with_no_batch_dims_saveable"
  c.data.seq_len = 8192
  c.data.batch_size = 256
  # Llama-3's tokenizer from a local checkpoint directory (its tokenizer.json; no downloads). To start from the
  # published weights instead: maxlm convert --from-hf Meta-Llama-3-8B --workdir DIR.
  c.data.tokenizer = "Meta-Llama-3-8B/tokenizer.json"
  c.train.steps = 100000
  c.train.learning_rate = 3e-4
  c.train.warmup_steps = 2000
  return c
