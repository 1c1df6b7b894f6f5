"""The pure parts of the ranking UI: records, ranks, flags, shuffling, config, error text."""

from __future__ import annotations

import grpc
import pytest

from rlhf.v1 import feedback_pb2 as fb
from rlhf.v1 import policy_pb2 as pb
from ui.client import user_message
from ui.config import UIConfig, parse_accounts
from ui.logic import (
    FLAG_LABELS,
    Alternative,
    RankingError,
    Turn,
    build_comparison,
    build_demonstration,
    continue_with,
    display_order,
    parse_flags,
    parse_ranks,
    top_position,
)

SAMPLING = pb.SamplingParams(max_new_tokens=16, temperature=0.9, top_p=1.0, seed=40,
                             min_new_tokens=1)


def make_turn(order=(2, 0, 3, 1)) -> Turn:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "What is 2 + 2?"}]
    turn = Turn(messages=messages, request_id="req-9", sampling=SAMPLING, order=list(order))
    turn.alternatives = [Alternative(index=i, text=f"answer {i}", adapter_version="v3",
                                     seed=40 + i, done=True) for i in range(len(order))]
    turn.finished_at = 1.0
    return turn


def build(turn: Turn, ranks=(2, 1, 2, 4), flags=((), (), (), (fb.FLAG_HARMFUL,)), **kw):
    args = {"comparison_id": "a" * 32, "labeler_id": "alice", "ranks": list(ranks),
            "flags": [list(f) for f in flags], "comment": " ok ", "ideal_answer": " 4 ",
            "rank_time_ms": 1234, "created_at_ms": 1_700_000_000_000, **kw}
    return build_comparison(turn, **args)


def test_the_better_answer_is_a_valid_demonstration_beside_the_ranking():
    from learner.demonstrations import sft_demonstrations
    from rlhf.contract import validate_comparison, validate_demonstration

    turn = make_turn()
    ranking = build(turn, ideal_answer="  2 + 2 = 4.\n")
    validate_comparison(ranking)
    demo = build_demonstration(turn, demonstration_id="d" * 32, comparison=ranking)
    validate_demonstration(demo)
    assert (demo.id, demo.labeler_id, demo.answer, demo.comparison_id, demo.source) == (
        "d" * 32, "alice", "2 + 2 = 4.", ranking.id, fb.DEMONSTRATION_SOURCE_UI)
    # The conversation up to the user turn the candidates answer, not the answers.
    assert [(m.role, m.content) for m in demo.messages] == [
        (m["role"], m["content"]) for m in turn.messages]
    assert demo.messages[-1].role == "user" and demo.created_at == ranking.created_at
    assert not demo.HasField("received_at")
    # The ranking keeps the text too; the learner's SFT set counts it once.
    assert ranking.ideal_answer == demo.answer
    assert sft_demonstrations([demo], [ranking]) == [demo]
    for blank in ("", "  \n "):
        assert build_demonstration(turn, demonstration_id="d" * 32,
                                   comparison=build(turn, ideal_answer=blank)) is None


def test_comparison_from_ui_state_matches_field_by_field():
    turn = make_turn()
    record = build(turn)
    assert (record.id, record.labeler_id, record.comment, record.ideal_answer) == (
        "a" * 32, "alice", "ok", "4")
    assert record.rank_time_ms == 1234
    assert record.created_at.ToMilliseconds() == 1_700_000_000_000
    assert not record.HasField("received_at")
    assert [(m.role, m.content) for m in record.messages] == [
        (m["role"], m["content"]) for m in turn.messages]
    # Candidates in generation order; ranks and flags were given by displayed position.
    # order = [2, 0, 3, 1]: alternative 2 at position 0, 0 at 1, 3 at 2, 1 at 3.
    assert [c.text for c in record.candidates] == [f"answer {i}" for i in range(4)]
    assert [c.position for c in record.candidates] == [1, 3, 0, 2]
    assert [c.rank for c in record.candidates] == [1, 4, 2, 2]
    assert [list(c.flags) for c in record.candidates] == [[], [fb.FLAG_HARMFUL], [], []]
    assert [c.seed for c in record.candidates] == [40, 41, 42, 43]
    for cand in record.candidates:
        assert cand.adapter_version == "v3" and cand.request_id == "req-9"
        assert cand.sampling == SAMPLING
    assert fb.Comparison.FromString(record.SerializeToString()) == record


def test_ties_are_kept_and_all_equal_is_allowed():
    record = build(make_turn(), ranks=(1, 1, 1, 1), flags=((),) * 4)
    assert [c.rank for c in record.candidates] == [1, 1, 1, 1]


