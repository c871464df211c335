"""Accelerator datasheet figures, one row per device kind: dense peak FLOP/s and memory per JAX device.

metrics.py divides by the FLOP/s (MFU); plan.py reads the memory (`maxlm plan --device NAME`). Pure Python.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Chip:
  """One device kind: dense (no 2:4 sparsity) peak FLOP/s of one JAX device per precision class, and its memory.

  bf16: the bfloat16/float16 tensor-core or MXU rate. fp32: what a float32 matmul runs at under JAX's default
  precision (TF32 tensor cores on Ampere and later, where XLA allows TF32 by default; plain FP32 on Volta;
  bf16 MXU passes on TPU, where DEFAULT precision feeds the MXU bfloat16).
  """

  bf16: float
  fp32: float
  memory_gib: float | None = None  # memory per JAX device; None where not listed (or the kind has several sizes)


_V2, _V3, _V7 = 45e12 / 2, 123e12 / 2, 2307e12 / 2
# Keys are patterns matched against jax's device_kind (see `chip`). Sources: TPU, cloud.google.com/tpu/docs/<version>
# "peak compute per chip" (bf16) and HBM per chip; NVIDIA, the product datasheets (their headline rates are 2x
# sparse; these are the dense halves).
CHIPS: dict[str, Chip] = {
  # ---- Google TPU ----
  # v2 and v3 expose each of a chip's 2 TensorCores as a JAX device: per-chip figure / 2.
  "tpu v2": Chip(_V2, _V2),  # 45 TFLOP/s per chip
  "tpu v3": Chip(_V3, _V3),  # 123 TFLOP/s per chip
  # v4 onwards (until v7) fuse a chip's cores into one device ("megacore"): per-chip figures.
  "tpu v4": Chip(275e12, 275e12, 32),  # v4: 275 TFLOP/s, 32 GiB HBM
  "tpu v4 lite": Chip(138e12, 138e12),  # v4i (inference): 138 TFLOP/s
  "tpu v5 lite": Chip(197e12, 197e12, 16),  # v5e: 197 TFLOP/s, 16 GiB
  "tpu v5e": Chip(197e12, 197e12, 16),
  "tpu v5": Chip(459e12, 459e12, 95),  # v5p reports device_kind "TPU v5": 459 TFLOP/s, 95 GiB
  "tpu v5p": Chip(459e12, 459e12, 95),
  "tpu v6 lite": Chip(918e12, 918e12, 32),  # v6e (Trillium): 918 TFLOP/s, 32 GiB
  "tpu v6e": Chip(918e12, 918e12, 32),
  # v7 (Ironwood, device_kind "TPU7x"): 2,307 bf16 TFLOP/s per chip (4,614 fp8); each of its 2 TensorCores is
  # a JAX device, so / 2.
  "tpu7x": Chip(_V7, _V7),
  "tpu v7": Chip(_V7, _V7),
  "tpu v7x": Chip(_V7, _V7),
  # ---- NVIDIA ----
  # V100 (Volta) has no bf16/TF32 units: fp16 tensor-core rate for half precision, FP32 CUDA cores for fp32.
  "v100": Chip(125e12, 15.7e12),  # SXM2: 125 fp16 / 15.7 fp32 TFLOP/s
  "v100 pcie": Chip(112e12, 14e12),  # PCIe: 112 / 14
  "v100s": Chip(130e12, 16.4e12),  # V100S PCIe: 130 / 16.4
  "a100": Chip(312e12, 156e12),  # SXM4 and PCIe alike: 312 bf16 / 156 TF32; 40 or 80 GB
  "a100 40gb": Chip(312e12, 156e12, 40),  # the memory variants (`maxlm plan --device a100-40 / a100-80`)
  "a100 80gb": Chip(312e12, 156e12, 80),
  "a10": Chip(125e12, 62.5e12),  # A10: 125 bf16 / 62.5 TF32
  "l4": Chip(121e12, 60e12),  # L4: 121 bf16 / 60 TF32 (242 / 120 sparse)
  "l40": Chip(181e12, 90.5e12),  # L40: 181 bf16 / 90.5 TF32 (362 / 181 sparse)
  "l40s": Chip(362e12, 183e12),  # L40S: 362 bf16 / 183 TF32 (733 / 366 sparse)
  "h100": Chip(989e12, 494.5e12, 80),  # SXM ("NVIDIA H100 80GB HBM3"): 989 bf16 / 494.5 TF32, 80 GB
  "h100 pcie": Chip(756e12, 378e12),  # PCIe: 756 / 378
  "h100 nvl": Chip(835e12, 417.5e12),  # NVL: 835 / 417.5
  "h200": Chip(989e12, 494.5e12, 141),  # H200 SXM: same compute as H100 SXM, 141 GB
  "h200 nvl": Chip(835e12, 417.5e12),  # H200 NVL: 835 / 417.5
  "b200": Chip(2.25e15, 1.125e15),  # HGX B200: 2.25 PFLOP/s bf16 / 1.125 TF32 per GPU
  "gb200": Chip(2.5e15, 1.25e15),  # GB200 NVL72: 2.5 PFLOP/s bf16 / 1.25 TF32 per GPU
}

# `maxlm plan --device NAME`: NAME -> its row of CHIPS (rows with one memory size).
PLAN_DEVICES = {"tpu-v4": "tpu v4", "tpu-v5e": "tpu v5e", "tpu-v5p": "tpu v5p", "tpu-v6e": "tpu v6e",
                "h100": "h100", "h200": "h200", "a100-40": "a100 40gb", "a100-80": "a100 80gb"}
DEVICE_MEMORY_GIB: dict[str, float] = {name: CHIPS[row].memory_gib for name, row in PLAN_DEVICES.items()}

# A matmul dtype -> the precision class (Chip field) whose rate bounds it.
PRECISION_CLASS = {
  "bfloat16": "bf16", "bf16": "bf16", "float16": "bf16", "fp16": "bf16", "half": "bf16",
  "float32": "fp32", "fp32": "fp32", "tf32": "fp32",
}


def chip(device_kind: str) -> Chip | None:
  """The row of the longest pattern found in `device_kind`, or None when no pattern matches.

  Matching is case-insensitive, with "-"/"_" read as spaces, on alphanumeric boundaries: "a10" does not match
  "A100" or "A10G"; "tpu v5 lite" wins over "tpu v5", "h100 pcie" over "h100".
  """
  kind = re.sub(r"[-_]", " ", device_kind.lower())  # "Tesla V100-PCIE-16GB" -> "tesla v100 pcie 16gb"
  matches = [p for p in CHIPS if re.search(rf"(?<![a-z0-9]){re.escape(p)}(?![a-z0-9])", kind)]
  return CHIPS[max(matches, key=len)] if matches else None


def peak_flops(device_kind: str, precision: str) -> float | None:
  """Datasheet peak FLOP/s of one device of `device_kind` for precision class "bf16" or "fp32"; None if unknown."""
  row = chip(device_kind)
  return None if row is None else getattr(row, precision)
