"""Figures of a run, drawn with matplotlib's object API (Agg canvas, no pyplot state).

Each function takes plain arrays and returns a ``Figure``, or None when there is
nothing to draw, so the report can say so instead of showing an empty plot.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

FIGURE_DIR = "figures"
_DPI = 110
_SUBSCRIPTS = str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉")


def pretty_symbol(symbol: str) -> str:
    """Hermann-Mauguin screw axes as subscripts: ``P6_3/mmc`` -> ``P6₃/mmc``."""
    parts = symbol.split("_")
    return parts[0] + "".join(part[:1].translate(_SUBSCRIPTS) + part[1:] for part in parts[1:])


def new_figure(width: float = 6.4, height: float = 4.0) -> Figure:
    """A figure on an Agg canvas (safe in threads and without a display)."""
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, run_dir: str | Path, name: str, alt: str) -> str:
    """Save ``fig`` as ``run_dir/figures/NAME.png`` and return an ``<img>`` embedding it.

    The PNG is embedded as base64 so report.html stands alone; the file is kept for
    papers and slides.
    """
    path = Path(run_dir) / FIGURE_DIR / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    png = buffer.getvalue()
    path.write_bytes(png)
    encoded = base64.b64encode(png).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{encoded}" alt="{html.escape(alt)}">'
        f'<figcaption>{html.escape(alt)} (<a href="{FIGURE_DIR}/{name}.png">{name}.png</a>)</figcaption></figure>'
    )


def best_energy_figure(
    oracle_calls: Sequence[float],
    energies: Sequence[float],
    *,
    total_calls: int | None = None,
    target_calls: int | None = None,
    ylabel: str = "energy (eV/atom)",
) -> Figure | None:
    """Running minimum of the energy against the run's cumulative oracle calls."""
    calls = np.asarray(oracle_calls, dtype=float)
    energy = np.asarray(energies, dtype=float)
    if calls.size == 0:
        return None
    order = np.argsort(calls, kind="stable")
    calls, energy = calls[order], energy[order]
    running = np.minimum.accumulate(energy)
    end = max(float(total_calls or 0), float(calls[-1]))
    fig = new_figure()
    ax = fig.add_subplot()
    ax.scatter(calls, energy, s=12, color="0.65", label="structures", zorder=1)
    ax.step(np.append(calls, end), np.append(running, running[-1]), where="post", color="C0", lw=2,
            label="best so far", zorder=2)
    if target_calls is not None:
        ax.axvline(target_calls, color="C3", ls="--", lw=1.5, label=f"target found ({target_calls} calls)")
    # Random candidates can sit eV above the minimum; show the descent of the best.
    low, high = running[-1], running[0]
    pad = max(0.1 * (high - low), 0.01)
    ax.set_ylim(low - pad, high + pad)
    ax.set_xlim(0, end * 1.02 if end > 0 else 1)
    ax.set_xlabel("oracle calls (cumulative)")
    ax.set_ylabel(ylabel)
    ax.set_title("Best energy vs oracle calls")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", framealpha=0.9)
    return fig


def spacegroup_figure(labels: Sequence[str], max_bars: int = 25) -> Figure | None:
    """Horizontal bars: how many structures relaxed into each space group."""
    if len(labels) == 0:
        return None
    names, counts = np.unique(np.asarray(labels, dtype=str), return_counts=True)
    order = np.argsort(-counts, kind="stable")[:max_bars]
    names, counts = names[order][::-1], counts[order][::-1]
    names = [pretty_symbol(name) for name in names]
    fig = new_figure(6.4, max(2.5, 0.3 * len(names) + 1.2))
    ax = fig.add_subplot()
    ax.barh(np.arange(len(names)), counts, color="C2")
    ax.set_yticks(np.arange(len(names)), names)
    ax.set_xlabel("structures")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Space groups of relaxed structures")
    ax.grid(axis="x", alpha=0.3)
    return fig


def energy_histogram_figure(delta_e_mev: Sequence[float], quantile: float = 0.98) -> Figure | None:
    """Histogram of energies above the best (meV/atom); the far tail is counted, not drawn."""
    delta = np.asarray(delta_e_mev, dtype=float)
    if delta.size == 0:
        return None
    top = max(float(np.quantile(delta, quantile)), 1.0)
    shown = delta[delta <= top]
    fig = new_figure()
    ax = fig.add_subplot()
    ax.hist(shown, bins=min(40, max(5, shown.size)), range=(0, top), color="C1", edgecolor="white")
    ax.set_xlabel("energy above best (meV/atom)")
    ax.set_ylabel("structures")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    hidden = delta.size - shown.size
    ax.set_title("Energy distribution" + (f" ({hidden} above {top:.0f} meV/atom not shown)" if hidden else ""))
    ax.grid(alpha=0.3)
    return fig
