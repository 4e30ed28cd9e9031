"""A report as a list of plain blocks, rendered to Markdown and to one self-contained HTML page.

Sections are built once as blocks (heading, paragraph, table, image, list, raw Markdown) so
report.md and report.html can't drift apart. The HTML embeds images as data URIs and carries
its own small stylesheet: the file can be mailed or archived and still opens offline. All
text is HTML-escaped; only ``**bold**`` and ```code``` are interpreted.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import os
import re
from pathlib import Path

__all__ = [
    "Block",
    "Bullets",
    "Heading",
    "Image",
    "Paragraph",
    "Raw",
    "Table",
    "parse_markdown",
    "render_html",
    "render_markdown",
    "slug",
]


@dataclasses.dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclasses.dataclass(frozen=True)
class Paragraph:
    text: str


@dataclasses.dataclass(frozen=True)
class Table:
    headers: list[str]
    rows: list[list[str]]


@dataclasses.dataclass(frozen=True)
class Image:
    path: Path
    caption: str = ""


@dataclasses.dataclass(frozen=True)
class Bullets:
    items: list[str]


@dataclasses.dataclass(frozen=True)
class Raw:
    """Markdown written elsewhere (an experiment's comparison table): kept verbatim in
    report.md, parsed by ``parse_markdown`` for the HTML page."""

    markdown: str


Block = Heading | Paragraph | Table | Image | Bullets | Raw

_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif"}
_PIPE = re.compile(r"(?<!\\)\|")
_SEPARATOR = re.compile(r"^\s*:?-{2,}:?\s*$")
_NUMBER = re.compile(r"^[-+−]?[\d,]*\.?\d+(e[-+]?\d+)?( ± [\d.,e+-]+)?%?$")

_STYLE = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1f2328;}
main{max-width:1100px;margin:0 auto;padding:1.5em 2em 4em;}
h1{border-bottom:2px solid #d0d7de;padding-bottom:.3em;}
h2{border-bottom:1px solid #d0d7de;padding-bottom:.2em;margin-top:2em;}
h3,h4,h5,h6{margin-bottom:.4em;}
nav ul{columns:2;list-style:none;padding-left:0;}
a{color:#0969da;text-decoration:none;}
.scroll{overflow-x:auto;margin:.6em 0;}
table{border-collapse:collapse;font-size:13px;}
th,td{border:1px solid #d0d7de;padding:3px 8px;text-align:left;vertical-align:top;}
th{background:#f6f8fa;}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap;}
tbody tr:nth-child(even){background:#fafbfc;}
figure{display:inline-block;margin:.5em 1em .5em 0;vertical-align:top;}
figure img{max-width:100%;border:1px solid #eee;}
figcaption{font-size:13px;color:#57606a;}
code{background:#f6f8fa;padding:0 .25em;border-radius:3px;}
""".strip()


def slug(text: str) -> str:
    """An anchor id from a heading ("Per-group metrics" -> "per-group-metrics")."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"


# --- Markdown -----------------------------------------------------------------------------


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(table: Table) -> str:
    lines = [
        "| " + " | ".join(_md_cell(h) for h in table.headers) + " |",
        "| " + " | ".join("---" for _ in table.headers) + " |",
    ]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.rows]
    return "\n".join(lines)


def _md_block(block: Block, base: Path) -> str:
    if isinstance(block, Heading):
        return "#" * block.level + " " + block.text
    if isinstance(block, Paragraph):
        return block.text
    if isinstance(block, Table):
        return _md_table(block)
    if isinstance(block, Image):
        rel = Path(os.path.relpath(Path(block.path).resolve(), base.resolve())).as_posix()
        caption = block.caption or Path(block.path).stem
        return f"![{caption}]({rel})" + (f"\n\n*{block.caption}*" if block.caption else "")
    if isinstance(block, Bullets):
        return "\n".join(f"- {item}" for item in block.items)
    if isinstance(block, Raw):
        return block.markdown.strip()
    raise TypeError(f"unknown block {type(block).__name__}")


def render_markdown(blocks: list[Block], base: Path) -> str:
    """Markdown with images linked relative to ``base`` (the directory report.md is in)."""
    return "\n\n".join(_md_block(b, base) for b in blocks) + "\n"


def _split_row(line: str) -> list[str]:
    """``| a | b \\| c |`` -> ["a", "b | c"] (escaped pipes stay inside their cell)."""
    cells = _PIPE.split(line)[1:]  # the row starts with "|"
    if cells and not cells[-1].strip():
        cells = cells[:-1]
    return [c.strip().replace("\\|", "|") for c in cells]


def parse_markdown(text: str) -> list[Block]:
    """The Markdown this project writes (tables, ``#`` headings, ``-`` lists, paragraphs)
    back into blocks; anything else is kept as paragraph text."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if not line:
            i += 1
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                cells = _split_row(lines[i].strip())
                if not all(_SEPARATOR.match(c) for c in cells):
                    rows.append(cells)
                i += 1
            if rows:
                width = max(len(r) for r in rows)
                rows = [r + [""] * (width - len(r)) for r in rows]
                blocks.append(Table(rows[0], rows[1:]))
        elif re.match(r"^#{1,6} ", line):
            hashes, _, title = line.partition(" ")
            blocks.append(Heading(title.strip(), len(hashes)))
            i += 1
        elif re.match(r"^[-*] ", line):
            items = []
            while i < len(lines) and re.match(r"^\s*[-*] ", lines[i]):
                items.append(lines[i].strip()[2:].strip())
                i += 1
            blocks.append(Bullets(items))
        else:
            para = []
            while (
                i < len(lines)
                and lines[i].strip()
                and not re.match(r"^(\||#{1,6} |[-*] )", lines[i].strip())
            ):
                para.append(lines[i].strip())
                i += 1
            blocks.append(Paragraph(" ".join(para)))
    return blocks


# --- HTML ---------------------------------------------------------------------------------


def _inline(text: str) -> str:
    """Escape, then honour ``**bold**`` and ```code``` (and drop Markdown's ``*emphasis*``
    stars around a whole paragraph)."""
    out = html.escape(str(text), quote=True)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"^\*([^*]+)\*$", r"<em>\1</em>", out)


def _data_uri(path: Path) -> str | None:
    mime = _MIME.get(path.suffix.lower())
    if mime is None or not path.is_file():
        return None
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _html_table(table: Table) -> str:
    head = "".join(f"<th>{_inline(h)}</th>" for h in table.headers)
    body = []
    for row in table.rows:
        cells = "".join(
            f'<td class="num">{_inline(c)}</td>'
            if _NUMBER.match(str(c))
            else f"<td>{_inline(c)}</td>"
            for c in row
        )
        body.append(f"<tr>{cells}</tr>")
    return (
        f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def _html_block(block: Block) -> str:
    """A non-heading block (headings need their anchor: see ``render_html``)."""
    if isinstance(block, Paragraph):
        return f"<p>{_inline(block.text)}</p>"
    if isinstance(block, Table):
        return _html_table(block)
    if isinstance(block, Image):
        uri = _data_uri(Path(block.path))
        if uri is None:
            return ""
        alt = html.escape(block.caption or Path(block.path).stem, quote=True)
        caption = f"<figcaption>{_inline(block.caption)}</figcaption>" if block.caption else ""
        return f'<figure><img src="{uri}" alt="{alt}">{caption}</figure>'
    if isinstance(block, Bullets):
        return "<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in block.items) + "</ul>"
    raise TypeError(f"unknown block {type(block).__name__}")


def _unique(anchor: str, used: set[str]) -> str:
    name, n = anchor, 2
    while name in used:
        name, n = f"{anchor}-{n}", n + 1
    used.add(name)
    return name


def render_html(title: str, blocks: list[Block]) -> str:
    """One self-contained HTML page: inline stylesheet, images as data URIs, no scripts and no
    external links; a table of contents after the title (and its first paragraph) links the
    level-2 headings."""
    flat = [
        inner
        for block in blocks
        for inner in (parse_markdown(block.markdown) if isinstance(block, Raw) else [block])
    ]
    used: set[str] = set()
    parts, toc = [], []
    for block in flat:
        if isinstance(block, Heading):
            level, anchor = min(max(block.level, 1), 6), _unique(slug(block.text), used)
            parts.append(f'<h{level} id="{anchor}">{_inline(block.text)}</h{level}>')
            if level == 2:
                toc.append(f'<li><a href="#{anchor}">{_inline(block.text)}</a></li>')
        else:
            parts.append(_html_block(block))
    if toc:
        at = 1 if flat and isinstance(flat[0], Heading) and flat[0].level == 1 else 0
        if at == 1 and len(flat) > 1 and isinstance(flat[1], Paragraph):
            at = 2  # after the title's introductory paragraph
        parts.insert(at, f"<nav><ul>{''.join(toc)}</ul></nav>")
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>\n{_STYLE}\n</style>\n</head>\n"
        "<body>\n<main>\n" + "\n".join(p for p in parts if p) + "\n</main>\n</body>\n</html>\n"
    )
