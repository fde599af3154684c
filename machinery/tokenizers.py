"""A model's tokenizer on tiktoken, for models whose ids are not GPT-2's: a Hugging Face tokenizer.json holding a
byte-level BPE (GPT-NeoX, Pythia) converted to a tiktoken encoding that returns the model's own ids, and RoBERTa's
ids (the paper's IMDb reward) computed from GPT-2 tokens. GPT-2 itself needs none of this: data.py's encode/decode.

    TIKTOKEN_CACHE_DIR=../shared/tiktoken python -c "from machinery.tokenizers import load_tokenizer; \\
    t = load_tokenizer('gpt2'); print(t, t.encode('Hello world'))"

    load_tokenizer        the tokenizer of a --model (GPT-2's, or its tokenizer.json converted), as dpo.py uses it
    tokenizer_from_json   the conversion; Tokenizer: encode/decode in the model's ids
    roberta_ids_from_gpt2 GPT-2 token lists -> RoBERTa input_ids and attention_mask

Tests: test_tokenizers.py compares encode/decode with the `tokenizers` library on the same tokenizer.json (trained
ones, and GPT-2's 50,000 merges under NeoX-like ids) and RoBERTa's ids with transformers' tokenizer; test_arch.py
trains on a Pythia-layout folder with its own tokenizer.json.
"""
import functools
import json
import os
import re
import unicodedata

import tiktoken
import torch

from data import EOS, InputError, get_encoding
from machinery.hub import HUB_URL, download, hub_folder

# ----------------------------------------------------------------------------------------------
# Other models' tokenizers, on tiktoken: any byte-level BPE tokenizer.json (GPT-NeoX/Pythia), and RoBERTa's ids
#
# A byte-level BPE splits text with a regex, turns each piece into bytes, and merges adjacent parts, the
# pair of lowest merge rank first. tiktoken does the same, except that it ranks a candidate pair by the rank
# of the merged TOKEN (the same thing when each token is made by one merge, as in a trained BPE; the tests
# check it on GPT-2's 50,000 merges). So its ranks must follow the MERGE ORDER of the file, and the file's
# ids need not (NeoX puts <|endoftext|> at 0 and <|padding|> at 1, before the bytes): a converted tokenizer
# keeps tiktoken in its own rank space (the 256 bytes, then merge i at 256 + i) and a table from ranks to ids.

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""  # GPT-2's split
GPT2_NAMES = re.compile(r"(openai-community/)?(distil)?gpt2(-medium|-large|-xl)?")  # hub names with GPT-2's BPE


