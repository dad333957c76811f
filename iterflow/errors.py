"""Errors that teach: every user-facing check names the argument, the rule and the value."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Generic, NoReturn, TypeVar

T = TypeVar("T")


class InputError(ValueError):
    """The caller's input broke a documented rule.

    Subclasses :class:`ValueError` so library users can catch the usual type; the CLI turns it
    (and only it) into exit status 2 with a one-line message and no traceback.

    Arguments:
        argument: the Python name of the offending argument or option (``"data"``, ``"x"``,
            ``"option 'gamma'"``); the command line shows its flag instead.
        rule: what the value must satisfy, phrased as a requirement.
        value: what was received (shown with ``repr``, shortened).
    """

    def __init__(self, argument: str, rule: str, value: Any) -> None:
        self.argument, self.rule, self.value = argument, rule, value
        shown = repr(value)
        if len(shown) > 120:
            shown = shown[:117] + "..."
        super().__init__(f"{argument}: {rule} (got {shown})")


def fail(argument: str, rule: str, value: Any) -> NoReturn:
    """Raise :class:`InputError` — a one-liner for validation code."""
    raise InputError(argument, rule, value)


class Registry(Generic[T], Mapping[str, T]):
    """Name -> object mapping whose lookups fail with the list of valid names."""

    def __init__(self, kind: str, items: Mapping[str, T] | None = None) -> None:
        self.kind = kind
        self._items: dict[str, T] = dict(items or {})

    def register(self, name: str, obj: T | None = None) -> Any:
        """Register ``obj`` under ``name``; without ``obj`` acts as a decorator."""

        def deco(o: T) -> T:
            if name in self._items:
                raise KeyError(f"{self.kind} {name!r} registered twice")
            self._items[name] = o
            return o

        return deco(obj) if obj is not None else deco

    def get(self, name: str, argument: str | None = None) -> T:  # type: ignore[override]
        if not isinstance(name, str) or name not in self._items:
            fail(argument or self.kind, f"must be one of {sorted(self._items)}", name)
        return self._items[name]

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def names(self) -> list[str]:
        return sorted(self._items)


def check_finite(x: Any, argument: str) -> None:
    """Fail if a tensor/array holds NaN or inf, saying how many and where the first one is."""
    import numpy as np
    import torch

    if isinstance(x, torch.Tensor):
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            idx = tuple(int(i) for i in bad.nonzero()[0])
            fail(
                argument,
                "must contain only finite values",
                f"{int(bad.sum())} NaN/inf entries, first at index {idx}",
            )
    else:
        arr = np.asarray(x)
        bad = ~np.isfinite(arr)
        if bad.any():
            idx = tuple(int(i) for i in np.argwhere(bad)[0])
            fail(
                argument,
                "must contain only finite values",
                f"{int(bad.sum())} NaN/inf entries, first at index {idx}",
            )


def check_choice(value: Any, choices: Iterable[Any], argument: str) -> None:
    choices = list(choices)
    if value not in choices:
        fail(argument, f"must be one of {choices}", value)


def check_positive(
    value: Any, argument: str, *, integer: bool = False, allow_zero: bool = False
) -> None:
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        fail(argument, "must be an integer" if integer else "must be a number", value)
    if value < 0 or (value == 0 and not allow_zero) or value != value:
        fail(argument, "must be >= 0" if allow_zero else "must be > 0", value)
