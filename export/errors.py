"""The export stage's exceptions; all are SwsslErrors, printed as one line by the command line.

`MissingRequirement` is separate because the issue wants a distinct exit status (2) when the
machine lacks what an export needs (TensorRT, a GPU, an extra), as opposed to a failed export (1).
"""
from __future__ import annotations

from swssl.errors import SwsslError


class ExportError(SwsslError):
    """An export that cannot be made (bad batch profile, unsupported precision, a failed build)."""


class MissingRequirement(SwsslError):
    """Something this machine lacks: a package, a GPU, the run itself. The CLI exits with status 2."""

    exit_code = 2


class VerificationError(ExportError):
    """An artifact whose outputs differ from the PyTorch model's by more than its precision allows."""


class ArtifactMismatch(SwsslError):
    """An artifact that does not fit the run, the device or this machine, or whose bytes changed."""
