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
reference network with the default symmetry functions, and on-the-fly sampling: a sweep of
uncertainty thresholds, each run's frames training an NNP exactly as the plain frames did,
errors on the same independent 64-atom run against oracle calls, and the oracle calls saved
by the cheapest setting that matches the plain NNP's accuracy (EQUAL_ACCURACY_FACTOR), or
none. Every training is epoch-capped, so the figures do not depend on machine load.
Systems not rerun keep their earlier section in the results file, with that run's date.

    python benchmarks/meltquench_acceptance.py [--systems si mg2sio4] [--work DIR]

Si uses the Stillinger-Weber oracle (fast); Mg2SiO4 uses SevenNet-0 at 14 atoms.
"""

from __future__ import annotations

import argparse
import datetime
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
    plain = run_meltquench(composition, MeltQuenchConfig(**SI_PROTOCOL), oracle, work / "si_plain", seed=11)
    log(f"  {summary(plain.report)}")
    # Every tenth frame is held out: the small-cell side of the scale-up check.
    holdout = plain.frames[::10]
    plain_training = [f for i, f in enumerate(plain.frames) if i % 10]
    model = train(plain_training, SI_POTENTIAL, seed=0, what="NNP")

    log("Si: independent 64-atom run (scale-up and on-the-fly test set)")
    large_settings = MeltQuenchConfig(**si_large_protocol(plain.report["melting_temperature_K"]))
    large = run_meltquench(composition, large_settings, build_oracle(OracleConfig(name="sw")), work / "si_large",
                           seed=12)
    log(f"  {summary(large.report)}")
    scale_up = scale_up_report(model, holdout, large.frames)
    log(f"  scale-up: energy RMSE {scale_up['small']['energy_rmse_mev_atom']:.1f} (32 atoms, held out) -> "
        f"{scale_up['large']['energy_rmse_mev_atom']:.1f} meV/atom (64 atoms)")

    log("Si: test structures relaxed with the oracle")
    polymorph_files = {"diamond": "Si_diamond_Fd-3m", "lonsdaleite": "Si_lonsdaleite_P63mmc", "BC8": "Si_BC8_Ia-3",
                       "beta-tin": "Si_beta-tin_I41amd"}
    structures = [read(REFERENCE_DIR / f"{f}.cif") for f in polymorph_files.values()]
    names = list(polymorph_files)
    randoms = random_structures("Si8", 12, seed=3) + random_structures("Si16", 8, seed=4)
    tests, _ = relaxed(structures + randoms, oracle, names + [f"random-{i}" for i in range(len(randoms))],
                       RelaxConfig(max_steps=400, fmax=0.02, smax_gpa=0.2))
    result = assess("Si", plain.frames, tests, model, SI_POLYMORPHS)
    result["ranking_ok"] = si_ranking_ok(result)

    # One network, not three, to save time: the reference only shows what the descriptor does.
    log("Si: one network with the default symmetry functions (reference for the descriptor choice)")
    default_model = train(plain_training, DEFAULT_DESCRIPTOR_POTENTIAL, seed=0, what="NNP, default descriptor",
                          n_models=1)
    default_descriptor = {
        "potential": "PotentialConfig defaults (6 Å, radial Gaussians centred at 0), same epoch caps, 1 network",
        "nnp_validation": _floats(default_model.metrics),
        **test_accuracy(default_model, large.frames),
        **polymorph_summary(default_model, tests),
    }

    log("Si: on-the-fly sampling of the same protocol, uncertainty-threshold sweep")
    plain_point = {"oracle_calls": plain.report["oracle_calls"], "training_frames": len(plain_training),
                   **test_accuracy(model, large.frames), **polymorph_summary(model, tests)}
    runs = {label: onthefly_point(composition, settings, work / f"si_otf_{slug(label)}", large.frames, tests)
            for label, settings in ONTHEFLY_SWEEP.items()}
    sweep = {label: point for label, (point, _, _) in runs.items()}
    onthefly = onthefly_summary(plain_point, sweep)
    plot_calls_vs_accuracy(plain_point, sweep, FIGURES / "Si_onthefly_calls_vs_rmse.png")
    # Correlation and coverage figures for the cheapest setting at equal accuracy, else the one labelling most.
    shown = onthefly["cheapest_equal_setting"] or max(sweep, key=lambda label: sweep[label]["oracle_calls"])
    _, otf_frames, otf_model = runs[shown]
    onthefly["figures_setting"] = shown
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


def onthefly_point(composition, settings: OnTheFlyConfig, out: Path, test_frames: list[Atoms],
                   tests: list[Atoms]) -> tuple[dict, list[Atoms], object]:
    """One on-the-fly run; its frames train an NNP exactly as the plain frames did: figures, frames, NNP."""
    log(f"  on-the-fly, uncertainty threshold {settings.uncertainty_threshold}")
    oracle = build_oracle(OracleConfig(name="sw"))
    labeller = OnTheFlyLabeller(oracle, settings, potential=ONTHEFLY_POTENTIAL, seed=5)
    run = run_meltquench(composition, MeltQuenchConfig(**SI_PROTOCOL), oracle, out, seed=11, labeller=labeller)
    log(f"    {summary(run.report)}")
    model = train(run.frames, SI_POTENTIAL, seed=0, what="NNP on the on-the-fly set")
    accuracy = test_accuracy(model, test_frames)
    for part, metrics in accuracy.items():
        log(f"    {part}: energy RMSE {metrics['energy_rmse_mev_atom']:.1f} meV/atom, "
            f"force RMSE {metrics['force_rmse_ev_a']:.3f} eV/Å")
    return {
        "settings": asdict(settings),
        "oracle_calls": run.report["oracle_calls"],
        "training_frames": len(run.frames),
        "n_frames": run.report["n_frames"],
        "melting_temperature_K": run.report["melting_temperature_K"],
        "volume_per_atom": run.report["volume_per_atom"],
        **accuracy,
        **polymorph_summary(model, tests),
        "counters": {k: v for k, v in run.report["labeller"].items() if k != "settings"},
    }, run.frames, model


ACCURACY_METRICS = ("energy_rmse_mev_atom", "force_rmse_ev_a")


def test_accuracy(model, frames: list[Atoms]) -> dict:
    """Errors on the whole test run and on its equilibrated part: the first superheat frames of a
    random cell carry forces of up to ~20 eV/Å and dominate the whole run's force RMSE."""
    equilibrated = [f for f in frames if f.info.get("phase") != "superheat"]
    return {"test": _accuracy(evaluate(model, frames)), "test_equilibrated": _accuracy(evaluate(model, equilibrated))}


