"""The identity layers: a token on the way out, a verified caller on the way in."""

from __future__ import annotations

from collections.abc import Callable

from sidecar.http import problem
from sidecar.http.headers import SOURCE, TOKEN
from sidecar.identity.tokens import Minter, TokenError, Verifier
from sidecar.stack import Call, Handler, Layer, Reply


def attach_token(*, minter: Minter) -> Layer:
    """Outbound, per attempt: adds this service's token for the target's audience.

    Services outside the mesh (`mesh: false`) get no token. Any token the app
    sent was dropped at the edge; this is the only one that leaves.
    """

    async def attach_token_layer(call: Call, next: Handler) -> Reply:
        call.headers.popall(TOKEN, None)
        if call.upstream is None or call.upstream.mesh:
            call.headers[TOKEN] = minter.token_for(call.target)
        return await next(call)

    return attach_token_layer


def verify_token(*, service: str, verifier: Verifier,
                 is_public: Callable[[str], bool]) -> Layer:
    """Inbound: verifies `x-service-token` and sets `call.source` to the caller.

    Public paths pass without a token (an invalid one there is ignored, and
    the caller stays anonymous). Refuses with 401 `token_missing` or
    `token_invalid` (whose detail names the failed check). The token never
    reaches the app, and `x-source-service` carries only the verified caller.
    """

    async def verify_token_layer(call: Call, next: Handler) -> Reply:
        token = call.headers.popall(TOKEN, [])
        call.headers.popall(SOURCE, None)
        public = is_public(call.path)
        if len(token) > 1 and not public:
            return problem.reply("token_invalid", "More than one x-service-token was sent; "
                                 "send exactly one.")
        if not token:
            if public:
                return await next(call)
            return problem.reply(
                "token_missing",
                f"{service} accepts calls only from mesh services: call it through "
                "your sidecar (localhost:15001), which adds the x-service-token.",
            )
        try:
            caller = verifier.verify(token[0])
        except TokenError as exc:
            if public:
                return await next(call)
            return problem.reply(
                "token_invalid",
                f"The x-service-token failed the check '{exc.check}': {exc.message}",
            )
        call.source = caller
        call.headers[SOURCE] = caller
        return await next(call)

    return verify_token_layer