def test_record_needs_a_labeler_and_finished_answers():
    with pytest.raises(RankingError, match="not logged in"):
        build(make_turn(), labeler_id="")
    turn = make_turn()
    turn.alternatives[2].done = False
    with pytest.raises(RankingError, match="Wait until all answers"):
        build(turn)


@pytest.mark.parametrize(("values", "k", "expected"), [
    (["1", "2", "3"], 3, [1, 2, 3]),
    (["2", "2", "1"], 3, [2, 2, 1]),
    ([1, 1], 2, [1, 1]),
    (["9"] * 9, 9, [9] * 9),
])
def test_parse_ranks_accepts_ties(values, k, expected):
    assert parse_ranks(values, k) == expected


@pytest.mark.parametrize(("values", "k", "message"), [
    (["1", None, "2"], 3, "answer 2 a rank from 1 \\(best\\) to 3"),
    (["1", "", "2"], 3, "answer 2"),
    (["1", "4", "2"], 3, "answer 2"),
    (["0", "1"], 2, "answer 1"),
    (["x", "1"], 2, "answer 1"),
    (["1", "2"], 3, "expected 3 ranks"),
])
def test_parse_ranks_refuses_missing_or_out_of_range(values, k, message):
    with pytest.raises(RankingError, match=message):
        parse_ranks(values, k)


def test_flags_have_readable_names_for_every_known_flag():
    assert FLAG_LABELS["Made up facts"] == fb.FLAG_MADE_UP_FACTS
    assert FLAG_LABELS["Denigrates protected class"] == fb.FLAG_DENIGRATES_PROTECTED_CLASS
    assert sorted(FLAG_LABELS.values()) == [v for _, v in fb.Flag.items() if v]
    assert parse_flags(["Harmful", "Fails instruction"]) == [fb.FLAG_FAILS_INSTRUCTION,
                                                             fb.FLAG_HARMFUL]
    assert parse_flags(None) == [] and parse_flags([]) == []
    with pytest.raises(RankingError, match="unknown flag"):
        parse_flags(["Shiny"])


def test_shuffle_is_a_permutation_and_deterministic_per_seed():
    for k in range(2, 10):
        for seed in range(20):
            order = display_order(k, seed)
            assert sorted(order) == list(range(k))
            assert order == display_order(k, seed)
    assert len({tuple(display_order(9, seed)) for seed in range(50)}) > 40


def test_continue_with_the_top_answer_leftmost_on_a_tie():
    turn = make_turn()  # shown left to right: answers 2, 0, 3, 1
    assert top_position([2, 1, 1, 3]) == 1
    assert continue_with(turn, [2, 1, 1, 3])[-1] == {"role": "assistant", "content": "answer 0"}
    assert continue_with(turn, [3, 3, 1, 2])[-1]["content"] == "answer 3"
    assert continue_with(turn, [1, 1, 1, 1])[:-1] == turn.messages


def test_config_accounts_and_limits(tmp_path):
    assert parse_accounts("alice:pw1, bob:p:w2") == [("alice", "pw1"), ("bob", "p:w2")]
    path = tmp_path / "users.txt"
    path.write_text("# labelers\nalice:pw1\n\ncarol:pw3\n")
    assert UIConfig(users=str(path)).accounts() == [("alice", "pw1"), ("carol", "pw3")]
    assert UIConfig().accounts() == []
    with pytest.raises(ValueError, match="user:password"):
        parse_accounts("alice")
    for bad in ({"k": 1}, {"k": 10}, {"max_new_tokens": 0}, {"top_p": 0.0}):
        with pytest.raises(ValueError, match="invalid ui config"):
            UIConfig(**bad)
    assert UIConfig().k == 4


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def test_grpc_errors_become_plain_messages():
    down = user_message(FakeRpcError(grpc.StatusCode.UNAVAILABLE, "redis"), "submit")
    assert "NOT stored" in str(down) and "Retry" in str(down) and down.retryable
    assert "down" in str(user_message(FakeRpcError(grpc.StatusCode.UNAVAILABLE), "generate"))
    bad = user_message(FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "rank 0"), "submit")
    assert "rank 0" in str(bad) and not bad.retryable
    auth = user_message(FakeRpcError(grpc.StatusCode.UNAUTHENTICATED), "submit")
    assert "token" in str(auth) and not auth.retryable


# --- the Gradio handlers against a fake client (no browser, no network) --------------------

