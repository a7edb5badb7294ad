"""``report.html``: a self-contained page describing one run directory.

Core sections (header, ranking, figures, failures) come from ``summary.json`` and the
structure store. Other components add sections through :func:`register_section`;
e.g. active learning registers one that reads ``run_dir/cycles.json``.
"""

from __future__ import annotations

import html
import logging
import math
import os
import tempfile
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from xtalforge.errors import XtalforgeError
from xtalforge.report.figures import (
    best_energy_figure,
    energy_histogram_figure,
    save_figure,
    spacegroup_figure,
)
from xtalforge.store import (
    RANKED_STAGES,
    RunStore,
    StructureRecord,
    build_summary,
    failure_reason,
    read_summary,
)
from xtalforge.structures.composition import Composition

REPORT_NAME = "report.html"
log = logging.getLogger(__name__)

SectionFn = Callable[[Path, RunStore], "str | None"]


@dataclass(frozen=True)
class _Section:
    title: str
    render: SectionFn
    order: float


_SECTIONS: dict[str, _Section] = {}


def register_section(name: str, fn: SectionFn, order: float = 100.0) -> None:
    """Add (or replace) a report section: ``fn(run_dir, store)`` returns HTML, or None to skip.

    Sections appear after the core ones, by ``order`` then registration. ``name`` is
    the section's heading. A section that raises is shown as an error note; the rest
    of the report is still written.
    """
    _SECTIONS[name] = _Section(name, fn, order)


def unregister_section(name: str) -> None:
    """Remove a registered section (no error when absent)."""
    _SECTIONS.pop(name, None)


def registered_sections() -> list[str]:
    """Names of the extra sections, in the order they will appear."""
    return [s.title for s in sorted(_SECTIONS.values(), key=lambda s: s.order)]


