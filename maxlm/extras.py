"""Optional dependency groups (pyproject extras): the rule lives in data_pipelines.extras, below both packages."""

from data_pipelines.extras import MissingExtra, require

__all__ = ["MissingExtra", "require"]
