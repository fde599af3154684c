"""A GPT in one file: GPT-2, GPT-J, GPT-NeoX/Pythia and a RoBERTa classifier from Hugging Face checkpoints,
KV-cache sampling, per-token log-probs.

    python -c "from model import GPT; m = GPT.from_pretrained('gpt2'); print(m.config)"

Contents: utilities (InputError, a progress line, an atomic resumable download), token_logps, the
safetensors format read and written by hand, GPTConfig and GPT (forward, from_pretrained,
save_pretrained, generate, classify) and the per-architecture key tables. Only the standard library
and torch are imported.

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


def field(default, help):
    """A dataclass field with its command-line help: the configs of dpo.py, sft.py and eval.py are such dataclasses."""
    return dataclasses.field(default=default, metadata={"help": help})


def parse_args(cls, argv=None, description=None):
    """An instance of the dataclass `cls` from the command line (argv=None reads sys.argv): one flag per field,
    --some-name for some_name, its help from the field; booleans get --flag/--no-flag."""
    import argparse
    parser = argparse.ArgumentParser(description=description)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        else:
            typ = {int: int, float: float}.get(f.type, str)
            parser.add_argument(flag, type=typ, default=f.default, help=f"{f.metadata['help']} (default: {f.default})")
    return cls(**vars(parser.parse_args(argv)))


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


class HeadLogps(torch.autograd.Function):
    """log softmax(h @ W.T + b)[labels] for M rows, in row chunks, never holding more (M, V) logits than
    it needs: forward computes each chunk's logits, its logsumexp and the label's log-prob. Backward needs
    d logp / d z = onehot(label) - softmax(z) for every chunk. When all M softmax rows fit in `keep_bytes`
    (a small model or a short batch, e.g. 768 rows x 50k = 154 MB) forward keeps them and backward reuses them;
    otherwise (gpt2-large, long batches) forward keeps only h and the logsumexp and backward recomputes
    each chunk's logits: one matmul more, the (M, V) float32 block never alive at once. Either way the gradient
    is formed in place in that block. Equal to token_logps(F.linear(h, W, b), labels), gradients included
    (tested, both ways)."""

    @staticmethod
    def forward(ctx, h, weight, bias, labels, chunk, keep_bytes):
        # under autocast F.linear runs in the autocast dtype; backward repeats it in that dtype
        ctx.mm_dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
        out = torch.empty(len(h), dtype=torch.float32, device=h.device)  # (M,)
        lse = torch.empty(len(h), dtype=torch.float32, device=h.device)  # (M,)
        keep = len(h) * weight.size(0) * 4 <= keep_bytes
        probs = []
        for s in range(0, len(h), chunk):
            z = F.linear(h[s:s + chunk], weight, bias).float()  # (c, V)
            lse[s:s + chunk] = torch.logsumexp(z, dim=-1)
            out[s:s + chunk] = z.gather(1, labels[s:s + chunk, None]).squeeze(1) - lse[s:s + chunk]
            if keep:
                probs.append(z.sub_(lse[s:s + chunk, None]).exp_())  # softmax(z), in place
        ctx.save_for_backward(h, weight, bias, labels, lse)
        ctx.chunk, ctx.probs = chunk, probs
        return out

    @staticmethod
    def backward(ctx, grad):  # grad (M,): d loss / d logp
        h, weight, bias, labels, lse = ctx.saved_tensors
        probs, ctx.probs = ctx.probs, None
        dt = ctx.mm_dtype
        w = weight.to(dt)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if ctx.needs_input_grad[1] else None
        grad_b = torch.zeros(weight.size(0), dtype=torch.float32, device=h.device) if bias is not None and ctx.needs_input_grad[2] else None
        for k, s in enumerate(range(0, len(h), ctx.chunk)):
            hc, g = h[s:s + ctx.chunk].to(dt), grad[s:s + ctx.chunk].float()
            if probs:
                p = probs[k]  # softmax(z), kept by forward
                probs[k] = None  # (freed as soon as used)
            else:
                z = F.linear(hc, w, None if bias is None else bias.to(dt)).float()  # (c, V) recomputed
                p = z.sub_(lse[s:s + ctx.chunk, None]).exp_()  # softmax(z), in place
            p.mul_(-g[:, None])  # -g * softmax(z)
            p[torch.arange(len(g), device=g.device), labels[s:s + ctx.chunk]] += g  # + g * onehot(label)
            if grad_b is not None:
                grad_b += p.sum(0)
            p = p.to(dt)
            if grad_h is not None:
                grad_h[s:s + ctx.chunk] = (p @ w).to(h.dtype)  # (c, C)
            if grad_w is not None:  # accumulated in float32 over the chunks
                if dt == torch.float32:
                    grad_w.addmm_(p.t(), hc)
                else:
                    grad_w += p.t() @ hc
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None)


HEAD_KEEP_BYTES = 512 * 2**20  # HeadLogps keeps the softmax rows for backward up to this size, else recomputes
HEAD_CHUNK_BYTES = 256 * 2**20  # rows per HeadLogps chunk on a GPU: a (rows, V) float32 block of about this size


def head_chunk_rows(device, vocab_size):
    """head_logps's default rows per chunk on `device` (see there)."""
    return 256 if torch.device(device).type == "cpu" else max(256, HEAD_CHUNK_BYTES // (4 * vocab_size))


def head_logps(h, head, labels, chunk=None, keep_bytes=None):
    """log pi(label | h) for rows h (M, C) through the output head (an nn.Linear): (M,) float32.
    Chunked (HeadLogps) in blocks of `chunk` rows. Default: 256 rows on a CPU; on a GPU HEAD_CHUNK_BYTES of
    float32 logits (1,335 rows of a 50k vocabulary; at least 256): few chunks, so few kernel launches. (On a
    CPU larger blocks were no faster, measured, and cost memory.) The softmax rows are kept for backward up
    to keep_bytes (default HEAD_KEEP_BYTES), recomputed beyond. float64 (tests) takes the plain path."""
    if h.dtype == torch.float64:
        return token_logps(head(h), labels)
    chunk = chunk or head_chunk_rows(h.device, head.weight.size(0))
    keep_bytes = HEAD_KEEP_BYTES if keep_bytes is None else keep_bytes
    if not (torch.is_grad_enabled() and (h.requires_grad or head.weight.requires_grad)):
        keep_bytes = 0  # no backward will come: keep nothing
    return HeadLogps.apply(h, head.weight, head.bias, labels, chunk, keep_bytes)


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
# The model. One class for every architecture: differences are config flags (rotary embeddings, a
# parallel residual with one or two LayerNorms, untied heads with or without bias, post-LayerNorm, a
# bidirectional encoder with a classification head), set from config.json by config_from_hf.

@dataclasses.dataclass
class GPTConfig:
    """Model shape and architecture flags. The defaults are GPT-2 (Radford et al. 2019); config_from_hf sets
    the flags that reproduce GPT-J-6B (Wang & Komatsuzaki 2021), GPT-NeoX-20B/Pythia (Black et al. 2022,
    arXiv:2204.06745; Biderman et al. 2023, arXiv:2304.01373) and RoBERTa (Liu et al. 2019, arXiv:1907.11692)."""
    vocab_size: int = 50257
    block_size: int = 1024          # longest sequence (learned position table size; pos_offset included)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_inner: int | None = None      # MLP width; None means 4 * n_embd
    dropout: float = 0.0            # DPO trains without dropout (the policy's log-probs must be deterministic)
    bias: bool = True               # biases in the Linears and LayerNorms
    layer_norm_eps: float = 1e-5
    activation: str = "gelu_new"    # GPT-2's tanh approximation of GELU ("gelu" for the exact one)
    pos_embedding: str = "learned"  # "learned" absolute table (GPT-2, RoBERTa) or "rotary" (RoFormer, arXiv:2104.09864)
    parallel_residual: bool = False  # x + attn(ln_1(x)) + mlp(ln_2(x)) (GPT-NeoX/GPT-J) instead of sequential
    tie_word_embeddings: bool = True  # output head shares the token embedding (GPT-2)
    causal: bool = True             # False gives a bidirectional encoder
    model_type: str = "gpt2"        # the Hugging Face layout save_pretrained writes: gpt2, gptj, gpt_neox, roberta
    rotary_dim: int | None = None   # rotary: the first rotary_dim dims of each head rotate (None = all hs)
    rotary_base: float = 10000.0    # rotary: frequencies base^(-2i/rotary_dim)
    rotary_interleaved: bool = False  # rotary pairs (2i, 2i+1) (GPT-J) instead of (i, i + rotary_dim/2) (GPT-NeoX)
    shared_layernorm: bool = False  # parallel block with ONE LayerNorm: x + attn(ln_1(x)) + mlp(ln_1(x)) (GPT-J)
    attn_bias: bool | None = None   # biases in the attention projections; None follows `bias` (GPT-J: False)
    lm_head_bias: bool = False      # a bias on the output head (GPT-J)
    post_layernorm: bool = False    # x = ln_1(x + attn(x)); x = ln_2(x + mlp(x)), no ln_f (BERT/RoBERTa)
    embedding_layernorm: bool = False  # LayerNorm on the summed embeddings (BERT/RoBERTa)
    type_vocab_size: int = 0        # token-type (segment) table; type 0 is added to every token (RoBERTa)
    pos_offset: int = 0             # learned position of token t is t + pos_offset (RoBERTa: padding_idx + 1 = 2)
    pad_token_id: int | None = None  # classify() masks this token when no attention_mask is given (RoBERTa: 1)
    num_labels: int = 0             # > 0: a sequence-classification head (dense, tanh, out_proj) instead of lm_head
    labels: tuple = ()              # optional names of the num_labels classes (Hugging Face id2label)

    def __post_init__(self):
        def need(ok, msg):
            if not ok:
                raise ValueError(msg)
        hs = self.n_embd // self.n_head
        need(self.n_embd % self.n_head == 0, f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        need(self.pos_embedding in ("learned", "rotary"),
             f"pos_embedding {self.pos_embedding!r} is not supported ('learned' or 'rotary')")
        need(self.activation in ("gelu_new", "gelu"),
             f"activation {self.activation!r} is not supported ('gelu_new' or 'gelu')")
        need(self.model_type in ("gpt2", "gptj", "gpt_neox", "roberta"),
             f"model_type {self.model_type!r} is not supported (gpt2, gptj, gpt_neox or roberta)")
        if self.pos_embedding == "rotary":
            self.rotary_dim = hs if self.rotary_dim is None else self.rotary_dim
            need(0 < self.rotary_dim <= hs and self.rotary_dim % 2 == 0,
                 f"rotary_dim {self.rotary_dim} must be even and between 2 and the head size {hs}")
        need(not self.shared_layernorm or self.parallel_residual, "shared_layernorm needs parallel_residual")
        need(not (self.post_layernorm and self.parallel_residual), "post_layernorm and parallel_residual exclude each other")
        need(0 <= self.pos_offset < self.block_size, f"pos_offset {self.pos_offset} must lie in [0, block_size)")
        self.attn_bias = self.bias if self.attn_bias is None else self.attn_bias
        self.labels = tuple(self.labels)
        need(not self.labels or len(self.labels) == self.num_labels,
             f"{len(self.labels)} labels for num_labels {self.num_labels}")

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


def rotary_tables(position_ids, config):
    """Rotary position embedding (RoFormer, arXiv:2104.09864): the angles position * base^(-2i/d) for the
    d = rotary_dim / 2 pairs of dimensions. position_ids (B or 1, T) -> cos, sin (B or 1, 1, T, d) in float32."""
    d = config.rotary_dim
    inv_freq = 1.0 / config.rotary_base ** (torch.arange(0, d, 2, device=position_ids.device, dtype=torch.float32) / d)
    angles = position_ids[:, None, :, None].float() * inv_freq  # (B, 1, T, d/2)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin, interleaved):
    """Rotates each pair (x1, x2) of the first rotary_dim dims of x (B, nh, T, hs) by its angle, in float32:
    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin). GPT-J pairs dims (2i, 2i+1) ("rotate every two"), GPT-NeoX
    pairs (i, i + rotary_dim/2) ("rotate half"); the remaining hs - rotary_dim dims pass unchanged."""
    d = 2 * cos.size(-1)
    rot, rest = x[..., :d].float(), x[..., d:]
    x1, x2 = (rot[..., 0::2], rot[..., 1::2]) if interleaved else rot.chunk(2, dim=-1)  # (B, nh, T, d/2) each
    y1, y2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    rot = torch.stack((y1, y2), dim=-1).flatten(-2) if interleaved else torch.cat((y1, y2), dim=-1)  # (B, nh, T, d)
    return torch.cat((rot.to(x.dtype), rest), dim=-1)


class Attention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.n_head, self.layer, self.dropout = config.n_head, layer, config.dropout
        self.interleaved = config.rotary_interleaved
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.attn_bias)  # rows [q; k; v]
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.attn_bias)

    def forward(self, x, mask, cache=None, rope=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if rope is not None:  # rotary: rotate q and k before k enters the cache
            q, k = apply_rotary(q, *rope, self.interleaved), apply_rotary(k, *rope, self.interleaved)
        if cache is not None:
            k, v = self.cached(cache, k, v)  # (B, nh, past+T, hs)
        is_causal = isinstance(mask, bool) and mask
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if isinstance(mask, bool) else mask,
                                           is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))

    def cached(self, cache, k, v):  # (GPT.compile_blocks keeps this out of the compiled graph)
        return cache.update(self.layer, k, v)


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
        self.parallel, self.post_ln = config.parallel_residual, config.post_layernorm
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = Attention(config, layer)
        self.ln_2 = (None if config.shared_layernorm else  # GPT-J: ln_1 feeds the MLP too
                     nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias))
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, mask, cache=None, rope=None):
        if self.post_ln:  # BERT/RoBERTa: normalise after each residual sum
            x = self.ln_1(x + self.drop(self.attn(x, mask, cache, rope)))
            return self.ln_2(x + self.drop(self.mlp(x)))
        h = self.ln_1(x)
        if self.parallel:  # attention and MLP both read x; GPT-J feeds both the same ln_1(x)
            m = self.mlp(h if self.ln_2 is None else self.ln_2(x))
            return x + self.drop(self.attn(h, mask, cache, rope)) + self.drop(m)
        x = x + self.drop(self.attn(h, mask, cache, rope))
        return x + self.drop(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = c = config
        C = c.n_embd
        self.wte = nn.Embedding(c.vocab_size, C)
        self.wpe = nn.Embedding(c.block_size, C) if c.pos_embedding == "learned" else None
        self.wtt = nn.Embedding(c.type_vocab_size, C) if c.type_vocab_size else None  # token types (RoBERTa)
        self.ln_e = nn.LayerNorm(C, eps=c.layer_norm_eps, bias=c.bias) if c.embedding_layernorm else None
        self.drop = nn.Dropout(c.dropout)
        self.h = nn.ModuleList(Block(c, i) for i in range(c.n_layer))
        self.ln_f = None if c.post_layernorm else nn.LayerNorm(C, eps=c.layer_norm_eps, bias=c.bias)
        self.lm_head = None if c.num_labels else nn.Linear(C, c.vocab_size, bias=c.lm_head_bias)
        self.cls_dense = nn.Linear(C, C) if c.num_labels else None  # classification head (RoBERTa), see classify
        self.cls_proj = nn.Linear(C, c.num_labels) if c.num_labels else None
        if c.tie_word_embeddings and self.lm_head is not None:
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

    def compile_blocks(self):
        """torch.compile each block in place (regional compilation): every block runs the same code, so they
        share one compiled graph per input shape and compiling costs about one block's time. Parameter names,
        state_dict and checkpoints are unchanged."""
        for block in self.h:
            # the cache update runs eagerly between two compiled pieces of the block: the compiled code then
            # never reads the block's index (self.layer), so every block shares one graph (no recompiles)
            block.attn.cached = torch.compiler.disable(block.attn.cached)
            block.compile()
        return self

    def num_params(self, non_embedding=False):
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding and self.wpe is not None else n

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
        c = self.config
        past = cache.pos if cache is not None else 0
        if past + T + c.pos_offset > c.block_size:
            raise ValueError(f"sequence of {past + T} tokens exceeds block_size {c.block_size}"
                             + (f" - pos_offset {c.pos_offset}" if c.pos_offset else ""))
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:past + T]  # (B, T)
            else:
                position_ids = torch.arange(past, past + T, device=idx.device).unsqueeze(0)  # (1, T)
        mask = self._attention_mask(attention_mask, T, past, idx.device)
        x = self.wte(idx)  # (B, T, C)
        if self.wtt is not None:
            x = x + self.wtt.weight[0]  # token type 0 on every token
        if self.wpe is not None:
            x = x + self.wpe(position_ids + c.pos_offset)
        if self.ln_e is not None:
            x = self.ln_e(x)
        x = self.drop(x)
        rope = rotary_tables(position_ids, c) if c.pos_embedding == "rotary" else None  # cos, sin (B, 1, T, rd/2)
        # activation checkpointing (dpo.py --grad-checkpoint); not with a cache, which a recompute would update twice
        checkpointing = (getattr(self, "grad_checkpoint", False) and self.training and torch.is_grad_enabled()
                         and cache is None)
        for block in self.h:
            if checkpointing:  # keep only each block's input; recompute its insides during backward
                x = torch.utils.checkpoint.checkpoint(block, x, mask, cache, rope, use_reentrant=False)
            else:
                x = block(x, mask, cache, rope)
        if cache is not None:
            cache.pos += T
        if self.ln_f is not None:
            x = self.ln_f(x)
        if return_hidden:
            return x
        self._need_lm_head()
        return self.lm_head(x)  # (B, T, V)

    def logps(self, idx, target_mask, attention_mask=None, target_index=None):
        """Per-token log-probabilities log pi(idx[:, t] | idx[:, <t]) at the positions where target_mask
        is True, 0 elsewhere: (N, T) float32. target_mask (N, T) is aligned with idx (position 0 has no
        prediction and is ignored). The output head and log-softmax run only on the selected positions,
        not on prompt and padding tokens: with 50k-token vocabularies the head is most of the work.
        target_index: the same positions as flat indices into (N, T-1), if the caller has them (found on
        the CPU, a GPU need not wait for a boolean selection). Equal to token_logps(self(idx)[:, :-1],
        idx[:, 1:]) on the selected positions (tested)."""
        self._need_lm_head()
        N, T = idx.shape
        h = self(idx, attention_mask=attention_mask, return_hidden=True)  # (N, T, C)
        if target_index is None:
            target_index = target_mask[:, 1:].reshape(-1).nonzero().squeeze(1)  # (M,) hidden t predicts token t+1
        lp = head_logps(h[:, :-1].flatten(0, 1)[target_index], self.lm_head,
                        idx[:, 1:].reshape(-1)[target_index])  # (M,) M = selected tokens
        out = torch.zeros(N * (T - 1), dtype=torch.float32, device=idx.device).index_copy(0, target_index, lp)
        return F.pad(out.view(N, T - 1), (1, 0))  # (N, T), 0 at position 0 and wherever nothing is scored

    def classify(self, idx, attention_mask=None):
        """Sequence-classification logits (B, num_labels) from the first token (<s>) of each row of idx (B, T):
        out_proj(tanh(dense(h_0))), as RobertaForSequenceClassification. Pad on the right; attention_mask
        (B, T) masks the padding as keys (default: idx != config.pad_token_id)."""
        if self.cls_proj is None:
            raise ValueError("classify() needs a classification head (config.num_labels > 0, e.g. a RoBERTa classifier)")
        if attention_mask is None and self.config.pad_token_id is not None:
            attention_mask = (idx != self.config.pad_token_id).long()
        h = self(idx, attention_mask=attention_mask, return_hidden=True)[:, 0]  # (B, C)
        return self.cls_proj(self.drop(torch.tanh(self.cls_dense(self.drop(h)))))  # (B, num_labels)

    def _need_lm_head(self):
        if self.lm_head is None:
            raise ValueError("this model has a classification head, not a language-model head: use classify(); "
                             "forward logits, logps and generate need a causal language model")

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
        """Loads a GPT-2, GPT-J, GPT-NeoX (Pythia) or RoBERTa-classifier checkpoint in the Hugging Face layout.

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
        if config.tie_word_embeddings and model.lm_head is not None:
            model.lm_head.weight = model.wte.weight  # to_empty/_apply allocate each name separately: tie again
        expected = dict(model.named_parameters())  # the tied lm_head.weight appears once, as wte.weight
        loaded = {}  # our name -> elements copied (GPT-J's q, k, v each fill a third of c_attn)
        for file in checkpoint_files(folder):
            for hf_name, tensor in read_tensors(file).items():
                name, kind = hf_to_ours(hf_name, config, file)
                if name is None:
                    continue
                param = expected[name]
                target = param.chunk(3)["qkv".index(kind)] if kind in ("q", "k", "v") else param  # a view
                tensor = tensor.t() if kind == "T" else tensor
                if tuple(tensor.shape) != tuple(target.shape):
                    raise InputError(f"{file}: {hf_name} has shape {tuple(tensor.shape)} but the model built "
                                     f"from config.json expects {tuple(target.shape)}: the checkpoint and "
                                     f"config.json belong to different models")
                with torch.no_grad():
                    target.copy_(_hf_layout(tensor, kind, config.n_head, to_hf=False) if kind == "qkv_heads" else tensor)
                loaded[name] = loaded.get(name, 0) + tensor.numel()
        missing = [n for n, p in expected.items() if loaded.get(n, 0) < p.numel()]
        if missing:
            raise InputError(f"{folder}: checkpoint lacks {len(missing)} weights, e.g. {', '.join(missing[:3])}; the "
                             f"download is incomplete or the checkpoint is not a {ARCHS[config.model_type][0]} model")
        return model.eval()

    def save_pretrained(self, folder):
        """config.json + model.safetensors in the Hugging Face layout of config.model_type (GPT2LMHeadModel,
        GPTJForCausalLM, GPTNeoXForCausalLM or RobertaForSequenceClassification loads it).
        Atomic: written into a temporary folder that replaces `folder` at the end."""
        config_json = config_to_hf(self.config, next(self.parameters()).dtype)  # first: raises on a bad config
        tmp, old = folder.rstrip("/") + ".tmp", folder.rstrip("/") + ".old"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        tensors = {hf_name: t for name, p in self.named_parameters() for hf_name, t in ours_to_hf(name, p, self.config)}
        save_safetensors(tensors, os.path.join(tmp, "model.safetensors"))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config_json, f, indent=2)
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
        self._need_lm_head()
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
                h = self(x, attention_mask=mask[:, :n], position_ids=positions[:, n - x.size(1):n], cache=cache,
                         return_hidden=True)
            else:
                h = self(seq, attention_mask=mask[:, :n], position_ids=positions[:, :n], return_hidden=True)
            logits = self.lm_head(h[:, -1])  # (B, V): the head on the last position only (the prompt's others unneeded)
            nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
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
# Checkpoint files, config.json and the key tables

HUB_URL = "https://huggingface.co/{name}/resolve/main/{file}"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def hub_folder(name):
    """Where a hub model's files are downloaded: $DPO_CACHE/hub/<owner>--<name>."""
    return os.path.join(cache_dir(), "hub", name.replace("/", "--"))


