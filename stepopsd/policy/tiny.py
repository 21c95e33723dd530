"""A tiny, randomly initialised Qwen3 causal LM for offline CPU runs.

Implements the policy the framework trains when no hub model is reachable: the real
`transformers` Qwen3 architecture (RMSNorm, RoPE, grouped-query attention with q/k norms, SwiGLU
MLP), only small. Everything downstream (generation backends, log-probs, the trainer, saving and
`loading.load_policy`) sees an ordinary `Qwen3ForCausalLM`.

Defaults: hidden 128, 4 layers, 4 query / 2 key-value heads of width 32, MLP 384, tied
embeddings: about 1.31 M parameters with a 4,096-token vocabulary (0.79 M outside the
embedding), about 0.83 M with the ~300-token ALFWorld word vocabulary.

Simplifications: random initialisation (the transformers default: normal(0, 0.02) weights);
`head_dim` is `hidden_size // num_heads` (Qwen3's own default of 128 would dwarf a tiny model);
no sliding window; special-token ids come from the tokenizer (no bos for the word tokenizer).
"""
from __future__ import annotations

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM


def tiny_qwen3_config(
    vocab_size: int,
    *,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 384,
    max_position_embeddings: int = 4096,
    tie_word_embeddings: bool = True,
    pad_token_id: int | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
) -> Qwen3Config:
    """A small Qwen3 config; one-line ValueError on inconsistent sizes."""
    if vocab_size < 2:
        raise ValueError(f"vocab_size={vocab_size} must be >= 2")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not divisible by num_kv_heads={num_kv_heads}")
    if (hidden_size // num_heads) % 2:
        raise ValueError(f"head_dim={hidden_size // num_heads} must be even (rotary embeddings)")
    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        max_window_layers=num_layers,
        use_sliding_window=False,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )


def build_tiny_policy(tokenizer, *, seed: int = 0, **config_overrides) -> Qwen3ForCausalLM:
    """A randomly initialised tiny Qwen3 sized to `tokenizer` (vocab, pad/bos/eos ids).

    The same seed gives the same weights; the global RNG state is left as it was.
    `config_overrides` go to `tiny_qwen3_config` (hidden_size=..., num_layers=..., ...).
    """
    config = tiny_qwen3_config(
        len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **config_overrides,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model.eval()


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (a tied embedding counted once)."""
    return sum(p.numel() for p in model.parameters())
