"""Rendering of the report's content blocks to Markdown and to one self-contained HTML page.

The report is a list of blocks, rendered twice: ``("h", level, text)``, ``("p", text)``,
``("ul", [text])``, ``("table", header, rows)``, ``("fig", name, caption)`` and
``("banner", text)`` (a caveat that applies to the whole page) and
``("samples", table)`` (the paradigm x budget sample strips, see ``flopmatch.report.build.sample_table``).
Text may use ``**bold**``; everything else is escaped. HTML embeds every image as a base64 PNG.
"""

from __future__ import annotations

import base64
import html
import math


def fmt(v, spec: str = ".4g") -> str:
    """A table cell: '–' for missing/non-finite, yes/no for bools, ``spec`` for floats."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def _md_cell(v) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def render_md(blocks: list[tuple], fig_files: dict[str, str], sample_files: dict) -> str:
    """Markdown; figures and sample strips are linked (files under report_figures/)."""
    out = []
    for b in blocks:
        kind = b[0]
        if kind == "h":
            out.append("#" * b[1] + " " + b[2])
        elif kind == "p":
            out.append(b[1])
        elif kind == "banner":
            out.append(f"> **Note.** {b[1]}")
        elif kind == "ul":
            out.append("\n".join(f"- {x}" for x in b[1]))
        elif kind == "table":
            out.append("\n".join(["| " + " | ".join(map(_md_cell, b[1])) + " |", "|" + "---|" * len(b[1])]
                                 + ["| " + " | ".join(map(_md_cell, r)) + " |" for r in b[2]]))
        elif kind == "fig":
            out.append(f"![{b[1]}]({fig_files[b[1]]})\n\n*{b[2]}*" if b[1] in fig_files else f"*{b[1]}: no data.*")
        elif kind == "samples":
            t = b[1]
            if t is None:
                out.append("No saved samples.")
                continue
            out.append("Prompts, left to right: " + "; ".join(f"({i + 1}) {p}" for i, p in enumerate(t["prompts"])))
            rows = [[f"{c:.3g} FLOPs"] + [f"![{p} {c:.3g}]({sample_files[(p, c)]})<br>{_cell_caption(t['cells'][(p, c)])}"
                                          if (p, c) in t["cells"] else "–" for p in t["paradigms"]] for c in t["budgets"]]
            out.append(render_md([("table", ["budget", *t["paradigms"]], rows)], {}, {}).strip())
            if t["mismatch"]:
                out.append(f"Warning: these runs were sampled on different prompts: {', '.join(t['mismatch'])}.")
    return "\n\n".join(out) + "\n"


def _cell_caption(cell: dict) -> str:
    return f"{cell['run']} (d{cell['depth']}, FID {fmt(cell['fid'], '.3g')}, match {fmt(cell['full_match'], '.2f')})"


def _b64(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


CSS = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
       "table{border-collapse:collapse;margin:1em 0;font-size:.85em}td,th{border:1px solid #ccc;padding:3px 6px;vertical-align:top}"
       "th{background:#f3f3f3}img{max-width:100%}figure{margin:1.5em 0}figcaption{font-size:.85em;color:#555}"
       ".samples td{text-align:center}.samples img{image-rendering:pixelated}"
       ".banner{background:#fff6d5;border-left:4px solid #e0b000;padding:.4em .8em;margin:.4em 0}")  # fmt: skip


def _inline_md(text: str) -> str:
    """Escape, then the one bit of markdown we use in text: **bold**."""
    parts = html.escape(str(text)).split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


def render_html(blocks: list[tuple], figs: dict[str, bytes | None]) -> str:
    """One self-contained HTML page: every image is an embedded base64 PNG, no external resources."""
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', "<title>flopmatch study report</title>",
           f"<style>{CSS}</style></head><body>"]  # fmt: skip
    for b in blocks:
        kind = b[0]
        if kind == "h":
            out.append(f"<h{b[1]}>{html.escape(b[2])}</h{b[1]}>")
        elif kind == "p":
            out.append(f"<p>{_inline_md(b[1])}</p>")
        elif kind == "banner":
            out.append(f'<p class="banner">{_inline_md(b[1])}</p>')
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{_inline_md(x)}</li>" for x in b[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{html.escape(str(h))}</th>" for h in b[1])
            body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in b[2])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "fig":
            png = figs.get(b[1])
            out.append(f'<figure><img alt="{b[1]}" src="{_b64(png)}"><figcaption>{html.escape(b[2])}</figcaption></figure>'
                       if png else f"<p><i>{html.escape(b[1])}: no data.</i></p>")
        elif kind == "samples":
            t = b[1]
            if t is None:
                out.append("<p>No saved samples.</p>")
                continue
            out.append("<ol>" + "".join(f"<li>{html.escape(p)}</li>" for p in t["prompts"]) + "</ol>")
            head = "<th>budget</th>" + "".join(f"<th>{html.escape(p)}</th>" for p in t["paradigms"])
            rows = []
            for c in t["budgets"]:
                tds = []
                for p in t["paradigms"]:
                    cell = t["cells"].get((p, c))
                    tds.append(f'<td><img alt="{p} {c:.3g}" src="{_b64(cell["png"])}"><br>{html.escape(_cell_caption(cell))}</td>'
                               if cell else "<td>–</td>")
                rows.append(f"<tr><th>{c:.3g} FLOPs</th>{''.join(tds)}</tr>")
            out.append(f'<table class="samples"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>')
            if t["mismatch"]:
                out.append(f"<p>Warning: sampled on different prompts: {html.escape(', '.join(t['mismatch']))}</p>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
