"""Load a causal LM policy and its tokenizer: a hub id or a local folder (e.g. a saved tiny policy).

Implements `load_policy`: `AutoModelForCausalLM` + `AutoTokenizer` with trust_remote_code=False,
the requested dtype and device, then the settings generation needs: left padding and a pad
token (the eos token when the tokenizer has none; the model's generation_config gets the same id).

Offline behaviour is the Hugging Face one: a local folder never touches the network; a hub id
goes through the hub cache and honours HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE (nothing is forced
here). Errors are one line naming what was asked for: a path that is not a folder and cannot be a
hub id ("./x", "/a/b", "a/b/c", "~/m"), or a hub id that cannot be resolved (offline and not
cached, unknown repo, missing files).

Simplification: the model is put in eval mode; the trainer switches it to train mode itself.
"""
from __future__ import annotations

import os
import re

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# A hub id: `name` or `owner/name`, letters, digits, `-`, `_`, `.`; no leading `.`/`-`, no `--`/`..`.
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


def is_hub_id(name: str) -> bool:
    """Whether `name` has the form of a Hugging Face repo id (says nothing about existence)."""
    return bool(_HUB_ID.match(name)) and ".." not in name and "--" not in name and not name.endswith((".", "-"))


def load_policy(name_or_path: str, *, dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer) for `name_or_path`; model in eval mode on `device`, tokenizer left-padded."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
    local = os.path.isdir(os.path.expanduser(name_or_path))
    if local:
        source = os.path.expanduser(name_or_path)
    elif is_hub_id(name_or_path):
        source = name_or_path
    else:
        raise FileNotFoundError(f"policy {name_or_path!r}: no such folder, and not a hub id of the form owner/name")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype], trust_remote_code=False)
    except (OSError, ValueError, KeyError) as err:
        where = "local folder" if local else "hub id"
        detail = " ".join(str(err).split())[:300]
        raise OSError(f"policy {name_or_path!r} ({where}) could not be loaded: {detail}") from None
    model.to(device).eval()

    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"policy {name_or_path!r}: the tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
