"""Turning a sniffed upload into text: one small function per type.

Every parser gets untrusted bytes. The rule is that a malformed file becomes a
``ParseError`` naming the file and saying what to do, never a crash: third-party parsers
(pypdf, python-docx) raise a zoo of exception types on damaged input, so their calls are
wrapped and anything they raise becomes our error. Containers are checked before they are
opened (zip bombs, DTDs in DOCX, JSON nesting) so no parser is asked to do unbounded work.
"""

from __future__ import annotations

import csv
import io
import json
import re
import unicodedata
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import docx
from docx.table import Table
from docx.text.paragraph import Paragraph
from pypdf import PasswordType, PdfReader
from pypdf.errors import DependencyError
from selectolax.lexbor import LexborHTMLParser, LexborNode

from worker.errors import ParseError, PermanentError, UnsupportedTypeError, WorkerError, describe
from worker.ingest import sources
from worker.ingest.types import Document, Source


@dataclass(frozen=True, slots=True)
class _Limits:
    max_json_depth: int
    max_decompressed_bytes: int


@dataclass(slots=True)
class _Extracted:
    """What a type's parser found, before the shared normalisation."""

    text: str
    title: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)


_Parser = Callable[[Source, _Limits], _Extracted]


def parse(
    source: Source,
    *,
    max_json_depth: int = 64,
    max_decompressed_bytes: int = 100_000_000,
) -> Document:
    """Extract the text of ``source`` according to its sniffed ``mime_type``.

    Raises ``UnsupportedTypeError`` for a type not handled, ``ParseError`` for a damaged
    file, and a skipping ``PermanentError`` for a valid file with no text in it.
    """
    parser = _PARSERS.get(source.mime_type)
    if parser is None:
        supported = ", ".join(sorted(_PARSERS))
        what = (
            "the content is binary, not text or a supported document"
            if source.mime_type == "application/octet-stream"
            else f"files of type {source.mime_type} are not supported"
        )
        raise UnsupportedTypeError(f"{source.path}: {what}; upload one of: {supported}")
    found = parser(source, _Limits(max_json_depth, max_decompressed_bytes))
    text = normalize_text(found.text)
    if not text:
        raise PermanentError(f"{source.path}: no text to index in this file", skip=True)
    return Document(
        text=text,
        title=_one_line(found.title),
        mime_type=source.mime_type,
        metadata=found.metadata,
    )


# --------------------------------------------------------------------------- normalisation

# C0 controls other than \t and \n (\r, \v, \f are turned into \n first), and lone
# surrogates (JSON can carry "\ud800"; they cannot be encoded to UTF-8 for the database).
_JUNK = re.compile("[\x00-\x08\x0e-\x1f\x7f\ud800-\udfff]")
_LINE_BREAKS = re.compile("\r\n?|[\v\f\u2028\u2029\x85]")
_TRAILING_SPACE = re.compile("[ \t]+\n")
_BLANK_RUNS = re.compile("\n{3,}")


def normalize_text(text: str) -> str:
    """NFC, one kind of line break, no control characters, at most one blank line in a row.

    Bidi overrides, zero-width joiners and emoji are text and stay as they are.
    """
    text = _LINE_BREAKS.sub("\n", text)
    text = _JUNK.sub("", text)
    text = unicodedata.normalize("NFC", text)
    text = _TRAILING_SPACE.sub("\n", text)
    return _BLANK_RUNS.sub("\n\n", text).strip()


def _one_line(title: str) -> str:
    return " ".join(normalize_text(title).split())[:500]


def _decode(source: Source) -> str:
    """``decode_text`` with the file named in its error."""
    try:
        return sources.decode_text(source.data)
    except ParseError as exc:
        raise ParseError(
            f"{source.path}: {exc}; it was sent as {source.mime_type}. "
            "Upload the document in a text format."
        ) from exc


# --------------------------------------------------------------------------- plain text

_ATX_HEADING = re.compile(r"^#[ \t]+(.+?)[ \t#]*$", re.MULTILINE)


def _parse_text(source: Source, limits: _Limits) -> _Extracted:
    return _Extracted(_decode(source), metadata={"parser": "text"})


