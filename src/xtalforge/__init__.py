"""xtalforge: crystal structure prediction with machine-learned potentials."""

from xtalforge.errors import XtalforgeError
from xtalforge.structures.composition import Composition

__version__ = "0.1.0"
__all__ = ["Composition", "XtalforgeError", "__version__"]
