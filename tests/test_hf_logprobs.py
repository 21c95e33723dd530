"""HF backend log-probs without per-step full-vocabulary logits (issue 19, item 3).

The backend reads each sampled token's log-prob from a logits processor instead of generate's
`output_logits`. These tests check (1) that the values equal the old `output_logits` computation,
token for token, for sampling at T = 1, at T = 0.7 with top-k / top-p, and greedy, with prompts of
different lengths and rows stopping early at eos; (2) that the generate call neither asks for nor
returns per-step logits/scores, that the processor runs first (on raw logits), and that the call's
peak memory does not grow with steps x vocabulary on a shrunken Qwen3 with the real 151,936 vocabulary.
"""
from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

from stepopsd.policy.backends import HFBackend, SamplingParams
from stepopsd.policy.backends.hf import SampledTokenLogprobs
from stepopsd.policy.logprobs import sequence_logprobs

from helpers.tiny_policy import ids_of, tiny, tok  # noqa: F401  (tiny, tok: fixtures; tests/ is on sys.path via conftest)

PARAMS = {
    "t1": SamplingParams(max_new_tokens=10, temperature=1.0),
    "t07_topk_topp": SamplingParams(max_new_tokens=10, temperature=0.7, top_k=5, top_p=0.8),
    "greedy": SamplingParams(max_new_tokens=10, temperature=0.0),
}


@pytest.fixture(scope="module")
def prompts(tok):
    texts = ["look", "go to countertop 1", "take mug 1 from countertop 1 and clean it", "you are in the middle of a room"]
    return [ids_of(tok, tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True))
            for t in texts]


def peaked_with_stop(model, tok, trigger: int | None):
    """Hooks on the logits, functions of the input token at each position (so the same in generate and in
    scoring): logits x 8 plus a fixed random [vocab, vocab] table row (a random tiny model is near-uniform and
    repeats one token greedily; this gives peaked, varied next-token distributions, so that top-k / top-p
    matter), and after the token `trigger` the eos logit + 50, so that a row stops right after it.
    Returns the handles."""
    vocab = model.config.vocab_size
    table = 3.0 * torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0))
    seen = {}

    def keep_ids(module, args, kwargs):
        seen["ids"] = kwargs["input_ids"]

    def reshape(module, inp, out):
        ids = seen["ids"][:, -out.shape[1]:]  # generate's prefill may keep only the last position's logits
        out = out * 8.0 + table[ids]
        if trigger is not None:
            out[..., tok.eos_token_id] += 50.0 * (ids == trigger)
        return out

    return [model.register_forward_pre_hook(keep_ids, with_kwargs=True), model.lm_head.register_forward_hook(reshape)]


def pick_trigger(gens, params: SamplingParams, banned: set[int]) -> int:
    """A generated token whose first occurrences fall at the most different steps across rows (rows without it
    run to the limit), so that stopping after it ends rows at different steps."""
    def spread(v):
        firsts = {g.token_ids.index(v) if v in g.token_ids[:-1] else params.max_new_tokens for g in gens}
        return len(firsts) + (params.max_new_tokens in firsts)

    candidates = sorted({t for g in gens for t in g.token_ids} - banned)
    return max(candidates, key=lambda v: (spread(v), -v))


