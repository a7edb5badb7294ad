"""Report section of an active-learning run, drawn from ``run_dir/cycles.json``.

Per cycle: labels and oracle calls, training RMSEs, how the pool relaxations ended,
the lowest cluster energies and the stopping rule's improvement; figures of the
lowest cluster energies and of the pool's energy distribution per cycle; and the
table of validated minima with their energies before (model) and after (oracle)
validation. Runs of other methods have no ``cycles.json`` and get no section.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from xtalforge.report.figures import new_figure, save_figure
from xtalforge.report.html import register_section, table_html
from xtalforge.store import RunStore, read_json

CYCLES_NAME = "cycles.json"
SECTION = "Active learning"


def active_learning_section(run_dir: Path, store: RunStore) -> str | None:
    """HTML of the section, or None for a run without active-learning cycles."""
    path = Path(run_dir) / CYCLES_NAME
    if not path.exists():
        return None
    data = read_json(path)
    cycles = data.get("cycles") or []
    parts = [_stop_note(data, cycles)]
    if cycles:
        parts.append(_cycle_table(cycles))
        parts.append(_cluster_figure(run_dir, cycles) or "")
        parts.append(_pool_figure(run_dir, cycles) or "")
    parts.append(_validation_table(data.get("validation") or []))
    parts.append(_rounds_note(data.get("validation_rounds") or []))
    return "\n".join(p for p in parts if p)


def _stop_note(data: dict, cycles: list[dict]) -> str:
    n = len(cycles)
    if data.get("stopped"):
        text = f"Stopped after {n} cycle{'s' if n != 1 else ''}: {data.get('stop_reason')}."
    else:
        text = f"{n} cycle{'s' if n != 1 else ''} finished; the run has not stopped yet."
    return f"<p>{html.escape(text)}</p>"


def _metric(metrics: dict, *keys: str) -> str:
    """The first of ``keys`` the trainer reported, formatted."""
    for key in keys:
        value = metrics.get(key)
        if isinstance(value, (int, float)):
            return f"{value:.3g}"
    return "–"


def _cycle_table(cycles: list[dict]) -> str:
    header = ["cycle", "noise (Å)", "labels ok / rejected / failed", "training set", "oracle calls (total)",
              "RMSE E (meV/atom)", "RMSE F (eV/Å)", "pool relaxations", "search pool stopped on U", "lowest cluster energies (eV/atom)", "improvement (eV/atom)", "converged"]
    rows = []
    for c in cycles:
        metrics = c.get("training_metrics") or {}
        statuses = ", ".join(f"{k} {v}" for k, v in sorted((c.get("relax_status") or {}).items()))
        lowest = ", ".join(f"{x['energy']:.4f}" for x in c.get("lowest_clusters") or []) or "–"
        improvement = c.get("improvement")
        rows.append([
            str(c["cycle"]), f"{c.get('noise', 0.0):.3f}",
            f"{c.get('n_labels_ok', 0)} / {c.get('n_labels_rejected', 0)} / {c.get('n_labels_failed', 0)}",
            str(c.get("dataset_size", "–")), str(c.get("oracle_calls_total", "–")),
            _metric(metrics, "energy_rmse_mev_atom"), _metric(metrics, "force_rmse_ev_a"), html.escape(statuses),
            f"{100 * c.get('uncertain_fraction', 0.0):.0f} %", lowest,
            "–" if improvement is None else f"{improvement:.4f}", "yes" if c.get("converged") else "no",
        ])
    note = ("<p class='muted'>RMSEs: the ensemble's validation errors (mean over its models). "
            "Improvement: largest decrease of one of the lowest "
            "cluster energies against the previous pool, both evaluated with this cycle's ensemble.</p>")
    return table_html(header, rows) + note


def _cluster_figure(run_dir: Path, cycles: list[dict]) -> str | None:
    k = max((len(c.get("lowest_clusters") or []) for c in cycles), default=0)
    if k == 0:
        return None
    fig = new_figure()
    ax = fig.add_subplot()
    for rank in range(k):
        xs = [c["cycle"] for c in cycles if len(c.get("lowest_clusters") or []) > rank]
        ys = [c["lowest_clusters"][rank]["energy"] for c in cycles if len(c.get("lowest_clusters") or []) > rank]
        ax.plot(xs, ys, marker="o", label=f"cluster {rank + 1}")
    ax.set_xlabel("cycle")
    ax.set_ylabel("lowest energy in cluster (eV/atom, model)")
    ax.legend(fontsize="small")
    return save_figure(fig, run_dir, "active_cluster_energies", "Energies of the lowest clusters of the search pool per cycle")


def _pool_figure(run_dir: Path, cycles: list[dict]) -> str | None:
    histos = [(c["cycle"], c.get("pool_energy_histogram") or {}) for c in cycles]
    histos = [(cycle, h) for cycle, h in histos if h.get("edges")]
    if not histos:
        return None
    fig = new_figure()
    ax = fig.add_subplot()
    colours = _colours(len(histos))
    for (cycle, h), colour in zip(histos, colours):
        edges = np.asarray(h["edges"])
        counts = np.asarray(h.get("search") or [0] * (len(edges) - 1)) + np.asarray(h.get("training") or [0] * (len(edges) - 1))
        ax.stairs(counts, edges, color=colour, label=f"cycle {cycle}")
    ax.set_xlabel("energy (eV/atom, model of the cycle)")
    ax.set_ylabel("pool structures")
    ax.legend(fontsize="small", ncols=2)
    return save_figure(fig, run_dir, "active_pool_energies",
                       "Energy distribution of the relaxed pool (search and training pools) after each cycle")


def _colours(n: int):
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(x) for x in np.linspace(0.0, 0.9, max(n, 1))]


def _validation_table(rows: list[dict]) -> str:
    if not rows:
        return "<p>No structure validated with the oracle yet.</p>"
    header = ["pool index", "after cycle", "why", "cluster", "model (eV/atom)", "oracle (eV/atom)", "Δ (meV/atom)", "oracle calls",
              "space group", "target", "result"]
    body = []
    for r in rows:
        sg = f"{r.get('spacegroup') or '?'} ({r.get('spacegroup_number')})" if r.get("spacegroup_number") else "–"
        target = {True: "yes", False: "no"}.get(r.get("matches_target"), "–")
        result = "duplicate of " + str(r["duplicate_of"]) if r.get("duplicate_of") is not None else (r.get("status") or "")
        body.append([
            str(r.get("pool_index")), str(r.get("after_cycle", "–")), html.escape(str(r.get("reason") or "")), str(r.get("cluster", "–")),
            _num(r.get("predicted_energy_per_atom"), 4), _num(r.get("energy_per_atom"), 4), _num(r.get("delta_e_mev"), 1),
            str(r.get("oracle_calls", "–")), html.escape(sg), target, html.escape(result),
        ])
    total = sum(int(r.get("oracle_calls") or 0) for r in rows)
    return (f"<h3>Validated minima</h3><p>{len(rows)} structures relaxed with the oracle, {total} oracle calls.</p>"
            + table_html(header, body))


def _rounds_note(rounds: list[dict]) -> str:
    """One line per validation round: how far the oracle disagreed with the ensemble's cluster minima."""
    if len(rounds) < 2 and all(r.get("confirmed") for r in rounds):
        return ""
    items = "".join(
        f"<li>after cycle {r['cycle']}: lowest oracle − lowest model energy {_num(r.get('delta_lowest_mev'), 1)} meV/atom, "
        f"{'confirmed' if r.get('confirmed') else 'not confirmed'} ({r.get('oracle_calls_total')} oracle calls so far)</li>"
        for r in rounds)
    return ("<h3>Validation rounds</h3><p>An unconfirmed validation adds its oracle relaxations to the training "
            f"set and the cycles go on (active.confirm_tol).</p><ul>{items}</ul>")


def _num(value, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


register_section(SECTION, active_learning_section, order=50.0)
