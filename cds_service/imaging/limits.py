"""Limits on what the imaging layer will fetch and decode (settings can change them)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
# 40 Mpixel per frame is ~6300 x 6300: larger than any chest detector in use.
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_FRAMES = 2_000


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_frames: int = DEFAULT_MAX_FRAMES
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if min(self.max_bytes, self.max_pixels, self.max_frames) <= 0:
            raise ValueError("image limits must be positive")
        if self.connect_timeout_s <= 0 or self.read_timeout_s <= 0:
            raise ValueError("timeouts must be positive")

    @property
    def timeout(self) -> tuple[float, float]:
        return (self.connect_timeout_s, self.read_timeout_s)


DEFAULT_LIMITS = ImageLimits()
