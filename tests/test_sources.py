"""Reading uploads safely (confinement, special files, size) and sniffing what they are."""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from pathlib import Path

import pytest

from worker.errors import ParseError, PermanentError, SourceError
from worker.ingest import sources
from worker.ingest.sources import decode_text, load_source, sniff_mime

MB = 1024 * 1024


@pytest.fixture
def root(tmp_path: Path) -> Path:
    upload_root = tmp_path / "uploads"
    upload_root.mkdir()
    return upload_root


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------- load_source


def test_relative_path_reads_file_hash_and_type(root: Path) -> None:
    write(root / "u1" / "note.txt", b"hello world")
    source = load_source("u1/note.txt", upload_root=root, max_bytes=MB)
    assert source.data == b"hello world"
    assert source.sha256 == hashlib.sha256(b"hello world").hexdigest()
    assert source.mime_type == "text/plain"
    assert source.path == str((root / "u1" / "note.txt").resolve())


def test_absolute_path_inside_root_is_accepted(root: Path) -> None:
    path = write(root / "a.md", b"# Title\n\ntext")
    assert load_source(path, upload_root=root, max_bytes=MB).mime_type == "text/markdown"


def test_symlink_inside_root_to_file_inside_root_is_accepted(root: Path) -> None:
    write(root / "real.txt", b"real")
    (root / "link.txt").symlink_to(root / "real.txt")
    assert load_source("link.txt", upload_root=root, max_bytes=MB).data == b"real"


def test_dotdot_escape_is_refused(root: Path) -> None:
    write(root.parent / "secret.txt", b"secret")
    with pytest.raises(SourceError, match="outside the upload root"):
        load_source("../secret.txt", upload_root=root, max_bytes=MB)


def test_absolute_path_outside_root_is_refused(root: Path) -> None:
    outside = write(root.parent / "elsewhere" / "x.txt", b"x")
    with pytest.raises(SourceError, match="outside the upload root"):
        load_source(outside, upload_root=root, max_bytes=MB)


def test_root_prefix_sibling_is_refused(root: Path) -> None:
    """/x/uploads-evil is not inside /x/uploads even though the string starts the same."""
    sibling = write(root.parent / "uploads-evil" / "x.txt", b"x")
    with pytest.raises(SourceError, match="outside the upload root"):
        load_source(sibling, upload_root=root, max_bytes=MB)


def test_symlink_escaping_root_is_refused(root: Path) -> None:
    secret = write(root.parent / "secret.txt", b"secret")
    (root / "innocent.txt").symlink_to(secret)
    with pytest.raises(SourceError, match="outside the upload root"):
        load_source("innocent.txt", upload_root=root, max_bytes=MB)


def test_symlink_to_device_is_refused(root: Path) -> None:
    (root / "zero.txt").symlink_to("/dev/zero")
    with pytest.raises(SourceError):
        load_source("zero.txt", upload_root=root, max_bytes=MB)


def test_fifo_is_refused_without_blocking(root: Path) -> None:
    os.mkfifo(root / "pipe.txt")
    with pytest.raises(SourceError, match="FIFO"):
        load_source("pipe.txt", upload_root=root, max_bytes=MB)


def test_directory_is_refused(root: Path) -> None:
    (root / "folder").mkdir()
    with pytest.raises(SourceError, match="directory"):
        load_source("folder", upload_root=root, max_bytes=MB)
    with pytest.raises(SourceError, match="directory"):
        load_source(".", upload_root=root, max_bytes=MB)


def test_symlink_loop_is_refused(root: Path) -> None:
    (root / "a").symlink_to(root / "b")
    (root / "b").symlink_to(root / "a")
    with pytest.raises(SourceError):
        load_source("a", upload_root=root, max_bytes=MB)


def test_nul_in_path_is_refused(root: Path) -> None:
    with pytest.raises(SourceError):
        load_source("a\x00b.txt", upload_root=root, max_bytes=MB)


def test_missing_file_says_deleted_or_moved(root: Path) -> None:
    with pytest.raises(SourceError, match="deleted or moved since it was enqueued"):
        load_source("gone.txt", upload_root=root, max_bytes=MB)


def test_file_over_cap_names_size_cap_and_setting(root: Path) -> None:
    write(root / "big.txt", b"x" * 2001)
    with pytest.raises(SourceError) as caught:
        load_source("big.txt", upload_root=root, max_bytes=2000)
    message = str(caught.value)
    assert "2,001" in message
    assert "2,000" in message
    assert "MAX_UPLOAD_BYTES" in message


def test_file_at_cap_is_read(root: Path) -> None:
    write(root / "exact.txt", b"x" * 2000)
    assert len(load_source("exact.txt", upload_root=root, max_bytes=2000).data) == 2000


