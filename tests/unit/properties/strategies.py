"""Hostile input for the property tests: the text, numbers and shapes attackers send."""

from __future__ import annotations

import string
from typing import Any

from hypothesis import strategies as st

# Characters that carry meaning in paths, headers, YAML and JSON, besides letters.
_PATH_CHARS = "/.%;\\?#:@!$&'()*+,=~-_ \t\x00\x7f" + string.ascii_letters + string.digits
_ESCAPES = [f"%{code:02X}" for code in range(0, 256, 7)] + [
    "%2e", "%2E", "%2f", "%2F", "%5c", "%3b", "%3B", "%00", "%zz", "%4", "%"]

# A few characters beyond ASCII: Latin, a case-folding sign, CJK, a lone surrogate, an emoji.
_WIDE_CHARS = "é\u212a\u4e2d\ud800\U0001f600"
path_piece = st.one_of(
    st.sampled_from(["/", "//", ".", "..", "./", "../", ";", "..;", ".;", "%2e%2e", "%2e",
                     ".%3b", "claims", "admin", "{id}", "*", *_ESCAPES]),
    st.text(alphabet=_PATH_CHARS + _WIDE_CHARS, max_size=5),
)
raw_paths = st.lists(path_piece, max_size=8).map("".join)
slash_paths = raw_paths.map(lambda p: "/" + p)

# Numbers at and beyond every edge a float or an int conversion has.
edge_numbers = st.one_of(
    st.integers(),
    st.sampled_from([10**400, -(10**400), 2**63, 2**64, -1, 0, 253_402_300_800]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
)

edge_text = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["", " ", "${X}", "$${X}", "${", "5s", "0s", "250ms", "1" * 400 + "s",
                     "\u0661s", "64KiB", "9" * 5000, "-1", "nan", "inf", "http://[::1", "http://x",
                     "http://127.0.0.1:8000", "a\x00b", "/x" * 3000, "*", "/*", "/claims/*",
                     "billing", "BILLING", "-bad-", "EdDSA", "HS256", "GET", "otlp",
                     "127.0.0.1:15001", "[::1]:0", "localhost:99999", "host:²"]),
)

scalars = st.one_of(st.none(), edge_numbers, edge_text)
json_values: st.SearchStrategy[Any] = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(edge_text, st.integers()), inner, max_size=4),
    ),
    max_leaves=8,
)
