"""Method configuration: dataclasses that map 1:1 onto JSON / YAML."""

from __future__ import annotations

import dataclasses
import difflib
import json
from typing import Any, ClassVar


@dataclasses.dataclass
class MethodConfig:
    """Fields shared by every method.

    Args:
        targets: roles of the backbone spec (``"qkv"``, ``"mlp"``, ``"block"`` ...) or module-name
            patterns (a full module name, a dotted suffix, or a regular expression matched in full).
            ``None`` takes the method's default roles for the backbone.
        exclude: module-name patterns removed from the matched targets.
        layers: indices of the blocks to adapt (global block order of the backbone); ``None`` = all.
        init_weights: ``True`` uses the paper's initialisation; ``False`` a non-trivial random one,
            so that equivalence tests can fail.
        modules_to_save: module names trained and saved alongside the adapter. ``None`` = the
            backbone's classification head (when it has one); ``[]`` = nothing.
    """

    method: ClassVar[str] = ""

    targets: list[str] | None = None
    exclude: list[str] | None = None
    layers: list[int] | None = None
    init_weights: bool = True
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        for name in ("targets", "exclude", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, [value])
        if self.layers is not None:
            if isinstance(self.layers, int):
                self.layers = [self.layers]
            self.layers = [int(i) for i in self.layers]
        self._check_shared()
        self.validate()

    # hyper-parameters that several methods share, checked once here for every method that has them
    _POSITIVE: ClassVar[tuple[str, ...]] = ("rank", "bottleneck", "num_tokens", "reduction", "kernel_size", "alpha")
    _UNIT: ClassVar[tuple[str, ...]] = ("dropout",)

    def _check_shared(self) -> None:
        for name in self._POSITIVE:
            value = getattr(self, name, None)
            if value is not None:
                self._positive(**{name: value})
        for name in self._UNIT:
            if hasattr(self, name):
                value = getattr(self, name)
                if not 0.0 <= value < 1.0:
                    raise ValueError(f"{type(self).__name__}.{name} must lie in [0, 1), got {value!r}")

    def validate(self) -> None:
        """Raise ``ValueError`` for out-of-range method-specific hyper-parameters (shared ones such as
        ``rank``, ``bottleneck`` and ``dropout`` are checked for every method before)."""

    def _one_of(self, name: str, value: object, choices: tuple) -> None:
        if value not in choices:
            raise ValueError(f"{type(self).__name__}.{name} must be one of {list(choices)}, got {value!r}")

    def _positive(self, **values: float) -> None:
        for key, value in values.items():
            if value is None or value <= 0:
                raise ValueError(f"{type(self).__name__}.{key} must be > 0, got {value!r}")

    def _in_range(self, name: str, value: float, lo: float, hi: float) -> None:
        if not lo <= value <= hi:
            raise ValueError(f"{type(self).__name__}.{name} must lie in [{lo}, {hi}], got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        out = {"method": self.method}
        out.update(dataclasses.asdict(self))
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodConfig:
        """Build a config from a mapping; an unknown key fails and suggests the right one."""
        data = dict(data)
        method = data.pop("method", cls.method)
        if cls.method and method and method != cls.method:
            raise ValueError(f"config is for method {method!r}, not {cls.method!r}")
        names = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"unknown option {key!r} for {cls.__name__}{hint} Options: {', '.join(names)}")
        return cls(**data)
