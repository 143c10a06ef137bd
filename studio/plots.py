"""Charts rendered to PNG with pyqtgraph's exporters (used by `velox bits-sweep`).

    python -m studio.plots frontier SWEEP.json OUT.png

Runs offscreen; it is a separate process so that veloxcore never imports Qt.
"""

from __future__ import annotations

import json
import os
import sys

FAMILY_COLOURS = {"affine": "#d62728", "rvq": "#7f7f7f", "spectral": "#1f77b4", "fp16": "#2ca02c"}


def family(method: str) -> str:
    for name in FAMILY_COLOURS:
        if method.startswith(name):
            return name
    return "other"


def render_frontier(results: list[dict], path: str, title: str = "") -> None:
    """KL vs real bits per element, one line per method family (Pareto points joined)."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    import pyqtgraph as pg
    import pyqtgraph.exporters
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication([])  # noqa: F841 (must outlive the export)
    pg.setConfigOptions(antialias=True, background="w", foreground="k")
    plot = pg.PlotWidget()
    plot.resize(900, 560)
    item = plot.getPlotItem()
    item.setLogMode(y=True)
    item.setLabel("bottom", "bits per element (K+V, real bytes)")
    item.setLabel("left", "mean KL(fp16 ‖ method) per token")
    item.setTitle(title, size="11pt")
    item.showGrid(x=True, y=True, alpha=0.25)
    item.addLegend(offset=(-10, 10))
    by_family: dict[str, list[dict]] = {}
    for r in results:
        if r["kld"] > 0:
            by_family.setdefault(family(r["method"]), []).append(r)
    for name, rows in sorted(by_family.items()):
        rows.sort(key=lambda r: r["bits_per_element"])
        colour = FAMILY_COLOURS.get(name, "#9467bd")
        frontier, best = [], float("inf")
        for r in rows:
            if r["kld"] < best:
                frontier.append(r)
                best = r["kld"]
        item.plot([r["bits_per_element"] for r in rows], [r["kld"] for r in rows], pen=None,
                  symbol="o", symbolSize=7, symbolBrush=colour, symbolPen=None)
        item.plot([r["bits_per_element"] for r in frontier], [r["kld"] for r in frontier],
                  pen=pg.mkPen(colour, width=2), name=name)
    plot.show()
    app.processEvents()
    exporter = pg.exporters.ImageExporter(item)
    exporter.export(path)
    plot.close()


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] != "frontier":
        print("usage: python -m studio.plots frontier SWEEP.json OUT.png", file=sys.stderr)
        return 2
    data = json.loads(open(argv[1]).read())
    contexts = sorted({r["context"] for r in data["results"]})
    title = f"{data.get('model', '')} — {data.get('text', '')}, context {contexts[-1]}"
    render_frontier([r for r in data["results"] if r["context"] == contexts[-1]], argv[2], title)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
