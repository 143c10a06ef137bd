"""Export report: a Markdown file with the studio's charts as PNG.

Everything comes from what the views already hold (model card, rotation
summary, bit plan, measurement, last chat reply); charts are exported with
pyqtgraph's ImageExporter. Each chart's view is brought to the front while it is
exported, so its plots have their on-screen size, then the previous view returns.
"""

from __future__ import annotations

import json
import re
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import pyqtgraph.exporters
from PySide6.QtWidgets import QApplication

from ..format import format_bytes
from .bits_view import format_distortion, to_db
from .model_view import CARD_FIELDS
from .spectrum_view import describe_summary

REPORT = "report.md"
EXPORT_SCALE = 2  # PNG pixels per on-screen pixel


def _version() -> str:
    try:
        return metadata.version("velox-studio")
    except metadata.PackageNotFoundError:
        return "dev"


def _db_or_dash(distortion) -> str:
    """Predicted error in dB, or a dash where there is no spectral prediction (affine)."""
    value = float(np.mean(distortion))
    return f"{to_db(value):.1f}" if np.isfinite(value) and value > 0 else "—"


def _plain(text: str) -> str:
    """A rich-text label's text without tags."""
    return re.sub(r"<[^>]+>", "", text.replace("<br>", " ")).replace("&nbsp;", " ").strip()


def export_plot(plot, path: Path) -> Path:
    item = plot.getPlotItem()
    exporter = pyqtgraph.exporters.ImageExporter(item)
    width = max(600, int(item.sceneBoundingRect().width() * EXPORT_SCALE))
    exporter.parameters()["width"] = width
    exporter.export(str(path))
    return path


