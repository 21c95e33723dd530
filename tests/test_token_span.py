"""Step target spans on the sampled tokens (`stepopsd.spans.token_span`): the smallest token span that covers the
characters of the `<action>` block, exact on the word tokenizer and minimal under a byte-level BPE whose merges
straddle the block's edges; bad character spans raise.

Built in-process: the word tokenizer of `helpers.records` and a BPE trained here on the same literal text.
"""
from __future__ import annotations

import pytest

from stepopsd.envs.alfworld.prompts import action_span
from stepopsd.spans import decode, token_span

from helpers.alfworld_text import ADMISSIBLE
from helpers.records import corpus, ids_of, respond, tok  # noqa: F401  (tok: a fixture)


def _check_cover(tok, ids, start, end):
    """[ts, te) covers chars [start, end) of decode(ids) and is minimal; returns whether it straddles."""
    text = decode(tok, ids)
    ts, te = token_span(tok, ids, start, end)
    assert 0 <= ts < te <= len(ids)
    pre = lambda k: len(decode(tok, ids[:k]))  # noqa: E731
    lo, hi = pre(ts), pre(te)
    assert lo <= start and hi >= end  # every char of the block is inside the span
    assert decode(tok, ids[ts:te]) == text[lo:hi]
    assert text[start:end] in decode(tok, ids[ts:te])
    assert pre(ts + 1) > start  # dropping the first token would lose the block's first char
    assert pre(te - 1) < end  # dropping the last token would lose its last char
    return lo < start, hi > end


def test_token_span_word_tokenizer_is_exact(tok):
    for action in ADMISSIBLE:
        ids = ids_of(tok, respond(action)) + [tok.eos_token_id]  # a trailing eos decodes to nothing
        text = decode(tok, ids)
        start, end = action_span(text)
        ts, te = token_span(tok, ids, start, end)
        assert decode(tok, ids[ts:te]) == text[start:end] == f"<action>{action}</action>"
        assert _check_cover(tok, ids, start, end) == (False, False)
        assert te == len(ids) - 1  # the eos is not part of the target


@pytest.fixture(scope="module")
def bpe_tok():
    """A byte-level BPE without pre-split regex, so merges run across tag boundaries
    (`.</think><action>` and `</action> ok.` become single tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([respond(a) + " ok." for a in ADMISSIBLE] * 4 + corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False)


def test_token_span_byte_level_bpe_straddling_merges(bpe_tok):
    front = back = 0
    for action in ADMISSIBLE:
        for text in (respond(action), respond(action) + " ok.", "x " + respond(action) + "\n"):
            ids = ids_of(bpe_tok, text)
            assert decode(bpe_tok, ids) == text
            start, end = action_span(text)
            f, b = _check_cover(bpe_tok, ids, start, end)
            front, back = front + f, back + b
    # the test is only meaningful if merges really straddled both edges of the block somewhere
    assert front > 0 and back > 0


def test_token_span_bad_spans_raise(tok):
    ids = ids_of(tok, respond("look"))
    n = len(decode(tok, ids))
    for start, end in [(5, 5), (7, 3), (-1, 4), (n, n + 3), (n - 2, n + 1), (n + 5, n + 9)]:
        with pytest.raises(ValueError, match="span"):
            token_span(tok, ids, start, end)
    assert token_span(tok, ids, 0, n) == (0, len(ids))
