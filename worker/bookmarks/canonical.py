"""Canonical URLs for bookmark dedupe, and which URLs we do not import at all.

``canonicalize(url)`` maps URLs that name the same page to one string, so that the importer
can dedupe on ``(user_id, canonical_url)``. It is deliberately conservative: two URLs that
*might* serve different content stay different. The rules, in the order applied:

1. Strip surrounding whitespace and remove tabs/newlines anywhere (browsers do the same
   when a URL is pasted; exports sometimes wrap long HREFs).
2. Lower-case the scheme and the host. The path keeps its case (servers may be
   case-sensitive).
3. IDNA-encode the host (``bücher.de`` → ``xn--bcher-kva.de``), so a Unicode host and its
   punycode form are equal. Normalise IPv6 literals (``[::0:1]`` → ``[::1]``).
4. Drop the userinfo (``user:pass@``): credentials are not part of the page's identity and
   must never be stored.
5. Remove default ports (``:80`` for http, ``:443`` for https, ``:21`` for ftp). Other ports
   are kept; a port with leading zeros is written without them.
6. Normalise the path: percent-escapes are upper-cased (``%2f`` → ``%2F``), escapes of
   unreserved characters are decoded (``%7E`` → ``~``, ``%41`` → ``A``), characters that
   must be escaped are escaped as UTF-8 (``é`` → ``%C3%A9``, space → ``%20``), and ``.`` /
   ``..`` segments are resolved (``/a/./b/../c`` → ``/a/c``). This is done by
   ``w3lib.url.canonicalize_url``, which also decodes escapes of characters that are
   literal-safe in a path (``%3A`` → ``:``). A trailing slash on a non-root path is kept
   (``/docs/`` and ``/docs`` are different resources on many servers).
7. An empty path and the bare root path are written as nothing:
   ``https://example.com/``, ``https://example.com`` and ``https://example.com:443/#top``
   all become ``https://example.com``.
8. Remove tracking parameters, matching the decoded name case-insensitively: every
   ``utm_*``, ``hsa_*``, ``pk_*`` and ``mtm_*`` name, and the names in
   ``TRACKING_PARAMS`` (``fbclid``, ``gclid``, ``msclkid``, ``mc_eid``, ``igshid`` …).
9. Sort the remaining query parameters by name. The sort is stable, so repeated names keep
   their relative order (``?tag=b&tag=a`` is not ``?tag=a&tag=b`` for many servers).
   ``w3lib`` sorts by name *and value*, which is why the query is handled here instead.
   Query names and values get the same percent-escape normalisation as the path; ``+`` is
   left as is. Empty pairs (``a=1&&b=2``) are dropped; ``?x`` and ``?x=`` stay different.
10. Remove an empty query (a bare ``?``).
11. Drop the fragment, except one that starts with ``!`` or ``/`` (``#!/inbox``,
    ``#/settings``): single-page apps route on those, so they name different pages.
12. Do NOT strip ``www.``, and do not touch a trailing dot on the host: different hosts may
    serve different content, and a missed duplicate costs far less than a wrong merge.

``canonicalize`` never raises: on input it cannot parse it returns the stripped input, so
that exact duplicates of a weird URL are still caught.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final
from urllib.parse import SplitResult, quote, unquote_plus, urlsplit

from w3lib.url import canonicalize_url

__all__ = [
    "DEFAULT_PORTS",
    "IMPORTABLE_SCHEMES",
    "SKIP_SCHEMES",
    "TRACKING_PARAMS",
    "TRACKING_PREFIXES",
    "canonicalize",
    "skip_reason",
]

# Schemes we never import, mapped to the reason key recorded for the skipped entry.
# Browser-internal pages cannot be fetched from the worker and mean nothing outside the
# browser that made them; bookmarklets and data: URLs are code or content, not addresses.
SKIP_SCHEMES: Final[Mapping[str, str]] = MappingProxyType(
    {
        "place": "place",  # Firefox smart folders ("Most Visited", "Recent Tags")
        "javascript": "javascript",  # bookmarklets
        "data": "data",
        "about": "about",
        "file": "file",
        "chrome": "browser",
        "chrome-extension": "browser",
        "chrome-search": "browser",
        "chrome-native": "browser",
        "edge": "browser",
        "brave": "browser",
        "opera": "browser",
        "vivaldi": "browser",
        "moz-extension": "browser",
        "resource": "browser",
        "view-source": "browser",
        "safari-extension": "browser",
        "safari-web-extension": "browser",
        "blob": "browser",
    }
)

# ftp is importable: it is a real, shareable address even if we may not fetch its content.
IMPORTABLE_SCHEMES: Final = frozenset({"http", "https", "ftp"})

DEFAULT_PORTS: Final[Mapping[str, int]] = MappingProxyType({"http": 80, "https": 443, "ftp": 21})

TRACKING_PREFIXES: Final = ("utm_", "hsa_", "pk_", "mtm_")
TRACKING_PARAMS: Final = frozenset(
    {
        "fbclid",
        "gclid",
        "gclsrc",
        "dclid",
        "gbraid",
        "wbraid",
        "msclkid",
        "yclid",
        "ttclid",
        "twclid",
        "li_fat_id",
        "srsltid",
        "mc_eid",
        "mc_cid",
        "igshid",
        "_hsenc",
        "_hsmi",
        "__hstc",
        "__hssc",
        "__hsfp",
        "mkt_tok",
        "ref_src",
        "spm",
        "vero_id",
        "vero_conv",
        "oly_enc_id",
        "oly_anon_id",
        "__s",
        "_ga",
        "_gl",
        "_kx",
    }
)

_ASCII_TAB_OR_NEWLINE: Final = re.compile(r"[\t\n\r]")
# RFC 3986 reg-name characters (after IDNA), or a bracketed IP literal.
_VALID_HOST: Final = re.compile(r"^(?:[A-Za-z0-9\-._~!$&'()*+,;=%]+|\[[0-9A-Fa-f:.]+\])$")
_ASCII_HOST: Final = re.compile(r"^[a-z0-9\-._]+$")
_PLAIN_URL: Final = re.compile(
    r"^(?:https?|ftp)://[A-Za-z0-9\-_]+(?:\.[A-Za-z0-9\-_]+)*\.?(?::([0-9]{1,5}))?(?:[/?#]|$)", re.I
)
# The shapes w3lib would return unchanged (checked against it by a property test): a host of
# plain lower-case ASCII labels, and a path of unreserved characters, sub-delims except ";"
# (w3lib reads it as the start of path parameters), ":" and "@", with no percent-escape and no
# segment starting with a dot (". / .." resolution).
_PLAIN_HOST: Final = re.compile(
    r"^[a-z0-9_](?:[a-z0-9\-_]{0,61}[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9\-_]{0,61}[a-z0-9_])?)*$"
)
_PLAIN_PATH: Final = re.compile(
    r"^(?:/(?:[A-Za-z0-9\-_~!$&'()*+,=:@][A-Za-z0-9\-._~!$&'()*+,=:@]*)?)*$"
)
_PLAIN_COMPONENT: Final = re.compile(r"^[A-Za-z0-9\-._~]*$")
_MAX_PORT: Final = 65535
_SCHEME: Final = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")
_PERCENT_ESCAPE: Final = re.compile(r"%([0-9A-Fa-f]{2})")
_STRAY_PERCENT: Final = re.compile(r"%(?![0-9A-Fa-f]{2})")
_UNRESERVED: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Characters left literal in query names/values and fragments (RFC 3986 pchar + "/" + "?",
# minus the "&" and "=" that delimit pairs, which are handled separately).
_QUERY_SAFE: Final = "!$'()*+,;:@/?%"
_FRAGMENT_SAFE: Final = "!$&'()*+,;=:@/?%"
# What canonicalize catches: errors from parsing odd input. Anything else (a task runner's
# time-limit exception, MemoryError) must propagate.
_URL_ERRORS: Final = (ValueError, LookupError, TypeError, AttributeError, AssertionError)


def skip_reason(url: str) -> str | None:
    """Return why ``url`` is not imported ("empty", "place", "javascript", "data", "about",
    "file", "browser", "invalid"), or None when it is an importable http(s)/ftp URL."""
    stripped = _strip(url)
    if not stripped:
        return "empty"
    match = _SCHEME.match(stripped)
    if match is None:
        return "invalid"  # no scheme: a relative link or free text
    scheme = match.group(1).lower()
    if scheme in SKIP_SCHEMES:
        return SKIP_SCHEMES[scheme]
    if scheme not in IMPORTABLE_SCHEMES:
        return "invalid"
    if _is_plain_url(stripped):
        return None
    return None if _has_valid_authority(stripped) else "invalid"


def canonicalize(url: str) -> str:
    """Return the dedupe key for ``url`` (see the module docstring for the rules)."""
    stripped = _strip(url)
    try:
        return _canonicalize(stripped)
    except _URL_ERRORS:
        return stripped


def _strip(url: str) -> str:
    return _ASCII_TAB_OR_NEWLINE.sub("", url).strip()


def _is_plain_url(url: str) -> bool:
    """Fast path for the common shape (ASCII host, maybe a port, no userinfo): a 100,000
    bookmark import calls skip_reason for every entry, and urlsplit is the slow part."""
    match = _PLAIN_URL.match(url)
    return match is not None and (match.group(1) is None or int(match.group(1)) <= _MAX_PORT)


def _has_valid_authority(url: str) -> bool:
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError on a non-numeric or out-of-range port
        hostname = parts.hostname or ""
        # Plain ASCII host names (nearly all of them) need no IDNA round trip.
        host = hostname if _ASCII_HOST.match(hostname) else _encoded_host(parts)
    except _URL_ERRORS:
        return False
    return bool(host) and _VALID_HOST.match(host) is not None


def _encoded_host(parts: SplitResult) -> str:
    """The host as canonicalize writes it (IDNA, lower case, IPv6 in brackets)."""
    hostname = parts.hostname or ""
    if not hostname:
        return ""
    if ":" in hostname:
        hostname = f"[{hostname}]"
    return urlsplit(canonicalize_url(f"{parts.scheme}://{hostname}/")).netloc


# The common shape split without urlsplit (a third of canonicalising 100,000 bookmarks went
# to urlsplit and its hostname/port properties): scheme, a host of plain ASCII labels, a
# port of ASCII digits (\d would take other scripts' digits, which int() reads but urlsplit
# refuses), and a path that is empty or starts with "/". Anything else (userinfo, IPv6,
# percent-escapes or non-ASCII in the host) takes urlsplit. A property test checks both give
# the same parts.
_SPLIT: Final = re.compile(
    r"^([A-Za-z][A-Za-z0-9+.\-]*)://([A-Za-z0-9\-_.]+)(?::([0-9]{1,5}))?(/[^?#]*)?"
    r"(?:\?([^#]*))?(?:#(.*))?\Z",
    re.S,
)


@dataclass(frozen=True, slots=True)
class _Parts:
    scheme: str  # lower case
    hostname: str  # lower case, no brackets
    port: int | None
    path: str
    query: str
    fragment: str


def _split(url: str) -> _Parts | None:
    """The parts canonicalize needs, or None for an opaque or relative URL (no authority).
    Raises ValueError for a port out of range, as urlsplit's ``port`` does."""
    match = _SPLIT.match(url)
    if match is not None:
        scheme, host, port, path, query, fragment = match.groups()
        number = None if port is None else int(port)
        if number is None or number <= _MAX_PORT:
            return _Parts(
                scheme.lower(), host.lower(), number, path or "", query or "", fragment or ""
            )
    parts = urlsplit(url)  # lower-cases the scheme
    if not parts.scheme or not parts.netloc:
        return None
    return _Parts(
        parts.scheme,
        parts.hostname or "",
        parts.port,
        parts.path,
        parts.query,
        parts.fragment,
    )


