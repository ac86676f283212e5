"""Path and Host normalisation before routing (config/web.py), without sockets."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from fastgw.config.web import BadTarget, normalize_host, normalize_path, normalize_target


@pytest.mark.parametrize("raw, canonical", [
    ("/", "/"),
    ("/a", "/a"),
    ("/a/", "/a/"),
    ("//x", "/x"),
    ("/a//b///c", "/a/b/c"),
    ("/public/../private", "/private"),
    ("/public/%2e%2e/private", "/private"),
    ("/public/%2E%2e/private", "/private"),
    ("/public/./../private", "/private"),
    ("/a/./b/.", "/a/b/"),
    ("/a/b/..", "/a/"),
    ("/a/..", "/"),
    ("/%7Euser/%41%62c", "/~user/Abc"),
    ("/a%20b/%e2%82%ac", "/a%20b/%E2%82%AC"),
    ("/a%25b", "/a%25b"),                   # an encoded '%' stays encoded: no double decoding
    ("/%2e%2e%2e", "/..."),                 # three dots is a name, not a dot-segment
    ("/.a/..b", "/.a/..b"),
])
def test_canonical_paths(raw, canonical):
    assert normalize_path(raw) == canonical


@pytest.mark.parametrize("raw", [
    "/..", "/../x", "/a/../..", "/%2e%2e", "/a/%2e%2e/%2e%2e/b",     # above the root
    "/public/..%2fprivate", "/a%2Fb", "/a%5cb", "/a%5C..", "/a\\b",   # encoded or raw separators
    "/a%00b", "/a%zz", "/a%4", "/a%", "/a#frag", "x", "",
])
def test_refused_paths(raw):
    with pytest.raises(BadTarget):
        normalize_path(raw)


def test_target_keeps_the_query():
    assert normalize_target("/a/../b?x=%2F..&y=1") == "/b?x=%2F..&y=1"
    with pytest.raises(BadTarget):
        normalize_target("/a?x=%00")
    with pytest.raises(BadTarget):
        normalize_target("/a?x#y")


@pytest.mark.parametrize("raw, name", [
    ("Secret.Example.", "secret.example"),
    ("secret.example:8080", "secret.example"),
    ("SECRET.example.:443", "secret.example"),
    ("[::1]:8080", "::1"),
    ("[::1]", "::1"),
    ("127.0.0.1:80", "127.0.0.1"),
])
def test_hosts(raw, name):
    assert normalize_host(raw) == name


@pytest.mark.parametrize("raw", ["", ":80", "a b", "a/b", "a..", ".", "x:y", "[::1"])
def test_refused_hosts(raw):
    with pytest.raises(BadTarget):
        normalize_host(raw)


_SEGMENT = st.sampled_from(["", ".", "..", "a", "b", "%2e", "%2E%2e", "%41", "c%20d", "..."])


@given(st.lists(_SEGMENT, max_size=8))
def test_normal_form_is_stable_and_clean(segments):
    raw = "/" + "/".join(segments)
    try:
        once = normalize_path(raw)
    except BadTarget:
        return
    assert normalize_path(once) == once                     # idempotent
    parts = once.split("/")[1:]
    assert "." not in parts and ".." not in parts
    assert "//" not in once
    assert "%2e" not in once.lower() and "%41" not in once
