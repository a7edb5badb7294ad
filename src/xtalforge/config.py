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
    # Volume per atom range in Å³; None = volume_scale_range × the mean atomic volume
    # (mean of covalent and vdW sphere volumes; the reference crystals lie at 0.64-1.32 ×).
    volume_per_atom: list[float] | None = None
    volume_scale_range: list[float] = field(default_factory=lambda: [0.6, 1.5])
    spacegroups: list[int] | None = None  # restrict symmetric generation; None = all compatible
    # Symmetric structures fill the group's "conventional" cell, or its "primitive" cell (a
    # centred group's conventional cell then holds 2-4 times the atoms; corundum Al4O6 needs this).
    cell: Literal["conventional", "primitive"] = "conventional"
    max_attempts: int = 200  # bounded retries before an impossible-constraints error
    pyxtal_timeout_s: float = 10.0  # abandon one PyXtal attempt after this long


@dataclass
class RelaxConfig:
    """Local relaxation of positions and cell."""

    # FIRE is cheapest from random starts, BFGS near a minimum (validation): 39% fewer
    # SevenNet-0 calls over 32 stored validations, the same minima (README, "Validation optimizer").
    optimizer: Literal["FIRE", "LBFGS", "BFGS"] = "FIRE"
    fmax: float = 0.05  # eV/Å (search)
    smax_gpa: float = 2.0  # GPa (search)
    max_steps: int = 300
    patience: int = 20  # stop when the energy has not decreased for this many steps
    validation_fmax: float = 0.02  # eV/Å (seed 000)
    validation_smax_gpa: float = 0.4  # GPa (seed 000)
    validation_max_steps: int = 500
    validation_optimizer: Literal["FIRE", "LBFGS", "BFGS"] = "BFGS"
    # BFGS validation starts from the searching model's Hessian where the strategy has a model (the
    # active search's ensemble): 3.6x fewer SevenNet-0 calls over 61 validations, the same minimum in
    # 60 (benchmarks/validation_hessian.py). "identity" = ASE's default; ignored by FIRE and LBFGS.
    validation_hessian: Literal["model", "identity"] = "model"
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
    max_wall_time_s: float | None = None  # stop starting new candidates after this long (whole run)
    target: str | None = None  # CIF/structure file, relative to the config file
    stop_at_target: bool = True
    top_k: int = 10
    energy_tol: float = 0.005  # eV/atom, duplicates must also agree in energy within this
    # Random search: relax its best n distinct structures again at the [relax] validation thresholds
    # (within the oracle budget), so the reported minima are converged: at the search's 2 GPa stress
    # tolerance SevenNet-0 leaves diamond Si8 tetragonal by 4 % (I4_1/amd). 0 = off.
    validate_top: int = 3


# -- sections of later components are added below this line --


