"""``xtalforge dataset``: training sets from the composition alone, augmentation, coverage."""

from __future__ import annotations

from pathlib import Path

from xtalforge.errors import XtalforgeError


def register(subparsers) -> None:
    """Add the ``dataset`` command and its subcommands to the CLI."""
    parser = subparsers.add_parser(
        "dataset", help="build training sets (melt-quench MD, deformations) and check their coverage",
        description="Build NNP training sets from the composition alone and check what they cover.",
    )
    sub = parser.add_subparsers(dest="dataset_command", required=True, metavar="SUBCOMMAND")
    _add_meltquench(sub)
    _add_deform(sub)
    _add_coverage(sub)


# -- configuration ------------------------------------------------------------------


def load_dataset_config(path: str | Path):
    """The run config and its [meltquench] and [onthefly] sections."""
    from xtalforge.config import load_config

    config = load_config(path)
    return config, config.meltquench, config.onthefly


# -- meltquench ---------------------------------------------------------------------


def _add_meltquench(sub) -> None:
    p = sub.add_parser(
        "meltquench", help="melt-quench-anneal MD training set from the composition alone",
        description="Superheat a random cell, find an ad hoc melting temperature, adjust the volume to zero "
                    "pressure, run the liquid, quench and anneal; keep oracle-labelled frames. Rerunning on the "
                    "same --out resumes.",
    )
    p.add_argument("config", help="TOML config (composition, seed, [oracle], [structures], [meltquench], ...)")
    p.add_argument("--out", required=True, help="output directory (dataset.extxyz, meltquench.json, checkpoint/)")
    p.add_argument("--on-the-fly", action="store_true",
                   help="drive MD with an NNP ensemble and call the oracle only for uncertain frames ([onthefly])")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_meltquench)


def _cmd_meltquench(args) -> int:
    from xtalforge.datasets.meltquench import run_meltquench
    from xtalforge.oracles import build_oracle
    from xtalforge.structures.composition import Composition

    config, settings, onthefly = load_dataset_config(args.config)
    composition = Composition.parse(config.composition, config.formula_units)
    oracle = build_oracle(config.oracle)
    labeller = None
    if args.on_the_fly:
        from xtalforge.datasets.onthefly import OnTheFlyLabeller

        labeller = OnTheFlyLabeller(oracle, onthefly, potential=getattr(config, "potential", None),
                                    seed=config.seed, progress=not args.no_progress)
    write_resolved_config(Path(args.out), config, settings, onthefly if args.on_the_fly else None)
    result = run_meltquench(composition, settings, oracle, args.out, seed=config.seed, structures=config.structures,
                            labeller=labeller, progress=not args.no_progress)
    report = result.report
    phases = ", ".join(f"{k} {v}" for k, v in report["n_frames"].items())
    print(f"{report['composition']}: T_m = {report['melting_temperature_K']:.0f} K, "
          f"{report['volume_per_atom']:.2f} Å³/atom, {report['n_frames_total']} frames ({phases})")
    print(f"oracle calls: {report['oracle_calls']} for {report['md_steps']} MD steps, {report['wall_time_s']:.0f} s")
    for warning in report["warnings"]:
        print(f"warning: {warning}")
    print(f"dataset: {result.dataset_path}; report: {Path(args.out) / 'meltquench.json'}")
    return 0


def write_resolved_config(out: Path, config, settings, onthefly=None) -> Path:
    """``out/config.toml``: the run config with every default filled in, [meltquench] (and [onthefly]) included."""
    from xtalforge.config import dump_toml

    text = dump_toml(config)
    for name, section in (("meltquench", settings), ("onthefly", onthefly)):
        if section is not None and f"[{name}]" not in text:
            text += f"\n[{name}]\n" + dump_toml(section)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.toml"
    path.write_text(text)
    return path


# -- deform -------------------------------------------------------------------------


