"""Acceptance run of issue 5: NNPs trained only on melt–quench data rank known polymorphs.

For each system, at reduced scale:
  1. melt–quench–anneal MD with the oracle from a random cell (``xtalforge dataset meltquench``);
  2. an NNP ensemble trained on those frames alone;
  3. test structures relaxed with the oracle: the known polymorphs plus alternatives
     (seed 000 used USPEX metastable structures; here random PyXtal structures relaxed
     with the oracle, and for Mg2SiO4 the spinel polymorph and an antisite variant);
  4. NNP energies at the oracle geometries against the oracle: Pearson r and RMSE within
     200 meV/atom of the lowest (seed 000 reports r = 0.77-0.98), the polymorph order,
     and the descriptor-space coverage (seed 000 Figs. 2 and 3) as PNGs.
For Si also: the scale-up check (trained on 32-atom cells, tested on a 64-atom run), a
reference network with the default symmetry functions, and the oracle calls on-the-fly
sampling saves at equal NNP accuracy:
  * the plain protocol (oracle MD) at 1/8, 1/4, 1/2 and 1 times its length gives a plain
    calls-vs-accuracy curve; on-the-fly runs of the same schedule sweep the uncertainty
    threshold; every frame set trains an NNP with the same settings;
  * test sets: 64-atom oracle runs with the liquid at 1000, 1500 and 2000 K, each with its own
    volume adjustment, quench and anneal (pooled for the verdict), and the earlier run at the
    full plain run's T_m (which favours the plain run: the on-the-fly runs find another T_m);
  * for each on-the-fly NNP and metric (energy and force RMSE, whole runs and their equilibrated
    part), the calls the plain curve needs to be as accurate (linear in log calls between its
    points); the max over metrics minus the on-the-fly calls are the calls saved, for each of
    two MD seeds and their mean; also the earlier strict verdict against the full plain run
    (EQUAL_ACCURACY_FACTOR).
Every training is epoch-capped, so the figures do not depend on machine load.
Systems not rerun keep their earlier section in the results file, with that run's date.

    python benchmarks/meltquench_acceptance.py [--systems si mg2sio4] [--work DIR]

Si uses the Stillinger-Weber oracle (fast); Mg2SiO4 uses SevenNet-0 at 14 atoms.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REFERENCE_DIR, finish  # noqa: E402

from ase import Atoms  # noqa: E402
from ase.io import read, write  # noqa: E402

from xtalforge.config import (  # noqa: E402
    MeltQuenchConfig,
    OnTheFlyConfig,
    OracleConfig,
    PotentialConfig,
    RelaxConfig,
    StructuresConfig,
)
from xtalforge.datasets.coverage import (  # noqa: E402
    coverage_pca,
    energy_correlation,
    plot_correlation,
    plot_coverage,
    predict_energies_per_atom,
    scale_up_report,
)
from xtalforge.datasets.meltquench import run_meltquench  # noqa: E402
from xtalforge.datasets.onthefly import OnTheFlyLabeller  # noqa: E402
from xtalforge.dynamics import relax_structure  # noqa: E402
from xtalforge.oracles import build_oracle  # noqa: E402
from xtalforge.potentials import evaluate, train_ensemble  # noqa: E402
from xtalforge.structures.composition import Composition  # noqa: E402
from xtalforge.structures.constraints import Constraints  # noqa: E402
from xtalforge.structures.generate import generate_many  # noqa: E402

FIGURES = Path(__file__).resolve().parent / "results" / "meltquench_acceptance"

# Reduced protocols (paper: ~100 atoms, 5 ps superheat, 20 ps liquid, 100 K/ps, 15 ps anneal).
ALL_PHASES = ["superheat", "melt_search", "volume", "liquid", "quench", "anneal"]
SI_PROTOCOL = dict(
    n_atoms=32, superheat_ps=1.0, melt_search_start_K=3000.0, melt_search_step_K=500.0, melt_search_min_K=1000.0,
    melt_search_ps=0.6, volume_ps=0.3, volume_max_iterations=3, bulk_modulus_gpa=100.0, liquid_ps=1.5,
    quench_rate_K_per_ps=500.0, anneal_ps=1.0, checkpoint_every=500, keep_phases=ALL_PHASES,
)


def si_large_protocol(melting_temperature_K: float) -> dict:
    """The same stages on 64 atoms, at the 32-atom run's T_m, shorter: the scale-up test set."""
    return dict(SI_PROTOCOL, n_atoms=64, superheat_ps=0.4, melt_search_start_K=melting_temperature_K,
                melt_search_min_K=melting_temperature_K, melt_search_ps=0.2, volume_max_iterations=1,
                liquid_ps=0.4, quench_rate_K_per_ps=1000.0, anneal_ps=0.4,
                keep_phases=["superheat", "liquid", "quench", "anneal"])


def si_fixed_temperature_protocol(temperature_K: float) -> dict:
    """The 64-atom test protocol with the liquid at ``temperature_K`` whatever its MSD says (a threshold of
    -1e9 Å²/ps makes the one-temperature melt search count as liquid): a test set tied to no run's T_m.
    Up to four volume iterations: with two, the secant step on 0.3 ps pressures once overshot to a
    liquid at +16 GPa (1500 K)."""
    return dict(si_large_protocol(temperature_K), liquid_msd_slope=-1e9, volume_max_iterations=4)


