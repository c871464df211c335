"""maxlm.host: the CPU-host knobs the CLI applies before jax loads (glibc malloc tuning, extra XLA flags), checked
in fresh processes through glibc's own allocation statistics and the environment jax would read."""

import json
import os
import subprocess
import sys

import pytest

# A fresh process: applies host.* from the given overrides, then allocates and frees a 64 MiB block and reports
# how many more blocks glibc had mmap-ed while it was held (mallinfo2's hblks), the XLA_FLAGS jax would read, and
# whether jax was imported along the way.
PROBE = """
import ctypes, json, os, sys
from maxlm import host
from maxlm.config import load_config
done = host.apply(load_config("tiny", sys.argv[1:]))
class MallInfo2(ctypes.Structure):
  _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
before = libc.mallinfo2().hblks
block = libc.malloc(64 << 20)
mmapped = libc.mallinfo2().hblks - before
libc.free(ctypes.c_void_p(block))
print(json.dumps({"done": done, "mmapped": mmapped, "xla_flags": os.environ.get("XLA_FLAGS"),
                  "jax": "jax" in sys.modules}))
"""


def _probe(*overrides: str, platforms: str = "cpu") -> dict:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": platforms,
                                                                     "XLA_FLAGS": "--xla_dump_hlo_as_text"}
  out = subprocess.run([sys.executable, "-c", PROBE, *overrides], env=env, capture_output=True, text=True,
                       check=True, timeout=120)
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and mallinfo2")
def test_auto_tunes_malloc_on_a_cpu_host_and_appends_xla_flags():
  tuned = _probe("--config.host.xla_flags=--xla_cpu_enable_fast_math=false")
  assert tuned["done"] == {"malloc_tuning": True, "xla_flags": "--xla_cpu_enable_fast_math=false"}
  assert tuned["mmapped"] == 0  # the 64 MiB block came from the heap, which is never unmapped
  assert tuned["xla_flags"] == "--xla_dump_hlo_as_text --xla_cpu_enable_fast_math=false"  # the user's flags kept
  assert not tuned["jax"]
  off = _probe("--config.host.malloc_tuning=off")
  assert off["done"]["malloc_tuning"] is False and off["mmapped"] == 1  # glibc's default: a fresh mmap
  assert off["xla_flags"] == "--xla_dump_hlo_as_text"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and mallinfo2")
def test_auto_leaves_an_accelerator_host_alone_unless_asked():
  tpu = _probe("--config.host.xla_flags=--xla_cpu_enable_fast_math=false", platforms="tpu")
  assert tpu["done"] == {"malloc_tuning": False, "xla_flags": ""} and tpu["mmapped"] == 1
  assert tpu["xla_flags"] == "--xla_dump_hlo_as_text"
  forced = _probe("--config.host.malloc_tuning=on", platforms="tpu")
  assert forced["done"]["malloc_tuning"] is True and forced["mmapped"] == 0


def test_bad_value_is_a_config_error_naming_the_key():
  from maxlm.config import ConfigError, load_config  # noqa: PLC0415

  with pytest.raises(ConfigError, match="host.malloc_tuning"):
    load_config("tiny", ["--config.host.malloc_tuning=sometimes"])
