"""Bearer tokens, parsed the same way by every process (serving's gRPC and HTTP faces, the
learner's admin API).

``Authorization: <scheme> <token>``: the scheme is case-insensitive (RFC 7235 §2.1, so
``bearer`` and ``BEARER`` are ``Bearer``); the token is compared in constant time.
"""

from __future__ import annotations

import hmac


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization`` value whose scheme is Bearer, else None."""
    scheme, _, token = (header or "").strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def bearer_matches(header: str | None, expected: str) -> bool:
    """Whether ``header`` is ``Bearer <expected>`` (any case of the scheme)."""
    given = bearer_token(header)
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())
