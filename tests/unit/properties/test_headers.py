"""Header hygiene (`forwardable`) on arbitrary header lists, in either direction."""

from __future__ import annotations

import re
import string

from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from sidecar.http.headers import HOP_BY_HOP, SIDECAR_PREFIX, SOURCE, TOKEN, forwardable

# RFC 9110 token characters: everything a header name may be made of.
_TOKEN_CHARS = "!#$%&'*+-.^_`|~" + string.ascii_letters + string.digits
_OWN = [TOKEN, SOURCE, "x-sidecar-reason", "x-sidecar-timeout-ms", "x-sidecar-attempts"]


def _spellings(name: str) -> list[str]:
    return [name, name.upper(), name.replace("-", "_"), name.replace("-", "_", 1),
            name.replace("-", ".").title()]


names = st.one_of(
    st.sampled_from([s for own in _OWN for s in _spellings(own)]),
    st.sampled_from([*sorted(HOP_BY_HOP), "Connection", "Authorization", "Host", "x_request_id",
                     "x-sidecar-", "x_sidecar_", "x-source-services"]),
    st.text(alphabet=_TOKEN_CHARS, min_size=1, max_size=20),
)
values = st.one_of(
    st.sampled_from(["", "close", "keep-alive, x-private", "x_source_service, te",
                     "x-sidecar-reason", ",,, ,", "svc-c"]),
    st.text(max_size=20),
)
header_lists = st.lists(st.tuples(names, values), max_size=12)


def looks_own(name: str) -> bool:
    dashed = re.sub(r"[^a-z0-9-]", "-", name.lower())
    return dashed != name.lower() and (
        dashed in (TOKEN, SOURCE) or dashed.startswith(SIDECAR_PREFIX))


@given(header_lists, st.booleans(), st.lists(names, max_size=3), st.lists(names, max_size=2))
def test_forwardable_keeps_only_what_may_cross(
    pairs: list[tuple[str, str]], drop_sidecar: bool, drop: list[str], keep: list[str]
) -> None:
    headers: CIMultiDict[str] = CIMultiDict(pairs)

    out = forwardable(headers, drop=drop, drop_sidecar=drop_sidecar, keep=keep)

    named = {t.strip().lower() for v in headers.getall("Connection", []) for t in v.split(",")}
    kept = {k.lower() for k in keep}
    expected = [
        (name, value) for name, value in pairs
        if name.lower() not in HOP_BY_HOP | named | {d.lower() for d in drop}
        and not looks_own(name)
        and not (drop_sidecar and name.lower().startswith(SIDECAR_PREFIX)
                 and name.lower() not in kept)
    ]
    # What is left is exactly the input less what must go, in its order, values untouched.
    assert list(out.items()) == expected
    for name in out:
        assert not looks_own(name)
