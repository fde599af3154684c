"""Data: GPT-2 tokens (tiktoken), DPO's tokenised preference pairs and padded batches, and the datasets: the IMDb
reviews and preference pairs (JSONL, Anthropic HH). Other models' tokenizers are in machinery/tokenizers.py.

    DPO_IMDB=../shared/data/aclImdb_v1.tar.gz TIKTOKEN_CACHE_DIR=../shared/tiktoken \\
    python -c "import data, os; r = data.read_imdb('test', os.environ['DPO_IMDB']); print(len(r), r[0]['rating'], data.encode(r[0]['text'])[:8])"

Readers return plain lists of dicts; user mistakes raise InputError, one line naming the file (and line) and
what to do. Nothing runs at import time.

Shape notation:
    B  pairs in a batch; chosen and rejected rows stack to 2B rows (chosen rows first)
    T  time: the longest prompt+response row in the batch (no fixed padding)
"""
import difflib
import functools
import gzip
import json
import os
import re
import sys
import tarfile
import zlib

import tiktoken
import torch

EOS = 50256  # <|endoftext|>: appended to every response, and the padding id


class InputError(ValueError):
    """Bad input from the user: the message is one line naming the file (and line) and what to do.

    Every command-line entry point catches it, prints `error: <message>` and exits with status 2."""

# ----------------------------------------------------------------------------------------------
# Tokens


@functools.lru_cache(maxsize=None)
def get_encoding():
    """tiktoken's GPT-2 BPE. Offline it needs $TIKTOKEN_CACHE_DIR pointing at a folder of its files."""
    try:
        return tiktoken.get_encoding("gpt2")
    except (OSError, ImportError, ValueError) as e:  # requests' errors are OSErrors
        raise InputError(f"cannot load the GPT-2 BPE files ({type(e).__name__}); set TIKTOKEN_CACHE_DIR "
                         f"to a folder holding them (this project ships one in shared/tiktoken)") from None


def encode(text):
    """str -> list[int]. Special tokens are never parsed from text: a literal "<|endoftext|>" in user data
    is encoded as ordinary characters, so only the code below ever emits EOS."""
    return get_encoding().encode(text, allowed_special=set(), disallowed_special=())


def decode(ids):
    """list[int] (or a 1-D tensor) -> str. EOS decodes to "<|endoftext|>"."""
    return get_encoding().decode(ids.tolist() if hasattr(ids, "tolist") else list(ids))


# ----------------------------------------------------------------------------------------------
# Tokenised pairs and padded batches (after eric-mitchell/direct-preference-optimization,
# preference_datasets.py: tokenize_batch_element and the collate function)

def tokenize_pair(prompt, chosen, rejected, max_length=512, max_prompt_length=256, truncation_mode="keep_end",
                  tokenizer=None):
    """Token ids of one preference pair: {"prompt_ids", "chosen_ids", "rejected_ids", "truncated"}.

    Prompt and responses are tokenised SEPARATELY, and EOS is appended to each response, so the
    prompt/response boundary is exact and prompt_ids == encode(prompt). This can differ from tokenising
    the concatenation, where the prompt's last token may merge with the response's first ("Hel" + "lo"
    is [Hel][lo], while "Hello" is one token); like the official code we choose the exact boundary.

    If prompt + the longer response exceeds max_length tokens: (1) the prompt is cut to max_prompt_length,
    keeping its end ("keep_end": the latest dialogue turns) or its start ("keep_start"); (2) if still too
    long, both responses keep their first max_length - len(prompt) tokens (and so lose their EOS). Each
    response keeps at least one token because max_prompt_length < max_length is required.

    tokenizer: for a model with another vocabulary, anything with encode(text) -> ids, eos_id and name (a
    machinery.tokenizers.Tokenizer, from load_tokenizer); its encode and eos_id replace GPT-2's.
    None: GPT-2 (encode, EOS)."""
    if max_prompt_length >= max_length:
        raise ValueError(f"max_prompt_length ({max_prompt_length}) must be below max_length ({max_length}) "
                         f"so that every response keeps at least one token")
    if truncation_mode not in ("keep_end", "keep_start"):
        raise ValueError(f"truncation_mode must be 'keep_end' or 'keep_start', not {truncation_mode!r}")
    enc, eos = (encode, EOS) if tokenizer is None else (tokenizer.encode, tokenizer.eos_id)
    if eos is None:
        raise ValueError(f"tokenizer {tokenizer.name} has no end-of-text token to end the responses with")
    prompt_ids = enc(prompt)
    chosen_ids, rejected_ids = enc(chosen) + [eos], enc(rejected) + [eos]
    n_prompt, n_response = len(prompt_ids), max(len(chosen_ids), len(rejected_ids))
    if n_prompt + n_response > max_length and n_prompt > max_prompt_length:  # (1)
        keep = max_prompt_length
        prompt_ids = prompt_ids[n_prompt - keep:] if truncation_mode == "keep_end" else prompt_ids[:keep]
    room = max_length - len(prompt_ids)  # (2)
    chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
    truncated = len(prompt_ids) < n_prompt or n_response > room
    return {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids, "truncated": truncated}


