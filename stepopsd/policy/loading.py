"""Load a causal LM policy and its tokenizer: a hub id or a local folder (e.g. a saved tiny policy).

Implements `load_policy`: `AutoModelForCausalLM` + `AutoTokenizer` with trust_remote_code=False,
the requested dtype and device, then the settings generation needs: left padding and a pad
token (the eos token when the tokenizer has none; the model's generation_config gets the same id).

Offline behaviour is the Hugging Face one: a local folder never touches the network; a hub id
goes through the hub cache and honours HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE (nothing is forced
here). Errors are one line naming what was asked for: a path that is not a folder and cannot be a
hub id ("./x", "/a/b", "a/b/c", "~/m"), or a hub id that cannot be resolved (offline and not
cached, unknown repo, missing files).

`random_policy` builds a hub architecture from its hyper-parameters (kept in conf/model/*.yaml) with
random weights and a locally trained tokenizer (`task_tokenizer`): the memory and speed of the paper
shapes, and the paper code path end to end, without any hub access. Its text is meaningless.

Simplification: the model is put in eval mode; the trainer switches it to train mode itself.
"""
from __future__ import annotations

import os
import re

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from stepopsd.errors import UserError

class PolicyError(UserError, OSError):
    """A model or tokenizer that cannot be used: missing, unloadable, or without what training needs."""


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# A hub id: `name` or `owner/name`, letters, digits, `-`, `_`, `.`; no leading `.`/`-`, no `--`/`..`.
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


def is_hub_id(name: str) -> bool:
    """Whether `name` has the form of a Hugging Face repo id (says nothing about existence)."""
    return bool(_HUB_ID.match(name)) and ".." not in name and "--" not in name and not name.endswith((".", "-"))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def check_tokenizer_files(folder: str) -> None:
    """A local folder must hold a tokenizer: without its files transformers builds an empty one silently."""
    if not any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES):
        raise PolicyError(f"{folder} holds no tokenizer ({', '.join(TOKENIZER_FILES)}): save it there with "
                          "tokenizer.save_pretrained, or point model.tokenizer at a tokenizer folder")


def load_policy(name_or_path: str, *, dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer) for `name_or_path`; model in eval mode on `device`, tokenizer left-padded."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
    local = os.path.isdir(os.path.expanduser(name_or_path))
    if local:
        source = os.path.expanduser(name_or_path)
        check_tokenizer_files(source)
    elif is_hub_id(name_or_path):
        source = name_or_path
    else:
        raise PolicyError(f"policy {name_or_path!r}: no such folder, and not a hub id of the form owner/name")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype], trust_remote_code=False)
    except (OSError, ValueError, KeyError) as err:
        where = "local folder" if local else "hub id"
        detail = " ".join(str(err).split())[:300]
        raise PolicyError(f"policy {name_or_path!r} ({where}) could not be loaded: {detail}") from None
    model.to(device).eval()

    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise PolicyError(f"policy {name_or_path!r}: the tokenizer has neither a pad nor an eos token: set eos_token "
                              "in its tokenizer_config.json (generation stops at it)")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_tokenizer(path: str):
    """A tokenizer folder (e.g. a saved tiny policy's), left-padded; one-line error when it is not one."""
    if os.path.isdir(os.path.expanduser(path)):
        check_tokenizer_files(os.path.expanduser(path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(path), trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise PolicyError(f"tokenizer {path!r} could not be loaded: {' '.join(str(err).split())[:200]}") from None
    tokenizer.padding_side = "left"
    return tokenizer


TASK_VOCAB = 4096  # at most this many ids in `task_tokenizer`'s vocabulary


def task_tokenizer(tasks, *, vocab_size: int = TASK_VOCAB):
    """The word-level tokenizer (`policy.tokenizer`) trained on the tasks' own text (ids, questions) plus its
    fixed alphabet and protocol tags: enough to encode any prompt, for models whose weights are random."""
    from stepopsd.policy.tokenizer import train_word_tokenizer

    texts = [t.task_id.replace("/", " ").replace("-", " ") for t in tasks] + [t.question for t in tasks if t.question]
    tokenizer = train_word_tokenizer(texts or ["go to"], vocab_size=vocab_size)
    tokenizer.padding_side = "left"
    return tokenizer


def random_policy(arch: dict, tokenizer, *, dtype: str = "float32", seed: int = 0):
    """A causal LM of architecture `arch` ({"model_type": "qwen3", "hidden_size": ..., ...}: the keys of
    the model's config.json) with random weights (the architecture's own init, seeded), its special-token
    ids taken from `tokenizer`; the vocabulary stays `arch["vocab_size"]` (the real shapes), so ids the
    tokenizer does not know are simply never produced by the prompts. Eval mode, on the CPU."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
    arch = dict(arch)
    model_type = arch.pop("model_type", None)
    if not model_type:
        raise ValueError("model.arch needs a model_type (qwen3, qwen2, ...)")
    if arch.get("vocab_size", 0) < len(tokenizer):
        raise ValueError(f"model.arch.vocab_size={arch.get('vocab_size')} is smaller than the tokenizer ({len(tokenizer)})")
    try:
        config = AutoConfig.for_model(model_type, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                      eos_token_id=tokenizer.eos_token_id, **arch)
    except (ValueError, TypeError) as err:
        raise ValueError(f"model.arch: {' '.join(str(err).split())[:200]}") from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model.eval()
