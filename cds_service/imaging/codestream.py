"""Read the image size a compressed frame claims, before any decoder allocates memory.

JPEG (ISO 10918-1, incl. lossless) and JPEG-LS (ISO 14495-1) put it in the SOF segment,
JPEG 2000 (ISO 15444-1) in the SIZ segment right after the start of the codestream
(optionally inside a JP2 'jp2c' box). Other frames (RLE) are not inspected.
"""

from __future__ import annotations

import struct

_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}  # SOFn and JPEG-LS SOF55
_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"
_SCAN_LIMIT = 1 << 20


def claimed_size(frame: bytes) -> tuple[int, int] | None:
    """(rows, columns) a compressed frame declares, or None when no header is recognised."""
    if frame.startswith(b"\xff\xd8"):
        return _jpeg_size(frame)
    if frame.startswith(_J2K_SOC_SIZ):
        return _j2k_size(frame, 4)
    if frame[4:8] == b"jP  ":  # JP2 file format: the codestream is in the 'jp2c' box
        box = frame.find(b"jp2c" + _J2K_SOC_SIZ, 0, _SCAN_LIMIT)
        return _j2k_size(frame, box + 8) if box >= 0 else None
    return None


def _jpeg_size(frame: bytes) -> tuple[int, int] | None:
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
            if pos + 9 > len(frame):
                return None
            rows, columns = struct.unpack_from(">HH", frame, pos + 5)
            return rows, columns
        if length < 2:
            return None
        pos += 2 + length
    return None


def _j2k_size(frame: bytes, siz: int) -> tuple[int, int] | None:
    # Lsiz(2) Rsiz(2) Xsiz(4) Ysiz(4) XOsiz(4) YOsiz(4)
    if siz + 20 > len(frame):
        return None
    xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">IIII", frame, siz + 4)
    return max(ysiz - yosiz, 0), max(xsiz - xosiz, 0)
