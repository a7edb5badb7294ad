"""What a training set covers, and how well a potential trained on it ranks crystals.

* :func:`coverage_pca` — per element, the symmetry-function vectors G of the training
  set's atoms and of a set of crystal structures, standardised, projected on the
  training set's first two principal components (seed 000 Fig. 3), plus a number: the
  fraction of crystal atoms whose nearest training atom (in the full standardised G
  space) is no farther than the training atoms' own 95th-percentile nearest-neighbour
  distance ("inside").
* :func:`energy_correlation` — NNP against oracle energies per atom over a set of
  structures, both relative to the oracle's lowest structure (seed 000 Fig. 2): Pearson r
  and RMSE over the structures within ``window_ev`` of the lowest, and the ranking.
* :func:`scale_up_report` — seed 003 section 3.3.1: errors of a model trained on small
  cells, on small and on larger cells, and their ratio.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from ase import Atoms

from xtalforge.errors import XtalforgeError
from xtalforge.potentials.evaluation import scale_up_report  # noqa: F401  (re-exported: datasets' API)

INSIDE_QUANTILE = 0.95
MAX_MARKED = 8  # structures with their own marker in the PCA figure; the rest share one


# -- descriptors ----------------------------------------------------------------------


def symmetry_vectors(frames: list[Atoms], elements: list[str] | None = None, descriptor=None,
                     batch_size: int = 16) -> dict[str, np.ndarray]:
    """Per element, the symmetry-function vectors (n_atoms_of_element, F) of all ``frames``.

    ``descriptor`` is a :class:`~xtalforge.potentials.descriptors.SymmetryFunctions`
    (a model's, to see what that model sees); default: the SIMPLE-NN set of seed 000.
    """
    import torch
    from ase.data import atomic_numbers, chemical_symbols

    from xtalforge.potentials.descriptors import SymmetryFunctions, build_graph
    from xtalforge.structures.batch import Batch

    descriptor = descriptor or SymmetryFunctions()
    present = {chemical_symbols[z] for frame in frames for z in frame.numbers}
    elements = sorted(set(elements or present) | present, key=lambda s: atomic_numbers[s])
    lookup = torch.full((len(chemical_symbols),), -1, dtype=torch.long)
    lookup[[atomic_numbers[s] for s in elements]] = torch.arange(len(elements))
    blocks, numbers = [], []
    with torch.no_grad():
        for start in range(0, len(frames), batch_size):
            chunk = frames[start:start + batch_size]
            batch = Batch.from_atoms(chunk)
            graph = build_graph(batch, descriptor.cutoff, lookup, len(elements))
            blocks.append(descriptor.features(graph).numpy())
            numbers.append(batch.numbers.numpy())
    if not blocks:
        return {}
    features, numbers = np.concatenate(blocks), np.concatenate(numbers)
    return {s: features[numbers == atomic_numbers[s]] for s in elements if np.any(numbers == atomic_numbers[s])}


def coverage_pca(training: list[Atoms], structures: list[Atoms], descriptor=None, frame_gap: int = 5) -> dict:
    """Per element: 2D PCA projections of training and crystal atoms, and how many crystal atoms are inside.

    "Inside" compares, in the full standardised G space, a crystal atom's distance to the
    nearest training atom with the training atoms' own nearest-neighbour distances
    (95th percentile). Consecutive MD frames are near-copies of each other, so a training
    atom's neighbours are looked for only in frames more than ``frame_gap`` frames away:
    otherwise the radius measures the MD time step, not the spread of the training set.
    """
    from ase.data import atomic_numbers
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    train_g = symmetry_vectors(training, descriptor=descriptor)
    crystal_frames = list(structures)
    crystal_g = symmetry_vectors(crystal_frames, elements=list(train_g), descriptor=descriptor)
    missing = sorted(set(crystal_g) - set(train_g))
    if missing:
        raise XtalforgeError(f"the training set has no {', '.join(missing)} atoms: it cannot cover these structures")
    out = {}
    for element, g_train in train_g.items():
        z = atomic_numbers[element]
        scaler = StandardScaler().fit(g_train)
        z_train = scaler.transform(g_train)
        n_components = min(2, z_train.shape[0], z_train.shape[1])
        pca = PCA(n_components=n_components).fit(z_train)
        g_crystal = crystal_g.get(element, np.zeros((0, g_train.shape[1])))
        z_crystal = scaler.transform(g_crystal) if len(g_crystal) else g_crystal
        entry = {
            "n_train_atoms": int(len(g_train)),
            "n_crystal_atoms": int(len(g_crystal)),
            "explained_variance": [float(v) for v in pca.explained_variance_ratio_],
            "train_pc": pca.transform(z_train),
            "crystal_pc": pca.transform(z_crystal) if len(z_crystal) else np.zeros((0, n_components)),
            "crystal_owner": _owners(crystal_frames, z),
        }
        if len(z_crystal) and len(z_train) > 1:
            radius = _training_radius(z_train, _owners(training, z), frame_gap)
            from sklearn.neighbors import NearestNeighbors

            dist = NearestNeighbors(n_neighbors=1).fit(z_train).kneighbors(z_crystal)[0][:, 0]
            ratio = dist / radius if radius > 0 else np.full(len(dist), np.inf)
            entry.update(inside_radius=radius, crystal_distance_over_radius=ratio,
                         inside_fraction=float(np.mean(ratio <= 1.0)), max_distance_over_radius=float(ratio.max()))
        out[element] = entry
    return out


def _owners(frames: list[Atoms], number: int) -> np.ndarray:
    """Frame index of every atom of element ``number``, in the order symmetry_vectors returns them."""
    if not frames:
        return np.zeros(0, dtype=int)
    return np.concatenate([np.full(int(np.sum(a.numbers == number)), i) for i, a in enumerate(frames)]).astype(int)


def _training_radius(z_train: np.ndarray, frame: np.ndarray, frame_gap: int, neighbours: int = 64) -> float:
    """95th percentile of each training atom's distance to its nearest atom ``frame_gap`` frames away or more."""
    from sklearn.neighbors import NearestNeighbors

    k = min(neighbours, len(z_train))
    dist, idx = NearestNeighbors(n_neighbors=k).fit(z_train).kneighbors(z_train)
    far = np.abs(frame[idx] - frame[:, None]) > frame_gap
    # First far neighbour; where all k are near, the k-th distance bounds it from below.
    first = np.where(far.any(axis=1), np.argmax(far, axis=1), k - 1)
    return float(np.quantile(dist[np.arange(len(dist)), first], INSIDE_QUANTILE))


def plot_coverage(pca: dict, path: str | Path, names: list[str] | None = None) -> Path:
    """One panel per element: training atoms (grey) and crystal atoms, with marginal densities."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    elements = list(pca)
    fig = plt.figure(figsize=(4.2 * len(elements), 4.4))
    grid = fig.add_gridspec(2, 2 * len(elements), width_ratios=[4, 1] * len(elements), height_ratios=[1, 4],
                            hspace=0.05, wspace=0.05)
    colours = plt.get_cmap("tab10")
    for k, element in enumerate(elements):
        entry = pca[element]
        main = fig.add_subplot(grid[1, 2 * k])
        top = fig.add_subplot(grid[0, 2 * k], sharex=main)
        side = fig.add_subplot(grid[1, 2 * k + 1], sharey=main)
        train, crystal = entry["train_pc"], entry["crystal_pc"]
        y_train = train[:, 1] if train.shape[1] > 1 else np.zeros(len(train))
        main.scatter(train[:, 0], y_train, s=3, c="0.6", alpha=0.4, lw=0, label="training set")
        top.hist(train[:, 0], bins=50, color="0.6", density=True)
        side.hist(y_train, bins=50, color="0.6", density=True, orientation="horizontal")
        for owner in np.unique(entry["crystal_owner"]):
            sel = entry["crystal_owner"] == owner
            y = crystal[sel, 1] if crystal.shape[1] > 1 else np.zeros(int(sel.sum()))
            if owner < MAX_MARKED:
                label = names[owner] if names and owner < len(names) else f"structure {owner}"
                main.scatter(crystal[sel, 0], y, s=28, marker="os^Dv<>p"[owner], color=colours(owner),
                             edgecolor="k", lw=0.4, label=label)
            else:  # beyond a readable legend: one symbol for the rest
                main.scatter(crystal[sel, 0], y, s=14, marker="x", color="k", lw=0.8,
                             label="other structures" if owner == MAX_MARKED else None)
        main.set_xlabel("PC1")
        main.set_ylabel("PC2" if k == 0 else "")
        inside = entry.get("inside_fraction")
        title = f"{element}" + (f": {100 * inside:.0f}% inside" if inside is not None else "")
        top.set_title(title, fontsize=10)
        top.axis("off")
        side.axis("off")
        if k == len(elements) - 1:
            main.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.3, 1.0), frameon=False)
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


# -- energies -------------------------------------------------------------------------


def predict_energies_per_atom(model, structures: list[Atoms]) -> np.ndarray:
    """Energies per atom of ``structures`` from an ensemble/BPNN (``predict_atoms``) or an ASE calculator."""
    if hasattr(model, "predict_atoms"):
        pred = model.predict_atoms(structures, stress=False, batch_size=16)
        energies = pred.energy.detach().cpu().numpy()
        return energies / np.array([len(a) for a in structures])
    out = []
    for atoms in structures:
        work = atoms.copy()
        work.calc = model
        out.append(work.get_potential_energy() / len(work))
    return np.array(out)


def energy_correlation(nnp_per_atom, reference_per_atom, names: list[str] | None = None,
                       window_ev: float = 0.2) -> dict:
    """NNP vs oracle energies per atom, both relative to the oracle's lowest structure (seed 000 Fig. 2)."""
    from scipy.stats import pearsonr, spearmanr

    nnp = np.asarray(nnp_per_atom, dtype=float)
    ref = np.asarray(reference_per_atom, dtype=float)
    if nnp.shape != ref.shape or nnp.size < 2:
        raise XtalforgeError("energy correlation needs at least two structures with both energies")
    names = names or [f"structure {i}" for i in range(len(ref))]
    lowest = int(np.argmin(ref))
    d_ref, d_nnp = ref - ref[lowest], nnp - nnp[lowest]
    within = d_ref <= window_ev + 1e-12
    result = {
        "window_ev_per_atom": window_ev,
        "n_structures": int(ref.size),
        "n_within": int(within.sum()),
        "reference_lowest": names[lowest],
        "nnp_lowest": names[int(np.argmin(nnp))],
        "lowest_agrees": bool(int(np.argmin(nnp)) == lowest),
        "reference_order": [names[i] for i in np.argsort(ref, kind="stable")],
        "nnp_order": [names[i] for i in np.argsort(nnp, kind="stable")],
        "order_agrees": bool(np.array_equal(np.argsort(ref, kind="stable"), np.argsort(nnp, kind="stable"))),
        "structures": [
            {"name": n, "reference_ev_per_atom": float(r), "nnp_ev_per_atom": float(e),
             "delta_reference_mev": float(1000 * dr), "delta_nnp_mev": float(1000 * de), "within_window": bool(w)}
            for n, r, e, dr, de, w in zip(names, ref, nnp, d_ref, d_nnp, within)
        ],
    }
    result["rmse_mev_per_atom"] = float(1000 * np.sqrt(np.mean((d_nnp[within] - d_ref[within]) ** 2)))
    if within.sum() >= 3 and np.ptp(d_ref[within]) > 0 and np.ptp(d_nnp[within]) > 0:
        result["pearson_r"] = float(pearsonr(d_ref[within], d_nnp[within])[0])
        result["spearman_rho"] = float(spearmanr(d_ref[within], d_nnp[within])[0])
    else:
        result["pearson_r"] = None  # undefined for fewer than three points
        result["spearman_rho"] = None
    if ref.size >= 3:
        result["pearson_r_all"] = float(pearsonr(d_ref, d_nnp)[0])
    return result


def plot_correlation(result: dict, path: str | Path, title: str = "", span: float = 2.5) -> Path:
    """ΔE_NNP against ΔE_oracle (meV/atom) up to ``span`` × the window (seed 000 Fig. 2 shows < 500 meV/atom).

    The window is shaded and its structures named; r and RMSE are those of the window.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["structures"]
    window = 1000 * result["window_ev_per_atom"]
    d_ref = np.array([r["delta_reference_mev"] for r in rows])
    d_nnp = np.array([r["delta_nnp_mev"] for r in rows])
    shown = d_ref <= span * window
    fig, ax = plt.subplots(figsize=(4.8, 4.6))
    lo = min(d_ref[shown].min(), d_nnp[shown].min(), 0.0)
    hi = max(d_ref[shown].max(), d_nnp[shown].max(), window)
    pad = 0.05 * (hi - lo)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.5", lw=0.8, ls="--")
    ax.axvspan(lo - pad, window, color="tab:blue", alpha=0.08, lw=0)
    inside = shown & (d_ref <= window + 1e-9)
    ax.scatter(d_ref[shown & ~inside], d_nnp[shown & ~inside], s=24, color="0.6", edgecolor="k", lw=0.3)
    ax.scatter(d_ref[inside], d_nnp[inside], s=32, color="tab:blue", edgecolor="k", lw=0.4)
    for row, x, y in zip(rows, d_ref, d_nnp):
        if x <= window + 1e-9:
            ax.annotate(row["name"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    r = result.get("pearson_r")
    text = (f"r = {r:.3f}" if r is not None else "r: n/a (< 3 structures)") + \
        f"\nRMSE = {result['rmse_mev_per_atom']:.1f} meV/atom\n(within {window:.0f} meV/atom)"
    hidden = int((~shown).sum())
    if hidden:
        text += f"\n{hidden} structure(s) above {span * window:.0f} meV/atom not shown"
    ax.text(0.04, 0.96, text, transform=ax.transAxes, va="top", fontsize=8)
    ax.set_xlabel("ΔE oracle (meV/atom)")
    ax.set_ylabel("ΔE NNP (meV/atom)")
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(lo - pad, hi + pad)
    if title:
        ax.set_title(title, fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


# -- scale-up check -------------------------------------------------------------------


# -- the command ----------------------------------------------------------------------


def reference_energies(structures: list[Atoms], oracle_config=None, relax: bool = False) -> tuple[np.ndarray, list[Atoms], int]:
    """Oracle energies per atom: from the structures' own labels when present, else computed.

    With ``relax`` every structure is relaxed with the oracle first (and the relaxed
    geometry is what the NNP sees). Returns energies, structures and oracle calls made.
    """
    from xtalforge.oracles import build_oracle

    oracle = None
    energies, out = [], []
    for atoms in structures:
        energy = _stored_energy(atoms) if not relax else None
        if energy is None:
            oracle = oracle or build_oracle(oracle_config)
            if relax:
                from xtalforge.dynamics import relax_structure

                result = relax_structure(atoms, oracle.calculator)
                if result.energy is None:
                    raise XtalforgeError(f"oracle relaxation of {atoms.info.get('name', 'a structure')} failed: "
                                         f"{result.reason}")
                atoms = result.atoms
                energy = result.energy
            else:
                label = oracle.single_point(atoms)
                if not label.ok:
                    raise XtalforgeError(f"oracle failed on {atoms.info.get('name', 'a structure')}: {label.error}")
                energy = label.energy
        energies.append(energy / len(atoms))
        out.append(atoms)
    return np.array(energies), out, oracle.calls if oracle else 0


def _stored_energy(atoms: Atoms) -> float | None:
    try:
        return float(atoms.get_potential_energy()) if atoms.calc is not None else None
    except Exception:  # a calculator without stored energy
        return None


def run_coverage(training: list[Atoms], structures: list[Atoms], out_dir: str | Path, *, model_path=None,
                 oracle_config=None, relax: bool = False, window_ev: float = 0.2) -> dict:
    """PCA coverage figure, and with a model the energy-correlation figure and JSON, in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = _unique_names(structures)
    model = None
    if model_path:
        from xtalforge.potentials.checkpoint import load_model

        model = load_model(model_path)
    pca = coverage_pca(training, structures, descriptor=model.descriptor if model is not None else None)
    plot_coverage(pca, out_dir / "coverage_pca.png", names)
    summary = {
        "n_training_frames": len(training),
        "structures": names,
        "pca": {el: {k: v for k, v in e.items() if not isinstance(v, np.ndarray)} for el, e in pca.items()},
        "lines": [f"{el}: {100 * e['inside_fraction']:.0f}% of crystal atoms inside the training set's G space"
                  for el, e in pca.items() if e.get("inside_fraction") is not None],
    }
    for el, entry in pca.items():
        if "crystal_distance_over_radius" in entry:
            inside = entry["crystal_distance_over_radius"] <= 1.0
            summary["pca"][el]["inside_by_structure"] = {
                names[i]: float(np.mean(inside[entry["crystal_owner"] == i]))
                for i in np.unique(entry["crystal_owner"])
            }
    if model is not None:
        reference, relaxed, calls = reference_energies(structures, oracle_config, relax=relax)
        nnp = predict_energies_per_atom(model, relaxed)
        correlation = energy_correlation(nnp, reference, names, window_ev=window_ev)
        correlation["oracle_calls"] = calls
        plot_correlation(correlation, out_dir / "correlation.png")
        (out_dir / "correlation.json").write_text(json.dumps(correlation, indent=2) + "\n")
        summary["correlation"] = {k: correlation[k] for k in ("pearson_r", "rmse_mev_per_atom", "lowest_agrees",
                                                              "order_agrees", "nnp_order", "reference_order")}
        r = correlation["pearson_r"]
        summary["lines"].append(
            f"NNP vs oracle: r = {r:.3f}" if r is not None else "NNP vs oracle: r undefined (fewer than 3 structures)")
        summary["lines"][-1] += (f", RMSE {correlation['rmse_mev_per_atom']:.1f} meV/atom; order "
                                 f"{' < '.join(correlation['nnp_order'])} (oracle {' < '.join(correlation['reference_order'])})")
    (out_dir / "coverage.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _unique_names(structures: list[Atoms]) -> list[str]:
    names, seen = [], {}
    for i, atoms in enumerate(structures):
        name = str(atoms.info.get("name", f"structure {i}"))
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return names
