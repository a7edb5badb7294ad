"""Registry of reference calculators ("oracles"): name -> builder of an ASE calculator.

Every builder takes the ``[oracle] settings`` table as keyword arguments. Any other
ASE calculator is reachable as ``"module:Class"``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ase.calculators.calculator import Calculator

from xtalforge.errors import OracleError


@dataclass(frozen=True)
class OracleSpec:
    name: str
    description: str
    requires: str  # importable module that must be present
    build: Callable[..., Calculator]
    extra: str | None = None  # pip extra that installs it

    @property
    def installed(self) -> bool:
        return importlib.util.find_spec(self.requires) is not None


def _sevennet(model: str = "7net-0", device: str = "cpu", **kwargs: Any) -> Calculator:
    from sevenn.calculator import SevenNetCalculator

    return SevenNetCalculator(model, device=device, **kwargs)


def _chgnet(**kwargs: Any) -> Calculator:
    from chgnet.model.dynamics import CHGNetCalculator

    return CHGNetCalculator(**kwargs)


def _gpaw(
    ecut: float = 400.0,
    kpoint_density: float = 3.0,
    smearing: float = 0.05,
    xc: str = "PBE",
    maxiter: int = 200,
    txt: str | None = None,
    **kwargs: Any,
) -> Calculator:
    """Plane-wave PBE. ``kpoint_density`` is k-points per Å⁻¹ (ASE's ``kpts={"density": …}``)."""
    from gpaw import GPAW, PW, FermiDirac

    _ensure_gpaw_setups()
    return GPAW(
        mode=PW(ecut),
        xc=xc,
        kpts={"density": kpoint_density, "gamma": True},
        occupations=FermiDirac(smearing),
        maxiter=maxiter,
        txt=txt,
        **kwargs,
    )


def _ensure_gpaw_setups() -> None:
    if os.environ.get("GPAW_SETUP_PATH"):
        return
    for candidate in ("/usr/share/gpaw-setups", "/usr/share/gpaw-data"):
        if Path(candidate).is_dir():
            os.environ["GPAW_SETUP_PATH"] = candidate
            return
    raise OracleError(
        "GPAW PAW setups not found: install Debian's gpaw-data (make test-dft) or set GPAW_SETUP_PATH"
    )


def _stillinger_weber(**kwargs: Any) -> Calculator:
    from matscipy.calculators.manybody import Manybody
    from matscipy.calculators.manybody.explicit_forms.stillinger_weber import (
        StillingerWeber,
        Stillinger_Weber_PRB_31_5262_Si,
    )

    params = dict(Stillinger_Weber_PRB_31_5262_Si)
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise TypeError(f"unknown Stillinger-Weber parameter {unknown[0]!r} (known: {', '.join(params)})")
    params.update(kwargs)
    return Manybody(**StillingerWeber(params))


def _emt(**kwargs: Any) -> Calculator:
    from ase.calculators.emt import EMT

    return EMT(**kwargs)


def _lj(sigma: float = 2.0, epsilon: float = 1.0, rc: float | None = None, smooth: bool = True, **kwargs: Any) -> Calculator:
    from ase.calculators.lj import LennardJones

    return LennardJones(sigma=sigma, epsilon=epsilon, rc=rc or 3.0 * sigma, smooth=smooth, **kwargs)


ORACLES: dict[str, OracleSpec] = {
    spec.name: spec
    for spec in [
        OracleSpec("sevennet", "SevenNet-0 universal potential (weights ship in the sevenn wheel)", "sevenn", _sevennet),
        OracleSpec("chgnet", "CHGNet universal potential", "chgnet", _chgnet, extra="chgnet"),
        OracleSpec("gpaw", "GPAW plane-wave PBE DFT", "gpaw", _gpaw, extra="dft"),
        OracleSpec("sw", "Stillinger-Weber silicon (matscipy), for fast tests", "matscipy", _stillinger_weber),
        OracleSpec("emt", "ASE effective-medium theory (Al, Cu, Ag, Au, Ni, Pd, Pt, H, C, N, O)", "ase", _emt),
        OracleSpec("lj", "ASE Lennard-Jones (sigma, epsilon, rc settings)", "ase", _lj),
    ]
}


def build_calculator(name: str, settings: dict[str, Any] | None = None) -> Calculator:
    """Build the ASE calculator named ``name`` (registry name or ``module:Class``)."""
    settings = dict(settings or {})
    if ":" in name:
        return _from_import_path(name, settings)
    spec = ORACLES.get(name)
    if spec is None:
        raise OracleError(
            f"unknown oracle {name!r}: choose one of {', '.join(ORACLES)} or give 'module:Class' of an ASE calculator"
        )
    if not spec.installed:
        hint = f"pip install 'xtalforge[{spec.extra}]'" if spec.extra else f"pip install {spec.requires}"
        raise OracleError(f"oracle {name!r} needs the {spec.requires!r} package: {hint}")
    try:
        return spec.build(**settings)
    except TypeError as exc:
        raise OracleError(f"oracle {name!r}: bad [oracle.settings] ({exc})") from None


def _from_import_path(path: str, settings: dict[str, Any]) -> Calculator:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
        cls = getattr(module, attr)
    except (ImportError, AttributeError) as exc:
        raise OracleError(f"cannot import oracle {path!r} ({exc}): check the 'module:Class' path") from None
    try:
        calc = cls(**settings)
    except Exception as exc:  # user classes raise anything on bad settings
        raise OracleError(f"oracle {path!r} could not be constructed with settings {settings}: {exc}") from None
    if not hasattr(calc, "get_potential_energy") and not hasattr(calc, "calculate"):
        raise OracleError(f"{path!r} is not an ASE calculator (no calculate/get_potential_energy)")
    return calc
