"""Supervised training: a small GPT from scratch (or a pretrained one) on IMDb reviews, and the two
supervised preference baselines of the paper, Preferred-FT and Unlikelihood.

    TIKTOKEN_CACHE_DIR=../shared/tiktoken DPO_IMDB=../shared/data/aclImdb_v1.tar.gz \\
        python sft.py --out runs/sft --init scratch --tokens 600000

The IMDb experiment of arXiv:2305.18290 (Section 6.1) starts from GPT-2-large fine-tuned on IMDb
reviews; the CPU preset trains a small GPT from scratch instead (`scratch_config`). Either way the
model learns to continue a review from its first tokens: every review is preceded by EOS, which marks
a review's start, and the experiment's prompts start with EOS too.

Losses (all log-probs come from model.GPT.logps, which runs the output head only where needed):
    language modelling  L = mean_{n,t>=1} -log pi(x_{n,t} | x_{n,<t})                   (train_lm)
    Preferred-FT        L = mean_i -log pi(y_i | x_i)                                   (objective "nll")
    Unlikelihood        L = mean_i -[log pi(y_w | x) + alpha * sum_t log(1 - pi(y_l,t | x, y_l,<t))]
Sequence log-probs are SUMS over completion tokens (the authors' convention, as in dpo.py).

Shape notation: N rows in a batch, T time, V vocabulary.
"""
import dataclasses
import json
import math
import os
import sys
import time

import torch

import data
from data import InputError
from machinery.fast import keep_freed_memory, logps
from machinery.hf import from_pretrained, save_pretrained
from machinery.hub import imdb_path
from machinery.util import Progress, field
from machinery.util import parse_args as util_parse_args
from model import GPT, GPTConfig


# ----------------------------------------------------------------------------------------------
# Data: one token stream of reviews, each preceded by EOS

def review_tokens(reviews):
    """[EOS] review_1 [EOS] review_2 ... as one 1-D int64 tensor. `reviews` are read_imdb dicts or strings.
    EOS marks the START of each review (it is also GPT-2's document separator), so a model trained on
    this stream continues a prompt that begins with EOS as the beginning of a review."""
    ids = []
    for r in reviews:
        ids.append(data.EOS)
        ids.extend(data.encode(r["text"] if isinstance(r, dict) else r))
    return torch.tensor(ids, dtype=torch.long)


def random_windows(tokens, batch_size, seq_len, generator=None):
    """batch_size random windows of seq_len consecutive tokens of the stream: (N, T) int64."""
    if len(tokens) < seq_len:
        raise ValueError(f"the token stream has {len(tokens)} tokens, fewer than seq_len {seq_len}")
    starts = torch.randint(0, len(tokens) - seq_len + 1, (batch_size,), generator=generator)  # (N,)
    return tokens[starts[:, None] + torch.arange(seq_len)]  # (N, T)


def scratch_config():
    """The GPT of the CPU preset: 4 blocks, 128 channels, 4 heads, 128 positions, 13.7M parameters (12.9M
    of them the two 50,257 x 128 embeddings). The output head dominates the cost: V*C = 6.4M multiply-adds
    per token against ~0.8M for the four blocks, plus the log-softmax over V: width is expensive and depth
    cheap (the measurements are in the README). The head is untied from the input embedding so that
    it can carry a bias unit (init_unigram_bias): GPT-2's checkpoint layout has no head bias, but an
    untied lm_head.weight it has, so save_pretrained/from_pretrained keep working."""
    return GPTConfig(vocab_size=50257, block_size=128, n_layer=4, n_head=4, n_embd=128, tie_word_embeddings=False)


