"""Package-scoped serving models (the builders are in tests/helpers.py)."""

from __future__ import annotations

import pytest
from helpers import make_model, serve_config


@pytest.fixture(scope="package")
def model():
  return make_model(serve_config())


@pytest.fixture(scope="package")
def draft_model():
  return make_model(serve_config("--config.model.num_layers=1", "--config.model.d_model=16"), seed=5)
