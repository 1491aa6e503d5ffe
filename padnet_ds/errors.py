"""The errors that mean "your input is wrong", as opposed to a bug or a crash.

Every one of them carries a message that names the setting, file (and line) or environment
variable at fault and says what would work. ``padnet-ds`` prints that message and exits with
status 2, without a traceback; on a multi-rank job the rank that found the problem exits at
once, so the launcher stops the others instead of leaving them in a collective.

``ConfigError`` (a setting, ``settings.py``) is one of them; the others are here so that every
layer can raise them.
"""
from __future__ import annotations


class InputError(ValueError):
    """Bad input from the user: a setting, a data file, a checkpoint, the launch environment."""


class DataError(InputError):
    """A data file that cannot be read as the config says (named with its line where there is one)."""


class CheckpointError(InputError):
    """A checkpoint (or export) folder or file that is incomplete, damaged or unsafe to load; names the file."""
