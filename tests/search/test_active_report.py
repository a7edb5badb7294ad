"""The active-learning report section, drawn from a cycles.json."""

from dataclasses import asdict

from xtalforge.report.active_section import SECTION, active_learning_section
from xtalforge.report.html import registered_sections
from xtalforge.search.active_state import ActiveState, CycleSummary
from xtalforge.store import RunStore


def _state_with_two_cycles(run_dir):
    state = ActiveState.load(run_dir)
    edges = [-4.4 + 0.1 * k for k in range(5)]
    for cycle, lowest in ((1, [-4.20, -4.10]), (2, [-4.30, -4.12])):
        state.finish_cycle(CycleSummary(
            cycle=cycle, noise=0.24 if cycle == 2 else 0.0, n_selected=10, n_labels_ok=9, n_labels_rejected=1,
            dataset_size=9 * cycle, oracle_calls_total=10 * cycle,
            training_metrics={"energy_rmse_mev_atom": 12.5, "force_rmse_ev_a": 0.21},
            relax_status={"converged": 5, "uncertain": 3},
            lowest_clusters=[{"energy": e, "member": k, "label": k, "size": 3} for k, e in enumerate(lowest)],
            improvement=None if cycle == 1 else 0.1, converged=False,
            pool_energy_histogram={"edges": edges, "search": [1, 2, 0, 1], "training": [0, 1, 3, 2]},
        ))
    state.validation = [
        {"pool_index": 7, "reason": "cluster", "cluster": 0, "predicted_energy_per_atom": -4.30, "energy_per_atom": -4.3367,
         "delta_e_mev": -36.7, "oracle_calls": 12, "status": "converged", "spacegroup": "Fd-3m", "spacegroup_number": 227,
         "matches_target": True, "duplicate_of": None},
        {"pool_index": 3, "reason": "outside clusters", "cluster": -1, "predicted_energy_per_atom": -4.25,
         "energy_per_atom": -4.3367, "delta_e_mev": -86.7, "oracle_calls": 20, "status": "converged",
         "spacegroup": "Fd-3m", "spacegroup_number": 227, "matches_target": True, "duplicate_of": 7},
    ]
    state.stop("converged: test")
    return state


def test_section_shows_cycles_figures_and_validation(tmp_path):
    _state_with_two_cycles(tmp_path)
    html = active_learning_section(tmp_path, RunStore(tmp_path))
    assert "Stopped after 2 cycles: converged: test." in html
    assert html.count("<tr>") >= 2 + 2 + 2  # two cycle rows, two validation rows, headers
    assert "-4.3000, -4.1200" in html and "<td>12.5</td><td>0.21</td>" in html
    assert html.count("<img") == 2  # cluster energies and pool energy distribution
    assert (tmp_path / "figures" / "active_pool_energies.png").stat().st_size > 1000
    assert "duplicate of 7" in html and "32 oracle calls" in html and "Fd-3m (227)" in html
    assert SECTION in registered_sections()
    assert "Validation rounds" not in html  # one confirmed (or unchecked) validation: nothing to say


def test_section_lists_unconfirmed_validation_rounds(tmp_path):
    state = _state_with_two_cycles(tmp_path)
    state.validation_rounds = [
        {"cycle": 1, "delta_lowest_mev": -86.7, "confirmed": False, "oracle_calls_total": 42},
        {"cycle": 2, "delta_lowest_mev": 4.2, "confirmed": True, "oracle_calls_total": 90},
    ]
    state.save()
    html = active_learning_section(tmp_path, RunStore(tmp_path))
    assert "Validation rounds" in html and "-86.7 meV/atom, not confirmed" in html and "4.2 meV/atom, confirmed" in html


def test_no_section_for_runs_without_cycles(tmp_path):
    assert active_learning_section(tmp_path, RunStore(tmp_path)) is None
    state = ActiveState.load(tmp_path)
    state.save()  # a run that has not finished a cycle yet
    html = active_learning_section(tmp_path, RunStore(tmp_path))
    assert "0 cycles finished" in html and "No structure validated" in html
    assert asdict(CycleSummary(cycle=1))["pool_energy_histogram"] == {}
