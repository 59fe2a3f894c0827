"""The batch profile (min, opt, max windows per call) that every artifact is built and checked for.

TensorRT needs it for its optimisation profile, AOTInductor for the dynamic batch dimension's
range, and the loaders use `max` to split larger calls. Dense artifacts count images (tiles) per
call instead: swssl-infer runs one at a time, and a TensorRT profile for 256 tiles of 2496 px
would not fit in any GPU's memory, hence their default of one.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from swssl.export.errors import ExportError

DEFAULT_BATCH = "1,64,256"
DEFAULT_DENSE_BATCH = "1,1,1"


@dataclass(frozen=True)
class BatchProfile:
    min: int = 1
    opt: int = 64
    max: int = 256

    @classmethod
    def parse(cls, text: str) -> "BatchProfile":
        """'MIN,OPT,MAX' (e.g. 1,64,256); one number N means 1,N,N."""
        try:
            values = [int(part) for part in str(text).replace(" ", "").split(",")]
        except ValueError:
            raise ExportError(f"--batch must be MIN,OPT,MAX whole numbers (e.g. {DEFAULT_BATCH}), not {text!r}") from None
        if len(values) == 1:
            values = [1, values[0], values[0]]
        if len(values) != 3:
            raise ExportError(f"--batch must be MIN,OPT,MAX (e.g. {DEFAULT_BATCH}), not {text!r}")
        return cls(*values).validate()

    @classmethod
    def from_dict(cls, data: dict) -> "BatchProfile":
        return cls(int(data["min"]), int(data["opt"]), int(data["max"]))

    def validate(self) -> "BatchProfile":
        if not 1 <= self.min <= self.opt <= self.max:
            raise ExportError(f"batch profile needs 1 <= MIN <= OPT <= MAX, not {self.text}")
        return self

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @property
    def text(self) -> str:
        return f"{self.min},{self.opt},{self.max}"
