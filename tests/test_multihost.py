"""Multi-host training through the CLI: 2 processes x 4 CPU devices (jax.distributed, gloo collectives) train
exactly like 1 process x 8 devices, and the pair's checkpoint resumes in a single 1-device process."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from helpers import SMALL_TRAIN

from maxlm import distributed
from maxlm.config import ConfigError, load_config
from maxlm.metrics import read_metrics

COMMON = [*SMALL_TRAIN, "--config.data.batch_size=8", "--config.train.schedule=constant",
          "--config.data.loader_streams=2", "--config.train.checkpoint_every=3", "--config.train.eval_every=0",
          "--config.train.async_checkpointing=false"]
MESH_222 = ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
            "--config.sharding.preset=fsdp_tp"]
TIMEOUT = 600


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _cmd(workdir, *extra):
  return [sys.executable, "-m", "maxlm.cli", "train", f"--workdir={workdir}", *COMMON, *extra]


def _env(devices: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def _losses(workdir) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


@pytest.mark.slow  # ~50 s: two jax.distributed processes; runs in the slow job of .ci/run
def test_two_processes_train_like_one_and_their_checkpoint_resumes_in_one(tmp_path):
  port = _free_port()
  procs = [subprocess.Popen(
    _cmd(tmp_path / "pair", *MESH_222, "--config.train.steps=3", f"--config.distributed.coordinator=127.0.0.1:{port}",
         "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"),
    env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  try:
    outputs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {i}:\n{out[-3000:]}"
  assert "8 device(s) in 2 process(es)" in outputs[0]
  assert "done:" in outputs[0] and "done:" not in outputs[1]  # process 0 reports; the other stays quiet
  assert "INFO" not in outputs[1]

  ref = subprocess.run(_cmd(tmp_path / "ref", *MESH_222, "--config.train.steps=6"), env=_env(8),
                       capture_output=True, text=True, timeout=TIMEOUT)
  assert ref.returncode == 0, ref.stderr[-3000:]
  ref_losses, pair_losses = _losses(tmp_path / "ref"), _losses(tmp_path / "pair")
  assert sorted(pair_losses) == [1, 2, 3]
  # Same global batches (2 fixed loader streams, one per process vs both in one process), same mesh: only the
  # order of cross-process all-reduce sums can differ, a ~1e-7 relative effect.
  for step in (1, 2, 3):
    np.testing.assert_allclose(pair_losses[step], ref_losses[step], rtol=1e-5, err_msg=f"step {step}")

  # One process, one device: the pair's sharded checkpoint (params, Adam moments, both data streams' positions)
  # is read into a 1-device layout and training continues exactly as the uninterrupted 8-device run did.
  one = subprocess.run(_cmd(tmp_path / "pair", "--config.mesh.data=1", "--config.mesh.fsdp=1", "--config.mesh.tensor=1",
                            "--config.train.steps=6"), env=_env(1), capture_output=True, text=True, timeout=TIMEOUT)
  assert one.returncode == 0, one.stderr[-3000:]
  assert "resumed from step 3" in one.stderr
  resumed = _losses(tmp_path / "pair")
  for step in (4, 5, 6):
    np.testing.assert_allclose(resumed[step], ref_losses[step], rtol=1e-5, err_msg=f"step {step}")


@pytest.mark.parametrize("env, expected", [
  ({}, None),
  ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, None),  # a single-task allocation is not a cluster
  ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, "slurm"),
  ({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "2"}, "openmpi"),
  ({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}, "tpu-pod"),
  ({"TPU_WORKER_HOSTNAMES": "t0"}, None),
])
def test_cluster_auto_detection_reads_the_launcher_environment(monkeypatch, env, expected):
  for var in ("SLURM_JOB_ID", "SLURM_NTASKS", "OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(var, raising=False)
  for var, value in env.items():
    monkeypatch.setenv(var, value)
  assert distributed.detected_cluster() == expected


def test_distributed_settings_are_validated():
  with pytest.raises(ConfigError, match="expected HOST:PORT"):
    load_config("tiny", ["--config.distributed.coordinator=localhost"])
  with pytest.raises(ConfigError, match=r"process_id=2 must be in \[0, distributed.num_processes=2\)"):
    load_config("tiny", ["--config.distributed.num_processes=2", "--config.distributed.process_id=2"])
  cfg = load_config("tiny", ["--config.distributed.num_processes=2"])
  with pytest.raises(ValueError, match="needs distributed.coordinator=HOST:PORT"):
    distributed.initialize(cfg.distributed)


def test_single_process_gather_is_the_identity():
  assert distributed.allgather_json({"0": {"pos": 3}}) == [{"0": {"pos": 3}}]
