"""SFT warm start of the tiny offline policy on expert demonstrations (`python sft.py`).

Builds, once per configuration, everything a CPU run needs and no hub can provide: expert
demonstrations from the training games (with epsilon-random detours, so the warm start is
imperfect and RL has room to improve it), a word-level tokenizer trained on that text plus the
hindsight block vocabulary, a tiny Qwen3-architecture model, and a few epochs of next-token
training on the responses (prompt tokens are masked out). The result is saved with
`save_pretrained` under `cache_dir/tiny-<hash of the config>/` and reused by every later run with
the same configuration. The games are generated ones, and the folder's `sft.json` says so.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field

import torch

from stepopsd.envs.alfworld.demos import DEMO_FORMAT  # in every cache key (Search-QA's too), as before
from stepopsd.envs.registry import env_names, get_env
from stepopsd.hindsight import fit_from_front, hindsight_text
from stepopsd.policy.tiny import build_tiny_policy, count_parameters
from stepopsd.policy.tokenizer import train_word_tokenizer
from stepopsd.progress import Progress
from stepopsd.rollout import encode_prompt


NEWER_FIELDS = {"chat_template_kwargs": {}, "demo_repeat": 0.0, "hindsight_examples": 0.0}  # left out of the cache key at these values


@dataclass(frozen=True)
class TinySFTKnobs:
    """The tiny policy's SFT knobs (`model.sft`, its schema: `stepopsd.schemas`)."""

    epochs: int = 3
    lr: float = 3e-3
    batch_size: int = 16
    max_tokens: int = 768
    demo_epsilon: float = 0.1  # ALFWorld: random admissible detours per demo step; credit: share of demo episodes that lose
    demo_repeat: float = 0.0  # ALFWorld: probability of an inadmissible repeat of the last command (recovery in the demos)
    episodes_per_game: int = 1  # epsilon-episodes per training game (different random detours)
    hindsight_examples: float = 0.0  # share of demo steps also given in the teacher's hindsight format (envs that make them)
    bucket_by_length: bool = False  # batches of similar lengths: faster, but each batch then holds similar steps
    seed: int = 0


@dataclass(frozen=True, kw_only=True)
class TinySFTConfig(TinySFTKnobs):
    """What builds one tiny policy: the SFT knobs and what the run gives them (data, environment, prompt format)."""

    data: str  # the environment's data folder (ALFWorld: holding json_2.1.1/; Search-QA: holding train.parquet)
    env: str = "alfworld"  # a registered environment (stepopsd/envs/<name>/spec.py)
    corpus: str | None = None  # the environment's corpus, if it has one (Search-QA: the one the demonstrations search)
    architecture: dict = field(default_factory=dict)  # tiny_qwen3_config overrides
    vocab_size: int = 4096
    task_types: tuple = ("all",)  # demonstrations from these task types only
    compact: bool = True
    history_length: int = 2
    chat_template: bool = True
    chat_template_kwargs: dict = field(default_factory=dict)  # extra apply_chat_template arguments

    def __post_init__(self):
        if self.env not in env_names():
            raise ValueError(f"sft: env={self.env!r} must be {' or '.join(env_names())}")
        get_env(self.env).check_demonstrations(self)  # e.g. Search-QA needs a corpus
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.max_tokens < 32 or self.episodes_per_game < 1:
            raise ValueError("sft: need epochs >= 1, batch_size >= 1, lr > 0, max_tokens >= 32 and episodes_per_game >= 1")
        if not (0.0 <= self.demo_epsilon < 1.0 and 0.0 <= self.demo_repeat < 1.0):
            raise ValueError(f"sft: demo_epsilon={self.demo_epsilon} and demo_repeat={self.demo_repeat} are probabilities "
                             "per demonstration step: each must be in [0, 1)")
        if not 0.0 <= self.hindsight_examples <= 1.0:
            raise ValueError(f"sft: hindsight_examples={self.hindsight_examples} is a share of the demonstration steps: "
                             "use a value in [0, 1]")
        if self.hindsight_examples and not get_env(self.env).hindsight_demonstrations:
            raise ValueError(f"sft: hindsight_examples={self.hindsight_examples}: env={self.env!r}'s demonstrations "
                             "have no hindsight examples; use 0")
        object.__setattr__(self, "task_types", tuple(self.task_types))

    def key(self) -> str:
        paths = {"data": os.path.abspath(self.data), "corpus": self.corpus and os.path.abspath(self.corpus)}
        fields = asdict(self)
        for name, unset in NEWER_FIELDS.items():  # folders built before these fields existed stay valid
            if fields[name] == unset:
                del fields[name]
        blob = json.dumps(fields | paths | {"demo_format": DEMO_FORMAT}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]