@dataclass
class PotentialConfig:
    """Behler–Parrinello NNP ensemble (seed 000 II.B; seed 003 secs. 2, 3.2–3.4, 5; seed 004 V.A)."""

    # Symmetry functions: per element pair 8 radial + 18 angular within 6 Å (seed 000, SIMPLE-NN's set).
    cutoff: float = 6.0  # Å
    radial_eta: list[float] = field(
        default_factory=lambda: [0.003214, 0.035711, 0.071421, 0.124987, 0.214264, 0.357106, 0.714213, 1.428426]
    )  # Å⁻²
    radial_shift: list[float] | None = None  # Å, one per radial eta; None = all 0
    # "g5": angular functions without the r_jk factor, exact moment expansion, cost ∝ neighbours;
    # "g4": Behler's G4 with r_jk, explicit triplets, cost ∝ neighbours² (about 10× slower).
    angular: Literal["g5", "g4"] = "g5"
    angular_eta: list[float] = field(default_factory=lambda: [0.000357, 0.028569, 0.089277])  # Å⁻²
    angular_zeta: list[int] = field(default_factory=lambda: [1, 2, 4])
    angular_lambda: list[int] = field(default_factory=lambda: [-1, 1])
    pca_tol: float = 1e-5  # PCA directions with correlation eigenvalue below this × the largest are dropped
    # Networks: one MLP per element (seed 000: 30-30).
    hidden_layers: list[int] = field(default_factory=lambda: [30, 30])
    # SiLU trained to half the force error of tanh in the same epochs on Stillinger-Weber Si.
    activation: Literal["tanh", "sigmoid", "silu", "softplus"] = "silu"
    n_models: int = 5  # ensemble members (seed 004: 5)
    # "independent": N networks from different initialisations and validation splits;
    # "replica": one reference network plus N-1 replicas of other widths trained on its
    # atomic energies (seed 003 section 5).
    ensemble: Literal["independent", "replica"] = "independent"
    dtype: Literal["float32", "float64"] = "float32"  # float32 is about 2× faster on CPU
    device: str = "cpu"
    # Training: Adam on minibatches, 10 % validation (seed 000).
    epochs: int = 1000  # at most
    batch_size: int = 16  # structures per minibatch
    lr: float = 2e-3
    lr_decay: float = 0.5  # learning rate × this when the validation loss stalls ...
    lr_patience: int = 15  # ... for this many epochs
    min_lr: float = 1e-5
    patience: int = 50  # early stopping: epochs without validation improvement
    max_time_s: float | None = None  # wall-clock limit per model
    val_fraction: float = 0.1
    # Loss = Σ weight × MSE / target² (each term is 1 when its RMSE is at its target) + l2 Σ w².
    energy_weight: float = 1.0  # energy per atom
    force_weight: float = 5.0  # forces carry 3N numbers per structure: weight them up
    stress_weight: float = 0.1
    l2: float = 1e-6
    target_energy_mev_atom: float = 10.0  # seed 000
    target_force_ev_a: float = 0.2
    target_stress_kbar: float = 10.0
    stop_at_targets: bool = True  # stop as soon as all validation RMSEs are below their targets
    # Gaussian density function weighting of the force loss (seed 003 eqs. 4-5).
    gdf_weighting: bool = False
    gdf_sigma: float = 0.2  # Gaussian width in whitened feature space
    gdf_max_weight: float = 10.0
    # Structures whose largest force lies more than this many standard deviations above the
    # mean of the largest forces are left out (seed 004 V.A); None keeps all.
    force_outlier_sigma: float | None = 3.0
    # Structures more than this many eV/atom above the lowest structure of their composition are
    # left out (before the force outliers): a small network spends its capacity on the region a
    # search ranks, not on collapsed random structures many eV/atom higher. None keeps all.
    energy_window: float | None = None
    # ZBL repulsion below the shortest distance of each element pair in the training data.
    zbl: bool = True
    zbl_switch_width: float = 0.5  # Å over which the repulsion switches on


@dataclass
class MeltQuenchConfig:
    """Melt–quench–anneal training-set MD (seed 000 section II.A); the paper's values in comments."""

    n_atoms: int = 64  # about this many atoms, whole formula units (paper ~100); 0 = the run's composition as is
    # Random start (paper: ~100 atoms placed randomly): volume per atom as a multiple of the mean
    # atomic volume of [structures] (0.9 ≈ solid density), cell lengths within this range × V^(1/3)
    initial_volume_scale: float = 0.9
    cell_length_range: list[float] = field(default_factory=lambda: [0.8, 1.3])
    thermostat: Literal["langevin", "bussi", "nose_hoover"] = "langevin"
    coupling_fs: float = 100.0  # thermostat time constant
    timestep_fs: float | None = None  # None = 0.38 fs × sqrt(lightest mass / amu), 2 fs for Si
    frame_interval_fs: float = 20.0  # keep one frame this often (paper 20 fs)
    superheat_K: float = 4000.0  # paper 4000 K
    superheat_ps: float = 2.0  # paper 5 ps
    melt_search_start_K: float | None = None  # None = superheat_K - melt_search_step_K
    melt_search_step_K: float = 500.0  # cooling step (paper: "gradually"; its T_m are multiples of 500 K)
    melt_search_min_K: float = 500.0  # lowest temperature tried
    melt_search_ps: float = 1.0  # MD per trial temperature (paper: not given)
    liquid_msd_slope: float = 1.0  # Å²/ps: MSD slope above which the cell counts as liquid (6D; D = 1.7e-5 cm²/s)
    msd_skip_fraction: float = 0.25  # start of each segment left out of the MSD fit (equilibration)
    msd_min_lag_fs: float = 100.0  # shortest MSD lag fitted (past the vibrational plateau's rise)
    volume_ps: float = 0.5  # MD per pressure-adjustment iteration
    volume_max_iterations: int = 5
    pressure_tol_gpa: float = 0.5  # |mean pressure| below which the volume is accepted (paper: "zero")
    bulk_modulus_gpa: float = 50.0  # first guess for the volume update, then secant estimates
    max_volume_step: float = 0.1  # largest fractional volume change per iteration
    liquid_ps: float = 4.0  # NVT liquid at T_m (paper 20 ps)
    quench_rate_K_per_ps: float = 200.0  # paper 100 K/ps
    quench_final_K: float = 300.0  # paper 300 K
    anneal_K: float = 500.0  # paper 500 K
    anneal_ps: float = 3.0  # paper 15 ps
    keep_phases: list[str] = field(default_factory=lambda: ["superheat", "liquid", "quench", "anneal"])  # also: melt_search, volume
    checkpoint_every: int = 250  # MD steps between checkpoints


