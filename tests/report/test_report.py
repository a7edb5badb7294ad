"""report.html for a synthetic run built from the Si reference structures."""

import re

import numpy as np
import pytest
from ase.io import read

from xtalforge.errors import CheckpointError
from xtalforge.report import (
    register_section,
    registered_sections,
    table_html,
    unregister_section,
    write_report,
)
from xtalforge.report.figures import best_energy_figure
from xtalforge.store import RunStore, StructureRecord, build_summary, write_summary

POLYMORPHS = {  # CIF: SevenNet-0 energy, eV/atom (reference README)
    "Si_beta-tin_I41amd.cif": -5.1297,
    "Si_BC8_Ia-3.cif": -5.2006,
    "Si_lonsdaleite_P63mmc.cif": -5.3911,
    "Si_diamond_Fd-3m.cif": -5.4030,
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def run_dir(tmp_path, reference_dir):
    """A finished random search: polymorphs found in order of falling energy, one failure."""
    store = RunStore(tmp_path)
    rng = np.random.default_rng(0)
    calls = 0
    for candidate, (cif, energy) in enumerate(POLYMORPHS.items()):
        atoms = read(reference_dir / cif)
        initial = atoms.copy()
        initial.rattle(0.2, rng=rng)
        calls += 40 + 10 * candidate
        store.add(StructureRecord(candidate=candidate, status="ok", method="random", energy_per_atom=energy,
                                  oracle_calls=40 + 10 * candidate, oracle_calls_total=calls,
                                  spacegroup_number=None, initial=initial, relaxed=atoms))
    store.add(StructureRecord(candidate=4, status="failed", method="random", relax_status="exploded",
                              error="cell volume grew 5.2x", oracle_calls=12, oracle_calls_total=calls + 12,
                              initial=initial))
    summary = build_summary(store, composition="Si8", method="random", oracle="sw", oracle_calls=calls + 12,
                            wall_time_s=95.0, n_candidates=5, target_found=True, oracle_calls_to_target=calls)
    write_summary(tmp_path, summary)
    return tmp_path


def test_report_has_every_part(run_dir):
    path = write_report(run_dir)
    assert path == run_dir / "report.html"
    page = path.read_text()
    for text in ("Si8", "random", "sw", "95.0 s", "Best energy vs oracle calls", "Space groups",
                 "Energy distribution", "Failed structures", "exploded", "cell volume grew 5.2x"):
        assert text in page, text
    # Ranking table: diamond first at 0 meV/atom, lonsdaleite 11.9 meV/atom above it.
    rows = re.findall(r"<tr><td>(\d+)</td><td>(-?[\d.]+)</td><td>([\d.]+)</td><td>([^<]+)</td>", page)
    assert [r[0] for r in rows] == ["1", "2", "3", "4"]
    assert rows[0][1:] == ("-5.4030", "0.0", "Fd-3m (227)") and rows[1][2] == "11.9"
    assert 'href="cifs/search_000003.cif"' in page and (run_dir / "cifs" / "search_000003.cif").is_file()
    # Figures: PNG files next to the report, and embedded so the page stands alone.
    figures = sorted(p.name for p in (run_dir / "figures").iterdir())
    assert figures == ["best_energy_vs_oracle_calls.png", "energy_distribution.png", "spacegroups.png"]
    for name in figures:
        assert (run_dir / "figures" / name).read_bytes().startswith(PNG_MAGIC)
    assert page.count('src="data:image/png;base64,') == 3
    assert "<link" not in page and "<script" not in page  # nothing fetched from elsewhere


def test_running_minimum_marks_the_target(run_dir):
    fig = best_energy_figure([50, 10, 30], [-5.0, -4.0, -5.2], total_calls=80, target_calls=50)
    ax = fig.axes[0]
    step = ax.lines[0]
    np.testing.assert_allclose(step.get_xdata(), [10, 30, 50, 80])
    np.testing.assert_allclose(step.get_ydata(), [-4.0, -5.2, -5.2, -5.2])
    assert ax.lines[1].get_xdata()[0] == 50  # the target marker
    assert best_energy_figure([], []) is None


def test_registered_sections(run_dir):
    seen = []

    def cycles(run_dir_arg, store):
        seen.append((run_dir_arg, store.count()))
        return table_html(["cycle", "oracle calls"], [["1", "120"]])

    def broken(run_dir_arg, store):
        raise RuntimeError("cycles.json missing")

    register_section("Active-learning cycles", cycles, order=10)
    register_section("Broken extension", broken, order=20)
    register_section("Nothing to show", lambda run_dir_arg, store: None, order=5)
    try:
        names = registered_sections()
        assert names.index("Nothing to show") < names.index("Active-learning cycles") < names.index("Broken extension")
        page = write_report(run_dir).read_text()
    finally:
        for name in ("Active-learning cycles", "Broken extension", "Nothing to show"):
            unregister_section(name)
    assert seen == [(run_dir, 5)]
    assert "<h2>Active-learning cycles</h2>" in page and "<td>120</td>" in page
    assert "could not be drawn: RuntimeError: cycles.json missing" in page
    assert "Nothing to show" not in page
    assert page.index("Failed structures") < page.index("Active-learning cycles") < page.index("Broken extension")


def test_report_without_summary_and_without_run(run_dir, tmp_path_factory):
    (run_dir / "summary.json").unlink()  # a run still in progress
    page = write_report(run_dir).read_text()
    assert "Fd-3m (227)" in page and "<h1>Si4:" in page  # formula of the first record
    (run_dir / "config.toml").write_text('composition = "Si"\nformula_units = 8\n[oracle]\nname = "sw"\n')
    page = write_report(run_dir).read_text()
    assert "<h1>Si8:" in page and "<td>sw</td>" in page
    with pytest.raises(CheckpointError, match="no structures.db"):
        write_report(tmp_path_factory.mktemp("empty"))