def init_unigram_bias(model, tokens):
    """Start a scratch model at the unigram distribution: a constant "bias unit" in the last hidden state
    (ln_f channel 0: weight 0, bias 1) whose head column holds the log unigram frequencies (add-one
    smoothed, centred). Its initial logits are then log p(token) + noise, i.e. the unigram model
    (loss ~7.5 instead of log V = 10.8), and training starts from there. Every weight stays trainable."""
    if model.config.tie_word_embeddings:
        raise ValueError("init_unigram_bias needs an untied head (GPTConfig(tie_word_embeddings=False)): a tied "
                         "head would also put the log frequencies into the input embedding")
    V = model.config.vocab_size
    counts = torch.bincount(tokens, minlength=V)[:V].double() + 1.0  # (V,)
    logp = (counts / counts.sum()).log()
    with torch.no_grad():
        model.ln_f.weight[0] = 0.0
        model.ln_f.bias[0] = 1.0
        model.lm_head.weight[:, 0] = (logp - logp.mean()).float()


# ----------------------------------------------------------------------------------------------
# Optimiser, schedule, logging, memory

def log_line(bar, log, line):
    """Print a log line above the progress line (clear the progress line first, it is redrawn next update)."""
    bar.stream.write("\r\033[K")
    bar.stream.flush()
    log(line)


def make_optimizer(model, lr, weight_decay):
    """AdamW (betas 0.9/0.95, fused: one kernel for all tensors) with weight decay on matrices and
    embeddings only, not on biases and LayerNorm gains (nanoGPT's configure_optimizers)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = params[0].device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=fused)


def lr_at(step, steps, lr, warmup, final_frac=0.1):
    """Linear warmup over `warmup` steps, then cosine decay to final_frac * lr at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - 1 - warmup)
    return lr * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# ----------------------------------------------------------------------------------------------
# Language modelling on the review stream

def lm_loss(model, windows):
    """Next-token cross-entropy of windows (N, T), averaged over the N*(T-1) predicted tokens:
        L = mean_{n, t>=1} -log pi(x_{n,t} | x_{n,<t})  ==  F.cross_entropy(logits[:, :-1], x[:, 1:])
    Position 0 has no prediction, so target_mask is False there."""
    target_mask = torch.ones_like(windows, dtype=torch.bool)  # (N, T)
    target_mask[:, 0] = False
    return -logps(model, windows, target_mask)[:, 1:].mean()


@torch.no_grad()
def eval_lm(model, tokens, seq_len=128, n_windows=64, batch_size=16):
    """Held-out loss: lm_loss over n_windows non-overlapping windows spread evenly over the stream
    (deterministic, so two models are compared on the same tokens)."""
    n_windows = max(1, min(n_windows, len(tokens) // seq_len))
    starts = torch.linspace(0, len(tokens) - seq_len, n_windows).long()  # (n_windows,)
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, n_windows, batch_size):
        windows = tokens[starts[i:i + batch_size, None] + torch.arange(seq_len)]  # (N, T)
        total += lm_loss(model, windows.to(model.wte.weight.device)).item() * len(windows)
    model.train(was_training)
    return total / n_windows


def optimizer_step(model, opt, loss, max_norm=1.0):
    """Backward, clip the gradient norm, step; returns the loss as a float."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    opt.step()
    return loss.item()


def train_lm(model, tokens, steps, batch_size=16, seq_len=128, lr=5e-3, warmup=30, weight_decay=0.1,
             generator=None, log=print, log_every=None, checkpoints=None):
    """Language modelling on random windows of a token stream: AdamW, linear warmup then cosine decay
    to 10% of lr, gradient clipping at norm 1.0. A progress line shows loss and ETA; `log` gets one
    line every log_every steps (default: 10 lines per run). checkpoints (machinery.stages.Checkpoints), if
    given, saves the run along the way and resumes it from the newest one. Returns the per-step losses."""
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    device = model.wte.weight.device
    log_every = log_every or max(1, steps // 10)
    opt = make_optimizer(model, lr, weight_decay)
    model.train()
    start, saved = checkpoints.resume(model, opt, [generator]) if checkpoints else (0, {})
    losses, t0 = saved.get("losses", []), time.time()
    bar = Progress(steps - start, label="sft", unit="step")
    for step in range(start, steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        windows = random_windows(tokens, batch_size, seq_len, generator).to(device)  # (N, T)
        loss = lm_loss(model, windows)
        losses.append(optimizer_step(model, opt, loss))
        bar.update(1, extra=f"loss {losses[-1]:.3f}")
        if checkpoints:
            checkpoints.maybe_save(step + 1, model, opt, [generator], losses=losses)
        if (step + 1) % log_every == 0 or step + 1 == steps:
            dt = time.time() - t0
            recent = sum(losses[-log_every:]) / len(losses[-log_every:])
            log_line(bar, log, f"step {step + 1}/{steps} | loss {recent:.4f} | lr {opt.param_groups[0]['lr']:.2e} | "
                               f"{batch_size * seq_len * (step + 1 - start) / dt:.0f} tok/s")
    bar.close()
    return losses


# ----------------------------------------------------------------------------------------------
# (prompt, completion) training: Preferred-FT and Unlikelihood

def completion_batch(prompts, completions, device="cpu"):
    """Rows prompt + completion, left-padded by data.left_pad with id 0 (masked; 0 exists in every vocabulary,
    unlike EOS in a test model); the completion is each row's END.
    Returns input_ids (N, T), attention_mask (N, T) and target_mask (N, T), True exactly on completion
    tokens (the tokens that are scored). Padding is masked and position ids count real tokens only, so a
    padded row gets the same log-probs as the unpadded one."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: the first completion token needs a token before it (start prompts with EOS)")
    input_ids, attention_mask = data.left_pad([list(p) + list(c) for p, c in zip(prompts, completions)], pad_id=0)  # (N, T)
    target_mask = torch.zeros_like(input_ids, dtype=torch.bool)  # (N, T)
    for i, c in enumerate(completions):
        if len(c):
            target_mask[i, -len(c):] = True
    return input_ids.to(device), attention_mask.to(device), target_mask.to(device)


