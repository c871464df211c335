"""The default: a ~3M-parameter Llama that trains on the embedded corpus in a few minutes on 2 CPU cores.

Run:  maxlm train --config=configs/tiny.py --workdir=runs/tiny
"""

from maxlm.configs import base


def get_config():
  c = base.get_config()
  c.model.vocab_size = 2048
  c.model.d_model = 256
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.mlp_dim = 768
  c.model.max_seq_len = 1024
  c.model.tie_embeddings = True
  c.model.scan_unroll = 4  # all layers: fastest on XLA:CPU, and 4 layers compile quickly
  c.data.seq_len = 256
  c.data.batch_size = 16
  c.data.max_corpus_mb = 8.0
  c.train.steps = 300
  c.train.learning_rate = 2e-3
  c.train.warmup_steps = 30
  c.train.weight_decay = 0.05
  c.train.eval_every = 100
  c.train.checkpoint_every = 100
  c.train.log_every = 10
  return c