# The plain curve: the plain protocol at these fractions of SI_PROTOCOL's length.
PLAIN_FRACTIONS = (0.125, 0.25, 0.5, 1.0)
SCALED_PHASES = ("superheat_ps", "melt_search_ps", "volume_ps", "liquid_ps", "anneal_ps")


def scaled_protocol(fraction: float) -> dict:
    """SI_PROTOCOL with every phase ``fraction`` times as long, the quench too (through its rate); same temperatures."""
    return dict(SI_PROTOCOL, **{key: SI_PROTOCOL[key] * fraction for key in SCALED_PHASES},
                quench_rate_K_per_ps=SI_PROTOCOL["quench_rate_K_per_ps"] / fraction)


# MD seeds of the plain curve and the on-the-fly runs: the first runs the whole threshold sweep,
# the second repeats the plain curve and SECOND_SEED_SWEEP.
MD_SEEDS = (11, 13)
SECOND_SEED_SWEEP = ("U>0.05",)
# Test sets (64 atoms): the earlier one at the full plain run's T_m (1000 K for seed 11, while the
# on-the-fly runs found 1500 K), and runs with the liquid at fixed temperatures {T: MD seed}, pooled
# for the verdict.
OLD_TEST_SET, OLD_TEST_SEED = "at_plain_T_m", 12
TEST_TEMPERATURES_K = {1000.0: 41, 1500.0: 42, 2000.0: 43}
VERDICT_TEST_SET = "fixed_T_pooled"


# SevenNet-0 on CPU takes ~0.2 s per step of 14 atoms: about 1400 steps, a frame every 10 fs.
MG2SIO4_PROTOCOL = dict(
    n_atoms=14, superheat_ps=0.2, melt_search_start_K=3500.0, melt_search_step_K=1000.0, melt_search_min_K=2500.0,
    melt_search_ps=0.25, volume_ps=0.15, volume_max_iterations=1, bulk_modulus_gpa=80.0, liquid_ps=0.4,
    quench_rate_K_per_ps=4000.0, anneal_ps=0.2, frame_interval_fs=10.0, checkpoint_every=100,
    keep_phases=ALL_PHASES,
)
# Every training is epoch-capped (no wall-clock limit), so the figures do not depend on machine load.
# stop_at_targets stays on (PotentialConfig default): validation RMSEs below seed 000's targets end a training.
TRAINING = dict(epochs=150, patience=30)
# Stillinger-Weber acts within 3.77 Å. The default symmetry functions (6 Å, radial Gaussians all
# centred at 0) resolve the first shell poorly: on this data they left validation force RMSE at
# 0.56 eV/Å and stretched the polymorph energy scale ~3x however long they were trained. Gaussians
# centred across 2.1-3.9 Å within 4.2 Å reach 0.2 eV/Å; the default set is kept as a reference run.
SI_DESCRIPTOR = dict(cutoff=4.2, radial_eta=[0.5] + [4.0] * 7, radial_shift=[0.0, 2.1, 2.4, 2.7, 3.0, 3.3, 3.6, 3.9],
                     angular_eta=[0.0, 0.1, 0.3])
SI_POTENTIAL = PotentialConfig(**SI_DESCRIPTOR, **TRAINING)
DEFAULT_DESCRIPTOR_POTENTIAL = PotentialConfig(**TRAINING)
MG2SIO4_POTENTIAL = PotentialConfig(**TRAINING)
# Retraining inside the on-the-fly run: the same descriptor, fewer epochs (5-6 times per run).
ONTHEFLY_POTENTIAL = PotentialConfig(**SI_DESCRIPTOR, epochs=60, patience=15)
# retrain_growth 0.5: ~6 retrainings instead of ~20 when nearly every candidate is labelled.
ONTHEFLY_BASE = dict(bootstrap_steps=100, bootstrap_stride=2, retrain_every=25, retrain_growth=0.5, n_models=3,
                     max_uncertainty=0.5)
# The sweep: lower thresholds label more candidates (median U of the candidates is ~0.07-0.09);
# each setting is a separate on-the-fly run. U>0 labels every candidate (one frame per 20 fs,
# the plain protocol's frame rate), the most that on-the-fly sampling of this schedule can label.
ONTHEFLY_SWEEP = {
    f"U>{u:g}": OnTheFlyConfig(**ONTHEFLY_BASE, uncertainty_threshold=u) for u in (0.1, 0.05, 0.0)
}
# "Equal accuracy": test energy RMSE and force RMSE both within this factor of the plain NNP's.
EQUAL_ACCURACY_FACTOR = 1.1


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- test structures ------------------------------------------------------------------


def relaxed(structures: list[Atoms], oracle, names: list[str], config: RelaxConfig) -> tuple[list[Atoms], list[str]]:
    """Oracle-relaxed copies (positions and cell) carrying their oracle energy; failures dropped."""
    out, kept = [], []
    for atoms, name in zip(structures, names):
        result = relax_structure(atoms, oracle.calculator, config)
        if result.energy is None or result.status == "failed":
            log(f"  {name}: relaxation failed ({result.reason})")
            continue
        relaxed_atoms = result.atoms
        relaxed_atoms.info["name"] = name
        log(f"  {name}: {result.status}, {result.energy_per_atom:.4f} eV/atom after {result.n_steps} steps")
        out.append(relaxed_atoms)
        kept.append(name)
    return out, kept