def _parse_markdown(source: Source, limits: _Limits) -> _Extracted:
    """Markdown is indexed as written: its markup is light and the words are all there."""
    text = _decode(source)
    heading = _ATX_HEADING.search(text)
    return _Extracted(
        text, title=heading.group(1) if heading else "", metadata={"parser": "markdown"}
    )


# --------------------------------------------------------------------------- HTML

_BOILERPLATE = "script, style, nav, header, footer, aside, noscript, form, svg, iframe, template"
_BLOCKS = (
    "p, div, br, li, dt, dd, tr, h1, h2, h3, h4, h5, h6, pre, blockquote, section, article, "
    "main, table, ul, ol, hr, figcaption"
)
_BREAK = "\ue000"  # a private-use mark for "line break here"; HTML whitespace collapses
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.I)


def _parse_html(source: Source, limits: _Limits) -> _Extracted:
    """The page's main content: boilerplate removed, ``<main>``/``<article>`` preferred."""
    tree = LexborHTMLParser(_decode_html(source))
    title = _html_title(tree)
    for node in tree.css(_BOILERPLATE):
        node.decompose()
    for node in tree.css(_BLOCKS):
        node.insert_after(_BREAK)
    root = tree.css_first("main") or tree.css_first("article") or tree.body or tree.root
    raw = root.text(separator="") if root is not None else ""
    lines = (" ".join(line.split()) for line in raw.split(_BREAK))
    return _Extracted("\n".join(lines), title=title, metadata={"parser": "selectolax"})


def _decode_html(source: Source) -> str:
    """Honour a ``<meta charset>`` that actually decodes the bytes, else sniff."""
    match = _META_CHARSET.search(source.data[:4096])
    if match:
        try:
            return source.data.decode(match.group(1).decode("ascii")).replace("\x00", "")
        except (LookupError, UnicodeDecodeError):
            pass
    return _decode(source)


def _html_title(tree: LexborHTMLParser) -> str:
    for selector in ("title", "h1"):
        node: LexborNode | None = tree.css_first(selector)
        if node is not None and node.text(strip=True):
            return str(node.text(strip=True))
    return ""


# --------------------------------------------------------------------------- PDF


def _parse_pdf(source: Source, limits: _Limits) -> _Extracted:
    """The text layer, page by page. Scanned pages have none, and OCR is not done here.

    pypdf caps each decompressed stream (75 MB by default), so a compression bomb inside a
    PDF surfaces as one of its errors and becomes a ``ParseError`` below.
    """
    if b"%%EOF" not in source.data[-2048:]:
        raise ParseError(
            f"{source.path}: the PDF is truncated (no end-of-file marker); "
            "the upload was probably interrupted. Upload it again."
        )
    try:
        reader = PdfReader(io.BytesIO(source.data), strict=False)
        _decrypt_pdf(reader, source)
        pages = [page.extract_text() or "" for page in reader.pages]
        title = (reader.metadata.title if reader.metadata else None) or ""
    except WorkerError:
        raise
    except Exception as exc:  # pypdf raises many types on damaged files: all mean "corrupt"
        raise ParseError(
            f"{source.path}: the PDF is damaged and cannot be read ({type(exc).__name__}: "
            f"{exc}). Re-export or repair it and upload again."
        ) from exc
    if not pages:
        raise ParseError(
            f"{source.path}: the PDF has no pages; it is damaged. Re-export it and upload again."
        )
    if not any(page.strip() for page in pages):
        raise PermanentError(
            f"{source.path}: the PDF has no text layer (a scan or images only); "
            "OCR is not supported, so there is nothing to index. Upload a PDF with text.",
            skip=True,
        )
    metadata = {"parser": "pypdf", "pages": len(pages)}
    return _Extracted("\n\n".join(pages), title=str(title), metadata=metadata)


