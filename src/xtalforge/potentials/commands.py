"""``xtalforge train`` and ``xtalforge evaluate`` (registered by the main CLI)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from xtalforge.errors import XtalforgeError


def register(subparsers) -> None:
    """Add the ``train`` and ``evaluate`` subcommands."""
    p = subparsers.add_parser(
        "train", help="train a neural network potential ensemble on labelled structures",
        description="Train a Behler-Parrinello NNP ensemble on structures with energies, forces (and stresses).",
    )
    p.add_argument("data", help="extxyz file or ASE database (.db) with energies, forces and stresses")
    p.add_argument("--out", required=True, help="model file to write (e.g. model.pt)")
    p.add_argument("--ensemble", type=int, default=None, metavar="N", help="number of models (default: config, 5)")
    p.add_argument("--config", help="TOML file with a [potential] section (or only potential settings)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser(
        "evaluate", help="accuracy of a potential on labelled structures",
        description="Energy/force/stress RMSE and MAE, Pearson r of energies, and a parity plot.",
    )
    p.add_argument("model", help="model file written by `xtalforge train`")
    p.add_argument("data", help="extxyz file or ASE database with reference labels")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    p.add_argument("--plot", help="parity plot PNG (default: <model>_parity.png next to the model)")
    p.add_argument("--no-plot", action="store_true", help="do not write a parity plot")
    p.add_argument("--scale-up", metavar="LARGE",
                   help="labelled frames of larger cells: errors on them beside DATA's (seed 003 section 3.3.1)")
    p.set_defaults(func=cmd_evaluate)


def load_potential_config(path):
    """PotentialConfig from a TOML file: its [potential] table, or the whole file."""

    from xtalforge.config import PotentialConfig, from_dict, read_toml

    if path is None:
        return PotentialConfig()
    data = read_toml(path)
    if "potential" in data:
        return from_dict(PotentialConfig, data["potential"], "potential")
    return from_dict(PotentialConfig, data, "potential")


def cmd_train(args) -> int:
    from xtalforge.potentials.data import read_frames
    from xtalforge.potentials.training import train_ensemble

    config = load_potential_config(args.config)
    if args.ensemble is not None and args.ensemble < 1:
        raise XtalforgeError(f"--ensemble must be at least 1, got {args.ensemble}")
    frames = read_frames(args.data)
    log = None if args.quiet else (lambda message: print(message, file=sys.stderr))
    ensemble = train_ensemble(frames, config, n_models=args.ensemble, seed=args.seed, progress=not args.quiet, log=log)
    ensemble.save(args.out)
    metrics = ensemble.metrics
    print(f"wrote {len(ensemble)}-model potential for {'-'.join(ensemble.elements)} to {args.out} "
          f"(validation: {_fmt(metrics.get('energy_rmse_mev_atom'), '.2f')} meV/atom, "
          f"{_fmt(metrics.get('force_rmse_ev_a'), '.3f')} eV/Å, {_fmt(metrics.get('stress_rmse_kbar'), '.1f')} kbar)")
    return 0


def cmd_evaluate(args) -> int:
    from xtalforge.potentials.checkpoint import load
    from xtalforge.potentials.data import read_frames
    from xtalforge.potentials.evaluation import evaluate, scale_up_report

    calculator = load(args.model)
    frames = read_frames(args.data)
    plot = None if args.no_plot else Path(args.plot or Path(args.model).with_name(Path(args.model).stem + "_parity.png"))
    result = evaluate(calculator, frames, plot=plot)
    if plot is not None:
        result["parity_plot"] = str(plot)
    if args.scale_up:
        result["scale_up"] = scale_up_report(calculator, frames, read_frames(args.scale_up))
    if args.json:
        print(json.dumps(result))
        return 0
    rows = [
        ("energy", "meV/atom", result["energy_rmse_mev_atom"], result["energy_mae_mev_atom"]),
        ("force", "eV/Å", result["force_rmse_ev_a"], result["force_mae_ev_a"]),
        ("stress", "kbar", result["stress_rmse_kbar"], result["stress_mae_kbar"]),
    ]
    print(f"{result['n_frames']} frames")
    print(f"{'':8s} {'RMSE':>10s} {'MAE':>10s}")
    for name, unit, rmse, mae in rows:
        print(f"{name:8s} {_fmt(rmse, '10.4g')} {_fmt(mae, '10.4g')}  {unit}")
    print(f"Pearson r (energy per atom): {_fmt(result['energy_pearson_r'], '.4f')}")
    if args.scale_up:
        _print_scale_up(result["scale_up"])
    if plot is not None:
        print(f"parity plot: {plot}")
    return 0


def _print_scale_up(report: dict) -> None:
    small, large = report["small"], report["large"]
    print(f"scale-up: {small['n_atoms']} atoms -> {large['n_atoms']} atoms")
    for key, unit in (("energy_rmse_mev_atom", "meV/atom"), ("force_rmse_ev_a", "eV/Å")):
        ratio = report.get(f"{key}_ratio")
        print(f"  {key:22s} {_fmt(small.get(key), '10.4g')} -> {_fmt(large.get(key), '10.4g')} {unit}"
              + (f"  (x{ratio:.2f})" if ratio is not None else ""))


def _fmt(value, spec: str) -> str:
    if value is None:
        width = "".join(ch for ch in spec.split(".")[0] if ch.isdigit())
        return "n/a".rjust(int(width) if width else 0)
    return format(value, spec)