class FakeClient:
    """Streams fixed answers; Submit fails while ``down`` and records what it received."""

    def __init__(self) -> None:
        self.down, self.received = False, []
        self.demos_down: grpc.StatusCode | None = None
        self.demonstrations: list[fb.Demonstration] = []

    def info(self) -> pb.ServerInfo:
        return pb.ServerInfo(current_adapter_version="v7")

    def generate(self, messages, n, sampling, request_id):
        from ui.client import Delta

        for i in range(n):
            yield Delta(i, f"reply {i}", False, "v7", sampling.seed + i)
            yield Delta(i, "", True, "v7", sampling.seed + i)

    def submit(self, record: fb.Comparison) -> fb.SubmitResponse:
        if self.down:
            raise user_message(FakeRpcError(grpc.StatusCode.UNAVAILABLE, "redis"), "submit")
        dup = any(r.id == record.id for r in self.received)
        self.received.append(record)
        return fb.SubmitResponse(id=record.id, duplicate=dup, stream_entry_id="1-0")

    def submit_demonstration(self, record: fb.Demonstration) -> fb.SubmitResponse:
        if self.demos_down is not None:
            raise user_message(FakeRpcError(self.demos_down, "no"), "submit")
        self.demonstrations.append(record)
        return fb.SubmitResponse(id=record.id, stream_entry_id="2-0")


class Login:
    username = "bob"


def test_handlers_rank_fail_retry_same_record_and_continue():
    from ui.app import RankingApp, _new_session

    client = FakeClient()
    app = RankingApp(UIConfig(k=3), client)
    app.build()
    session = _new_session()
    *_, last = app.send(session, "hello", Login())
    assert "All answers are in" in last[app.status] and "`v7`" in last[app.header]
    turn = session["turn"]
    shown = [last[c] for c in app.cands]
    assert sorted(shown) == ["reply 0", "reply 1", "reply 2"]

    missing = app.submit(Login(), session, "1", None, "2", [], [], [], "", "")
    assert "Give answer 2 a rank" in missing[app.status] and not client.received

    client.down = True
    failed = app.submit(Login(), session, "2", "1", "2", [], ["Harmful"], [], "c", "")
    assert "NOT stored" in failed[app.status] and failed[app.retry_btn]["visible"]
    assert session["turn"] is turn and session["pending"] is not None
    client.down = False
    ok = app.retry(session)
    assert "Ranking stored" in ok[app.status] and session["pending"] is None
    [record] = client.received
    assert record.labeler_id == "bob" and len(record.candidates) == 3
    assert {c.position: c.rank for c in record.candidates} == {0: 2, 1: 1, 2: 2}
    assert session["messages"] == [{"role": "user", "content": "hello"},
                                   {"role": "assistant", "content": shown[1]}]
    assert session["turn"] is None and ok[app.chat] == session["messages"]


def test_handlers_submit_the_better_answer_beside_the_ranking_and_retry_only_what_failed():
    from ui.app import RankingApp, _new_session

    client = FakeClient()
    app = RankingApp(UIConfig(k=2), client)
    app.build()
    session = _new_session()
    list(app.send(session, "What is 2 + 2?", Login()))
    client.demos_down = grpc.StatusCode.UNAVAILABLE
    failed = app.submit(Login(), session, "1", "2", [], [], "", "It is 4.")
    assert "Ranking stored" in failed[app.status] and "NOT stored" in failed[app.status]
    assert len(client.received) == 1 and not client.demonstrations
    client.demos_down = None
    ok = app.retry(session)
    assert "demonstration" in ok[app.status] and session["pending"] is None
    assert len(client.received) == 1  # the stored ranking was not sent again
    [demo] = client.demonstrations
    [ranking] = client.received
    assert (demo.comparison_id, demo.answer, demo.labeler_id) == (ranking.id, "It is 4.", "bob")
    assert [(m.role, m.content) for m in demo.messages] == [("user", "What is 2 + 2?")]
    assert session["turn"] is None  # the chat went on

    # A refused demonstration does not hold up a stored ranking (its ideal_answer has it).
    list(app.send(session, "And 3 + 3?", Login()))
    client.demos_down = grpc.StatusCode.INVALID_ARGUMENT
    out = app.submit(Login(), session, "2", "1", [], [], "", "6")
    assert "not stored as a demonstration" in out[app.status] and session["turn"] is None
    assert len(client.received) == 2 and session["pending"] is None
    # No better answer: no demonstration at all.
    client.demos_down = None
    list(app.send(session, "Thanks", Login()))
    app.submit(Login(), session, "1", "1", [], [], "", "  ")
    assert len(client.received) == 3 and len(client.demonstrations) == 1


def test_handlers_skip_and_new_conversation():
    from ui.app import RankingApp, _new_session

    app = RankingApp(UIConfig(k=2), FakeClient())
    app.build()
    session = _new_session()
    list(app.send(session, "hi", Login()))
    blocked = list(app.send(session, "again", Login()))
    assert "Rank (or skip)" in blocked[-1][app.status]
    app.skip(session)
    assert session["turn"] is None and session["messages"] == []
    session["messages"] = [{"role": "user", "content": "x"}]
    out = app.new_conversation(session)
    assert session["messages"] == [] and out[app.chat] == []
