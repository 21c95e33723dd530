"""Policy package: word tokenizer, tiny Qwen3, loading, HF generation backend, log-probs.

Everything is built in-process from literal ALFWorld-protocol text (no downloads, nothing read
from outside the repository); models are a few tens of thousands of parameters.
"""
from __future__ import annotations

import json

import pytest
import torch

from stepopsd.envs.alfworld.prompts import action_span, render_prompt
from stepopsd.policy.backends import Generation, HFBackend, SamplingParams
from stepopsd.policy.loading import PolicyError, is_hub_id, load_policy
from stepopsd.policy.logprobs import left_align, sequence_logprobs, tail_logprobs, tail_width
from stepopsd.policy.tiny import build_tiny_policy, count_parameters, tiny_qwen3_config
from stepopsd.policy.tokenizer import CHAT_TEMPLATE, PROTOCOL_TAGS, SPECIAL_TOKENS, train_word_tokenizer
from stepopsd.spans import decode, token_span

from helpers.alfworld_text import ADMISSIBLE, GOAL, OBS
from helpers.tiny_policy import RESPONSES, corpus, ids_of, tiny, tok  # noqa: F401  (tok, tiny: fixtures)


# -- tokenizer ------------------------------------------------------------------------------------

def test_protocol_tags_and_specials_are_single_tokens(tok):
    for t in PROTOCOL_TAGS + SPECIAL_TOKENS:
        assert tok.convert_ids_to_tokens(ids_of(tok, t)) == [t]
    special = set(tok.all_special_ids)
    assert {tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS} <= special
    assert not {tok.convert_tokens_to_ids(t) for t in PROTOCOL_TAGS} & special
    assert (tok.eos_token, tok.pad_token, tok.unk_token) == ("<|im_end|>", "<pad>", "<unk>")
    # tags stay atomic inside words and regardless of case; protocol tags survive skip_special_tokens
    ids = ids_of(tok, "x<THINK>mug</think><action>look</action><|im_end|>")
    assert tok.convert_ids_to_tokens(ids)[1:] == ["<think>", "mug", "</think>", "<action>", "look", "</action>", "<|im_end|>"]
    assert decode(tok, ids) == "<think>mug</think><action>look</action>"


def test_offsets_are_exact_and_decode_round_trips(tok):
    for text in corpus():
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        pieces = tok.convert_ids_to_tokens(enc["input_ids"])
        assert tok.unk_token_id not in enc["input_ids"]
        assert enc["offset_mapping"][0][0] == 0 and enc["offset_mapping"][-1][1] == len(text)
        for (start, end), piece, (nxt, _) in zip(enc["offset_mapping"], pieces, enc["offset_mapping"][1:] + [(len(text), 0)]):
            assert text[start:end].lower() == piece and end == nxt  # exact and contiguous
        assert decode(tok, enc["input_ids"]) == text.lower()


def test_pretokenisation_splits_words_digits_punctuation(tok):
    pieces = tok.convert_ids_to_tokens(ids_of(tok, "go to cabinet 12.\n  look"))
    assert pieces == ["go", " to", " cabinet", " 1", "2", ".", "\n", " ", " look"]


def test_action_span_maps_onto_tokens(tok):
    for response in RESPONSES:
        ids = ids_of(tok, response)
        start, end = action_span(response)
        ts, te = token_span(tok, ids, start, end)
        assert decode(tok, ids[ts:te]) == response[start:end]


def test_unknown_words_become_unk(tok):
    ids = ids_of(tok, "go to the xylophone 7")
    assert tok.convert_ids_to_tokens(ids) == ["go", " to", " the", "<unk>", " 7"]
    assert decode(tok, ids) == "go to the 7"


