"""Model files: ``torch.save`` of a plain dict (loadable with ``weights_only=True``).

The file holds everything needed to predict without the training data: format version,
elements, descriptor settings, per-member weights, PCA whitening, reference energies,
ZBL onsets, training metrics and the training configuration.
"""

from __future__ import annotations

from pathlib import Path

import torch

from xtalforge.errors import CheckpointError

FORMAT = "xtalforge-bpnn"
FORMAT_VERSION = 1


def save_model(model, path) -> Path:
    """Write an :class:`Ensemble` (or a single :class:`BPNN`) to ``path``."""
    from xtalforge import __version__

    ensemble = model.as_ensemble()
    first = ensemble.members[0]
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "xtalforge_version": __version__,
        "elements": list(ensemble.elements),
        "descriptor": first.descriptor.params(),
        "zbl": {"enabled": first.zbl, "switch_width": first.zbl_switch_width},
        "dtype": str(first.dtype).removeprefix("torch."),
        "members": [
            {
                "hidden_layers": list(m.hidden_layers),
                "activation": m.activation,
                "state_dict": {k: v.detach().cpu().clone() for k, v in m.state_dict().items()},
                "metrics": _plain(m.metrics),
            }
            for m in ensemble.members
        ],
        "metrics": _plain(ensemble.metrics),
        "config": _plain(ensemble.config),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # never leave a half-written model behind
    return path


def load_model(path, device: str = "cpu"):
    """Read a model file written by :func:`save_model`; returns an :class:`Ensemble`."""
    from xtalforge.potentials.descriptors import SymmetryFunctions
    from xtalforge.potentials.ensemble import Ensemble
    from xtalforge.potentials.model import BPNN

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file {path} not found: train one with `xtalforge train DATA --out {path}`")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- zip, pickle and EOF errors all mean the same to the user
        raise CheckpointError(f"model file {path} is corrupt or not an xtalforge model ({type(exc).__name__}): retrain it") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an xtalforge potential file: pass a model written by `xtalforge train`")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"model file {path} has format version {version}, this xtalforge reads version {FORMAT_VERSION}: "
            "retrain the model or use the xtalforge release that wrote it"
        )
    try:
        dtype = getattr(torch, payload.get("dtype", "float64"))
        descriptor_params = payload["descriptor"]
        members = []
        for entry in payload["members"]:
            model = BPNN(
                payload["elements"],
                SymmetryFunctions.from_params(descriptor_params),
                entry["hidden_layers"],
                entry["activation"],
                zbl=payload["zbl"]["enabled"],
                zbl_switch_width=payload["zbl"]["switch_width"],
            ).to(dtype)
            model.load_state_dict(entry["state_dict"])
            model.metrics = dict(entry.get("metrics", {}))
            model.config = dict(payload.get("config", {}))
            members.append(model.to(device))
        return Ensemble(members, metrics=dict(payload.get("metrics", {})), config=dict(payload.get("config", {})))
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise CheckpointError(f"model file {path} is corrupt ({type(exc).__name__}: {first_line}): retrain it") from None


def load(path, device: str = "cpu"):
    """The ASE calculator of a model file (``calc.ensemble`` is the :class:`Ensemble`)."""
    from xtalforge.potentials.calculator import NNPCalculator

    return NNPCalculator(load_model(path, device=device))


def _plain(value):
    """Metrics/config as plain Python values (safe for ``weights_only`` loading)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    return value
