"""The one bearer-token parser every process uses (serving gRPC + HTTP, learner admin API)."""

from __future__ import annotations

import pytest

from rlhf.auth import bearer_matches, bearer_token


@pytest.mark.parametrize(("header", "token"), [
    ("Bearer s3cret", "s3cret"), ("bearer s3cret", "s3cret"), ("BEARER s3cret", "s3cret"),
    ("bEaReR  s3cret ", "s3cret"),  # RFC 7235: 1*SP after the scheme
    ("Basic czNjcmV0", None), ("Bearer", None), ("Bearer ", None), ("", None), (None, None),
    ("Bearers3cret", None),
])
def test_the_scheme_is_case_insensitive_and_nothing_else_passes(header, token):
    assert bearer_token(header) == token
    assert bearer_matches(header, "s3cret") is (token == "s3cret")
