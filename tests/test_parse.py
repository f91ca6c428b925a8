"""Text extraction per type, and the guarantee that bad input only ever raises our errors.

Every fixture is generated here (no binary files in the repository): PDFs by hand or with
pypdf's writer, DOCX with python-docx, zip bombs and XXE documents with zipfile.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import time
import zipfile
from pathlib import Path

import docx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pypdf import PdfReader
from pypdf.errors import DependencyError

from worker.errors import (
    ParseError,
    PermanentError,
    SourceError,
    UnsupportedTypeError,
    WorkerError,
)
from worker.fixtures import blank_pdf, encrypt_pdf, make_docx, make_pdf, rezip
from worker.ingest import sources
from worker.ingest.parse import normalize_text, parse
from worker.ingest.sources import load_source, sniff_mime
from worker.ingest.types import Document, Source

# --------------------------------------------------------------------------- fixtures


def source(data: bytes, mime: str | None = None, name: str = "upload.bin") -> Source:
    return Source(
        path=f"/uploads/{name}",
        data=data,
        mime_type=mime or sniff_mime(data, name),
        sha256=hashlib.sha256(data).hexdigest(),
    )


# --------------------------------------------------------------------------- plain text


def test_plain_text() -> None:
    document = parse(source(b"hello\r\nworld\n\n\n\n\nagain", name="a.txt"))
    assert document == Document(
        text="hello\nworld\n\nagain", mime_type="text/plain", metadata={"parser": "text"}
    )


def test_markdown_title_is_first_h1() -> None:
    document = parse(source(b"intro\n## Sub\n# The Title #\n\nbody", name="a.md"))
    assert document.mime_type == "text/markdown"
    assert document.title == "The Title"
    assert "body" in document.text


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ("café au lait".encode("latin-1"), "café au lait"),
        (b"\x93smart quotes\x94", "\u201csmart quotes\u201d"),
        ("UTF-16 with BOM: Grüße".encode("utf-16"), "UTF-16 with BOM: Grüße"),
        (b"nul\x00in\x00text", "nulintext"),
        (b"invalid \xc3\x28 utf8", "invalid \u00c3( utf8"),
    ],
)
def test_text_encodings(data: bytes, expected: str) -> None:
    assert parse(source(data, "text/plain")).text == expected


def test_binary_sent_as_text_is_parse_error_naming_file() -> None:
    with pytest.raises(ParseError, match=r"/uploads/upload\.bin.*binary"):
        parse(source(bytes(range(256)) * 4, "text/plain"))


def test_binary_garbage_txt_is_unsupported(tmp_path: Path) -> None:
    (tmp_path / "junk.txt").write_bytes(b"\x00\x01\x02\xff" * 1000)
    loaded = load_source("junk.txt", upload_root=tmp_path, max_bytes=10**6)
    with pytest.raises(UnsupportedTypeError, match=r"junk\.txt.*binary.*text/plain"):
        parse(loaded)


def test_five_megabyte_single_line(tmp_path: Path) -> None:
    line = ("word " * (1024 * 1024))[:-1].encode()
    (tmp_path / "long.txt").write_bytes(line)
    started = time.perf_counter()
    document = parse(load_source("long.txt", upload_root=tmp_path, max_bytes=10 * 2**20))
    assert len(document.text) == len(line)
    assert "\n" not in document.text
    assert time.perf_counter() - started < 5


def test_whitespace_only_is_skipped() -> None:
    with pytest.raises(PermanentError, match="no text to index") as caught:
        parse(source(b" \n\t\n \x00 ", "text/plain"))
    assert caught.value.skip


def test_normalize_text_keeps_bidi_and_emoji_and_drops_controls() -> None:
    raw = "e\u0301\x01\x1b[0m\u202eevil\u202c 👩‍👩‍👧 \ud800 a\n \n\n\n\nb\x0cc"
    assert normalize_text(raw) == "\u00e9[0m\u202eevil\u202c 👩‍👩‍👧  a\n\nb\nc"


# --------------------------------------------------------------------------- HTML


def test_html_prefers_main_and_drops_boilerplate() -> None:
    html = b"""<!doctype html><html><head><title> Page &amp; Title </title>
    <style>p{color:red}</style><script>var secret = 1;</script></head><body>
    <header>Site header</header><nav><a href="/">Home</a></nav>
    <main><h1>Heading</h1><p>First <b>bold</b>
       paragraph.</p><ul><li>one</li><li>two</li></ul><form>Search</form></main>
    <aside>Related</aside><footer>Copyright</footer></body></html>"""
    document = parse(source(html, name="page.html"))
    assert document.mime_type == "text/html"
    assert document.title == "Page & Title"
    assert document.text == "Heading\nFirst bold paragraph.\none\ntwo"
    assert document.metadata["parser"] == "selectolax"


def test_html_title_falls_back_to_h1_and_body_is_used_without_main() -> None:
    document = parse(source(b"<html><body><h1>Only H1</h1><p>text</p></body></html>"))
    assert document.title == "Only H1"
    assert document.text == "Only H1\ntext"


def test_html_meta_charset_is_honoured() -> None:
    html = '<html><head><meta charset="windows-1252"></head><body>“café”</body></html>'
    assert parse(source(html.encode("cp1252"), "text/html")).text == "“café”"


def test_html_with_only_scripts_is_skipped() -> None:
    html = b"<html><head><script>alert(1)</script></head><body><script>x()</script></body></html>"
    with pytest.raises(PermanentError, match="no text") as caught:
        parse(source(html, name="app.html"))
    assert caught.value.skip


# --------------------------------------------------------------------------- PDF


def test_pdf_text_title_and_pages() -> None:
    document = parse(source(make_pdf("Hello PDF world", title="Quarterly"), name="r.pdf"))
    assert document.mime_type == "application/pdf"
    assert document.text == "Hello PDF world"
    assert document.title == "Quarterly"
    assert document.metadata == {"parser": "pypdf", "pages": 1}


def test_pdf_encrypted_with_password_is_refused() -> None:
    with pytest.raises(ParseError, match=r"r\.pdf.*encrypted, remove the password"):
        parse(source(encrypt_pdf(make_pdf("secret text"), "secret"), name="r.pdf"))


def test_pdf_encrypted_with_empty_user_password_opens() -> None:
    document = parse(source(encrypt_pdf(make_pdf("open text"), ""), name="r.pdf"))
    assert document.text == "open text"


def test_pdf_aes_without_crypto_package_is_parse_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def needs_cryptography(self: PdfReader, password: str) -> None:
        raise DependencyError("cryptography>=3.1 is required for AES algorithm")

    monkeypatch.setattr(PdfReader, "decrypt", needs_cryptography)
    with pytest.raises(ParseError, match="encrypted"):
        parse(source(encrypt_pdf(make_pdf("x"), "pw"), name="r.pdf"))


def test_pdf_truncated_names_file() -> None:
    pdf = make_pdf("Hello PDF world")
    with pytest.raises(ParseError, match=r"r\.pdf.*truncated"):
        parse(source(pdf[: len(pdf) // 2], name="r.pdf"))


@pytest.mark.parametrize(
    "data",
    [
        b"%PDF-1.4\ngarbage\n%%EOF\n",
        b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF",
        make_pdf("x").replace(b"/Type /Pages", b"/Type /Oops!").replace(b"xref", b"xxxx"),
    ],
)
def test_pdf_corrupt_is_parse_error(data: bytes) -> None:
    with pytest.raises(ParseError, match=r"r\.pdf"):
        parse(source(data, "application/pdf", name="r.pdf"))


def test_pdf_without_text_layer_is_skipped_saying_no_ocr() -> None:
    with pytest.raises(PermanentError, match="OCR is not supported") as caught:
        parse(source(blank_pdf(), name="scan.pdf"))
    assert caught.value.skip


# --------------------------------------------------------------------------- DOCX


def test_docx_paragraphs_tables_and_core_title() -> None:
    document = parse(source(make_docx(title="Core Title", body="Body text."), name="d.docx"))
    assert document.mime_type == sources.DOCX
    assert document.title == "Core Title"
    assert document.text == "Report\n\nBody text.\n\nName | Score\n\nAlice | 42\n\nAfter the table."
    assert document.metadata == {"parser": "python-docx"}


def test_docx_title_falls_back_to_first_heading() -> None:
    assert parse(source(make_docx(heading="The Heading"), name="d.docx")).title == "The Heading"


def test_docx_zip_bomb_by_ratio_is_refused() -> None:
    bomb = rezip(make_docx(), add=8 * 1024 * 1024)  # 8 MiB of zeros compress ~1000:1
    with pytest.raises(ParseError, match=r"d\.docx: refused: looks like a zip bomb"):
        parse(source(bomb, name="d.docx"))


def test_docx_zip_bomb_by_total_size_is_refused() -> None:
    with pytest.raises(ParseError, match=r"zip bomb \([\d,]+ bytes uncompressed"):
        parse(source(make_docx(), name="d.docx"), max_decompressed_bytes=10_000)


def test_docx_with_too_many_members_is_refused() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("word/document.xml", b"<w/>")
        for index in range(10_000):
            archive.writestr(f"x/{index}", b"")
    with pytest.raises(ParseError, match="zip bomb"):
        parse(source(buffer.getvalue(), name="d.docx"))


def _xxe_docx(secret: Path) -> bytes:
    original = make_docx()
    with zipfile.ZipFile(io.BytesIO(original)) as archive:
        xml = archive.read("word/document.xml")
    declaration, rest = xml.split(b"\n", 1)
    doctype = b'<!DOCTYPE w:document [<!ENTITY xxe SYSTEM "file://%s">]>' % str(secret).encode()
    evil = declaration + b"\n" + doctype + b"\n" + rest.replace(b"PLACEHOLDER", b"&xxe;")
    return rezip(original, replace={"word/document.xml": evil})


def test_docx_with_xxe_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET")
    with pytest.raises(ParseError, match="declares a DTD") as caught:
        parse(source(_xxe_docx(secret), name="d.docx"))
    assert "TOPSECRET" not in str(caught.value)


def test_python_docx_itself_does_not_resolve_external_entities(tmp_path: Path) -> None:
    """Even without our DTD refusal, python-docx's parser must not read the file."""
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET")
    document = docx.Document(io.BytesIO(_xxe_docx(secret)))
    assert "TOPSECRET" not in "\n".join(p.text for p in document.paragraphs)