def random_structures(formula: str, n: int, seed: int) -> list[Atoms]:
    composition = Composition.parse(formula)
    constraints = Constraints.from_config(composition, StructuresConfig())
    return generate_many(composition, constraints, n, seed, mode="symmetric", pyxtal_timeout_s=10.0)


def spinel_mg2sio4() -> Atoms:
    """Ringwoodite (γ-Mg2SiO4, Fd-3m, origin 2): Mg 16c, Si 8b, O 32e x = 0.2441, a = 8.07 Å; primitive cell."""
    from ase.spacegroup import crystal
    import spglib

    cubic = crystal(["Mg", "Si", "O"], basis=[(0, 0, 0), (0.375, 0.375, 0.375), (0.2441, 0.2441, 0.2441)],
                    spacegroup=227, setting=2, cellpar=[8.07, 8.07, 8.07, 90, 90, 90])
    cell, positions, numbers = spglib.find_primitive((cubic.cell, cubic.get_scaled_positions(), cubic.numbers))
    return Atoms(numbers, scaled_positions=positions, cell=cell, pbc=True)


def antisite(atoms: Atoms, a: str, b: str) -> Atoms:
    """``atoms`` with the first ``a`` and the nearest ``b`` swapped."""
    out = atoms.copy()
    i = int(np.flatnonzero(out.symbols == a)[0])
    others = np.flatnonzero(out.symbols == b)
    j = int(others[np.argmin(out.get_distances(i, others, mic=True))])
    numbers = out.numbers.copy()
    numbers[[i, j]] = numbers[[j, i]]
    out.numbers = numbers
    return out


# -- one system -----------------------------------------------------------------------


def assess(name: str, frames: list[Atoms], tests: list[Atoms], model, polymorph_order: list[str]) -> dict:
    """Correlation, polymorph order and coverage of ``model`` (trained on ``frames``) on ``tests``."""
    names = [a.info["name"] for a in tests]
    write(FIGURES / f"{name}_test_structures.extxyz", tests)  # oracle-relaxed, with oracle labels
    reference = np.array([a.get_potential_energy() / len(a) for a in tests])
    nnp = predict_energies_per_atom(model, tests)
    correlation = energy_correlation(nnp, reference, names, window_ev=0.2)
    plot_correlation(correlation, FIGURES / f"{name}_correlation.png", title=f"{name}: NNP trained on melt-quench MD")
    pca = coverage_pca(frames, tests, descriptor=model.descriptor)
    plot_coverage(pca, FIGURES / f"{name}_coverage_pca.png", names)
    by_name = {row["name"]: row for row in correlation["structures"]}
    present = [p for p in polymorph_order if p in by_name]
    nnp_polymorphs = sorted(present, key=lambda p: by_name[p]["nnp_ev_per_atom"])
    oracle_polymorphs = sorted(present, key=lambda p: by_name[p]["reference_ev_per_atom"])
    return {
        "pearson_r_within_200meV": correlation["pearson_r"],
        "rmse_mev_per_atom_within_200meV": correlation["rmse_mev_per_atom"],
        "n_test_structures": correlation["n_structures"],
        "n_within_200meV": correlation["n_within"],
        "pearson_r_all": correlation.get("pearson_r_all"),
        "oracle_lowest": correlation["reference_lowest"],
        "nnp_lowest": correlation["nnp_lowest"],
        "polymorphs_oracle_order": oracle_polymorphs,
        "polymorphs_nnp_order": nnp_polymorphs,
        "polymorph_delta_mev": {p: {"oracle": round(by_name[p]["delta_reference_mev"], 1),
                                    "nnp": round(by_name[p]["delta_nnp_mev"], 1)} for p in present},
        "coverage_inside_fraction": {el: e.get("inside_fraction") for el, e in pca.items()},
        "structures": correlation["structures"],
    }


def train(frames: list[Atoms], config: PotentialConfig, seed: int, what: str, n_models: int = 3):
    started = time.perf_counter()
    model = train_ensemble(frames, config, n_models=n_models, seed=seed, progress=False)
    log(f"  trained {what} on {len(frames)} frames in {time.perf_counter() - started:.0f} s: "
        f"{ {k: round(v, 4) for k, v in model.metrics.items() if isinstance(v, float)} }")
    return model


