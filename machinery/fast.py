"""The fast paths: code that computes exactly what a plain expression in model.py or dpo.py computes, with less
time or memory. Each says which plain code it equals and which test proves it; none is needed to follow the paper.

    batch_logps            = sequence_logps(model(ids), ids, loss_mask) per row, within 1e-4
                             (test_train.py::test_concatenated_forward_equals_separate_forwards)
      logps / head_logps   the output head and log-softmax on response positions only, in row chunks (HeadLogps)
                             = token_logps(model(ids)) there (test_model.py::test_logps_on_selected_positions_equal_
                             full_logits, ::test_chunked_head_logps_equal_the_plain_head_with_gradients)
      shared_prompt_logps  each prompt computed once for all its responses (test_train.py::test_shared_prompt_forward_
                             equals_concatenated_forward); used where worth_sharing says it saves >= 20% of the tokens
    micro_batches          pairs of similar length together: less padding, the same gradient (test_train.py::
                             test_gradient_accumulation_equals_full_batch)
    reference_logps        the reference model's log-probs in one pass, so no reference model stays in memory
                             (test_train.py::test_precomputed_reference_equals_on_the_fly)
    compile_blocks         torch.compile per block (test_train.py::test_compile_equals_eager)
    keep_freed_memory      glibc keeps freed memory for reuse (no effect on results)
"""
import ctypes
import io

import torch
import torch.nn.functional as F

from data import EOS, collate_pairs
from machinery.util import Progress, autocast
from model import GPT, token_logps


def keep_freed_memory():
    """Ask glibc to keep freed memory for reuse instead of handing it back to the kernel (Linux; elsewhere
    a no-op returning False). A training step allocates several (N*T, V) float32 tensors (~400 MB each
    for 16 x 128 tokens); glibc maps every block over 32 MB fresh from the kernel and unmaps it when freed,
    so each step page-faults and zeroes gigabytes (the README's speed notes give the effect). A process-wide
    setting, so only entry points call it (sft.main, dpo.main, eval.main), never an import."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 2**31 - 1) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


class HeadLogps(torch.autograd.Function):
    """log softmax(hidden @ W.T + b)[labels] for M rows, in row chunks, never holding more (M, V) logits than
    it needs: forward computes each chunk's logits, its logsumexp and the label's log-prob. Backward needs
    d logp / d z = onehot(label) - softmax(z) for every chunk. When all M softmax rows fit in `keep_bytes`
    (a small model or a short batch, e.g. 768 rows x 50k = 154 MB) forward keeps them and backward reuses them;
    otherwise (gpt2-large, long batches) forward keeps only hidden and the logsumexp and backward recomputes
    each chunk's logits: one matmul more, the (M, V) float32 block never alive at once. Either way the gradient
    is formed in place in that block. Equal to token_logps(F.linear(hidden, W, b), labels), gradients included
    (tested, both ways)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk, keep_bytes):
        # under autocast F.linear runs in the autocast dtype; backward repeats it in that dtype
        ctx.mm_dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) else hidden.dtype
        out = torch.empty(len(hidden), dtype=torch.float32, device=hidden.device)  # (M,)
        lse = torch.empty(len(hidden), dtype=torch.float32, device=hidden.device)  # (M,)
        keep = len(hidden) * weight.size(0) * 4 <= keep_bytes
        probs = []
        for s in range(0, len(hidden), chunk):
            z = F.linear(hidden[s:s + chunk], weight, bias).float()  # (c, V)
            lse[s:s + chunk] = torch.logsumexp(z, dim=-1)
            out[s:s + chunk] = z.gather(1, labels[s:s + chunk, None]).squeeze(1) - lse[s:s + chunk]
            if keep:
                probs.append(z.sub_(lse[s:s + chunk, None]).exp_())  # softmax(z), in place
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.chunk, ctx.probs = chunk, probs
        return out

    @staticmethod
    def backward(ctx, grad):  # grad (M,): d loss / d logp
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        probs, ctx.probs = ctx.probs, None
        dt = ctx.mm_dtype
        w = weight.to(dt)
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=hidden.device) if ctx.needs_input_grad[1] else None
        grad_b = torch.zeros(weight.size(0), dtype=torch.float32, device=hidden.device) if bias is not None and ctx.needs_input_grad[2] else None
        for k, s in enumerate(range(0, len(hidden), ctx.chunk)):
            hidden_chunk, g = hidden[s:s + ctx.chunk].to(dt), grad[s:s + ctx.chunk].float()
            if probs:
                p = probs[k]  # softmax(z), kept by forward
                probs[k] = None  # (freed as soon as used)
            else:
                z = F.linear(hidden_chunk, w, None if bias is None else bias.to(dt)).float()  # (c, V) recomputed
                p = z.sub_(lse[s:s + ctx.chunk, None]).exp_()  # softmax(z), in place
            p.mul_(-g[:, None])  # -g * softmax(z)
            p[torch.arange(len(g), device=g.device), labels[s:s + ctx.chunk]] += g  # + g * onehot(label)
            if grad_b is not None:
                grad_b += p.sum(0)
            p = p.to(dt)
            if grad_h is not None:
                grad_h[s:s + ctx.chunk] = (p @ w).to(hidden.dtype)  # (c, C)
            if grad_w is not None:  # accumulated in float32 over the chunks
                if dt == torch.float32:
                    grad_w.addmm_(p.t(), hidden_chunk)
                else:
                    grad_w += p.t() @ hidden_chunk
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None)


