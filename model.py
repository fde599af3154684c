"""The model: a GPT in one file. GPT-2 first (Radford et al. 2019), readable on its own: GPTConfig, Attention, MLP,
Block, GPT. GPT-J and GPT-NeoX/Pythia differ from it by the labelled deltas of GPTConfig (rotary positions, a
parallel residual, untied heads), whose code is the branches marked "GPT-J/NeoX" and the rotary section below the
model. Then KV-cache sampling and per-token log-probs.

    python -c "from model import GPT, GPTConfig; print(GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64)))"

Hugging Face checkpoints in and out are machinery/hf.py (it builds a GPT from a folder or hub name); the
fast paths (the chunked output head, shared prompts, compile) are machinery/fast.py; the RoBERTa reward
classifier, an encoder built from this file's Attention and MLP, is machinery/roberta.py. This file imports
only torch.

Shape notation: B batch rows, T time, C channels (n_embd), V vocabulary, nh heads, hs head size.
"""
import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclasses.dataclass
class GPTConfig:
    """Model shape and architecture flags. The defaults are GPT-2 (Radford et al. 2019); config_from_hf sets the
    GPT-J/NeoX deltas that reproduce GPT-J-6B (Wang & Komatsuzaki 2021) and GPT-NeoX-20B/Pythia (Black et al.
    2022, arXiv:2204.06745; Biderman et al. 2023, arXiv:2304.01373)."""
    vocab_size: int = 50257
    block_size: int = 1024          # longest sequence (the learned position table's size)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_inner: int | None = None      # MLP width; None means 4 * n_embd
    dropout: float = 0.0            # DPO trains without dropout (the policy's log-probs must be deterministic)
    bias: bool = True               # biases in the Linears and LayerNorms
    layer_norm_eps: float = 1e-5
    activation: str = "gelu_new"    # GPT-2's tanh approximation of GELU ("gelu" for the exact one)
    tie_word_embeddings: bool = True  # output head shares the token embedding (GPT-2)
    model_type: str = "gpt2"        # the Hugging Face layout save_pretrained writes: gpt2, gptj, gpt_neox
    # GPT-J/NeoX deltas
    pos_embedding: str = "learned"  # "learned" absolute table (GPT-2) or "rotary" (RoFormer, arXiv:2104.09864)
    rotary_dim: int | None = None   # rotary: the first rotary_dim dims of each head rotate (None = all hs)
    rotary_base: float = 10000.0    # rotary: frequencies base^(-2i/rotary_dim)
    rotary_interleaved: bool = False  # rotary pairs (2i, 2i+1) (GPT-J) instead of (i, i + rotary_dim/2) (GPT-NeoX)
    parallel_residual: bool = False  # x + attn(ln_1(x)) + mlp(ln_2(x)) (GPT-NeoX/GPT-J) instead of sequential
    shared_layernorm: bool = False  # parallel block with ONE LayerNorm: x + attn(ln_1(x)) + mlp(ln_1(x)) (GPT-J)
    attn_bias: bool | None = None   # biases in the attention projections; None follows `bias` (GPT-J: False)
    lm_head_bias: bool = False      # a bias on the output head (GPT-J)

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
        need(self.model_type in ("gpt2", "gptj", "gpt_neox"),
             f"model_type {self.model_type!r} is not supported (gpt2, gptj or gpt_neox)")
        if self.pos_embedding == "rotary":
            self.rotary_dim = hs if self.rotary_dim is None else self.rotary_dim
            need(0 < self.rotary_dim <= hs and self.rotary_dim % 2 == 0,
                 f"rotary_dim {self.rotary_dim} must be even and between 2 and the head size {hs}")
        need(not self.shared_layernorm or self.parallel_residual, "shared_layernorm needs parallel_residual")
        self.attn_bias = self.bias if self.attn_bias is None else self.attn_bias

    @classmethod
    def named(cls, name, **overrides):
        """The four GPT-2 sizes: gpt2 (124M), gpt2-medium (355M), gpt2-large (774M), gpt2-xl (1558M)."""
        shapes = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024),
                  "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600)}
        if name not in shapes:
            raise ValueError(f"unknown config {name!r}; known: {', '.join(shapes)}")
        n_layer, n_head, n_embd = shapes[name]
        return cls(**{"n_layer": n_layer, "n_head": n_head, "n_embd": n_embd, **overrides})


