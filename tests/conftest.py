"""Session set-up before any test imports jax: an isolated cache, eight simulated CPU devices (see helpers.py)."""

import os
import tempfile

# One cache per test session (tokenizer + tokenized corpus are built once, reused by every test and
# by the CLI subprocesses, which inherit the environment). Never the user's ~/.cache.
os.environ.setdefault("MAXLM_CACHE", tempfile.mkdtemp(prefix="maxlm-test-cache-"))

import jax  # noqa: E402

# Eight simulated CPU devices for the in-process tests (meshes of 1, 2, 4 or 8 are built over subsets).
# A jax config option, not XLA_FLAGS: CLI subprocesses started by tests keep their own device count.
jax.config.update("jax_num_cpu_devices", 8)