def collate_pairs(items, pad_id=EOS, distinct=False):
    """Stack B tokenised pairs into 2B right-padded rows: rows 0..B-1 are prompt+chosen, rows B..2B-1
    prompt+rejected (same pair order). `items` are tokenize_pair outputs, or any dicts with "prompt_ids",
    "chosen_ids", "rejected_ids" (e.g. sampled token ids). Every prompt must be non-empty, so that each
    response token has a previous position that predicts it.

    Returns a dict of tensors:
        input_ids      (2B, T) int64, pad_id after each row's end
        attention_mask (2B, T) int64, 1 on real tokens, 0 on padding
        loss_mask      (2B, T) bool, True exactly where input_ids holds a response token (EOS included).
                       It marks the tokens to score: logits[:, t-1] predicts input_ids[:, t], so use
                       loss_mask[:, 1:] with labels input_ids[:, 1:].
        prompt_lens    (2B,) int64
        response_lens  (2B,) int64
        target_index   (M,) int64, the scored positions as flat indices into (rows, T-1): where
                       loss_mask[:, 1:] is True, found here on the CPU (a boolean selection on a GPU
                       makes the host wait for the device)
        row_index      (2B,) int64, only with distinct=True: input_ids etc. then hold each distinct
                       (prompt, response) row once, N <= 2B rows, and row i of the pairs is row
                       row_index[i] of the batch. Pairs that share a response (the 6 pairs formed from 4
                       samples of one prompt) then cost 4 sequences, not 12.
    """
    if not items:
        raise ValueError("collate_pairs needs at least one pair")
    prompts = [it["prompt_ids"] for it in items] * 2
    responses = [it["chosen_ids"] for it in items] + [it["rejected_ids"] for it in items]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: the first response token would have nothing to be predicted from; "
                         "start the prompt with at least one token (e.g. EOS)")
    lens = {"prompt_lens": torch.tensor([len(p) for p in prompts], dtype=torch.long),  # (2B,)
            "response_lens": torch.tensor([len(r) for r in responses], dtype=torch.long)}  # (2B,)
    if distinct:
        seen = {}
        index = [seen.setdefault((tuple(p), tuple(r)), len(seen)) for p, r in zip(prompts, responses)]
        prompts, responses = [list(k[0]) for k in seen], [list(k[1]) for k in seen]
        lens["row_index"] = torch.tensor(index, dtype=torch.long)  # (2B,)
    T = max(len(p) + len(r) for p, r in zip(prompts, responses))
    input_ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)  # (2B, T)
    attention_mask = torch.zeros(len(prompts), T, dtype=torch.long)  # (2B, T)
    loss_mask = torch.zeros(len(prompts), T, dtype=torch.bool)  # (2B, T)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        n = len(p) + len(r)
        input_ids[i, :n] = torch.tensor(p + r, dtype=torch.long)
        attention_mask[i, :n] = 1
        loss_mask[i, len(p):n] = True
    target_index = loss_mask[:, 1:].reshape(-1).nonzero().squeeze(1)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask,
            "target_index": target_index, **lens}


