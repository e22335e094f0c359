"""The image of a session's pairing QR code, from what ``sessions.qr_code`` holds.

A gateway stores one of three things there (the column says "base64 or data
URL"):

- the text a WhatsApp client library hands over to be shown as a QR code
  (Baileys' ``qr`` event: ``2@...,...,...``): drawn here as an SVG with
  ``segno``;
- an image already drawn, as a ``data:image/...;base64,`` URL: shown as it is;
- an image already drawn, as bare base64 (a PNG, JPEG, GIF or WebP file):
  shown as the data URL of that file.

Every form ends as a ``data:`` URL for an ``<img>``: an image element runs no
script, so a stored value can never inject one into the page.
"""

from __future__ import annotations

import base64
import binascii
import re

_DATA_URL = re.compile(r"data:image/(png|jpeg|gif|webp|svg\+xml);base64,[A-Za-z0-9+/=\s]+")
# The first bytes of each image format a gateway might store as bare base64.
_SIGNATURES = {
    b"\x89PNG\r\n\x1a\n": "image/png",
    b"\xff\xd8\xff": "image/jpeg",
    b"GIF8": "image/gif",
    b"RIFF": "image/webp",
}


def qr_image(value: str) -> str:
    """A ``data:`` URL of the image of ``value`` (see the module's docstring)."""
    if _DATA_URL.fullmatch(value):
        return value
    try:
        decoded = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        decoded = b""
    for signature, media_type in _SIGNATURES.items():
        if decoded.startswith(signature):
            return f"data:{media_type};base64,{value}"
    import segno  # the dashboard extra

    # Never a Micro QR code, which the phone's scanner does not read; a quiet
    # zone of 4 modules, as the standard asks.
    return str(segno.make(value, error="m", micro=False).svg_data_uri(scale=5, border=4))


__all__ = ["qr_image"]