def test_chat_template(tok):
    messages = [{"role": "system", "content": "you are an expert household agent."}, {"role": "user", "content": "look"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nyou are an expert household agent.<|im_end|>\n<|im_start|>user\nlook<|im_end|>\n<|im_start|>assistant\n"
    assert tok.apply_chat_template(messages[1:], tokenize=False) == "<|im_start|>user\nlook<|im_end|>\n"
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    assert ids == ids_of(tok, text) and tok.unk_token_id not in ids


def test_save_load_round_trip(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    back = AutoTokenizer.from_pretrained(tmp_path)
    assert back.get_vocab() == tok.get_vocab() and back.chat_template == CHAT_TEMPLATE
    for text in corpus()[:3] + ["<think>zzz 9</think><action>look</action><|im_end|>"]:
        a = tok(text, return_offsets_mapping=True)
        b = back(text, return_offsets_mapping=True)
        assert a["input_ids"] == b["input_ids"] and a["offset_mapping"] == b["offset_mapping"]
        assert decode(back, b["input_ids"]) == decode(tok, a["input_ids"])
    assert (back.eos_token_id, back.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)


def test_vocab_size_cap_and_validation(tok):
    assert train_word_tokenizer(corpus()).get_vocab() == tok.get_vocab()  # deterministic
    small = train_word_tokenizer(corpus(), vocab_size=150)
    assert len(small) == 150
    assert small.unk_token_id not in ids_of(small, "go to the countertop 1")  # frequent words made it
    rare = train_word_tokenizer(corpus(), min_frequency=1000)  # only the fixed part
    assert rare.unk_token_id in ids_of(rare, "go to") and len(rare) < 150
    with pytest.raises(ValueError, match="vocab_size=10 is too small"):
        train_word_tokenizer(corpus(), vocab_size=10)


# -- tiny model -----------------------------------------------------------------------------------

def test_tiny_default_size_in_range(tok):
    from transformers import Qwen3ForCausalLM

    n = count_parameters(Qwen3ForCausalLM(tiny_qwen3_config(4096)))
    assert 1_000_000 <= n <= 3_000_000, n
    model = build_tiny_policy(tok)
    assert model.config.vocab_size == len(tok) and model.config.head_dim == 32
    assert (model.config.pad_token_id, model.config.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    with pytest.raises(ValueError, match="not divisible"):
        tiny_qwen3_config(100, hidden_size=130)


def test_tiny_init_deterministic(tok):
    kw = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    rng_before = torch.get_rng_state()
    a, b, c = (build_tiny_policy(tok, seed=s, **kw) for s in (3, 3, 4))
    assert torch.equal(torch.get_rng_state(), rng_before)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.embed_tokens.weight"], sc["model.embed_tokens.weight"])


# -- loading --------------------------------------------------------------------------------------

def test_load_policy_local_round_trip(tok, tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, tokenizer = load_policy(str(tmp_path))
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == "<pad>" and not model.training
    ids = torch.tensor([ids_of(tok, RESPONSES[0])])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, tiny(ids).logits)
    model16, _ = load_policy(str(tmp_path), dtype="bfloat16")
    assert model16.dtype == torch.bfloat16


def test_load_policy_pad_falls_back_to_eos(tok, tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("pad_token")
    cfg_path.write_text(json.dumps(cfg))
    _, tokenizer = load_policy(str(tmp_path))
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"


def test_load_policy_missing_path_is_one_line(tmp_path):
    missing = str(tmp_path / "no" / "such" / "policy")
    with pytest.raises(PolicyError) as err:  # a user error: the entry points print it as one line
        load_policy(missing)
    assert missing in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="dtype='int8'"):
        load_policy(missing, dtype="int8")
    assert is_hub_id("Qwen/Qwen2.5-0.5B-Instruct") and is_hub_id("gpt2")
    assert not any(map(is_hub_id, ["./ckpt", "/abs/path", "a/b/c", "~/m", "a/../b", ""]))


# -- HF backend and log-probs ---------------------------------------------------------------------

def eos_bias(model, tok, value: float):
    """A forward hook adding `value` to the eos logit (the same in generate and in scoring)."""
    bias = torch.zeros(model.config.vocab_size)
    bias[tok.eos_token_id] = value
    return model.lm_head.register_forward_hook(lambda mod, inp, out: out + bias)


@pytest.fixture(scope="module")
def prompts(tok):
    texts = [render_prompt(GOAL, OBS[0], ADMISSIBLE, [], 0, compact=True), "look", OBS[1]]
    return [ids_of(tok, tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True))
            for t in texts]


def test_sampling_params_validate():
    for bad in (dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    with pytest.raises(ValueError, match="finish_reason"):
        Generation((1,), (0.0,), "eos")


def test_generate_deterministic_length_and_logprobs(tok, tiny, prompts):
    assert len({len(p) for p in prompts}) == 3
    backend = HFBackend(tiny, tok, batch_size=2)  # two micro-batches, left padding in the first
    params = SamplingParams(max_new_tokens=12, temperature=0.8, top_k=20, top_p=0.95)
    hook = eos_bias(tiny, tok, -1e4)  # never stop: every row runs to max_new_tokens
    try:
        tiny.train()
        gens = backend.generate(prompts, params, seed=7)
        assert tiny.training  # mode restored
        tiny.eval()
        assert gens == backend.generate(prompts, params, seed=7)
        assert gens != backend.generate(prompts, params, seed=8)
        # the trainer can backpropagate through the module the backend just generated with
        ids = torch.tensor([prompts[0] + list(gens[0].token_ids)])
        sequence_logprobs(tiny, ids, torch.ones_like(ids)).sum().backward()
        assert tiny.model.embed_tokens.weight.grad is not None
        tiny.zero_grad(set_to_none=True)
        assert all(g.finish_reason == "length" and len(g.token_ids) == len(g.logprobs) == 12 for g in gens)
        # on-policy agreement: the trainer's recomputation (one unpadded row) equals the rollout's
        for p, g in zip(prompts, gens):
            ids = torch.tensor([p + list(g.token_ids)])
            with torch.no_grad():
                lp = sequence_logprobs(tiny, ids, torch.ones_like(ids), temperature=0.8)[0, len(p):]
            assert torch.allclose(lp, torch.tensor(g.logprobs), atol=1e-4)
    finally:
        hook.remove()


def test_generate_stops_at_eos_and_drops_padding(tok, tiny, prompts):
    backend = HFBackend(tiny, tok)
    hook = eos_bias(tiny, tok, 1e4)
    try:
        gens = backend.generate(prompts, SamplingParams(max_new_tokens=8, temperature=0.0))
        assert all(g.token_ids == (tok.eos_token_id,) and g.finish_reason == "stop" for g in gens)
    finally:
        hook.remove()
    hook = eos_bias(tiny, tok, 4.0)  # eos likely but not certain: rows stop at different steps
    try:
        many = prompts * 4
        gens = backend.generate(many, SamplingParams(max_new_tokens=10), seed=0)
        for g in gens:
            assert tok.eos_token_id not in g.token_ids[:-1] and tok.pad_token_id not in g.token_ids
            assert (g.finish_reason == "stop") == (g.token_ids[-1] == tok.eos_token_id)
            assert g.finish_reason == "stop" or len(g.token_ids) == 10
        assert len({len(g.token_ids) for g in gens}) > 1 and any(g.finish_reason == "stop" for g in gens)
        # log-probs of a batch scored right-padded (the trainer's layout) still agree
        rows = [p + list(g.token_ids) for p, g in zip(many, gens)]
        width = max(map(len, rows))
        ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        with torch.no_grad():
            lp = sequence_logprobs(tiny, ids, mask)
        for row, (p, g) in enumerate(zip(many, gens)):
            assert torch.allclose(lp[row, len(p):len(p) + len(g.token_ids)], torch.tensor(g.logprobs), atol=1e-4)
        assert torch.all(lp[:, 0] == 0) and torch.all(lp[mask == 0] == 0)
        # the trainer's path: left-align, LM head on the response window only -> the same log-probs
        loss_mask = torch.tensor([[0] * len(p) + [1] * len(g.token_ids) + [0] * (width - len(p) - len(g.token_ids))
                                  for p, g in zip(many, gens)])
        left = left_align({"ids": ids, "mask": mask, "loss": loss_mask, "lp": lp}, mask)
        keep = tail_width(left["loss"])
        assert keep == max(len(g.token_ids) for g in gens)
        with torch.no_grad():
            tail, logits = tail_logprobs(tiny, left["ids"], left["mask"], keep)
        assert logits.shape == (len(many), keep, tiny.config.vocab_size)
        on = left["loss"][:, -keep:] > 0
        assert torch.allclose(tail[on], left["lp"][:, -keep:][on], atol=1e-5)
    finally:
        hook.remove()


def test_left_align_moves_real_tokens_to_the_end():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    ids = torch.tensor([[5, 6, 7, 0, 0], [1, 2, 3, 4, 5], [9, 0, 0, 0, 0]])
    loss = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 0, 1, 1], [0, 0, 0, 0, 0]])
    out = left_align({"ids": ids, "mask": mask, "loss": loss}, mask)
    assert out["ids"].tolist() == [[0, 0, 5, 6, 7], [1, 2, 3, 4, 5], [0, 0, 0, 0, 9]]
    assert out["mask"].tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]]
    assert tail_width(out["loss"]) == 2 and tail_width(torch.zeros(2, 4)) == 1


