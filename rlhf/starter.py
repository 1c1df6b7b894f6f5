"""The starter model: a tiny Llama chat model the project builds itself, offline.

Commands that are not given a model use this one. It is trained from the seeded synthetic
data in :mod:`rlhf.starter_data`, saved in Hugging Face format and then loaded exactly like a
hub model (``AutoTokenizer`` / ``AutoModelForCausalLM.from_pretrained``), so the rest of the
code has a single path for real and starter models. Builds are deterministic and cached.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from rlhf import starter_data as data

logger = logging.getLogger(__name__)

BUILDER_VERSION = "starter-builder-v2"
"""Bump whenever the build recipe changes, so cached starter models are rebuilt."""

PAD, BOS, END = "<|pad|>", "<|bos|>", "<|end|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS = [PAD, BOS, END, *ROLE_TOKENS.values()]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
"""``<|bos|>`` then ``<|role|>\\n{content}<|end|>\\n`` per message; ``<|end|>`` is the EOS."""


@dataclass(frozen=True)
class StarterPreset:
    """Size and training budget of a starter model; every field enters the cache hash."""

    name: str
    vocab_size: int = 640  # byte-level BPE: 256 bytes + 6 specials + merges
    hidden_size: int = 256
    intermediate_size: int = 704  # multiples of 64: bitsandbytes 4-bit CPU kernels need them
    num_layers: int = 4
    num_heads: int = 4
    context_length: int = 256  # long enough for a short multi-turn chat
    train_steps: int = 2200  # ~0.12 s each on one CPU core: the build takes ~5 min
    batch_size: int = 16  # conversations per step; more small steps beat fewer big ones here
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    tokenizer_texts: int = 4000  # synthetic texts the BPE tokenizer is trained on
    eval_per_kind: int = 50  # held-out tasks per kind for the accuracy report
    threads: int = 1  # fixed for reproducible float sums; >1 crawls when other work shares the CPU


PRESETS: dict[str, StarterPreset] = {
    "starter": StarterPreset(name="starter"),
    "tiny": StarterPreset(
        name="tiny", vocab_size=512, hidden_size=64, intermediate_size=192, num_layers=2,
        num_heads=2, train_steps=300, learning_rate=1e-2, warmup_steps=20,
        tokenizer_texts=1500, eval_per_kind=4,
    ),
}
TRAIN_MIX = ("add", "add", "sub", "sort", "sort", "reverse", "reverse", "reverse",
             "count_words", "count_letters", "upper", "chat")
"""Kinds cycled for training: the slow-to-learn ones (copying, arithmetic) appear more."""


def get_preset(preset: StarterPreset | str) -> StarterPreset:
    """Accept a preset name or object, so callers and the CLI can pass either."""
    if isinstance(preset, StarterPreset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown starter preset {preset!r}; choose from {sorted(PRESETS)}")
    return PRESETS[preset]


def build_tokenizer(texts: Sequence[str], preset: StarterPreset) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (no UNK: any unicode round-trips) with single-digit tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=preset.vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=END, pad_token=PAD,
        extra_special_tokens=list(ROLE_TOKENS.values()), padding_side="left",
        model_max_length=preset.context_length, chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def encode_conversation(tok: PreTrainedTokenizerFast,
                        messages: Sequence[dict[str, str]]) -> tuple[list[int], list[bool]]:
    """Token ids of the chat-templated conversation and a mask of assistant-answer tokens.

    Specials split the text before BPE, so encoding piece by piece equals encoding the whole
    rendered template (a test checks this) while telling which tokens the model must learn.
    """
    backend = tok.backend_tokenizer
    newline = backend.encode("\n", add_special_tokens=False).ids
    ids = [tok.convert_tokens_to_ids(BOS)]
    mask = [False]
    for msg in messages:
        head = [tok.convert_tokens_to_ids(ROLE_TOKENS[msg["role"]]), *newline]
        body = [*backend.encode(msg["content"], add_special_tokens=False).ids, tok.eos_token_id]
        is_answer = msg["role"] == "assistant"
        ids += head + body + newline
        mask += [False] * len(head) + [is_answer] * len(body) + [False]
    return ids, mask


def _tokenizer_texts(preset: StarterPreset, seed: int) -> list[str]:
    """Message contents and corpus sentences: the text the BPE merges are learned from."""
    rng = random.Random(seed)
    tasks = data.make_tasks(preset.tokenizer_texts, seed=seed + 2)
    texts = [m["content"] for t in tasks for m in data.make_conversation(rng, [t])]
    return texts + data.pretraining_corpus(preset.tokenizer_texts, seed)


def _training_examples(tok: PreTrainedTokenizerFast, preset: StarterPreset,
                       seed: int) -> tuple[list[tuple[list[int], list[bool]]], set[str]]:
    """Encoded conversations for all steps (a fifth with two turns) and their prompts."""
    n = preset.train_steps * preset.batch_size
    rng = random.Random(seed + 1)
    tasks = data.make_tasks(int(n * 1.25) + 1, seed=seed, kinds=TRAIN_MIX)
    examples, i = [], 0
    while len(examples) < n:
        turns = 2 if rng.random() < 0.2 else 1
        examples.append(encode_conversation(tok, data.make_conversation(rng, tasks[i:i + turns])))
        i += turns
    return examples, {t.prompt for t in tasks[:i]}


def _batches(examples: list[tuple[list[int], list[bool]]], preset: StarterPreset,
             pad_id: int, gen: torch.Generator) -> list[dict[str, torch.Tensor]]:
    """Shuffled, length-bucketed, right-padded batches (labels -100 off the answers).

    Bucketing similar lengths together roughly halves the compute wasted on padding.
    """
    order = torch.randperm(len(examples), generator=gen).tolist()
    size, groups = preset.batch_size, []
    for lo in range(0, len(order), size * 64):
        bucket = sorted(order[lo:lo + size * 64], key=lambda j: len(examples[j][0]))
        groups += [bucket[i:i + size] for i in range(0, len(bucket) - size + 1, size)]
    groups = [groups[i] for i in torch.randperm(len(groups), generator=gen).tolist()]
    return [_pad([examples[j] for j in group], preset.context_length, pad_id)
            for group in groups]


def _pad(chunk: list[tuple[list[int], list[bool]]], max_len: int,
         pad_id: int) -> dict[str, torch.Tensor]:
    width = min(max(len(ids) for ids, _ in chunk), max_len)
    input_ids = torch.full((len(chunk), width), pad_id)
    labels = torch.full((len(chunk), width), -100)
    attention = torch.zeros((len(chunk), width), dtype=torch.long)
    for row, (ids, mask) in enumerate(chunk):
        ids_t = torch.tensor(ids[:width])
        input_ids[row, :len(ids_t)] = ids_t
        attention[row, :len(ids_t)] = 1
        labels[row, :len(ids_t)] = torch.where(torch.tensor(mask[:width]), ids_t, -100)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def _lr_lambda(preset: StarterPreset):
    """Linear warmup then cosine decay to 10% of the peak learning rate."""
    def factor(step: int) -> float:
        if step < preset.warmup_steps:
            return (step + 1) / preset.warmup_steps
        progress = (step - preset.warmup_steps) / max(1, preset.train_steps - preset.warmup_steps)
        return 0.1 + 0.45 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def _make_model(tok: PreTrainedTokenizerFast, preset: StarterPreset) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size, num_hidden_layers=preset.num_layers,
        num_attention_heads=preset.num_heads, num_key_value_heads=preset.num_heads,
        max_position_embeddings=preset.context_length, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return LlamaForCausalLM(config)


def _train(model: LlamaForCausalLM, examples: list, preset: StarterPreset, pad_id: int,
           seed: int) -> float:
    """Plain AdamW + warmup/cosine loop; returns the mean loss of the last 100 steps."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=preset.learning_rate, betas=(0.9, 0.95),
                            weight_decay=preset.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(preset))
    model.train()
    losses: list[float] = []
    for step, batch in enumerate(_batches(examples, preset, pad_id, gen)):
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            logger.info("step %d/%d loss %.4f (mean of last 100)", step + 1,
                        preset.train_steps, sum(losses[-100:]) / 100)
    model.eval()
    return sum(losses[-100:]) / len(losses[-100:])