@dataclass
class OnTheFlyConfig:
    """On-the-fly sampling (seed 003 section 3.3.2): the ensemble drives MD, the oracle labels uncertain frames."""

    uncertainty_threshold: float = 0.15  # relative force uncertainty U (seed 004 eq. 5) above which a candidate is labelled
    max_uncertainty: float = 1.0  # above this U the oracle also drives that MD step (the NNP is lost there)
    bootstrap_steps: int = 100  # oracle-driven MD steps at the start; their frames train the first ensemble
    bootstrap_stride: int = 2  # keep every this-many-th bootstrap step as a training frame
    retrain_every: int = 10  # retrain the ensemble after this many new oracle frames
    # ... and only once the training set has grown by this fraction since the last training:
    # 0 retrains every retrain_every frames; 0.5 keeps the total retraining cost to about three
    # trainings on the final set however many frames are labelled.
    retrain_growth: float = 0.0
    n_models: int = 3  # ensemble size


@dataclass
class ActiveConfig:
    """Active-learning pool search (seed 004); defaults from the paper and the authors' code."""

    search_pool: Literal["symmetric", "random"] = "symmetric"  # candidates the minima are searched in
    per_spacegroup: int = 30  # symmetric search-pool candidates per compatible space group
    spacegroups: list[int] | None = None  # None = structures.spacegroups, else all compatible
    search_pool_size: int = 1000  # search-pool size when search_pool = "random"
    training_pool_size: int = 1000  # random candidates whose labels train the ensemble
    training_formula_units: int | None = None  # transferability: training pool of another cell size
    # Pool that supplies labels after the first cycle. The authors label the training pool only;
    # with these BPNN ensembles that left the search pool unlearnt (Si16/sw: no diamond in 10 cycles),
    # labels from both pools plus u_force_floor found it in 2 of 3 seeds (benchmarks/search_efficiency.py).
    label_from: Literal["training", "all"] = "all"
    batch_size: int = 100  # oracle single points per cycle
    max_cycles: int = 15  # the ensemble (size, architecture, training) is set in [potential]
    force_weight: float = 0.5  # ω_f of the selection score (eq. 2)
    noise: float = 0.4  # ε, Å, position noise before labelling (eq. 3)
    noise_damping: float = 0.6  # ω_ε, noise of cycle t is ε·ω_ε^t (eq. 4)
    noise_first_cycle: bool = False  # the first (random) batch is labelled without noise
    dbscan_eps: float = 0.5  # on standardised mean-pooled features
    dbscan_min_samples: int = 2
    u_max: float = 0.5  # stop relaxing a pool structure when U (eq. 5) passes this
    # Where each cycle's relaxation starts. "relaxed": the pool keeps the previous cycle's relaxed
    # structures (II.E). "initial": every cycle relaxes the candidates as generated, so the early,
    # poorly trained ensembles cannot move candidates out of a basin for good (our change: on
    # Si16/SevenNet-0, 13 of 618 initial candidates relax into diamond with a well-trained ensemble,
    # 1 of them after five cycles of "relaxed").
    relax_from: Literal["relaxed", "initial"] = "relaxed"
    # U = max σ_f / max(max |f̄|, floor): None = relax.fmax (eq. 5 except at vanishing forces); a
    # larger floor makes the bound absolute (σ_f <= u_max × floor) for structures with small forces.
    # With eq. 5's bare ratio ~80 % of a Si16 pool stopped on U a few steps into every cycle and
    # never reached its minima; with 1 eV/Å it relaxed (see label_from).
    u_force_floor: float | None = 1.0  # eV/Å
    stop_k: int = 3  # lowest clusters tracked by the stopping rule and validated
    stop_cycles: int = 1  # n_cycle: earlier pools compared with the current one
    stop_tol: float = 0.01  # eV/atom
    stop_include_training: bool = False  # clusters for stopping/validation from the search pool only
    # The stopping rule presumes a pool relaxed close to its minima: it is not applied while more
    # than this fraction of the search pool stopped relaxing on uncertainty (U > u_max) in the cycle.
    stop_max_uncertain: float = 0.5
    validate: bool = True  # relax the best structure of each of the stop_k lowest clusters with the oracle
    validate_lowest: int | None = None  # also validate the n lowest pool structures outside them; None = stop_k
    # Where those n lowest come from: the "search" pool (as the clusters), or "all" structures the
    # ensemble relaxed, training pool included (Al4O6 seed 2: corundum was the lowest structure of
    # the training pool while the search pool's lowest cluster was Amm2, 25 meV/atom above).
    validate_lowest_from: Literal["search", "all"] = "search"
    # Confirmation (our addition; the paper validates once): when the lowest oracle-validated energy
    # differs from the ensemble's lowest prediction by more than confirm_tol, the ensemble has not learnt
    # the bottom of the landscape. The validation trajectories (oracle energies, forces, stresses) then
    # join the training set and the cycles go on until the stopping rule fires again, up to
    # validation_rounds validations. None = validate once.
    confirm_tol: float | None = None  # eV/atom
    validation_rounds: int = 3
    merge_window: float = 0.05  # eV/atom: split a cluster whose low members are distinct structures; 0 = off
    # Near-degenerate minima: every distinct structure the ensemble places within this of its lowest
    # prediction is validated too (at most stop_k more), in or outside the chosen clusters, since their
    # order is below the ensemble's resolution and only the oracle can settle it (Ga8As8 seed 2:
    # zincblende 2 meV/atom above wurtzite in prediction, 0.7 below it with SevenNet-0). 0 = off.
    degenerate_window: float = 0.01  # eV/atom
    model_batch: int = 1024  # structures the ensemble relaxes or evaluates together (bounds memory)
    # Processes generating the pools (one space group per task): 0 = one per available core for
    # pools of 200 or more. PyXtal takes about 0.7 s per Si46 candidate: 48 min for 30 per space group on one core.
    generation_workers: int = 0
    initial_models: str | None = None  # ensemble file trained elsewhere: relaxes the pool before cycle 1
    initial_dataset: str | None = None  # extxyz/ASE db of labelled frames added to every training set


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
    potential: PotentialConfig = field(default_factory=PotentialConfig)
    active: ActiveConfig = field(default_factory=ActiveConfig)
    meltquench: MeltQuenchConfig = field(default_factory=MeltQuenchConfig)
    onthefly: OnTheFlyConfig = field(default_factory=OnTheFlyConfig)
    base_dir: Path = field(default=Path("."), metadata={"internal": True})

    def resolve_path(self, path: str | None) -> Path | None:
        """A path from the config, taken relative to the config file."""
        if path is None:
            return None
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self.base_dir / p)


def read_toml(path: str | Path) -> dict:
    """The table in a TOML file; a missing or malformed file is a one-line ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found: pass the path of a TOML file")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML ({exc})") from None


def load_config(path: str | Path) -> RunConfig:
    path = Path(path)
    config = from_dict(RunConfig, read_toml(path))
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
