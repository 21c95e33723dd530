"""A word-level tokenizer trained on environment text, for tiny offline policies.

Implements a `tokenizers` WordLevel model (trained with `WordLevelTrainer`) wrapped as a
`transformers` fast tokenizer, so that the rest of the framework treats it exactly like a hub
tokenizer: `save_pretrained` / `AutoTokenizer.from_pretrained`, a Qwen-style chat template,
`return_offsets_mapping=True`.

Pre-tokenisation (GPT-2's idea without the byte level): a piece is an optional single leading
space plus one letter run (` drawer`), one digit (` 1`, `2`) or one punctuation character
(`.`, ` |`); any other whitespace character is a piece of its own (`\\n`, a second space).
Because the leading space lives inside the word's token and the decoder concatenates pieces
(`decoders.Fuse`), `decode(encode(text)) == text.lower()` for every text whose words are in the
vocabulary, and every offset is the exact [start, end) of its piece in the original text.
Digits are single tokens, so every number is representable.

Simplifications (documented, deliberate):
  - Lower-case normalisation (`normalizers.Lowercase`): the environment text is lower-case apart
    from a few words ("You", sentence starts); decoding returns lower-case text. Offsets still
    point into the original, un-lowered text.
  - A word never seen in training (or cut by `vocab_size` / `min_frequency`) becomes `<unk>`,
    leading space included; `<unk>` is special, so `skip_special_tokens=True` drops it on decode.
  - Every learned word enters the vocabulary in both forms, bare and with a leading space
    (` mug` seen in training brings `mug`), so a known word encodes anywhere: after a tag
    (`<action>take`), at a line start, after another space.
  - A base alphabet (digits, ASCII punctuation, space / newline / tab, each with and without a
    leading space, and the chat role names) is always in the vocabulary, whatever the corpus.

Token ids: the special tokens first (`<pad>`=0, `<unk>`=1, `<|im_start|>`, `<|im_end|>`,
`<|endoftext|>`), then the protocol tags, the base alphabet, then the trained words by
decreasing frequency (ties in the trainer's order), each followed by its twin form, `vocab_size` in total at most.
Protocol tags (`<think>`, `</action>`, ...) are ordinary (non-special) added tokens: matched
before pre-tokenisation, so always atomic, and kept by `skip_special_tokens=True`.
"""
from __future__ import annotations

import re
import string
from typing import Iterable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, UNK, IM_START, IM_END, EOT = "<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"
SPECIAL_TOKENS = (PAD, UNK, IM_START, IM_END, EOT)
PROTOCOL_TAGS = tuple(
    t for name in ("think", "action", "search", "answer", "information", "hindsight", "peer_correct_trajectory")
    for t in (f"<{name}>", f"</{name}>")
)
ROLES = ("system", "user", "assistant", "tool")

# One piece: [space] letters | [space] one digit | [space] one punctuation char | one whitespace char.
PRETOKENIZE_PATTERN = r" ?\p{L}+| ?\p{N}| ?[^\s\p{L}\p{N}]|\s"

# Qwen-style ChatML: <|im_start|>{role}\n{content}<|im_end|>\n ... [<|im_start|>assistant\n]
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_TAG_RE = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS + PROTOCOL_TAGS), re.IGNORECASE)


def base_alphabet() -> list[str]:
    """Pieces that are always in the vocabulary: digits, ASCII punctuation and whitespace (each
    bare and with a leading space), and the chat role names that follow `<|im_start|>`."""
    singles = list(string.digits) + list(string.punctuation)
    return singles + [" " + c for c in singles] + [" ", "\n", "\t"] + list(ROLES)


def _backend(vocab: dict[str, int]) -> Tokenizer:
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return tok


def _training_view(text: str) -> str:
    # Added tokens are cut out before pre-tokenisation at encode time; the trainer does not do
    # that, so replace each tag with a newline, which likewise ends the word before it and
    # stops the next word from taking a leading space.
    return _TAG_RE.sub("\n", text)


def train_word_tokenizer(
    texts: Iterable[str], *, vocab_size: int = 4096, min_frequency: int = 1
) -> PreTrainedTokenizerFast:
    """Train the word-level tokenizer on `texts` (prompts and responses of the environment).

    `vocab_size` counts everything (special tokens, protocol tags, base alphabet, words) and must
    leave room for at least the fixed part; the most frequent words fill the rest.
    """
    fixed = list(dict.fromkeys(list(SPECIAL_TOKENS) + list(PROTOCOL_TAGS) + base_alphabet()))
    if vocab_size < len(fixed):
        raise ValueError(f"vocab_size={vocab_size} is too small: the fixed tokens alone take {len(fixed)}")
    if min_frequency < 1:
        raise ValueError(f"min_frequency={min_frequency} must be >= 1")

    counter = _backend({UNK: 0})
    trainer = trainers.WordLevelTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[], show_progress=False
    )
    counter.train_from_iterator((_training_view(t) for t in texts), trainer)
    learned = sorted(counter.get_vocab(with_added_tokens=False).items(), key=lambda kv: kv[1])

    words = list(fixed)
    known = set(words)
    for piece, _ in learned:
        core = piece[1:] if piece.startswith(" ") and not piece[1:].isspace() else piece
        # the seen form first, then its twin (bare <-> leading space), vocab_size permitting
        for word in (piece, core, " " + core) if not core.isspace() else (piece,):
            if len(words) < vocab_size and word not in known:
                words.append(word)
                known.add(word)
    tok = _backend({w: i for i, w in enumerate(words)})
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    # normalized=True: matched on the lower-cased text, so `<Think>` is the `<think>` token too.
    tok.add_tokens([AddedToken(t, special=False, normalized=True) for t in PROTOCOL_TAGS])
    return wrap(tok)


def wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """The `transformers` face of a trained backend: eos `<|im_end|>`, pad `<pad>`, unk `<unk>`,
    no bos, the ChatML template, and no tokenization-space clean-up on decode."""
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens=[IM_START, EOT],
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 20,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
