"""Error types: every user-facing failure is one line naming the problem and the fix."""


class XtalforgeError(Exception):
    """Base class for errors a user can act on (bad input, impossible settings)."""


class ConfigError(XtalforgeError):
    """A configuration file or value is invalid."""


class CompositionError(XtalforgeError, ValueError):
    """A chemical composition cannot be parsed or is out of range."""


class ConstraintError(XtalforgeError):
    """Structure-generation constraints cannot be satisfied."""


class OracleError(XtalforgeError):
    """An oracle (reference calculator) is unknown, missing or misconfigured."""


class CheckpointError(XtalforgeError):
    """A run directory or model file is corrupt or incompatible."""