def batches(items, batch_size, generator=None, shuffle=True, drop_last=False):
    """An iterator over lists of `batch_size` items: one epoch, each item once (the last list is shorter
    unless drop_last). Shuffling uses only the torch.Generator the caller passes, never the global RNG,
    so a seed fixes the order; the permutation is drawn when batches() is called."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    if shuffle and generator is None:
        raise ValueError("shuffle=True needs generator=torch.Generator().manual_seed(seed)")
    order = torch.randperm(len(items), generator=generator).tolist() if shuffle else list(range(len(items)))
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    return ([items[i] for i in order[start:start + batch_size]] for start in range(0, stop, batch_size))


def left_pad(seqs, pad_id=EOS):
    """Left-pad token lists for batched generation, so every row's last real token sits at column T-1.
    Returns ids (B, T) int64 and attention_mask (B, T) int64 (0 on padding)."""
    if not seqs:
        raise ValueError("left_pad needs at least one sequence")
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)  # (B, T)
    for i, s in enumerate(seqs):
        if s:
            ids[i, T - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask[i, T - len(s):] = 1
    return ids, mask


def epoch_order(items, generator):
    """A shuffled order of the pairs. Pairs with a "group" key (the pairs formed from the samples of one
    prompt) stay together, so that a micro-batch holding a whole group scores each sample once."""
    if "group" not in items[0]:
        return torch.randperm(len(items), generator=generator).tolist()
    groups = {}
    for i, it in enumerate(items):
        groups.setdefault(it["group"], []).append(i)
    keys = list(groups)
    return [i for g in torch.randperm(len(keys), generator=generator).tolist() for i in groups[keys[g]]]


# ----------------------------------------------------------------------------------------------
# IMDb: Large Movie Review Dataset v1.0 (Maas et al. 2011), 25k train + 25k test, balanced.

IMDB_URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
_REVIEW = re.compile(r"(?:^|/)(train|test)/(pos|neg)/(\d+)_(\d+)\.txt$")  # {split}/{label}/{id}_{rating}.txt
_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)


def read_imdb(split="train", path=None):
    """The labelled reviews of one split as dicts {"text", "label" (1 pos, 0 neg), "rating" (1-4, 7-10), "id"},
    sorted by label then id. "<br />" line breaks become "\\n"; `unsup/` and other files are ignored. `path`: the
    .tar.gz archive or the extracted folder (`aclImdb/` itself or its parent); machinery.hub.imdb_path finds it.

    The archive is streamed, never extracted; one pass parses both splits and the result is kept in memory
    for the process (keyed by path, size and mtime), so reading "train" then "test" costs one pass."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    if path is None:
        raise InputError("read_imdb needs the IMDb archive or folder: machinery.hub.imdb_path() finds it ($DPO_IMDB) "
                         "or downloads it")
    st = os.stat(path) if os.path.exists(path) else None
    rows = _parse_imdb(os.path.abspath(path), st and (st.st_size, st.st_mtime_ns))[split]
    if not rows:
        raise InputError(f"{path}: no {split} reviews found (expected aclImdb/{split}/{{pos,neg}}/{{id}}_{{rating}}"
                         f".txt); pass the archive from {IMDB_URL} or its extracted folder")
    return [dict(r) for r in rows]  # copies: callers may edit them without touching the cache


@functools.lru_cache(maxsize=2)
def _parse_imdb(path, stamp):
    """{"train": [...], "test": [...]} from an archive or folder. `stamp` only keys the cache."""
    out = {"train": [], "test": []}
    for name, raw in _imdb_files(path):
        split, label, id_, rating = _REVIEW.search(name).groups()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{path}: {name} is not UTF-8; replace the data with the original archive") from None
        out[split].append({"text": _BR.sub("\n", text), "label": int(label == "pos"),
                           "rating": int(rating), "id": int(id_)})
    for rows in out.values():
        rows.sort(key=lambda r: (r["label"], r["id"]))
    return out


