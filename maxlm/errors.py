"""The error every config check raises, in a leaf module: config.py and logical_rules.py both import it."""

from __future__ import annotations


class ConfigError(ValueError):
  """A config file, key or value that cannot be used; the message names the key."""