def _canonicalize(url: str) -> str:
    parts = _split(url)
    if parts is None:
        return url  # opaque (mailto:) or relative: nothing safe to normalise
    base = _scheme_host_path(parts)
    query = _canonical_query(parts.query)
    fragment = _canonical_fragment(parts.fragment)
    return base + (f"?{query}" if query else "") + (f"#{fragment}" if fragment else "")


def _scheme_host_path(parts: _Parts) -> str:
    """scheme://host[:port]/path with rules 2-7; userinfo is dropped by building from
    hostname/port only."""
    host = parts.hostname
    hostname = f"[{host}]" if ":" in host else host
    port = parts.port
    if port is not None and port != DEFAULT_PORTS.get(parts.scheme):
        hostname = f"{hostname}:{port}"
    if _PLAIN_HOST.match(host) and "xn--" not in host and _PLAIN_PATH.match(parts.path):
        # Nearly every bookmark: nothing for w3lib to change, at a tenth of its cost.
        return f"{parts.scheme}://{hostname}{parts.path if parts.path != '/' else ''}"
    # w3lib does IDNA, host case, percent-escape normalisation and dot segments; it gets no
    # query or fragment so that its value-sorting cannot reorder repeated parameters.
    normalised = canonicalize_url(f"{parts.scheme}://{hostname}{parts.path}")
    if normalised.endswith("/") and normalised.count("/") == 3:
        normalised = normalised[:-1]  # bare root path: "https://example.com/" → no slash
    return normalised