class Attention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.n_head, self.layer, self.dropout = config.n_head, layer, config.dropout
        self.interleaved = config.rotary_interleaved
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.attn_bias)  # rows [q; k; v]
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.attn_bias)

    def forward(self, x, mask, cache=None, rope=None):
        """mask: True (causal kernel), False (no mask) or a boolean (B, 1, T, past+T) mask of allowed keys."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if rope is not None:  # GPT-J/NeoX: rotate q and k before k enters the cache
            q, k = apply_rotary(q, *rope, self.interleaved), apply_rotary(k, *rope, self.interleaved)
        if cache is not None:
            k, v = self.cached(cache, k, v)  # (B, nh, past+T, hs)
        is_causal = isinstance(mask, bool) and mask
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if isinstance(mask, bool) else mask,
                                           is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))

    def cached(self, cache, k, v):  # (machinery/fast.py's compile_blocks keeps this out of the compiled graph)
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
        self.parallel = config.parallel_residual
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = Attention(config, layer)
        self.ln_2 = (None if config.shared_layernorm else  # GPT-J: ln_1 feeds the MLP too
                     nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias))
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, mask, cache=None, rope=None):
        normed = self.ln_1(x)
        if self.parallel:  # GPT-J/NeoX: attention and MLP both read x; GPT-J feeds both the same ln_1(x)
            m = self.mlp(normed if self.ln_2 is None else self.ln_2(x))
            return x + self.drop(self.attn(normed, mask, cache, rope)) + self.drop(m)
        x = x + self.drop(self.attn(normed, mask, cache, rope))
        return x + self.drop(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = c = config
        C = c.n_embd
        self.wte = nn.Embedding(c.vocab_size, C)
        self.wpe = nn.Embedding(c.block_size, C) if c.pos_embedding == "learned" else None  # GPT-J/NeoX: rotary
        self.drop = nn.Dropout(c.dropout)
        self.h = nn.ModuleList(Block(c, i) for i in range(c.n_layer))
        self.ln_f = nn.LayerNorm(C, eps=c.layer_norm_eps, bias=c.bias)
        self.lm_head = nn.Linear(C, c.vocab_size, bias=c.lm_head_bias)
        if c.tie_word_embeddings:
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
        if past + T > c.block_size:
            raise ValueError(f"sequence of {past + T} tokens exceeds block_size {c.block_size}")
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:past + T]  # (B, T)
            else:
                position_ids = torch.arange(past, past + T, device=idx.device).unsqueeze(0)  # (1, T)
        mask = self._attention_mask(attention_mask, T, past, idx.device)
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(position_ids)
        x = self.drop(x)
        rope = rotary_tables(position_ids, c) if c.pos_embedding == "rotary" else None  # GPT-J/NeoX: cos, sin
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
        x = self.ln_f(x)
        if return_hidden:
            return x
        return self.lm_head(x)  # (B, T, V)

    def _attention_mask(self, attention_mask, T, past, device):
        """True (plain causal kernel), False (no mask: one new token sees every past key) or a boolean
        (B, 1, T, past+T) mask: causal, and padded keys (attention_mask 0) masked."""
        if attention_mask is None or (past == 0 and bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())):
            if past == 0:
                return True  # no padding, or right padding under a causal mask: nothing to mask beyond causality
            if T == 1:
                return False  # one new token with a cache sees every past key
        q = torch.arange(past, past + T, device=device).view(T, 1)
        k = torch.arange(past + T, device=device).view(1, past + T)
        allowed = k <= q
        if attention_mask is not None:
            # every query keeps itself, so a padded query never has an all-masked row (NaN in softmax)
            allowed = allowed & (attention_mask[:, None, None, :].bool() | (k == q))
        return allowed.expand(attention_mask.size(0) if attention_mask is not None else 1, 1, T, past + T)

    # ------------------------------------------------------------------------------------------
    # Sampling (the KV cache and sample_next are below the rotary section)

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
                hidden = self(x, attention_mask=mask[:, :n], position_ids=positions[:, n - x.size(1):n], cache=cache,
                         return_hidden=True)
            else:
                hidden = self(seq, attention_mask=mask[:, :n], position_ids=positions[:, :n], return_hidden=True)
            logits = self.lm_head(hidden[:, -1])  # (B, V): the head on the last position only (the prompt's others unneeded)
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


# ----------------------------------------------------------------------------------------------
# GPT-J/NeoX: rotary position embeddings (pos_embedding="rotary"). The other deltas are branches above: the
# parallel residual (and GPT-J's shared LayerNorm) in Block, attention/head biases and untied heads in GPTConfig.

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


# ----------------------------------------------------------------------------------------------
# Sampling: the KV cache GPT.generate fills, and one token per row from the logits.

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
# Per-token log-probabilities: the one place logits become log pi(y_t | x, y_<t). Used by dpo.py
# (sequence log-probs), machinery/fast.py (the chunked head) and eval.py (KL to the reference).

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