def completion_token_logps(model, prompts, completions):
    """Per-token log pi(y_t | x, y_<t) on the completion tokens, 0 elsewhere: (N, T), and the mask (N, T)."""
    input_ids, attention_mask, target_mask = completion_batch(prompts, completions, model.wte.weight.device)
    return logps(model, input_ids, target_mask, attention_mask), target_mask


def log1m_exp(logp, eps=1e-6):
    """log(1 - exp(logp)) for log-probs logp <= 0, computed stably (Maechler 2012): log(-expm1(logp)) near 0,
    log1p(-exp(logp)) below -log 2. logp is first clamped to <= log(1 - eps), so p = 1 gives log(eps)
    (about -13.8), never -inf; the clamped entries then get no gradient."""
    x = logp.clamp(max=math.log1p(-eps))
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def sequence_loss(model, prompts, completions, objective="nll", rejected=None, alpha=1.0):
    """The supervised preference baselines of arXiv:2305.18290 (Section 6), for one batch of B prompts.

    Args:
        prompts:     B token lists x_i (non-empty; start with EOS)
        completions: B token lists y_w,i, the preferred completions
        rejected:    B token lists y_l,i (objective "unlikelihood" only)
    "nll" (Preferred-FT: supervised fine-tuning on the chosen completions):
        (1) L = mean_i -log pi(y_w,i | x_i),   log pi(y|x) = sum_t log pi(y_t | x, y_<t)
    "unlikelihood" (Welleck et al. 2019, as the paper's Unlikelihood baseline):
        (2) U_i = sum_t log(1 - pi(y_l,i,t | x_i, y_l,i,<t))      token-wise, over the rejected completion
        (3) L = mean_i -[log pi(y_w,i | x_i) + alpha * U_i]
    Returns (loss, stats) with stats {"chosen_logps", "rejected_logps" (or None)} as (B,) detached tensors.
    """
    if objective not in ("nll", "unlikelihood"):
        raise ValueError(f"objective must be 'nll' or 'unlikelihood', not {objective!r}")
    if objective == "unlikelihood" and (rejected is None or len(rejected) != len(prompts)):
        raise ValueError("objective 'unlikelihood' needs one rejected completion per prompt")
    B = len(prompts)
    rows = list(zip(prompts, completions)) + (list(zip(prompts, rejected)) if objective == "unlikelihood" else [])
    # each distinct (prompt, completion) is scored once and indexed back (the 6 pairs of 4 IMDb samples
    # hold 3 distinct chosen and 4 distinct rows in all); indexing sums the gradients of the copies
    seen = {}
    index = torch.tensor([seen.setdefault((tuple(p), tuple(c)), len(seen)) for p, c in rows])  # (B or 2B,)
    logps, mask = completion_token_logps(model, [list(p) for p, _ in seen], [list(c) for _, c in seen])  # (N, T)
    seq = (logps * mask).sum(-1)  # (N,) log pi(y|x) of each distinct row
    chosen_logps = seq[index[:B]]  # (B,)
    if objective == "nll":
        return -chosen_logps.mean(), {"chosen_logps": chosen_logps.detach(), "rejected_logps": None}  # (1)
    unlikelihood = (log1m_exp(logps) * mask).sum(-1)[index[B:]]  # (B,)  (2)
    loss = -(chosen_logps + alpha * unlikelihood).mean()  # (3)
    return loss, {"chosen_logps": chosen_logps.detach(), "rejected_logps": seq[index[B:]].detach()}