def _canonical_query(query: str) -> str:
    kept: list[tuple[str, str]] = []
    for pair in query.split("&"):
        if not pair:
            continue
        name, sep, value = pair.partition("=")
        if _is_tracking(name):
            continue
        norm_name = _normalise_escapes(name, _QUERY_SAFE)
        norm_pair = norm_name + sep + _normalise_escapes(value, _QUERY_SAFE + "=")
        kept.append((norm_name, norm_pair))
    kept.sort(key=lambda item: item[0])  # stable: repeated names keep their order
    return "&".join(pair for _, pair in kept)


def _is_tracking(name: str) -> bool:
    decoded = name.lower() if _PLAIN_COMPONENT.match(name) else unquote_plus(name).strip().lower()
    return decoded in TRACKING_PARAMS or decoded.startswith(TRACKING_PREFIXES)


def _canonical_fragment(fragment: str) -> str:
    if not fragment.startswith(("!", "/")):
        return ""
    return _normalise_escapes(fragment, _FRAGMENT_SAFE)


def _normalise_escapes(text: str, safe: str) -> str:
    """Escape what must be escaped (as UTF-8), upper-case existing escapes and decode the
    escapes of unreserved characters, so every spelling of a component compares equal."""
    if _PLAIN_COMPONENT.match(text):
        return text
    quoted = quote(text, safe=safe)
    quoted = _STRAY_PERCENT.sub("%25", quoted)
    return _PERCENT_ESCAPE.sub(_fix_escape, quoted)


def _fix_escape(match: re.Match[str]) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else "%" + match.group(1).upper()
