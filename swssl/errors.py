"""The toolkit's own exceptions: one line each, naming the file and the problem.

Exit statuses, the same for every command: 0 all done; 1 some input failed (an image, a dataset,
a checkpoint or bank that cannot be used); 2 a usage or environment error (a bad option, a missing
package or GPU, an output that cannot be written, a folder another run holds); 130 interrupted.
"""
from __future__ import annotations

from pathlib import Path


class SwsslError(Exception):
    """An error the command line prints as one line, without a traceback, then exits with `exit_code`."""

    exit_code = 1


class ImageReadError(SwsslError):
    """An image that cannot be read: unreadable, corrupt or of an unsupported kind."""

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class DatasetError(SwsslError):
    """A data folder or manifest that does not describe a usable dataset."""


class ConfigError(SwsslError):
    """A configuration value, option or file that cannot be used (a usage error)."""

    exit_code = 2


class OutputError(SwsslError):
    """An output that cannot be written (disk full, unwritable folder) or a folder another run holds."""

    exit_code = 2


class WeightsError(SwsslError):
    """Backbone weights that cannot be obtained or do not fit the backbone."""


class CheckpointError(SwsslError):
    """A checkpoint that is missing, corrupt, or does not fit the run."""
