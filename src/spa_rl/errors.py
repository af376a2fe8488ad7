"""One exception base for everything spa-rl raises on purpose.

The CLI turns any `SpaError` into a single line on stderr and exit code 2, so every message
must name the file, field or value at fault and, where there is one, the fix.
"""


class SpaError(Exception):
    """Base class: an error the user can act on (bad input, bad config, missing file)."""


class ConfigError(SpaError):
    """A config field has a bad value, or two fields do not fit together."""


class UnknownEnvError(SpaError):
    """An environment name that spa-rl does not know."""


class LevelFormatError(SpaError):
    """A level text or file that cannot be parsed; the message names line and column."""


class DataError(SpaError):
    """A dataset file or row that cannot be read."""


class CheckpointError(SpaError):
    """A checkpoint or model folder that is missing or incomplete."""