def test_file_that_grows_after_stat_is_refused(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cap holds while reading, not just at the stat: at most max_bytes+1 are read."""
    path = write(root / "growing.txt", b"x" * 10)
    real_stat = sources._stat_regular

    def stat_then_grow(p: Path, max_bytes: int) -> os.stat_result:
        result = real_stat(p, max_bytes)
        path.write_bytes(b"x" * 5000)
        return result

    monkeypatch.setattr(sources, "_stat_regular", stat_then_grow)
    with pytest.raises(SourceError, match="MAX_UPLOAD_BYTES"):
        load_source("growing.txt", upload_root=root, max_bytes=100)


def test_file_swapped_after_stat_is_refused(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checked = write(root / "checked.txt", b"checked")
    write(root / "other.txt", b"other")
    real_stat = sources._stat_regular

    def stat_then_swap(p: Path, max_bytes: int) -> os.stat_result:
        result = real_stat(p, max_bytes)
        os.replace(root / "other.txt", checked)
        return result

    monkeypatch.setattr(sources, "_stat_regular", stat_then_swap)
    with pytest.raises(SourceError, match="changed while it was being opened"):
        load_source("checked.txt", upload_root=root, max_bytes=MB)


def test_empty_file_is_skipped_not_failed(root: Path) -> None:
    write(root / "empty.txt", b"")
    with pytest.raises(PermanentError, match="empty") as caught:
        load_source("empty.txt", upload_root=root, max_bytes=MB)
    assert caught.value.skip is True


def test_binary_garbage_named_txt_is_octet_stream(root: Path) -> None:
    write(root / "garbage.txt", os.urandom(4096))
    assert load_source("garbage.txt", upload_root=root, max_bytes=MB).mime_type == (
        "application/octet-stream"
    )


# --------------------------------------------------------------------------- sniff_mime


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("data", "filename", "expected"),
    [
        (b"%PDF-1.7\n...", "x.bin", "application/pdf"),
        (b"%PDF-1.4\n", "report.txt", "application/pdf"),
        (b"junk\x00\x01%PDF-1.4\n", "report.pdf", "application/pdf"),
        (b"A PDF starts with %PDF-1.7, then objects.", "notes.txt", "text/plain"),
        (
            _zip({"word/document.xml": b"<w/>", "[Content_Types].xml": b"<t/>"}),
            "x.zip",
            sources.DOCX,
        ),
        (_zip({"a.txt": b"a"}), "a.docx", "application/zip"),
        (b"PK\x03\x04 truncated", "broken.docx", sources.DOCX),
        (b"PK\x03\x04 truncated", "broken.zip", "application/zip"),
        (b"\xef\xbb\xbf  \n<!DOCTYPE html><html><p>x</p></html>", "page.txt", "text/html"),
        (b"<html lang=en><body>x</body></html>", "page", "text/html"),
        (b"\n\n<div>hello</div>", "fragment", "text/html"),
        (b"<div>hello</div>", "notes.md", "text/markdown"),
        (b'{"a": 1}', "data.txt", "application/json"),
        (b"[1, 2, 3]", "data", "application/json"),
        (b"[Intro] not json", "notes.txt", "text/plain"),
        (b'{"broken": ', "data.json", "application/json"),
        (b"a,b\n1,2\n", "table.csv", "text/csv"),
        (b"a\tb\n1\t2\n", "table.TSV", "text/csv"),
        (b"# Title\n\ntext", "readme.markdown", "text/markdown"),
        (b"just words", "file.weird", "text/plain"),
        ("caf\xe9".encode("latin-1"), "menu.txt", "text/plain"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10", "image.txt", sources.OCTET),
        (bytes(range(256)) * 8, "garbage.txt", sources.OCTET),
    ],
)
def test_sniff_mime(data: bytes, filename: str, expected: str) -> None:
    assert sniff_mime(data, filename) == expected


def test_sniff_large_utf8_file_cut_inside_a_character() -> None:
    """The sniffing sample may end half-way through a multi-byte character."""
    data = b"a" * (64 * 1024 - 1) + "é".encode() * 10
    assert sniff_mime(data, "big.txt") == "text/plain"


def test_sniff_deep_json_without_json_name_is_not_json_and_does_not_crash() -> None:
    assert sniff_mime(b"[" * 100_000, "deep.txt") == "text/plain"


# --------------------------------------------------------------------------- decode_text


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ("café".encode("latin-1"), "café"),
        ("Le café est très bon, déjà vu.".encode("latin-1"), "Le café est très bon, déjà vu."),
        (b"\x93quoted\x94 \x96 dash", "\u201cquoted\u201d \u2013 dash"),
        ("He said “hi” — naïve €5".encode("cp1252"), "He said “hi” — naïve €5"),
        ("Grüße".encode("utf-16"), "Grüße"),
        ("Grüße".encode("utf-16-be").join([b"\xfe\xff", b""]), "Grüße"),
        ("emoji 🎉".encode("utf-32"), "emoji 🎉"),
        (b"\xef\xbb\xbfbom utf8", "bom utf8"),
        ("plain utf-8 ünïcödé".encode(), "plain utf-8 ünïcödé"),
        ("hello world".encode("utf-16-le"), "hello world"),
        (b"nul\x00bytes\x00gone", "nulbytesgone"),
        ("Привет, как дела сегодня, мир".encode("cp1251"), "Привет, как дела сегодня, мир"),
        (b"", ""),
    ],
)
def test_decode_text(data: bytes, expected: str) -> None:
    assert decode_text(data) == expected


def test_mostly_utf8_with_a_bad_byte_keeps_utf8() -> None:
    data = "Grüße aus Köln, schöne Grüße ".encode() * 5 + b"\xff end"
    text = decode_text(data)
    assert "Grüße aus Köln" in text
    assert text.endswith("\ufffd end")


def test_invalid_utf8_never_raises() -> None:
    assert decode_text(b"hello \xc3\x28 world \xe2\x82").startswith("hello ")


@pytest.mark.parametrize(
    "data", [os.urandom(4096), b"\x00" * 100, bytes(range(1, 9)) * 50, bytes(range(256)) * 4]
)
def test_binary_content_raises_parse_error(data: bytes) -> None:
    with pytest.raises(ParseError, match="binary"):
        decode_text(data)
