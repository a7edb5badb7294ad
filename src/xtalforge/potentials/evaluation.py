"""Accuracy of a potential against labelled frames: RMSE/MAE, Pearson r, parity plots."""

from __future__ import annotations

import math
from itertools import pairwise
from pathlib import Path

import numpy as np
from ase import Atoms

from xtalforge.errors import XtalforgeError
from xtalforge.potentials.data import frame_labels

EV_A3_TO_KBAR = 1602.1766208


def predictions(model_or_calculator, frames: list[Atoms], batch_size: int = 64) -> dict:
    """Reference and predicted energies per atom, force components and stress components (kbar).

    ``model_or_calculator`` is a BPNN, an Ensemble, an NNPCalculator (all evaluated in batches)
    or any ASE calculator (evaluated one frame at a time).
    """
    labelled = [(atoms, frame_labels(atoms)) for atoms in frames]
    labelled = [(a, lab) for a, lab in labelled if lab is not None]
    if not labelled:
        raise XtalforgeError("no frame carries reference labels: evaluate against oracle-labelled structures")
    ensemble = _as_ensemble(model_or_calculator)
    pred_e, pred_f, pred_s = [], [], []
    if ensemble is not None:
        for start in range(0, len(labelled), batch_size):
            chunk = [a for a, _ in labelled[start: start + batch_size]]
            periodic = all(bool(np.all(a.pbc)) for a in chunk)
            pred = ensemble.predict_atoms(chunk, stress=periodic)
            counts = np.cumsum([0] + [len(a) for a in chunk])
            forces = pred.forces.detach().cpu().numpy()
            pred_e.extend(pred.energy.detach().cpu().numpy())
            pred_f.extend(forces[a:b] for a, b in pairwise(counts))
            stress = pred.stress.detach().cpu().numpy() if pred.stress is not None else [None] * len(chunk)
            pred_s.extend(stress)
    else:
        for atoms, _ in labelled:
            copy = atoms.copy()
            copy.calc = model_or_calculator
            pred_e.append(copy.get_potential_energy())
            pred_f.append(copy.get_forces())
            pred_s.append(copy.get_stress(voigt=False) if np.all(copy.pbc) else None)
    ref = {"energy": [], "forces": [], "stress": []}
    got = {"energy": [], "forces": [], "stress": []}
    for (atoms, lab), e, f, s in zip(labelled, pred_e, pred_f, pred_s):
        ref["energy"].append(lab.energy / len(atoms))
        got["energy"].append(float(e) / len(atoms))
        if lab.forces is not None:
            ref["forces"].append(lab.forces.ravel())
            got["forces"].append(np.asarray(f).ravel())
        if lab.stress is not None and s is not None:
            ref["stress"].append(EV_A3_TO_KBAR * lab.stress.ravel())
            got["stress"].append(EV_A3_TO_KBAR * np.asarray(s).ravel())
    out = {}
    for key in ("energy", "forces", "stress"):
        if key == "energy":
            out[key] = (np.array(ref[key]), np.array(got[key]))
        else:
            out[key] = (np.concatenate(ref[key]) if ref[key] else np.zeros(0),
                        np.concatenate(got[key]) if got[key] else np.zeros(0))
    out["n_frames"] = len(labelled)
    return out


def evaluate(model_or_calculator, frames: list[Atoms], *, plot=None, batch_size: int = 64) -> dict:
    """Energy (meV/atom), force (eV/Å, components) and stress (kbar, components) RMSE and MAE,
    Pearson r of energies per atom, and ``n_frames``; writes a parity plot to ``plot`` if given."""
    data = predictions(model_or_calculator, frames, batch_size=batch_size)
    ref_e, got_e = data["energy"]
    result = {
        "n_frames": data["n_frames"],
        "energy_rmse_mev_atom": 1000 * _rmse(ref_e, got_e),
        "energy_mae_mev_atom": 1000 * _mae(ref_e, got_e),
        "energy_pearson_r": _pearson(ref_e, got_e),
    }
    for key, unit in (("forces", "ev_a"), ("stress", "kbar")):
        ref, got = data[key]
        name = "force" if key == "forces" else "stress"
        result[f"{name}_rmse_{unit}"] = _rmse(ref, got) if len(ref) else None
        result[f"{name}_mae_{unit}"] = _mae(ref, got) if len(ref) else None
    if plot is not None:
        _draw_parity(data, result, plot)
    return result