@functools.lru_cache(maxsize=None)
def byte_alphabet():
    """The alphabet in which vocab.json, merges.txt and tokenizer.json spell byte-level tokens: one printable
    character per byte value, a list of 256. The 188 bytes that are printable Latin-1 characters ("!".."~",
    "¡".."¬", "®".."ÿ") stand for themselves; the other 68 take chr(256), chr(257), ... in byte order, so
    the space is "Ġ" (U+0120) and the newline "Ċ" (U+010A)."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    others = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(others)) for b in range(256)]


@functools.lru_cache(maxsize=None)
def _byte_of():
    return {c: b for b, c in enumerate(byte_alphabet())}


def token_bytes(token):
    """A token spelled in the byte-level alphabet -> its bytes: "Ġthe" -> b" the". KeyError if it is not."""
    byte_of = _byte_of()
    return bytes(byte_of[c] for c in token)


class Tokenizer:
    """encode(text) -> ids and decode(ids) -> str in one model's token ids; tiktoken does the BPE.

    GPT-2's (gpt2_tokenizer()) is tiktoken's "gpt2" as it is. A converted one (tokenizer_from_json) adds:
        to_id       list, tiktoken rank -> the file's id (ranks follow merge order, ids need not)
        id_bytes    {id: bytes} of every token, for decode
        added       {text: id} of the added tokens, matched in the text before BPE, longest first (NeoX adds
                    runs of spaces this way); special ones (<|endoftext|>) only with allow_special. The
                    constructor takes them as [(text, id, special, normalized)]
        normalizer  None or a unicodedata form ("NFC" for NeoX), applied to the text between added tokens
        add_prefix_space  a space is put before each text piece that does not start with one
    Fields: name, eos_id (None if the tokenizer has none), vocab_size (largest id + 1), encoding (tiktoken)."""

    def __init__(self, encoding, name, eos_id, vocab_size, to_id=None, id_bytes=None, added=(), normalizer=None,
                 add_prefix_space=False):
        self.encoding, self.name, self.eos_id, self.vocab_size = encoding, name, eos_id, vocab_size
        self.to_id, self.id_bytes, self.normalizer, self.add_prefix_space = to_id, id_bytes, normalizer, add_prefix_space
        self.added = {text: id_ for text, id_, _, _ in added}

        def splitter(normalized, allow_special):
            texts = sorted((t for t, _, special, norm in added if norm == normalized and (allow_special or not special)),
                           key=len, reverse=True)  # longest first: the leftmost match is the longest one
            return re.compile("(" + "|".join(map(re.escape, texts)) + ")") if texts else None
        self._split = {(n, a): splitter(n, a) for n in (False, True) for a in (False, True)}

    def __repr__(self):
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"

    def encode(self, text, allow_special=False):
        """str -> list[int]. Special tokens are read from the text only with allow_special=True; otherwise a
        literal "<|endoftext|>" is encoded as ordinary characters (as data.encode does)."""
        if self.to_id is None:
            return self.encoding.encode(text, allowed_special="all" if allow_special else set(), disallowed_special=())
        ids = []
        for i, raw in enumerate(self._cut(text, self._split[False, allow_special])):  # (1) added tokens, raw text
            if i % 2:
                ids.append(self.added[raw])
                continue
            normal = unicodedata.normalize(self.normalizer, raw) if self.normalizer else raw  # (2) normalise
            for j, piece in enumerate(self._cut(normal, self._split[True, allow_special])):  # (3) added, normalised
                if j % 2:
                    ids.append(self.added[piece])
                elif piece:
                    if self.add_prefix_space and not piece.startswith(" "):
                        piece = " " + piece
                    ids += [self.to_id[r] for r in self.encoding.encode_ordinary(piece)]  # (4) BPE, ranks -> ids
        return ids

    @staticmethod
    def _cut(text, pattern):
        """[text, added token, text, added token, ..., text]: the added tokens sit at the odd positions."""
        return pattern.split(text) if pattern else [text]

    def decode(self, ids):
        """list[int] (or a 1-D tensor) -> str; bytes that are not UTF-8 become U+FFFD. Ids with no token are skipped."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if self.id_bytes is None:
            return self.encoding.decode(ids)
        return b"".join(self.id_bytes.get(i, b"") for i in ids).decode("utf-8", errors="replace")


@functools.lru_cache(maxsize=None)
def gpt2_tokenizer():
    """GPT-2's BPE (tiktoken "gpt2"), eos 50256, as a Tokenizer: the same ids as encode() and decode() above."""
    return Tokenizer(get_encoding(), "gpt2", eos_id=EOS, vocab_size=EOS + 1)


