"""What kind of image a byte string holds, from its magic bytes (never from a URL's extension or a Content-Type a
server chose). Shared by the download stage and the HTTP server's image uploads."""
from __future__ import annotations

from typing import Optional

# (magic prefix, offset, format name as Pillow calls it)
_MAGIC = (
    (b"\xff\xd8\xff", 0, "JPEG"),
    (b"\x89PNG\r\n\x1a\n", 0, "PNG"),
    (b"GIF87a", 0, "GIF"),
    (b"GIF89a", 0, "GIF"),
    (b"WEBP", 8, "WEBP"),  # RIFF....WEBP
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
    (b"BM", 0, "BMP"),
)


def sniff_format(data: bytes) -> Optional[str]:
    for magic, offset, name in _MAGIC:
        if data[offset:offset + len(magic)] == magic:
            if name == "WEBP" and data[:4] != b"RIFF":
                continue
            return name
    return None
