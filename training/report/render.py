"""Render an assembled :class:`~training.report.build.Report` as self-contained HTML and as Markdown.

HTML: one file, CSS inline, figures embedded as base64 PNG, and a Content-Security-Policy that forbids
every external request, so the file opens offline and leaks nothing. Markdown: the same tables, with the
figures linked relative to the run directory.
"""

from __future__ import annotations

import base64
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from training.report.build import Report
from training.report.tables import ReportTable

TEMPLATES = Path(__file__).parent / "templates"


def _embedded(path: Path) -> dict[str, object]:
    """Base64 data URI plus the CSS width at the figure's physical size (PNG pixels / dpi * 96)."""
    from PIL import Image

    data = Path(path).read_bytes()
    with Image.open(Path(path)) as img:
        dpi = float((img.info.get("dpi") or (96, 96))[0]) or 96.0
        width = round(img.size[0] * 96 / dpi)
    return {"uri": "data:image/png;base64," + base64.b64encode(data).decode("ascii"), "width": width}


def render_html(report: Report) -> str:
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=select_autoescape(["html"]),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    images = {
        b.image: _embedded(b.image)
        for s in report.sections
        for b in s.blocks
        if b.kind == "figure" and b.image
    }
    css = (TEMPLATES / "report.css").read_text()
    return env.get_template("report.html").render(report=report, images=images, css=css)


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").strip() or " "


def markdown_table(t: ReportTable) -> str:
    lines = [f"**{t.title}**", "", "| " + " | ".join(_md_cell(c) for c in t.columns) + " |"]
    lines.append("|" + "|".join("---" for _ in t.columns) + "|")
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows]
    if t.note:
        lines += ["", f"*{t.note}*"]
    return "\n".join(lines)


def render_markdown(report: Report) -> str:
    out = [f"# {report.title}", ""]
    out += [f"> **{b}**\n" for b in report.banners]
    out += [f"- **{k}:** {v}" for k, v in report.meta] + [""]
    for section in report.sections:
        out += [f"## {section.title}", ""]
        for b in section.blocks:
            if b.kind == "text":
                out.append(b.text)
            elif b.kind == "warning":
                out.append(f"> {b.text}")
            elif b.kind in ("table", "details") and b.table is not None:
                out.append(markdown_table(b.table))
            elif b.kind == "figure" and b.image is not None:
                rel = Path(b.image).relative_to(report.run_dir).as_posix()
                out.append(f"![{_md_cell(b.caption)}]({rel})\n\n*{b.caption}*")
            out.append("")
    return "\n".join(out).rstrip() + "\n"
