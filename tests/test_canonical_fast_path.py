"""The fast path of canonicalize (plain hosts and paths, skipping w3lib) must give exactly
what the full path gives, for every URL it accepts."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.bookmarks import canonical

HOST_LABEL = st.text("abcdefghijklmnopqrstuvwxyzABC0123456789-_", min_size=1, max_size=12)
PATH_CHARS = "abcXYZ019-._~!$&'()*+,;=:@%/ é"
QUERY_CHARS = "abXY09-._~%+=&é /?"


@st.composite
def urls(draw: st.DrawFn) -> str:
    scheme = draw(st.sampled_from(["http", "https", "HTTP", "ftp"]))
    host = ".".join(draw(st.lists(HOST_LABEL, min_size=1, max_size=4)))
    port = draw(st.sampled_from(["", ":80", ":443", ":8080", ":0080"]))
    path = draw(st.text(PATH_CHARS, max_size=30))
    query = draw(st.text(QUERY_CHARS, max_size=20))
    fragment = draw(st.sampled_from(["", "#top", "#!/inbox", "#/a%7e"]))
    return (
        f"{scheme}://{host}{port}"
        + ("/" + path if path else "")
        + ("?" + query if query else "")
        + fragment
    )


NEVER = re.compile(r"(?!)")


def full_path(url: str) -> str:
    """canonicalize with every fast path switched off (urlsplit, then w3lib)."""
    saved = canonical._PLAIN_HOST, canonical._PLAIN_COMPONENT, canonical._SPLIT
    canonical._PLAIN_HOST = canonical._PLAIN_COMPONENT = canonical._SPLIT = NEVER
    try:
        return canonical.canonicalize(url)
    finally:
        canonical._PLAIN_HOST, canonical._PLAIN_COMPONENT, canonical._SPLIT = saved


def split_by_urlsplit(url: str) -> object:
    saved = canonical._SPLIT
    canonical._SPLIT = NEVER
    try:
        return canonical._split(url)
    except ValueError as exc:
        return type(exc)
    finally:
        canonical._SPLIT = saved


def split_fast(url: str) -> object:
    try:
        return canonical._split(url)
    except ValueError as exc:
        return type(exc)


# Odd shapes beside the common one: ports out of range or empty, userinfo, IPv6, queries and
# fragments in either order, a path not starting with "/", C0 characters, no authority.
ODD = st.sampled_from(
    [
        "",
        ":",
        ":99999",
        ":0",
        ":65535",
        ":65536",
        "@host",
        "/a?b#c?d",
        "#f?g",
        "?q#",
        "?",
        "#",
        "x",
        "\x0b",
        "/%2F",
        "/é",
        ":\u0668\u0660/x",  # Arabic-Indic digits: int() reads 80, urlsplit refuses the port
        ":\uff18\uff10",  # full-width digits
    ]
)


@settings(max_examples=800, deadline=None)
@given(url=urls(), tail=ODD, head=st.sampled_from(["", "user:pw@", "[::1]", "mailto:"]))
def test_the_fast_split_gives_urlsplits_parts(url: str, tail: str, head: str) -> None:
    scheme, rest = url.split("://", 1)
    shaped = f"{scheme}://{head}{rest}{tail}" if head != "mailto:" else f"mailto:{rest}{tail}"
    assert split_fast(shaped) == split_by_urlsplit(shaped)


@settings(max_examples=600, deadline=None)
@given(url=urls())
def test_fast_path_matches_the_full_path(url: str) -> None:
    assert canonical.canonicalize(url) == full_path(url)


@pytest.mark.parametrize(
    "url",
    [
        "https://Example.com/a/b?utm_source=x&b=2&a=1#top",
        "http://example.com:80/",
        "https://example.com/docs/",
        "https://example.com/a/./b/../c",
        "https://example.com/%7Euser",
        "https://sub_domain.example.com/x",
        "https://xn--bcher-kva.de/",
    ],
)
def test_fast_path_examples(url: str) -> None:
    assert canonical.canonicalize(url) == full_path(url)
