"""ServingConfig: the one frozen configuration of a serving process."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.contract import MAX_CHARS
from rlhf.settings import port as _port
from rlhf.settings import setting as _f


@dataclass(frozen=True)
class ServingConfig:
    """Everything `rlhf serve` needs; CLI flags and RLHF_SERVE_* env vars override defaults."""

    model: str = _f("", "a name of `rlhf models list` (fetched on first use), a local "
                    "directory or a hub id; empty = the built-in starter model")
    adapter: str = _f("", "optional PEFT LoRA adapter directory to start with")
    adapter_version: str = _f("", "version name of --adapter (default: its directory name)")
    load_in_4bit: bool = _f(False, "load the base model in 4-bit through bitsandbytes")
    device: str = _f("auto", "cpu, cuda, cuda:N or auto (cuda when available)")
    dtype: str = _f("auto", "float32, bfloat16, float16 or auto (float32 on CPU, bf16 on GPU)")
    threads: int = _f(0, "torch threads for the decode loop; 0 = torch's default")

    host: str = _f("127.0.0.1", "interface both servers bind to")
    grpc_port: int = _port(50051, "gRPC port (0 = pick a free one)")
    http_port: int = _port(8000, "OpenAI-compatible HTTP port (0 = pick a free one, -1 = off)",
                           lowest=-1)
    auth_token: str = _f("", "bearer token clients must send; empty = no auth (it proves no "
                         "labeler: rankings need --ui-token or --labeler-tokens)", secret=True)
    ui_token: str = _f("", "service token of the ranking UI: it may name the logged-in labeler "
                       "(x-rlhf-labeler) of the rankings it submits; also passes --auth-token's "
                       "gate", secret=True)
    labeler_tokens: str = _f("", "JSON file {labeler id: 'sha256:<hex of its token>'} of "
                             "per-labeler API tokens (python -m serving.auth new-token ID); a "
                             "ranking sent with one is that labeler's; also passes the gate")
    tls_cert: str = _f("", "PEM certificate chain file; with --tls-key turns on TLS for gRPC")
    tls_key: str = _f("", "PEM private key file for --tls-cert")

    max_batch_size: int = _f(64, "sequences decoded together (each alternative is one)")
    max_queue: int = _f(256, "requests waiting for a slot before RESOURCE_EXHAUSTED")
    max_n: int = _f(9, "most alternatives per request")
    max_new_tokens: int = _f(512, "largest max_new_tokens a request may ask for")
    default_max_new_tokens: int = _f(128, "max_new_tokens when a request gives none")
    max_request_chars: int = _f(65536, "total characters of messages/prompt/stops per request")
    max_stop_sequences: int = _f(8, "most stop sequences per request")
    shutdown_grace_s: float = _f(10.0, "seconds running streams get to finish on shutdown")

    redis_url: str = _f("", "Redis holding the comparisons stream, e.g. redis://127.0.0.1:6379/0; "
                        "empty = the Feedback API is off", secret=True, address="url")
    adapter_store: str = _f("", "adapter store directory (STORE/<version>/); with --redis-url "
                            "this replica follows the registry's current adapter (hot-swap); "
                            "empty = off")
    registry_poll_s: float = _f(0.5, "seconds between polls of the adapter registry (besides "
                                "its notifications)")
    keep_versions: int = _f(3, "adapter versions kept loaded; older ones are unloaded once no "
                            "request holds them")
    max_feedback_chars: int = _f(MAX_CHARS, "longest text in a comparison record (each candidate, "
                                 "message, comment, ideal answer)")

    def __post_init__(self) -> None:
        problems = []
        if not 1 <= self.max_n <= self.max_batch_size:
            problems.append("max_n must be in 1..max_batch_size")
        if not 1 <= self.default_max_new_tokens <= self.max_new_tokens:
            problems.append("default_max_new_tokens must be in 1..max_new_tokens")
        if self.max_queue < 1:
            problems.append("max_queue must be >= 1")
        if self.max_feedback_chars < 1:
            problems.append("max_feedback_chars must be >= 1")
        if self.keep_versions < 1:
            problems.append("keep_versions must be >= 1")
        if not self.registry_poll_s > 0:
            problems.append("registry_poll_s must be > 0")
        if self.labeler_tokens:
            from serving.auth import hash_token, load_labeler_tokens  # the file's rules

            try:
                hashes = load_labeler_tokens(self.labeler_tokens)
            except ValueError as exc:
                problems.append(str(exc))
                hashes = {}
            for name, token in (("auth_token", self.auth_token), ("ui_token", self.ui_token)):
                if token and hash_token(token) in hashes:
                    problems.append(f"a labeler token equals --{name.replace('_', '-')}; "
                                    "give each its own value")
        if self.ui_token and self.ui_token == self.auth_token:
            problems.append("ui_token must differ from auth_token (the shared token may not "
                            "name labelers)")
        if bool(self.tls_cert) != bool(self.tls_key):
            problems.append("tls_cert and tls_key go together")
        if problems:
            raise ValueError("invalid serving config: " + "; ".join(problems))