@pytest.mark.parametrize("data", [b"PK\x03\x04 not really a zip", b"", make_docx()[:3000]])
def test_docx_damaged_is_parse_error(data: bytes) -> None:
    with pytest.raises(ParseError, match=r"d\.docx"):
        parse(source(data, sources.DOCX, name="d.docx"))


def test_docx_missing_parts_is_parse_error() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("word/document.xml", b"<not-word/>")
    with pytest.raises(ParseError, match=r"d\.docx.*damaged"):
        parse(source(buffer.getvalue(), name="d.docx"))


# --------------------------------------------------------------------------- JSON


def test_json_keys_and_values_in_document_order() -> None:
    data = {
        "title": "Doc",
        "tags": ["a", "b"],
        "nested": {"n": 1, "ok": True, "none": None, "deep": [{"x": "y"}]},
        "last": "z",
    }
    document = parse(source(json.dumps(data).encode(), name="d.json"))
    assert document.title == "Doc"
    assert document.text.split("\n") == [
        "title: Doc",
        "tags:",
        "a",
        "b",
        "nested:",
        "n: 1",
        "ok: true",
        "deep:",
        "x: y",
        "last: z",
    ]
    assert document.metadata == {"parser": "json"}


def test_json_hundred_thousand_levels_is_parse_error_not_recursion_error() -> None:
    for data in (b"[" * 100_000, b"[" * 100_000 + b"]" * 100_000):
        with pytest.raises(ParseError, match="nested deeper than 64 levels"):
            parse(source(data, "application/json", name="d.json"))