def sft_examples(records: list[dict], tokenizer, cfg: TinySFTConfig) -> list[tuple[list[int], int]]:
    """(ids, start of the trained tokens) per demonstration step: chat-wrapped prompt + response + eos, trained on the
    response. A record with `hindsight` is in the teacher's format (`stepopsd.hindsight`, Eq. 3): prompt + the response
    before its target span + the hindsight block + the target span, trained on the target span only."""
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    out = []
    for r in records:
        prompt, _ = encode_prompt(tokenizer, r["prompt"], chat_template=cfg.chat_template, max_tokens=cfg.max_tokens // 2,
                                  template_kwargs=cfg.chat_template_kwargs)
        if "hindsight" in r:
            (start, end), h = r["target"], r["hindsight"]
            peer = fit_from_front(h["peer"], tokenizer, cfg.max_tokens // 2) if h["peer"] is not None else None
            head = prompt + ids(r["response"][:start]) + ids(hindsight_text(h["success"], peer))
            out.append((head + ids(r["response"][start:end]), len(head)))
            continue
        out.append((prompt + ids(r["response"]) + [tokenizer.eos_token_id], len(prompt)))
    return out


def length_buckets(lengths: list[int], batch_size: int, rng: random.Random, pool: int = 16) -> list[list[int]]:
    """Shuffled batches of similar lengths (less padding): shuffle, sort within pools of
    `pool` batches, cut into batches, shuffle the batches. `pool=1` is a plain shuffle.

    Measured on the tiny policy (10 epochs): Search-QA SFT loss 0.42 with pool 16 vs 0.09 plain
    (prompt length tracks the step index there, so length-sorted batches each hold one kind of
    step), 1.8x faster; ALFWorld 0.080 vs 0.068, where the warm start is still good."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    for i in range(0, len(order), batch_size * pool):
        sorted_pool = sorted(order[i:i + batch_size * pool], key=lengths.__getitem__)
        batches += [sorted_pool[j:j + batch_size] for j in range(0, len(sorted_pool), batch_size)]
    rng.shuffle(batches)
    return batches


def train_sft(model, examples: list[tuple[list[int], int]], cfg: TinySFTConfig, *, pad_id: int, progress: bool = True) -> float:
    """Next-token cross-entropy on response tokens; returns the last epoch's mean loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    rng = random.Random(cfg.seed)
    model.train()
    total = cfg.epochs * ((len(examples) + cfg.batch_size - 1) // cfg.batch_size)
    last = float("nan")
    with Progress("sft", total, "batch", description="SFT warm start of the tiny policy [generated demos]",
                  enabled=progress) as bar:
        for epoch in range(cfg.epochs):
            losses = []
            lengths = [len(ids) for ids, _ in examples]
            for batch in length_buckets(lengths, cfg.batch_size, rng, pool=16 if cfg.bucket_by_length else 1):
                chunk = [examples[j] for j in batch]
                width = max(len(ids) for ids, _ in chunk)
                ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                labels = torch.full((len(chunk), width), -100, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for b, (seq, start) in enumerate(chunk):
                    ids[b, :len(seq)] = torch.tensor(seq)
                    labels[b, start:len(seq)] = torch.tensor(seq[start:])
                    mask[b, :len(seq)] = 1
                loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                losses.append(loss.item())
                bar.advance(epoch=f"{epoch + 1}/{cfg.epochs}", loss=sum(losses) / len(losses))
            last = sum(losses) / len(losses)
    model.eval()
    return last


def demonstrations(cfg: TinySFTConfig, path: str, workers: int | None, log) -> tuple[list[dict], list[str], str]:
    """(SFT records, extra tokenizer texts, data label): expert steps from the training tasks, played in the
    real environment (its spec's `demonstrations`), written to `path` as JSONL; the texts end with the two
    kinds of hindsight block, so that the tokenizer knows their words."""
    records, texts, peer, label = get_env(cfg.env).demonstrations(cfg, path, workers, log)
    return records, texts + [hindsight_text(True), hindsight_text(False, peer)], label


def ensure_tiny_policy(cfg: TinySFTConfig, cache_dir: str, *, workers: int | None = None, progress: bool = True,
                       log=print) -> str:
    """The folder of the warm-started tiny policy for `cfg`, building it the first time."""
    folder = os.path.join(cache_dir, f"tiny-{cfg.key()}")
    if os.path.exists(os.path.join(folder, "sft.json")):
        return folder
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    records, texts, label = demonstrations(cfg, os.path.join(tmp, "demos.jsonl"), workers, log)
    texts += [r["prompt"] for r in records] + [r["response"] for r in records]
    tokenizer = train_word_tokenizer(texts, vocab_size=cfg.vocab_size)
    torch.manual_seed(cfg.seed)
    model = build_tiny_policy(tokenizer, seed=cfg.seed, **cfg.architecture)
    loss = train_sft(model, sft_examples(records, tokenizer, cfg), cfg, pad_id=tokenizer.pad_token_id, progress=progress)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, "sft.json"), "w") as f:
        json.dump({"config": asdict(cfg), "data": label, "demo_steps": len(records), "final_loss": loss,
                   "parameters": count_parameters(model)}, f, indent=2)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    log(f"[{label} data] tiny policy ready: {count_parameters(model):,} parameters, SFT loss {loss:.3f}")
    return folder