HEAD_KEEP_BYTES = 512 * 2**20  # HeadLogps keeps the softmax rows for backward up to this size, else recomputes
HEAD_CHUNK_BYTES = 256 * 2**20  # rows per HeadLogps chunk on a GPU: a (rows, V) float32 block of about this size


def head_chunk_rows(device, vocab_size):
    """head_logps's default rows per chunk on `device` (see there)."""
    return 256 if torch.device(device).type == "cpu" else max(256, HEAD_CHUNK_BYTES // (4 * vocab_size))


def head_logps(hidden, head, labels, chunk=None, keep_bytes=None):
    """log pi(label | hidden) for rows hidden (M, C) through the output head (an nn.Linear): (M,) float32.
    Chunked (HeadLogps) in blocks of `chunk` rows. Default: 256 rows on a CPU; on a GPU HEAD_CHUNK_BYTES of
    float32 logits (1,335 rows of a 50k vocabulary; at least 256): few chunks, so few kernel launches (on a
    CPU larger blocks cost memory and gained nothing). The softmax rows are kept for backward up
    to keep_bytes (default HEAD_KEEP_BYTES), recomputed beyond. float64 (tests) takes the plain path."""
    if hidden.dtype == torch.float64:
        return token_logps(head(hidden), labels)
    chunk = chunk or head_chunk_rows(hidden.device, head.weight.size(0))
    keep_bytes = HEAD_KEEP_BYTES if keep_bytes is None else keep_bytes
    if not (torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad)):
        keep_bytes = 0  # no backward will come: keep nothing
    return HeadLogps.apply(hidden, head.weight, head.bias, labels, chunk, keep_bytes)


# ----------------------------------------------------------------------------------------------
# The safetensors format, by hand: an 8-byte little-endian header length N, N bytes of JSON
# {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then raw


