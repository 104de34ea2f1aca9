"""Recipes from plain data and YAML files: ``preset: NAME`` starts from a preset, other keys
replace its parts. (Here rather than in ``lowbit.scheme``, because presets are built from the
scheme's types: scheme <- presets <- recipes, no cycle.)"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from lowbit.errors import LowbitError
from lowbit.presets import get_preset
from lowbit.scheme import Recipe, Step, derived_name, merge_scheme, scheme_from_dict, steps_from_list, to_dict


def recipe_from_dict(data: Mapping[str, Any], where: str = "recipe", default_name: str = "custom") -> Recipe:
    """A recipe from plain data. ``preset: NAME`` starts from a preset; other keys replace its parts."""
    allowed = ("name", "preset", "scheme", "steps")
    if not isinstance(data, Mapping):
        raise LowbitError(f"{where}: expected a mapping with keys {allowed}")
    for key in data:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise LowbitError(f"{where}: unknown field {key!r}{hint}; valid fields: {', '.join(allowed)}")
    base = get_preset(str(data["preset"])) if "preset" in data else None
    if "scheme" in data and base is not None:  # the preset's scheme, changed field by field
        scheme = scheme_from_dict(
            merge_scheme(to_dict(base.scheme), data["scheme"], f"{where}.scheme"), f"{where}.scheme"
        )
    elif "scheme" in data:
        scheme = scheme_from_dict(data["scheme"], f"{where}.scheme")
    elif base:
        scheme = base.scheme
    else:
        raise LowbitError(f"{where}: give a 'scheme' or a 'preset' to start from")
    steps = (
        steps_from_list(data["steps"], f"{where}.steps")
        if "steps" in data
        else (base.steps if base else (Step("rtn"),))
    )
    # a preset's name only while its scheme and steps are kept; a changed preset says how it changed
    recipe = Recipe(scheme=scheme, steps=steps, name=base.name if base is not None else default_name)
    if data.get("name"):
        recipe = dataclasses.replace(recipe, name=str(data["name"]))
    elif base is not None:
        recipe = dataclasses.replace(recipe, name=derived_name(base, recipe))
    name = recipe.name
    if "/" in name or "\\" in name or ".." in name or name.startswith("."):  # it names an output directory
        raise LowbitError(
            f"{where}: recipe name {name!r} may not contain '/', '\\' or '..' nor start with '.', because it "
            "becomes part of the output directory's name; use letters, digits, '-' and '_'"
        )
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe YAML file (see ``recipe_from_dict``)."""
    p = Path(path)
    if not p.is_file():
        raise LowbitError(f"recipe file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise LowbitError(f"recipe file {p} is not UTF-8 text ({e}); save it as UTF-8") from None
    except yaml.YAMLError as e:
        raise LowbitError(f"recipe file {p} is not valid YAML: {e}") from None
    return recipe_from_dict(data or {}, where=p.name, default_name=p.stem)