def train_sequences(model, prompts, completions, steps=None, epochs=None, batch_size=16, lr=1e-4,
                    objective="nll", rejected=None, alpha=1.0, warmup=10, weight_decay=0.0,
                    generator=None, log=print, log_every=None, groups=None, callback=None, checkpoints=None):
    """Supervised training on (prompt, completion) token lists; the loss counts completion tokens only
    (sequence_loss). Give `steps` or `epochs` (batches are drawn without replacement, reshuffled every
    epoch with `generator`; with `groups`, one label per example, examples of one group stay together, as
    DPO's batches keep the pairs of one prompt together). AdamW, linear warmup to a constant lr, gradient
    clipping at norm 1.0, as the authors' trainer does for DPO, so that the baselines and DPO differ only
    in the loss. callback(step, model), if given, runs after every step (1-based); checkpoints
    (machinery.stages.Checkpoints), if given, saves the run at its steps and resumes from the newest.
    Returns the per-step losses."""
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps and epochs")
    if not prompts:
        raise ValueError("no training examples")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    per_epoch = math.ceil(len(prompts) / batch_size)
    steps = steps if steps is not None else epochs * per_epoch
    log_every = log_every or max(1, steps // 10)
    opt = make_optimizer(model, lr, weight_decay)
    model.train()
    start, saved = checkpoints.resume(model, opt, [generator]) if checkpoints else (0, {})
    losses, order, t0 = saved.get("losses", []), saved.get("order", []), time.time()
    bar = Progress(steps - start, label=objective, unit="step")
    for step in range(start, steps):
        if not order:
            order = data.epoch_order([{"group": g} for g in groups] if groups is not None else prompts, generator)
        idx, order = order[:batch_size], order[batch_size:]
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / max(1, warmup))
        loss, stats = sequence_loss(model, [prompts[i] for i in idx], [completions[i] for i in idx], objective,
                                    None if rejected is None else [rejected[i] for i in idx], alpha)
        losses.append(optimizer_step(model, opt, loss))
        bar.update(1, extra=f"loss {losses[-1]:.3f}")
        if callback:
            callback(step + 1, model)
        if checkpoints:
            checkpoints.maybe_save(step + 1, model, opt, [generator], losses=losses, order=order)
        if (step + 1) % log_every == 0 or step + 1 == steps:
            recent = sum(losses[-log_every:]) / len(losses[-log_every:])
            extra = "" if stats["rejected_logps"] is None else f" | rejected logp {stats['rejected_logps'].mean():.2f}"
            log_line(bar, log, f"step {step + 1}/{steps} | loss {recent:.4f} | chosen logp "
                               f"{stats['chosen_logps'].mean():.2f}{extra} | {(time.time() - t0) / (step + 1 - start) * 1000:.0f} ms/step")
    bar.close()
    return losses


# ----------------------------------------------------------------------------------------------
# Command line: train on IMDb train reviews, report the loss on test reviews, save