def _add_deform(sub) -> None:
    from xtalforge.datasets.deform import DEFORMATIONS

    p = sub.add_parser(
        "deform", help="elastic deformations of structures, labelled by the oracle",
        description="Hydrostatic, uniaxial and shear strains of every structure in the input files, labelled by "
                    "the oracle, as an extxyz to add to a training set (seed 000 section III.C).",
    )
    p.add_argument("input", nargs="+", help="structure files (cif, extxyz, ...); every frame is deformed")
    p.add_argument("--out", required=True, help="output extxyz")
    p.add_argument("--config", help="TOML file whose [oracle] section to use")
    p.add_argument("--oracle", default="sevennet", help="oracle name when no --config is given (default sevennet)")
    p.add_argument("--kinds", nargs="+", choices=DEFORMATIONS, default=list(DEFORMATIONS))
    p.add_argument("--max-strain", type=float, default=0.04, help="largest strain magnitude (default 0.04)")
    p.add_argument("--n-strains", type=int, default=4, help="strain amplitudes per kind and axis (default 4)")
    p.set_defaults(func=_cmd_deform)


def _cmd_deform(args) -> int:
    from ase.io import write

    from xtalforge.config import OracleConfig
    from xtalforge.datasets.deform import label_deformations
    from xtalforge.oracles import build_oracle

    if args.max_strain <= 0 or args.max_strain >= 0.5 or args.n_strains < 1:
        raise XtalforgeError("--max-strain must be in (0, 0.5) and --n-strains at least 1")
    oracle_config = load_dataset_config(args.config)[0].oracle if args.config else OracleConfig(name=args.oracle)
    structures = [atoms for path in args.input for atoms in read_structures(path)]
    oracle = build_oracle(oracle_config)
    frames, failures = label_deformations(structures, oracle, kinds=tuple(args.kinds), max_strain=args.max_strain,
                                          n_strains=args.n_strains)
    for line in failures:
        print(f"failed: {line}")
    if not frames:
        raise XtalforgeError("every deformed structure failed in the oracle: check the oracle and the inputs")
    write(args.out, frames, format="extxyz")
    print(f"wrote {len(frames)} deformed structures from {len(structures)} inputs to {args.out}; "
          f"oracle calls: {oracle.calls}")
    return 0


def read_structures(path: str | Path):
    """Every frame of a structure file, as a list of Atoms."""
    from ase.io import read

    if not Path(path).is_file():
        raise XtalforgeError(f"input file {path} not found")
    try:
        return read(path, index=":")
    except Exception as exc:  # ASE raises many types for unreadable files
        raise XtalforgeError(f"cannot read structures from {path}: {exc}") from None


# -- coverage -----------------------------------------------------------------------


def _add_coverage(sub) -> None:
    p = sub.add_parser(
        "coverage", help="PCA of descriptors (training set vs crystals) and NNP-vs-oracle energy correlation",
        description="Per-element PCA of symmetry-function vectors of a training set against a set of crystal "
                    "structures (seed 000 Fig. 3) and, with --model, the NNP-vs-oracle energy correlation over "
                    "those structures (Pearson r and RMSE within --window of the lowest; seed 000 Fig. 2).",
    )
    p.add_argument("--train", required=True, help="training set (extxyz)")
    p.add_argument("--structures", nargs="+", required=True,
                   help="crystal structures to compare (cif/extxyz; energies are taken from the file when present)")
    p.add_argument("--out", required=True, help="output directory (coverage_pca.png, correlation.png/json)")
    p.add_argument("--model", help="trained potential; enables the energy correlation")
    p.add_argument("--config", help="TOML file whose [oracle] labels structures without energies")
    p.add_argument("--oracle", default="sevennet", help="oracle name when no --config is given (default sevennet)")
    p.add_argument("--relax", action="store_true", help="relax the structures with the oracle first")
    p.add_argument("--window", type=float, default=0.2, help="eV/atom above the lowest for r and RMSE (default 0.2)")
    p.set_defaults(func=_cmd_coverage)


def _cmd_coverage(args) -> int:
    from xtalforge.config import OracleConfig
    from xtalforge.datasets.coverage import run_coverage

    oracle_config = load_dataset_config(args.config)[0].oracle if args.config else OracleConfig(name=args.oracle)
    training = read_structures(args.train)
    structures = []
    for path in args.structures:
        for atoms in read_structures(path):
            atoms.info.setdefault("name", Path(path).stem)
            structures.append(atoms)
    summary = run_coverage(training, structures, args.out, model_path=args.model, oracle_config=oracle_config,
                           relax=args.relax, window_ev=args.window)
    for line in summary.get("lines", []):
        print(line)
    print(f"results: {Path(args.out) / 'coverage.json'}")
    return 0