@torch.no_grad()
def evaluate(model_dir: Path, per_kind: int, seed: int, seen: set[str] | None = None) -> dict:
    """Greedy-decode held-out tasks through ``from_pretrained`` (like any user would).

    The task space is small, so ``seen`` (training prompts) is used to report honestly how
    many held-out prompts the model has literally seen.
    """
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tasks = data.make_tasks(per_kind * len(data.KINDS), seed=seed)
    outputs: list[str] = []
    for start in range(0, len(tasks), 32):
        chunk = tasks[start:start + 32]
        prompts = [tok.apply_chat_template([{"role": "user", "content": t.prompt}],
                                           add_generation_prompt=True, tokenize=False)
                   for t in chunk]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=48, do_sample=False)
        new = out[:, enc["input_ids"].shape[1]:]
        outputs += tok.batch_decode(new, skip_special_tokens=True)
    right, total = Counter(), Counter()
    for task, text in zip(tasks, outputs, strict=True):
        total[task.kind] += 1
        right[task.kind] += data.check(task, text)
    return {
        "overall": sum(right.values()) / len(tasks),
        "per_kind": {k: right[k] / total[k] for k in total},
        "seen_in_training": sum(t.prompt in (seen or ()) for t in tasks) / len(tasks),
        "samples": [{"prompt": t.prompt, "output": o}
                    for t, o in zip(tasks[:8], outputs[:8], strict=True)],
    }


