"""Is a frame like the training images? The out-of-domain warning of `swssl-infer`.

An encoder trained on mammograms still returns a score for a 128 x 128 CT slice stretched 8x to
the training size; nothing in that number says it is meaningless. So the bank records what its
training images were like (`Domain`: size, aspect ratio, bit depth and intensity of each), and
every scored frame is compared with that: a frame far outside gets a `warning` (in its row and
in the gallery) and is still scored. "Far" is, per property:

- height or width below half the smallest, or above twice the largest training image's;
- aspect ratio (height / width) more than 25 % outside the training images' range;
- a bit depth no training image had;
- mean or median intensity (of the frame scaled to [0, 1] as the run reads images) outside the
  training range widened by half its width on each side (at least 0.1). Both move little with a
  lesion (a bright mass of 2 % of the image moves the 99th percentile, not these), so an anomaly
  is not taken for another domain.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

SIZE_FACTOR = 2.0
ASPECT_FACTOR = 1.25
INTENSITY_MARGIN = 0.1


@dataclass(frozen=True)
class FrameStats:
    """What the domain check compares of one frame."""

    height: int  # source pixels
    width: int
    bits: int  # significant bits per stored sample
    mean: float  # intensity in [0, 1], as the run reads images
    median: float

    @classmethod
    def of(cls, shape: tuple[int, int], bits: int, image: np.ndarray) -> "FrameStats":
        """The stats of a frame of source `shape` and `bits` from its pixels (any resized copy) in [0, 1]."""
        return cls(int(shape[0]), int(shape[1]), int(bits), float(image.mean()), float(np.median(image)))


@dataclass(frozen=True)
class Domain:
    """The ranges of the training images' FrameStats (what the bank's metadata keeps)."""

    height: tuple[int, int]
    width: tuple[int, int]
    aspect: tuple[float, float]
    bits: tuple[int, ...]
    mean: tuple[float, float]
    median: tuple[float, float]
    images: int

    @classmethod
    def of(cls, stats: list[FrameStats]) -> "Domain":
        def span(values: list[float]) -> tuple[float, float]:
            return min(values), max(values)

        return cls(span([s.height for s in stats]), span([s.width for s in stats]),
                   span([s.height / s.width for s in stats]), tuple(sorted({s.bits for s in stats})),
                   span([s.mean for s in stats]), span([s.median for s in stats]), len(stats))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Domain":
        return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in data.items()})

    def warning(self, frame: FrameStats) -> str:
        """'' for a frame like the training images, else what differs, on one line."""
        found = []
        (h0, h1), (w0, w1) = self.height, self.width
        if not (h0 / SIZE_FACTOR <= frame.height <= h1 * SIZE_FACTOR
                and w0 / SIZE_FACTOR <= frame.width <= w1 * SIZE_FACTOR):
            found.append(f"size {frame.height} x {frame.width} px (training images {_range(self.height)} x "
                         f"{_range(self.width)})")
        aspect = frame.height / frame.width
        if not self.aspect[0] / ASPECT_FACTOR <= aspect <= self.aspect[1] * ASPECT_FACTOR:
            found.append(f"aspect ratio {aspect:.2f} (training {_range(self.aspect, '.2f')})")
        if frame.bits not in self.bits:
            found.append(f"{frame.bits}-bit samples (training {'/'.join(map(str, self.bits))}-bit)")
        for name, value, span in (("mean intensity", frame.mean, self.mean),
                                  ("median intensity", frame.median, self.median)):
            margin = max(INTENSITY_MARGIN, (span[1] - span[0]) / 2)
            if not span[0] - margin <= value <= span[1] + margin:
                found.append(f"{name} {value:.2f} (training {_range(span, '.2f')})")
        return "unlike the training images: " + "; ".join(found) + "; the score may mean little" if found else ""


def _range(span: tuple[float, float], spec: str = "g") -> str:
    low, high = (format(v, spec) for v in span)
    return low if low == high else f"{low}-{high}"
