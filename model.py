"""A GPT in one file: GPT-2 from Hugging Face checkpoints, KV-cache sampling, per-token log-probs.

    python -c "from model import GPT; m = GPT.from_pretrained('gpt2'); print(m.config)"

Contents: utilities (InputError, a progress line, an atomic resumable download), token_logps, the
safetensors format read and written by hand, GPTConfig and GPT (forward, from_pretrained,
save_pretrained, generate). Only the standard library and torch are imported.

Shape notation: B batch rows, T time, C channels (n_embd), V vocabulary, nh heads, hs head size.
"""
import ctypes
import dataclasses
import json
import math
import mmap
import os
import re
import shutil
import struct
import sys
import time
import urllib.error
import urllib.request

import torch
import torch.nn as nn
import torch.nn.functional as F


class InputError(ValueError):
    """Bad input from the user: the message is one line naming the file (and line) and what to do.

    Every command-line entry point catches it, prints `error: <message>` and exits with status 2."""


# ----------------------------------------------------------------------------------------------
# Small utilities shared by every script: a progress line with ETA, and an atomic, resumable download.

class Progress:
    """One self-overwriting progress line with rate and ETA: `label 120/500 24% | 3.1 it/s | eta 2m03s`."""

    def __init__(self, total, label="", unit="it", stream=None, every=0.5):
        self.total, self.label, self.unit = total, label, unit
        self.stream = stream or sys.stderr
        self.every, self.n, self.t0, self.last = every, 0, time.time(), 0.0

    def update(self, n=1, extra=""):
        self.n += n
        now = time.time()
        if now - self.last >= self.every or (self.total and self.n >= self.total):
            self.last = now
            self.stream.write("\r" + self.line(extra) + "\033[K")
            self.stream.flush()

    def line(self, extra=""):
        dt = max(time.time() - self.t0, 1e-9)
        rate = self.n / dt
        parts = [f"{self.label} {_human(self.n)}" + (f"/{_human(self.total)} {100 * self.n / self.total:.0f}%" if self.total else "")]
        parts.append(f"{_human(rate)} {self.unit}/s")
        if self.total and rate > 0:
            parts.append(f"eta {_duration((self.total - self.n) / rate)}")
        if extra:
            parts.append(extra)
        return " | ".join(parts)

    def close(self):
        self.stream.write("\r" + self.line() + f" | {_duration(time.time() - self.t0)}\033[K\n")
        self.stream.flush()


def _human(x):
    for unit in ("", "k", "M", "G"):
        if abs(x) < 1000:
            return f"{x:.0f}{unit}" if unit == "" or x >= 100 else f"{x:.1f}{unit}"
        x /= 1000
    return f"{x:.1f}T"


