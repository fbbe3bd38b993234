"""Search spaces of ``dft tune``: a YAML file mapping dotted config keys to a distribution.

```yaml
train.lr: {loguniform: [1e-5, 1e-3]}
train.warmup_ratio: {uniform: [0, 0.2]}
train.batch_size: {randint: [8, 33]}   # 8 ... 32: the upper bound is excluded
train.epochs: {choice: [2, 3]}
```

Parsing is torch- and ray-free; ``backends/ray_tune.py`` turns a :class:`SearchSpace` into Ray Tune's
distributions. :func:`check_space` runs the bounds and every choice through the job's config schema before
any trial starts, so a value the config refuses fails at once, with the file and the key.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from distributed_ft.config.load import set_key, unknown_key_hint, validate
from distributed_ft.errors import ConfigError

DISTRIBUTIONS = {
    "uniform": "[low, high]: a float drawn uniformly",
    "loguniform": "[low, high]: a float drawn uniformly in log space (0 < low)",
    "randint": "[low, high]: an integer low <= n < high",
    "choice": "[a, b, ...]: one of the listed values",
}
"""The distributions a search space may name, and what each takes."""

TUNE_OWNED = ("run.", "eval.metric")
"""Keys (or prefixes) ``dft tune`` decides for every trial: where and how it runs, what it optimises."""


@dataclass(frozen=True)
class Dimension:
    """One searched key: ``kind`` of :data:`DISTRIBUTIONS` over ``args`` (bounds, or the choices)."""

    key: str
    kind: str
    args: tuple[Any, ...]

    def probes(self) -> list[Any]:
        """Values every trial's config must accept: the bounds (``randint``: low, high - 1), each choice."""
        if self.kind == "choice":
            return list(self.args)
        low, high = self.args
        return [low, high - 1] if self.kind == "randint" else [low, high]


@dataclass(frozen=True)
class SearchSpace:
    """The dimensions of a search, and the file they came from (named in errors)."""

    source: str
    dimensions: tuple[Dimension, ...]

    @property
    def keys(self) -> list[str]:
        return [d.key for d in self.dimensions]


def read_space(path: str | Path) -> SearchSpace:
    """Read and parse a ``space.yaml``.

    Raises:
        ConfigError: The file is missing, not YAML, or not a valid space (:func:`parse_space`).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"search space file {str(path)!r} does not exist (--space space.yaml)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    return parse_space(raw, str(path))


def parse_space(raw: Any, source: str = "space.yaml") -> SearchSpace:
    """Parse the mapping of a search space file (``source`` names it in errors).

    Raises:
        ConfigError: Naming ``source`` and the key: an unknown or tune-owned key, an unknown
            distribution, or bounds / choices that make no distribution.
    """
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(
            f"{source}: a search space maps dotted config keys to a distribution, "
            "e.g. 'train.lr: {loguniform: [1e-5, 1e-3]}'"
        )
    return SearchSpace(source, tuple(_dimension(source, str(key), spec) for key, spec in raw.items()))


def _dimension(source: str, key: str, spec: Any) -> Dimension:
    where = f"{source}: {key}"
    hint = unknown_key_hint(key)
    if hint is not None:
        raise ConfigError(f"{where}: unknown config key{hint}")
    if any(key == owned or (owned.endswith(".") and key.startswith(owned)) for owned in TUNE_OWNED):
        raise ConfigError(
            f"{where}: dft tune sets this key for every trial (run.* and eval.metric); "
            "give it on the command line (key=value) or in the config instead"
        )
    kinds = ", ".join(f"{name} {text}" for name, text in DISTRIBUTIONS.items())
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: give one distribution as {{NAME: [...]}}, NAME one of: {kinds}")
    kind, args = next(iter(spec.items()))
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{where}: {kind} takes a list: {kind} {DISTRIBUTIONS[kind]}")
    if kind == "choice":
        return Dimension(key, kind, tuple(args))
    if len(args) != 2:
        raise ConfigError(f"{where}: {kind} takes two bounds: {kind} {DISTRIBUTIONS[kind]}")
    low, high = (_number(where, kind, value, integer=kind == "randint") for value in args)
    if not low < high:
        raise ConfigError(f"{where}: {kind} needs low < high (got {low}, {high})")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: loguniform needs 0 < low (got {low}); use uniform for a range from 0")
    return Dimension(key, kind, (low, high))


def _number(where: str, kind: str, value: Any, integer: bool) -> float | int:
    """A bound as a number; YAML reads ``1e-5`` (no dot) as a string, which is accepted here."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{where}: {kind} bounds must be numbers (got {value!r})")
    if integer:
        if value != int(value):
            raise ConfigError(f"{where}: randint bounds must be integers (got {value!r})")
        return int(value)
    return float(value)


def apply_params(raw: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A copy of the raw config with each dotted ``key: value`` of ``params`` set."""
    raw = copy.deepcopy(raw)
    for key, value in params.items():
        set_key(raw, key, value)
    return raw


def check_space(space: SearchSpace, base: dict[str, Any]) -> None:
    """Validate the base config with each bound and choice of each key through the config schema.

    Raises:
        ConfigError: ``FILE: KEY: value V is refused by the config: ...``.
    """
    for dimension in space.dimensions:
        for value in dimension.probes():
            try:
                validate(apply_params(base, {dimension.key: value}))
            except ConfigError as exc:
                raise ConfigError(
                    f"{space.source}: {dimension.key}: value {value!r} is refused by the config: {exc}"
                ) from None
