"""Fetching a bookmarked page, safely (off by default: ``FETCH_PAGES``).

A bookmark file is untrusted input, and so is every server it names: a URL or a redirect
may point at the worker's own network (the database, Redis, a cloud metadata service at
169.254.169.254). The rules, in the order they apply:

1. Only ``http`` and ``https``; credentials in a URL are dropped, never sent.
2. Every hop (the first URL and each redirect) is resolved and refused when ANY of its
   addresses is loopback, private, link-local, CGNAT, multicast, reserved, unspecified, or an
   IPv6 form that embeds one of those (``check_address``). Redirects are followed here, by
   hand, so that no hop escapes the check.
3. DNS rebinding: the client built here connects through ``_VettedBackend``, which resolves
   the host again at connect time, vets those addresses and connects to a vetted one, so
   the address checked is the address connected to. A caller that passes its own
   ``client`` only gets the per-hop check: between that check and its transport's own
   resolution an attacker's DNS could change the answer (a TOCTOU window of one lookup).
   Name resolution itself has no timeout of ours (the system resolver's applies).
4. The Content-Type is checked from the headers, before any of the body is read; a declared
   Content-Length over the cap is refused at once; the body is streamed and reading stops
   as soon as it passes ``max_bytes`` (decompressed bytes are counted).
5. Each connect/read waits at most ``timeout`` seconds and the whole fetch at most
   ``total_timeout``, so a server dripping one byte per read timeout cannot hold a worker.

Every refusal is a ``FetchError`` (a ``PermanentError``) whose ``reason`` says which rule.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import socket
import time
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Final, Literal

import httpcore
import httpx

from worker.config import Settings
from worker.errors import PermanentError
from worker.ingest import sources
from worker.ingest.parse import parse
from worker.ingest.types import Source

__all__ = [
    "FetchError",
    "FetchPolicy",
    "FetchReason",
    "FetchedPage",
    "check_address",
    "check_url",
    "fetch_page",
    "page_fetching_enabled",
    "policy_from_settings",
    "redirect_target",
]

FetchReason = Literal[
    "blocked_address",
    "too_large",
    "bad_content_type",
    "http_status",
    "timeout",
    "too_many_redirects",
    "invalid_url",
    "connect",
]

HTML_TYPES: Final = frozenset({"text/html", "application/xhtml+xml"})
DEFAULT_CONTENT_TYPES: Final = frozenset({*HTML_TYPES, "text/plain"})
REDIRECT_STATUSES: Final = frozenset({301, 302, 303, 307, 308})
ALLOWED_SCHEMES: Final = frozenset({"http", "https"})

# Not flagged by every Python's ipaddress (100.64/10 is neither private nor global; the
# others embed an IPv4 address that must be vetted as IPv4).
_CGNAT: Final = ipaddress.IPv4Network("100.64.0.0/10")
_NAT64: Final = ipaddress.IPv6Network("64:ff9b::/96")
_IPV4_COMPATIBLE: Final = ipaddress.IPv6Network("::/96")


class FetchError(PermanentError):
    """A page was not fetched; ``reason`` is one of ``FetchReason`` (stable, for counting)."""

    def __init__(self, message: str, *, reason: FetchReason, url: str = "") -> None:
        super().__init__(message)
        self.reason: FetchReason = reason
        self.url = url


@dataclass(frozen=True)
class FetchPolicy:
    timeout: float = 10.0  # seconds per connect and per read
    max_bytes: int = 5 * 1024 * 1024  # of the (decompressed) body
    max_redirects: int = 5
    allowed_content_types: frozenset[str] = DEFAULT_CONTENT_TYPES
    allow_private: bool = False  # True only for tests and trusted intranets
    user_agent: str = "ingestion-worker/1.0 (bookmark fetcher)"
    total_timeout: float = 30.0  # seconds for the whole fetch, every hop and the body


@dataclass(frozen=True)
class FetchedPage:
    final_url: str
    status: int
    content_type: str  # the media type only, lower-case: "text/html"
    text: str  # main content (HTML) or the normalised text (text/plain)
    title: str


# --------------------------------------------------------------------------- settings


def page_fetching_enabled(settings: Settings) -> bool:
    """Whether bookmark imports fetch pages at all (``FETCH_PAGES``, off by default)."""
    return settings.fetch_pages


def policy_from_settings(settings: Settings) -> FetchPolicy:
    return FetchPolicy(
        timeout=settings.fetch_timeout,
        max_bytes=settings.fetch_max_bytes,
        max_redirects=settings.fetch_max_redirects,
        allow_private=settings.fetch_allow_private,
        # A few slow reads are normal; a fetch that takes many read timeouts is not.
        total_timeout=3 * settings.fetch_timeout,
    )


# --------------------------------------------------------------------------- addresses


def check_address(host: str, port: int, *, allow_private: bool) -> list[str]:
    """Resolve ``host`` (every A/AAAA) and return its addresses, or refuse them all.

    One bad address refuses the host: which of them a connection uses is not ours to pick
    when the resolver rotates them. IP literals are never sent to DNS.
    """
    addresses = _resolve(host, port)
    if not allow_private:
        for address in addresses:
            if _is_blocked(ipaddress.ip_address(address)):
                raise FetchError(
                    f"{host}: resolves to {address}, a private, loopback or reserved address; "
                    "pages on internal networks are not fetched (FETCH_ALLOW_PRIVATE)",
                    reason="blocked_address",
                )
    return addresses


def _resolve(host: str, port: int) -> list[str]:
    try:
        return [str(ipaddress.ip_address(host.strip("[]")))]
    except ValueError:
        pass  # a name: ask the resolver
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise FetchError(f"{host}: cannot resolve the name ({exc})", reason="connect") from exc
    # sockaddr[0] is the address; an IPv6 one may carry a scope ("fe80::1%eth0").
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise FetchError(f"{host}: the name has no address", reason="connect")
    return addresses


def _is_blocked(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if any(_is_blocked(inner) for inner in _embedded_ipv4(ip)):
        return True
    return (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_reserved
        or ip.is_multicast
        or ip.is_unspecified
        or not ip.is_global
        or (isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT)
        or (isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local)
    )


def _embedded_ipv4(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address carries (mapped, 6to4, Teredo, NAT64, compatible):
    ``::ffff:127.0.0.1`` reaches 127.0.0.1 on most dual-stack hosts."""
    if isinstance(ip, ipaddress.IPv4Address):
        return []
    found = [ip.ipv4_mapped, ip.sixtofour, *(ip.teredo or ())]
    if ip in _NAT64 or (ip in _IPV4_COMPATIBLE and int(ip) > 1):  # not :: and ::1
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return [inner for inner in found if inner is not None]