def resolve_checkpoint(name_or_dir):
    """A local folder as is; otherwise a hub name, downloaded into $DPO_CACHE/hub/<name> once."""
    if os.path.isdir(name_or_dir):
        return name_or_dir
    if os.path.sep in name_or_dir.strip("/") and name_or_dir.count("/") != 1 or name_or_dir.startswith((".", "/", "~")):
        raise InputError(f"{name_or_dir}: no such folder; pass a folder with config.json and model.safetensors, "
                         f"or a hub name such as gpt2 or openai-community/gpt2-large")
    folder = hub_folder(name_or_dir)
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
    """GPTConfig from a Hugging Face config.json: model_type gpt2, gptj, gpt_neox (GPT-NeoX, Pythia) or roberta
    (RobertaForSequenceClassification). Unsupported settings raise InputError naming the file."""
    hf = _read_json(path)
    if not isinstance(hf, dict):
        raise InputError(f"{path}: expected a JSON object of settings; copy config.json from the model's hub page")
    if hf.get("model_type") not in ARCHS:
        raise InputError(f"{path}: model_type {hf.get('model_type')!r} is not supported; pass a GPT-2 checkpoint "
                         f"(model_type gpt2) or a GPT-J (gptj), GPT-NeoX/Pythia (gpt_neox) or RoBERTa classifier (roberta) one")
    try:
        return _config_from_dict(hf, path)
    except InputError:
        raise
    except ValueError as e:  # GPTConfig's own checks, e.g. rotary_dim larger than the head
        raise InputError(f"{path}: {e}") from None


