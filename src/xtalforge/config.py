"""Run configuration: one typed dataclass per TOML section, every default here.

Loading validates the file: unknown keys and wrong types are errors naming the key.
The resolved configuration (all defaults filled in) is written into each run
directory as ``config.toml``.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from xtalforge.errors import ConfigError


@dataclass
class OracleConfig:
    """The reference calculator ("oracle")."""

    name: str = "sevennet"  # registry name or "module:Class"
    settings: dict[str, Any] = field(default_factory=dict)  # keyword arguments for the calculator
    timeout_s: float | None = None  # per single point; None = no limit
    executor: Literal["serial"] = "serial"


@dataclass
class StructuresConfig:
    """Candidate generation constraints (seed 004, Table I)."""

    mode: Literal["symmetric", "random"] = "symmetric"
    # Per-pair minimum distances in Å, e.g. {"Si-Si" = 1.6, "Na-Cl" = 1.5}; pairs not
    # given default to min_distance_scale × (sum of covalent radii).
    min_distances: dict[str, float] = field(default_factory=dict)
    min_distance_scale: float = 0.7
    lattice_min: float = 2.0  # Å, shortest allowed lattice-vector length
    lattice_max: float = 15.0  # Å, longest allowed lattice-vector length
    # Volume per atom range in Å³; None = derived from atomic volumes.
    volume_per_atom: list[float] | None = None
    volume_scale_range: list[float] = field(default_factory=lambda: [0.8, 1.6])
    spacegroups: list[int] | None = None  # restrict symmetric generation; None = all compatible
    max_attempts: int = 200  # bounded retries before an impossible-constraints error
    pyxtal_timeout_s: float = 10.0  # abandon one PyXtal attempt after this long


@dataclass
class RelaxConfig:
    """Local relaxation of positions and cell."""

    optimizer: Literal["FIRE", "LBFGS"] = "FIRE"
    fmax: float = 0.05  # eV/Å (search)
    smax_gpa: float = 2.0  # GPa (search)
    max_steps: int = 300
    patience: int = 20  # stop when the energy has not decreased for this many steps
    validation_fmax: float = 0.02  # eV/Å (seed 000)
    validation_smax_gpa: float = 0.4  # GPa (seed 000)
    validation_max_steps: int = 500
    min_distance_factor: float = 0.5  # fail when a pair is closer than this × its minimum distance
    energy_bounds: list[float] = field(default_factory=lambda: [-50.0, 50.0])  # eV/atom sanity bounds
    max_volume_factor: float = 4.0  # fail when the volume grows beyond this × the initial one
    max_lattice_length: float = 50.0  # Å, fail when a lattice vector grows longer than this
    min_distance_floor: float = 0.5  # Å, fail below this when no per-pair minimum distances are given


@dataclass
class SearchConfig:
    method: Literal["random", "active"] = "random"
    max_oracle_calls: int = 20000
    max_candidates: int | None = None
    target: str | None = None  # CIF/structure file, relative to the config file
    stop_at_target: bool = True
    top_k: int = 10
    energy_tol: float = 0.005  # eV/atom, duplicates must also agree in energy within this


# -- sections of later components are added below this line --


@dataclass
class RunConfig:
    composition: str
    formula_units: int = 1
    seed: int = 0
    pressure_gpa: float = 0.0  # external pressure; rankings use enthalpy when non-zero
    oracle: OracleConfig = field(default_factory=OracleConfig)
    structures: StructuresConfig = field(default_factory=StructuresConfig)
    relax: RelaxConfig = field(default_factory=RelaxConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    base_dir: Path = field(default=Path("."), metadata={"internal": True})

    def resolve_path(self, path: str | None) -> Path | None:
        """A path from the config, taken relative to the config file."""
        if path is None:
            return None
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self.base_dir / p)


def load_config(path: str | Path) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found: pass the path of a TOML file")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML ({exc})") from None
    config = from_dict(RunConfig, data)
    config.base_dir = path.resolve().parent
    return config


def from_dict(cls, data: dict, where: str = ""):
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'top level'} must be a table, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key {_key(where, unknown[0])!r}: valid keys here are {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(hints[name], value, _key(where, name))
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing required key {_key(where, missing[0])!r}")
    return cls(**kwargs)


def to_dict(config) -> dict:
    """Plain dict of a config dataclass, without internal fields or None values."""
    out = {}
    for f in dataclasses.fields(config):
        if f.metadata.get("internal"):
            continue
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        if value is not None:
            out[f.name] = value
    return out


def dump_toml(config) -> str:
    """Serialise a config dataclass as TOML (scalars first, then one table per section)."""
    return _toml_table(to_dict(config), prefix="")


def _toml_table(table: dict, prefix: str) -> str:
    scalars = [(k, v) for k, v in table.items() if not isinstance(v, dict) or not _is_section(v)]
    sections = [(k, v) for k, v in table.items() if isinstance(v, dict) and _is_section(v)]
    lines = [f"{k} = {_toml_value(v)}" for k, v in scalars]
    for k, v in sections:
        name = f"{prefix}{k}"
        lines.append("")
        lines.append(f"[{name}]")
        body = _toml_table(v, prefix=f"{name}.")
        if body:
            lines.append(body)
    return "\n".join(lines).strip("\n") + "\n"


def _is_section(value: dict) -> bool:
    # Free-form dicts (oracle settings, pair distances) are written inline.
    return any(isinstance(v, dict) for v in value.values()) or len(value) > 4 or not value


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f'"{k}" = {_toml_value(v)}' for k, v in value.items()) + "}"
    if isinstance(value, Path):
        return _toml_value(str(value))
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _key(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _convert(hint, value, key: str):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key} = {value!r} is not allowed: choose one of {', '.join(map(repr, args))}")
        return value
    if hint is Any:
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {type(value).__name__}")
        return [_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a table, got {type(value).__name__}")
        return {k: _convert(args[1], v, f"{key}.{k}") for k, v in value.items()} if args else value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {type(value).__name__} {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {type(value).__name__} {value!r}")
        return value
    if hint in (str, bool):
        if not isinstance(value, hint):
            raise ConfigError(f"{key} must be a {hint.__name__}, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {hint}")
