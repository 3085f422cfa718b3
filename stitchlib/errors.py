"""Error types. Library code raises these (or returns them as values); only serving's HTTP layer (the
ingress) and the CLI turn them into status codes and exit codes."""


class StitchError(Exception):
    """Base class of every error stitchlib raises on purpose."""


class AnchorError(StitchError):
    """An anchor cannot be loaded, or two anchors cannot be paired."""


class PaletteError(StitchError):
    """A palette directory is missing, corrupt, or does not match the anchors."""


class DataError(StitchError):
    """A data file is missing, malformed or empty."""


class BudgetError(StitchError):
    """An X-Compute-Budget header does not follow the grammar."""