@dataclasses.dataclass
class TrainConfig:
    out: str = field("runs/sft", "folder for the checkpoint (Hugging Face layout), config and metrics")
    init: str = field("scratch", "'scratch' for the small CPU GPT (scratch_config), or a hub name (gpt2, gpt2-large) "
                      "or folder")
    tokens: int = field(600_000, "training tokens (steps = tokens / (batch_size * seq_len)); ~5 min on 2 cores "
                        "for scratch")
    batch_size: int = field(16, "windows per step")
    seq_len: int = field(128, "tokens per window")
    lr: float = field(5e-3, "peak learning rate (for scratch; use ~1e-4 to fine-tune GPT-2)")
    warmup: int = field(30, "linear warmup steps before the cosine decay")
    weight_decay: float = field(0.1, "AdamW weight decay on matrices")
    eval_windows: int = field(128, "test-review windows for the held-out loss")
    imdb: str = field(None, "IMDb archive or extracted folder (default: $DPO_IMDB, else download)")
    device: str = field(None, "cpu, cuda or mps (default: the best available)")
    seed: int = field(0, "seed for initialisation and window sampling")


def parse_args(argv=None):
    """TrainConfig from the command line (argv=None reads sys.argv)."""
    return util_parse_args(TrainConfig, argv, __doc__.split("\n")[0])


def default_device():
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def main(argv=None):
    cfg = parse_args(argv)
    try:
        run(cfg)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def run(cfg):
    """Train on IMDb train reviews, report the held-out loss on test reviews, save to cfg.out."""
    torch.manual_seed(cfg.seed)
    keep_freed_memory()
    device = cfg.device or default_device()
    print(json.dumps(dataclasses.asdict(cfg)))
    t0 = time.time()
    train_tokens = review_tokens(data.read_imdb("train", imdb_path(cfg.imdb)))
    test_tokens = review_tokens(data.read_imdb("test", imdb_path(cfg.imdb)))
    print(f"IMDb: {len(train_tokens):,} train tokens, {len(test_tokens):,} test tokens ({time.time() - t0:.0f} s)")
    if cfg.init == "scratch":
        model = GPT(scratch_config()).to(device)
        init_unigram_bias(model, train_tokens)
    else:
        model = from_pretrained(cfg.init, device=device)
    if cfg.seq_len > model.config.block_size:
        raise InputError(f"--seq-len {cfg.seq_len} exceeds the model's block_size {model.config.block_size}")
    steps = max(1, cfg.tokens // (cfg.batch_size * cfg.seq_len))
    print(f"model: {model.num_params() / 1e6:.1f}M parameters, {model.config}; {steps} steps")
    print(f"held-out loss before training: {eval_lm(model, test_tokens, cfg.seq_len, cfg.eval_windows):.4f}")
    t0 = time.time()
    generator = torch.Generator().manual_seed(cfg.seed)
    losses = train_lm(model, train_tokens, steps, cfg.batch_size, cfg.seq_len, cfg.lr, cfg.warmup,
                      cfg.weight_decay, generator)
    train_s = time.time() - t0
    test_loss = eval_lm(model, test_tokens, cfg.seq_len, cfg.eval_windows)
    print(f"held-out loss on test reviews: {test_loss:.4f} (perplexity {math.exp(test_loss):.0f}) | "
          f"{train_s:.0f} s, {steps * cfg.batch_size * cfg.seq_len / train_s:.0f} tok/s")
    save_pretrained(model, cfg.out)
    with open(os.path.join(cfg.out, "train_config.json"), "w") as f:
        json.dump({**dataclasses.asdict(cfg), "steps": steps, "test_loss": test_loss, "train_seconds": train_s}, f, indent=2)
    with open(os.path.join(cfg.out, "metrics.jsonl"), "w") as f:
        for step, loss in enumerate(losses, 1):
            f.write(json.dumps({"step": step, "loss": loss}) + "\n")
    print(f"saved {cfg.out}")


if __name__ == "__main__":
    sys.exit(main())
