"""Structure similarity: RDF fingerprints (seed 001), space groups, matching, de-duplication."""

from xtalforge.similarity.matching import (
    Deduplicator,
    matches,
    structure_matcher,
    to_structure,
    unique,
)
from xtalforge.similarity.rdf import (
    element_pairs,
    pairwise_pearson,
    pearson_distance,
    rdf_batch,
    rdf_fingerprint,
)
from xtalforge.similarity.symmetry import SpacegroupInfo, spacegroup

__all__ = [
    "Deduplicator",
    "SpacegroupInfo",
    "element_pairs",
    "matches",
    "pairwise_pearson",
    "pearson_distance",
    "rdf_batch",
    "rdf_fingerprint",
    "spacegroup",
    "structure_matcher",
    "to_structure",
    "unique",
]