def old_way(model, backend: HFBackend, prompts, params: SamplingParams, seed: int):
    """The backend's former computation: generate with output_logits=True on one left-padded micro-batch
    (prompts sorted by length, the same seed, blank generation_config) and log_softmax(raw / T)[token]."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), backend.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, i in enumerate(order):
        ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
        mask[row, width - len(prompts[i]):] = 1
    sampling = {} if params.greedy else dict(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
    saved, model.generation_config = model.generation_config, GenerationConfig()
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=params.max_new_tokens,
                                 do_sample=not params.greedy, eos_token_id=backend.stop_ids, pad_token_id=backend.pad_id,
                                 use_cache=True, output_logits=True, return_dict_in_generate=True, **sampling)
    finally:
        model.generation_config = saved
    new = out.sequences[:, width:]
    lp = torch.stack([torch.log_softmax(step.float() / params.logprob_temperature, -1).gather(-1, new[:, t:t + 1]).squeeze(-1)
                      for t, step in enumerate(out.logits)], dim=1)
    result = [None] * len(prompts)
    for row, i in enumerate(order):
        hits = torch.isin(new[row], torch.tensor(backend.stop_ids)).nonzero()
        n = int(hits[0]) + 1 if len(hits) else new.shape[1]
        result[i] = (new[row, :n].tolist(), lp[row, :n])
    return result


@pytest.mark.parametrize("name", list(PARAMS))
def test_logprobs_equal_the_output_logits_computation(tok, tiny, prompts, name):
    params = PARAMS[name]
    many = prompts * 2  # 8 rows, 4 prompt lengths, one micro-batch
    assert len({len(p) for p in prompts}) == len(prompts)
    backend = HFBackend(tiny, tok, batch_size=len(many))
    hooks = peaked_with_stop(tiny, tok, None)
    try:
        trigger = pick_trigger(backend.generate(many, params, seed=3), params, {p[-1] for p in many} | {tok.eos_token_id})
    finally:
        for h in hooks:
            h.remove()
    hooks = peaked_with_stop(tiny, tok, trigger)
    try:
        gens = backend.generate(many, params, seed=3)
        reference = old_way(tiny, backend, many, params, seed=3)
        for g, (tokens, lp) in zip(gens, reference):
            assert list(g.token_ids) == tokens
            assert torch.allclose(torch.tensor(g.logprobs), lp, atol=1e-5, rtol=0)
        # rows stop at different steps, some at eos, some run to the limit
        assert len({len(g.token_ids) for g in gens}) > 1, [g.token_ids for g in gens]
        assert {g.finish_reason for g in gens} == {"stop", "length"}, [g.token_ids for g in gens]
        # the trainer's recomputation on the unfiltered temperature-T distribution agrees too
        for p, g in zip(many, gens):
            ids = torch.tensor([p + list(g.token_ids)])
            with torch.no_grad():
                lp = sequence_logprobs(tiny, ids, torch.ones_like(ids), temperature=params.logprob_temperature)[0, len(p):]
            assert torch.allclose(lp, torch.tensor(g.logprobs), atol=1e-4)
        if name == "t07_topk_topp":  # filtering is not folded in: kept tokens have p < 1 though top-k/top-p cut the rest
            assert any(lp < -0.1 for g in gens for lp in g.logprobs[:-1])
    finally:
        for h in hooks:
            h.remove()


def test_generate_keeps_no_per_step_logits_and_the_recorder_runs_first(tok, tiny, prompts, monkeypatch):
    calls, processors = [], []
    real_generate, real_get = tiny.generate, tiny._get_logits_processor

    def spy_generate(*args, **kwargs):
        out = real_generate(*args, **kwargs)
        calls.append((kwargs, out))
        return out

    def spy_get(*args, **kwargs):
        processors.append(real_get(*args, **kwargs))
        return processors[-1]

    monkeypatch.setattr(tiny, "generate", spy_generate)
    monkeypatch.setattr(tiny, "_get_logits_processor", spy_get)
    backend = HFBackend(tiny, tok, batch_size=2)
    for params in PARAMS.values():
        backend.generate(prompts, params, seed=0)
    assert len(calls) == len(processors) == 2 * len(PARAMS)
    for kwargs, out in calls:
        assert not kwargs.get("output_logits") and not kwargs.get("output_scores")
        assert not kwargs.get("return_dict_in_generate")  # so the result is the token ids alone
        assert isinstance(out, torch.Tensor) and out.dtype == torch.long
    for plist in processors:  # first, on the raw logits; the temperature / top-k / top-p warpers after it
        assert isinstance(plist[0], SampledTokenLogprobs)
        assert not any(isinstance(p, SampledTokenLogprobs) for p in plist[1:])
    assert [type(p).__name__ for p in processors[2]] == ["SampledTokenLogprobs", "TemperatureLogitsWarper",
                                                         "TopKLogitsWarper", "TopPLogitsWarper"]


def test_recorder_handles_undone_steps():
    """A generate that runs one extra step and then undoes it (transformers' deferred stop check) still reports
    the kept tokens' log-probs; a skipped step is an error."""
    torch.manual_seed(0)
    logits = torch.randn(4, 3, 11)  # [steps, rows, vocab]
    tokens = torch.randint(0, 11, (3, 4))
    expected = torch.log_softmax(logits / 0.5, -1).gather(-1, tokens.T[..., None]).squeeze(-1).T  # [rows, steps]
    prompt = torch.zeros(3, 2, dtype=torch.long)
    for extra in (0, 1):
        rec = SampledTokenLogprobs(2, 0.5)
        for t in range(3 + extra):
            ids = torch.cat([prompt, tokens[:, :t]], dim=1)
            scores = logits[t]
            assert rec(ids, scores) is scores  # the scores pass unchanged
        assert torch.equal(rec.finish(tokens[:, :3]), expected[:, :3])
    rec = SampledTokenLogprobs(2, 1.0)
    rec(prompt, logits[0])
    with pytest.raises(RuntimeError, match="step 2 follows step 0"):
        rec(torch.cat([prompt, tokens[:, :2]], dim=1), logits[2])


# -- memory: a shrunken Qwen3 with the real vocabulary ---------------------------------------------

QWEN_VOCAB = 151_936


def peak_cpu_bytes(fn) -> int:
    """Peak of the bytes allocated on the CPU allocator while `fn()` runs, above the level at its start
    (from the profiler's memory events, replayed in time order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    if not hasattr(prof.profiler, "kineto_results"):  # torch's raw event list; the spy test above still holds
        pytest.skip("this torch's profiler exposes no kineto_results to replay allocations from")
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.device_type() == torch.autograd.DeviceType.CPU
                     and e.name() == "[memory]"), key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def test_generate_peak_memory_does_not_grow_with_steps_times_vocab():
    config = Qwen3Config(vocab_size=QWEN_VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=256,
                         tie_word_embeddings=True, pad_token_id=0, eos_token_id=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(config).eval()

    class Tok:
        eos_token_id, pad_token_id = 1, 0

    def bias_off_eos(mod, inp, out):  # never stop early: every call runs all its steps
        out[..., 1] = -1e4
        return out

    hook = model.lm_head.register_forward_hook(bias_off_eos)
    backend = HFBackend(model, Tok(), batch_size=4)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    row_vocab = len(prompts) * QWEN_VOCAB * 4  # one float32 [rows, vocab]: 2.4 MB
    try:
        peaks = {}
        for steps in (4, 64):
            params = SamplingParams(max_new_tokens=steps, temperature=1.0)
            gens = []
            peaks[steps] = peak_cpu_bytes(lambda: gens.extend(backend.generate(prompts, params, seed=0)))
            assert all(len(g.token_ids) == steps for g in gens)
        # the old output_logits path would hold 64 x [rows, vocab] (155 MB) at the end; the control shows
        # that the measurement sees it
        def with_logits():
            ids = torch.tensor([[5, 6, 7]] * 4)
            with torch.no_grad():
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=True,
                               pad_token_id=0, eos_token_id=1, output_logits=True, return_dict_in_generate=True)
        control = peak_cpu_bytes(with_logits)
    finally:
        hook.remove()
    assert control > peaks[4] + 50 * row_vocab, (control, peaks)
    assert peaks[64] < peaks[4] + 4 * row_vocab, peaks