def run_si(work: Path) -> dict:
    oracle = build_oracle(OracleConfig(name="sw"))
    composition = Composition.parse("Si")
    log("Si: melt-quench with Stillinger-Weber, 32 atoms")
    plain = plain_run(composition, 1.0, MD_SEEDS[0], work)
    log(f"  {summary(plain.report)}")
    # Every tenth frame is held out: the small-cell side of the scale-up check.
    holdout = plain.frames[::10]
    plain_training = plain_training_frames(plain.frames)

    log("Si: independent 64-atom test runs")
    test_sets, test_set_info = si_test_sets(composition, plain.report["melting_temperature_K"], work)

    log("Si: test structures relaxed with the oracle")
    polymorph_files = {"diamond": "Si_diamond_Fd-3m", "lonsdaleite": "Si_lonsdaleite_P63mmc", "BC8": "Si_BC8_Ia-3",
                       "beta-tin": "Si_beta-tin_I41amd"}
    structures = [read(REFERENCE_DIR / f"{f}.cif") for f in polymorph_files.values()]
    names = list(polymorph_files)
    randoms = random_structures("Si8", 12, seed=3) + random_structures("Si16", 8, seed=4)
    tests, _ = relaxed(structures + randoms, oracle, names + [f"random-{i}" for i in range(len(randoms))],
                       RelaxConfig(max_steps=400, fmax=0.02, smax_gpa=0.2))

    log("Si: plain protocol at full length and shorter (the plain calls-vs-accuracy curve)")
    curves, models = {}, {}
    for seed in MD_SEEDS:
        curves[seed] = []
        for fraction in PLAIN_FRACTIONS:
            run = plain_run(composition, fraction, seed, work)
            point, models[seed, fraction] = plain_point(run, fraction, seed, test_sets, tests)
            curves[seed].append(point)
    model = models[MD_SEEDS[0], 1.0]
    scale_up = scale_up_report(model, holdout, test_sets[OLD_TEST_SET])
    log(f"  scale-up: energy RMSE {scale_up['small']['energy_rmse_mev_atom']:.1f} (32 atoms, held out) -> "
        f"{scale_up['large']['energy_rmse_mev_atom']:.1f} meV/atom (64 atoms)")
    result = assess("Si", plain.frames, tests, model, SI_POLYMORPHS)
    result["ranking_ok"] = si_ranking_ok(result)

    # One network, not three, to save time: the reference only shows what the descriptor does.
    log("Si: one network with the default symmetry functions (reference for the descriptor choice)")
    default_model = train(plain_training, DEFAULT_DESCRIPTOR_POTENTIAL, seed=0, what="NNP, default descriptor",
                          n_models=1)
    default_descriptor = {
        "potential": "PotentialConfig defaults (6 Å, radial Gaussians centred at 0), same epoch caps, 1 network",
        "nnp_validation": _floats(default_model.metrics),
        "accuracy": accuracy_on(default_model, test_sets),
        **polymorph_summary(default_model, tests),
    }

    log("Si: on-the-fly sampling of the same protocol, uncertainty-threshold sweep")
    sweeps, otf_runs = {}, {}
    for seed in MD_SEEDS:
        labels = ONTHEFLY_SWEEP if seed == MD_SEEDS[0] else SECOND_SEED_SWEEP
        sweeps[seed] = {}
        for label in labels:
            point, frames, otf_model = onthefly_point(composition, ONTHEFLY_SWEEP[label], seed,
                                                      work / f"si_otf_seed{seed}_{slug(label)}", test_sets, tests)
            sweeps[seed][label], otf_runs[seed, label] = point, (frames, otf_model)
    onthefly = onthefly_summary(curves, sweeps, test_set_info)
    for test_set, suffix in ((VERDICT_TEST_SET, ""), (OLD_TEST_SET, "_old_test_set")):
        plot_calls_vs_accuracy(curves, sweeps, test_set, FIGURES / f"Si_onthefly_calls_vs_rmse{suffix}.png")
    # Correlation and coverage figures for the first seed's setting that saves the most calls at equal accuracy.
    first = onthefly["calls_saved_at_equal_accuracy"][seed_key(MD_SEEDS[0])]
    shown = max(first, key=lambda label: first[label][VERDICT_TEST_SET]["calls_saved"])
    otf_frames, otf_model = otf_runs[MD_SEEDS[0], shown]
    onthefly["figures_setting"] = f"{seed_key(MD_SEEDS[0])}, {shown}"
    assess("Si_onthefly", otf_frames, tests, otf_model, SI_POLYMORPHS)
    return {
        "oracle": "sw",
        "protocol": SI_PROTOCOL,
        "large_protocol": si_large_protocol(plain.report["melting_temperature_K"]),
        "potential": {"descriptor": SI_DESCRIPTOR, **TRAINING, "n_models": 3},
        "meltquench": _protocol_summary(plain.report),
        "nnp_validation": _floats(model.metrics),
        **result,
        "default_descriptor": default_descriptor,
        "scale_up": scale_up,
        "onthefly": onthefly,
    }


SI_POLYMORPHS = ["diamond", "lonsdaleite", "beta-tin"]


def si_ranking_ok(result: dict) -> bool:
    d = result["polymorph_delta_mev"]
    # Stillinger-Weber sees first neighbours only: diamond and lonsdaleite are degenerate in the
    # oracle, so "diamond below lonsdaleite" can only hold within a few meV/atom.
    return bool(d["diamond"]["nnp"] <= d["lonsdaleite"]["nnp"] + 5.0 and d["lonsdaleite"]["nnp"] < d["beta-tin"]["nnp"])


def polymorph_summary(model, tests: list[Atoms]) -> dict:
    """Pearson r, RMSE within 200 meV/atom and the polymorph deltas of ``model`` (no figures)."""
    reference = np.array([a.get_potential_energy() / len(a) for a in tests])
    correlation = energy_correlation(predict_energies_per_atom(model, tests), reference,
                                     [a.info["name"] for a in tests], window_ev=0.2)
    by_name = {row["name"]: row for row in correlation["structures"]}
    return {
        "pearson_r_within_200meV": correlation["pearson_r"],
        "rmse_mev_per_atom_within_200meV": correlation["rmse_mev_per_atom"],
        "polymorph_delta_mev": {p: {"oracle": round(by_name[p]["delta_reference_mev"], 1),
                                    "nnp": round(by_name[p]["delta_nnp_mev"], 1)} for p in SI_POLYMORPHS},
    }