def onthefly_summary(plain: dict, sweep: dict) -> dict:
    """The equal-accuracy verdict: the cheapest setting within EQUAL_ACCURACY_FACTOR of the plain NNP."""
    parts = ("test", "test_equilibrated")
    limits = {part: {m: EQUAL_ACCURACY_FACTOR * plain[part][m] for m in ACCURACY_METRICS} for part in parts}
    within = {label: {part: {m: bool(point[part][m] <= limits[part][m]) for m in ACCURACY_METRICS} for part in parts}
              for label, point in sweep.items()}
    equal = {label: all(ok for by_metric in checks.values() for ok in by_metric.values())
             for label, checks in within.items()}
    matching = sorted((point["oracle_calls"], label) for label, point in sweep.items() if equal[label])
    verdict = {
        "criterion": (f"energy RMSE and force RMSE both <= {EQUAL_ACCURACY_FACTOR:g} x the plain NNP's, on the "
                      "whole 64-atom test run and on its equilibrated part (liquid, quench, anneal); same "
                      "training settings for every NNP"),
        "limits": {part: {m: round(v, 4) for m, v in by_metric.items()} for part, by_metric in limits.items()},
        "within_limits": within,
        "equal_accuracy": equal,
        "cheapest_equal_setting": matching[0][1] if matching else None,
        "oracle_calls_saved_at_equal_accuracy": plain["oracle_calls"] - matching[0][0] if matching else None,
        "oracle_call_ratio_at_equal_accuracy": round(matching[0][0] / plain["oracle_calls"], 4) if matching else None,
    }
    log(f"  within limits: {within}")
    log(f"  equal accuracy: {equal}; oracle calls saved: {verdict['oracle_calls_saved_at_equal_accuracy']}")
    return {
        "test_set": "independent 64-atom Si run (superheat, liquid at the same T_m, quench, anneal)",
        "plain": plain,
        "sweep": sweep,
        **verdict,
    }


def plot_calls_vs_accuracy(plain: dict, sweep: dict, path: Path) -> None:
    """Test RMSE against oracle calls: the plain point, the on-the-fly sweep, the equal-accuracy band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    fig, axes = plt.subplots(2, 2, figsize=(8.0, 6.0), sharex=True)
    parts = {"test": "whole run", "test_equilibrated": "liquid, quench, anneal"}
    for row, (part, title) in zip(axes, parts.items()):
        for ax, metric, unit in zip(row, ACCURACY_METRICS, ("meV/atom", "eV/Å")):
            ax.axhspan(0, EQUAL_ACCURACY_FACTOR * plain[part][metric], color="tab:red", alpha=0.08, lw=0)
            ax.scatter([plain["oracle_calls"]], [plain[part][metric]], s=50, marker="s", color="tab:red",
                       label="plain protocol", zorder=3)
            points = sorted(sweep.items(), key=lambda item: item[1]["oracle_calls"])
            ax.plot([p["oracle_calls"] for _, p in points], [p[part][metric] for _, p in points], "o-",
                    color="tab:blue", label="on-the-fly")
            for label, point in points:
                ax.annotate(label, (point["oracle_calls"], point[part][metric]), textcoords="offset points",
                            xytext=(4, 4), fontsize=7)
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(FixedLocator([300, 1000, 3000]))
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_ylim(bottom=0)
            ax.set_title(f"{metric.split('_')[0]} RMSE, {title}", fontsize=9)
            ax.set_ylabel(unit)
    for ax in axes[1]:
        ax.set_xlabel("oracle calls")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Si (Stillinger-Weber), 64-atom test run: NNP error against oracle calls "
                 f"(shaded: within {EQUAL_ACCURACY_FACTOR:g}x plain)", fontsize=9)
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
    log(f"done in {time.perf_counter() - started:.0f} s; figures in {FIGURES}")


if __name__ == "__main__":
    main()