# --------------------------------------------------------------------------- URLs, hops


def check_url(url: str | httpx.URL, policy: FetchPolicy) -> httpx.URL:
    """The URL to request for one hop, after its scheme and every address of its host
    were vetted. Credentials are dropped: they would follow redirects to other hosts."""
    parsed = _parse_url(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    check_address(_host(parsed), port, allow_private=policy.allow_private)
    return parsed.copy_with(userinfo=b"")


def redirect_target(response: httpx.Response, policy: FetchPolicy) -> httpx.URL:
    """Where a redirect points, vetted like the first URL (called once per hop)."""
    location = response.headers.get("location", "").strip()
    try:
        target = response.url.join(location)
    except httpx.InvalidURL as exc:
        raise FetchError(
            f"{response.url}: redirects to an invalid URL {location!r}",
            reason="invalid_url",
            url=str(response.url),
        ) from exc
    return check_url(target, policy)


def _parse_url(url: str | httpx.URL) -> httpx.URL:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise FetchError(
            f"{url}: not a valid URL ({exc})", reason="invalid_url", url=str(url)
        ) from exc
    if parsed.scheme not in ALLOWED_SCHEMES or not parsed.raw_host:
        raise FetchError(
            f"{url}: only http:// and https:// pages with a host are fetched",
            reason="invalid_url",
            url=str(url),
        )
    return parsed


def _host(url: httpx.URL) -> str:
    # raw_host is the IDNA (ASCII) form the resolver needs; IPv6 comes without brackets.
    return url.raw_host.decode("ascii")


# --------------------------------------------------------------------------- fetching


def fetch_page(url: str, policy: FetchPolicy, *, client: httpx.Client | None = None) -> FetchedPage:
    """GET ``url`` under ``policy`` and extract its text. Raises ``FetchError``; the parser's
    ``PermanentError`` (a skipping one for a page with no text) passes through.

    ``client`` (tests, connection reuse) is used as given and not closed; only the client
    built here connects to the vetted address itself (see the module's rule 3).
    """
    deadline = time.monotonic() + policy.total_timeout
    target = check_url(url, policy)  # before any client exists: a refusal sends nothing
    owned: AbstractContextManager[httpx.Client] = (
        _guarded_client(policy) if client is None else nullcontext(client)
    )
    with owned as http:
        for hop in range(policy.max_redirects + 1):
            with _open(http, target, policy, deadline) as response:
                if not _is_redirect(response):
                    return _read_page(response, policy, deadline)
                if hop == policy.max_redirects:
                    break
                target = redirect_target(response, policy)
    raise FetchError(
        f"{url}: more than {policy.max_redirects} redirects (a loop?)",
        reason="too_many_redirects",
        url=url,
    )


def _is_redirect(response: httpx.Response) -> bool:
    return response.status_code in REDIRECT_STATUSES and "location" in response.headers


@contextmanager
def _open(
    http: httpx.Client, url: httpx.URL, policy: FetchPolicy, deadline: float
) -> Iterator[httpx.Response]:
    """One streamed GET; leaving the block closes it without reading the rest."""
    timeout = httpx.Timeout(min(policy.timeout, _left(deadline, url)))
    headers = {
        "User-Agent": policy.user_agent,
        "Accept": "text/html,application/xhtml+xml,text/plain;q=0.9",
    }
    with (
        _mapped_errors(url),
        http.stream(
            "GET", url, headers=headers, timeout=timeout, follow_redirects=False
        ) as response,
    ):
        yield response


@contextmanager
def _mapped_errors(url: httpx.URL) -> Iterator[None]:
    """httpx's exceptions as ``FetchError`` (ours, raised in the transport, pass as is)."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise FetchError(f"{url}: timed out ({exc!r})", reason="timeout", url=str(url)) from exc
    except httpx.HTTPError as exc:
        raise FetchError(
            f"{url}: connection failed ({exc!r})", reason="connect", url=str(url)
        ) from exc


def _left(deadline: float, url: httpx.URL) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise FetchError(f"{url}: the fetch took too long", reason="timeout", url=str(url))
    return left


def _read_page(response: httpx.Response, policy: FetchPolicy, deadline: float) -> FetchedPage:
    url = str(response.url)
    if not 200 <= response.status_code < 300:
        raise FetchError(
            f"{url}: the server answered HTTP {response.status_code}",
            reason="http_status",
            url=url,
        )
    media_type = _check_content_type(response, policy)
    _check_declared_length(response, policy)
    with _mapped_errors(response.url):
        body = _read_capped(response.iter_bytes(), policy.max_bytes, deadline, response.url)
    text = _decode_body(body, response.charset_encoding, html=media_type in HTML_TYPES)
    document = parse(_as_source(url, text, html=media_type in HTML_TYPES))
    return FetchedPage(
        final_url=url,
        status=response.status_code,
        content_type=media_type,
        text=document.text,
        title=document.title,
    )


def _check_content_type(response: httpx.Response, policy: FetchPolicy) -> str:
    header = str(response.headers.get("content-type", ""))
    media_type = header.split(";", 1)[0].strip().lower()
    if media_type not in policy.allowed_content_types:
        raise FetchError(
            f"{response.url}: content type {media_type or 'missing'!r} is not fetched "
            f"(only {', '.join(sorted(policy.allowed_content_types))})",
            reason="bad_content_type",
            url=str(response.url),
        )
    return media_type


def _check_declared_length(response: httpx.Response, policy: FetchPolicy) -> None:
    declared = response.headers.get("content-length", "")
    # With compression the header counts compressed bytes: over the cap is still too large.
    if declared.isdigit() and int(declared) > policy.max_bytes:
        raise _too_large(response.url, policy.max_bytes)


def _read_capped(chunks: Iterable[bytes], max_bytes: int, deadline: float, url: httpx.URL) -> bytes:
    body = bytearray()
    for chunk in chunks:
        body += chunk
        if len(body) > max_bytes:
            raise _too_large(url, max_bytes)  # stop here: the rest is never read
        _left(deadline, url)
    return bytes(body)


def _too_large(url: httpx.URL, max_bytes: int) -> FetchError:
    return FetchError(
        f"{url}: the page is larger than {max_bytes} bytes (FETCH_MAX_BYTES)",
        reason="too_large",
        url=str(url),
    )


# --------------------------------------------------------------------------- decoding

_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.I)
_META_CHARSET_TEXT = re.compile(r"""(<meta[^>]+charset\s*=\s*["']?\s*)[A-Za-z0-9_.:-]+""", re.I)
_BOMS: Final = (b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")


def _decode_body(data: bytes, header_charset: str | None, *, html: bool) -> str:
    """A BOM, then the header's charset, then ``<meta charset>`` (HTML's order), each only if
    it decodes the bytes; else ``decode_text`` sniffs (and refuses binary)."""
    if not data.startswith(_BOMS):
        for charset in (header_charset, _meta_charset(data) if html else None):
            if charset:
                try:
                    return data.decode(charset).replace("\x00", "")
                except (LookupError, UnicodeDecodeError):
                    continue  # a wrong or unknown label: try the next source
    return sources.decode_text(data)


def _meta_charset(data: bytes) -> str | None:
    match = _META_CHARSET.search(data[:4096])
    return match.group(1).decode("ascii") if match else None


def _as_source(url: str, text: str, *, html: bool) -> Source:
    """The decoded page as UTF-8 bytes for ``parse``. Its ``<meta charset>`` is rewritten
    because ``parse`` honours it and the bytes are no longer in that charset."""
    if html:
        text = _META_CHARSET_TEXT.sub(r"\1utf-8", text)
    data = text.encode("utf-8")
    return Source(
        path=url,
        data=data,
        mime_type="text/html" if html else "text/plain",
        sha256=hashlib.sha256(data).hexdigest(),
    )


# --------------------------------------------------------------------------- transport


class _VettedBackend(httpcore.SyncBackend):
    """Connects only to addresses ``check_address`` vetted in this very call, so a DNS
    answer that changes after the per-hop check (rebinding) is caught. The hostname still
    goes to TLS (SNI, certificate check) and the Host header; only the socket uses the IP."""

    def __init__(self, *, allow_private: bool) -> None:
        self._allow_private = allow_private

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        addresses = check_address(host, port, allow_private=self._allow_private)
        failure: httpcore.ConnectError | httpcore.ConnectTimeout | None = None
        for address in addresses:  # like create_connection: the first one that answers
            try:
                return super().connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None  # check_address never returns an empty list
        raise failure


class _GuardedTransport(httpx.HTTPTransport):
    def __init__(self, policy: FetchPolicy) -> None:
        # trust_env=False: an HTTP(S)_PROXY from the environment would do the connecting
        # (and the resolving) where no check reaches.
        super().__init__(trust_env=False)
        # httpx takes no network backend, so its pool is replaced by one that has ours; the
        # rest of HTTPTransport (request mapping, exception mapping) is used as it is.
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=4,
            max_keepalive_connections=2,
            network_backend=_VettedBackend(allow_private=policy.allow_private),
        )


def _guarded_client(policy: FetchPolicy) -> httpx.Client:
    return httpx.Client(
        transport=_GuardedTransport(policy),
        follow_redirects=False,
        trust_env=False,
        timeout=httpx.Timeout(policy.timeout),
    )
