"""Experiment configs: one ml_collections `get_config()` file per experiment, installed as `maxlm.configs`.

A config imports its siblings as `from maxlm.configs import base`, which works from a checkout and installed.
"""
