"""Bookmark page fetching: the SSRF guards, the limits and the extraction.

No database and no network: the only server is an ``http.server`` on 127.0.0.1 started
here; anything else is an IP literal given to ``check_address`` (never connected to) or a
``httpx.MockTransport``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from worker.bookmarks import fetch
from worker.bookmarks.fetch import (
    FetchError,
    FetchPolicy,
    check_address,
    fetch_page,
    page_fetching_enabled,
    policy_from_settings,
)
from worker.config import load_settings
from worker.errors import PermanentError

ARTICLE = (
    "<!doctype html><html><head><title>Café notes</title>"
    "<script>var tracking = 'SCRIPT-NOISE';</script></head><body>"
    "<nav>Home | About | NAV-NOISE</nav>"
    "<main><h1>Brewing</h1><p>Grind the beans coarsely, then wait four minutes.</p></main>"
    "<footer>FOOTER-NOISE</footer></body></html>"
)
HUGE_TOTAL = 40 * 1024 * 1024
SLOW_SECONDS = 2.0


@dataclass
class Served:
    base: str
    port: int
    paths: list[str] = field(default_factory=list)
    huge_sent: list[int] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    served: Served

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        self.served.paths.append(self.path)
        route = _ROUTES.get(self.path.split("?")[0])
        if route is None:
            self._send(404, "text/html", b"<html><body><p>Not here.</p></body></html>")
        else:
            route(self)

    def _send(self, status: int, content_type: str, body: bytes, **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()


def _article(h: _Handler) -> None:
    h._send(200, "text/html; charset=utf-8", ARTICLE.encode())


def _latin1(h: _Handler) -> None:
    # No charset in the header: the <meta> one must be honoured (é is one byte, 0xE9).
    page = (
        '<html><head><meta charset="iso-8859-1"><title>Été</title></head>'
        "<body><p>Crème brûlée.</p></body></html>"
    )
    h._send(200, "text/html", page.encode("latin-1"))


def _header_charset(h: _Handler) -> None:
    # The header wins over a wrong <meta>: the bytes are cp1251 (Cyrillic).
    page = '<html><head><meta charset="utf-8"></head><body><p>Привет, мир.</p></body></html>'
    h._send(200, "text/html; charset=windows-1251", page.encode("cp1251"))


def _plain(h: _Handler) -> None:
    h._send(200, "text/plain; charset=utf-8", b"Just some plain text.\r\nSecond line.")


def _huge(h: _Handler) -> None:
    # No Content-Length: the client can only find out by reading.
    h.send_response(200)
    h.send_header("Content-Type", "text/html")
    h.send_header("Connection", "close")
    h.end_headers()
    chunk, sent = b"<p>" + b"x" * 65530 + b"</p>", 0
    try:
        while sent < HUGE_TOTAL:
            h.wfile.write(chunk)
            sent += len(chunk)
    except OSError:  # the client hung up: what we want
        pass
    h.served.huge_sent.append(sent)


def _declared_huge(h: _Handler) -> None:
    h.send_response(200)
    h.send_header("Content-Type", "text/html")
    h.send_header("Content-Length", str(HUGE_TOTAL))
    h.end_headers()  # and no body at all: the header alone must be enough to refuse


def _png(h: _Handler) -> None:
    h._send(200, "image/png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)


def _slow(h: _Handler) -> None:
    time.sleep(SLOW_SECONDS)
    with contextlib.suppress(OSError):  # the client gave up long ago
        _article(h)


def _drip(h: _Handler) -> None:
    h.send_response(200)
    h.send_header("Content-Type", "text/html")
    h.end_headers()
    try:
        for _ in range(int(SLOW_SECONDS / 0.1)):
            h.wfile.write(b"<p>drip</p>")
            h.wfile.flush()
            time.sleep(0.1)
    except OSError:
        pass


_ROUTES: dict[str, Callable[[_Handler], None]] = {
    "/article": _article,
    "/latin1": _latin1,
    "/header-charset": _header_charset,
    "/plain": _plain,
    "/redirect": lambda h: h._redirect("/article"),
    "/redirect-absolute": lambda h: h._redirect(f"{h.served.base}/article"),
    "/huge": _huge,
    "/declared-huge": _declared_huge,
    "/image": _png,
    "/slow": _slow,
    "/drip": _drip,
    "/loop-a": lambda h: h._redirect("/loop-b"),
    "/loop-b": lambda h: h._redirect("/loop-a"),
    "/to-file": lambda h: h._redirect("file:///etc/passwd"),
}


@pytest.fixture(scope="module")
def _server() -> Iterator[Served]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    port = server.server_address[1]
    served = Served(base=f"http://127.0.0.1:{port}", port=port)
    _Handler.served = served
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served
    server.shutdown()
    server.server_close()


@pytest.fixture
def server(_server: Served) -> Served:
    _server.paths.clear()
    _server.huge_sent.clear()
    return _server


LOCAL = FetchPolicy(allow_private=True, timeout=0.5, total_timeout=1.0, max_bytes=256 * 1024)


def _reason(call: Callable[[], object]) -> str:
    with pytest.raises(FetchError) as info:
        call()
    return info.value.reason


# --------------------------------------------------------------------------- pages


def test_html_main_content_and_title(server: Served) -> None:
    page = fetch_page(f"{server.base}/article", LOCAL)
    assert page.status == 200
    assert page.content_type == "text/html"
    assert page.final_url == f"{server.base}/article"
    assert page.title == "Café notes"
    assert "Grind the beans coarsely" in page.text
    for noise in ("SCRIPT-NOISE", "NAV-NOISE", "FOOTER-NOISE"):
        assert noise not in page.text


def test_charset_from_meta_and_from_header(server: Served) -> None:
    latin = fetch_page(f"{server.base}/latin1", LOCAL)
    assert latin.title == "Été" and "Crème brûlée." in latin.text
    cyrillic = fetch_page(f"{server.base}/header-charset", LOCAL)
    assert "Привет, мир." in cyrillic.text


def test_plain_text(server: Served) -> None:
    page = fetch_page(f"{server.base}/plain", LOCAL)
    assert page.content_type == "text/plain"
    assert page.text == "Just some plain text.\nSecond line."
    assert page.title == ""


@pytest.mark.parametrize("path", ["/redirect", "/redirect-absolute"])
def test_redirect_is_followed(server: Served, path: str) -> None:
    page = fetch_page(f"{server.base}{path}", LOCAL)
    assert page.final_url == f"{server.base}/article"
    assert "Grind the beans" in page.text
    assert server.paths == [path, "/article"]


def test_credentials_are_not_sent() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, headers={"Content-Type": "text/plain"}, text="hello there")

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        fetch_page("http://user:secret@93.184.216.34/x", FetchPolicy(), client=client)
    assert "authorization" not in seen[0].headers
    assert seen[0].url.userinfo == b""


# --------------------------------------------------------------------------- limits


def test_huge_page_stops_reading_at_the_cap(server: Served) -> None:
    assert _reason(lambda: fetch_page(f"{server.base}/huge", LOCAL)) == "too_large"
    deadline = time.monotonic() + 5
    while not server.huge_sent and time.monotonic() < deadline:
        time.sleep(0.05)
    # The server could push only what the socket buffers held before the client hung up.
    assert server.huge_sent and server.huge_sent[0] < HUGE_TOTAL


def test_declared_length_over_the_cap_is_refused(server: Served) -> None:
    assert _reason(lambda: fetch_page(f"{server.base}/declared-huge", LOCAL)) == "too_large"


def test_non_html_content_type(server: Served) -> None:
    assert _reason(lambda: fetch_page(f"{server.base}/image", LOCAL)) == "bad_content_type"


def test_http_error_status(server: Served) -> None:
    with pytest.raises(FetchError) as info:
        fetch_page(f"{server.base}/missing", LOCAL)
    assert info.value.reason == "http_status" and "404" in str(info.value)
    assert isinstance(info.value, PermanentError)


def test_slow_server_times_out(server: Served) -> None:
    started = time.monotonic()
    assert _reason(lambda: fetch_page(f"{server.base}/slow", LOCAL)) == "timeout"
    assert time.monotonic() - started < SLOW_SECONDS


def test_dripping_server_hits_the_total_timeout(server: Served) -> None:
    started = time.monotonic()
    assert _reason(lambda: fetch_page(f"{server.base}/drip", LOCAL)) == "timeout"
    assert time.monotonic() - started < SLOW_SECONDS


def test_redirect_loop(server: Served) -> None:
    policy = FetchPolicy(allow_private=True, timeout=0.5, max_redirects=3)
    assert _reason(lambda: fetch_page(f"{server.base}/loop-a", policy)) == "too_many_redirects"
    assert len(server.paths) == 4  # the first request and three redirects, then stop


def test_no_redirects_allowed(server: Served) -> None:
    policy = FetchPolicy(allow_private=True, timeout=0.5, max_redirects=0)
    assert _reason(lambda: fetch_page(f"{server.base}/redirect", policy)) == "too_many_redirects"
    assert server.paths == ["/redirect"]


def test_redirect_to_another_scheme_is_refused(server: Served) -> None:
    assert _reason(lambda: fetch_page(f"{server.base}/to-file", LOCAL)) == "invalid_url"
    assert server.paths == ["/to-file"]


# --------------------------------------------------------------------------- SSRF


@pytest.mark.parametrize("path", ["/article", "/redirect"])
def test_loopback_refused_before_any_connection(server: Served, path: str) -> None:
    strict = FetchPolicy(timeout=0.5)
    assert _reason(lambda: fetch_page(f"{server.base}{path}", strict)) == "blocked_address"
    local_name = f"http://localhost:{server.port}{path}"
    assert _reason(lambda: fetch_page(local_name, strict)) == "blocked_address"
    assert server.paths == []


def _fake_dns(
    monkeypatch: pytest.MonkeyPatch,
    names: dict[str, list[str]],
    *,
    then: list[str] | None = None,
) -> list[str]:
    """Answer lookups of ``names`` from the table (``then`` from the second lookup of a name
    on: a rebinding DNS), fail other names, and pass IP literals to the real resolver
    (``socket.create_connection`` looks them up too). Returns the names looked up."""
    real = socket.getaddrinfo
    looked_up: list[str] = []

    def getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        try:
            ipaddress.ip_address(host)
            return real(host, port, *args, **kwargs)
        except ValueError:
            pass
        looked_up.append(host)
        if host not in names:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        answer = then if then is not None and looked_up.count(host) > 1 else names[host]
        family = {4: socket.AF_INET, 6: socket.AF_INET6}
        return [
            (family[ipaddress.ip_address(a).version], socket.SOCK_STREAM, 6, "", (a, port))
            for a in answer
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return looked_up


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "::1",
        "10.0.0.1",
        "192.168.1.1",
        "172.16.0.1",
        "172.31.255.254",
        "169.254.169.254",
        "100.64.0.1",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "0.0.0.0",
        "::",
        "fe80::1",
        "fc00::1",
        "fd12:3456::1",
        "224.0.0.1",
        "ff02::1",
        "240.0.0.1",
        "255.255.255.255",
        "2002:7f00:1::",  # 6to4 wrapping 127.0.0.1
        "64:ff9b::a9fe:a9fe",  # NAT64 wrapping 169.254.169.254
        "2130706433",  # 127.0.0.1 written as one number
        "127.1",
    ],
)
def test_check_address_refuses(address: str) -> None:
    with pytest.raises(FetchError) as info:
        check_address(address, 80, allow_private=False)
    assert info.value.reason == "blocked_address"


@pytest.mark.parametrize("address", ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"])
def test_check_address_allows_public_literals(address: str) -> None:
    # A literal never reaches DNS, and check_address never connects.
    assert check_address(address, 443, allow_private=False) == [address]


def test_check_address_allow_private() -> None:
    assert check_address("127.0.0.1", 80, allow_private=True) == ["127.0.0.1"]


def test_localhost_name_is_refused() -> None:
    with pytest.raises(FetchError) as info:
        check_address("localhost", 80, allow_private=False)
    assert info.value.reason == "blocked_address"


def test_one_private_address_among_public_ones_refuses_the_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _fake_dns(monkeypatch, {"mixed.example": ["93.184.216.34", "10.1.2.3"]})
    with pytest.raises(FetchError) as info:
        check_address("mixed.example", 80, allow_private=False)
    assert info.value.reason == "blocked_address"


def test_unresolvable_name(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_dns(monkeypatch, {})
    assert _reason(lambda: check_address("nowhere.invalid", 80, allow_private=False)) == "connect"


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://93.184.216.34/file.txt",
        "javascript:alert(1)",
        "data:text/html,<p>hi</p>",
        "http:///no-host",
        "//93.184.216.34/no-scheme",
        "http://[::1",
    ],
)
def test_non_http_urls_are_invalid(url: str) -> None:
    assert _reason(lambda: fetch_page(url, FetchPolicy())) == "invalid_url"


def _mock_client(routes: dict[str, httpx.Response], seen: list[str]) -> httpx.Client:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return routes[str(request.url)]

    return httpx.Client(transport=httpx.MockTransport(handler))


@pytest.mark.parametrize(
    "location",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://127.0.0.1:6379/",
        "http://[::ffff:10.0.0.1]/",
        "http://localhost/admin",
    ],
)
def test_redirect_to_a_blocked_address_is_refused_without_a_request(location: str) -> None:
    # The first hop is a public literal served by a mock transport: nothing leaves the host.
    start = "http://93.184.216.34/start"
    seen: list[str] = []
    routes = {start: httpx.Response(302, headers={"Location": location})}
    with _mock_client(routes, seen) as client, pytest.raises(FetchError) as info:
        fetch_page(start, FetchPolicy(), client=client)
    assert info.value.reason == "blocked_address"
    assert seen == [start]


def test_redirect_target_is_the_per_hop_check() -> None:
    request = httpx.Request("GET", "http://93.184.216.34/a/b")
    relative = httpx.Response(302, headers={"Location": "../c?d=1"}, request=request)
    assert str(fetch.redirect_target(relative, FetchPolicy())) == "http://93.184.216.34/c?d=1"
    metadata = httpx.Response(
        301, headers={"Location": "//169.254.169.254/latest"}, request=request
    )
    assert _reason(lambda: fetch.redirect_target(metadata, FetchPolicy())) == "blocked_address"


def test_every_hop_goes_through_check_url(monkeypatch: pytest.MonkeyPatch) -> None:
    checked: list[str] = []
    real = fetch.check_url

    def spy(url: str | httpx.URL, policy: FetchPolicy) -> httpx.URL:
        checked.append(str(url))
        return real(url, policy)

    monkeypatch.setattr(fetch, "check_url", spy)
    seen: list[str] = []
    routes = {
        "http://93.184.216.34/1": httpx.Response(302, headers={"Location": "/2"}),
        "http://93.184.216.34/2": httpx.Response(
            200, headers={"Content-Type": "text/plain"}, text="arrived"
        ),
    }
    with _mock_client(routes, seen) as client:
        page = fetch_page("http://93.184.216.34/1", FetchPolicy(), client=client)
    assert page.text == "arrived"
    assert checked == ["http://93.184.216.34/1", "http://93.184.216.34/2"]


def test_dns_rebinding_is_caught_at_connect(
    server: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The per-hop check sees a public address; the connect-time lookup sees loopback.
    The guarded transport connects only to what it vetted itself, so nothing is sent."""
    lookups = _fake_dns(monkeypatch, {"rebind.example": ["93.184.216.34"]}, then=["127.0.0.1"])
    url = f"http://rebind.example:{server.port}/article"
    assert _reason(lambda: fetch_page(url, FetchPolicy(timeout=0.5))) == "blocked_address"
    assert lookups == ["rebind.example", "rebind.example"]  # the hop check, then the connect
    assert server.paths == []


def test_guarded_transport_connects_to_the_vetted_address(
    server: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name that resolves to the test server (allowed here) is fetched by its IP, with the
    name kept in the Host header."""

    _fake_dns(monkeypatch, {"site.example": ["127.0.0.1"]})
    page = fetch_page(f"http://site.example:{server.port}/article", LOCAL)
    assert "Grind the beans" in page.text
    assert server.paths == ["/article"]


# --------------------------------------------------------------------------- settings


def test_settings_defaults_and_policy() -> None:
    settings = load_settings()
    assert page_fetching_enabled(settings) is False
    policy = policy_from_settings(settings)
    assert policy == FetchPolicy(total_timeout=30.0)
    assert policy.allow_private is False and policy.max_redirects == 5

    custom = load_settings(
        fetch_pages=True,
        fetch_timeout=2.5,
        fetch_max_bytes=1000,
        fetch_max_redirects=1,
        fetch_allow_private=True,
    )
    assert page_fetching_enabled(custom) is True
    policy = policy_from_settings(custom)
    assert (policy.timeout, policy.max_bytes, policy.max_redirects) == (2.5, 1000, 1)
    assert policy.allow_private is True and policy.total_timeout == 7.5
