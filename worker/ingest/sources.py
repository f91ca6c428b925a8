"""Reading an uploaded file safely, and deciding what it is.

The path in a queued item comes from another service and the file may have changed since it
was enqueued, so nothing here trusts it: the path is resolved and confined to the upload
root, only regular files are opened (a FIFO would block the worker forever, a device could
be endless), the size is capped before and while reading, and the type is sniffed from the
bytes rather than taken from the name.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
import stat
import zipfile
import zlib
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

from charset_normalizer import from_bytes

from worker.errors import ParseError, PermanentError, SourceError
from worker.ingest.types import Source

PDF = "application/pdf"
DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
ZIP = "application/zip"
HTML = "text/html"
JSON = "application/json"
CSV = "text/csv"
MARKDOWN = "text/markdown"
TEXT = "text/plain"
OCTET = "application/octet-stream"

# Bytes of the head that sniffing decodes: enough to see any marker, cheap on a 100 MB file.
_SNIFF_BYTES = 64 * 1024
# Files up to this size are fully parsed as JSON when sniffing content without a .json name.
_JSON_SNIFF_MAX = 8 * 1024 * 1024
_READ_CHUNK = 1024 * 1024

# What zipfile raises on a damaged archive: besides BadZipFile, zlib.error for corrupt
# deflate data, NotImplementedError for an unknown method or version, RuntimeError for a
# password-protected member, EOFError/ValueError/OSError for cut or nonsensical headers.
ZIP_ERRORS: tuple[type[Exception], ...] = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    zlib.error,
    NotImplementedError,
    RuntimeError,
    EOFError,
    ValueError,
    OSError,
)

_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NOFOLLOW", 0)  # the last component must not have become a symlink
    | getattr(os, "O_NONBLOCK", 0)  # a FIFO swapped in after the stat must not block us
    | getattr(os, "O_CLOEXEC", 0)
)


def load_source(path: str | os.PathLike[str], *, upload_root: Path, max_bytes: int) -> Source:
    """Read the upload at ``path`` (relative to ``upload_root`` or absolute) and sniff it.

    Raises ``SourceError`` for anything that must not or cannot be read, and a skipping
    ``PermanentError`` for an empty file (valid, but nothing to index).
    """
    resolved = resolve_inside(path, upload_root)
    data = _read_capped(resolved, max_bytes)
    if not data:
        raise PermanentError(f"{resolved}: the file is empty; nothing to index", skip=True)
    return Source(
        path=str(resolved),
        data=data,
        mime_type=sniff_mime(data, resolved.name),
        sha256=hashlib.sha256(data).hexdigest(),
    )


def resolve_inside(path: str | os.PathLike[str], upload_root: Path) -> Path:
    """Resolve symlinks and ``..`` and refuse a result outside the upload root.

    The check is on the resolved path, so a symlink inside the root that points outside it
    (to /etc/passwd, /dev/zero) is refused like a literal ``../../etc/passwd``.
    """
    try:
        root = Path(upload_root).resolve()
        candidate = Path(path)
        if not candidate.is_absolute():
            candidate = root / candidate
        resolved = candidate.resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # symlink loop, NUL in path
        raise SourceError(f"{path}: cannot resolve the upload path ({exc})") from exc
    if not resolved.is_relative_to(root):
        raise SourceError(
            f"{path}: resolves to {resolved}, outside the upload root {root}; refused. "
            "Uploads must be stored under the upload root (check UPLOAD_ROOT)."
        )
    return resolved


def open_source(path: str | os.PathLike[str], *, upload_root: Path, max_bytes: int) -> BinaryIO:
    """Open a file under the upload root for streaming (bookmark exports), with the same
    refusals as ``load_source``: outside the root, not a regular file, over the cap."""
    resolved = resolve_inside(path, upload_root)
    before = _stat_regular(resolved, max_bytes)
    if before.st_size == 0:
        raise PermanentError(f"{resolved}: the file is empty; nothing to import", skip=True)
    try:
        fd = os.open(resolved, _OPEN_FLAGS)
    except FileNotFoundError as exc:
        raise _missing(resolved) from exc
    except OSError as exc:
        raise SourceError(f"{resolved}: cannot open the file ({exc.strerror})") from exc
    try:
        _check_same_file(resolved, before, os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def _read_capped(path: Path, max_bytes: int) -> bytes:
    """Read at most ``max_bytes`` of a regular file, refusing anything else unopened."""
    before = _stat_regular(path, max_bytes)
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError as exc:
        raise _missing(path) from exc
    except OSError as exc:  # ELOOP: swapped for a symlink after the stat; EACCES
        raise SourceError(f"{path}: cannot open the upload ({exc.strerror})") from exc
    try:
        _check_same_file(path, before, os.fstat(fd))
        data = _read_at_most(fd, max_bytes + 1)
    finally:
        os.close(fd)
    if len(data) > max_bytes:  # it grew after the stat
        raise _too_large(path, len(data), max_bytes, at_least=True)
    return data


def _stat_regular(path: Path, max_bytes: int) -> os.stat_result:
    """``lstat`` the path and refuse missing, special and oversized files before opening."""
    try:
        st = os.lstat(path)
    except FileNotFoundError as exc:
        raise _missing(path) from exc
    except OSError as exc:
        raise SourceError(f"{path}: cannot stat the upload ({exc.strerror})") from exc
    if not stat.S_ISREG(st.st_mode):
        raise SourceError(
            f"{path}: is a {_kind(st.st_mode)}, not a regular file; refused without reading it. "
            "Upload a regular file."
        )
    if st.st_size > max_bytes:
        raise _too_large(path, st.st_size, max_bytes)
    return st


def _check_same_file(path: Path, before: os.stat_result, after: os.stat_result) -> None:
    """Refuse if what we opened is not what we checked (the path was swapped in between)."""
    same = (before.st_dev, before.st_ino) == (after.st_dev, after.st_ino)
    if not same or not stat.S_ISREG(after.st_mode):
        raise SourceError(f"{path}: the file changed while it was being opened; try again")


def _read_at_most(fd: int, limit: int) -> bytes:
    """Read until EOF or ``limit`` bytes, whichever comes first."""
    parts: list[bytes] = []
    remaining = limit
    while remaining > 0:
        chunk = os.read(fd, min(_READ_CHUNK, remaining))
        if not chunk:
            break
        parts.append(chunk)
        remaining -= len(chunk)
    return b"".join(parts)


def _kind(mode: int) -> str:
    """A person's name for a file type, for error messages."""
    kinds = [
        (stat.S_ISDIR, "directory"),
        (stat.S_ISFIFO, "FIFO (named pipe)"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISLNK, "symbolic link"),
    ]
    return next((name for test, name in kinds if test(mode)), "special file")


