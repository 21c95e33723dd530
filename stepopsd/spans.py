"""Exact token alignment of a step's target span (spec §5: "tokenizer offsets, not re-tokenised
prefixes").

The response tokens are the ones the policy sampled; re-encoding the decoded text can give other
tokens (BPE merges across a tag, for instance), so spans are mapped onto the *sampled* ids. The
character offset of token k is the length of the decoded prefix `ids[:k]`, which grows
monotonically with k; a binary search finds the first and last token that overlap the character
span, so a span costs O(log n) decodes, not n. A token that straddles the span's edge belongs to it.
"""
from __future__ import annotations

from typing import Sequence

DECODE = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}


def decode(tokenizer, ids: Sequence[int]) -> str:
    """The decoding every span computation and the rollout share."""
    return tokenizer.decode(list(ids), **DECODE)


def token_span(tokenizer, ids: Sequence[int], start: int, end: int) -> tuple[int, int]:
    """Token range [ts, te) of the sampled `ids` covering characters [start, end) of decode(ids)."""
    if not 0 <= start < end:
        raise ValueError(f"empty or negative character span [{start}, {end})")

    def prefix_len(k: int) -> int:
        return len(decode(tokenizer, ids[:k]))

    total = prefix_len(len(ids))
    if end > total:  # past the text: the searches below would return an out-of-range or clipped span
        raise ValueError(f"character span [{start}, {end}) runs past the decoded text ({total} chars)")

    # ts: the last k whose prefix ends at or before `start` (token ts is the first to reach into the span)
    lo, hi = 0, len(ids)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if prefix_len(mid) <= start:
            lo = mid
        else:
            hi = mid - 1
    ts = lo
    # te: the first k whose prefix reaches `end`
    lo, hi = ts + 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if prefix_len(mid) >= end:
            hi = mid
        else:
            lo = mid + 1
    return ts, lo
