"""Who is calling: the bearer credentials serving knows, and which labeler each one proves.

Three kinds of credential (all optional, all ``Authorization: Bearer <token>`` as
``rlhf.auth`` parses it, the scheme in any case):

- the shared token (``--auth-token``): any Policy call; proves no labeler, so it may not
  submit rankings once labelers are bound (PERMISSION_DENIED);
- the UI service token (``--ui-token``): held by the ranking UI process, which logged the
  person in; it names them in ``x-rlhf-labeler`` (HTTP ``X-RLHF-Labeler``) and only this
  token may do so;
- per-labeler tokens (``--labeler-tokens FILE``): a JSON object mapping each labeler id to
  the sha256 of its token (``"sha256:<hex>"``, or a list of them to rotate); the file holds
  no token itself. ``python -m serving.auth new-token LABELER`` makes one.

Any of them passes the gate when ``--auth-token`` is set. With none configured, serving is
open (local development): rankings keep the labeler the record names and are stamped
``LABELER_AUTH_NONE``. With the UI token or labeler tokens configured, a ranking without a
labeler credential is UNAUTHENTICATED.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rlhf.auth import bearer_token
from rlhf.contract import name_problem
from rlhf.v1 import feedback_pb2 as fb
from serving.service import Code, ServiceError

LABELER_HEADER = "x-rlhf-labeler"
_HASH_PREFIX = "sha256:"


class Kind(enum.Enum):
    NONE = "none"  # no credential sent, or one this server does not know
    SHARED = "shared"
    UI = "ui"
    LABELER = "labeler"


@dataclass(frozen=True)
class Principal:
    kind: Kind
    labeler: str = ""  # for Kind.LABELER: whose token it is


@dataclass(frozen=True)
class Claim:
    """The labeler a ranking must carry (empty: take the record's) and how it is known."""

    labeler: str
    auth: int  # fb.LabelerAuth


OPEN = Claim("", fb.LABELER_AUTH_NONE)


def hash_token(token: str) -> str:
    return _HASH_PREFIX + hashlib.sha256(token.encode()).hexdigest()


def load_labeler_tokens(path: str) -> dict[str, str]:
    """``{"alice": "sha256:<hex>" | [...]}`` -> {token hash: labeler}; ValueError if bad."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"labeler tokens file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"labeler tokens file {path}: must be a JSON object "
                         '{"labeler id": "sha256:<hex of the token>", ...}')
    by_hash: dict[str, str] = {}
    for labeler, hashes in data.items():
        problem = name_problem(labeler, 128)
        if problem:
            raise ValueError(f"labeler tokens file {path}: labeler id {labeler[:40]!r} {problem}")
        for h in [hashes] if isinstance(hashes, str) else hashes:
            hexpart = h[len(_HASH_PREFIX):] if isinstance(h, str) else ""
            if not (isinstance(h, str) and h.startswith(_HASH_PREFIX) and len(hexpart) == 64
                    and all(ch in "0123456789abcdef" for ch in hexpart)):
                raise ValueError(f"labeler tokens file {path}: {labeler!r}: each entry must "
                                 "be 'sha256:<64 lowercase hex digits>'")
            if by_hash.setdefault(h, labeler) != labeler:
                raise ValueError(f"labeler tokens file {path}: one token hash is given to "
                                 f"{by_hash[h]!r} and {labeler!r}")
    return by_hash


@dataclass(frozen=True)
class Credentials:
    shared_token: str = ""
    ui_token: str = ""
    labeler_hashes: dict[str, str] = field(default_factory=dict)  # token hash -> labeler

    @classmethod
    def from_config(cls, config) -> Credentials:  # ServingConfig checked the file already
        hashes = load_labeler_tokens(config.labeler_tokens) if config.labeler_tokens else {}
        return cls(config.auth_token, config.ui_token, hashes)

    @property
    def gated(self) -> bool:
        """Every non-public call needs a known credential (--auth-token is set)."""
        return bool(self.shared_token)

    @property
    def binds_labelers(self) -> bool:
        return bool(self.ui_token or self.labeler_hashes)

    def identify(self, authorization: str | None) -> Principal:
        token = bearer_token(authorization)
        if token is None:
            return Principal(Kind.NONE)
        given = token.encode()
        if self.shared_token and hmac.compare_digest(given, self.shared_token.encode()):
            return Principal(Kind.SHARED)
        if self.ui_token and hmac.compare_digest(given, self.ui_token.encode()):
            return Principal(Kind.UI)
        labeler = self.labeler_hashes.get(hash_token(token))
        return Principal(Kind.LABELER, labeler) if labeler else Principal(Kind.NONE)

    def admits(self, authorization: str | None) -> bool:
        """The gate: may this caller use the API at all?"""
        return not self.gated or self.identify(authorization).kind is not Kind.NONE

    def claim(self, authorization: str | None, forwarded: str | None) -> Claim:
        """The labeler a ranking from this caller must carry; raises ServiceError
        (UNAUTHENTICATED, PERMISSION_DENIED, INVALID_ARGUMENT for a bad forwarded name)."""
        who = self.identify(authorization)
        if who.kind is Kind.LABELER:
            if forwarded and forwarded != who.labeler:
                raise ServiceError(Code.PERMISSION_DENIED, f"{LABELER_HEADER} names "
                                   f"{forwarded[:80]!r} but the token is {who.labeler!r}'s; "
                                   "a labeler token submits only as its own labeler",
                                   field="labeler_id")
            return Claim(who.labeler, fb.LABELER_AUTH_TOKEN)
        if who.kind is Kind.UI:
            if not forwarded:
                raise ServiceError(Code.PERMISSION_DENIED, "the UI token submits for the "
                                   f"logged-in labeler: name them in {LABELER_HEADER}",
                                   field="labeler_id")
            problem = name_problem(forwarded, 128)
            if problem:
                raise ServiceError(Code.INVALID_ARGUMENT, f"{LABELER_HEADER} {problem}",
                                   field="labeler_id")
            return Claim(forwarded, fb.LABELER_AUTH_UI_LOGIN)
        if who.kind is Kind.SHARED:
            raise ServiceError(Code.PERMISSION_DENIED, "the shared serving token "
                               "(--auth-token) cannot claim a labeler: submit rankings with "
                               "a per-labeler token (--labeler-tokens) or through the ranking "
                               "UI (--ui-token)", field="labeler_id")
        if self.binds_labelers or self.gated:
            raise ServiceError(Code.UNAUTHENTICATED, "rankings need a labeler credential: "
                               "send 'authorization: Bearer <your labeler token>'")
        return OPEN


def bind_labeler(record: fb.Comparison | fb.Demonstration, claim: Claim) -> None:
    """Fill ``record.labeler_id`` from the claim (when empty) and stamp ``labeler_auth``;
    PERMISSION_DENIED when the record names someone else."""
    if claim.labeler:
        if record.labeler_id and record.labeler_id != claim.labeler:
            raise ServiceError(Code.PERMISSION_DENIED, f"labeler_id {record.labeler_id[:80]!r}"
                               f" is not the authenticated labeler {claim.labeler!r}; leave "
                               "it empty or send your own", field="labeler_id")
        record.labeler_id = claim.labeler
    record.labeler_auth = claim.auth


def main(argv: list[str]) -> int:
    """``python -m serving.auth new-token LABELER``: a fresh token and its file entry."""
    if len(argv) != 2 or argv[0] != "new-token" or name_problem(argv[1], 128):
        sys.stderr.write("usage: python -m serving.auth new-token LABELER_ID\n")
        return 2
    token = secrets.token_urlsafe(32)
    sys.stdout.write(json.dumps({"labeler": argv[1], "token": token,
                                 "entry": {argv[1]: hash_token(token)}}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
