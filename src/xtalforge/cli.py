"""The ``xtalforge`` command: parses arguments, calls one function, says where results went."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from xtalforge.errors import XtalforgeError

# Packages that contribute their own subcommands through ``register(subparsers)``.
_PLUGIN_COMMANDS = ("xtalforge.potentials.commands", "xtalforge.datasets.commands")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _limit_threads()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except XtalforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130


def _limit_threads() -> None:
    """One BLAS and one torch thread unless OMP_NUM_THREADS says otherwise.

    Our matrices are small (3×3 cell solves, per-atom networks): with two threads on a
    busy 2-core machine, OpenMP spin-waits made SevenNet-0 single points 8× slower and
    ASE's Frechet cell filter 4× slower.
    """
    import os

    if "OMP_NUM_THREADS" in os.environ:
        return
    import torch
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")
    torch.set_num_threads(1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xtalforge", description="Crystal structure prediction with machine-learned potentials.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generate(sub)
    _add_relax(sub)
    _add_search(sub)
    _add_report(sub)
    _add_oracles(sub)
    for module in _PLUGIN_COMMANDS:
        importlib.import_module(module).register(sub)
    return parser


def _version() -> str:
    from xtalforge import __version__

    return __version__


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate random candidate structures", description="Generate candidate structures under the default (or a config's) constraints.")
    p.add_argument("composition", help="e.g. Si8, Na4Cl4, Al2O3, Mg2SiO4")
    p.add_argument("-n", type=int, default=10, help="number of structures (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", choices=["symmetric", "random"], default="symmetric")
    p.add_argument("--formula-units", type=int, default=1)
    p.add_argument("--config", help="TOML file whose [structures] constraints to use")
    p.add_argument("-o", "--output", required=True, help="output file (extxyz, cif, traj, ...)")
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(args) -> int:
    from ase.io import write

    from xtalforge.config import StructuresConfig, load_config
    from xtalforge.structures.composition import Composition
    from xtalforge.structures.constraints import Constraints
    from xtalforge.structures.generate import generate_many

    if args.n < 1:
        raise XtalforgeError(f"-n must be at least 1, got {args.n}")
    settings = load_config(args.config).structures if args.config else StructuresConfig()
    composition = Composition.parse(args.composition, args.formula_units)
    constraints = Constraints.from_config(composition, settings)
    structures = generate_many(
        composition, constraints, args.n, args.seed, mode=args.mode, spacegroups=settings.spacegroups,
        max_attempts=settings.max_attempts, pyxtal_timeout_s=settings.pyxtal_timeout_s, cell=settings.cell,
    )
    write(args.output, structures)
    print(f"wrote {len(structures)} {composition} structures to {args.output}")
    return 0


def _add_relax(sub) -> None:
    p = sub.add_parser("relax", help="relax structures with an oracle", description="Relax positions and cell of every structure in a file with an oracle.")
    p.add_argument("input", help="structure file (extxyz, cif, ...); every frame is relaxed")
    p.add_argument("-o", "--output", required=True, help="output extxyz with relaxed structures")
    p.add_argument("--oracle", default="sevennet", help="oracle name or module:Class (default sevennet)")
    p.add_argument("--config", help="TOML file whose [oracle] and [relax] sections to use")
    p.add_argument("--validation", action="store_true", help="tight thresholds (0.02 eV/Å, 0.4 GPa)")
    p.add_argument("--pressure", type=float, default=0.0, help="external pressure in GPa")
    p.set_defaults(func=_cmd_relax)


def _cmd_relax(args) -> int:
    from ase.io import read, write
    from tqdm.auto import tqdm

    from xtalforge.config import OracleConfig, RelaxConfig, load_config
    from xtalforge.dynamics import relax_structure
    from xtalforge.oracles import build_oracle

    if args.config:
        cfg = load_config(args.config)
        oracle_cfg, relax_cfg = cfg.oracle, cfg.relax
    else:
        oracle_cfg, relax_cfg = OracleConfig(name=args.oracle), RelaxConfig()
    structures = _read_all(args.input, read)
    oracle = build_oracle(oracle_cfg)
    relaxed = []
    for i, atoms in enumerate(tqdm(structures, desc="relax", unit="structure")):
        result = relax_structure(atoms, oracle.calculator, relax_cfg, pressure_gpa=args.pressure, validation=args.validation)
        out = result.atoms
        out.info.update(index=i, relax_status=result.status, relax_steps=result.n_steps, energy_per_atom=result.energy_per_atom)
        if result.reason:
            out.info["relax_reason"] = result.reason
        relaxed.append(out)
        print(f"{i}: {result.status} E = {result.energy_per_atom} eV/atom in {result.n_steps} steps" + (f" ({result.reason})" if result.reason else ""))
    write(args.output, relaxed)
    print(f"wrote {len(relaxed)} structures to {args.output}; oracle calls: {oracle.calls}")
    return 0


def _read_all(path: str, read):
    if not Path(path).is_file():
        raise XtalforgeError(f"input file {path} not found")
    try:
        return read(path, index=":")
    except Exception as exc:
        raise XtalforgeError(f"cannot read structures from {path}: {exc}") from None


def _add_search(sub) -> None:
    p = sub.add_parser("search", help="run (or resume) a structure search", description="Run the search a TOML config describes; rerunning on the same --out resumes.")
    p.add_argument("config", help="TOML config (composition, seed, [oracle], [search], ...)")
    p.add_argument("--out", required=True, help="run directory (resumed when it already holds this run)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_search)


def _cmd_search(args) -> int:
    from xtalforge.config import load_config
    from xtalforge.search import run_search

    config = load_config(args.config)
    summary = run_search(config, args.out, progress=not args.no_progress)
    best = summary.get("best") or {}
    print(f"{summary['composition']}: {summary['n_candidates']} candidates, {summary['oracle_calls']} oracle calls, "
          f"{summary['wall_time_s']:.0f} s")
    if best:
        print(f"best: {best['energy_per_atom']:.4f} eV/atom, {best['spacegroup']} ({Path(args.out) / best['cif']})")
    if summary.get("target_found") is not None:
        print(f"target found: {summary['target_found']} (oracle calls to target: {summary['oracle_calls_to_target']})")
    print(f"results: {Path(args.out) / 'summary.json'}; report: xtalforge report {args.out}")
    return 0


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="write report.html and figures for a run", description="Write DIR/report.html (self-contained) and PNG figures.")
    p.add_argument("run_dir")
    p.set_defaults(func=_cmd_report)


def _cmd_report(args) -> int:
    from xtalforge.report import write_report

    if not (Path(args.run_dir) / "structures.db").exists():
        raise XtalforgeError(f"{args.run_dir} holds no run (no structures.db): run 'xtalforge search' first")
    path = write_report(args.run_dir)
    print(f"report: {Path(path).resolve()}")
    return 0


def _add_oracles(sub) -> None:
    p = sub.add_parser("oracles", help="list oracles and whether they are installed", description="List registered oracles.")
    p.set_defaults(func=_cmd_oracles)


def _cmd_oracles(args) -> int:
    from xtalforge.oracles import ORACLES

    for spec in ORACLES.values():
        state = "installed" if spec.installed else f"missing (pip install 'xtalforge[{spec.extra}]')" if spec.extra else "missing"
        print(f"{spec.name:10s} {state:40s} {spec.description}")
    print("module:Class  any ASE calculator by import path, with [oracle.settings] as keyword arguments")
    return 0


if __name__ == "__main__":
    sys.exit(main())