def parity_plot(model_or_calculator, frames: list[Atoms], path, *, title: str | None = None) -> Path:
    """Write predicted-vs-reference panels (energy per atom, forces, stress) as a PNG."""
    data = predictions(model_or_calculator, frames)
    ref_e, got_e = data["energy"]
    summary = {"energy_rmse_mev_atom": 1000 * _rmse(ref_e, got_e), "energy_pearson_r": _pearson(ref_e, got_e)}
    for key, name in (("forces", "force_rmse_ev_a"), ("stress", "stress_rmse_kbar")):
        ref, got = data[key]
        summary[name] = _rmse(ref, got) if len(ref) else None
    return _draw_parity(data, summary, path, title=title)


def _draw_parity(data: dict, summary: dict, path, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pearson = summary["energy_pearson_r"]
    energy_note = f"RMSE {summary['energy_rmse_mev_atom']:.1f} meV/atom" + (f", r = {pearson:.3f}" if pearson is not None else "")
    panels = [("energy", "energy (eV/atom)", energy_note)]
    if len(data["forces"][0]):
        panels.append(("forces", "force component (eV/Å)", f"RMSE {summary['force_rmse_ev_a']:.3f} eV/Å"))
    if len(data["stress"][0]):
        panels.append(("stress", "stress component (kbar)", f"RMSE {summary['stress_rmse_kbar']:.1f} kbar"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.0), squeeze=False)
    for ax, (key, label, note) in zip(axes[0], panels):
        ref, got = data[key]
        lo, hi = float(min(ref.min(), got.min())), float(max(ref.max(), got.max()))
        ax.plot([lo, hi], [lo, hi], color="0.6", lw=1)
        ax.scatter(ref, got, s=4, alpha=0.5)
        ax.set_xlabel(f"reference {label}")
        ax.set_ylabel(f"predicted {label}")
        ax.set_title(note, fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _as_ensemble(obj):
    from xtalforge.potentials.calculator import NNPCalculator

    if isinstance(obj, NNPCalculator):
        return obj.ensemble
    if hasattr(obj, "as_ensemble"):
        return obj.as_ensemble()
    return None


def _rmse(a, b) -> float:
    return float(np.sqrt(np.mean((np.asarray(a) - np.asarray(b)) ** 2))) if len(a) else math.nan


def _mae(a, b) -> float:
    return float(np.mean(np.abs(np.asarray(a) - np.asarray(b)))) if len(a) else math.nan


def _pearson(a, b) -> float | None:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def scale_up_report(model, small_frames: list[Atoms], large_frames: list[Atoms]) -> dict:
    """Errors of ``model`` (trained on small cells) on small and larger cells (seed 003 section 3.3.1).

    The strategy works when the large-cell errors are close to the small-cell ones
    (seed 003: 6.2 vs 5–5.6 meV/atom); ``*_ratio`` is large over small for each metric.
    """
    small, large = evaluate(model, small_frames), evaluate(model, large_frames)
    report = {
        "small": {"n_frames": len(small_frames), "n_atoms": sorted({len(a) for a in small_frames}), **small},
        "large": {"n_frames": len(large_frames), "n_atoms": sorted({len(a) for a in large_frames}), **large},
    }
    for key, value in small.items():
        if "rmse" in key and isinstance(value, (int, float)) and isinstance(large.get(key), (int, float)) and value > 0:
            report[f"{key}_ratio"] = float(large[key] / value)
    return report