# -- test sets ------------------------------------------------------------------------


def si_test_sets(composition, plain_melting_K: float, work: Path) -> tuple[dict[str, list[Atoms]], dict]:
    """The 64-atom test runs (frames by name) and what each is.

    OLD_TEST_SET runs at the full plain run's T_m; the fixed-temperature runs (and their
    pool, VERDICT_TEST_SET) are tied to neither protocol's T_m.
    """
    runs = {OLD_TEST_SET: (si_large_protocol(plain_melting_K), OLD_TEST_SEED)}
    runs.update({fixed_test_set(t): (si_fixed_temperature_protocol(t), seed) for t, seed in TEST_TEMPERATURES_K.items()})
    frames, info = {}, {}
    for name, (protocol, seed) in runs.items():
        run = run_meltquench(composition, MeltQuenchConfig(**protocol), build_oracle(OracleConfig(name="sw")),
                             work / f"si_test_{name}", seed=seed)
        log(f"  {name}: {summary(run.report)}")
        frames[name] = run.frames
        liquid = next(seg for seg in run.report["segments"] if seg["phase"] == "liquid")
        info[name] = {"liquid_K": run.report["melting_temperature_K"], "volume_per_atom": run.report["volume_per_atom"],
                      "pressure_converged": run.report["pressure_converged"],
                      "liquid_mean_pressure_gpa": liquid["mean_pressure_gpa"], "md_seed": seed,
                      "oracle_calls": run.report["oracle_calls"], **_frame_counts(run.frames)}
    info[OLD_TEST_SET]["description"] = "64 atoms, liquid at the full plain run's T_m (the test set of earlier runs)"
    frames[VERDICT_TEST_SET] = [f for t in TEST_TEMPERATURES_K for f in frames[fixed_test_set(t)]]
    info[VERDICT_TEST_SET] = {
        "description": "the fixed-temperature 64-atom runs pooled: liquid at "
                       f"{', '.join(f'{t:g}' for t in TEST_TEMPERATURES_K)} K, each with its own volume "
                       "adjustment (up to 4 iterations), quench (1000 K/ps) and anneal",
        **_frame_counts(frames[VERDICT_TEST_SET]),
    }
    return frames, info


def fixed_test_set(temperature_K: float) -> str:
    return f"liquid_{temperature_K:g}K"


def _frame_counts(frames: list[Atoms]) -> dict:
    return {"n_frames": len(frames), "n_equilibrated": sum(f.info.get("phase") != "superheat" for f in frames)}


def accuracy_on(model, test_sets: dict[str, list[Atoms]]) -> dict:
    return {name: test_accuracy(model, frames) for name, frames in test_sets.items()}


ACCURACY_METRICS = ("energy_rmse_mev_atom", "force_rmse_ev_a")
PARTS = ("test", "test_equilibrated")


def test_accuracy(model, frames: list[Atoms]) -> dict:
    """Errors on the whole test run and on its equilibrated part: the first superheat frames of a
    random cell carry forces of up to ~20 eV/Å and dominate the whole run's force RMSE."""
    equilibrated = [f for f in frames if f.info.get("phase") != "superheat"]
    return {"test": _accuracy(evaluate(model, frames)), "test_equilibrated": _accuracy(evaluate(model, equilibrated))}


# -- the plain curve and the on-the-fly points ----------------------------------------


def plain_run(composition, fraction: float, seed: int, work: Path):
    """The plain protocol at ``fraction`` of SI_PROTOCOL's length (resumed, or returned as is, if already run)."""
    return run_meltquench(composition, MeltQuenchConfig(**scaled_protocol(fraction)),
                          build_oracle(OracleConfig(name="sw")), work / f"si_plain_seed{seed}_f{fraction:g}", seed=seed)


def plain_training_frames(frames: list[Atoms]) -> list[Atoms]:
    """Every tenth frame held out, as for the full plain NNP."""
    return [f for i, f in enumerate(frames) if i % 10]


def plain_point(run, fraction: float, seed: int, test_sets: dict, tests: list[Atoms]) -> tuple[dict, object]:
    """One point of the plain curve: its frames train an NNP exactly as the full run's did."""
    log(f"  plain protocol, seed {seed}, {fraction:g} x length: {summary(run.report)}")
    training = plain_training_frames(run.frames)
    point, model = trained_point(run, training, seed, test_sets, tests, f"NNP (plain, {fraction:g} x)")
    point = {"fraction": fraction, **point}
    log_accuracy(point)
    return point, model


