"""Whole-run configs by name: ``get_recipe("tiny_wan" | "wan_1_3b" | "wan_14b")``."""
from megatron_qvgen.recipes import wan  # noqa: F401  # registers the Wan recipes
from megatron_qvgen.recipes.registry import get_recipe, recipe, recipe_names

__all__ = ["get_recipe", "recipe", "recipe_names"]