def _imdb_files(path):
    """Yield (name, bytes) for every review file, from a .tar.gz (streamed) or an extracted folder."""
    if os.path.isdir(path):
        has_splits = any(os.path.isdir(os.path.join(path, split)) for split in ("train", "test"))
        root = path if has_splits else os.path.join(path, "aclImdb")  # aclImdb/ itself, or its parent
        for split in ("train", "test"):
            for label in ("pos", "neg"):
                folder = os.path.join(root, split, label)
                for entry in (os.scandir(folder) if os.path.isdir(folder) else ()):
                    name = f"{split}/{label}/{entry.name}"
                    if entry.is_file() and _REVIEW.search(name):
                        with open(entry.path, "rb") as f:
                            yield name, f.read()
    elif os.path.isfile(path):
        try:
            with open(path, "rb") as f:
                gz = f.read(2) == b"\x1f\x8b"
            # gzip.open, not tarfile's "r|gz": tarfile stops silently at a header cut short, and only gzip checks
            # the stream's end (length and CRC), so a truncated archive is an error, not fewer reviews
            with (gzip.open if gz else open)(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
                for member in tar:  # "|": one sequential pass over the stream
                    if member.isfile() and _REVIEW.search(member.name):
                        yield member.name, tar.extractfile(member).read()
                while raw.read(1 << 20):  # on to the end of the gzip stream, where it is checked
                    pass
        except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
            raise InputError(f"{path}: not a readable .tar.gz archive ({e}); it may be truncated or corrupt: delete "
                             f"it and download {IMDB_URL} again, or pass the extracted aclImdb/ folder") from None
    else:
        raise InputError(f"{path}: no such file or folder; pass the IMDb archive ({IMDB_URL}) "
                         f"or its extracted aclImdb/ folder, or set DPO_IMDB")


# ----------------------------------------------------------------------------------------------
# Preference pairs: every reader returns [{"prompt": str, "chosen": str, "rejected": str}, ...]

def read_jsonl_pairs(path):
    """Pairs from a JSON-lines file (gzip-compressed or not): one object per line with non-empty string
    values for "prompt", "chosen" and "rejected" (the prompt must be non-empty too: the first response
    token is predicted from the prompt's last one). Extra keys are ignored, blank lines skipped."""
    keys = ("prompt", "chosen", "rejected")
    pairs = [dict(zip(keys, _fields(path, lineno, obj, keys))) for lineno, obj in _jsonl(path)]
    return _checked(path, pairs)


HH_URL = "https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main/{subset}/{split}.jsonl.gz"
HH_SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
_ASSISTANT = "\n\nAssistant:"


def split_hh(chosen, rejected):
    """Split two Anthropic HH transcripts into (prompt, chosen_response, rejected_response).

    The prompt is the longest shared start of both transcripts that ends with "\\n\\nAssistant:", i.e. it runs
    through the last "\\n\\nAssistant:" before they differ. The responses are the rest, leading space kept
    (" Sure, ..."), so prompt + chosen_response == chosen exactly. (The official code takes the last
    "\\n\\nAssistant:" of `chosen` alone, which breaks when the transcripts differ in an earlier turn.)
    Raises ValueError if the shared start has no "\\n\\nAssistant:"."""
    shared = os.path.commonprefix([chosen, rejected])  # a string function, despite the module
    i = shared.rfind(_ASSISTANT)
    if i < 0:
        raise ValueError('no "\\n\\nAssistant:" in the start shared by chosen and rejected')
    k = i + len(_ASSISTANT)
    return chosen[:k], chosen[k:], rejected[k:]


def read_hh(path):
    """Pairs from Anthropic's HH-RLHF: `path` is a .jsonl(.gz) file with "chosen" and "rejected" transcripts (a
    name such as "harmless-base/test" becomes that file with machinery.hub.hh_path, which downloads it)."""
    pairs = []
    for lineno, obj in _jsonl(path):
        chosen, rejected = _fields(path, lineno, obj, ("chosen", "rejected"))
        try:
            prompt, chosen, rejected = split_hh(chosen, rejected)
        except ValueError as e:
            raise InputError(f"{path}:{lineno}: {e}; each transcript must hold a dialogue "
                             f"'\\n\\nHuman: ...\\n\\nAssistant: ...'") from None
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return _checked(path, pairs)


def _json_type(x):
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(x), "a number")


def _jsonl(path):
    """Yield (lineno, dict) for each non-blank line of a JSON-lines file, gzip-compressed or not."""
    try:
        with open(path, "rb") as f:
            gz = f.read(2) == b"\x1f\x8b"
    except OSError as e:
        raise InputError(f"{path}: cannot open ({e.strerror}); check the path") from None
    try:
        with (gzip.open if gz else open)(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise InputError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start} of the line); "
                                     f"save the file as UTF-8") from None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}:{lineno}: invalid JSON ({e.msg}, column {e.colno}); "
                                     f"write one JSON object per line") from None
                if not isinstance(obj, dict):
                    raise InputError(f"{path}:{lineno}: expected a JSON object, got {_json_type(obj)}; "
                                     f"write one object per line") from None
                yield lineno, obj
    except (OSError, EOFError, zlib.error) as e:
        raise InputError(f"{path}: cannot read the gzip data ({e}); the file may be truncated: "
                         f"download or compress it again") from None


def _fields(path, lineno, obj, keys):
    """The values of `keys` in a JSON object, each checked to be a non-empty string."""
    values = []
    for key in keys:
        if key not in obj:
            near = difflib.get_close_matches(key, [str(k) for k in obj], n=1)
            hint = f'did you mean "{near[0]}"? rename it to "{key}"' if near else f"each line needs {', '.join(keys)}"
            raise InputError(f'{path}:{lineno}: missing key "{key}"; {hint}')
        if not isinstance(obj[key], str):
            raise InputError(f'{path}:{lineno}: "{key}" is {_json_type(obj[key])}, not a string; '
                             f"make every {'/'.join(keys)} value a string")
        if not obj[key]:
            raise InputError(f'{path}:{lineno}: "{key}" is empty; fill it in or remove the line')
        values.append(obj[key])
    return values


def _checked(path, pairs):
    if not pairs:
        raise InputError(f"{path}: no pairs found (the file is empty); check that it is the right file")
    same = sum(p["chosen"] == p["rejected"] for p in pairs)
    if same:
        print(f"warning: {path}: {same} pairs have identical chosen and rejected; they contribute no gradient",
              file=sys.stderr)
    return pairs
