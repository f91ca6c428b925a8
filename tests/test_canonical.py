"""URL canonicalisation for dedupe, and the URLs we skip: one case per documented rule."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.bookmarks.canonical import SKIP_SCHEMES, canonicalize, skip_reason

CANONICAL_CASES = [
    # scheme and host
    pytest.param("HTTPS://example.com/a", "https://example.com/a", id="scheme-lowercased"),
    pytest.param("https://ExAmPle.COM/a", "https://example.com/a", id="host-lowercased"),
    pytest.param(
        "https://example.com/CaseKept", "https://example.com/CaseKept", id="path-case-kept"
    ),
    pytest.param("https://bücher.de/a", "https://xn--bcher-kva.de/a", id="idna-host"),
    pytest.param("https://BÜCHER.de/", "https://xn--bcher-kva.de", id="idna-host-uppercase"),
    pytest.param("http://[::0:1]:8080/x", "http://[::1]:8080/x", id="ipv6-normalised"),
    pytest.param("https://www.example.com/", "https://www.example.com", id="www-kept"),
    # ports
    pytest.param("http://example.com:80/a", "http://example.com/a", id="default-port-http"),
    pytest.param("https://example.com:443/a", "https://example.com/a", id="default-port-https"),
    pytest.param("ftp://example.com:21/pub", "ftp://example.com/pub", id="default-port-ftp"),
    pytest.param("https://example.com:8443/a", "https://example.com:8443/a", id="other-port-kept"),
    pytest.param(
        "http://example.com:443/a", "http://example.com:443/a", id="https-port-on-http-kept"
    ),
    pytest.param("https://example.com:0443/a", "https://example.com/a", id="port-leading-zeros"),
    # userinfo
    pytest.param(
        "https://user:secret@example.com/a", "https://example.com/a", id="userinfo-dropped"
    ),
    # fragments
    pytest.param("https://example.com/a#section-2", "https://example.com/a", id="fragment-dropped"),
    pytest.param(
        "https://mail.example.com/#!/inbox", "https://mail.example.com#!/inbox", id="hashbang-kept"
    ),
    pytest.param(
        "https://app.example.com/#/settings",
        "https://app.example.com#/settings",
        id="spa-route-kept",
    ),
    pytest.param("https://example.com/a#", "https://example.com/a", id="empty-fragment-dropped"),
    # tracking parameters, case-insensitively
    pytest.param(
        "https://e.com/a?utm_source=x&utm_medium=y&utm_campaign=z&utm_term=t&utm_content=c&id=1",
        "https://e.com/a?id=1",
        id="tracking-utm-family",
    ),
    pytest.param(
        "https://e.com/a?UTM_Source=x&id=1", "https://e.com/a?id=1", id="tracking-utm-uppercase"
    ),
    pytest.param(
        "https://e.com/a?utm_whatever_new=1", "https://e.com/a", id="tracking-utm-any-suffix"
    ),
    pytest.param(
        "https://e.com/a?fbclid=1&igshid=2&id=3", "https://e.com/a?id=3", id="tracking-meta"
    ),
    pytest.param(
        "https://e.com/a?gclid=1&dclid=2&gbraid=3&wbraid=4&gclsrc=5&id=6",
        "https://e.com/a?id=6",
        id="tracking-google-ads",
    ),
    pytest.param(
        "https://e.com/a?msclkid=1&yclid=2&id=3", "https://e.com/a?id=3", id="tracking-bing-yandex"
    ),
    pytest.param(
        "https://e.com/a?mc_eid=1&mc_cid=2&id=3", "https://e.com/a?id=3", id="tracking-mailchimp"
    ),
    pytest.param(
        "https://e.com/a?_hsenc=1&_hsmi=2&hsa_cam=3&id=4",
        "https://e.com/a?id=4",
        id="tracking-hubspot",
    ),
    pytest.param(
        "https://e.com/a?mkt_tok=1&vero_id=2&oly_enc_id=3&oly_anon_id=4&__s=5&id=6",
        "https://e.com/a?id=6",
        id="tracking-email-tools",
    ),
    pytest.param(
        "https://e.com/a?ref_src=twsrc&spm=a.b&id=1",
        "https://e.com/a?id=1",
        id="tracking-ref-src-spm",
    ),
    pytest.param(
        "https://e.com/a?FBCLID=1", "https://e.com/a", id="tracking-name-case-insensitive"
    ),
    pytest.param("https://e.com/a?ref=main", "https://e.com/a?ref=main", id="plain-ref-kept"),
    # query order and shape
    pytest.param("https://e.com/a?b=2&a=1&c=3", "https://e.com/a?a=1&b=2&c=3", id="params-sorted"),
    pytest.param(
        "https://e.com/a?tag=b&x=1&tag=a",
        "https://e.com/a?tag=b&tag=a&x=1",
        id="repeated-keys-order-stable",
    ),
    pytest.param("https://e.com/a?", "https://e.com/a", id="empty-query-removed"),
    pytest.param(
        "https://e.com/a?utm_source=x", "https://e.com/a", id="query-empty-after-tracking"
    ),
    pytest.param("https://e.com/a?a=1&&b=2", "https://e.com/a?a=1&b=2", id="empty-pairs-dropped"),
    pytest.param("https://e.com/a?flag&a=1", "https://e.com/a?a=1&flag", id="valueless-param-kept"),
    # percent-encoding
    pytest.param(
        "https://e.com/a%2fb?q=%2f", "https://e.com/a%2Fb?q=%2F", id="percent-hex-uppercased"
    ),
    pytest.param(
        "https://e.com/%7Euser/%41?q=%7e%2D", "https://e.com/~user/A?q=~-", id="unreserved-decoded"
    ),
    pytest.param(
        "https://e.com/caf%c3%a9?q=é",
        "https://e.com/caf%C3%A9?q=%C3%A9",
        id="non-ascii-utf8-escaped",
    ),
    pytest.param("https://e.com/a b?q=a b", "https://e.com/a%20b?q=a%20b", id="space-escaped"),
    pytest.param("https://e.com/a?q=a+b", "https://e.com/a?q=a+b", id="plus-kept"),
    # path shape
    pytest.param("https://example.com/", "https://example.com", id="root-slash-removed"),
    pytest.param("https://example.com", "https://example.com", id="empty-path"),
    pytest.param(
        "https://example.com/?a=1", "https://example.com?a=1", id="root-slash-removed-with-query"
    ),
    pytest.param(
        "https://example.com/docs/", "https://example.com/docs/", id="non-root-trailing-slash-kept"
    ),
    pytest.param("https://e.com/a/./b/../c", "https://e.com/a/c", id="dot-segments"),
    pytest.param("https://e.com/a/b/../../..", "https://e.com", id="dot-segments-above-root"),
    # whitespace and odd input
    pytest.param("  https://example.com/a \n", "https://example.com/a", id="whitespace-stripped"),
    pytest.param(
        "https://exa\tmple.com/a\n/b", "https://example.com/a/b", id="tabs-newlines-removed"
    ),
    pytest.param(
        "mailto:Someone@Example.com", "mailto:Someone@Example.com", id="opaque-url-unchanged"
    ),
    pytest.param("not a url", "not a url", id="free-text-unchanged"),
    pytest.param(
        " http://a.com:notaport/x ",
        "http://a.com:notaport/x",
        id="unparsable-port-returns-stripped",
    ),
    pytest.param("", "", id="empty-input"),
]


@pytest.mark.parametrize(("url", "expected"), CANONICAL_CASES)
def test_canonicalize(url: str, expected: str) -> None:
    assert canonicalize(url) == expected


@pytest.mark.parametrize(
    "variant",
    [
        "https://Example.com/",
        "https://example.com",
        "https://example.com:443/#top",
        "HTTPS://EXAMPLE.COM:443",
        "https://user@example.com/?utm_source=feed",
    ],
)
def test_root_variants_are_one_page(variant: str) -> None:
    assert canonicalize(variant) == "https://example.com"


def test_canonicalize_is_idempotent_on_cases() -> None:
    for case in CANONICAL_CASES:
        once = canonicalize(case.values[0])  # type: ignore[arg-type]
        assert canonicalize(once) == once


@given(st.text(max_size=200))
def test_canonicalize_never_raises(text: str) -> None:
    assert isinstance(canonicalize(text), str)
    assert skip_reason(text) in {None, *SKIP_SCHEMES.values(), "empty", "invalid"}


@given(
    st.from_regex(
        r"https?://[a-z0-9]{1,10}\.[a-z]{2,4}(/[a-zA-Z0-9._~%-]{0,8}){0,3}", fullmatch=True
    ),
    st.lists(st.tuples(st.sampled_from(["a", "b", "utm_x", "id"]), st.text("xyz%20", max_size=4))),
)
def test_canonicalize_idempotent(base: str, params: list[tuple[str, str]]) -> None:
    url = base + ("?" + "&".join(f"{k}={v}" for k, v in params) if params else "")
    once = canonicalize(url)
    assert canonicalize(once) == once


SKIP_CASES = [
    pytest.param("", "empty", id="empty"),
    pytest.param("   \n", "empty", id="whitespace-only"),
    pytest.param("place:sort=8&maxResults=10", "place", id="firefox-place"),
    pytest.param("javascript:(function(){alert(1)})()", "javascript", id="bookmarklet"),
    pytest.param("JavaScript:void(0)", "javascript", id="bookmarklet-mixed-case"),
    pytest.param("data:text/html,<h1>hi</h1>", "data", id="data-url"),
    pytest.param("about:blank", "about", id="about"),
    pytest.param("about:config", "about", id="about-config"),
    pytest.param("chrome://settings/", "browser", id="chrome"),
    pytest.param("chrome-extension://abcdef/options.html", "browser", id="chrome-extension"),
    pytest.param("edge://favorites/", "browser", id="edge"),
    pytest.param("brave://rewards", "browser", id="brave"),
    pytest.param("opera://settings", "browser", id="opera"),
    pytest.param("vivaldi://settings", "browser", id="vivaldi"),
    pytest.param("moz-extension://1234/page.html", "browser", id="firefox-extension"),
    pytest.param("file:///home/me/notes.txt", "file", id="file"),
    pytest.param("example.com/page", "invalid", id="no-scheme"),
    pytest.param("/relative/path", "invalid", id="relative"),
    pytest.param("http://", "invalid", id="no-host"),
    pytest.param("https:///path-only", "invalid", id="empty-host"),
    pytest.param("http://exa mple.com/", "invalid", id="space-in-host"),
    pytest.param("http://example.com:99999/", "invalid", id="port-out-of-range"),
    pytest.param("http://example.com:abc/", "invalid", id="port-not-numeric"),
    pytest.param("mailto:someone@example.com", "invalid", id="mailto"),
    pytest.param("gopher://example.com/", "invalid", id="other-scheme"),
    pytest.param("https://example.com/a?b=c#d", None, id="https-ok"),
    pytest.param("http://localhost:8000/", None, id="http-localhost-port-ok"),
    pytest.param("https://user:pw@example.com/", None, id="userinfo-ok"),
    pytest.param("https://bücher.de/", None, id="idn-ok"),
    pytest.param("http://[::1]/", None, id="ipv6-ok"),
    pytest.param("  https://example.com  ", None, id="surrounding-whitespace-ok"),
    pytest.param("ftp://ftp.example.com/pub/file.txt", None, id="ftp-ok"),
]


@pytest.mark.parametrize(("url", "reason"), SKIP_CASES)
def test_skip_reason(url: str, reason: str | None) -> None:
    assert skip_reason(url) == reason
