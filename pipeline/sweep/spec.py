"""A sweep file parsed and validated: base config, grid, repeats, per-trial resources and config.
"""
from __future__ import annotations

import difflib
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline import config as config_mod
from pipeline.config import Config, ConfigError
from pipeline.sisa.driver import resource_share
from pipeline.verbs import runs

TRAINABLE_CPUS = 0.01  # the trial's own process (bundle 0); the shards share the other bundles
SPEC_KEYS = ("name", "base", "overrides", "grid", "num_samples", "forget_count", "max_concurrent_trials",
             "storage_path", "trial_cpus", "trial_gpus")


class SweepError(ConfigError):
    """The sweep file, its grid or its storage directory is unusable; the message names the fix."""


@dataclass(frozen=True)
class SweepSpec:
    """A parsed sweep file: the resolved base config, the grid and how to run it."""
    name: str
    base: dict[str, Any]  # the resolved base Config as a plain (picklable) dict
    grid: dict[str, list] = field(default_factory=dict)  # dotted config key → values
    storage_path: Path = Path(".")
    num_samples: int = 1  # repeats of the grid; repeat r runs with seed = base seed + r
    forget_count: int = 10  # random ids each trial forgets (seeded by the trial seed)
    max_concurrent_trials: int | None = None  # None: as many as the cluster holds
    trial_cpus: float = 1.0  # CPUs one trial reserves: TRAINABLE_CPUS + its shards' share
    trial_gpus: float = 0.0

    @property
    def base_config(self) -> Config:
        return config_mod.from_dict(self.base)

    def points(self) -> list[dict[str, Any]]:
        return expand_grid(self.grid, self.num_samples)


def expand_grid(grid: dict[str, list], num_samples: int = 1) -> list[dict[str, Any]]:
    """Cartesian product of the grid, × repeats: [{"privacy.epsilon": 1.0, ..., "repeat": 0}, ...]."""
    keys = list(grid)
    return [{**dict(zip(keys, values, strict=True)), "repeat": r}
            for r in range(num_samples) for values in itertools.product(*(grid[k] for k in keys))]


def _require(ok: bool, source: Path, key: str, why: str) -> None:
    if not ok:
        raise SweepError(f"sweep file {source}: '{key}' {why}")


def _base_config(raw: dict, source: Path, overrides: list[str] | None) -> Config:
    """The `base` file (next to the sweep file, else the cwd) + inline `overrides` + command-line ones."""
    base = raw.get("base")
    if base is not None:
        found = next((p for p in (source.parent / base, Path(base)) if p.is_file()), None)
        _require(found is not None, source, "base", f"names '{base}', found neither next to the sweep file nor in the cwd.")
        base = found
    inline = raw.get("overrides") or {}
    _require(isinstance(inline, dict), source, "overrides", "must map dotted config keys to values.")
    config = config_mod.load(base).with_overrides(config_mod.flatten(inline))
    return config.with_overrides(dict(config_mod.parse_override(o) for o in overrides or []))


def _storage_path(raw: dict, name: str) -> Path:
    """Absolute sweep directory: storage_path, relative ones under runs.home(); default <home>/sweeps/<name>."""
    path = Path(raw.get("storage_path") or Path("sweeps") / name).expanduser()
    return (path if path.is_absolute() else runs.home() / path).resolve()


def _is_count(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def load_spec(path: str | Path, overrides: list[str] | None = None) -> SweepSpec:
    """Parse and validate a sweep YAML; `overrides` (key=value) apply to the base config."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file '{path}' not found; pass one such as jobs/configs/sweep_digits.yaml.")
    raw = yaml.safe_load(path.read_text()) or {}
    _require(isinstance(raw, dict), path, "(top level)", "must be a mapping of sweep keys.")
    for key in raw:
        close = difflib.get_close_matches(key, SPEC_KEYS, n=1)
        _require(key in SPEC_KEYS, path, key, "is not a sweep key" + (f"; did you mean '{close[0]}'?" if close else ".")
                 + f" Known keys: {', '.join(SPEC_KEYS)}.")
    grid = raw.get("grid") or {}
    _require(isinstance(grid, dict) and bool(grid), path, "grid", "must map dotted config keys to non-empty lists.")
    for key, values in grid.items():
        _require(isinstance(values, list) and bool(values), path, f"grid.{key}", "must be a non-empty list of values.")
    name = str(raw.get("name") or path.stem)
    spec = SweepSpec(name=name, base=_base_config(raw, path, overrides).to_dict(), grid=grid,
                     storage_path=_storage_path(raw, name), num_samples=raw.get("num_samples", 1),
                     forget_count=raw.get("forget_count", 10), max_concurrent_trials=raw.get("max_concurrent_trials"),
                     trial_cpus=raw.get("trial_cpus", 1.0), trial_gpus=raw.get("trial_gpus", 0.0))
    _require(_is_count(spec.num_samples, 1), path, "num_samples", "must be an integer ≥ 1.")
    _require(_is_count(spec.forget_count, 0), path, "forget_count", "must be an integer ≥ 0.")
    _require(spec.max_concurrent_trials is None or _is_count(spec.max_concurrent_trials, 1), path,
             "max_concurrent_trials", "must be an integer ≥ 1, or null for as many as the cluster holds.")
    for key, least in (("trial_cpus", TRAINABLE_CPUS), ("trial_gpus", 0.0)):
        value = getattr(spec, key)
        _require(isinstance(value, (int, float)) and value >= least and not (key == "trial_cpus" and value == least),
                 path, key, f"must be a number {'>' if key == 'trial_cpus' else '≥'} {least:g}; got {value!r}.")
    for point in spec.points():  # every grid point must make a valid config: unknown keys are named
        try:
            trial_config(spec, point)
        except ConfigError as exc:
            raise SweepError(f"sweep file {path}: grid point {point}: {exc}") from None
    return spec


# -- one trial ------------------------------------------------------------------------------------
def trial_config(spec: SweepSpec, point: dict[str, Any]) -> Config:
    """Base + grid point; seed + repeat; tracking off (the sweep logs); per-shard resources pinned."""
    overrides = {k: v for k, v in point.items() if k != "repeat"}
    config = spec.base_config.with_overrides(overrides)
    shards, cpus, gpus = config.shards.count, config.ray.cpus_per_shard, config.ray.gpus_per_shard
    return config.with_overrides({
        "seed": config.seed + point.get("repeat", 0), "tracking.enabled": False,
        "ray.cpus_per_shard": cpus if cpus is not None else resource_share(spec.trial_cpus - TRAINABLE_CPUS, shards),
        "ray.gpus_per_shard": gpus if gpus is not None else resource_share(spec.trial_gpus, shards),
        # trials run in their own processes and dirs: pin the cache the driver warmed, absolutely
        "pretrain.cache_dir": str(Path(config.pretrain.cache_dir or _default_cache_root()).resolve()),
    })


def _default_cache_root() -> Path:
    from pipeline.core.pretrain import cache_dir

    return cache_dir(Config()).parent


def trial_bundles(spec: SweepSpec, point: dict[str, Any]) -> list[dict[str, float]]:
    """[trainable bundle] + one bundle per shard; driver.Ensemble sizes actors from bundles[1:]."""
    config = trial_config(spec, point)
    shard = {"CPU": config.ray.cpus_per_shard, **({"GPU": config.ray.gpus_per_shard} if config.ray.gpus_per_shard else {})}
    return [{"CPU": TRAINABLE_CPUS}] + [shard] * config.shards.count


def trial_dir(spec: SweepSpec, trial_id: str) -> Path:
    return spec.storage_path / "runs" / trial_id

