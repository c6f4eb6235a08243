"""Range and type checks of model options, shared by the builders: one rule and one message per
kind of option. Each raises ``ValueError`` naming the option and the values it allows; the
registry turns that into a one-line :class:`~pixelwise.models.registry.ModelOptionError`.

They are explicit on purpose: ``check_model_kwargs`` builds a model on the meta device, where a
layer of 0 channels is fine, so a size only the first forward pass would trip over is refused
here, by its name."""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Any

from pixelwise.errors import brief, finite


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def whole_number(name: str, value: Any, minimum: int = 1, maximum: int | None = None) -> int:
    """``value`` as an ``int`` when it is a whole number (an integral float such as ``800.0``
    counts; ``True`` and ``1.5`` do not) in ``[minimum, maximum]``, else ``ValueError``."""
    ok = _is_number(value) and finite(value) and float(value).is_integer() and value >= minimum \
        and (maximum is None or value <= maximum)
    if not ok:
        allowed = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
        raise ValueError(f"{name} must be a whole number {allowed}, got {brief(value)}")
    return int(value)


def number_in(name: str, value: Any, low: float, high: float | None = None, *, high_open: bool = False,
              low_open: bool = False) -> float:
    """``value`` as a ``float`` when it is a finite number in the interval (``[low, high]``,
    ends open where asked; ``high=None``: no upper end), else ``ValueError``."""
    ok = _is_number(value) and finite(value) and (value > low if low_open else value >= low)
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        if high is None:
            allowed = f"{'>' if low_open else '>='} {low:g}"
        else:
            allowed = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a number {allowed}, got {brief(value)}")
    return float(value)


def fraction(name: str, value: Any) -> float:
    """A threshold or a share: a number in ``[0, 1]``."""
    return number_in(name, value, 0.0, 1.0)


def dropout_rate(value: Any, name: str = "dropout") -> float:
    """The one rule of every model with a dropout option: a probability in ``[0, 1)`` (0: none;
    1 would zero the features in training and pass them unchanged in eval)."""
    return number_in(name, value, 0.0, 1.0, high_open=True)


def numbers_of(name: str, value: Any, count: int, positive: bool = False) -> tuple[float, ...]:
    """``count`` finite numbers (each > 0 with ``positive``) as a tuple of floats, else ``ValueError``."""
    items = tuple(value) if isinstance(value, Iterable) and not isinstance(value, str | bytes) else None
    ok = items is not None and len(items) == count and all(_is_number(v) and finite(v) for v in items)
    if ok and positive:
        ok = all(v > 0 for v in items or ())
    if not ok:
        what = "positive numbers" if positive else "numbers"
        raise ValueError(f"{name} must be {count} {what}, got {brief(value)}")
    return tuple(float(v) for v in items or ())
