"""Tiny Qwen3 policy speed on this machine: parameters, generation tok/s, fwd+bwd seconds.

Generation goes through `HFBackend` (the rollout path: left-padded micro-batch, KV cache,
sampling at T=1, per-token log-probs) with the eos token suppressed so every row produces exactly
`--new-tokens` tokens; prompts are random token ids of `--prompt-len` (median of `--repeats`
calls after a warm-up). Training cost is one
forward + backward of the causal-LM loss on `--train-batch` x `--train-len` random tokens (the
median of `--repeats` after one warm-up). The PPO scoring row times the trainer's mini-batch
(`--train-batch` rows of `--train-len` tokens whose last `--response-len` are the response):
log-probs of the whole rows (`sequence_logprobs`) vs the response window only (`left_align` +
`tail_logprobs`, what `GRPOModule` and the teacher use), forward + backward, in one command. Usage:
    python experiments/benchmarks/tiny_policy_speed.py                     # the tiny defaults, 4k vocab
    python experiments/benchmarks/tiny_policy_speed.py --hidden 256 --layers 8 --intermediate 768
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from types import SimpleNamespace

import torch
from transformers import Qwen3ForCausalLM

from stepopsd.policy.backends import HFBackend, SamplingParams
from stepopsd.policy.logprobs import left_align, sequence_logprobs, tail_logprobs, tail_width
from stepopsd.policy.tiny import count_parameters, tiny_qwen3_config


def build(args) -> Qwen3ForCausalLM:
    cfg = tiny_qwen3_config(args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                            num_kv_heads=args.kv_heads, intermediate_size=args.intermediate, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    return Qwen3ForCausalLM(cfg).eval()


def generation_speed(model, args) -> tuple[float, float]:
    no_eos = torch.zeros(args.vocab)
    no_eos[1] = -1e9  # eos never sampled: every row runs to max_new_tokens
    hook = model.lm_head.register_forward_hook(lambda mod, inp, out: out + no_eos)
    backend = HFBackend(model, SimpleNamespace(eos_token_id=1, pad_token_id=0), batch_size=args.gen_batch)
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(2, args.vocab, (args.gen_batch, args.prompt_len), generator=gen).tolist()
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0)
    backend.generate(prompts, SamplingParams(max_new_tokens=8), seed=0)  # warm-up
    times = []
    for r in range(args.repeats):
        t0 = time.perf_counter()
        outs = backend.generate(prompts, params, seed=r)
        times.append(time.perf_counter() - t0)
    hook.remove()
    tokens = sum(len(o.token_ids) for o in outs)
    seconds = statistics.median(times)
    return tokens / seconds, seconds


def train_step_seconds(model, args) -> float:
    model.train()
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(2, args.vocab, (args.train_batch, args.train_len), generator=gen)
    times = []
    for i in range(args.repeats + 1):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        if i:  # the first pass is a warm-up
            times.append(time.perf_counter() - t0)
    model.eval()
    return statistics.median(times)


def scoring_seconds(model, args) -> tuple[float, float]:
    """(whole rows, response window) fwd+bwd seconds of a right-padded PPO mini-batch, medians."""
    model.train()
    gen = torch.Generator().manual_seed(3)
    b, width = args.train_batch, args.train_len
    lengths = torch.randint(width // 2, width + 1, (b,), generator=gen)
    cols = torch.arange(width)[None, :]
    mask = (cols < lengths[:, None]).long()
    loss_mask = (cols >= (lengths - args.response_len)[:, None]).long() * mask
    ids = torch.randint(2, args.vocab, (b, width), generator=gen) * mask

    def whole():
        return (sequence_logprobs(model, ids, mask) * loss_mask).sum()

    def window():
        rows = left_align({"ids": ids, "mask": mask, "loss": loss_mask}, mask)
        keep = tail_width(rows["loss"])
        return (tail_logprobs(model, rows["ids"], rows["mask"], keep)[0] * rows["loss"][:, -keep:]).sum()

    out = []
    for fn in (whole, window):
        times = []
        for i in range(args.repeats + 1):
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            fn().backward()
            if i:
                times.append(time.perf_counter() - t0)
        out.append(statistics.median(times))
    model.eval()
    return out[0], out[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=384)
    p.add_argument("--gen-batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--train-batch", type=int, default=16)
    p.add_argument("--train-len", type=int, default=512)
    p.add_argument("--response-len", type=int, default=48)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    model = build(args)
    n = count_parameters(model)
    emb = model.model.embed_tokens.weight.numel()
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"config: vocab {args.vocab}, hidden {args.hidden}, layers {args.layers}, heads {args.heads}/{args.kv_heads}, mlp {args.intermediate}")
    print(f"params: {n:,} ({n / 1e6:.2f} M; {n - emb:,} outside the tied embedding)")
    tps, secs = generation_speed(model, args)
    print(f"generate: {tps:,.0f} tok/s (batch {args.gen_batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, median {secs:.2f} s)")
    fb = train_step_seconds(model, args)
    print(f"fwd+bwd: {fb:.2f} s for {args.train_batch}x{args.train_len} tokens ({args.train_batch * args.train_len / fb:,.0f} tok/s)")
    whole, window = scoring_seconds(model, args)
    print(f"PPO scoring fwd+bwd ({args.train_batch} rows of {args.train_len // 2}-{args.train_len} tokens, last {args.response_len} "
          f"the response): whole rows {whole:.2f} s, response window {window:.2f} s ({whole / window:.2f}x)")


if __name__ == "__main__":
    main()
