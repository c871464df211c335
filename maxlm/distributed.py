"""Multi-host runs: `jax.distributed` start-up from config or the cluster's environment, and small host-side
collectives (gathering every process's JSON-able state) used for checkpointing per-host data positions."""

from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np

log = logging.getLogger(__name__)


def detected_cluster() -> str | None:
  """Name of the multi-process launcher found in the environment (SLURM, Open MPI, TPU pod), else None.

  Conservative on purpose: a single-task job, or a library merely being installed, is not a cluster.
  jax.distributed.initialize() then reads the coordinator, process count and index from the same place.
  """
  def count(var: str) -> int:
    try:
      return int(os.environ.get(var, "1"))
    except ValueError:
      return 1
  if "SLURM_JOB_ID" in os.environ and count("SLURM_NTASKS") > 1:
    return "slurm"
  if "OMPI_MCA_orte_hnp_uri" in os.environ and count("OMPI_COMM_WORLD_SIZE") > 1:
    return "openmpi"
  if len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
    return "tpu-pod"
  return None


def initialize(dist) -> bool:
  """Joins the multi-process job described by the `distributed` config section; True if one was joined.

  Must run before anything touches a jax device. With a coordinator the three fields are used as given;
  otherwise, with auto_detect, a SLURM / Open MPI / TPU-pod environment is handed to jax. CPU processes
  talk through gloo collectives (on TPU/GPU this flag is unused).
  """
  if jax.distributed.is_initialized():
    return True
  explicit = bool(dist.coordinator) or dist.num_processes > 1
  cluster = None if explicit or not dist.auto_detect else detected_cluster()
  if not explicit and cluster is None:
    return False
  if explicit and not dist.coordinator:
    raise ValueError(f"distributed.num_processes={dist.num_processes} needs distributed.coordinator=HOST:PORT "
                     "(the address of process 0)")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    if explicit:
      jax.distributed.initialize(dist.coordinator, num_processes=dist.num_processes, process_id=dist.process_id,
                                 initialization_timeout=dist.initialization_timeout)
    else:
      jax.distributed.initialize(initialization_timeout=dist.initialization_timeout)
  except RuntimeError as e:
    if "before" in str(e) and "backend" in str(e).lower():
      raise RuntimeError("jax.distributed must start before any jax computation: call maxlm.distributed."
                         "initialize() first (maxlm train does)") from e
    raise
  log.info("process %d of %d joined (%s); %d local of %d devices", jax.process_index(), jax.process_count(),
           cluster or dist.coordinator, jax.local_device_count(), jax.device_count())
  return True


def allgather_json(obj) -> list:
  """`obj` (JSON-serialisable) from every process, in process order; a plain [obj] with one process."""
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils  # noqa: PLC0415

  data = np.frombuffer(json.dumps(obj, sort_keys=True).encode(), np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(np.asarray([len(data)], np.int32))).reshape(-1)
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:len(data)] = data
  rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
  return [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, lengths)]