def test_temperature_zero_is_greedy(tok, tiny, prompts):
    backend = HFBackend(tiny, tok)
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    gens = backend.generate(prompts, params, seed=1)
    assert gens == backend.generate(prompts, params, seed=2) == backend.generate(prompts, params)
    for p, g in zip(prompts, gens):
        ids = torch.tensor([p + list(g.token_ids)])
        with torch.no_grad():
            logits = tiny(ids).logits[0, len(p) - 1:-1]
            lp = sequence_logprobs(tiny, ids, torch.ones_like(ids))[0, len(p):]
        assert logits.argmax(-1).tolist() == list(g.token_ids)
        assert torch.allclose(lp, torch.tensor(g.logprobs), atol=1e-4)  # reported at T = 1


def test_sync_weights_and_generation_config_isolation(tok, tiny, prompts):
    other = build_tiny_policy(tok, seed=1, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64)
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    backend = HFBackend(tiny, tok)
    before = backend.generate(prompts, params)
    backend.sync_weights(other)
    assert backend.generate(prompts, params) == HFBackend(other, tok).generate(prompts, params)
    # a checkpoint's sampling defaults (e.g. repetition_penalty) must not reach the backend
    other.generation_config.repetition_penalty = 5.0
    other.generation_config.top_k = 1
    backend.sync_weights(tiny)
    tiny_cfg = tiny.generation_config
    tiny.generation_config = other.generation_config
    try:
        assert backend.generate(prompts, params) == before
        assert tiny.generation_config is other.generation_config  # restored after the call
    finally:
        tiny.generation_config = tiny_cfg
