"""A small document model that renders to Markdown and to standalone HTML (no Markdown parser needed).

Reports are built as a list of blocks (headings, paragraphs, bullet lists, tables, images, code);
each block knows both renderings, so the HTML is exact rather than a best-effort conversion.
Inline text supports ``**bold**`` and ``code`` spans in both outputs.
"""

from __future__ import annotations

import html
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

_INLINE = re.compile(r"(\*\*[^*]+\*\*|`[^`]+`)")

CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:980px;margin:2em auto;
padding:0 1em;line-height:1.5;color:#222}table{border-collapse:collapse;margin:1em 0;font-size:0.92em}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}
code{background:#f5f5f5;padding:1px 4px;border-radius:3px}pre{background:#f5f5f5;padding:8px;overflow-x:auto}
.verdict-holds{color:#17702b;font-weight:600}.verdict-fails{color:#b00020;font-weight:600}
.verdict-inconclusive{color:#8a6d00;font-weight:600}"""


def inline_html(text: str) -> str:
    """Escape ``text`` and turn **bold** and `code` spans into tags."""
    out = []
    for part in _INLINE.split(text):
        if part.startswith("**") and part.endswith("**") and len(part) > 4:
            out.append(f"<strong>{html.escape(part[2:-2])}</strong>")
        elif part.startswith("`") and part.endswith("`") and len(part) > 2:
            out.append(f"<code>{html.escape(part[1:-1])}</code>")
        else:
            out.append(html.escape(part))
    return "".join(out)


def _cell_md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


@dataclass
class Document:
    """An ordered list of blocks; ``base`` is the folder image paths are made relative to."""

    title: str
    base: Path = field(default_factory=Path.cwd)
    blocks: list[tuple[str, object]] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> Document:
        self.blocks.append(("heading", (level, text)))
        return self

    def paragraph(self, text: str) -> Document:
        self.blocks.append(("paragraph", text))
        return self

    def bullets(self, items: list[str]) -> Document:
        self.blocks.append(("bullets", list(items)))
        return self

    def table(self, header: list[str], rows: list[list[object]]) -> Document:
        self.blocks.append(("table", (list(header), [[str(c) for c in r] for r in rows])))
        return self

    def image(self, path: str | Path | None, alt: str) -> Document:
        if path is not None and Path(path).is_file():
            self.blocks.append(("image", (os.path.relpath(path, self.base), alt)))
        return self

    def code(self, text: str) -> Document:
        self.blocks.append(("code", text))
        return self

    def verdict(self, verdict: str, text: str) -> Document:
        """A one-line verdict: ``holds``, ``does not hold`` or ``inconclusive``, then why."""
        self.blocks.append(("verdict", (verdict, text)))
        return self

    def to_markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for kind, value in self.blocks:
            if kind == "heading":
                level, text = value
                out += ["#" * level + " " + text, ""]
            elif kind == "paragraph":
                out += [value, ""]
            elif kind == "bullets":
                out += [f"- {x}" for x in value] + [""]
            elif kind == "table":
                header, rows = value
                out += ["| " + " | ".join(_cell_md(h) for h in header) + " |",
                        "|" + "|".join("---" for _ in header) + "|"]
                out += ["| " + " | ".join(_cell_md(c) for c in r) + " |" for r in rows] + [""]
            elif kind == "image":
                path, alt = value
                out += [f"![{alt}]({path})", ""]
            elif kind == "code":
                out += ["```", value, "```", ""]
            elif kind == "verdict":
                verdict, text = value
                out += [f"**Verdict: {verdict}.** {text}", ""]
        return "\n".join(out).rstrip() + "\n"

    def to_html(self) -> str:
        body = [f"<h1>{inline_html(self.title)}</h1>"]
        for kind, value in self.blocks:
            if kind == "heading":
                level, text = value
                body.append(f"<h{level}>{inline_html(text)}</h{level}>")
            elif kind == "paragraph":
                body.append(f"<p>{inline_html(value)}</p>")
            elif kind == "bullets":
                body.append("<ul>" + "".join(f"<li>{inline_html(x)}</li>" for x in value) + "</ul>")
            elif kind == "table":
                header, rows = value
                body.append("<table><thead><tr>" + "".join(f"<th>{inline_html(h)}</th>" for h in header)
                            + "</tr></thead><tbody>"
                            + "".join("<tr>" + "".join(f"<td>{inline_html(c)}</td>" for c in r) + "</tr>"
                                      for r in rows) + "</tbody></table>")
            elif kind == "image":
                path, alt = value
                body.append(f'<p><img src="{html.escape(path)}" alt="{html.escape(alt)}"></p>')
            elif kind == "code":
                body.append(f"<pre><code>{html.escape(value)}</code></pre>")
            elif kind == "verdict":
                verdict, text = value
                cls = {"holds": "holds", "does not hold": "fails"}.get(verdict, "inconclusive")
                body.append(f'<p><span class="verdict-{cls}">Verdict: {html.escape(verdict)}.</span> '
                            f"{inline_html(text)}</p>")
        return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(self.title)}</title>"
                f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")

    def write(self, md_path: Path, html_path: Path | None = None) -> tuple[Path, Path]:
        """Write the Markdown and the HTML (next to it by default)."""
        html_path = html_path or md_path.with_suffix(".html")
        md_path.parent.mkdir(parents=True, exist_ok=True)
        md_path.write_text(self.to_markdown(), encoding="utf-8")
        html_path.write_text(self.to_html(), encoding="utf-8")
        return md_path, html_path
