"""The candidate pool of an active-learning run (seed 004, sections II.A, II.E and III.A).

Two pools live side by side in one :class:`Pool`: the *search pool* of symmetric
candidates (default 30 per compatible space group) in which minima are sought, and
the *training pool* of fully random candidates (default 1000) that supplies the
oracle labels. Every cycle the ensemble relaxes all of them together
(:func:`relax_pool`, one batched model evaluation per step) and the pool keeps the
relaxed geometries with what the model says about them (:func:`evaluate_pool`):
energy per atom, largest force, uncertainty U (eq. 5) and the mean-pooled learned
features (eq. 1) that clustering works on.

A pool is saved as one ``.npz`` file, written atomically, so each cycle's pool is a
checkpoint.

The model is anything with ``predict(batch, stress=..., features=...) -> Prediction``
(:class:`PoolModel`); the BPNN ensemble of :mod:`xtalforge.potentials` is the default,
and any other architecture that reports uncertainty and features fits.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from ase import Atoms, units
from tqdm.auto import tqdm

from xtalforge.errors import CheckpointError, XtalforgeError
from xtalforge.structures.batch import Batch, Prediction

SEARCH, TRAINING = 0, 1  # origin codes
# Candidate ids of the training pool start here, so the two pools never share a seed.
TRAINING_OFFSET = 10_000_000
POOL_FORMAT = 1


class PoolModel(Protocol):
    """What the pool search needs from a potential: batched mean prediction plus U and features."""

    def predict(self, batch: Batch, stress: bool = True, features: bool = False) -> Prediction: ...


@dataclass
class Pool:
    """Structures of the pool with the latest model's view of them (NaN where unknown).

    ``status`` is "initial" before any relaxation, then the last relaxation's outcome
    ("converged", "uncertain", "stalled", "max_steps") or "failed"; failed structures
    stay in place (indices are stable across cycles) but are never relaxed, selected
    or clustered again.
    """

    atoms: list[Atoms]
    origin: np.ndarray  # (S,) SEARCH or TRAINING
    candidate: np.ndarray  # (S,) generation seed index
    initial_spacegroup: np.ndarray  # (S,) space group drawn for symmetric candidates, 0 for random
    status: np.ndarray  # (S,) str
    n_steps: np.ndarray  # (S,) model relaxation steps summed over cycles (active.relax_from = "initial": the last cycle's)
    energy_per_atom: np.ndarray = None  # (S,) eV/atom, enthalpy per atom under pressure
    max_force: np.ndarray = None  # (S,) eV/Å
    uncertainty: np.ndarray = None  # (S,) U of eq. 5
    features: np.ndarray | None = None  # (S, F)
    cluster: np.ndarray = None  # (S,) DBSCAN label of the last evaluation, -1 = none
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.atoms)
        for name in ("energy_per_atom", "max_force", "uncertainty"):
            if getattr(self, name) is None:
                setattr(self, name, np.full(n, np.nan))
        if self.cluster is None:
            self.cluster = np.full(n, -1, dtype=int)

    def __len__(self) -> int:
        return len(self.atoms)

    @property
    def usable(self) -> np.ndarray:
        """Structures that may be relaxed, selected and clustered: not failed."""
        return self.status != "failed"

    @property
    def evaluated(self) -> np.ndarray:
        """Usable structures with a finite model energy."""
        return self.usable & np.isfinite(self.energy_per_atom)

    def mask(self, origin: int | None) -> np.ndarray:
        return np.ones(len(self), bool) if origin is None else self.origin == origin

    def save(self, path: str | Path) -> Path:
        """Write the pool to ``path`` (.npz) atomically."""
        path = Path(path)
        counts = np.array([len(a) for a in self.atoms], dtype=int)
        arrays = {
            "format": np.array(POOL_FORMAT),
            "n_atoms": counts,
            "numbers": _concat([a.numbers for a in self.atoms], np.int64, (0,)),
            "positions": _concat([a.positions for a in self.atoms], float, (0, 3)),
            "cells": np.array([a.cell.array for a in self.atoms], dtype=float).reshape(-1, 3, 3),
            "origin": self.origin.astype(np.int8),
            "candidate": self.candidate.astype(np.int64),
            "initial_spacegroup": self.initial_spacegroup.astype(np.int16),
            "status": self.status.astype("U16"),
            "n_steps": self.n_steps.astype(np.int64),
            "energy_per_atom": self.energy_per_atom,
            "max_force": self.max_force,
            "uncertainty": self.uncertainty,
            "cluster": self.cluster.astype(np.int64),
        }
        if self.features is not None:
            arrays["features"] = self.features.astype(np.float32)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                np.savez(handle, **arrays)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path) -> Pool:
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                d = {k: data[k] for k in data.files}
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"pool file {path} is unreadable ({exc}): delete the run's active/ folder to restart the search") from None
        if int(d.get("format", -1)) != POOL_FORMAT:
            raise CheckpointError(f"pool file {path} has format {d.get('format')}, expected {POOL_FORMAT}: start a new run directory")
        bounds = np.concatenate([[0], np.cumsum(d["n_atoms"])])
        atoms = [
            Atoms(numbers=d["numbers"][a:b], positions=d["positions"][a:b], cell=cell, pbc=True)
            for a, b, cell in zip(bounds[:-1], bounds[1:], d["cells"])
        ]
        return cls(
            atoms=atoms, origin=d["origin"].astype(int), candidate=d["candidate"].astype(int),
            initial_spacegroup=d["initial_spacegroup"].astype(int), status=d["status"].astype(str),
            n_steps=d["n_steps"].astype(int), energy_per_atom=d["energy_per_atom"].astype(float),
            max_force=d["max_force"].astype(float), uncertainty=d["uncertainty"].astype(float),
            features=d["features"].astype(float) if "features" in d else None, cluster=d["cluster"].astype(int),
        )

    def copy(self) -> Pool:
        return replace(
            self, atoms=[a.copy() for a in self.atoms], status=self.status.copy(), n_steps=self.n_steps.copy(),
            energy_per_atom=self.energy_per_atom.copy(), max_force=self.max_force.copy(),
            uncertainty=self.uncertainty.copy(), cluster=self.cluster.copy(),
            features=None if self.features is None else self.features.copy(),
        )


def _concat(arrays, dtype, empty_shape) -> np.ndarray:
    return np.concatenate(arrays).astype(dtype) if arrays else np.zeros(empty_shape, dtype)


# ---------------------------------------------------------------- generation


@dataclass
class PoolSpec:
    """What to generate: one entry per structure (candidate id, mode, space group)."""

    candidates: list[int]
    modes: list[str]
    spacegroups: list[int]  # 0 = any (random mode)
    origin: list[int]


def pool_spec(
    compatible: list[int],
    per_spacegroup: int,
    training_size: int,
    search_mode: str = "symmetric",
    search_size: int = 0,
) -> PoolSpec:
    """Candidate ids, modes and space groups of the search pool and the training pool."""
    spec = PoolSpec([], [], [], [])
    if search_mode == "symmetric":
        for k, sg in enumerate(compatible):
            for j in range(per_spacegroup):
                _append(spec, k * per_spacegroup + j, "symmetric", sg, SEARCH)
    else:
        for j in range(search_size):
            _append(spec, j, "random", 0, SEARCH)
    for j in range(training_size):
        _append(spec, TRAINING_OFFSET + j, "random", 0, TRAINING)
    return spec


def _append(spec: PoolSpec, candidate: int, mode: str, sg: int, origin: int) -> None:
    spec.candidates.append(candidate)
    spec.modes.append(mode)
    spec.spacegroups.append(sg)
    spec.origin.append(origin)


def generate_pool(
    spec: PoolSpec,
    generate: Callable[[int, str, int, int], Atoms],
    *,
    progress: bool = True,
    log=None,
    workers: int = 1,
) -> Pool:
    """Generate every structure of ``spec`` with ``generate(candidate, mode, spacegroup, origin)``.

    A space group whose candidates cannot be generated (PyXtal gives up, an
    impossible Wyckoff combination) is skipped after its first failure and logged;
    the pool is built from the rest. ``workers > 1`` generates in that many processes,
    one space group's candidates (or up to ``RANDOM_BLOCK`` random ones) per task;
    ``generate`` must then be picklable. The pool is the same either way: every
    candidate has its own random stream.
    """
    blocks = _blocks(spec)
    outcomes: dict[int, Atoms | str] = {}
    bar = tqdm(total=len(spec.candidates), desc="generating pool", unit="structure",
               disable=not progress or not sys.stderr.isatty())
    for block, done in _generated_blocks(blocks, generate, workers):
        outcomes.update(done)
        bar.update(len(block))
    bar.close()
    atoms, keep = [], []
    for k, (cand, mode, sg) in enumerate(zip(spec.candidates, spec.modes, spec.spacegroups)):
        outcome = outcomes.get(k)  # absent: its space group failed on an earlier candidate
        if isinstance(outcome, Atoms):
            atoms.append(outcome)
            keep.append(k)
        elif outcome is not None and log is not None:
            log.warning("pool candidate %d (%s, space group %s) not generated: %s", cand, mode, sg or "-", outcome)
    if not atoms:
        raise XtalforgeError("no pool structure could be generated: relax the structure constraints or choose other space groups")
    keep = np.array(keep, dtype=int)
    n = len(atoms)
    return Pool(
        atoms=atoms,
        origin=np.asarray(spec.origin)[keep],
        candidate=np.asarray(spec.candidates)[keep],
        initial_spacegroup=np.asarray(spec.spacegroups)[keep],
        status=np.full(n, "initial", dtype="U16"),
        n_steps=np.zeros(n, dtype=int),
    )


RANDOM_BLOCK = 50  # random candidates per generation task


def _blocks(spec: PoolSpec) -> list[list[tuple]]:
    """Runs of ``(k, candidate, mode, spacegroup, origin)``: one per symmetric space group and origin."""
    blocks: list[list[tuple]] = []
    entries = zip(range(len(spec.candidates)), spec.candidates, spec.modes, spec.spacegroups, spec.origin)
    for entry in entries:
        last = blocks[-1][-1] if blocks else None
        same = last is not None and last[2:] == entry[2:] and (entry[2] == "symmetric" or len(blocks[-1]) < RANDOM_BLOCK)
        if same:
            blocks[-1].append(entry)
        else:
            blocks.append([entry])
    return blocks


def _generate_block(generate: Callable, block: list[tuple]) -> dict[int, Atoms | str]:
    """Structures (or the failure's message) of one block; a symmetric block stops at its first failure."""
    done: dict[int, Atoms | str] = {}
    for k, cand, mode, sg, origin in block:
        try:
            structure = generate(cand, mode, sg, origin)
        except XtalforgeError as exc:
            done[k] = str(exc)
            if mode == "symmetric":
                break
            continue
        structure.calc = None
        done[k] = structure
    return done


def _generated_blocks(blocks: list[list[tuple]], generate: Callable, workers: int):
    """``(block, outcomes)`` for every block, serially or from ``workers`` processes as they finish."""
    if workers <= 1 or len(blocks) < 2:
        for block in blocks:
            yield block, _generate_block(generate, block)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # fork where there is one: spawn would re-run a user's unguarded script in every worker. The
    # children only run PyXtal and numpy, never the torch thread pools they inherit.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as executor:
        futures = {executor.submit(_generate_block, generate, block): block for block in blocks}
        for future in as_completed(futures):
            yield futures[future], future.result()


# ---------------------------------------------------------------- model evaluation


@dataclass
class PoolEvaluation:
    """Model predictions for a list of structures."""

    energy_per_atom: np.ndarray  # (S,) enthalpy per atom under pressure
    max_force: np.ndarray  # (S,)
    uncertainty: np.ndarray  # (S,)
    features: np.ndarray | None  # (S, F)


def evaluate_structures(
    model: PoolModel, atoms_list: list[Atoms], *, pressure_gpa: float = 0.0, chunk: int = 512, features: bool = True
) -> PoolEvaluation:
    """Energy per atom, largest force, U and mean-pooled features of every structure.

    Evaluated ``chunk`` structures at a time to bound memory; a chunk the model fails
    on is evaluated one structure at a time so one bad structure gets NaN alone.
    """
    n = len(atoms_list)
    out = PoolEvaluation(np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan), None)
    for start in range(0, n, chunk):
        index = np.arange(start, min(start + chunk, n))
        try:
            _evaluate_chunk(model, atoms_list, index, out, pressure_gpa, features)
        except Exception:  # noqa: BLE001 - isolate the structure that breaks the model
            for i in index:
                with contextlib.suppress(Exception):  # this structure keeps NaN: the model cannot evaluate it
                    _evaluate_chunk(model, atoms_list, np.array([i]), out, pressure_gpa, features)
    return out