def _decrypt_pdf(reader: PdfReader, source: Source) -> None:
    """Many PDFs are encrypted with an empty user password (only to restrict printing or
    copying); those open fine. A real password cannot be guessed."""
    if not reader.is_encrypted:
        return
    try:
        result = reader.decrypt("")
    except DependencyError as exc:  # AES without the `cryptography` package installed
        raise ParseError(
            f"{source.path}: the PDF is encrypted with AES, which this worker cannot "
            "decrypt; remove the encryption and upload again."
        ) from exc
    if result == PasswordType.NOT_DECRYPTED:
        raise ParseError(
            f"{source.path}: the PDF is encrypted, remove the password and upload again."
        )


# --------------------------------------------------------------------------- DOCX

_MAX_ZIP_MEMBERS = 10_000
_MAX_RATIO = 100
_RATIO_MIN_BYTES = 1024 * 1024  # small parts can compress very well and are harmless


def _parse_docx(source: Source, limits: _Limits) -> _Extracted:
    """Paragraphs and table cells in document order, after the container is vetted."""
    _check_docx_container(source, limits.max_decompressed_bytes)
    try:
        document = docx.Document(io.BytesIO(source.data))
        blocks = list(_docx_blocks(document))
        title = document.core_properties.title or _docx_heading(document)
    except Exception as exc:  # python-docx/lxml raise many types on damaged files
        raise ParseError(
            f"{source.path}: the Word document is damaged and cannot be read "
            f"({describe(exc)}). Open and re-save it in Word, then upload again."
        ) from exc
    return _Extracted("\n\n".join(blocks), title=title, metadata={"parser": "python-docx"})


def _check_docx_container(source: Source, max_bytes: int) -> None:
    """Refuse zip bombs and DTDs before python-docx decompresses anything.

    The sizes in the zip directory can be trusted as limits: Python's zipfile never
    returns more than a member's declared size (and fails its CRC check if cut short).
    """
    try:
        with zipfile.ZipFile(io.BytesIO(source.data)) as archive:
            members = archive.infolist()
            total = sum(member.file_size for member in members)
            if (
                len(members) >= _MAX_ZIP_MEMBERS
                or total > max_bytes
                or any(_ratio_too_high(member) for member in members)
            ):
                raise ParseError(
                    f"{source.path}: refused: looks like a zip bomb ({total:,} bytes "
                    f"uncompressed in {len(members):,} parts). Upload the document re-saved "
                    "from Word."
                )
            _refuse_dtd(archive, members, source)
    except WorkerError:
        raise
    except sources.ZIP_ERRORS as exc:
        raise ParseError(
            f"{source.path}: the Word document is not a valid zip archive ({exc}); "
            "it may be truncated. Upload it again."
        ) from exc


def _ratio_too_high(member: zipfile.ZipInfo) -> bool:
    if member.file_size < _RATIO_MIN_BYTES:
        return False
    return member.file_size >= _MAX_RATIO * max(member.compress_size, 1)


def _refuse_dtd(archive: zipfile.ZipFile, members: list[zipfile.ZipInfo], source: Source) -> None:
    """Word never writes a DOCTYPE; one in a DOCX is an XXE or entity-expansion attempt.

    python-docx already parses with ``resolve_entities=False``; this makes the refusal
    explicit and keeps us safe if that ever changes.
    """
    for member in members:
        if not member.filename.endswith((".xml", ".rels")):
            continue
        with archive.open(member) as part:
            prolog = part.read(4096)
        if b"<!DOCTYPE" in prolog.upper():
            raise ParseError(
                f"{source.path}: refused: {member.filename} declares a DTD, which Word "
                "documents never contain. Re-save the document from Word and upload again."
            )


def _docx_blocks(container: Any) -> Iterator[str]:
    """Text of paragraphs and tables in document order; cells may hold tables."""
    for block in container.iter_inner_content():
        if isinstance(block, Paragraph):
            yield block.text
        elif isinstance(block, Table):
            yield from _docx_table(block)


def _docx_table(table: Table) -> Iterator[str]:
    """One line per row, cells separated by " | " (a merged cell appears once)."""
    for row in table.rows:
        seen: list[Any] = []
        cells: list[str] = []
        for cell in row.cells:
            if any(cell._tc is other for other in seen):
                continue
            seen.append(cell._tc)
            cells.append(" ".join(" ".join(_docx_blocks(cell)).split()))
        yield " | ".join(cell for cell in cells if cell)