def _config_from_dict(hf, path):
    def ints(*keys):
        missing = [k for k in keys if not isinstance(hf.get(k), int)]
        if missing:
            raise InputError(f"{path}: no integer {', '.join(missing)}; copy config.json from the model's hub page")
        return [hf[k] for k in keys]

    def unsupported(bad, what, allowed=""):
        if bad:
            raise InputError(f"{path}: {what} is not supported" + (f" ({allowed})" if allowed else ""))

    def activation(key, default):
        act = hf.get(key, default)
        unsupported(act not in ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast"), f"{key} {act!r}", "gelu or gelu_new")
        return "gelu" if act == "gelu" else "gelu_new"  # the others are the same tanh approximation

    mt = hf["model_type"]
    if mt == "gpt2":
        unsupported(hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"),
                    "scale_attn_by_inverse_layer_idx/reorder_and_upcast_attn")
        V, L, H, C = ints("vocab_size", "n_layer", "n_head", "n_embd")
        return GPTConfig(vocab_size=V, block_size=hf.get("n_positions", 1024), n_layer=L, n_head=H, n_embd=C,
                         n_inner=hf.get("n_inner"), layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                         activation=activation("activation_function", "gelu_new"),
                         tie_word_embeddings=hf.get("tie_word_embeddings", True))
    if mt == "gptj":  # rotary (interleaved pairs) on rotary_dim dims, one LayerNorm for a parallel block
        V, L, H, C = ints("vocab_size", "n_layer", "n_head", "n_embd")
        return GPTConfig(model_type=mt, vocab_size=V, block_size=hf.get("n_positions", 2048), n_layer=L, n_head=H,
                         n_embd=C, n_inner=hf.get("n_inner"), layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                         activation=activation("activation_function", "gelu_new"), pos_embedding="rotary",
                         rotary_dim=hf.get("rotary_dim", 64), rotary_interleaved=True, parallel_residual=True,
                         shared_layernorm=True, attn_bias=False, lm_head_bias=True,
                         tie_word_embeddings=hf.get("tie_word_embeddings", False))
    if mt == "gpt_neox":  # rotary (rotate-half pairs) on rotary_pct of each head, fused per-head qkv
        V, L, H, C, inner = ints("vocab_size", "num_hidden_layers", "num_attention_heads", "hidden_size",
                                 "intermediate_size")
        # transformers >= 5 writes rope_parameters {rope_theta, partial_rotary_factor} (it wins, as in transformers);
        # older files have rotary_emb_base and rotary_pct
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        unsupported(kind != "default", f"rope_type {kind!r}", "only unscaled rotary embeddings")
        unsupported(hf.get("head_dim") not in (None, C // H),
                    f"head_dim {hf.get('head_dim')} != hidden_size / num_attention_heads")
        theta = rope.get("rope_theta", hf.get("rotary_emb_base", hf.get("rope_theta", 10000)))
        pct = rope.get("partial_rotary_factor", hf.get("rotary_pct", hf.get("partial_rotary_factor", 0.25)))
        return GPTConfig(model_type=mt, vocab_size=V, block_size=hf.get("max_position_embeddings", 2048), n_layer=L,
                         n_head=H, n_embd=C, n_inner=inner, layer_norm_eps=hf.get("layer_norm_eps", 1e-5),
                         activation=activation("hidden_act", "gelu"), pos_embedding="rotary",
                         rotary_dim=int(C // H * pct), rotary_base=float(theta),
                         parallel_residual=hf.get("use_parallel_residual", True), attn_bias=hf.get("attention_bias", True),
                         tie_word_embeddings=hf.get("tie_word_embeddings", False))
    # roberta: a bidirectional post-LayerNorm encoder with a classification head on <s>
    archs = hf.get("architectures") or ["RobertaForSequenceClassification"]
    unsupported(archs != ["RobertaForSequenceClassification"], f"architectures {archs}",
                "only RobertaForSequenceClassification")
    unsupported(hf.get("is_decoder") or hf.get("add_cross_attention"), "a RoBERTa decoder (is_decoder, add_cross_attention)")
    unsupported(hf.get("position_embedding_type", "absolute") != "absolute",
                f"position_embedding_type {hf.get('position_embedding_type')!r}", "only absolute")
    V, L, H, C, inner, pad = ints("vocab_size", "num_hidden_layers", "num_attention_heads", "hidden_size",
                                  "intermediate_size", "pad_token_id")
    id2label = hf.get("id2label") or {}
    labels = tuple(str(id2label[k]) for k in sorted(id2label, key=int))
    num_labels = hf.get("num_labels") or len(labels) or 2  # transformers' default is 2
    return GPTConfig(model_type=mt, vocab_size=V, block_size=hf.get("max_position_embeddings", 512), n_layer=L, n_head=H,
                     n_embd=C, n_inner=inner, layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
                     activation=activation("hidden_act", "gelu"), causal=False, post_layernorm=True,
                     embedding_layernorm=True, type_vocab_size=hf.get("type_vocab_size", 2), pos_offset=pad + 1,
                     pad_token_id=pad, num_labels=num_labels, labels=labels if len(labels) == num_labels else (),
                     tie_word_embeddings=False)


def config_to_hf(config, dtype=torch.float32):
    """The config.json of config.model_type's Hugging Face layout. Raises ValueError when the flags are not
    that architecture's (e.g. a GPT-2 with parallel_residual): transformers would load it as a different model."""
    c, hs = config, config.n_embd // config.n_head
    drop, tied, dt = c.dropout, c.tie_word_embeddings, str(dtype).removeprefix("torch.")
    if c.model_type == "gpt2":
        hf = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
              "n_positions": c.block_size, "n_ctx": c.block_size, "n_layer": c.n_layer, "n_head": c.n_head,
              "n_embd": c.n_embd, "n_inner": c.n_inner, "activation_function": c.activation,
              "layer_norm_epsilon": c.layer_norm_eps, "resid_pdrop": drop, "embd_pdrop": drop, "attn_pdrop": drop,
              "tie_word_embeddings": tied, "bos_token_id": 50256, "eos_token_id": 50256, "torch_dtype": dt}
    elif c.model_type == "gptj":
        hf = {"architectures": ["GPTJForCausalLM"], "model_type": "gptj", "vocab_size": c.vocab_size,
              "n_positions": c.block_size, "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd,
              "n_inner": c.n_inner, "rotary_dim": c.rotary_dim, "activation_function": c.activation,
              "layer_norm_epsilon": c.layer_norm_eps, "resid_pdrop": drop, "embd_pdrop": drop, "attn_pdrop": drop,
              "tie_word_embeddings": tied, "bos_token_id": 50256, "eos_token_id": 50256, "torch_dtype": dt}
    elif c.model_type == "gpt_neox":
        pct = (c.rotary_dim or 0) / hs
        hf = {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "vocab_size": c.vocab_size,
              "max_position_embeddings": c.block_size, "num_hidden_layers": c.n_layer,
              "num_attention_heads": c.n_head, "hidden_size": c.n_embd, "intermediate_size": c.n_inner or 4 * c.n_embd,
              "hidden_act": c.activation, "layer_norm_eps": c.layer_norm_eps, "use_parallel_residual": c.parallel_residual,
              "attention_bias": c.attn_bias, "rope_parameters": {"rope_type": "default", "rope_theta": c.rotary_base,
                                                                 "partial_rotary_factor": pct},
              "rotary_pct": pct, "rotary_emb_base": c.rotary_base,  # the keys of transformers < 5
              "attention_dropout": drop, "hidden_dropout": drop, "tie_word_embeddings": tied, "torch_dtype": dt}
    else:
        labels = c.labels or tuple(f"LABEL_{i}" for i in range(c.num_labels))
        hf = {"architectures": ["RobertaForSequenceClassification"], "model_type": "roberta", "vocab_size": c.vocab_size,
              "max_position_embeddings": c.block_size, "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head,
              "hidden_size": c.n_embd, "intermediate_size": c.n_inner or 4 * c.n_embd, "hidden_act": c.activation,
              "layer_norm_eps": c.layer_norm_eps, "type_vocab_size": c.type_vocab_size, "pad_token_id": c.pad_token_id,
              "bos_token_id": 0, "eos_token_id": 2, "position_embedding_type": "absolute",
              "id2label": dict(enumerate(labels)), "label2id": {n: i for i, n in enumerate(labels)},
              "hidden_dropout_prob": drop, "attention_probs_dropout_prob": drop, "torch_dtype": dt}
    # the file must describe this very model: read it back and compare (dropout and label names aside)
    def norm(x):
        return dataclasses.replace(x, dropout=0.0, n_inner=x.n_inner or 4 * x.n_embd, labels=(),
                                   tie_word_embeddings=x.tie_word_embeddings and not x.num_labels)
    try:
        back = _config_from_dict(hf, "config")
    except ValueError as e:
        raise ValueError(f"cannot write a {c.model_type} config.json: {e}") from None
    diff = [f"{f.name}={getattr(c, f.name)!r}" for f in dataclasses.fields(c)
            if getattr(norm(back), f.name) != getattr(norm(c), f.name)]
    if diff:
        raise ValueError(f"a {c.model_type} checkpoint cannot express {', '.join(diff)}: set model_type to the "
                         f"architecture these flags describe")
    return hf


# Key tables: Hugging Face name pattern -> (our name pattern, kind), "{}" standing for the layer index. Our names
# follow GPT-2's (llm.c's approach). kind: "" copy; "T" transpose (GPT-2 stores Linears as Conv1D, weight (in, out));
# "q", "k", "v" a third of our fused c_attn rows [q; k; v]; "qkv_heads" GPT-NeoX's fused rows, ordered (nh, 3, hs).
def _keys(*rows):
    def expand(hf, ours, params="weight bias", kind=""):
        return {f"{hf}.{p}": (f"{ours}.{p}", kind) for p in params.split()}
    return {k: v for row in rows for k, v in expand(*row).items()}


GPT2_KEYS = _keys(
    ("transformer.wte", "wte", "weight"), ("transformer.wpe", "wpe", "weight"), ("transformer.ln_f", "ln_f"),
    ("lm_head", "lm_head", "weight"),  # only in untied checkpoints
    ("transformer.h.{}.ln_1", "h.{}.ln_1"), ("transformer.h.{}.ln_2", "h.{}.ln_2"),
    *[(f"transformer.h.{{}}.{lin}", f"h.{{}}.{lin}", p, kind)  # Conv1D weights: transposed
      for lin in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj") for p, kind in (("weight", "T"), ("bias", ""))])
GPTJ_KEYS = _keys(
    ("transformer.wte", "wte", "weight"), ("transformer.ln_f", "ln_f"), ("lm_head", "lm_head"),
    ("transformer.h.{}.ln_1", "h.{}.ln_1"),
    *[(f"transformer.h.{{}}.attn.{x}_proj", "h.{}.attn.c_attn", "weight", x) for x in "qkv"],
    ("transformer.h.{}.attn.out_proj", "h.{}.attn.c_proj", "weight"),
    ("transformer.h.{}.mlp.fc_in", "h.{}.mlp.c_fc"), ("transformer.h.{}.mlp.fc_out", "h.{}.mlp.c_proj"))
NEOX_KEYS = _keys(
    ("gpt_neox.embed_in", "wte", "weight"), ("gpt_neox.final_layer_norm", "ln_f"), ("embed_out", "lm_head", "weight"),
    ("gpt_neox.layers.{}.input_layernorm", "h.{}.ln_1"), ("gpt_neox.layers.{}.post_attention_layernorm", "h.{}.ln_2"),
    ("gpt_neox.layers.{}.attention.query_key_value", "h.{}.attn.c_attn", "weight bias", "qkv_heads"),
    ("gpt_neox.layers.{}.attention.dense", "h.{}.attn.c_proj"),
    ("gpt_neox.layers.{}.mlp.dense_h_to_4h", "h.{}.mlp.c_fc"), ("gpt_neox.layers.{}.mlp.dense_4h_to_h", "h.{}.mlp.c_proj"))
ROBERTA_KEYS = _keys(
    ("roberta.embeddings.word_embeddings", "wte", "weight"), ("roberta.embeddings.position_embeddings", "wpe", "weight"),
    ("roberta.embeddings.token_type_embeddings", "wtt", "weight"), ("roberta.embeddings.LayerNorm", "ln_e"),
    *[(f"roberta.encoder.layer.{{}}.attention.self.{n}", "h.{}.attn.c_attn", "weight bias", x)
      for n, x in (("query", "q"), ("key", "k"), ("value", "v"))],
    ("roberta.encoder.layer.{}.attention.output.dense", "h.{}.attn.c_proj"),
    ("roberta.encoder.layer.{}.attention.output.LayerNorm", "h.{}.ln_1"),  # post-LN: after the attention sum
    ("roberta.encoder.layer.{}.intermediate.dense", "h.{}.mlp.c_fc"),
    ("roberta.encoder.layer.{}.output.dense", "h.{}.mlp.c_proj"), ("roberta.encoder.layer.{}.output.LayerNorm", "h.{}.ln_2"),
    ("classifier.dense", "cls_dense"), ("classifier.out_proj", "cls_proj"))
_BUFFERS = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)$")  # causal-mask buffers of old GPT-2/GPT-J checkpoints
# model_type -> (name in messages, prefix a base-model checkpoint omits, key table, keys deliberately skipped)
ARCHS = {
    "gpt2": ("GPT-2", "transformer.", GPT2_KEYS, _BUFFERS),
    "gptj": ("GPT-J", "transformer.", GPTJ_KEYS, _BUFFERS),
    "gpt_neox": ("GPT-NeoX", "gpt_neox.", NEOX_KEYS,
                 re.compile(r"layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)$")),
    "roberta": ("RoBERTa", "roberta.", ROBERTA_KEYS,  # the pooler is unused by the classifier (transformers drops it too)
                re.compile(r"embeddings\.position_ids$|pooler\.dense\.(weight|bias)$")),
}


def hf_to_ours(hf_name, config, file="checkpoint"):
    """Maps one checkpoint key to (our name, kind); (None, None) for keys we deliberately skip; raises on unknown ones."""
    arch, prefix, table, skipped = ARCHS[config.model_type]
    m = re.search(r"\.(\d+)\.", hf_name)
    pattern = f"{hf_name[:m.start()]}.{{}}.{hf_name[m.end():]}" if m else hf_name
    pattern = pattern if pattern in table else prefix + pattern  # GPT2Model-style files lack "transformer."
    if skipped.search(hf_name):
        return None, None
    if pattern not in table or (m and int(m.group(1)) >= config.n_layer):
        raise InputError(f"{file}: unknown key {hf_name!r} for a {config.n_layer}-layer {arch}; "
                         f"the checkpoint is from another architecture or config.json does not match it")
    ours, kind = table[pattern]
    if ours == "lm_head.weight" and config.tie_word_embeddings:
        return None, None  # a tied head is the token embedding; its copy in the file is not loaded
    return (ours.format(m.group(1)) if m else ours), kind


def ours_to_hf(name, tensor, config):
    """[(Hugging Face name, tensor in its layout)] for one of our parameters: three for a GPT-J/RoBERTa c_attn."""
    m = re.match(r"h\.(\d+)\.(.*)$", name)
    pattern = f"h.{{}}.{m.group(2)}" if m else name
    out = [(hf.format(m.group(1)) if m else hf, _hf_layout(tensor, kind, config.n_head, to_hf=True))
           for hf, (ours, kind) in ARCHS[config.model_type][2].items() if ours == pattern]
    if not out:
        raise KeyError(name)
    return out


def _hf_layout(t, kind, n_head, to_hf):
    """A tensor moved between the Hugging Face layout and ours (see the key tables for `kind`)."""
    if kind == "T":
        return t.t()
    if kind == "qkv_heads":  # rows (nh, 3, hs) in the file, (3, nh, hs) in our c_attn
        return t.unflatten(0, (3, n_head, -1) if to_hf else (n_head, 3, -1)).transpose(0, 1).reshape(t.shape)
    if kind in ("q", "k", "v") and to_hf:
        return t.chunk(3)["qkv".index(kind)]
    return t


# ----------------------------------------------------------------------------------------------
# LoRA adapters (Hu et al. 2021, arXiv:2106.09685): y = W x + (alpha / r) B A x with W frozen and only the
# low-rank A (r, in) and B (out, r) trained. B starts at zero, so the adapted model starts equal to the base
# model, and the DPO reference is the same model with its adapters switched off: no second copy of the weights.

import contextlib  # noqa: E402  (used by this section only)

LORA_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # the linear layers of every block


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update:

        y = x W^T + b + (alpha / r) * dropout(x) A^T B^T        W (out, in), A (r, in), B (out, r)

    It keeps the wrapped nn.Linear's own `weight` and `bias` Parameters under the same names, so checkpoint
    keys (h.0.attn.c_attn.weight) do not change; the adapters are `lora_A` and `lora_B`, float32 for bf16 or
    float32 W (float64 for float64 W). A is initialised like an nn.Linear weight (uniform, bound 1/sqrt(in)),
    B to zero (Sec. 4.1)."""

    def __init__(self, linear, rank, alpha, dropout=0.0):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_parameter("weight", linear.weight.requires_grad_(False))
        self.register_parameter("bias", None if linear.bias is None else linear.bias.requires_grad_(False))
        device, dtype = linear.weight.device, torch.promote_types(linear.weight.dtype, torch.float32)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.enabled = True  # False: the plain frozen layer (lora_disabled)

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        a = F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A)  # (..., r)
        return y + (F.linear(a, self.lora_B) * self.scale).to(y.dtype)

    def merged_weight(self):
        """W + (alpha / r) B A, summed in the adapters' dtype (float32 at least), in W's dtype: (out, in)."""
        return (self.weight.to(self.lora_A.dtype) + self.scale * (self.lora_B @ self.lora_A)).to(self.weight.dtype)


def train_only_head(model):
    """Freezes every weight except the output head (lm_head weight, and its bias if any), in place; returns the
    model. The hidden states then never change, and training can only shift each token's logit by a
    context-dependent amount linear in the (fixed) last hidden state. (A tied head is the token embedding.)"""
    model._need_lm_head()
    model.requires_grad_(False)
    model.lm_head.requires_grad_(True)
    return model


def add_lora(model, rank, alpha=None, dropout=0.0, targets=LORA_TARGETS):
    """Freezes every weight of `model` and wraps the `targets` linear layers of every block in LoRALinear
    adapters, in place. alpha defaults to rank (scale 1). Returns the model; only the adapters train."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    model.requires_grad_(False)
    for block in model.h:
        for target in targets:
            parent, name = target.rsplit(".", 1)
            module = block.get_submodule(parent)
            setattr(module, name, LoRALinear(getattr(module, name), rank, rank if alpha is None else alpha, dropout))
    return model


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def lora_state_dict(model):
    """{name: tensor} of the adapters only (what a LoRA run must save to resume)."""
    return {n: p.detach() for n, p in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))}


def load_lora_state_dict(model, tensors, source="adapters"):
    """Copies saved adapters into a model prepared by add_lora with the same rank; raises InputError on a mismatch."""
    params = lora_state_dict(model)
    if set(tensors) != set(params):
        raise InputError(f"{source}: {len(tensors)} adapter tensors, the model has {len(params)} (e.g. "
                         f"{sorted(set(tensors) ^ set(params))[:2]}); pass the --lora-rank and model it was trained with")
    with torch.no_grad():
        for name, p in params.items():
            if tensors[name].shape != p.shape:
                raise InputError(f"{source}: {name} has shape {tuple(tensors[name].shape)}, the model expects "
                                 f"{tuple(p.shape)}; pass the --lora-rank it was trained with")
            p.copy_(tensors[name])


@contextlib.contextmanager
def lora_disabled(model):
    """Inside the block the model is the frozen base model: every adapter switched off (the DPO reference)."""
    layers = lora_layers(model)
    before = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m, enabled in zip(layers, before):
            m.enabled = enabled


@contextlib.contextmanager
def lora_merged(model, device=None):
    """Inside the block every LoRALinear is replaced by a plain nn.Linear holding W + (alpha / r) B A, so the
    model is an ordinary GPT: save_pretrained writes the merged weights in the Hugging Face layout. The
    adapted layers are put back afterwards, untouched: the merge is a new tensor, never added into W and
    subtracted again (which would round W in bfloat16). device="cpu" builds the merged tensors in host memory."""
    swapped = []
    try:
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, LoRALinear):
                    with torch.device("meta"):
                        plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                    with torch.no_grad():
                        merged = child.merged_weight()
                    plain.weight = nn.Parameter(merged.to(device) if device else merged, requires_grad=False)
                    if child.bias is not None:
                        plain.bias = child.bias
                    setattr(module, name, plain)
                    swapped.append((module, name, child))
        yield model
    finally:
        for module, name, child in swapped:
            setattr(module, name, child)