def _evaluate_chunk(model, atoms_list, index, out: PoolEvaluation, pressure_gpa: float, features: bool) -> None:
    batch = Batch.from_atoms([atoms_list[i] for i in index])
    pred = model.predict(batch, stress=False, features=features)
    n_atoms = batch.n_atoms.to(batch.dtype)
    energy = pred.energy.detach().to(torch.float64)
    if pressure_gpa:
        energy = energy + pressure_gpa * units.GPa * batch.volume
    norms = torch.linalg.norm(pred.forces.detach().to(torch.float64), dim=1)
    fmax = torch.zeros(batch.n_systems, dtype=torch.float64).scatter_reduce(
        0, batch.system_idx, norms, reduce="amax", include_self=True
    )
    out.energy_per_atom[index] = (energy / n_atoms).cpu().numpy()
    out.max_force[index] = fmax.cpu().numpy()
    if pred.uncertainty is not None:
        out.uncertainty[index] = pred.uncertainty.detach().cpu().numpy()
    if features and pred.features is not None:
        feats = pred.features.detach().to(torch.float64).cpu().numpy()
        if out.features is None:
            out.features = np.full((len(out.energy_per_atom), feats.shape[1]), np.nan)
        out.features[index] = feats


def evaluate_pool(model: PoolModel, pool: Pool, *, pressure_gpa: float = 0.0, chunk: int = 512) -> Pool:
    """Copy of ``pool`` with the model's energies, forces, U and features (failed ones stay NaN)."""
    out = pool.copy()
    usable = np.flatnonzero(pool.usable)
    ev = evaluate_structures(model, [pool.atoms[i] for i in usable], pressure_gpa=pressure_gpa, chunk=chunk)
    out.energy_per_atom[:] = np.nan
    out.max_force[:] = np.nan
    out.uncertainty[:] = np.nan
    out.energy_per_atom[usable] = ev.energy_per_atom
    out.max_force[usable] = ev.max_force
    out.uncertainty[usable] = ev.uncertainty
    if ev.features is not None:
        out.features = np.full((len(pool), ev.features.shape[1]), np.nan)
        out.features[usable] = ev.features
    else:
        out.features = None
    return out