def build_starter_model(out_dir: Path, preset: StarterPreset | str, seed: int = 0) -> dict:
    """Build tokenizer + model into ``out_dir`` deterministically and return the metrics."""
    preset = get_preset(preset)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(preset.threads)
    try:
        torch.manual_seed(seed)
        tok = build_tokenizer(_tokenizer_texts(preset, seed), preset)
        examples, seen = _training_examples(tok, preset, seed)
        model = _make_model(tok, preset)
        logger.info("building starter preset %r: %d parameters, %d steps",
                    preset.name, model.num_parameters(), preset.train_steps)
        final_loss = _train(model, examples, preset, tok.pad_token_id, seed)
        model.generation_config = GenerationConfig(
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id, max_new_tokens=64,
        )
        model.save_pretrained(out_dir, safe_serialization=True)
        tok.save_pretrained(out_dir)
        train_seconds = time.perf_counter() - start
        accuracy = evaluate(out_dir, preset.eval_per_kind, seed=seed + 10_000, seen=seen)
    finally:
        torch.set_num_threads(threads)
    metrics = {
        "preset": preset.name, "config": asdict(preset), "seed": seed,
        "builder_version": BUILDER_VERSION, "data_version": data.DATA_VERSION,
        "parameters": model.num_parameters(), "final_loss": round(final_loss, 4),
        "train_seconds": round(train_seconds, 1),
        "build_seconds": round(time.perf_counter() - start, 1),
        "heldout_accuracy": accuracy,
    }
    (out_dir / "starter.json").write_text(json.dumps(metrics, indent=2) + "\n")
    logger.info("starter model built in %.1fs: accuracy %.2f", metrics["build_seconds"],
                accuracy["overall"])
    return metrics


def rlhf_home() -> Path:
    """Root of the project's cache: ``$RLHF_HOME`` or ``~/.cache/rlhf``."""
    return Path(os.environ.get("RLHF_HOME") or Path.home() / ".cache" / "rlhf")


def starter_model_dir(preset: StarterPreset | str = "starter") -> Path:
    """Cache directory whose name changes whenever the preset, data or recipe changes."""
    preset = get_preset(preset)
    key = json.dumps([asdict(preset), BUILDER_VERSION, data.DATA_VERSION], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    return rlhf_home() / "models" / f"starter-{preset.name}-{digest}"


def _build_atomically(final: Path, preset: StarterPreset | str, seed: int, force: bool) -> Path:
    """Build into a sibling temp dir and rename it in, under a lock shared by all builders.

    A crash therefore never leaves a half-written model, and two concurrent commands build
    it only once (the second waits for the lock, then finds the finished directory).
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "starter.json").exists() and not force:
            return final
        if final.exists() and not force:
            raise FileExistsError(f"{final} exists but is not a starter model; use --force")
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the model is an ordinary cache entry
        try:
            build_starter_model(tmp, preset, seed)
            if final.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
                os.rename(final, old / "model")
                shutil.rmtree(old)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def ensure_starter_model(preset: StarterPreset | str = "starter") -> Path:
    """Return the cached starter model directory, building it first if it is missing."""
    return _build_atomically(starter_model_dir(preset), preset, seed=0, force=False)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``rlhf starter-model [--preset starter|tiny] [--out DIR] [--force]``."""
    parser = argparse.ArgumentParser(prog="rlhf starter-model",
                                     description="Build (or reuse) the offline starter model.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="starter")
    parser.add_argument("--out", type=Path, help="build here instead of the cache")
    parser.add_argument("--force", action="store_true", help="rebuild even if it exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    target = args.out.resolve() if args.out else starter_model_dir(args.preset)
    final = _build_atomically(target, args.preset, seed=0, force=args.force)
    print(json.dumps(json.loads((final / "starter.json").read_text()), indent=2))
    print(final)
    return 0


if __name__ == "__main__":
    sys.exit(main())