def _docx_heading(document: Any) -> str:
    for paragraph in document.paragraphs:
        style = paragraph.style.name if paragraph.style is not None else ""
        if style.startswith(("Heading", "Title")) and paragraph.text.strip():
            return str(paragraph.text)
    return ""


# --------------------------------------------------------------------------- JSON


def _parse_json(source: Source, limits: _Limits) -> _Extracted:
    """Keys and scalar values, one per line, in document order."""
    too_deep = ParseError(
        f"{source.path}: the JSON is nested deeper than {limits.max_json_depth} levels; "
        "refused. Flatten the data and upload again."
    )
    try:
        value = json.loads(_decode(source))
    except RecursionError as exc:  # the C scanner recurses: far too deep for us anyway
        raise too_deep from exc
    except ValueError as exc:
        raise ParseError(
            f"{source.path}: the file is not valid JSON ({exc}). Fix it and upload again."
        ) from exc
    lines = _flatten_json(value, limits.max_json_depth, too_deep)
    title = (value.get("title") or value.get("name")) if isinstance(value, dict) else ""
    return _Extracted(
        "\n".join(lines),
        title=title if isinstance(title, str) else "",
        metadata={"parser": "json"},
    )


def _flatten_json(value: Any, max_depth: int, too_deep: ParseError) -> list[str]:
    """Iterative walk (deep input must not exhaust the Python stack), depth-checked."""
    lines: list[str] = []
    stack: list[tuple[str | None, Any, int]] = [(None, value, 0)]
    while stack:
        key, item, depth = stack.pop()
        if depth > max_depth:
            raise too_deep
        if isinstance(item, dict | list):
            if key is not None:
                lines.append(f"{key}:")
            children = item.items() if isinstance(item, dict) else ((None, v) for v in item)
            stack.extend(reversed([(k, v, depth + 1) for k, v in children]))
        elif item is not None:
            scalar = _json_scalar(item)
            lines.append(scalar if key is None else f"{key}: {scalar}")
    return lines


def _json_scalar(item: Any) -> str:
    if isinstance(item, bool):
        return "true" if item else "false"
    return str(item)


# --------------------------------------------------------------------------- CSV

_CSV_DELIMITERS = ",;\t|"


def _parse_csv(source: Source, limits: _Limits) -> _Extracted:
    """One line per row, ``header: value; header: value``, so each value keeps its label."""
    text = _decode(source)
    # A cell may legitimately be huge (a pasted document); the default 128 KiB cap would
    # make the csv module raise. The limit is process-wide, so only ever raise it.
    csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))
    try:
        rows = csv.reader(io.StringIO(text, newline=""), _csv_dialect(text))
        header = [name.strip() for name in next(rows, [])]
        lines = [_csv_row(header, row) for row in rows]
    except csv.Error as exc:
        raise ParseError(
            f"{source.path}: the CSV cannot be read ({exc}). Fix it and upload again."
        ) from exc
    return _Extracted("\n".join(lines), metadata={"parser": "csv"})


def _csv_dialect(text: str) -> type[csv.Dialect] | csv.Dialect:
    try:
        return csv.Sniffer().sniff(text[:65536], delimiters=_CSV_DELIMITERS)
    except csv.Error:  # one column, or too irregular to tell
        first_line = text.split("\n", 1)[0]
        return csv.excel_tab if "\t" in first_line and "," not in first_line else csv.excel


def _csv_row(header: list[str], row: list[str]) -> str:
    pairs = []
    for index, value in enumerate(row):
        if not value.strip():
            continue
        name = header[index] if index < len(header) and header[index] else f"column {index + 1}"
        pairs.append(f"{name}: {value.strip()}")
    return "; ".join(pairs)


_PARSERS: dict[str, _Parser] = {
    sources.TEXT: _parse_text,
    sources.MARKDOWN: _parse_markdown,
    sources.HTML: _parse_html,
    sources.PDF: _parse_pdf,
    sources.DOCX: _parse_docx,
    sources.JSON: _parse_json,
    sources.CSV: _parse_csv,
}

__all__ = ["normalize_text", "parse"]
