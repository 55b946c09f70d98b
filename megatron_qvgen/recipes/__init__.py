"""Whole-run configs by name: ``get_recipe("tiny_wan" | "wan_1_3b" | "wan_14b" | "tiny_cogvideox" |
"cogvideox_2b" | "cogvideox_5b" | "small_wan" | "small_wan_cpu")``."""
from megatron_qvgen.recipes import cogvideox, fidelity, wan  # noqa: F401  # register the recipes
from megatron_qvgen.recipes.registry import get_recipe, recipe, recipe_names

__all__ = ["get_recipe", "recipe", "recipe_names"]
