"""Typed job configuration, recipes and overrides."""

from distributed_ft.config.load import dump_config, load_config, recipe_names
from distributed_ft.config.schema import JobConfig

__all__ = ["JobConfig", "dump_config", "load_config", "recipe_names"]