def trained_point(run, training: list[Atoms], seed: int, test_sets: dict, tests: list[Atoms], what: str):
    """An NNP trained on ``training`` (from ``run``) and its figures on the test sets and polymorphs."""
    started = time.perf_counter()
    model = train(training, SI_POTENTIAL, seed=0, what=what)
    point = {
        "md_seed": seed,
        "oracle_calls": run.report["oracle_calls"],
        "training_frames": len(training),
        "n_frames": run.report["n_frames"],
        "melting_temperature_K": run.report["melting_temperature_K"],
        "volume_per_atom": run.report["volume_per_atom"],
        "md_wall_time_s": run.report["wall_time_s"],
        "training_wall_time_s": round(time.perf_counter() - started, 1),
        "accuracy": accuracy_on(model, test_sets),
        **polymorph_summary(model, tests),
    }
    return point, model


def onthefly_point(composition, settings: OnTheFlyConfig, seed: int, out: Path, test_sets: dict,
                   tests: list[Atoms]) -> tuple[dict, list[Atoms], object]:
    """One on-the-fly run; its frames train an NNP exactly as the plain frames did: figures, frames, NNP."""
    log(f"  on-the-fly, seed {seed}, uncertainty threshold {settings.uncertainty_threshold}")
    oracle = build_oracle(OracleConfig(name="sw"))
    labeller = OnTheFlyLabeller(oracle, settings, potential=ONTHEFLY_POTENTIAL, seed=5)
    run = run_meltquench(composition, MeltQuenchConfig(**SI_PROTOCOL), oracle, out, seed=seed, labeller=labeller)
    log(f"    {summary(run.report)}")
    point, model = trained_point(run, run.frames, seed, test_sets, tests, "NNP on the on-the-fly set")
    point = {"settings": asdict(settings), **point,
             "counters": {k: v for k, v in run.report["labeller"].items() if k != "settings"}}
    log_accuracy(point)
    return point, run.frames, model


def log_accuracy(point: dict) -> None:
    for name in (OLD_TEST_SET, VERDICT_TEST_SET):
        metrics = point["accuracy"][name]
        log(f"    {name}: " + "; ".join(
            f"{part} E {metrics[part]['energy_rmse_mev_atom']:.1f} meV/atom, F {metrics[part]['force_rmse_ev_a']:.3f} eV/Å"
            for part in PARTS))


# -- equal accuracy -------------------------------------------------------------------


def plain_calls_needed(curve: list[tuple[int, float]], target: float) -> dict:
    """Oracle calls the plain curve ((calls, RMSE) points) needs to reach ``target``: its first
    crossing, linear in log(calls).

    bound "at_most": even the shortest plain run is that accurate; "more_than": not even the
    full run is, the figure is the full run's calls.
    """
    points = sorted(curve)
    if points[0][1] <= target:
        return {"plain_calls": points[0][0], "bound": "at_most"}
    for (calls_0, rmse_0), (calls_1, rmse_1) in itertools.pairwise(points):
        if rmse_1 <= target:  # rmse_0 > target: every earlier point missed it
            share = (rmse_0 - target) / (rmse_0 - rmse_1)
            calls = np.exp(np.log(calls_0) + share * (np.log(calls_1) - np.log(calls_0)))
            return {"plain_calls": round(float(calls)), "bound": "interpolated", "between_plain_calls": [calls_0, calls_1]}
    return {"plain_calls": points[-1][0], "bound": "more_than"}


def calls_saved(curve: list[dict], point: dict, test_set: str) -> dict:
    """Calls the plain curve needs to match ``point`` on every metric, minus ``point``'s calls."""
    per_metric = {}
    for part in PARTS:
        for metric in ACCURACY_METRICS:
            target = point["accuracy"][test_set][part][metric]
            plain = [(p["oracle_calls"], p["accuracy"][test_set][part][metric]) for p in curve]
            needed = plain_calls_needed(plain, target)
            per_metric[f"{part}.{metric}"] = {"on_the_fly": target, **needed,
                                              "calls_saved": needed["plain_calls"] - point["oracle_calls"]}
    bounds = [m["bound"] for m in per_metric.values()]
    bound = "more_than" if "more_than" in bounds else "at_most" if set(bounds) == {"at_most"} else "interpolated"
    plain_calls = max(m["plain_calls"] for m in per_metric.values())
    limiting = [key for key, m in per_metric.items() if m["plain_calls"] == plain_calls]
    saved = plain_calls - point["oracle_calls"]
    words = {"more_than": "more than", "at_most": "at most", "interpolated": ""}[bound]
    return {
        "on_the_fly_calls": point["oracle_calls"],
        "plain_calls_all_metrics": plain_calls,
        "bound": bound,
        "calls_saved": saved,
        "limiting_metrics": limiting,
        "reading": f"plain protocol needs {words} {plain_calls} calls to match on all metrics: "
                   f"on-the-fly ({point['oracle_calls']} calls) saves {words} {saved}".replace("  ", " "),
        "per_metric": per_metric,
    }


def mean_point(points: list[dict]) -> dict:
    """Oracle calls and RMSEs averaged over points (seeds)."""
    first = points[0]["accuracy"]
    return {
        "oracle_calls": round(float(np.mean([p["oracle_calls"] for p in points]))),
        "accuracy": {name: {part: {m: round(float(np.mean([p["accuracy"][name][part][m] for p in points])), 4)
                                   for m in ACCURACY_METRICS} for part in PARTS} for name in first},
    }


def seed_key(seed: int) -> str:
    return f"seed {seed}"


