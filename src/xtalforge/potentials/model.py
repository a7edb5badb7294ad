"""Behler–Parrinello network: symmetry functions → per-element PCA whitening → per-element MLP.

E = Σ_i [e_ref(Z_i) + NN_{Z_i}(W_{Z_i} (G_i - μ_{Z_i}))] + E_ZBL (seed 000 II.B, seed 003 sec. 2).

Forces and stress come from one gradient of the network energies with respect to the
per-atom moments A of the descriptor (written out by hand for prediction, autograd when
training needs gradients to the weights), which
:meth:`SymmetryFunctions.slot_gradients` turns into dE/d(pair vector) analytically; forces
and the virial are then sums over pairs.  This equals autograd with respect to positions
and a strain (SchNetPack's ``response.py``) but lets all ensemble members share one pass
over the pairs, which is where the time goes.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from itertools import pairwise

import torch
from ase.data import atomic_numbers, chemical_symbols
from torch import nn

from xtalforge.potentials.descriptors import NeighbourGraph, SymmetryFunctions
from xtalforge.potentials.zbl import switched_zbl

ACTIVATIONS = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "silu": nn.SiLU, "softplus": nn.Softplus}


class ElementNetwork(nn.Module):
    """MLP for one element: whitened features → atomic energy, plus the last hidden layer."""

    def __init__(self, n_inputs: int, hidden_layers, activation: str = "tanh", generator: torch.Generator | None = None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}: choose one of {', '.join(ACTIVATIONS)}")
        sizes = [n_inputs, *hidden_layers]
        self.hidden = nn.ModuleList(nn.Linear(a, b, dtype=torch.float64) for a, b in pairwise(sizes))
        self.activation = ACTIVATIONS[activation]()
        self.output = nn.Linear(sizes[-1], 1, dtype=torch.float64)
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """LeCun-normal weights from ``generator`` (never the global RNG), zero biases."""
        for layer in [*self.hidden, self.output]:
            fan_in = layer.weight.shape[1]
            noise = torch.randn(layer.weight.shape, generator=generator, dtype=torch.float64)
            layer.weight.copy_(noise / fan_in**0.5)
            layer.bias.zero_()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x
        for layer in self.hidden:
            h = self.activation(layer(h))
        return self.output(h).squeeze(-1), h


@dataclass
class MemberOutputs:
    """Raw outputs of M models on one graph (leading dimension M)."""

    energy: torch.Tensor  # (M, S)
    atomic_energies: torch.Tensor  # (M, N)
    forces: torch.Tensor | None = None  # (M, N, 3)
    stress: torch.Tensor | None = None  # (M, S, 3, 3)
    hidden: torch.Tensor | None = None  # (M, N, H) last hidden layer


class BPNN(nn.Module):
    """One Behler–Parrinello neural network potential.

    Buffers hold everything fitted before training (stored in model files): per-element
    feature mean and whitening matrix, reference energies, and the ZBL onset distances.
    """

    def __init__(
        self,
        elements,
        descriptor: SymmetryFunctions | None = None,
        hidden_layers=(30, 30),
        activation: str = "silu",
        *,
        zbl: bool = True,
        zbl_switch_width: float = 0.5,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        symbols = [chemical_symbols[e] if isinstance(e, int) else str(e) for e in elements]
        unknown = [s for s in symbols if s not in atomic_numbers]
        if unknown or not symbols:
            raise ValueError(f"elements must be chemical symbols, got {list(elements)}")
        self.elements: list[str] = sorted(set(symbols), key=lambda s: atomic_numbers[s])
        self.descriptor = descriptor or SymmetryFunctions()
        self.hidden_layers = [int(h) for h in hidden_layers]
        self.activation = activation
        self.zbl = bool(zbl)
        self.zbl_switch_width = float(zbl_switch_width)
        n_el, n_feat = len(self.elements), self.descriptor.n_features(len(self.elements))
        self.networks = nn.ModuleList(
            ElementNetwork(n_feat, self.hidden_layers, activation, generator) for _ in self.elements
        )
        lookup = torch.full((len(chemical_symbols),), -1, dtype=torch.long)
        numbers = [atomic_numbers[s] for s in self.elements]
        lookup[numbers] = torch.arange(n_el)
        self.register_buffer("element_lookup", lookup)
        self.register_buffer("element_numbers", torch.tensor(numbers, dtype=torch.long))
        self.register_buffer("feature_mean", torch.zeros(n_el, n_feat, dtype=torch.float64))
        self.register_buffer("feature_transform", torch.eye(n_feat, dtype=torch.float64).repeat(n_el, 1, 1))
        self.register_buffer("reference_energies", torch.zeros(n_el, dtype=torch.float64))
        # Shortest distance per element pair in the training data; ZBL acts only below it.
        self.register_buffer("zbl_onset", torch.zeros(n_el, n_el, dtype=torch.float64))
        self.metrics: dict = {}
        self.config: dict = {}

    # -- shared API with Ensemble

    @property
    def members(self) -> list[BPNN]:
        return [self]

    @property
    def dtype(self) -> torch.dtype:
        return self.feature_mean.dtype

    @property
    def device(self) -> torch.device:
        return self.feature_mean.device

    @property
    def n_features(self) -> int:
        return self.descriptor.n_features(len(self.elements))

    @property
    def n_hidden_features(self) -> int:
        return self.hidden_layers[-1]

    def as_ensemble(self):
        from xtalforge.potentials.ensemble import Ensemble

        return Ensemble([self])

    def predict(self, batch, stress: bool = True, features: bool = False):
        """Energy, forces, stress (and features) of a batch; ensemble fields are zero."""
        return self.as_ensemble().predict(batch, stress=stress, features=features)

    def predict_atoms(self, atoms_list, stress: bool = True, features: bool = False, batch_size: int | None = None):
        return self.as_ensemble().predict_atoms(atoms_list, stress=stress, features=features, batch_size=batch_size)

    def atomic_features(self, batch):
        return self.as_ensemble().atomic_features(batch)

    def calculator(self):
        return self.as_ensemble().calculator()

    def save(self, path) -> None:
        self.as_ensemble().save(path)

    # -- fitted preprocessing

    @torch.no_grad()
    def set_whitening(self, mean: torch.Tensor, transform: torch.Tensor) -> None:
        self.feature_mean.copy_(mean)
        self.feature_transform.copy_(transform)

    @torch.no_grad()
    def set_reference_energies(self, energies) -> None:
        self.reference_energies.copy_(torch.as_tensor(energies, dtype=self.reference_energies.dtype))

    @torch.no_grad()
    def set_zbl_onset(self, distances) -> None:
        self.zbl_onset.copy_(torch.as_tensor(distances, dtype=self.zbl_onset.dtype))

    # -- evaluation

    def graph(self, batch) -> NeighbourGraph:
        from xtalforge.potentials.descriptors import build_graph

        return build_graph(batch, self.descriptor.cutoff, self.element_lookup.cpu(), len(self.elements), dtype=self.dtype).to(self.device)

    def atomic_outputs(self, features: torch.Tensor, groups, inverse) -> tuple[torch.Tensor, torch.Tensor]:
        """Atomic energies (N,) including reference energies, and last hidden layers (N, H)."""
        if len(self.networks) == 1:  # one element: no regrouping
            energy, h = self.networks[0]((features - self.feature_mean[0]) @ self.feature_transform[0])
            return energy + self.reference_energies[0], h
        energies, hidden = [], []
        for e, (idx, net) in enumerate(zip(groups, self.networks)):
            x = (features[idx] - self.feature_mean[e]) @ self.feature_transform[e]
            energy, h = net(x)
            energies.append(energy + self.reference_energies[e])
            hidden.append(h)
        return torch.cat(energies)[inverse], torch.cat(hidden)[inverse]

    def zbl_terms(self, graph: NeighbourGraph, r: torch.Tensor | None = None):
        """ZBL energy per structure (S,) and dE/dvec per slot (n, W, 3); None when no pair is
        closer than its onset (the usual case, detected with one reduction)."""
        if not self.zbl:
            return None
        max_onset = float(self.zbl_onset.max())
        vec = graph.vec.detach()
        if r is None:
            r = torch.linalg.vector_norm(vec, dim=-1)
        if max_onset <= 0.0 or r.numel() == 0 or float(r.min()) >= max_onset:
            return None
        slot_element = graph.slot_element()
        onset = self.zbl_onset[graph.element][:, slot_element]  # (n, W)
        close = torch.nonzero(r < onset, as_tuple=True)
        if close[0].numel() == 0:
            return None
        z_i = self.element_numbers[graph.element[close[0]]]
        z_j = self.element_numbers[slot_element[close[1]]]
        r_close = r[close]
        energy, denergy = switched_zbl(r_close, z_i, z_j, onset[close], self.zbl_switch_width)
        # Every pair is listed from both ends: half of the pair energy per slot.
        per_system = energy.new_zeros(graph.n_systems).index_add_(0, graph.system_idx[close[0]], 0.5 * energy)
        grads = torch.zeros_like(vec)
        grads[close] = (0.5 * denergy / r_close)[:, None] * vec[close]
        return per_system, grads


# Atoms per chunk in prediction: keeps the per-slot arrays (~60 numbers × 45 neighbours per atom)
# in cache, which matters more on CPU than the per-operation overhead of more, smaller chunks.
CHUNK_ATOMS = 512


class StackedNetworks:
    """The element networks of several members with identical layer sizes, as stacked weights.

    One batched matrix product per layer and element evaluates all members at once (instead
    of a Python loop over members); the PCA whitening matrix is folded into the first layer
    (the mean is still subtracted first: symmetry functions of ~100 minus a mean of ~100 would
    lose digits after a large whitening matrix) and the reference energy into the output bias.  Built from the members' current parameters:
    differentiable with respect to them when built with gradients enabled (training).
    """

    def __init__(self, members: list[BPNN]):
        first = members[0]
        self.activation = first.networks[0].activation
        self.layers = []  # per element: [(weight (M, in, out), bias (M, 1, out)), ...]
        self.means = []  # per element: feature mean (M, 1, F)
        for e in range(len(first.elements)):
            nets = [m.networks[e] for m in members]
            transform = torch.stack([m.feature_transform[e] for m in members])  # (M, F, F)
            mean = torch.stack([m.feature_mean[e] for m in members])[:, None]  # (M, 1, F)
            w1 = torch.stack([n.hidden[0].weight for n in nets]).transpose(1, 2)  # (M, F, H)
            layers = [(transform @ w1, torch.stack([n.hidden[0].bias for n in nets])[:, None])]
            self.means.append(mean)
            for k in range(1, len(nets[0].hidden)):
                layers.append((torch.stack([n.hidden[k].weight for n in nets]).transpose(1, 2),
                               torch.stack([n.hidden[k].bias for n in nets])[:, None]))
            out_bias = torch.stack([n.output.bias + m.reference_energies[e] for n, m in zip(nets, members)])
            layers.append((torch.stack([n.output.weight for n in nets]).transpose(1, 2), out_bias[:, None]))
            self.layers.append(layers)

    def __call__(self, features: torch.Tensor, element: int, gradient: bool = False):
        """Atomic energies (M, n) and last hidden layers (M, n, H) of features (M, n, F), and
        with ``gradient`` dE_i/dG_i (M, n, F) by hand (backpropagation through the layers
        without autograd's bookkeeping, which costs more than the arithmetic at these sizes)."""
        *hidden, (w_out, b_out) = self.layers[element]
        h = features - self.means[element]
        slopes = []
        for w, b in hidden:
            if gradient:
                h, slope = _activation_with_slope(self.activation, torch.baddbmm(b, h, w))
                slopes.append(slope)
            else:
                h = self.activation(torch.baddbmm(b, h, w))
        energy = torch.baddbmm(b_out, h, w_out).squeeze(-1)
        if not gradient:
            return energy, h
        grad = w_out.transpose(1, 2)  # (M, 1, H): dE/dh of the last hidden layer, the same for every atom
        for (w, _), slope in zip(reversed(hidden), reversed(slopes)):
            grad = torch.bmm(slope * grad, w.transpose(1, 2))
        return energy, h, grad.expand(-1, features.shape[1], -1)


def _activation_with_slope(activation: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """activation(x) and its derivative, each from the cheapest quantity at hand."""
    if isinstance(activation, nn.SiLU):
        sigmoid = torch.sigmoid(x)
        out = x * sigmoid
        return out, torch.addcmul(sigmoid + out, out, sigmoid, value=-1.0)  # σ + x σ (1 - σ)
    if isinstance(activation, nn.Tanh):
        out = torch.tanh(x)
        return out, torch.addcmul(torch.ones_like(out), out, out, value=-1.0)
    if isinstance(activation, nn.Sigmoid):
        out = torch.sigmoid(x)
        return out, out - out * out
    if isinstance(activation, nn.Softplus):
        out = activation(x)
        beta, threshold = activation.beta, activation.threshold
        return out, torch.where(x * beta > threshold, 1.0, torch.sigmoid(x * beta))
    raise TypeError(f"no derivative for activation {type(activation).__name__}")


def _parameter_key(members) -> tuple:
    """Changes whenever a tensor the stacks are built from changes (in place or replaced)."""
    return tuple(
        (t.data_ptr(), t._version, t.dtype)
        for m in members
        for t in (*m.networks.parameters(), m.feature_mean, m.feature_transform, m.reference_energies)
    )


def stacked_networks(members: list[BPNN], differentiable: bool) -> list[tuple[list[int], StackedNetworks]]:
    """Members grouped by architecture, each group's networks stacked.

    Without gradients (prediction) the stacks are cached on the first member until any
    parameter changes, so repeated calls (one per relaxation step) do not rebuild them.
    """
    if differentiable:
        return _build_stacks(members)
    first = members[0]
    key = (tuple(id(m) for m in members), _parameter_key(members))
    cached = getattr(first, "_stack_cache", None)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, _build_stacks(members))
        first._stack_cache = cached
    return cached[1]


def _build_stacks(members) -> list[tuple[list[int], StackedNetworks]]:
    groups: dict = {}
    for k, m in enumerate(members):
        groups.setdefault((tuple(m.hidden_layers), m.activation), []).append(k)
    return [(idx, StackedNetworks([members[k] for k in idx])) for idx in groups.values()]


def evaluate_members(
    members: list[BPNN],
    graph: NeighbourGraph,
    *,
    forces: bool = True,
    stress: bool = True,
    hidden: bool = False,
    create_graph: bool = False,
    chunk_atoms: int | None = CHUNK_ATOMS,
) -> MemberOutputs:
    """Energies (and forces, stress, hidden features) of every member on one graph.

    All members share the descriptor and elements; the neighbour work (basis functions,
    moments, gradients with respect to the pair vectors) is done once for all of them.
    Atoms are processed in chunks of ``chunk_atoms`` (None: all at once).  Called with
    gradients disabled (``torch.no_grad()``), the results carry no graph to the parameters
    and the stacked member networks are reused between calls.
    """
    n_members, n_atoms = len(members), graph.n_atoms
    if n_atoms == 0:  # an empty batch: empty (or zero-energy) results of the right shapes
        empty = graph.vec.new_zeros
        return MemberOutputs(
            energy=empty(n_members, graph.n_systems), atomic_energies=empty(n_members, 0),
            forces=empty(n_members, 0, 3) if forces else None,
            stress=empty(n_members, graph.n_systems, 3, 3) if stress else None,
            hidden=empty(n_members, 0, members[0].hidden_layers[-1]) if hidden else None,
        )
    need_grad = forces or stress
    stacks = stacked_networks(members, differentiable=torch.is_grad_enabled() or create_graph)
    step = n_atoms if (chunk_atoms is None or create_graph) else max(1, int(chunk_atoms))
    atomic_parts, hidden_parts, own_parts, virial_parts = [], [], [], []
    neighbour_forces = zbl_energy = None
    for start in range(0, max(n_atoms, 1), step):
        sub = graph.atom_slice(start, min(start + step, n_atoms)) if step < n_atoms else graph
        atomic, slot_grad, hid, zbl = _chunk_outputs(members, stacks, sub, need_grad, hidden, create_graph)
        atomic_parts.append(atomic)
        if hidden:
            hidden_parts.append(hid)
        if zbl is not None:
            zbl_energy = zbl[0] if zbl_energy is None else zbl_energy + zbl[0]
            if slot_grad is not None:
                slot_grad = slot_grad + zbl[1].transpose(1, 2)[:, None]
        if slot_grad is None:
            continue
        n_sub, width = sub.n_atoms, sub.width
        if forces:
            # vec = r_j - r_i: the centre gets +dE/dvec, the neighbour -dE/dvec.
            own_parts.append(slot_grad.sum(-1))  # (n, M, 3)
            # Scatter along the last axis of (M·3, pairs): about twice as fast as rows of M·3.
            # (index_add with alpha != 1 takes a far slower path: subtract afterwards instead)
            by_pair = slot_grad.permute(1, 2, 0, 3).reshape(n_members * 3, n_sub * width)
            contribution = by_pair.new_zeros(n_members * 3, n_atoms).index_add(1, sub.neighbour.reshape(-1), by_pair)
            neighbour_forces = contribution if neighbour_forces is None else neighbour_forces + contribution
        if stress:
            # (n, M·3, 3): [m, b, a] = Σ_slots dE/dvec_b vec_a
            virial_parts.append(slot_grad.view(n_sub, n_members * 3, width) @ sub.vec.detach())
    atomic = torch.cat(atomic_parts, dim=1) if len(atomic_parts) > 1 else atomic_parts[0]
    energy = atomic.new_zeros(n_members, graph.n_systems).index_add(1, graph.system_idx, atomic)
    if zbl_energy is not None:
        energy = energy + zbl_energy
    out = MemberOutputs(energy=energy, atomic_energies=atomic)
    if hidden:
        out.hidden = torch.cat(hidden_parts, dim=1)
    if forces:
        own = torch.cat(own_parts) if len(own_parts) > 1 else own_parts[0]  # (N, M, 3)
        out.forces = own.transpose(0, 1) - neighbour_forces.view(n_members, 3, n_atoms).transpose(1, 2)
    if stress:
        # σ = (1/V) ∂E/∂ε = (1/V) Σ_slots vec ⊗ ∂E/∂vec (ASE sign: positive = tensile).
        per_atom = torch.cat(virial_parts) if len(virial_parts) > 1 else virial_parts[0]
        per_atom = per_atom.view(n_atoms, n_members, 3, 3).permute(1, 0, 3, 2).reshape(n_members, n_atoms, 9)
        virial = per_atom.new_zeros(n_members, graph.n_systems, 9).index_add(1, graph.system_idx, per_atom)
        out.stress = virial.view(n_members, graph.n_systems, 3, 3) / graph.volume[:, None, None]
    return out


def _network_outputs(stacks, features: torch.Tensor, groups, inverse, n_members: int, gradient: bool = False):
    """Atomic energies (M, n), last hidden layers (per member, (n, H)) and, with ``gradient``,
    dE/dG (M, n, F) of features (M, n, F), or (n, F) shared by all members."""
    shared = features.dim() == 2
    energies, hiddens, grads = [None] * n_members, [None] * n_members, [None] * n_members
    for idx, stack in stacks:
        if shared:
            x = features.expand(len(idx), *features.shape)
        else:
            x = features if len(idx) == n_members else features[idx]
        if inverse is None:
            outputs = stack(x, 0, gradient)
        else:
            parts = [stack(x.index_select(1, atoms), el, gradient) for el, atoms in enumerate(groups)]
            outputs = [torch.cat(p, dim=1).index_select(1, inverse) for p in zip(*parts)]
        for k, member in enumerate(idx):
            energies[member], hiddens[member] = outputs[0][k], outputs[1][k]
            if gradient:
                grads[member] = outputs[2][k]
    return torch.stack(energies), hiddens, (torch.stack(grads) if gradient else None)


def _chunk_outputs(members, stacks, graph: NeighbourGraph, need_grad: bool, hidden: bool, create_graph: bool):
    """Atomic energies (M, n), dE/dvec (n, M, 3, W) or None, last hidden layers (M', n, H) or
    None, and the ZBL terms of these atoms' pairs (or None)."""
    first = members[0]
    desc, n_el, n_members = first.descriptor, len(first.elements), len(members)
    groups, inverse = graph.atoms_by_element(n_el)
    if desc.angular == "g5" and not (torch.is_grad_enabled() or create_graph):
        # Prediction: dE/d(moments) by hand, through the stacked networks and the quadratic
        # features; no autograd graph at all.
        basis = desc.pair_basis(graph.vec, graph.segments)
        r = basis.r
        moments = desc.moments(basis)
        feats = desc.features_from_moments(moments)
        atomic, hiddens, feature_grad = _network_outputs(stacks, feats, groups, inverse, n_members, gradient=need_grad)
        slot_grad = desc.slot_gradients(desc.moment_gradients(moments, feature_grad), basis) if need_grad else None
    else:
        # Energies only: keep the caller's mode (training on energies needs their graph to the weights).
        with torch.enable_grad() if need_grad else nullcontext():
            if desc.angular == "g5":
                basis = desc.pair_basis(graph.vec, graph.segments)
                r = basis.r
                moments = desc.moments(basis)
                if need_grad:
                    moments_in = moments.expand(n_members, requires_grad=True)
                    feats = desc.features_from_moments(moments_in)
                else:
                    feats = desc.features_from_moments(moments)
            else:
                r = None
                vec = graph.vec.detach().requires_grad_(need_grad)
                feats = desc.triplet_features(graph.with_vec(vec), include_jk=True)
            atomic, hiddens, _ = _network_outputs(stacks, feats, groups, inverse, n_members)
            slot_grad = None
            if need_grad:
                if desc.angular == "g5":
                    grads = torch.autograd.grad(atomic.sum(), [moments_in.radial, moments_in.angular],
                                                create_graph=create_graph)
                    slot_grad = desc.slot_gradients(type(moments_in)(*grads), basis)
                else:
                    slot_grad = torch.stack([
                        # training (create_graph) backpropagates through this graph once more
                        torch.autograd.grad(atomic[k].sum(), vec, retain_graph=create_graph or k < n_members - 1,
                                            create_graph=create_graph)[0]
                        for k in range(n_members)
                    ], dim=1).transpose(2, 3)  # (n, M, 3, W)
    hid = None
    if hidden:
        # Members of another width (replicas) have incomparable hidden layers: use the first's width.
        width = hiddens[0].shape[-1]
        hid = torch.stack([h for h in hiddens if h.shape[-1] == width])
    zbl = first.zbl_terms(graph, None if r is None else r.detach())
    return atomic, slot_grad, hid, zbl