def _duration(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def keep_freed_memory():
    """Ask glibc to keep freed memory for reuse instead of handing it back to the kernel (Linux; elsewhere
    a no-op returning False). A training step allocates several (N*T, V) float32 tensors (~400 MB each
    for 16 x 128 tokens); glibc maps every block over 32 MB fresh from the kernel and unmaps it when freed,
    so each step page-faults and zeroes gigabytes. Measured on 2 CPU cores: 1.4 s of system time in a
    1.7 s step; with this call 0.1 s, and SFT runs 1.75x faster. A process-wide setting, so only entry
    points call it (sft.main, dpo.main, eval.main), never an import."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 2**31 - 1) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def cache_dir():
    """Where downloads go: $DPO_CACHE, else ~/.cache/dpo."""
    return os.environ.get("DPO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dpo")


def download(url, dest, what=None):
    """Fetch `url` to `dest` with a progress line. Resumable and atomic: bytes go to `dest + '.part'`
    (continued with an HTTP Range request after an interruption) and are renamed to `dest` only when
    complete, so `dest` is never half-written. Returns `dest`. Raises FileNotFoundError on HTTP 404 (and 401,
    which the Hugging Face hub answers for a repository that does not exist, or is private or gated) and
    InputError, naming the URL and where to put the file by hand, when the network is unreachable."""
    if os.path.exists(dest):
        return dest
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    part = dest + ".part"
    have = os.path.getsize(part) if os.path.exists(part) else 0
    req = urllib.request.Request(url, headers={"User-Agent": "dpo/0.1"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=30)
    except urllib.error.HTTPError as e:
        if e.code in (401, 404):  # one line, like InputError, for callers that pass it on
            raise FileNotFoundError(f"cannot download {url}: HTTP {e.code} {e.reason}; "
                                    f"check the address, or download it by hand to {dest}") from None
        if e.code == 416 and have:  # the .part file is already complete
            os.replace(part, dest)
            return dest
        raise InputError(f"cannot download {url}: HTTP {e.code} {e.reason}; "
                         f"download it by hand to {dest}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise InputError(f"cannot download {url} ({reason}); you seem to be offline: "
                         f"download it by hand to {dest}") from None
    with resp:
        if have and resp.status != 206:  # server ignored the Range request: start over
            have = 0
        total = resp.headers.get("Content-Length")
        total = int(total) + have if total is not None else None
        bar = Progress(total, label=f"download {what or os.path.basename(dest)}", unit="B")
        bar.n = have
        with open(part, "ab" if have else "wb") as f:
            while chunk := resp.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
        bar.close()
    if total is not None and os.path.getsize(part) != total:
        raise InputError(f"download of {url} stopped at {os.path.getsize(part)} of {total} bytes; "
                         f"run again to resume")
    os.replace(part, dest)
    return dest


# ----------------------------------------------------------------------------------------------
# Per-token log-probabilities: the one place logits become log pi(y_t | x, y_<t). Used by dpo.py
# (sequence log-probs) and eval.py (KL to the reference), so it lives at the bottom of the imports.

def token_logps(logits, labels):
    """log softmax(logits)[labels] in float32, without shifting.

    Args:
        logits: (N, T, V) any float dtype; row t is the distribution over labels[:, t].
        labels: (N, T) int64 token ids.
    Returns:
        (N, T) float32 (float64 for float64 logits). The log-softmax runs in float32 even for bf16/fp16 logits: in half
        precision the logsumexp over 50k entries loses the small probabilities and gives NaN/-inf.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float64 stays float64 (tests)
    return torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


# ----------------------------------------------------------------------------------------------
# The safetensors format, by hand: an 8-byte little-endian header length N, N bytes of JSON
# {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then raw
# little-endian tensor bytes (offsets are relative to the end of the header).

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def load_safetensors(path):
    """Returns {name: tensor} for a .safetensors file, without reading it into memory: every tensor is a
    view on a copy-on-write memory map, so pages are read only when copied into the model."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 2 <= n <= size - 8:
            raise InputError(f"{path}: not a safetensors file, or truncated (header length {n}, file "
                             f"{size} bytes); download it again")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{path}: corrupt safetensors header ({e}); download it again") from None
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + n else b""
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise InputError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        if 8 + n + end > size or end - begin != math.prod(info["shape"]) * dtype.itemsize:
            raise InputError(f"{path}: tensor {name} lies past the end of the file ({size} bytes): "
                             f"the file is truncated; download it again")
        if end == begin:
            tensors[name] = torch.empty(info["shape"], dtype=dtype)
            continue
        raw = torch.frombuffer(buf, dtype=torch.uint8, count=end - begin, offset=8 + n + begin)
        tensors[name] = raw.view(dtype).reshape(info["shape"])
    return tensors


def save_safetensors(tensors, path, metadata=None):
    """Writes {name: tensor} as a .safetensors file, atomically (temporary name, then rename)."""
    header, offset = {}, 0
    tensors = {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # pad so the data starts 8-byte aligned
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors.values():
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# The model. One class for every architecture: differences are config flags (GPT-2 today; rotary
# embeddings, parallel residual, untied heads and a bidirectional encoder are flags of the same class).

@dataclasses.dataclass
class GPTConfig:
    vocab_size: int = 50257
    block_size: int = 1024          # longest sequence (learned position table size)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_inner: int | None = None      # MLP width; None means 4 * n_embd
    dropout: float = 0.0            # DPO trains without dropout (the policy's log-probs must be deterministic)
    bias: bool = True
    layer_norm_eps: float = 1e-5
    activation: str = "gelu_new"    # GPT-2's tanh approximation of GELU ("gelu" for the exact one)
    pos_embedding: str = "learned"  # learned absolute positions (GPT-2); other schemes are future flags
    parallel_residual: bool = False  # x + attn(ln_1(x)) + mlp(ln_2(x)) (GPT-NeoX/GPT-J) instead of sequential
    tie_word_embeddings: bool = True  # output head shares the token embedding (GPT-2)
    causal: bool = True             # False gives a bidirectional encoder

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.pos_embedding != "learned":
            raise ValueError(f"pos_embedding {self.pos_embedding!r} is not supported yet (only 'learned')")
        if self.activation not in ("gelu_new", "gelu"):
            raise ValueError(f"activation {self.activation!r} is not supported ('gelu_new' or 'gelu')")

    @classmethod
    def named(cls, name, **overrides):
        """The four GPT-2 sizes: gpt2 (124M), gpt2-medium (355M), gpt2-large (774M), gpt2-xl (1558M)."""
        shapes = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024),
                  "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600)}
        if name not in shapes:
            raise ValueError(f"unknown config {name!r}; known: {', '.join(shapes)}")
        n_layer, n_head, n_embd = shapes[name]
        return cls(**{"n_layer": n_layer, "n_head": n_head, "n_embd": n_embd, **overrides})


class KVCache:
    """Keys and values of every layer for generation, preallocated to the final length."""

    def __init__(self, config, B, T_max, dtype, device):
        hs = config.n_embd // config.n_head
        shape = (config.n_layer, B, config.n_head, T_max, hs)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.pos = 0  # positions filled so far

    def update(self, layer, k, v):
        T = k.size(2)
        self.k[layer, :, :, self.pos:self.pos + T] = k
        self.v[layer, :, :, self.pos:self.pos + T] = v
        return self.k[layer, :, :, :self.pos + T], self.v[layer, :, :, :self.pos + T]  # (B, nh, pos+T, hs)


class Attention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.n_head, self.layer, self.dropout = config.n_head, layer, config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x, mask, cache=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nh, past+T, hs)
        is_causal = isinstance(mask, bool) and mask
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if isinstance(mask, bool) else mask,
                                           is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        inner = config.n_inner or 4 * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, inner, bias=config.bias)
        self.c_proj = nn.Linear(inner, config.n_embd, bias=config.bias)
        self.approximate = "tanh" if config.activation == "gelu_new" else "none"

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate))


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.parallel = config.parallel_residual
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = Attention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, mask, cache=None):
        if self.parallel:
            return x + self.drop(self.attn(self.ln_1(x), mask, cache)) + self.drop(self.mlp(self.ln_2(x)))
        x = x + self.drop(self.attn(self.ln_1(x), mask, cache))
        return x + self.drop(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding=False):
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding else n

    def forward(self, idx, attention_mask=None, position_ids=None, cache=None, return_hidden=False):
        """Logits (B, T, V) for every position of idx (B, T).

        attention_mask (B, past+T), 1 = real token, 0 = padding. Right padding (training batches) needs
        no mask at all: under the causal mask a real token never sees the padding after it, so the
        fast causal kernel is used. Left padding (generation) masks the padded keys; position ids then
        count real tokens only (padded rows give the same logits on their tokens as unpadded rows).
        return_hidden=True returns the final hidden states (B, T, C) instead, so a caller can apply
        `lm_head` to selected positions only.
        """
        B, T = idx.shape
        past = cache.pos if cache is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(f"sequence of {past + T} tokens exceeds block_size {self.config.block_size}")
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:past + T]  # (B, T)
            else:
                position_ids = torch.arange(past, past + T, device=idx.device).unsqueeze(0)  # (1, T)
        mask = self._attention_mask(attention_mask, T, past, idx.device)
        x = self.drop(self.wte(idx) + self.wpe(position_ids))  # (B, T, C)
        for block in self.h:
            x = block(x, mask, cache)
        if cache is not None:
            cache.pos += T
        x = self.ln_f(x)
        return x if return_hidden else self.lm_head(x)  # (B, T, V)

    def logps(self, idx, target_mask, attention_mask=None):
        """Per-token log-probabilities log pi(idx[:, t] | idx[:, <t]) at the positions where target_mask
        is True, 0 elsewhere: (N, T) float32. target_mask (N, T) is aligned with idx (position 0 has no
        prediction and is ignored). The output head and log-softmax run only on the selected positions,
        not on prompt and padding tokens: with 50k-token vocabularies the head is most of the work.
        Equal to token_logps(self(idx)[:, :-1], idx[:, 1:]) on the selected positions (tested)."""
        h = self(idx, attention_mask=attention_mask, return_hidden=True)  # (N, T, C)
        sel = target_mask[:, 1:].bool()  # (N, T-1): hidden state t predicts token t+1
        lp = token_logps(self.lm_head(h[:, :-1][sel]), idx[:, 1:][sel])  # (M,) M = selected tokens
        out = torch.zeros(idx.shape, dtype=torch.float32, device=idx.device)  # (N, T)
        return out.masked_scatter(F.pad(sel, (1, 0)), lp)

    def _attention_mask(self, attention_mask, T, past, device):
        """True (plain causal kernel), False (no mask: bidirectional) or a boolean (B, 1, T, past+T) mask."""
        causal = self.config.causal
        if attention_mask is None or (causal and past == 0 and bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())):
            if past == 0:
                return causal  # no padding, or right padding under a causal mask: nothing to mask beyond causality
            if causal and T == 1:
                return False  # one new token with a cache sees every past key
        q = torch.arange(past, past + T, device=device).view(T, 1)
        k = torch.arange(past + T, device=device).view(1, past + T)
        allowed = (k <= q) if self.config.causal else torch.ones(T, past + T, dtype=torch.bool, device=device)
        if attention_mask is not None:
            # every query keeps itself, so a padded query never has an all-masked row (NaN in softmax)
            allowed = allowed & (attention_mask[:, None, None, :].bool() | (k == q))
        return allowed.expand(attention_mask.size(0) if attention_mask is not None else 1, 1, T, past + T)

    # ------------------------------------------------------------------------------------------
    # Hugging Face checkpoints

    @classmethod
    def from_pretrained(cls, name_or_dir, dtype=torch.float32, device="cpu"):
        """Loads a GPT-2 checkpoint in the Hugging Face layout.

        name_or_dir: a local folder with config.json and model.safetensors (or a sharded
        model.safetensors.index.json, or pytorch_model.bin and its index), or a hub name such as
        'gpt2' or 'openai-community/gpt2-large', downloaded once into $DPO_CACHE/hub. The weights are
        read shard by shard from a memory map straight into `dtype` on `device`, so a checkpoint is
        never held in memory twice.
        """
        folder = resolve_checkpoint(name_or_dir)
        config = config_from_hf(os.path.join(folder, "config.json"))
        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device=device)
        if dtype != torch.float32:
            model._apply(lambda t: t.to(dtype) if t.is_floating_point() else t)  # still empty: no copy of weights
        if config.tie_word_embeddings:
            model.lm_head.weight = model.wte.weight  # to_empty/_apply allocate each name separately: tie again
        expected = dict(model.named_parameters())  # the tied lm_head.weight appears once, as wte.weight
        loaded = set()
        for file in checkpoint_files(folder):
            for hf_name, tensor in read_tensors(file).items():
                name, transpose = hf_to_ours(hf_name, config, file)
                if name is None:
                    continue
                if transpose:
                    tensor = tensor.t()
                param = expected[name]
                if tuple(tensor.shape) != tuple(param.shape):
                    raise InputError(f"{file}: {hf_name} has shape {tuple(tensor.shape)} but the model built "
                                     f"from config.json expects {tuple(param.shape)}: the checkpoint and "
                                     f"config.json belong to different models")
                with torch.no_grad():
                    param.copy_(tensor)
                loaded.add(name)
        missing = [n for n in expected if n not in loaded]
        if missing:
            raise InputError(f"{folder}: checkpoint lacks {len(missing)} weights, e.g. {', '.join(missing[:3])}; "
                             f"the download is incomplete or the checkpoint is not a GPT-2 model")
        return model.eval()

    def save_pretrained(self, folder):
        """config.json + model.safetensors in the Hugging Face GPT-2 layout (GPT2LMHeadModel loads it).
        Atomic: written into a temporary folder that replaces `folder` at the end."""
        tmp, old = folder.rstrip("/") + ".tmp", folder.rstrip("/") + ".old"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        tensors = {}
        for name, p in self.named_parameters():
            hf_name, transpose = ours_to_hf(name)
            tensors[hf_name] = p.t() if transpose else p
        save_safetensors(tensors, os.path.join(tmp, "model.safetensors"))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config_to_hf(self.config, next(self.parameters()).dtype), f, indent=2)
        if os.path.exists(folder):
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------------------------------
    # Sampling

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=50256,
                 pad_id=50256, generator=None, use_cache=True):
        """Samples continuations of a batch of prompts of different lengths.

        prompts: list of B token-id lists (left-padded internally), or a (B, T) tensor without padding.
        temperature 0 means greedy. top_k keeps the k most likely tokens, top_p the smallest set whose
        probability reaches p. A row stops at its first eos_id (the EOS is kept) and is padded with
        pad_id afterwards; generation ends when every row has stopped. `generator` (a torch.Generator
        on the model's device) makes sampling reproducible. use_cache=False recomputes the whole
        sequence each step (slow; for testing the cache).
        Returns (tokens (B, n), mask (B, n)) with n <= max_new_tokens; mask is 1 on generated tokens.
        """
        device = self.wte.weight.device
        if torch.is_tensor(prompts):
            prompts = prompts.tolist()
        B, P = len(prompts), max(len(p) for p in prompts)
        if min(len(p) for p in prompts) == 0:
            raise ValueError("every prompt needs at least one token (start it with EOS for an empty prompt)")
        if P + max_new_tokens > self.config.block_size:
            raise ValueError(f"prompt of {P} tokens + {max_new_tokens} new tokens exceeds block_size {self.config.block_size}")
        idx = torch.zeros((B, P), dtype=torch.long, device=device)  # left padding (masked; any valid id)
        mask = torch.zeros(B, P + max_new_tokens, dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            idx[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, P - len(p):] = 1  # generated positions are filled in as we go
        mask[:, P:] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, P + max_new)
        cache = KVCache(self.config, B, P + max_new_tokens, self.wte.weight.dtype, device) if use_cache else None
        done = torch.zeros(B, dtype=torch.bool, device=device)
        out, out_mask, x, seq = [], [], idx, idx
        for t in range(max_new_tokens):
            n = P + t
            if use_cache:
                logits = self(x, attention_mask=mask[:, :n], position_ids=positions[:, n - x.size(1):n], cache=cache)
            else:
                logits = self(seq, attention_mask=mask[:, :n], position_ids=positions[:, :n])
            nxt = sample_next(logits[:, -1], temperature, top_k, top_p, generator)  # (B,)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            out.append(nxt)
            out_mask.append(~done)
            x = torch.where(done, 0, nxt).unsqueeze(1)  # finished rows feed a dummy (valid) id
            done = done | (nxt == eos_id)
            seq = torch.cat([seq, x], dim=1)
            if bool(done.all()):
                break
        return torch.stack(out, 1), torch.stack(out_mask, 1).long()


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token per row from logits (B, V). Inverse-CDF sampling (a uniform draw located in the
    cumulative distribution with searchsorted) gives the same distribution as torch.multinomial and is
    an order of magnitude faster over a 50k vocabulary on CPU."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # tokens after the nucleus already reached p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    cdf = logits.softmax(-1).cumsum(-1)  # (B, V)
    u = 1.0 - torch.rand(cdf.size(0), 1, generator=generator, device=cdf.device)  # (0, 1]
    return torch.searchsorted(cdf, u * cdf[:, -1:]).clamp(max=cdf.size(-1) - 1).squeeze(1)


# ----------------------------------------------------------------------------------------------
# Checkpoint files, config.json and the key table

HUB_URL = "https://huggingface.co/{name}/resolve/main/{file}"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def resolve_checkpoint(name_or_dir):
    """A local folder as is; otherwise a hub name, downloaded into $DPO_CACHE/hub/<name> once."""
    if os.path.isdir(name_or_dir):
        return name_or_dir
    if os.path.sep in name_or_dir.strip("/") and name_or_dir.count("/") != 1 or name_or_dir.startswith((".", "/", "~")):
        raise InputError(f"{name_or_dir}: no such folder; pass a folder with config.json and model.safetensors, "
                         f"or a hub name such as gpt2 or openai-community/gpt2-large")
    folder = os.path.join(cache_dir(), "hub", name_or_dir.replace("/", "--"))
    try:
        try:
            download(HUB_URL.format(name=name_or_dir, file="config.json"), os.path.join(folder, "config.json"), name_or_dir)
        except FileNotFoundError:
            raise InputError(f"{name_or_dir}: no such model on the Hugging Face hub (config.json not found; or "
                             f"the model is private or gated); "
                             f"check the name, e.g. gpt2, gpt2-large, openai-community/gpt2-xl") from None
        for weights in WEIGHT_FILES:
            try:
                path = download(HUB_URL.format(name=name_or_dir, file=weights), os.path.join(folder, weights), name_or_dir)
            except FileNotFoundError:
                continue
            if weights.endswith(".index.json"):
                for shard in sorted(set(_read_json(path)["weight_map"].values())):
                    download(HUB_URL.format(name=name_or_dir, file=shard), os.path.join(folder, shard), name_or_dir)
            return folder
    except InputError as e:
        if "offline" not in str(e):
            raise
        raise InputError(f"cannot download {name_or_dir} (offline?): put config.json and model.safetensors "
                         f"from https://huggingface.co/{name_or_dir} into {folder}, or pass a local folder") from None
    raise InputError(f"{name_or_dir}: the hub has none of {', '.join(WEIGHT_FILES)}")


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: cannot read JSON ({e}); download it again") from None


def checkpoint_files(folder):
    """The weight files of a checkpoint folder, in the order Hugging Face prefers them."""
    for weights in WEIGHT_FILES:
        path = os.path.join(folder, weights)
        if os.path.exists(path):
            if weights.endswith(".index.json"):
                return [os.path.join(folder, s) for s in sorted(set(_read_json(path)["weight_map"].values()))]
            return [path]
    raise InputError(f"{folder}: no model.safetensors or pytorch_model.bin (or their .index.json); "
                     f"copy the weights from the model's hub page into this folder")


def read_tensors(path):
    """{name: tensor} of one weight file (.safetensors by hand, .bin with torch.load weights_only)."""
    if not os.path.exists(path):
        raise InputError(f"{path}: shard listed in the index is missing; download it again")
    if path.endswith(".safetensors"):
        return load_safetensors(path)
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as e:
        raise InputError(f"{path}: cannot read PyTorch checkpoint ({str(e).splitlines()[0]}); download it again") from None


def config_from_hf(path):
    """GPTConfig from a Hugging Face config.json (model_type gpt2)."""
    hf = _read_json(path)
    if not isinstance(hf, dict):
        raise InputError(f"{path}: expected a JSON object of settings; copy config.json from the model's hub page")
    if hf.get("model_type") != "gpt2":
        raise InputError(f"{path}: model_type {hf.get('model_type')!r} is not supported; "
                         f"pass a GPT-2 checkpoint (model_type 'gpt2')")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
        raise InputError(f"{path}: scale_attn_by_inverse_layer_idx/reorder_and_upcast_attn are not supported")
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu", "gelu_pytorch_tanh"):
        raise InputError(f"{path}: activation_function {act!r} is not supported (gelu_new or gelu)")
    missing = [k for k in ("vocab_size", "n_layer", "n_head", "n_embd") if not isinstance(hf.get(k), int)]
    if missing:
        raise InputError(f"{path}: no integer {', '.join(missing)}; copy config.json from the model's hub page")
    return GPTConfig(vocab_size=hf["vocab_size"], block_size=hf.get("n_positions", 1024), n_layer=hf["n_layer"],
                     n_head=hf["n_head"], n_embd=hf["n_embd"], n_inner=hf.get("n_inner"),
                     layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5), activation="gelu" if act == "gelu" else "gelu_new",
                     tie_word_embeddings=hf.get("tie_word_embeddings", True))


def config_to_hf(config, dtype=torch.float32):
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": config.vocab_size,
            "n_positions": config.block_size, "n_ctx": config.block_size, "n_layer": config.n_layer,
            "n_head": config.n_head, "n_embd": config.n_embd, "n_inner": config.n_inner,
            "activation_function": config.activation, "layer_norm_epsilon": config.layer_norm_eps,
            "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
            "tie_word_embeddings": config.tie_word_embeddings, "bos_token_id": 50256, "eos_token_id": 50256,
            "torch_dtype": str(dtype).removeprefix("torch.")}


# HF GPT-2 name (with "transformer." stripped and the layer index as {}) -> (our name, transposed).
# GPT-2 stores its linear layers as Conv1D with weight (in, out): those are transposed into nn.Linear.
GPT2_KEYS = {
    "wte.weight": ("wte.weight", False),
    "wpe.weight": ("wpe.weight", False),
    "ln_f.weight": ("ln_f.weight", False),
    "ln_f.bias": ("ln_f.bias", False),
    "lm_head.weight": ("lm_head.weight", False),  # only in untied checkpoints
    **{f"h.{{}}.{ln}.{p}": (f"h.{{}}.{ln}.{p}", False) for ln in ("ln_1", "ln_2") for p in ("weight", "bias")},
    **{f"h.{{}}.{lin}.weight": (f"h.{{}}.{lin}.weight", True) for lin in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")},
    **{f"h.{{}}.{lin}.bias": (f"h.{{}}.{lin}.bias", False) for lin in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")},
}
GPT2_IGNORED = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)$")  # causal-mask buffers of old checkpoints


def hf_to_ours(hf_name, config, file="checkpoint"):
    """Maps one checkpoint key; returns (None, False) for keys we deliberately skip; raises on unknown ones."""
    name = hf_name.removeprefix("transformer.")
    if GPT2_IGNORED.match(name) or (name == "lm_head.weight" and config.tie_word_embeddings):
        return None, False  # a tied head is the token embedding; its copy in the file is not loaded
    m = re.match(r"h\.(\d+)\.(.*)$", name)
    pattern = f"h.{{}}.{m.group(2)}" if m else name
    if pattern not in GPT2_KEYS or (m and int(m.group(1)) >= config.n_layer):
        raise InputError(f"{file}: unknown key {hf_name!r} for a {config.n_layer}-layer GPT-2; "
                         f"the checkpoint is from another architecture or config.json does not match it")
    ours, transposed = GPT2_KEYS[pattern]
    return (ours.format(m.group(1)) if m else ours), transposed


def ours_to_hf(name):
    m = re.match(r"h\.(\d+)\.(.*)$", name)
    pattern = f"h.{{}}.{m.group(2)}" if m else name
    for hf, (ours, transposed) in GPT2_KEYS.items():
        if ours == pattern:
            return "transformer." + (hf.format(m.group(1)) if m else hf) if hf != "lm_head.weight" else hf, transposed
    raise KeyError(name)