def tokenizer_from_json(path, eos_id=None, name=None):
    """A Tokenizer from a Hugging Face tokenizer.json holding a byte-level BPE: model.type "BPE" with "vocab"
    and "merges" ("a b" strings or [a, b] lists), a ByteLevel pre-tokenizer (GPT-2's regex) and decoder, an
    optional unicode normalizer, and "added_tokens". encode() equals the `tokenizers` library's
    encode(text, add_special_tokens=False) (no post-processing: no BOS is added). eos_id: the end-of-text
    id (default: the added token <|endoftext|>, </s> or <eos>, whichever comes first)."""
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
        bpe, pre = spec["model"], spec.get("pre_tokenizer") or {}
        normalizer = (spec.get("normalizer") or {}).get("type")
        decoder = (spec.get("decoder") or {}).get("type")
        checks = [(bpe.get("type") == "BPE", f"model type {bpe.get('type')!r}"),
                  (pre.get("type") == "ByteLevel" and pre.get("use_regex", True), f"pre-tokenizer {pre.get('type')!r}"
                   f"{' without use_regex' if pre.get('type') == 'ByteLevel' else ''}"),
                  (decoder == "ByteLevel", f"decoder {decoder!r}"),
                  (normalizer in (None, "NFC", "NFD", "NFKC", "NFKD"), f"normalizer {normalizer!r}"),
                  (not any(bpe.get(k) for k in ("dropout", "continuing_subword_prefix", "end_of_word_suffix",
                                                "byte_fallback")), "BPE dropout, subword affixes or byte fallback")]
        problem = next((what for ok, what in checks if not ok), None)
        if problem:
            raise InputError(f"{path}: {problem} is not supported; only byte-level BPE tokenizers (GPT-2, GPT-NeoX, "
                             f"Pythia) convert")
        vocab = {}  # bytes -> the file's id, for the tokens spelled in the byte-level alphabet
        for text, id_ in bpe["vocab"].items():
            try:
                vocab[token_bytes(text)] = id_
            except KeyError:
                pass  # not a byte-level token (say a raw "<|endoftext|>" entry; added tokens are handled below)
        missing = [b for b in range(256) if bytes([b]) not in vocab]
        if missing:
            raise InputError(f"{path}: the vocabulary lacks {len(missing)} of the 256 single bytes (byte {missing[0]} "
                             f"first); a byte-level BPE needs them all")
        ranks = {bytes([b]): b for b in range(256)}  # tiktoken's ranks: the bytes, then merge i at 256 + i
        for merge in bpe["merges"]:
            a, b = merge.split(" ") if isinstance(merge, str) else merge
            merged = token_bytes(a) + token_bytes(b)
            if merged not in vocab:
                raise InputError(f"{path}: the merge {a!r} + {b!r} makes a token that is not in the vocabulary")
            ranks.setdefault(merged, len(ranks))
        added = [(t["content"], t["id"], bool(t.get("special")), bool(t.get("normalized")))
                 for t in spec.get("added_tokens", [])]
    except InputError:
        raise
    except (OSError, KeyError, TypeError, ValueError) as e:  # ValueError: bad JSON or UTF-8, a merge not "a b"
        raise InputError(f"{path}: not a readable tokenizer.json ({type(e).__name__}: {e}); "
                         f"copy tokenizer.json from the model's hub page") from None
    special = {text: len(ranks) + k for k, (text, *_) in enumerate(added)}  # tiktoken ranks of the added tokens
    to_id = [vocab[t] for t in ranks] + [id_ for _, id_, _, _ in added]  # rank -> the file's id
    id_bytes = {id_: t for t, id_ in vocab.items()}
    id_bytes.update({id_: text.encode("utf-8") for text, id_, _, _ in added})
    if eos_id is None:
        specials = {text: id_ for text, id_, is_special, _ in added if is_special}
        eos_id = next((specials[t] for t in ("<|endoftext|>", "</s>", "<eos>") if t in specials), None)
    name = name or os.path.basename(os.path.dirname(os.path.abspath(path)))
    encoding = tiktoken.Encoding(f"{name} (converted)", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                 special_tokens=special)
    return Tokenizer(encoding, name, eos_id, vocab_size=max(id_bytes) + 1, to_id=to_id, id_bytes=id_bytes, added=added,
                     normalizer=normalizer, add_prefix_space=bool(pre.get("add_prefix_space")))