def logps(model, idx, target_mask, attention_mask=None, target_index=None):
    """Per-token log-probabilities log pi(idx[:, t] | idx[:, <t]) at the positions where target_mask
    is True, 0 elsewhere: (N, T) float32. target_mask (N, T) is aligned with idx (position 0 has no
    prediction and is ignored). The output head and log-softmax run only on the selected positions,
    not on prompt and padding tokens: with 50k-token vocabularies the head is most of the work.
    target_index: the same positions as flat indices into (N, T-1), if the caller has them (found on
    the CPU, a GPU need not wait for a boolean selection). Equal to token_logps(model(idx)[:, :-1],
    idx[:, 1:]) on the selected positions (tested)."""
    N, T = idx.shape
    hidden = model(idx, attention_mask=attention_mask, return_hidden=True)  # (N, T, C)
    if target_index is None:
        target_index = target_mask[:, 1:].reshape(-1).nonzero().squeeze(1)  # (M,) hidden t predicts token t+1
    lp = head_logps(hidden[:, :-1].flatten(0, 1)[target_index], model.lm_head,
                    idx[:, 1:].reshape(-1)[target_index])  # (M,) M = selected tokens
    out = torch.zeros(N * (T - 1), dtype=torch.float32, device=idx.device).index_copy(0, target_index, lp)
    return F.pad(out.view(N, T - 1), (1, 0))  # (N, T), 0 at position 0 and wherever nothing is scored


def compile_blocks(model):
    """torch.compile each block in place (regional compilation): every block runs the same code, so they
    share one compiled graph per input shape and compiling costs about one block's time. Parameter names,
    state_dict and checkpoints are unchanged."""
    for block in model.h:
        # the cache update runs eagerly between two compiled pieces of the block: the compiled code then
        # never reads the block's index (attn.layer), so every block shares one graph (no recompiles)
        block.attn.cached = torch.compiler.disable(block.attn.cached)
        block.compile()
    return model


def batch_logps(model, batch, average=False):
    """One concatenated forward of the 2B rows (chosen then rejected): log pi(y|x) per row, (2B,).
    The head runs on response positions only (logps); equal to sequence_logps(model(ids), ids, mask).
    A batch from collate_pairs(..., distinct=True) scores each distinct row once and maps it back."""
    if not isinstance(model, GPT):  # a LogpsModule, or DDP/FSDP around one: this function inside its forward()
        return model(batch, average)
    if "response_ids" in batch:  # a collate_shared batch: each prompt computed once
        return shared_prompt_logps(model, batch, average)
    token = logps(model, batch["input_ids"], batch["loss_mask"], target_index=batch["target_index"])  # (N, T)
    rows = token.sum(-1)  # (N,)
    if average:
        rows = rows / batch["loss_mask"].sum(-1).clamp(min=1)
    return rows[batch["row_index"]] if "row_index" in batch else rows  # (2B,)


class SharedPrompt:
    """Stands in for the KV cache in GPT.forward so that a prompt is computed once for every response that
    follows it (chosen and rejected, or all 4 IMDb samples), with gradients flowing through both passes.
    First pass (recording): each layer's prompt keys/values are kept. Second pass: each response row's
    keys/values are its prompt's, index-selected (row_prompt), followed by its own."""

    def __init__(self, row_prompt):
        self.row_prompt, self.k, self.v, self.pos, self.recording = row_prompt, [], [], 0, True

    def update(self, layer, k, v):  # k, v: (B, nh, T, hs)
        if self.recording:
            self.k.append(k)
            self.v.append(v)
            return k, v
        return (torch.cat([self.k[layer][self.row_prompt], k], dim=2),  # (N, nh, P+T, hs)
                torch.cat([self.v[layer][self.row_prompt], v], dim=2))


