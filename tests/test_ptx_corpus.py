"""The ptx corpus (learner/ptx_corpus.py): formats, refusals naming path and reason, the fixed
held-out split, bounded streaming reads, the model's default corpus, and one learner
iteration on the tiny model whose ptx metrics come from a real-text corpus file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis
import torch

from learner.config import LearnerConfig
from learner.iteration import Learner, Progress
from learner.ptx_corpus import (
    FACTBOOK,
    SYNTHETIC,
    CorpusError,
    check_corpus,
    default_corpus,
    is_heldout,
    read_documents,
    sample_texts,
)
from rlhf import comparisons
from rlhf.modeling import load_model
from rlhf.settings import from_flat
from rlhf.starter_data import pretraining_corpus
from tests.conftest import ROOT
from tests.test_learner_iteration import make_comparison

TEXT = "The first document\nspans two lines.\n\n\n  Second one.  \n\nThird.\n"


def docs(path: Path, start: int = 0) -> list[str]:
    return [text for _, _, text in read_documents(path, start)]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


# -- formats ------------------------------------------------------------------------------
def test_plain_text_documents_split_on_blank_lines(tmp_path: Path):
    path = tmp_path / "a.txt"
    path.write_text(TEXT)
    assert docs(path) == ["The first document spans two lines.", "Second one.", "Third."]
    # From inside the first document: on to the next boundary, then whole documents.
    assert docs(path, 5) == ["Second one.", "Third."]
    assert [b for b, _, _ in read_documents(path)] == [0, 38, 55]


def test_jsonl_and_a_directory_of_both(tmp_path: Path):
    write_jsonl(tmp_path / "b.jsonl", ["one", "  ", "two"])
    (tmp_path / "c.txt").write_text("three\n\nfour\n")
    (tmp_path / ".hidden.txt").write_bytes(b"\0binary but hidden")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.ndjson").write_text('{"text": "five", "id": 1}\n\n')
    assert docs(tmp_path / "b.jsonl") == ["one", "two"]
    files = check_corpus(tmp_path)
    assert [p.name for p in files] == ["b.jsonl", "c.txt", "d.ndjson"]
    five = ["one", "two", "three", "four", "five"]
    train = {t for t in five if not is_heldout(t)}
    assert set(sample_texts(tmp_path, 100, seed=0, scan=10**6).texts) == train


# -- refusals -----------------------------------------------------------------------------
@pytest.mark.parametrize("name, content, reason", [
    ("empty.txt", b"", "empty: no document"),
    ("blank.txt", b"\n \n\n", "empty: no document"),
    ("bin.txt", b"hello\n\x00\x01\x02", "binary data (a NUL byte) at byte 6"),
    ("latin1.txt", "caf\u00e9\n".encode("latin-1"), "not UTF-8 text: invalid byte at byte 3"),
    ("bad.jsonl", b'{"text": "ok"}\n{"txt": "no"}\n', 'each line needs a "text" string'),
    ("notjson.jsonl", b'{"text": "ok"}\nnot json\n', "bad JSONL at byte 15"),
    ("list.jsonl", b'["text"]\n', 'each line needs a "text" string'),
])
def test_refused_with_path_and_reason(tmp_path: Path, name: str, content: bytes, reason: str):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CorpusError) as err:
        check_corpus(path)
    assert str(path) in str(err.value) and reason in str(err.value)
    assert err.value.path == str(path) and reason in err.value.reason


def test_refused_missing_empty_dir_and_unreadable(tmp_path: Path):
    with pytest.raises(CorpusError, match="no such file or directory"):
        check_corpus(tmp_path / "nope")
    (tmp_path / "d").mkdir()
    with pytest.raises(CorpusError, match="empty: the directory holds no files"):
        check_corpus(tmp_path / "d")
    locked = tmp_path / "locked.txt"
    locked.write_text("a document\n")
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):  # root reads anything: a directory as the file
            locked = tmp_path / "d"
            (locked / "x.txt").mkdir()
            with pytest.raises(CorpusError, match="empty"):
                check_corpus(locked)
        else:
            with pytest.raises(CorpusError, match=f"{locked}.*unreadable"):
                check_corpus(locked)
    finally:
        (tmp_path / "locked.txt").chmod(0o644)


def test_rlhf_learn_refuses_before_the_model_loads(tmp_path: Path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"title": "x"}\n')
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RLHF_LEARN_PTX_CORPUS": str(bad)}
    done = subprocess.run([sys.executable, "-m", "rlhf.cli", "learn", "--model", "no-such"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert f"ptx_corpus '{bad}'" in done.stderr and '"text" string' in done.stderr
    assert "unknown model name" not in done.stderr  # refused before the model is resolved


# -- the held-out split -------------------------------------------------------------------
def test_heldout_split_is_fixed_and_disjoint_from_train(tmp_path: Path):
    texts = [f"Document number {i} of the test corpus." for i in range(400)]
    path = write_jsonl(tmp_path / "c.jsonl", texts)
    held = {t for t in texts if is_heldout(t)}
    assert 20 <= len(held) <= 60  # about a tenth
    assert is_heldout(texts[0]) == is_heldout(str(texts[0]))  # a stable hash, not hash()
    a = sample_texts(path, 16, seed=7, heldout=True)
    assert sample_texts(path, 16, seed=7, heldout=True).texts == a.texts  # fixed
    assert len(a.texts) == 16 and set(a.texts) <= held
    for seed in range(5):
        train = sample_texts(path, 64, seed=seed).texts
        assert len(train) == 64 and not set(train) & held
    whole = sample_texts(path, 1000, seed=3, heldout=True, scan=10**6)
    assert set(whole.texts) == held  # every held-out document, each once


def test_train_side_is_topped_up_and_a_side_without_documents_is_refused(tmp_path: Path):
    texts = [t for t in (f"t{i}" for i in range(200)) if not is_heldout(t)][:3]
    path = write_jsonl(tmp_path / "c.jsonl", texts)
    got = sample_texts(path, 10, seed=1).texts
    assert len(got) == 10 and set(got) == set(texts)
    with pytest.raises(CorpusError, match="no held-out document"):
        sample_texts(path, 4, seed=1, heldout=True)


# -- streaming ----------------------------------------------------------------------------
def test_a_large_corpus_is_read_in_a_bounded_window(tmp_path: Path):
    path = tmp_path / "big.txt"
    with path.open("w") as fh:
        for i in range(200_000):  # ~9 MB
            fh.write(f"Paragraph {i} says something about the weather today.\n\n")
    size = path.stat().st_size
    one = sample_texts(path, 8, seed=1, scan=500)
    assert len(one.texts) == 8 and one.seen == 500
    assert one.bytes_read < size / 100  # 500 documents of 200,000 were read
    other = sample_texts(path, 8, seed=2, scan=500)
    assert one.texts != other.texts  # windows start at a seeded random byte
    numbers = sorted(int(t.split()[1]) for t in one.texts)
    assert numbers[-1] - numbers[0] < 1000  # all from one window


def test_the_window_wraps_round_every_file_once(tmp_path: Path):
    for name in "abc":
        write_jsonl(tmp_path / f"{name}.jsonl", [f"{name}{i}" for i in range(50)])
    texts = {f"{n}{i}" for n in "abc" for i in range(50)}
    train = {t for t in texts if not is_heldout(t)}
    for seed in range(6):  # starts in any file at any byte: each document exactly once
        got = sample_texts(tmp_path, 10**6, seed=seed, scan=10**6)
        assert got.seen == len(train) and set(got.texts) == train


# -- which corpus ------------------------------------------------------------------------
def test_default_corpus_by_model(tiny_model_dir: Path):
    assert default_corpus("", "") == SYNTHETIC
    assert default_corpus("", "starter-tiny") == SYNTHETIC
    assert default_corpus("", str(tiny_model_dir)) == SYNTHETIC  # a built starter's folder
    assert default_corpus("", "smollm2-135m-instruct") == str(FACTBOOK)
    assert default_corpus("", "owner/some-hub-model") == str(FACTBOOK)
    assert default_corpus(" /data/x.txt ", "") == "/data/x.txt"


def test_the_shipped_corpus_is_real_prose_with_both_sides():
    files = check_corpus(FACTBOOK)
    assert files == [FACTBOOK] and FACTBOOK.stat().st_size < 2_000_000
    held = sample_texts(FACTBOOK, 16, seed=10_000, heldout=True).texts
    train = sample_texts(FACTBOOK, 160, seed=0).texts
    assert len(held) == 16 and len(set(train)) == 160 and not set(held) & set(train)
    assert all(len(t.split()) >= 40 for t in held + train)


# -- one iteration ------------------------------------------------------------------------
def test_iteration_records_ptx_metrics_from_the_given_corpus(tiny_model_dir: Path,
                                                            redis_server, tmp_path: Path):
    torch.set_num_threads(1)
    url = redis_server.db_url(14)
    client = redis.Redis.from_url(url)
    client.flushdb()
    cfg = from_flat(LearnerConfig, dict(
        model=str(tiny_model_dir), device="cpu", redis_url=url,
        data_dir=str(tmp_path / "data"), adapter_store=str(tmp_path / "store"),
        prompts_per_iteration=4, eval_prompts=2, ptx_eval_texts=4, ptx_corpus=str(FACTBOOK),
        rm_batch=4, rm_max_length=64, rm_lora_rank=4, rm_epochs=1, rm_heldout_fraction=0.3,
        ppo_steps=1, ppo_batch_size=2, ppo_minibatch_size=2, ppo_max_new_tokens=6,
        ppo_lora_rank=4, ppo_ptx_coef=1.0, ppo_ptx_batch_size=3, ppo_ptx_max_length=48,
        progress_bars=False))
    comparisons.append_many(client, [make_comparison(i, f"What is {i} + 1?", str(i + 1))
                                     for i in range(6)])
    learner = Learner(cfg, load_model(cfg.model, device="cpu"))
    try:
        m = learner.run(Progress(id=learner.new_id())).metrics
        assert m["ptx/corpus"] == str(FACTBOOK)
        held = sample_texts(FACTBOOK, 4, seed=cfg.seed + 10_000, heldout=True).texts
        assert m["ptx/loss_after"] == pytest.approx(learner._ptx_loss(held), rel=1e-5)
        synthetic = learner._ptx_loss(pretraining_corpus(4, 0))
        # The tiny starter knows its own toy sentences, not Factbook prose: these losses
        # are the real corpus's, and so is the ptx term PPO trained with.
        assert m["ptx/loss_before"] > synthetic + 1.0
        assert m["ppo/ptx_loss"] > synthetic + 1.0
        assert m["ptx/loss_delta"] == pytest.approx(m["ptx/loss_after"] - m["ptx/loss_before"])
    finally:
        learner.close()
        client.close()