# ---------------------------------------------------------------- relaxation


class FlooredUncertainty:
    """``model`` with U = max|σ_f| / max(max|f̄|, ``floor``) instead of eq. 5's bare ratio.

    In a symmetric structure every force vanishes by symmetry, for each member of the
    ensemble alike, so eq. 5 divides round-off by round-off and a random U stops the
    relaxation of exactly the candidates the search pool is made of. Measuring the
    spread against at least ``floor`` (the force convergence threshold) keeps the
    criterion relative where forces are large and makes it an absolute bound,
    σ_f ≤ U_max × floor, near a minimum.
    """

    def __init__(self, model: PoolModel, floor: float):
        self.model = model
        self.floor = float(floor)

    def predict(self, batch: Batch, stress: bool = True, features: bool = False) -> Prediction:
        pred = self.model.predict(batch, stress=stress, features=features)
        if pred.forces_std is None:
            return pred
        from xtalforge.potentials.ensemble import relative_force_uncertainty

        forces = pred.forces.detach()
        pred.uncertainty = relative_force_uncertainty(forces, pred.forces_std.detach(), batch.system_idx.to(forces.device),
                                                      batch.n_systems, floor=self.floor)
        return pred


@dataclass
class PoolRelaxSettings:
    fmax: float = 0.05
    smax_gpa: float | None = 2.0
    max_steps: int = 300
    patience: int = 20
    u_max: float | None = 0.5
    pressure_gpa: float = 0.0
    u_force_floor: float | None = None  # eV/Å; None = fmax