def collate_shared(items, pad_id=EOS):
    """Like collate_pairs(distinct=True), with each distinct prompt stored once:
        prompt_ids (B', P) right-padded, prompt_lens (B',); response_ids (N, R) right-padded,
        row_lens (N,), row_prompt (N,) the prompt of each distinct row; row_index (2B,) the distinct
        row of each pair row (chosen rows 0..B-1, then rejected rows B..2B-1); response_lens (2B,) as
        collate_pairs gives them; response_index (M,) the response tokens as flat indices into (N, R),
        found here on the CPU (as collate_pairs' target_index)."""
    prompts, rows, row_index = {}, {}, []
    for side in ("chosen_ids", "rejected_ids"):
        for it in items:
            p = prompts.setdefault(tuple(it["prompt_ids"]), len(prompts))
            row_index.append(rows.setdefault((p, tuple(it[side])), len(rows)))
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: the first response token would have nothing to be predicted from")
    def pad(seqs):
        out = torch.full((len(seqs), max(map(len, seqs))), pad_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            out[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        return out, torch.tensor([len(s) for s in seqs], dtype=torch.long)
    prompt_ids, prompt_lens = pad(list(prompts))
    response_ids, row_lens = pad([r for _, r in rows])
    row_index = torch.tensor(row_index, dtype=torch.long)
    response_index = (torch.arange(response_ids.size(1)) < row_lens[:, None]).view(-1).nonzero().squeeze(1)
    return {"prompt_ids": prompt_ids, "prompt_lens": prompt_lens, "response_ids": response_ids,
            "row_lens": row_lens, "response_lens": row_lens[row_index], "row_prompt": torch.tensor([p for p, _ in rows], dtype=torch.long),
            "row_index": row_index, "response_index": response_index}


def shares_prompt(cfg):
    """Whether training batches compute each prompt once: --share-prompt (default), except with
    --grad-checkpoint, whose recomputation cannot replay the shared keys and values (no-grad passes, which
    never checkpoint, share whenever --share-prompt is on)."""
    return cfg.share_prompt and not cfg.grad_checkpoint


SHARE_MIN_SAVING = 0.2  # --share-prompt shares only where that computes at least 20% fewer tokens


def worth_sharing(items):
    """Whether computing each distinct prompt once saves at least SHARE_MIN_SAVING of the tokens of these
    pairs. A shared forward runs every layer twice (the prompts, then the responses): on a GPU that is
    twice the kernel launches, so short prompts (IMDb's 2-8 tokens) are cheaper recomputed in each row;
    long ones (Anthropic HH, ~70% of the tokens) are shared. Decided once per run, from all its pairs:
    under torchrun every process must run the same passes (FSDP gathers parameters in each)."""
    rows = {(tuple(it["prompt_ids"]), tuple(it[side])) for it in items for side in ("chosen_ids", "rejected_ids")}
    full = sum(len(p) + len(r) for p, r in rows)
    shared = sum(len(p) for p in {p for p, _ in rows}) + sum(len(r) for _, r in rows)
    return shared <= (1 - SHARE_MIN_SAVING) * full


def make_batch(items, device, share_prompt=True, pad_id=EOS, count_tokens=False):
    """The tensors of one micro-batch on `device`: each prompt once (collate_shared, the default) or
    prompt+response rows (collate_pairs), distinct rows scored once either way; both give the same
    log-probs (tested). count_tokens: also return batch_tokens, counted on the CPU before the copy (no
    wait for the device)."""
    batch = collate_shared(items, pad_id) if share_prompt else collate_pairs(items, pad_id, distinct=True)
    on_device = {k: v.to(device) for k, v in batch.items()}
    return (on_device, batch_tokens(batch)) if count_tokens else on_device


def batch_tokens(batch):
    """Real tokens a micro-batch computes (each shared prompt counted once)."""
    if "response_ids" in batch:
        return int(batch["prompt_lens"].sum() + batch["row_lens"].sum())
    return int(batch["attention_mask"].sum())


def shared_prompt_logps(model, batch, average=False):
    """log pi(y|x) per pair row, (2B,), from a collate_shared batch: the prompts run once (B' rows), then
    the N distinct responses attend to their prompt's keys. Same result as batch_logps on the
    collate_pairs batch (tested); on Anthropic HH, where prompts are ~70% of the tokens, about a third
    less work. The head runs on response tokens only; the first one is predicted by the prompt's last
    hidden state."""
    prompt_ids, response_ids = batch["prompt_ids"], batch["response_ids"]  # (B', P), (N, R)
    row_prompt, device = batch["row_prompt"], prompt_ids.device
    prefix = SharedPrompt(row_prompt)
    hidden_prompt = model(prompt_ids, cache=prefix, return_hidden=True)  # (B', P, C) right padding: plain causal kernel
    last = hidden_prompt[torch.arange(len(hidden_prompt), device=device), batch["prompt_lens"] - 1]  # (B', C)
    prefix.recording = False
    P, R = prompt_ids.size(1), response_ids.size(1)
    prompt_mask = torch.arange(P, device=device) < batch["prompt_lens"][:, None]  # (B', P)
    response_mask = torch.arange(R, device=device) < batch["row_lens"][:, None]  # (N, R)
    mask = torch.cat([prompt_mask[row_prompt], response_mask], 1)  # (N, P+R) padded prompt keys are masked
    hidden_response = model(response_ids, attention_mask=mask, cache=prefix, return_hidden=True)  # (N, R, C)
    hidden = torch.cat([last[row_prompt, None], hidden_response[:, :-1]], 1)  # (N, R, C): position j predicts token j
    index = batch["response_index"]  # (M,) flat positions of the response tokens (found on the CPU: no device wait)
    lp = head_logps(hidden.flatten(0, 1)[index], model.lm_head, response_ids.view(-1)[index])  # (M,)
    rows = torch.div(index, R, rounding_mode="floor")  # (M,) the row of each scored token
    logps = torch.zeros(len(response_ids), dtype=lp.dtype, device=device).index_add(0, rows, lp)  # (N,)
    if average:
        logps = logps / batch["row_lens"].clamp(min=1)
    return logps[batch["row_index"]]  # (2B,)


@torch.no_grad()
def reference_logps(reference, items, micro_batch_size, device, dtype="float32", average=False, show=True,
                    share_prompt=True, pad_id=EOS):
    """Reference log-probs of every pair, (P, 2) [chosen, rejected]: one pass, so that a training run
    (or every run of a beta sweep) needs no reference model in memory. show=False: no progress line."""
    if not items:  # no pairs (an empty held-out split): nothing to batch
        return torch.zeros(0, 2)
    reference.eval()
    out = torch.zeros(len(items), 2)  # (P, 2)
    bar = Progress(len(items), label="reference log-probs", unit="pairs", stream=None if show else io.StringIO())
    for mb in micro_batches(items, range(len(items)), micro_batch_size):  # similar lengths together
        batch = make_batch([items[i] for i in mb], device, share_prompt, pad_id)
        with autocast(device, dtype):
            lp = batch_logps(reference, batch, average).float()  # (2B,)
        out[mb] = torch.stack(lp.chunk(2), dim=1).cpu()  # (B, 2)
        bar.update(len(mb))
    bar.close()
    return out


def pair_length(it):
    """Tokens in the longer row of a pair: its padded length in a batch."""
    return len(it["prompt_ids"]) + max(len(it["chosen_ids"]), len(it["rejected_ids"]))


def micro_batches(items, idx, micro_batch_size):
    """Splits the pairs idx of one step into micro-batches of similar length (longest first), so that
    variable-length data (HH) pads little: a micro-batch pads to its longest row. The step's gradient
    is a sum over its pairs, so the split changes nothing but the padding. Pairs of one "group" (the
    samples of one prompt) stay together, so their shared rows are still scored once."""
    if micro_batch_size >= len(idx):
        return [list(idx)]
    key = {}
    for i in idx:  # a group sorts by its longest pair
        g = items[i].get("group", ("pair", i))
        key[g] = max(key.get(g, 0), pair_length(items[i]))
    order = sorted(idx, key=lambda i: (-key[items[i].get("group", ("pair", i))], str(items[i].get("group", i))))
    return [order[m:m + micro_batch_size] for m in range(0, len(order), micro_batch_size)]
