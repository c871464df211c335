"""configs/tiny.py as a Mixture of Experts: 4 experts, top-2, capacity 1.25; trains on 2 CPU cores.

Run:  maxlm train --config=configs/tiny_moe.py --workdir=runs/tiny_moe
"""

from maxlm.configs import tiny


def get_config():
  c = tiny.get_config()
  m = c.model
  m.num_experts = 4
  m.num_experts_per_tok = 2
  m.mlp_dim = 384  # per expert: 2 of 4 active = the compute of tiny's 768-wide MLP, twice its MLP parameters
  m.moe_capacity_factor = 1.25  # GShard dispatch (the expert-parallel path); 0 = dropless
  m.moe_aux_loss_coef = 0.01
  return c