def hub_file(name_or_dir, filename):
    """The path of `filename` in a model folder, or in a hub model's download folder (resolve_checkpoint's:
    machinery.hub.hub_folder), fetched once. FileNotFoundError if the folder or the hub has no such
    file; InputError, saying where to put it, when offline."""
    if os.path.isdir(name_or_dir):
        path = os.path.join(name_or_dir, filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file")
        return path
    path = os.path.join(hub_folder(name_or_dir), filename)
    return download(HUB_URL.format(name=name_or_dir, file=filename), path, name_or_dir)


def load_tokenizer(name_or_dir=None):
    """The tokenizer of a model (a folder or hub name, as --model takes): GPT-2's for None, for a random:/scratch
    model, for a GPT-2 hub name, for a folder without tokenizer.json (our checkpoints) and for a tokenizer.json
    that is GPT-2's own; otherwise tokenizer.json converted by tokenizer_from_json (eos from config.json's
    eos_token_id when the folder has one)."""
    if name_or_dir is None or name_or_dir.startswith(("random:", "scratch")) or GPT2_NAMES.fullmatch(name_or_dir):
        return gpt2_tokenizer()
    try:
        path = hub_file(name_or_dir, "tokenizer.json")
    except FileNotFoundError:
        return gpt2_tokenizer()
    try:
        with open(os.path.join(os.path.dirname(path), "config.json")) as f:
            eos_id = json.load(f).get("eos_token_id")
    except (OSError, ValueError, AttributeError):  # no config.json, or not a JSON object
        eos_id = None
    eos_id = eos_id if isinstance(eos_id, int) else None
    tok = tokenizer_from_json(path, eos_id=eos_id, name=name_or_dir)
    return gpt2_tokenizer() if _is_gpt2(tok) else tok


def _is_gpt2(tok):
    """True when a converted tokenizer has GPT-2's ids, bytes, merges order, eos and no normalizer/prefix space."""
    gpt2 = get_encoding()
    return (tok.vocab_size == EOS + 1 and tok.eos_id == EOS and tok.normalizer is None and not tok.add_prefix_space
            and list(tok.added) == ["<|endoftext|>"]
            and all(tok.id_bytes.get(i) == gpt2.decode_single_token_bytes(i) for i in range(EOS))
            and tok.to_id[256:EOS] == list(range(256, EOS)))  # merge i makes id 256 + i


# RoBERTa (the paper's IMDb reward, siebert/sentiment-roberta-large-english) uses GPT-2's BPE exactly, with its own
# ids (fairseq's, by frequency) listed in vocab.json and the framing <s> ... </s>.

@functools.lru_cache(maxsize=4)
def roberta_table(vocab_json_path):
    """(gpt2 id -> RoBERTa id as an int64 tensor (50257,), {"bos", "eos", "pad", "unk"} ids) from RoBERTa's vocab.json.
    GPT-2's EOS maps to -1 (dropped); a token missing from vocab.json maps to <unk>."""
    try:
        with open(vocab_json_path, encoding="utf-8") as f:
            vocab = json.load(f)
        special = {"bos": vocab["<s>"], "eos": vocab["</s>"], "pad": vocab["<pad>"], "unk": vocab["<unk>"]}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise InputError(f"{vocab_json_path}: not a RoBERTa vocab.json ({type(e).__name__}: {e}); "
                         f"copy vocab.json from the model's hub page") from None
    alphabet, gpt2 = byte_alphabet(), get_encoding()
    table = torch.tensor([vocab.get("".join(alphabet[b] for b in gpt2.decode_single_token_bytes(i)), special["unk"])
                          for i in range(EOS)] + [-1], dtype=torch.long)  # (50257,)
    return table, special


def roberta_ids_from_gpt2(token_lists, vocab_json_path, max_len=512):
    """GPT-2 token lists (ids 0..50256) -> RoBERTa inputs: each row <s> + its tokens (EOS dropped) + </s>,
    right-padded with <pad>; a longer row keeps its first max_len - 2 tokens and its </s>. Returns input_ids and
    attention_mask, (N, T) int64 each, T the longest framed row."""
    table, special = roberta_table(vocab_json_path)
    rows = []
    for ids in token_lists:
        mapped = table[torch.as_tensor(list(ids), dtype=torch.long)] if len(ids) else torch.zeros(0, dtype=torch.long)
        mapped = mapped[mapped >= 0][:max_len - 2]
        rows.append([special["bos"], *mapped.tolist(), special["eos"]])
    T = max((len(r) for r in rows), default=0)
    input_ids = torch.full((len(rows), T), special["pad"], dtype=torch.long)  # (N, T)
    attention_mask = torch.zeros(len(rows), T, dtype=torch.long)  # (N, T)
    for i, r in enumerate(rows):
        input_ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        attention_mask[i, :len(r)] = 1
    return input_ids, attention_mask