def _table(header: list[str], rows: list[list], numeric: bool = True) -> list[str]:
    """A Markdown table; columns after the first are right-aligned when ``numeric``."""
    align = ["---"] + ["---:" if numeric else "---"] * (len(header) - 1)
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def write_report(window, directory: str | Path) -> Path:
    """Write report.md, its PNG charts and bit_plan.json into ``directory``."""
    root = Path(directory).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    info = window.model_view.info
    spectrum, bits, chat = window.spectrum_view, window.bits_view, window.chat_view
    summary = bits.summary
    name = info["name"] if info else (summary or {}).get("model_name") or "no model"
    lines = [f"# Velox Studio report — {name}", "",
             f"Written {time.strftime('%Y-%m-%d %H:%M %Z')} by Velox Studio {_version()}.", ""]

    lines += ["## Model", ""]
    if info:
        card = {key: window.model_view.card_labels[key].text() for key, _ in CARD_FIELDS}
        lines += _table(["Field", "Value"], [[label, card[key].replace("|", "/")]
                                             for key, label in CARD_FIELDS], numeric=False)
        per_token = 2 * info["num_layers"] * info["num_kv_heads"] * info["head_dim"] * 2
        lines += ["", f"fp16 KV cache: {format_bytes(per_token)} per token, "
                      f"{format_bytes(per_token * info['context_length'])} at the full context "
                      f"of {info['context_length']:,} tokens."]
    else:
        lines.append("No model loaded.")
    lines.append("")

    charts: list[tuple[str, object, object]] = []  # (file, view, plot)
    if summary is not None:
        lines += ["## Rotations", "", describe_summary(summary), ""]
        layer = spectrum.layer_spin.value()
        charts += [("spectrum.png", spectrum, spectrum.eig_plot),
                   ("heatmap.png", spectrum, spectrum.heat_plot),
                   ("participation.png", spectrum, spectrum.pr_plot),
                   ("bits.png", bits, bits.bits_plot),
                   ("layers.png", bits, bits.layer_plot)]
        lines += ["## Spectrum", "",
                  f"![Eigenvalues of layer {layer}](spectrum.png)", "",
                  "![log10 eigenvalues, layers × components](heatmap.png)", "",
                  "![Participation ratio per layer (effective dimensions)](participation.png)",
                  ""]
        rows = []
        scored = "scored" in spectrum.parts  # keys in the score-weighted basis (+qm)
        pr_parts = ("keys", "values", "scored") if scored else ("keys", "values")
        for li in range(summary["num_layers"]):
            rows.append([li] + [f"{spectrum.participation[p][li].mean():.1f}" for p in pr_parts]
                        + [int(spectrum.mean_gaps[p][li]) for p in ("keys", "values")])
        lines += _table(["Layer", "Keys PR", "Values PR"]
                        + (["Score-weighted keys PR"] if scored else [])
                        + ["Keys gap", "Values gap"], rows)
        lines += ["", "PR: participation ratio (Σλ)²/Σλ², mean over KV heads; gap: leading "
                      "components holding 99 % of the head-mean spectrum's energy."
                  + (" Score-weighted keys: whitened by the score-error metric, the basis the "
                     "default configuration codes keys in (+qm)." if scored else ""), ""]

        plan = bits.bit_plan()
        (root / "bit_plan.json").write_text(json.dumps(plan, indent=1))
        lines += ["## Bit plan", "",
                  "The layer chart shows the predicted error per layer (lines) and, after "
                  "Measure, the error measured on held-out text (× keys, + values).", "",
                  f"- Keys {plan['key_avg_bits']:.2f} bits/dim, values "
                  f"{plan['value_avg_bits']:.2f} bits/dim, each dimension "
                  f"{plan['min_bits']}–{plan['max_bits']} bits, "
                  + ("water-filled" if plan["water_filling"] else
                     f"signal {plan.get('signal_bits')} / noise {plan.get('noise_bits')} bits "
                     "around each head's spectral gap")
                  + (f"; values affine {plan.get('value_bits')}-bit, group "
                     f"{plan.get('value_group_size')}" if plan.get("value_method") == "affine"
                     else "") + ".",
                  f"- Overrides: {_plain(bits.overrides_label.text())}",
                  f"- Predicted error (Σλ·4^(−b)/Σλ, mean over layers and heads): keys "
                  f"{bits.key_error.text()}, values {bits.value_error.text()}.",
                  f"- KV cache at {bits.tokens_spin.value():,} tokens"
                  + (" with a per-token scale" if bits.token_scale_check.isChecked() else "")
                  + f": {_plain(bits.memory_label.text())}; {bits.memory_detail.text()}.",
                  "- The plan itself: `bit_plan.json` (veloxcore's bundle format).", "",
                  f"![Bits of layer {bits.layer_spin.value()}](bits.png)", "",
                  "![Error per layer](layers.png)", ""]
        measured = bits.measured
        rows = []
        for li in range(summary["num_layers"]):
            row = [li] + [f"{bits.layer_target(p, li):.2f}" for p in ("keys", "values")]
            row += [_db_or_dash(bits.plan[p][1][li]) for p in ("keys", "values")]
            if measured is not None:
                row += [f"{to_db(float(np.mean(measured[k][li]))):.1f}"
                        for k in ("key_mse", "value_mse")]
            rows.append(row)
        header = ["Layer", "K bits/dim", "V bits/dim", "K predicted dB", "V predicted dB"]
        if measured is not None:
            header += ["K measured dB", "V measured dB"]
        lines += _table(header, rows) + [""]

        if measured is not None:
            lines += ["## Measured", "",
                      f"Teacher-forced on {measured['context']} tokens of {measured['text']} "
                      f"(held-out; SHA-256 {measured['text_sha256'][:12]}…), chunks of "
                      f"{measured['chunk']}, against the fp16 cache"
                      + ("" if bits.measured_is_current()
                         else " — **measured for an earlier plan than the one above**") + ".",
                      ""]
            rows = [[r["method"], f"{r['bits_per_element']:.2f}",
                     format_bytes(r["kv_bytes"]), f"{r['perplexity']:.3f}",
                     f"{r['delta_ppl_pct']:+.2f} %", f"{r['kld']:.4f}",
                     f"{100 * r['top1_agreement']:.1f} %"] for r in measured["results"]]
            lines += _table(["Method", "Bits/elem", "KV bytes", "PPL", "ΔPPL", "KL",
                             "Top-1"], rows)
            lines.append("")
            for part, key in (("keys", "key_mse"), ("values", "value_mse")):
                predicted = float(np.mean(measured["predicted"][part]))
                lines.append(f"- {part.capitalize()} error (mean over layers and heads): "
                             f"predicted {format_distortion(predicted)}, measured "
                             f"{format_distortion(float(np.mean(measured[key])))}.")
            lines.append("")
    else:
        lines += ["## Rotations", "", "No rotations: calibrate or load a bundle to add the "
                                      "spectrum and the bit plan.", ""]

    stats = chat.last_stats
    if stats:
        lines += ["## Chat", "",
                  f"Last reply: {stats.get('method')}, {stats.get('tokens', 0)} tokens at "
                  f"{stats.get('tokens_per_s', 0):.1f} tok/s after a "
                  f"{stats.get('prompt_tokens', 0)}-token prompt; KV cache "
                  f"{format_bytes(stats.get('kv_bytes', 0))} measured vs fp16 "
                  f"{format_bytes(stats.get('kv_fp16_bytes', 0))} "
                  f"({stats.get('bits_per_element', 0):.2f} bits/elem).", ""]

    current = window.stack.currentWidget()
    try:
        for file, view, plot in charts:
            if window.stack.currentWidget() is not view:
                window.stack.setCurrentWidget(view)
                QApplication.processEvents()
            export_plot(plot, root / file)
    finally:
        window.stack.setCurrentWidget(current)
    path = root / REPORT
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