def onthefly_summary(curves: dict, sweeps: dict, test_set_info: dict) -> dict:
    """Calls saved at equal accuracy per seed, setting and test set; the strict verdict against the full run."""
    test_sets = list(test_set_info)
    saved = {seed_key(seed): {label: {name: calls_saved(curves[seed], point, name) for name in test_sets}
                              for label, point in sweeps[seed].items()} for seed in MD_SEEDS}
    both = [label for label in sweeps[MD_SEEDS[0]] if all(label in sweeps[seed] for seed in MD_SEEDS)]
    mean_curve = [mean_point([curves[seed][i] for seed in MD_SEEDS]) for i in range(len(PLAIN_FRACTIONS))]
    saved["mean over seeds"] = {
        label: {name: calls_saved(mean_curve, mean_point([sweeps[seed][label] for seed in MD_SEEDS]), name)
                for name in test_sets} for label in both}
    headline = {group: {label: by_set[VERDICT_TEST_SET]["reading"] for label, by_set in by_label.items()}
                for group, by_label in saved.items()}
    for group, by_label in headline.items():
        for label, reading in by_label.items():
            log(f"  {group}, {label}: {reading}")
    full = {seed: next(p for p in curves[seed] if p["fraction"] == 1.0) for seed in MD_SEEDS}
    return {
        "test_sets": test_set_info,
        "verdict_test_set": VERDICT_TEST_SET,
        "equal_accuracy_criterion": (
            "for each on-the-fly NNP and each metric (energy and force RMSE on the whole test runs and on their "
            "equilibrated part: liquid, quench, anneal), the oracle calls the plain curve (same MD seed; "
            f"fractions {list(PLAIN_FRACTIONS)} of the protocol's length) needs to be as accurate: first crossing, "
            "linear in log(calls) between plain points; the max over metrics minus the on-the-fly calls are the "
            "calls saved at equal accuracy. bound 'more_than': even the full plain run is less accurate; "
            "'at_most': even the shortest plain run is as accurate. Same training settings for every NNP."),
        "headline": headline,
        "plain_curve": {seed_key(seed): curve for seed, curve in curves.items()},
        "sweep": {seed_key(seed): sweep for seed, sweep in sweeps.items()},
        "calls_saved_at_equal_accuracy": saved,
        "strict_verdict_vs_full_run": {
            name: strict_verdict(full[MD_SEEDS[0]], sweeps[MD_SEEDS[0]], name) for name in (OLD_TEST_SET, VERDICT_TEST_SET)},
    }


def strict_verdict(plain: dict, sweep: dict, test_set: str) -> dict:
    """The earlier verdict: the cheapest setting within EQUAL_ACCURACY_FACTOR of the full plain NNP."""
    limits = {part: {m: EQUAL_ACCURACY_FACTOR * plain["accuracy"][test_set][part][m] for m in ACCURACY_METRICS}
              for part in PARTS}
    within = {label: {part: {m: bool(point["accuracy"][test_set][part][m] <= limits[part][m])
                             for m in ACCURACY_METRICS} for part in PARTS} for label, point in sweep.items()}
    equal = {label: all(ok for by_metric in checks.values() for ok in by_metric.values())
             for label, checks in within.items()}
    matching = sorted((point["oracle_calls"], label) for label, point in sweep.items() if equal[label])
    log(f"  strict verdict on {test_set}: equal accuracy {equal}")
    return {
        "criterion": (f"energy RMSE and force RMSE both <= {EQUAL_ACCURACY_FACTOR:g} x the full plain NNP's, on the "
                      "whole test runs and on their equilibrated part; first MD seed"),
        "plain_oracle_calls": plain["oracle_calls"],
        "limits": {part: {m: round(v, 4) for m, v in by_metric.items()} for part, by_metric in limits.items()},
        "within_limits": within,
        "equal_accuracy": equal,
        "cheapest_equal_setting": matching[0][1] if matching else None,
        "oracle_calls_saved_at_equal_accuracy": plain["oracle_calls"] - matching[0][0] if matching else None,
    }


