"""Recipe registry: ``get_recipe("wan_14b")`` -> a validated ExperimentConfig.

A recipe is a function without arguments returning an ExperimentConfig; modules register theirs with
``@recipe("name")`` and are imported by ``megatron_qvgen.recipes``.
"""
from __future__ import annotations

from typing import Callable, Dict, List

from megatron_qvgen.config import ConfigError, ExperimentConfig

RecipeFn = Callable[[], ExperimentConfig]
_RECIPES: Dict[str, RecipeFn] = {}


def recipe(name: str) -> Callable[[RecipeFn], RecipeFn]:
    def register(fn: RecipeFn) -> RecipeFn:
        if name in _RECIPES:
            raise ValueError(f"recipe {name!r} is registered twice")
        _RECIPES[name] = fn
        return fn

    return register


def get_recipe(name: str) -> ExperimentConfig:
    if name not in _RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; known recipes: {', '.join(sorted(_RECIPES))}")
    return _RECIPES[name]()


def recipe_names() -> List[str]:
    return sorted(_RECIPES)


def recipe_summary(name: str) -> str:
    """The first sentence of the recipe's docstring, on one line (what ``--help`` shows next to its name)."""
    if name not in _RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; known recipes: {', '.join(sorted(_RECIPES))}")
    first_paragraph = (_RECIPES[name].__doc__ or "").strip().split("\n\n")[0]
    return " ".join(first_paragraph.split()).split(". ")[0].rstrip(".")
