"""The policy: tokenizer and model construction or loading, log-probs, generation backends.

- `tokenizer.train_word_tokenizer`: a word-level tokenizer trained on environment text (tiny runs)
- `tiny.build_tiny_policy`: a small randomly initialised Qwen3 for CPU runs
- `loading.load_policy`: any causal LM from a hub id or a local folder
- `logprobs.sequence_logprobs`: per-token log-probs of whole rows (the reference definition);
  `logprobs.tail_logprobs` on left-aligned rows: the same for the response window only (trainer, teacher)
- `backends`: `GenerationBackend` (interface), `HFBackend` (transformers' generate), `VLLMBackend` (vLLM in process)
"""
