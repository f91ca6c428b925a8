"""Sample documents generated in code (no binary files in the repository), shared by the
tests and the benchmarks: PDFs, DOCX, zip bombs, and deterministic prose."""

from __future__ import annotations

import io
import zipfile

import docx
from pypdf import PdfReader, PdfWriter


def make_pdf(text: str | None, title: str = "") -> bytes:
    """A minimal valid PDF: one page, Helvetica, one ``Tj`` text object, exact xref."""
    content = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode() if text else b""
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
        b"/Resources << /Font << /F1 5 0 R >> >> /Contents 4 0 R >>",
        b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        b"<< /Title (%s) >>" % title.encode(),
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R /Info 6 0 R >>\n" % (len(objects) + 1)
    out += b"startxref\n%d\n%%%%EOF\n" % xref
    return bytes(out)


def encrypt_pdf(pdf: bytes, user_password: str) -> bytes:
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(pdf)))
    # RC4 needs no optional crypto package; AES would need `cryptography`.
    writer.encrypt(user_password=user_password, owner_password="owner", algorithm="RC4-128")
    buffer = io.BytesIO()
    writer.write(buffer)
    return buffer.getvalue()


def blank_pdf() -> bytes:
    writer = PdfWriter()
    writer.add_blank_page(width=200, height=200)
    buffer = io.BytesIO()
    writer.write(buffer)
    return buffer.getvalue()


def make_docx(*, title: str = "", heading: str = "Report", body: str = "PLACEHOLDER") -> bytes:
    document = docx.Document()
    document.core_properties.title = title
    document.add_heading(heading, level=1)
    document.add_paragraph(body)
    table = document.add_table(rows=2, cols=2)
    for row, values in zip(table.rows, [("Name", "Score"), ("Alice", "42")], strict=True):
        for cell, value in zip(row.cells, values, strict=True):
            cell.text = value
    document.add_paragraph("After the table.")
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()


def rezip(data: bytes, *, replace: dict[str, bytes] | None = None, add: int = 0) -> bytes:
    """Copy a zip, replacing members and optionally adding ``add`` bytes of zeros."""
    replace = replace or {}
    buffer = io.BytesIO()
    with (
        zipfile.ZipFile(io.BytesIO(data)) as old,
        zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as new,
    ):
        for item in old.infolist():
            new.writestr(item.filename, replace.get(item.filename, old.read(item.filename)))
        if add:
            # Streamed in 1 MiB pieces, so the test never holds the bomb in memory.
            with new.open("word/media/zeros.bin", "w", force_zip64=True) as member:
                block = b"\0" * (1024 * 1024)
                for _ in range(add // len(block)):
                    member.write(block)
    return buffer.getvalue()


_TOPICS = {
    "history": "mill river railway village century market farmers bridge castle museum",
    "science": "experiment cells energy molecules telescope climate ocean genome laboratory data",
    "cooking": "bread flour oven yeast dough butter recipe kitchen spices soup",
    "sport": "football match season coach league goal training stadium players tactics",
    "finance": "market shares bank interest inflation budget investors savings bonds prices",
}
_GLUE = [
    "the",
    "a",
    "of",
    "and",
    "in",
    "to",
    "with",
    "for",
    "on",
    "by",
    "from",
    "near",
    "after",
    "before",
    "while",
]


def prose(seed: int, paragraphs: int, *, sentences: int = 5, topic: str | None = None) -> str:
    """Deterministic English-like text on one topic: paragraphs of varied sentences."""
    import random

    rng = random.Random(seed)
    topic = topic or sorted(_TOPICS)[seed % len(_TOPICS)]
    words = _TOPICS[topic].split()
    out = []
    for _ in range(paragraphs):
        sents = []
        for _ in range(sentences):
            n = rng.randint(8, 20)
            body = [
                rng.choice(words) if rng.random() < 0.45 else rng.choice(_GLUE) for _ in range(n)
            ]
            sents.append(" ".join(body).capitalize() + ".")
        out.append(" ".join(sents))
    return "\n\n".join(out)