def _missing(path: Path) -> SourceError:
    return SourceError(
        f"{path}: file not found; it was deleted or moved since it was enqueued. Upload it again."
    )


def _too_large(path: Path, size: int, cap: int, *, at_least: bool = False) -> SourceError:
    more = "more than " if at_least else ""
    return SourceError(
        f"{path}: file is {more}{size:,} bytes, over the cap of {cap:,} bytes "
        "(MAX_UPLOAD_BYTES). Upload a smaller file or raise MAX_UPLOAD_BYTES."
    )


# --------------------------------------------------------------------------- sniffing

_HTML_STRONG = re.compile(r"<(!doctype\s+html|html)[\s>]", re.IGNORECASE)
_HTML_WEAK = re.compile(
    r"<(head|body|title|meta|link|script|style|div|p|h[1-6]|table|ul|ol|a|br|section|article)"
    r"[\s>/]",
    re.IGNORECASE,
)
# Names whose own type wins over a weak HTML guess: a .md may start with a <div>.
_TEXTUAL_EXTENSIONS = {".txt", ".text", ".md", ".markdown", ".csv", ".tsv", ".json"}


def sniff_mime(data: bytes, filename: str) -> str:
    """The file's type, from its content first and its name only to break ties.

    Names lie (binary garbage called ``.txt``, a PDF called ``.docx``); magic bytes do not.
    """
    ext = os.path.splitext(filename)[1].lower()
    if _is_pdf(data, ext):
        return PDF
    if data[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return _sniff_zip(data, ext)
    head = _text_head(data)
    if head is None:
        return OCTET
    start = head.lstrip("\ufeff \t\r\n")[:1024]
    if _HTML_STRONG.match(start) or (ext not in _TEXTUAL_EXTENSIONS and _HTML_WEAK.match(start)):
        return HTML
    if start[:1] in ("{", "[") and (ext == ".json" or _parses_as_json(data)):
        return JSON
    return _by_extension(ext)


def _is_pdf(data: bytes, ext: str) -> bool:
    """Readers accept a header anywhere in the first KiB, but a text file that merely
    mentions "%PDF-" must stay text, so junk before the header is allowed only in a .pdf."""
    return data.lstrip()[:5] == b"%PDF-" or (ext == ".pdf" and b"%PDF-" in data[:1024])


def _by_extension(ext: str) -> str:
    """For content that is text but has no marker of its own."""
    return {
        ".csv": CSV,
        ".tsv": CSV,
        ".md": MARKDOWN,
        ".markdown": MARKDOWN,
        ".html": HTML,
        ".htm": HTML,
        ".json": JSON,
    }.get(ext, TEXT)


def _sniff_zip(data: bytes, ext: str) -> str:
    """A DOCX is a zip with ``word/document.xml``; any other zip is just a zip.

    A damaged zip named ``.docx`` is still called DOCX so the parser can say it is damaged.
    """
    try:
        with zipfile.ZipFile(BytesIO(data)) as archive:
            names = set(archive.namelist())
    except ZIP_ERRORS:
        return DOCX if ext == ".docx" else ZIP
    return DOCX if "word/document.xml" in names else ZIP


def _parses_as_json(data: bytes) -> bool:
    if len(data) > _JSON_SNIFF_MAX:
        return False
    try:
        json.loads(decode_text(data))
    except (ValueError, RecursionError, ParseError):
        return False
    return True


def _text_head(data: bytes) -> str | None:
    """The decoded start of the file, or None when it is binary."""
    sample = data if len(data) <= _SNIFF_BYTES else _trim_partial_utf8(data[:_SNIFF_BYTES])
    try:
        return decode_text(sample)
    except ParseError:
        return None


def _trim_partial_utf8(sample: bytes) -> bytes:
    """Drop a UTF-8 sequence cut in half at the end of a sample, so it still decodes."""
    for back in range(1, min(4, len(sample)) + 1):
        byte = sample[-back]
        if byte < 0x80:
            return sample
        if byte >= 0xC0:  # lead byte: how long should its sequence be?
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return sample[:-back] if need > back else sample
    return sample


# --------------------------------------------------------------------------- decoding

_BOMS = [  # UTF-32 first: its little-endian BOM starts with UTF-16's
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
]
# C0 controls that never occur in text (tab, newlines, form feed and ESC do).
_CONTROL_BYTES = bytes(sorted(set(range(0x20)) - {0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x1B}))
_HIGH_BYTES = bytes(range(0x80, 0x100))
_CONTROL_CHARS = re.compile("[\x00-\x08\x0e-\x1a\x1c-\x1f]")
_HIGH_RUN = re.compile(rb"[\x80-\xff]{3,}")


def decode_text(data: bytes) -> str:
    """Bytes to text, whatever the encoding; NUL bytes removed.

    Order matters: a BOM is certain; strict UTF-8 almost never accepts text in another
    encoding; charset-normalizer guesses badly on short Western text (it calls "café" in
    Latin-1 UTF-16), so Western-looking bytes go straight to cp1252. Raises ``ParseError``
    only when the bytes are clearly not text.
    """
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            return data[len(bom) :].decode(encoding, errors="replace").replace("\x00", "")
    text = _decode_wide(data) or _decode_utf8(data) or _decode_legacy(data)
    if _control_ratio_str(text) > 0.3:
        raise ParseError("the content is binary, not text")
    return text.replace("\x00", "")


def _decode_utf8(data: bytes) -> str | None:
    """Strict UTF-8, or UTF-8 with a few bad bytes replaced when the rest clearly is UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    text = data.decode("utf-8", errors="replace")
    bad = text.count("\ufffd")
    good_multibyte = len(text) - len(text.encode("ascii", errors="ignore")) - bad
    if good_multibyte > bad and bad <= max(1, len(text) // 100):
        return text
    return None


def _decode_wide(data: bytes) -> str | None:
    """UTF-16/32 without a BOM, which strict UTF-8 would happily accept.

    Mostly-ASCII UTF-16 has a NUL in every other byte; a stray NUL in UTF-8 text does not.
    """
    half = len(data) // 2
    if half == 0 or max(data[0::2].count(0), data[1::2].count(0)) <= 0.3 * half:
        return None
    guess = _guess_with_charset_normalizer(data)
    if guess is not None and guess[0].startswith(("utf_16", "utf_32")):
        return guess[1]
    return None


def _decode_legacy(data: bytes) -> str:
    """Text that is not UTF-8: Western single-byte (most often), or anything else."""
    if _control_ratio_bytes(data) > 0.05:
        raise ParseError("the content is binary, not text")
    if not _looks_non_western(data):
        return _decode_cp1252(data)
    guess = _guess_with_charset_normalizer(data)
    return guess[1] if guess is not None else _decode_cp1252(data)


def _looks_non_western(data: bytes) -> bool:
    """Western single-byte text has isolated high bytes (é, ü, curly quotes); Cyrillic,
    Greek or CJK text has words made of them."""
    high = len(data) - len(data.translate(None, _HIGH_BYTES))
    in_runs = sum(len(run) for run in _HIGH_RUN.findall(data))
    return high > 0 and in_runs / high > 0.2


def _decode_cp1252(data: bytes) -> str:
    """cp1252 is Latin-1 plus curly quotes and dashes in 0x80-0x9F; five bytes there are
    undefined, and Latin-1 decodes anything."""
    try:
        return data.decode("cp1252")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _guess_with_charset_normalizer(data: bytes) -> tuple[str, str] | None:
    try:
        best = from_bytes(data).best()
    except (LookupError, ValueError, UnicodeError):  # it should not, but must never crash us
        return None
    return None if best is None else (best.encoding, str(best))


def _control_ratio_bytes(data: bytes) -> float:
    sample = data[:_SNIFF_BYTES]
    if not sample:
        return 0.0
    return (len(sample) - len(sample.translate(None, _CONTROL_BYTES))) / len(sample)


def _control_ratio_str(text: str) -> float:
    sample = text[:_SNIFF_BYTES]
    if not sample:
        return 0.0
    return len(_CONTROL_CHARS.findall(sample)) / len(sample)


__all__ = ["decode_text", "load_source", "sniff_mime"]