def test_json_depth_limit_is_exact() -> None:
    assert parse(source(b"[" * 64 + b'"ok"' + b"]" * 64, "application/json")).text == "ok"
    with pytest.raises(ParseError, match="deeper than 64"):
        parse(source(b"[" * 65 + b'"no"' + b"]" * 65, "application/json"))
    with pytest.raises(ParseError, match="deeper than 3"):
        parse(source(b'{"a": {"b": {"c": {"d": 1}}}}', "application/json"), max_json_depth=3)


def test_json_invalid_is_parse_error_naming_file() -> None:
    with pytest.raises(ParseError, match=r"d\.json: the file is not valid JSON"):
        parse(source(b'{"a": ', "application/json", name="d.json"))


def test_json_lone_surrogate_does_not_break_text() -> None:
    text = parse(source(b'["a\\ud800b"]', "application/json")).text
    assert text == "ab"
    text.encode("utf-8")


# --------------------------------------------------------------------------- CSV


def test_csv_rows_as_header_value_pairs() -> None:
    data = b'name,city,note\nAlice,Paris,"likes, commas"\nBob,,"multi\nline"\n'
    document = parse(source(data, name="t.csv"))
    assert document.mime_type == "text/csv"
    assert document.text == (
        "name: Alice; city: Paris; note: likes, commas\nname: Bob; note: multi\nline"
    )


