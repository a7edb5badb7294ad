"""Active-learning pool search (seed 004): the ensemble relaxes the pool, the oracle labels a batch.

One cycle, read top to bottom in :func:`_run_cycle`:

1. **select** (II.D) a batch from the pool: at random in the first cycle, later the
   highest selection scores ``-Ē + ω_f·max|f̄|`` with one structure per DBSCAN cluster
   of the learned features, perturbed by Gaussian noise damped per cycle;
2. **label** them with the oracle (single points); failed and unphysical labels are
   recorded and never enter the training set;
3. **train** a fresh ensemble on all labels so far (force outliers excluded, V.A);
4. **relax** every pool structure with the ensemble in one batched relaxation, each
   stopping on convergence, uncertainty U > U_max, stalling or the step limit (II.E);
5. **evaluate**: cluster the search pool, compare the k lowest cluster energies with
   those of the previous n_cycle pools under the same model, stop when none improved
   by more than ε (II.F).

After the last cycle the best structure of each of the k lowest distinct clusters,
plus low-energy structures outside them, is relaxed with the oracle (II.G).

Every oracle single point is a record in the store (labels ``stage="label"`` with one
call each, validations ``stage="validation"`` with their steps), so the run's oracle
calls are the sum over records. :mod:`xtalforge.search.active_state` checkpoints each
phase; a resumed run continues where it stopped without repeating oracle work.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.io import read, write
from ase.stress import full_3x3_to_voigt_6_stress

from xtalforge.config import ActiveConfig
from xtalforge.errors import ConfigError
from xtalforge.search.active_state import ActiveState, CycleSummary
from xtalforge.search.context import RunContext
from xtalforge.search.outcome import SearchOutcome, generation_thresholds
from xtalforge.search.pools import (
    SEARCH,
    TRAINING,
    Pool,
    PoolRelaxSettings,
    evaluate_pool,
    generate_pool,
    pool_spec,
    relax_pool,
)
from xtalforge.search.selection import (
    NOISE,
    cluster_minima,
    cluster_pool,
    has_converged,
    noise_level,
    perturb,
    pick_per_cluster,
    selection_scores,
    stopping_improvement,
)
from xtalforge.search.validation import STAGE as VALIDATION_STAGE
from xtalforge.search.validation import (
    ValidationOutcome,
    ValidationTask,
    note_target,
    uses_model_hessian,
    validate_structures,
)
from xtalforge.store import StructureRecord

METHOD = "active"
LABEL_STAGE = "label"


def run_active_search(ctx: RunContext) -> SearchOutcome:
    """Run (or resume) the active-learning search of ``ctx`` until its stopping rule fires."""
    acfg = active_config(ctx)
    state = ActiveState.load(ctx.run_dir)
    pool = _initial_pool(ctx, state)
    found, calls = False, None
    while True:
        pool = _run_cycles(ctx, state, pool)
        if not acfg.validate:
            break
        outcome = _validate(ctx, state, pool)
        found, calls = outcome.target_found, outcome.oracle_calls_to_target
        if not _another_round(ctx, state, outcome):
            break
        state.reopen()
    return SearchOutcome(
        method=METHOD, n_candidates=len(pool),
        target_found=found if ctx.target is not None else None,
        oracle_calls_to_target=calls if found else None,
    )


def _run_cycles(ctx: RunContext, state: ActiveState, pool: Pool) -> Pool:
    """Cycles until the stopping rule (or a budget) stops them; the last pool."""
    if state.stopped and state.last_finished_cycle > 0:
        pool = Pool.load(state.require(state.pool_path(state.last_finished_cycle), "pool file"))
    while not state.stopped:
        cycle = state.last_finished_cycle + 1
        reason = _reason_not_to_start(ctx, state, cycle)
        if reason is not None:
            ctx.log.info("active learning stops before cycle %d: %s", cycle, reason)
            state.stop(reason)
            break
        pool = _run_cycle(ctx, state, cycle)
    return pool


def active_config(ctx: RunContext) -> ActiveConfig:
    """The run's ``[active]`` section (defaults when the config has none), checked."""
    acfg = getattr(ctx.config, "active", None) or ActiveConfig()
    checks = [
        (acfg.batch_size >= 1, "active.batch_size must be at least 1"),
        (acfg.model_batch >= 1, "active.model_batch must be at least 1"),
        (_potential_config(ctx).n_models >= 2, "potential.n_models must be at least 2: the uncertainty needs an ensemble"),
        (acfg.stop_k >= 1 and acfg.stop_cycles >= 1, "active.stop_k and active.stop_cycles must be at least 1"),
        (acfg.max_cycles >= 0, "active.max_cycles must not be negative"),
        (0.0 <= acfg.stop_max_uncertain <= 1.0, "active.stop_max_uncertain is a fraction: give a value from 0 to 1"),
        (acfg.confirm_tol is None or acfg.confirm_tol > 0, "active.confirm_tol must be positive (or left out to validate once)"),
        (acfg.validation_rounds >= 1, "active.validation_rounds must be at least 1"),
        (acfg.merge_window >= 0 and acfg.degenerate_window >= 0,
         "active.merge_window and active.degenerate_window are energy windows: give 0 (off) or more"),
        (acfg.training_pool_size >= 0 and acfg.per_spacegroup >= 0, "active pool sizes must not be negative"),
        (acfg.generation_workers >= 0, "active.generation_workers must be 0 (one per core) or a number of processes"),
        (acfg.max_cycles == 0 or acfg.training_pool_size > 0 or acfg.label_from == "all",
         "active.training_pool_size is 0 but labels come from the training pool: set label_from = \"all\""),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    for key in ("initial_models", "initial_dataset"):
        path = ctx.config.resolve_path(getattr(acfg, key))
        if path is not None and not path.exists():
            raise ConfigError(f"active.{key} file {path} not found: give a path relative to the config file")
    if acfg.max_cycles == 0 and acfg.initial_models is None:
        raise ConfigError("active.max_cycles = 0 needs active.initial_models: without cycles there is no model")
    return acfg


# ---------------------------------------------------------------- the cycle


def _run_cycle(ctx: RunContext, state: ActiveState, cycle: int) -> Pool:
    """One cycle: select, label, train, relax, evaluate; each phase is skipped when already done."""
    previous = Pool.load(state.require(state.pool_path(cycle - 1), "pool file"))
    pending = state.pending if state.cycle == cycle else {}
    pending.setdefault("wall_time_s", {})
    selection = _select_phase(ctx, state, cycle, previous, pending)
    if not selection:
        state.stop("no structure of the pool is left to label")
        return previous
    if not _label_phase(ctx, state, cycle, selection, pending):
        state.stop("no usable oracle label yet: every label failed or was unphysical (see run.log)")
        return previous
    model = _train_phase(ctx, state, cycle, pending)
    pool = _relax_phase(ctx, state, cycle, model, previous, pending)
    return _evaluate_phase(ctx, state, cycle, model, pool, pending)


def _select_phase(ctx: RunContext, state: ActiveState, cycle: int, previous: Pool, pending: dict) -> list[Atoms]:
    if not state.done(cycle, "selected"):
        start = time.perf_counter()
        selection, sigma = select_batch(ctx, previous, cycle)
        _write_frames(state.selection_path(cycle), selection)
        pending.update(noise=sigma, n_selected=len(selection))
        pending["wall_time_s"]["select"] = round(time.perf_counter() - start, 3)
        _advance(state, cycle, "selected", pending)
        ctx.log.info("cycle %d: %d structures selected for labelling (noise %.3f Å)", cycle, len(selection), sigma)
    return _read_frames(state.require(state.selection_path(cycle), "selection file"))


def _label_phase(ctx: RunContext, state: ActiveState, cycle: int, selection: list[Atoms], pending: dict) -> bool:
    """Label the selection and write the training set; False when the training set is empty."""
    if not state.done(cycle, "labelled"):
        start = time.perf_counter()
        counts = label_batch(ctx, selection, cycle)
        frames = training_frames(ctx, cycle) + validation_frames(ctx, state, cycle)
        _write_frames(state.dataset_path, frames)
        pending.update(counts, dataset_size=len(frames), oracle_calls_total=ctx.oracle_calls)
        pending["wall_time_s"]["label"] = round(time.perf_counter() - start, 3)
        _advance(state, cycle, "labelled", pending)
        ctx.log.info("cycle %d: labels %s, training set %d frames, %d oracle calls so far",
                     cycle, counts, len(frames), ctx.oracle_calls)
    return bool(pending.get("dataset_size", 1))


def _train_phase(ctx: RunContext, state: ActiveState, cycle: int, pending: dict):
    if not state.done(cycle, "trained"):
        start = time.perf_counter()
        frames = _read_frames(state.require(state.dataset_path, "training set"))
        model = train_models(ctx, frames, cycle)
        model.save(state.model_path(cycle))
        metrics = _plain_metrics(getattr(model, "metrics", {}))
        pending.update(training_metrics=metrics, n_training_frames=int(metrics.get("n_train", 0) + metrics.get("n_val", 0)))
        pending["wall_time_s"]["train"] = round(time.perf_counter() - start, 3)
        _advance(state, cycle, "trained", pending)
        ctx.log.info("cycle %d: ensemble trained, metrics %s", cycle, _short_metrics(metrics))
    return load_models(state.require(state.model_path(cycle), "model file"))


def _relax_phase(ctx: RunContext, state: ActiveState, cycle: int, model, previous: Pool, pending: dict) -> Pool:
    if not state.done(cycle, "relaxed"):
        start = time.perf_counter()
        start_pool = previous
        if active_config(ctx).relax_from == "initial":  # the candidates as generated (pool 0)
            start_pool = Pool.load(state.require(state.pool_path(0), "pool file"))
        relaxed = relax_pool(model, start_pool, _relax_settings(ctx), min_distance_matrix_fn=ctx.constraints.min_distance_matrix,
                             relax_config=ctx.config.relax, progress=ctx.progress, chunk=active_config(ctx).model_batch)
        relaxed.save(state.pool_path(cycle))
        pending["wall_time_s"]["relax"] = round(time.perf_counter() - start, 3)
        _advance(state, cycle, "relaxed", pending)
    return Pool.load(state.require(state.pool_path(cycle), "pool file"))


def _evaluate_phase(ctx: RunContext, state: ActiveState, cycle: int, model, pool: Pool, pending: dict) -> Pool:
    """Stopping rule and cycle summary; the pool is saved again with its cluster labels."""
    acfg = active_config(ctx)
    start = time.perf_counter()
    summary = evaluate_cycle(ctx, state, cycle, pool, model)
    pending["wall_time_s"]["evaluate"] = round(time.perf_counter() - start, 3)
    for key, value in pending.items():
        setattr(summary, key, value)
    pool.save(state.pool_path(cycle))
    state.pending = {}
    state.finish_cycle(summary)
    ctx.log.info(
        "cycle %d done: lowest clusters %s eV/atom, improvement %s, %.0f %% of the search pool stopped on U, %s",
        cycle, [round(c["energy"], 4) for c in summary.lowest_clusters],
        "n/a" if summary.improvement is None else f"{summary.improvement:.4f}", 100 * summary.uncertain_fraction,
        "converged" if summary.converged else "not converged",
    )
    if summary.converged:
        state.stop(f"converged: no cluster among the {acfg.stop_k} lowest improved by more than {acfg.stop_tol} eV/atom")
    return pool


def _advance(state: ActiveState, cycle: int, phase: str, pending: dict) -> None:
    state.pending = pending
    state.advance(cycle, phase)


def _reason_not_to_start(ctx: RunContext, state: ActiveState, cycle: int) -> str | None:
    acfg = active_config(ctx)
    in_progress = state.cycle == cycle and state.phase != "evaluated"
    if in_progress:
        return None
    if cycle > acfg.max_cycles:
        return f"maximum of {acfg.max_cycles} cycles reached"
    if ctx.oracle_calls + acfg.batch_size > ctx.config.search.max_oracle_calls:
        return f"oracle budget: {ctx.oracle_calls} of {ctx.config.search.max_oracle_calls} calls spent, a batch needs {acfg.batch_size}"
    limit = getattr(ctx.config.search, "max_wall_time_s", None)
    if limit is not None and ctx.wall_time_s >= limit:
        return f"wall-time budget of {limit:g} s reached"
    return None


# ---------------------------------------------------------------- pools


def _initial_pool(ctx: RunContext, state: ActiveState) -> Pool:
    """Pool 0: generated once (and relaxed by ``initial_models`` when given), then loaded."""
    path = state.pool_path(0)
    if state.initial_pool_done:
        return Pool.load(state.require(path, "initial pool"))
    acfg = active_config(ctx)
    start = time.perf_counter()
    pool = build_pool(ctx)
    ctx.log.info("pool generated: %d search and %d training structures in %.1f s",
                 int((pool.origin == SEARCH).sum()), int((pool.origin == TRAINING).sum()), time.perf_counter() - start)
    if acfg.initial_models:
        model = load_models(ctx.config.resolve_path(acfg.initial_models))
        pool = relax_pool(model, pool, _relax_settings(ctx), min_distance_matrix_fn=ctx.constraints.min_distance_matrix,
                          relax_config=ctx.config.relax, progress=ctx.progress, chunk=acfg.model_batch)
        pool.cluster = _stopping_clusters(ctx, pool)
        ctx.log.info("pool relaxed with the initial models %s", acfg.initial_models)
    pool.save(path)
    state.initial_pool_done = True
    state.save()
    return pool


def build_pool(ctx: RunContext) -> Pool:
    """Generate the search pool (symmetric, per space group) and the training pool (random)."""
    from xtalforge.structures.composition import Composition
    from xtalforge.structures.constraints import Constraints
    from xtalforge.structures.generate import compatible_spacegroups

    cfg, acfg = ctx.config, active_config(ctx)
    search_comp, search_constraints = ctx.composition, ctx.constraints
    if acfg.training_formula_units:
        train_comp = Composition.parse(cfg.composition, acfg.training_formula_units)
        train_constraints = Constraints.from_config(train_comp, cfg.structures)
    else:
        train_comp, train_constraints = search_comp, search_constraints
    spacegroups = []
    if acfg.search_pool == "symmetric":
        spacegroups = list(acfg.spacegroups or cfg.structures.spacegroups or compatible_spacegroups(search_comp, cell=cfg.structures.cell))
    spec = pool_spec(spacegroups, acfg.per_spacegroup, acfg.training_pool_size, acfg.search_pool, acfg.search_pool_size)

    generate = CandidateGenerator(
        seed=cfg.seed, search=(search_comp, search_constraints), training=(train_comp, train_constraints),
        max_attempts=cfg.structures.max_attempts, pyxtal_timeout_s=cfg.structures.pyxtal_timeout_s,
        cell=cfg.structures.cell,
    )
    workers = generation_workers(acfg.generation_workers, len(spec.candidates))
    if workers > 1:
        ctx.log.info("generating %d pool candidates in %d processes", len(spec.candidates), workers)
    return generate_pool(spec, generate, progress=ctx.progress, log=ctx.log, workers=workers)


@dataclass(frozen=True)
class CandidateGenerator:
    """Pool candidate ``candidate`` of either pool, from its own random stream (picklable for workers)."""

    seed: int
    search: tuple  # (Composition, Constraints) of the search pool
    training: tuple  # ... and of the training pool (another cell size for transferability)
    max_attempts: int
    pyxtal_timeout_s: float | None
    cell: str

    def __call__(self, candidate: int, mode: str, sg: int, origin: int) -> Atoms:
        from xtalforge.structures.generate import candidate_rng, generate_structure

        comp, constraints = self.training if origin == TRAINING else self.search
        return generate_structure(
            comp, constraints, candidate_rng(self.seed, candidate), mode=mode,
            spacegroups=[sg] if mode == "symmetric" else None, max_attempts=self.max_attempts,
            pyxtal_timeout_s=self.pyxtal_timeout_s, cell=self.cell,
        )


PARALLEL_GENERATION_MIN = 200  # smaller pools generate faster than worker processes start


def generation_workers(setting: int, n_candidates: int) -> int:
    """Processes for pool generation: ``setting``, or one per available core when it is 0."""
    if setting == 0:
        setting = len(os.sched_getaffinity(0)) if n_candidates >= PARALLEL_GENERATION_MIN else 1
    return max(1, setting)


def _relax_settings(ctx: RunContext) -> PoolRelaxSettings:
    r = ctx.config.relax
    return PoolRelaxSettings(fmax=r.fmax, smax_gpa=r.smax_gpa, max_steps=r.max_steps, patience=r.patience,
                             u_max=active_config(ctx).u_max, pressure_gpa=ctx.config.pressure_gpa,
                             u_force_floor=active_config(ctx).u_force_floor)


# ---------------------------------------------------------------- selection and labels


def select_batch(ctx: RunContext, pool: Pool, cycle: int) -> tuple[list[Atoms], float]:
    """The structures to label in ``cycle`` (perturbed copies), and the noise level used.

    Random order from the training pool when the pool has no model predictions yet
    (first cycle), otherwise by selection score with one structure per cluster, from the
    pool ``active.label_from`` names. Structures whose perturbed copy
    keeps a pair closer than its minimum distance after repeated draws are skipped.
    """
    acfg = active_config(ctx)
    rng = np.random.default_rng([ctx.config.seed, cycle, 1])
    training = pool.usable & (pool.origin == TRAINING)
    allowed = training if acfg.label_from == "training" else pool.usable
    if not np.isfinite(pool.energy_per_atom[allowed]).any():
        # First cycle (II.D): random, and from the training pool only (III.A) while it has structures.
        order = rng.permutation(np.flatnonzero(training if training.any() else allowed))
    else:
        scores = selection_scores(pool.energy_per_atom, pool.max_force, acfg.force_weight)
        labels = (cluster_pool(pool.features, acfg.dbscan_eps, acfg.dbscan_min_samples, valid=pool.evaluated)
                  if pool.features is not None else np.full(len(pool), NOISE))
        order = pick_per_cluster(scores, labels, n=len(pool), allowed=allowed & pool.evaluated)
    sigma = noise_level(cycle, acfg.noise, acfg.noise_damping, acfg.noise_first_cycle)
    chosen: list[Atoms] = []
    for i in order:
        atoms = perturb(pool.atoms[i], sigma, rng, generation_thresholds(ctx, pool.atoms[i].numbers))
        if atoms is None:
            continue
        atoms.info.update(pool_index=int(i), origin=int(pool.origin[i]), noise=float(sigma))
        chosen.append(atoms)
        if len(chosen) == acfg.batch_size:
            break
    return chosen, sigma


def label_problem(ctx: RunContext, atoms: Atoms, result) -> str | None:
    """Why a label must stay out of the training set, or None when it is physical."""
    from xtalforge.dynamics.guards import check_close_pairs, check_values

    if not result.ok:
        return f"oracle failed: {result.error}"
    stress = None
    if result.stress is not None:
        from ase.stress import voigt_6_to_full_3x3_stress

        stress = voigt_6_to_full_3x3_stress(np.asarray(result.stress))
    reason = check_values(result.energy, np.asarray(result.forces), stress, len(atoms), ctx.config.relax.energy_bounds)
    return reason or check_close_pairs(atoms, generation_thresholds(ctx, atoms.numbers))


def label_batch(ctx: RunContext, selection: list[Atoms], cycle: int) -> dict:
    """Oracle single points for the selection; one store record each. Returns label counts.

    Labels finished by an earlier session of this run (same cycle, same selection
    index) are not requested again.
    """
    done = {int(r.extra.get("label_index", -1)) for r in ctx.store.records(stage=LABEL_STAGE, method=METHOD, generation=cycle)}
    todo = [(j, atoms) for j, atoms in enumerate(selection) if j not in done]
    results = ctx.oracle.executor.map(ctx.oracle.single_point, [atoms for _, atoms in todo], desc=f"labels cycle {cycle}")
    for (j, atoms), result in zip(todo, results):
        problem = label_problem(ctx, atoms, result)
        labelled = result.to_atoms(atoms) if result.ok else atoms.copy()
        labelled.info.clear()
        if problem is not None:
            ctx.log.info("cycle %d label %d rejected: %s", cycle, j, problem)
        ctx.store.add(StructureRecord(
            candidate=int(atoms.info["pool_index"]),
            status="ok" if problem is None else "failed",
            method=METHOD,
            stage=LABEL_STAGE,
            generation=cycle,
            energy_per_atom=result.energy / len(atoms) if problem is None else None,
            oracle_calls=result.calls,
            oracle_calls_total=ctx.oracle_calls,
            relax_status=None if problem is None or not result.ok else "rejected",
            error=problem,
            seed=ctx.config.seed,
            operator=f"label noise={atoms.info.get('noise', 0.0):.3g}",
            relaxed=labelled,
            extra={"label_index": j, "pool_index": int(atoms.info["pool_index"]), "origin": int(atoms.info.get("origin", -1)),
                   "noise": float(atoms.info.get("noise", 0.0)), "wall_time_s": round(result.wall_time, 4)},
        ))
    records = ctx.store.records(stage=LABEL_STAGE, method=METHOD, generation=cycle)
    return {
        "n_labels_ok": sum(r.status == "ok" for r in records),
        "n_labels_rejected": sum(r.relax_status == "rejected" for r in records),
        "n_labels_failed": sum(r.status == "failed" and r.relax_status != "rejected" for r in records),
    }


def training_frames(ctx: RunContext, cycle: int) -> list[Atoms]:
    """The training set of ``cycle``: the initial dataset plus every accepted label so far."""
    frames = initial_frames(ctx)
    for record in ctx.store.records(stage=LABEL_STAGE, status="ok", method=METHOD):
        if record.generation is not None and record.generation <= cycle and record.relaxed is not None:
            frames.append(record.relaxed)
    return frames


# Every VALIDATION_STRIDE-th geometry of an oracle relaxation (and its last) trains later cycles:
# neighbouring steps are nearly the same structure and would outweigh the single-point labels.
VALIDATION_STRIDE = 3


def validation_frames(ctx: RunContext, state: ActiveState, cycle: int) -> list[Atoms]:
    """Physical frames of the oracle relaxations of validations before ``cycle`` (unconfirmed rounds)."""
    frames = []
    for check in state.validation_rounds:
        if check["cycle"] >= cycle or check["confirmed"]:
            continue
        for path in sorted(_validation_dir(state, check["cycle"]).glob("*.traj")):
            steps = read(path, ":")
            frames.extend(steps[::VALIDATION_STRIDE] + ([steps[-1]] if (len(steps) - 1) % VALIDATION_STRIDE else []))
    return physical_frames(ctx, frames)


def physical_frames(ctx: RunContext, frames: list[Atoms]) -> list[Atoms]:
    """The frames with energy and forces that pass the label checks."""
    from xtalforge.oracles import OracleResult
    from xtalforge.potentials.data import frame_labels

    kept = []
    for atoms in frames:
        labels = frame_labels(atoms)
        if labels is None or labels.forces is None:
            continue
        result = OracleResult(ok=True, energy=labels.energy, forces=labels.forces,
                              stress=None if labels.stress is None else full_3x3_to_voigt_6_stress(labels.stress))
        if label_problem(ctx, atoms, result) is None:
            kept.append(atoms)
    return kept


def initial_frames(ctx: RunContext) -> list[Atoms]:
    """Labelled frames of ``active.initial_dataset`` that pass the label checks."""
    from xtalforge.errors import XtalforgeError
    from xtalforge.potentials.data import read_frames

    path = ctx.config.resolve_path(active_config(ctx).initial_dataset)
    if path is None:
        return []
    try:
        frames = read_frames(path)
    except XtalforgeError as exc:
        raise ConfigError(f"active.initial_dataset: {exc}") from None
    kept = physical_frames(ctx, frames)
    ctx.log.info("initial dataset %s: %d of %d frames usable", path, len(kept), len(frames))
    if not kept:
        raise ConfigError(f"active.initial_dataset {path} holds no physical frame with energy and forces: label it first")
    return kept


# ---------------------------------------------------------------- models


def train_models(ctx: RunContext, frames: list[Atoms], cycle: int):
    """A freshly initialised ensemble trained on ``frames`` (force outliers excluded by the trainer)."""
    from xtalforge.potentials import train_ensemble

    config = _potential_config(ctx)
    seed = int(np.random.SeedSequence([ctx.config.seed, cycle, 2]).generate_state(1)[0])
    def log(message: str) -> None:
        # Per-epoch progress goes to the debug level; summaries and exclusions are kept.
        level = logging.DEBUG if " epoch " in message else logging.INFO
        ctx.log.log(level, "cycle %d training: %s", cycle, message)

    return train_ensemble(frames, config=config, n_models=config.n_models, seed=seed, progress=ctx.progress, log=log)


def _potential_config(ctx: RunContext):
    from xtalforge.config import PotentialConfig

    return getattr(ctx.config, "potential", None) or PotentialConfig()


def load_models(path: str | Path):
    """The ensemble stored in ``path`` (a model file of :mod:`xtalforge.potentials`)."""
    from xtalforge.potentials import load

    return load(path).ensemble


def _plain_metrics(metrics: dict) -> dict:
    return {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _short_metrics(metrics: dict) -> str:
    keys = [k for k in metrics if "rmse" in k.lower()] or list(metrics)
    return ", ".join(f"{k} {metrics[k]:.4g}" for k in keys[:4]) or "-"


# ---------------------------------------------------------------- stopping


def _stopping_mask(ctx: RunContext, pool: Pool) -> np.ndarray:
    """Structures whose clusters count for stopping and validation."""
    include_training = active_config(ctx).stop_include_training
    return pool.evaluated & (True if include_training else pool.origin == SEARCH)


def _stopping_clusters(ctx: RunContext, pool: Pool) -> np.ndarray:
    acfg = active_config(ctx)
    if pool.features is None:
        return np.full(len(pool), NOISE)
    return cluster_pool(pool.features, acfg.dbscan_eps, acfg.dbscan_min_samples, valid=_stopping_mask(ctx, pool))


def evaluate_cycle(ctx: RunContext, state: ActiveState, cycle: int, pool: Pool, model) -> CycleSummary:
    """Cluster the pool, compare its lowest clusters with earlier pools (same model), summarise.

    The rule presumes pools relaxed close to their minima (II.F). Two guards keep a
    pool that the ensemble could not move from looking converged: earlier pools count
    only once a model relaxed them (the pool of cycle 0 only when initial models did),
    and no cycle converges while more than ``stop_max_uncertain`` of the search pool
    stopped relaxing on uncertainty.
    """
    acfg = active_config(ctx)
    pool.cluster = _stopping_clusters(ctx, pool)
    mask = _stopping_mask(ctx, pool)
    current = cluster_minima(pool.energy_per_atom, pool.cluster, acfg.stop_k, valid=mask)
    first_relaxed_pool = 0 if acfg.initial_models else 1
    earlier = []
    for back in range(1, acfg.stop_cycles + 1):
        if cycle - back < first_relaxed_pool:
            break
        old_pool = Pool.load(state.require(state.pool_path(cycle - back), "pool file"))
        old = evaluate_pool(model, old_pool, pressure_gpa=ctx.config.pressure_gpa, chunk=acfg.model_batch)
        old_labels = _stopping_clusters(ctx, old)
        earlier.append(cluster_minima(old.energy_per_atom, old_labels, acfg.stop_k, valid=_stopping_mask(ctx, old)).energies)
    improvement = max((stopping_improvement(current.energies, e) for e in earlier), default=None)
    uncertain = float((pool.status[mask] == "uncertain").mean()) if mask.any() else 0.0
    converged = (len(earlier) == acfg.stop_cycles and uncertain <= acfg.stop_max_uncertain
                 and has_converged(current.energies, earlier, acfg.stop_tol))
    sizes = np.bincount(pool.cluster[pool.cluster >= 0]) if (pool.cluster >= 0).any() else np.zeros(0, int)
    statuses, counts = np.unique(pool.status, return_counts=True)
    return CycleSummary(
        cycle=cycle,
        relax_status={str(s): int(n) for s, n in zip(statuses, counts)},
        lowest_clusters=[
            {"energy": float(e), "member": int(m), "label": int(lab), "size": int(sizes[lab])}
            for e, m, lab in zip(current.energies, current.members, current.labels)
        ],
        improvement=None if improvement is None or not np.isfinite(improvement) else float(improvement),
        converged=bool(converged),
        uncertain_fraction=round(uncertain, 4),
        pool_energy_histogram=_histogram(pool),
    )


def _histogram(pool: Pool, bins: int = 40, span: float = 1.0) -> dict:
    """Energy histogram of both pools (eV/atom, from the lowest energy up to ``span`` above it)."""
    energy = pool.energy_per_atom
    ok = pool.evaluated
    if not ok.any():
        return {}
    low = float(energy[ok].min())
    edges = np.linspace(low, low + span, bins + 1)
    out = {"edges": edges.round(5).tolist(), "n_above": int((energy[ok] > low + span).sum())}
    for name, origin in (("search", SEARCH), ("training", TRAINING)):
        out[name] = np.histogram(energy[ok & (pool.origin == origin)], bins=edges)[0].tolist()
    return out


# ---------------------------------------------------------------- validation


def validation_tasks(ctx: RunContext, pool: Pool) -> list[ValidationTask]:
    """The structures to relax with the oracle (II.G), lowest predicted energy first.

    The lowest member of each of the ``stop_k`` lowest clusters, skipping clusters
    whose lowest member is the same structure as a lower one (so k distinct minima are
    validated); within each such cluster, a low member (within ``merge_window``) that
    is a different structure (merged clusters); and the ``validate_lowest`` lowest
    structures of the pool (``validate_lowest_from``: the search pool or both) that lie
    outside the chosen clusters and are not one of the structures chosen so far; and up
    to ``stop_k`` more distinct structures within ``degenerate_window`` of the lowest
    prediction of those structures, wherever they lie (near-degenerate minima).
    """
    from xtalforge.similarity import matches

    acfg = active_config(ctx)
    mask = _stopping_mask(ctx, pool)
    energy = pool.energy_per_atom
    clusters = cluster_minima(energy, pool.cluster, len(pool), valid=mask)
    tasks: list[ValidationTask] = []

    def is_new(index: int) -> bool:
        return not any(matches(pool.atoms[index], t.atoms) for t in tasks)

    def add(index: int, reason: str, **info) -> None:
        tasks.append(ValidationTask(key=int(index), atoms=pool.atoms[index].copy(), predicted_energy_per_atom=float(energy[index]),
                                    reason=reason, info={"pool_index": int(index), "cluster": int(pool.cluster[index]), **info}))

    chosen_labels = []
    for member, label in zip(clusters.members, clusters.labels):
        if len(chosen_labels) == acfg.stop_k:
            break
        if not is_new(member):
            continue
        chosen_labels.append(int(label))
        add(member, "cluster", cluster_rank=len(chosen_labels))
        if acfg.merge_window > 0:
            distinct = _distinct_low_member(pool, mask & (pool.cluster == label), member, acfg.merge_window, is_new)
            if distinct is not None:
                add(distinct, "merged cluster", cluster_rank=len(chosen_labels))
    n_lowest = acfg.stop_k if acfg.validate_lowest is None else acfg.validate_lowest
    candidates = np.flatnonzero(mask if acfg.validate_lowest_from == "search" else pool.evaluated)
    for index in candidates[np.argsort(energy[candidates], kind="stable")][:n_lowest]:
        if int(pool.cluster[index]) in chosen_labels or any(t.key == index for t in tasks):
            continue
        if is_new(index):
            add(index, "outside clusters")
    added = 0
    for index in _lowest_within(energy, candidates, acfg.degenerate_window):
        if added == acfg.stop_k:
            break
        if not any(t.key == index for t in tasks) and is_new(index):
            add(index, "near-degenerate")
            added += 1
    return sorted(tasks, key=lambda t: t.predicted_energy_per_atom)


def _lowest_within(energy: np.ndarray, candidates: np.ndarray, window: float, reference: float | None = None,
                   max_checks: int = 50) -> list[int]:
    """Candidates within ``window`` of ``reference`` (default: their lowest energy), lowest first, at most ``max_checks``."""
    if window <= 0 or not len(candidates):
        return []
    order = candidates[np.argsort(energy[candidates], kind="stable")]
    top = energy[order[0]] if reference is None else reference
    return [int(i) for i in order[energy[order] <= top + window][:max_checks]]


def _distinct_low_member(pool: Pool, members: np.ndarray, best: int, window: float, is_new) -> int | None:
    """Lowest member within ``window`` of the cluster minimum that is a different structure."""
    index = np.flatnonzero(members)
    index = index[index != best]
    energy = pool.energy_per_atom
    return next((i for i in _lowest_within(energy, index, window, energy[best], max_checks=5) if is_new(i)), None)


def _validate(ctx: RunContext, state: ActiveState, pool: Pool) -> ValidationOutcome:
    """Validate the pool's proposed minima; the outcome covers every round of the run so far."""
    cycle = state.last_finished_cycle
    tasks = validation_tasks(ctx, pool)
    ctx.log.info("validating %d structures with the oracle after cycle %d: %s", len(tasks), cycle,
                 ", ".join(f"{t.key} ({t.reason}, {t.predicted_energy_per_atom:.4f})" for t in tasks))
    outcome = validate_structures(ctx, tasks, method=METHOD, generation=cycle,
                                  trajectory_dir=_validation_dir(state, cycle),
                                  hessian_model=_validation_model(ctx, state))
    every_round = ctx.store.records(stage=VALIDATION_STAGE, method=METHOD)
    state.validation = validation_table(every_round)
    state.validation_done = outcome.stopped_early is None
    check = confirmation(outcome.records, active_config(ctx).confirm_tol)
    state.validation_rounds = [r for r in state.validation_rounds if r["cycle"] != cycle] + [
        {"cycle": cycle, **check, "oracle_calls_total": ctx.oracle_calls}]
    state.save()
    combined = ValidationOutcome(records=every_round, stopped_early=outcome.stopped_early)
    note_target(combined, every_round)
    return combined


def _validation_model(ctx: RunContext, state: ActiveState):
    """The ensemble that proposed the structures (mean as an ASE calculator), for BFGS's first Hessian.

    None when validation does not use a model Hessian, so the ensemble is not read from disk for nothing.
    """
    from xtalforge.potentials import NNPCalculator

    if not uses_model_hessian(ctx.config.relax):
        return None
    path = state.model_path(state.last_finished_cycle)
    if not path.exists():
        path = ctx.config.resolve_path(active_config(ctx).initial_models)
    return None if path is None or not path.exists() else NNPCalculator(load_models(path))


def _validation_dir(state: ActiveState, cycle: int) -> Path:
    return state.cycle_dir(cycle) / "validation"


def confirmation(records: list[StructureRecord], tol: float | None) -> dict:
    """Whether the oracle confirmed the ensemble's ground state: |lowest oracle − lowest predicted| <= tol.

    Lowest over the validated structures. Far below the prediction: the ensemble has not
    learnt the bottom of the landscape, and structures in deeper basins may sit unrecognised
    high in the pool. Far above: its lowest minimum is spurious. Single clusters may still
    disagree (the largest |Δ| is reported too): what the search answers is the ground state.
    """
    rows = [r for r in records if r.status == "ok" and r.ranking_energy is not None
            and r.extra.get("predicted_energy_per_atom") is not None]
    if not rows:
        return {"delta_lowest_mev": None, "max_abs_delta_mev": None, "confirmed": tol is None}
    delta = 1000.0 * (min(r.ranking_energy for r in rows) - min(r.extra["predicted_energy_per_atom"] for r in rows))
    worst = max(abs(r.extra.get("delta_e_mev") or 0.0) for r in rows)
    return {"delta_lowest_mev": round(delta, 2), "max_abs_delta_mev": round(worst, 2),
            "confirmed": bool(tol is None or abs(delta) <= 1000.0 * tol)}


def _another_round(ctx: RunContext, state: ActiveState, outcome: ValidationOutcome) -> bool:
    """Whether an unconfirmed validation sends the search back to further cycles."""
    acfg = active_config(ctx)
    if acfg.confirm_tol is None:
        return False
    last = state.validation_rounds[-1]
    why_not = None
    if last["confirmed"]:
        why_not = "confirmed"
    elif outcome.stopped_early is not None:
        why_not = f"validation stopped early ({outcome.stopped_early})"
    elif len(state.validation_rounds) >= acfg.validation_rounds:
        why_not = f"{acfg.validation_rounds} validation rounds done"
    elif outcome.target_found and ctx.config.search.stop_at_target and ctx.target is not None:
        why_not = "target found"
    elif (reason := _reason_not_to_start(ctx, state, state.last_finished_cycle + 1)) is not None:
        why_not = reason
    if why_not is not None:
        ctx.log.info("validation after cycle %d: lowest oracle - lowest predicted energy %s meV/atom; no further round: %s",
                     last["cycle"], last["delta_lowest_mev"], why_not)
        return False
    ctx.log.info("validation after cycle %d not confirmed (lowest oracle - lowest predicted energy %s meV/atom, "
                 "beyond ±%g): its oracle relaxations join the training set and the cycles go on",
                 last["cycle"], last["delta_lowest_mev"], 1000.0 * acfg.confirm_tol)
    return True


def validation_table(records: list[StructureRecord]) -> list[dict]:
    """Rows of the validated-minima table: energies before (model) and after (oracle) validation."""
    from xtalforge.similarity import Deduplicator

    dedupe = Deduplicator()
    rows = []
    for record in sorted(records, key=lambda r: (r.status != "ok", r.ranking_energy if r.ranking_energy is not None else 0.0)):
        duplicate = None
        if record.status == "ok" and record.atoms is not None:
            duplicate = dedupe.add(record.atoms, record.ranking_energy, record.candidate)
        rows.append({
            "pool_index": record.candidate,
            "after_cycle": record.generation,
            "reason": record.extra.get("reason"),
            "cluster": record.extra.get("cluster"),
            "predicted_energy_per_atom": record.extra.get("predicted_energy_per_atom"),
            "energy_per_atom": record.ranking_energy,
            "delta_e_mev": record.extra.get("delta_e_mev"),
            "oracle_calls": record.oracle_calls,
            "status": record.relax_status if record.status == "ok" else f"failed: {record.error}",
            "spacegroup": record.spacegroup_symbol,
            "spacegroup_number": record.spacegroup_number,
            "matches_target": record.extra.get("matches_target"),
            "duplicate_of": duplicate,
        })
    return rows


# ---------------------------------------------------------------- files


def _write_frames(path: Path, frames: list[Atoms]) -> None:
    """Write ``frames`` as extxyz atomically (labels included when frames carry them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".extxyz", dir=path.parent)
    os.close(fd)
    try:
        write(tmp, frames, format="extxyz")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_frames(path: Path) -> list[Atoms]:
    if path.stat().st_size == 0:
        return []
    return read(path, ":", format="extxyz")