def relax_pool(
    model: PoolModel,
    pool: Pool,
    settings: PoolRelaxSettings,
    *,
    min_distance_matrix_fn=None,
    relax_config=None,
    progress: bool = True,
    chunk: int = 1024,
) -> Pool:
    """Relax every usable structure of ``pool`` with ``model``, ``chunk`` structures per batch.

    All structures of a batch advance together, one model evaluation per step; each
    stops on its own criteria (converged, U > u_max, stalled, step limit, guards).
    The returned pool holds the relaxed geometries, their statuses and the model's
    view of them (energy, forces, U, features); the input pool is not modified.
    """
    from xtalforge.dynamics import batched_relax

    out = pool.copy()
    usable = np.flatnonzero(pool.usable)
    floor = settings.fmax if settings.u_force_floor is None else max(settings.u_force_floor, settings.fmax)
    model = FlooredUncertainty(model, floor)
    for start in range(0, len(usable), chunk):
        index = usable[start:start + chunk]
        results = batched_relax(
            model, [pool.atoms[i] for i in index], fmax=settings.fmax, smax_gpa=settings.smax_gpa,
            max_steps=settings.max_steps, patience=settings.patience, u_max=settings.u_max,
            pressure_gpa=settings.pressure_gpa, min_distance_matrix_fn=min_distance_matrix_fn,
            config=relax_config, progress=progress,
        )
        for i, result in zip(index, results):
            if result.status != "failed":
                structure = result.atoms.copy()
                structure.calc = None
                out.atoms[i] = structure
            out.status[i] = result.status
            out.n_steps[i] += result.n_steps
    return evaluate_pool(model, out, pressure_gpa=settings.pressure_gpa, chunk=chunk)