def test_tsv_and_semicolons_are_sniffed() -> None:
    assert parse(source(b"a\tb\n1\t2\n", name="t.tsv")).text == "a: 1; b: 2"
    assert parse(source(b"a;b\n1;2\n3;4\n", name="t.csv")).text == "a: 1; b: 2\na: 3; b: 4"


def test_csv_extra_columns_and_single_column() -> None:
    assert parse(source(b"a,b\n1,2,3\n", name="t.csv")).text == "a: 1; b: 2; column 3: 3"
    assert parse(source(b"word\nhello\n", name="t.csv")).text == "word: hello"


def test_csv_huge_field_does_not_crash() -> None:
    big = "x" * (1024 * 1024)
    data = f'h1,h2\n"{big}",small\n'.encode()
    assert parse(source(data, name="t.csv")).text == f"h1: {big}; h2: small"


def test_csv_header_only_is_skipped() -> None:
    with pytest.raises(PermanentError, match="no text") as caught:
        parse(source(b"a,b,c\n", name="t.csv"))
    assert caught.value.skip


# --------------------------------------------------------------------------- dispatch


@pytest.mark.parametrize("mime", ["application/zip", "application/octet-stream", "image/png"])
def test_unsupported_types_list_supported_ones(mime: str) -> None:
    with pytest.raises(UnsupportedTypeError) as caught:
        parse(source(b"whatever", mime, name="x.bin"))
    message = str(caught.value)
    assert "/uploads/x.bin" in message
    assert "application/pdf" in message
    assert "text/csv" in message


def test_end_to_end_from_upload_root(tmp_path: Path) -> None:
    (tmp_path / "r.pdf").write_bytes(make_pdf("From disk"))
    assert parse(load_source("r.pdf", upload_root=tmp_path, max_bytes=2**20)).text == "From disk"
    with pytest.raises(SourceError):
        load_source("../r.pdf", upload_root=tmp_path / "sub", max_bytes=2**20)


# --------------------------------------------------------------------------- properties

_PREFIXES = [
    b"",
    b"%PDF-1.4\n",
    b"PK\x03\x04",
    b"<html>",
    b"{",
    b"[",
    b"\xef\xbb\xbf",
    b"\xff\xfe",
]
_NAMES = ["f.txt", "f.md", "f.html", "f.json", "f.csv", "f.tsv", "f.pdf", "f.docx", "f"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prefix=st.sampled_from(_PREFIXES),
    body=st.binary(max_size=2048) | st.text(max_size=512).map(str.encode),
    suffix=st.sampled_from([b"", b"\n%%EOF\n"]),
    name=st.sampled_from(_NAMES),
)
def test_any_bytes_give_a_document_or_a_worker_error(
    prefix: bytes, body: bytes, suffix: bytes, name: str
) -> None:
    data = prefix + body + suffix
    try:
        result = parse(source(data, name=name))
    except WorkerError:
        return
    assert isinstance(result, Document)
    assert result.text
    result.text.encode("utf-8")  # storable: no lone surrogates


@settings(max_examples=50, deadline=None)
@given(pdf_cut=st.integers(min_value=1, max_value=400), flip=st.integers(0, 255))
def test_damaged_pdfs_and_docx_give_worker_errors(pdf_cut: int, flip: int) -> None:
    for original, name in ((make_pdf("abc"), "f.pdf"), (_DOCX, "f.docx")):
        data = bytearray(original)
        position = (pdf_cut * 7919) % len(data)
        data[position] = flip
        for candidate in (bytes(data), bytes(data[:-pdf_cut])):
            with contextlib.suppress(WorkerError):
                parse(source(candidate, name=name))


_DOCX = make_docx()
