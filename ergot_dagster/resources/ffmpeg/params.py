"""Typed checks of recipe parameters: a bad value fails the stage naming the parameter."""

from __future__ import annotations

import math
from collections.abc import Sequence

from ergot_dagster.errors import PermanentRuntimeError
from ergot_dagster.resources.ffmpeg.recipe import RecipeContext


def int_param(ctx: RecipeContext, name: str, default: int, *, low: int, high: int) -> int:
    """Parameter `name` as an int in [low, high]; a whole float (3.0 from JSON) is accepted."""
    value = ctx.param(name, default)
    # bool is an int subclass; `true` for a width is a mistake, not 1.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise PermanentRuntimeError(f"parameter {name!r} must be an integer, not {value!r}")
    if not low <= value <= high:
        raise PermanentRuntimeError(f"parameter {name!r} must be in {low}..{high}, not {value}")
    return value


def float_param(ctx: RecipeContext, name: str, default: float, *, low: float, high: float) -> float:
    """Parameter `name` as a finite float in [low, high]."""
    value = ctx.param(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PermanentRuntimeError(f"parameter {name!r} must be a number, not {value!r}")
    number = float(value)
    if not math.isfinite(number) or not low <= number <= high:
        raise PermanentRuntimeError(f"parameter {name!r} must be in {low:g}..{high:g}, not {value}")
    return number


def choice_param(ctx: RecipeContext, name: str, default: str, choices: Sequence[str]) -> str:
    value = ctx.param(name, default)
    if not isinstance(value, str) or value not in choices:
        raise PermanentRuntimeError(
            f"parameter {name!r} must be one of {', '.join(choices)}, not {value!r}"
        )
    return value
