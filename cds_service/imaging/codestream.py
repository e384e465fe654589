"""Read what a compressed frame claims (size, components, precision) before any decoder
allocates memory.

JPEG (ISO 10918-1, incl. lossless) and JPEG-LS (ISO 14495-1) put it in the SOF segment
(P, Y, X, Nf), JPEG 2000 (ISO 15444-1) in the SIZ segment right after the start of the
codestream (Xsiz, Ysiz, offsets, Csiz, Ssiz per component), optionally inside a JP2 'jp2c'
box. Other frames (RLE) are not inspected.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}  # SOFn and JPEG-LS SOF55
_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"
_SCAN_LIMIT = 1 << 20


@dataclass(frozen=True)
class FrameHeader:
    """What a compressed frame's own header declares."""

    rows: int
    columns: int
    components: int
    precision: int  # bits per sample (the largest over the components)


def frame_header(frame: bytes) -> FrameHeader | None:
    """The header a compressed frame declares, or None when no header is recognised."""
    if frame.startswith(b"\xff\xd8"):
        return _jpeg_header(frame)
    if frame.startswith(_J2K_SOC_SIZ):
        return _j2k_header(frame, 4)
    if frame[4:8] == b"jP  ":  # JP2 file format: the codestream is in the 'jp2c' box
        box = frame.find(b"jp2c" + _J2K_SOC_SIZ, 0, _SCAN_LIMIT)
        return _j2k_header(frame, box + 8) if box >= 0 else None
    return None


def claimed_size(frame: bytes) -> tuple[int, int] | None:
    """(rows, columns) a compressed frame declares, or None when no header is recognised."""
    header = frame_header(frame)
    return (header.rows, header.columns) if header is not None else None


def _jpeg_header(frame: bytes) -> FrameHeader | None:
    pos = 2
    while pos + 4 <= min(len(frame), _SCAN_LIMIT):
        if frame[pos] != 0xFF:
            return None
        marker = frame[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        (length,) = struct.unpack_from(">H", frame, pos + 2)
        if marker in _JPEG_SOF:
            # Lf(2) P(1) Y(2) X(2) Nf(1)
            if pos + 10 > len(frame):
                return None
            precision, rows, columns, components = struct.unpack_from(">BHHB", frame, pos + 4)
            return FrameHeader(rows, columns, components, precision)
        if length < 2:
            return None
        pos += 2 + length
    return None


def _j2k_header(frame: bytes, siz: int) -> FrameHeader | None:
    # Lsiz(2) Rsiz(2) Xsiz(4) Ysiz(4) XOsiz(4) YOsiz(4) XTsiz(4) YTsiz(4) XTOsiz(4) YTOsiz(4)
    # Csiz(2), then Ssiz(1) XRsiz(1) YRsiz(1) per component
    if siz + 38 > len(frame):
        return None
    xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">IIII", frame, siz + 4)
    (components,) = struct.unpack_from(">H", frame, siz + 36)
    if components == 0:
        return None
    ssiz = frame[siz + 38 : siz + 38 + 3 * components : 3]  # those inside the frame
    precision = max(((s & 0x7F) + 1 for s in ssiz), default=0)
    return FrameHeader(max(ysiz - yosiz, 0), max(xsiz - xosiz, 0), components, precision)