def write_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.html`` (figures also as PNGs in ``run_dir/figures/``); return its path."""
    run_dir = Path(run_dir)
    store = RunStore(run_dir, create=False)
    records = store.records()
    summary = read_summary(run_dir) or _summary_from_store(store, records)
    ranked = [r for r in records if r.status == "ok" and r.stage in RANKED_STAGES and r.energy_per_atom is not None]
    parts = [
        _header(summary),
        _section("Lowest-energy unique structures", _ranking_table(summary)),
        _section("Best energy vs oracle calls", _convergence(run_dir, summary, ranked)),
        _section("Space groups", _spacegroups(run_dir, ranked)),
        _section("Energy distribution", _energies(run_dir, ranked)),
        _section("Failed structures", _failures(records)),
    ]
    for section in sorted(_SECTIONS.values(), key=lambda s: s.order):
        parts.append(_render_extra(section, run_dir, store))
    page = _page(f"xtalforge report: {summary.get('composition', '?')}", "\n".join(p for p in parts if p))
    return _write_text_atomic(run_dir / "report.html", page)


# -- sections ------------------------------------------------------------------


def _header(summary: dict) -> str:
    target = summary.get("target_found")
    target_text = "no target given" if target is None else ("yes" if target else "no")
    if target and summary.get("oracle_calls_to_target") is not None:
        target_text += f", after {summary['oracle_calls_to_target']} oracle calls"
    rows = [
        ("Composition", summary.get("composition")),
        ("Method", summary.get("method")),
        ("Oracle", summary.get("oracle")),
        ("Oracle calls", summary.get("oracle_calls")),
        ("Wall time", _duration(summary.get("wall_time_s"))),
        ("Candidates", summary.get("n_candidates")),
        ("Target found", target_text),
    ]
    best = summary.get("best")
    if best:
        rows.append(("Best", f"{best['energy_per_atom']:.4f} eV/atom, {best.get('spacegroup') or '?'}"))
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{_text(v)}</td></tr>" for k, v in rows)
    return (
        f"<header><h1>{html.escape(str(summary.get('composition', '?')))}: crystal structure search</h1>"
        f'<table class="facts">{body}</table><p class="muted">generated {generated} by xtalforge</p></header>'
    )


def _ranking_table(summary: dict) -> str:
    top = summary.get("top") or []
    if not top:
        return "<p>No successfully relaxed structures yet.</p>"
    header = ["rank", "energy (eV/atom)", "ΔE (meV/atom)", "space group", "oracle calls when found", "candidate", "CIF"]
    best_energy = top[0]["energy_per_atom"]
    rows = []
    for k, entry in enumerate(top, 1):
        delta = entry.get("delta_e_mev", 1000.0 * (entry["energy_per_atom"] - best_energy))
        sg = entry.get("spacegroup") or "?"
        if entry.get("spacegroup_number") is not None:
            sg = f"{sg} ({entry['spacegroup_number']})"
        cif = entry.get("cif")
        link = f'<a href="{html.escape(cif)}">{html.escape(Path(cif).name)}</a>' if cif else "–"
        rows.append([
            _text(entry.get("rank", k)), f"{entry['energy_per_atom']:.4f}", f"{delta:.1f}", _text(sg),
            _text(entry.get("oracle_calls_total")), _text(entry.get("candidate")), link,
        ])
    note = ""
    if any("enthalpy_per_atom" in e and e["enthalpy_per_atom"] is not None for e in top):
        note = "<p class='muted'>Ranked by enthalpy per atom at the run's pressure; ΔE is the enthalpy difference.</p>"
    return table_html(header, rows) + note


def _convergence(run_dir: Path, summary: dict, ranked: list[StructureRecord]) -> str:
    points = [r for r in ranked if r.oracle_calls_total is not None]
    enthalpy = any(r.enthalpy_per_atom is not None for r in points)
    fig = best_energy_figure(
        [r.oracle_calls_total for r in points],
        [r.ranking_energy for r in points],
        total_calls=summary.get("oracle_calls"),
        target_calls=summary.get("oracle_calls_to_target") if summary.get("target_found") else None,
        ylabel="enthalpy (eV/atom)" if enthalpy else "energy (eV/atom)",
    )
    if fig is None:
        return "<p>No relaxed structures with oracle-call counts yet.</p>"
    return save_figure(fig, run_dir, "best_energy_vs_oracle_calls",
                       "Lowest energy found so far against the run's cumulative oracle calls")


def _spacegroups(run_dir: Path, ranked: list[StructureRecord]) -> str:
    labels = [
        f"{r.spacegroup_symbol} ({r.spacegroup_number})" if r.spacegroup_number is not None else "unknown"
        for r in ranked
    ]
    fig = spacegroup_figure(labels)
    if fig is None:
        return "<p>No relaxed structures yet.</p>"
    return save_figure(fig, run_dir, "spacegroups", "Space groups of the relaxed structures (all, duplicates included)")


def _energies(run_dir: Path, ranked: list[StructureRecord]) -> str:
    if not ranked:
        return "<p>No relaxed structures yet.</p>"
    best = min(r.ranking_energy for r in ranked)
    fig = energy_histogram_figure([1000.0 * (r.ranking_energy - best) for r in ranked])
    return save_figure(fig, run_dir, "energy_distribution", "Energies of the relaxed structures above the best")


def _failures(records: list[StructureRecord]) -> str:
    failed = [r for r in records if r.status == "failed"]
    total = len(records)
    if not failed:
        return f"<p>None of {total} structures failed.</p>"
    by_reason: dict[str, list[StructureRecord]] = {}
    for record in failed:
        by_reason.setdefault(failure_reason(record), []).append(record)
    rows = [
        [_text(reason), str(len(group)), _text(group[0].stage), _text((group[0].error or "")[:200])]
        for reason, group in sorted(by_reason.items(), key=lambda item: -len(item[1]))
    ]
    intro = f"<p>{len(failed)} of {total} structures failed; they are excluded from rankings and figures.</p>"
    return intro + table_html(["reason", "count", "stage", "example message"], rows)


def _render_extra(section: _Section, run_dir: Path, store: RunStore) -> str:
    try:
        body = section.render(run_dir, store)
    except Exception as exc:  # one broken extension must not cost the whole report
        log.exception("report section %r failed", section.title)
        body = f'<p class="error">This section could not be drawn: {html.escape(f"{type(exc).__name__}: {exc}")}</p>'
    return _section(section.title, body) if body else ""


def _summary_from_store(store: RunStore, records: list[StructureRecord]) -> dict:
    """A summary for a run that has not written summary.json yet (e.g. still running).

    Composition, method and oracle come from the run's config.toml when it is there,
    else from the stored records.
    """
    config = _run_config(store.run_dir)
    formula = next((r.atoms.get_chemical_formula() for r in records if r.atoms is not None and len(r.atoms)), "?")
    if "composition" in config:
        try:
            formula = Composition.parse(config["composition"], int(config.get("formula_units", 1))).formula
        except (XtalforgeError, TypeError, ValueError):
            formula = str(config["composition"])
    method = config.get("search", {}).get("method") or ", ".join(sorted({r.method for r in records})) or "?"
    calls = [r.oracle_calls_total for r in records if r.oracle_calls_total is not None]
    return build_summary(
        store,
        composition=formula,
        method=method,
        oracle=config.get("oracle", {}).get("name", "?"),
        oracle_calls=max(calls, default=sum(r.oracle_calls for r in records)),
        wall_time_s=float("nan"),
        n_candidates=len({r.candidate for r in records if r.stage == "search"}),
        target_found=None,
        oracle_calls_to_target=None,
    )


def _run_config(run_dir: Path) -> dict:
    """The run's resolved config.toml as a dict; empty when absent or unreadable."""
    try:
        config = tomllib.loads((run_dir / "config.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return {}
    return config if isinstance(config, dict) else {}


# -- HTML helpers (also for registered sections) ---------------------------------


def table_html(header: list[str], rows: list[list[str]]) -> str:
    """A table; ``header`` is escaped here, cells must already be HTML."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _section(title: str, body: str) -> str:
    anchor = "".join(c if c.isalnum() else "-" for c in title.lower()).strip("-")
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>{body}</section>'


def _text(value) -> str:
    return "–" if value is None else html.escape(str(value))


def _duration(seconds) -> str | None:
    if seconds is None or math.isnan(float(seconds)):
        return None
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 980px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.4em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.95em; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.7em; text-align: left; }
thead th { background: #f3f5f7; } table.facts th { background: #f7f7f7; font-weight: 600; }
tbody tr:nth-child(even) { background: #fafbfc; }
figure { margin: 0.5em 0 1.5em; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption, .muted { color: #666; font-size: 0.9em; } .error { color: #a00; }
"""


def _page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def _write_text_atomic(path: Path, text: str) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; a report is for sharing
    os.replace(tmp, path)
    return path