def plot_calls_vs_accuracy(curves: dict, sweeps: dict, test_set: str, path: Path) -> None:
    """Test RMSE against oracle calls on ``test_set``: the plain curve and the on-the-fly points, per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    plain_colours, otf_colours = ("tab:red", "salmon"), ("tab:blue", "lightskyblue")
    fig, axes = plt.subplots(2, 2, figsize=(8.5, 6.5), sharex=True)
    parts = {"test": "whole runs", "test_equilibrated": "liquid, quench, anneal"}
    for row, (part, title) in zip(axes, parts.items()):
        for ax, metric, unit in zip(row, ACCURACY_METRICS, ("meV/atom", "eV/Å")):
            for seed, plain_colour, otf_colour in zip(MD_SEEDS, plain_colours, otf_colours):
                curve = sorted(curves[seed], key=lambda p: p["oracle_calls"])
                ax.plot([p["oracle_calls"] for p in curve], [p["accuracy"][test_set][part][metric] for p in curve],
                        "s-", color=plain_colour, ms=5, label=f"plain, {seed_key(seed)}")
                points = sorted(sweeps[seed].items(), key=lambda item: item[1]["oracle_calls"])
                ax.plot([p["oracle_calls"] for _, p in points], [p["accuracy"][test_set][part][metric] for _, p in points],
                        "o", color=otf_colour, ms=6, label=f"on-the-fly, {seed_key(seed)}")
                for label, point in points:
                    ax.annotate(label, (point["oracle_calls"], point["accuracy"][test_set][part][metric]),
                                textcoords="offset points", xytext=(4, 4), fontsize=6, color=otf_colour)
                for point in curve:
                    ax.annotate(f"{point['fraction']:g}x", (point["oracle_calls"],
                                                           point["accuracy"][test_set][part][metric]),
                                textcoords="offset points", xytext=(3, -9), fontsize=6, color=plain_colour)
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(FixedLocator([300, 500, 1000, 2000, 4000]))
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_ylim(bottom=0)
            ax.set_title(f"{metric.split('_')[0]} RMSE, {title}", fontsize=9)
            ax.set_ylabel(unit)
    for ax in axes[1]:
        ax.set_xlabel("oracle calls")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Si (Stillinger-Weber), test set {test_set}: NNP error against oracle calls "
                 "(plain: protocol length x0.125-1)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label)


def run_mg2sio4(work: Path) -> dict:
    oracle = build_oracle(OracleConfig(name="sevennet"))
    composition = Composition.parse("Mg2SiO4")
    log("Mg2SiO4: melt-quench with SevenNet-0, 14 atoms")
    plain = run_meltquench(composition, MeltQuenchConfig(**MG2SIO4_PROTOCOL), oracle, work / "mg2sio4", seed=21)
    log(f"  {summary(plain.report)}")
    model = train(plain.frames, MG2SIO4_POTENTIAL, seed=0, what="NNP")

    log("Mg2SiO4: test structures relaxed with the oracle")
    forsterite = read(REFERENCE_DIR / "Mg2SiO4_forsterite_Pnma.cif")
    structures = [forsterite, spinel_mg2sio4(), antisite(forsterite, "Mg", "Si")]
    names = ["forsterite", "ringwoodite", "forsterite-antisite"]
    randoms = random_structures("Mg4Si2O8", 3, seed=5)
    tests, kept = relaxed(structures + randoms, oracle, names + [f"random-{i}" for i in range(len(randoms))],
                          RelaxConfig(max_steps=250, fmax=0.05, smax_gpa=0.5))
    result = assess("Mg2SiO4", plain.frames, tests, model, [n for n in kept if not n.startswith("random")])
    result["ranking_ok"] = bool(result["nnp_lowest"] == "forsterite" and result["oracle_lowest"] == "forsterite")
    return {
        "oracle": "sevennet",
        "protocol": MG2SIO4_PROTOCOL,
        "meltquench": _protocol_summary(plain.report),
        "nnp_validation": _floats(model.metrics),
        **result,
    }


def summary(report: dict) -> str:
    return (f"T_m {report['melting_temperature_K']:.0f} K, {report['volume_per_atom']:.2f} Å³/atom, "
            f"frames {report['n_frames']}, {report['oracle_calls']} oracle calls / {report['md_steps']} MD steps, "
            f"{report['wall_time_s']:.0f} s")


def _protocol_summary(report: dict) -> dict:
    keys = ("melting_temperature_K", "volume_per_atom", "pressure_converged", "n_frames", "oracle_calls", "md_steps",
            "wall_time_s", "melt_search", "anneal_msd_slope", "anneal_is_solid")
    return {k: report[k] for k in keys}


def _floats(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, float)}


def _accuracy(metrics: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", nargs="+", choices=["si", "mg2sio4"], default=["si", "mg2sio4"])
    parser.add_argument("--work", help="working directory (default: a temporary one)")
    args = parser.parse_args()
    import torch
    torch.set_num_threads(1)
    FIGURES.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="xtalforge-meltquench-"))
    results_path = FIGURES.parent / "meltquench_acceptance.json"
    previous = json.loads(results_path.read_text()) if results_path.is_file() else {}
    # Systems not rerun keep their earlier section, marked with the date of the run that made it.
    figures = {k: {"date": previous.get("date"), **v} for k, v in previous.items() if k in ("Si", "Mg2SiO4")}
    started = time.perf_counter()
    for system in args.systems:
        t0 = time.perf_counter()
        key = {"si": "Si", "mg2sio4": "Mg2SiO4"}[system]
        figures[key] = {"date": datetime.date.today().isoformat(), "wall_time_s": None,
                        **(run_si(work) if system == "si" else run_mg2sio4(work))}
        figures[key]["wall_time_s"] = round(time.perf_counter() - t0, 1)
        r = figures[key]
        log(f"{key}: Pearson r = {r['pearson_r_within_200meV']}, RMSE = {r['rmse_mev_per_atom_within_200meV']:.1f} "
            f"meV/atom within 200 meV/atom ({r['n_within_200meV']} of {r['n_test_structures']} structures); "
            f"polymorphs NNP {r['polymorphs_nnp_order']} vs oracle {r['polymorphs_oracle_order']}; "
            f"ranking ok: {r['ranking_ok']}")
        finish("meltquench_acceptance", {**figures, "figures_dir": str(FIGURES.relative_to(FIGURES.parents[1]))})
    # On stderr: the last stdout line stays finish()'s JSON object.
    print(f"[{time.strftime('%H:%M:%S')}] done in {time.perf_counter() - started:.0f} s; figures in {FIGURES}",
          file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
