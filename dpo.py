"""Direct Preference Optimization (Rafailov et al. 2023, arXiv:2305.18290): the derivation, the losses
and their hand-written gradients, then the trainer.

    python dpo.py --task hh --model gpt2                  # DPO on Anthropic HH (paper defaults)
    python dpo.py --task imdb                             # the paper's IMDb experiment, end to end
    python dpo.py --task hh --model EleutherAI/pythia-2.8b --weights-dtype bfloat16 --precompute-ref --grad-checkpoint
    torchrun --nproc_per_node=8 dpo.py --task hh --model EleutherAI/gpt-j-6b --fsdp --precompute-ref --grad-checkpoint
    python dpo.py --estimate-memory --model EleutherAI/gpt-j-6b --lora-rank 16   # the memory plan, nothing loaded
    python -m pytest -q test_dpo.py                       # checks every formula below against autograd

Shape notation
    B    preference pairs in a batch
    T    time: tokens per row (prompt + response + padding)
    V    vocabulary size
    N    rows of a batch; N = 2B when chosen and rejected are stacked: rows 0..B-1 chosen, B..2B-1 rejected

Derivation (plain-text math; the code lines that implement a step are tagged `# (n)`)

(1) KL-constrained reward maximisation, for each prompt x:
        max_pi  E_{y ~ pi(.|x)}[ r(x,y) ] - beta * KL( pi(.|x) || pi_ref(.|x) )
    pi_ref is the SFT model; beta > 0 sets how far pi may move away from it.
(2) Its optimal policy, in closed form:
        pi_r(y|x) = pi_ref(y|x) * exp(r(x,y) / beta) / Z(x),    Z(x) = sum_y pi_ref(y|x) exp(r(x,y) / beta)
    because the objective in (1) equals -beta * KL(pi || pi_r) + beta * log Z(x), largest at pi = pi_r.
(3) Take the log of (2) and solve for the reward:
        r(x,y) = beta * log pi_r(y|x)/pi_ref(y|x) + beta * log Z(x)
    Every policy pi therefore defines an implicit reward rhat(x,y) = beta * log pi(y|x)/pi_ref(y|x)
    (the chosen_rewards and rejected_rewards returned by preference_loss).
(4) Bradley-Terry: p(y_w > y_l | x) = sigmoid(r(x,y_w) - r(x,y_l)). Substituting (3), the two
    beta * log Z(x) terms cancel (same x), so the intractable Z(x) is never computed:
        p(y_w > y_l | x) = sigmoid(rhat_w - rhat_l) = sigmoid(beta * h)
        h = [log pi(y_w|x) - log pi(y_l|x)] - [log pi_ref(y_w|x) - log pi_ref(y_l|x)] = pi_logratios - ref_logratios
(5) Maximum likelihood of the preference data is the DPO loss (Eq. 7):
        L = -E log sigmoid( beta log pi(y_w|x)/pi_ref(y_w|x) - beta log pi(y_l|x)/pi_ref(y_l|x) )
          = mean_i -log sigmoid(beta * h_i)
(6) Gradient. d/du[-log sigmoid(u)] = -sigmoid(-u) with u = beta * h = rhat_w - rhat_l, so over a batch
        dL/dh_i = -(beta/B) * sigmoid(-beta h_i) = dL/dlog pi(y_w) = -dL/dlog pi(y_l)
        grad L  = -beta * E[ sigmoid(rhat_l - rhat_w) * (grad log pi(y_w|x) - grad log pi(y_l|x)) ]
    The weight sigmoid(rhat_l - rhat_w) is near 1 when the implicit reward misranks the pair and near 0
    when it already ranks it right by a wide margin: misranked pairs weigh more. The paper reports that
    without this weight (unlikelihood on y_l, likelihood on y_w) the model degenerates.
    Appendix A.4 (Eqs. 21-22) of at least one arXiv version of the paper prints this gradient with y_w and
    y_l swapped (eric-mitchell/direct-preference-optimization issues #60, #63). The sign here is the main
    text's, and test_dpo.py checks it against autograd.
(7) Through the sequence log-prob log pi(y|x) = sum_t mask_t * log softmax(z_t)[y_t], where z_t are the
    logits that predict y_t (in code: logits[:, t-1] predicts labels[:, t]):
        d log pi(y|x) / d z_{t,v} = mask_t * (onehot(y_t)_v - softmax(z_t)_v)
    and the chain rule gives dL/dz_{t,v} = dL/dlog pi(y|x) * mask_t * (onehot(y_t)_v - softmax(z_t)_v).

Why chosen log-probs often fall while the margin grows
    This is expected, not a bug. (a) L sees the log-probs only through h, a difference of log-ratios:
    log pi(y_w) and log pi(y_l) may both fall as long as log pi(y_l) falls faster. (b) Probability sums
    to 1 over all sequences, not over the pair: mass taken from y_l (and y_w) moves to sequences outside
    the pair, often ones no example shows. (c) y_w and y_l share the prompt, most tokens and every
    parameter: pushing the rejected sequence down also pushes down the similar chosen one, and raising
    log pi(y_w) through the softmax normaliser lowers every other token at that position (Razin et al.
    2024 call the net effect likelihood displacement). (d) With summed log-probs, long responses have the
    largest log-ratios and dominate the gradient. Watch rewards/margins and rewards/accuracies: they must
    rise. If the chosen likelihood itself matters, add the NLL term (rpo_alpha > 0, RPO) or length-normalise.

Conventions (where public implementations differ)
    - Sequence log-probs are SUMS over response tokens and rewards are scaled by beta, as in the authors'
      code (eric-mitchell `_get_batch_logps`, `preference_loss`); rasbt's notebook averages and reports
      unscaled rewards. sequence_logps(average=True) gives the per-token average.
    - The log-softmax runs in float32 whatever the dtype of the logits (model.token_logps).
    - The margin is `h`, not `logits` as in eric-mitchell, to keep it apart from the model's logits.
    - reference_free=True replaces pi_ref by a constant: log pi_ref(y|x) = 0 for every y (the authors'
      "reference-free" option). Unlike their code, our rewards then are beta * log pi too, so that
      rewards/margins and accuracies describe the loss actually optimised.
"""
import argparse
import contextlib
import copy
import dataclasses
import gc
import io
import json
import math
import os
import shutil
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from data import EOS, epoch_order, hub_file, load_tokenizer, read_hh, read_jsonl_pairs, tokenize_pair
from machinery import imdb, memory
from machinery.fast import (batch_logps, batch_tokens, compile_blocks, keep_freed_memory, make_batch, micro_batches,
                            reference_logps, shares_prompt, worth_sharing, SHARE_MIN_SAVING)
from machinery.hf import load_model, save_pretrained
from machinery.hub import resolve_checkpoint
from machinery.lora import (add_lora, load_lora_state_dict, lora_disabled, lora_merged, lora_state_dict,
                            train_only_head)
from machinery.safetensors import load_safetensors, save_safetensors
from machinery.util import InputError, autocast, field, pick_device
from machinery.util import parse_args as util_parse_args
from model import GPT, token_logps

LOSS_TYPES = ("dpo", "cdpo", "robust", "ipo", "hinge", "lndpo", "simpo")


def sequence_logps(logits, labels, loss_mask, average=False):
    """log pi(y|x): the sum (or mean) of the log-probs of the response tokens of each row.

    Args:
        logits: (N, T, V) model output for input ids `labels`, any float dtype.
        labels: (N, T) int64 input ids. Ids at masked positions are ignored (they may be -100).
        loss_mask: (N, T) bool aligned with labels, True on response tokens.
        average: False sums over tokens (the paper; our default). True divides by the number of response
            tokens: the length-normalised log-prob (lndpo, simpo, TRL's IPO).
    Returns:
        (N,) float32. A row without response tokens gets 0, with average=True as well (the count is
        clamped to >= 1 rather than giving 0/0 = NaN); callers must not feed empty responses, and
        data.py guarantees at least one response token.
    """
    mask = loss_mask[:, 1:]                                    # (N, T-1) mask_t
    targets = labels[:, 1:].masked_fill(~mask, 0)              # (N, T-1) y_t; dummy id 0 where masked
    logps = token_logps(logits[:, :-1], targets)               # (N, T-1) (7) logits[:, t-1] predict y_t
    total = torch.where(mask, logps, 0.0).sum(-1)              # (N,)     (7) sum_t mask_t log softmax(z_t)[y_t]
    return total / mask.sum(-1).clamp(min=1) if average else total


def sequence_logps_grad(logits, labels, loss_mask, dlogps, average=False):
    """Closed-form gradient of sum_i dlogps_i * sequence_logps(logits, labels, loss_mask, average)_i
    with respect to logits, step (7):

        grad[:, t-1, v] = dlogps * mask_t * (onehot(labels_t)_v - softmax(logits_{t-1})_v)  (/ count if average)
        grad[:, T-1, :] = 0          (the last position predicts no label)

    Args:
        logits: (N, T, V); labels, loss_mask: (N, T), as for sequence_logps.
        dlogps: (N,) upstream gradient dL/dlog pi(y|x) per row, e.g. from preference_loss_grad.
    Returns:
        (N, T, V) float32, or float64 for float64 logits (so that the tests can check it to 1e-10).
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    mask = loss_mask[:, 1:]                                    # (N, T-1)
    targets = labels[:, 1:].masked_fill(~mask, 0)              # (N, T-1)
    scale = dlogps.to(dtype)                                   # (N,)
    if average:
        scale = scale / mask.sum(-1).clamp(min=1)
    probs = torch.softmax(logits[:, :-1].to(dtype), dim=-1)    # (N, T-1, V)
    onehot = F.one_hot(targets, logits.size(-1)).to(dtype)     # (N, T-1, V)
    grad = (onehot - probs) * (mask * scale[:, None])[..., None]  # (N, T-1, V) (7)
    return F.pad(grad, (0, 0, 0, 1))                           # (N, T, V)


def _margin(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
            beta, loss_type, label_smoothing, reference_free, gamma, chosen_lengths, rejected_lengths, rpo_alpha):
    """Check the options shared by preference_loss and preference_loss_grad, and compute the margin.

    Returns h (B,), chosen_rewards (B,), rejected_rewards (B,), and the factors dh/dlogp needs:
    sc, sr (1/|y| for the length-normalised losses, else 1.0) and use_ref (False: log pi_ref := 0)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if label_smoothing and loss_type not in ("cdpo", "robust"):
        raise ValueError(f"label_smoothing is used by loss_type 'cdpo' or 'robust', not {loss_type!r}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}: it is the probability "
                         f"that a label is flipped, and 'robust' divides by 1 - 2 * label_smoothing")
    if gamma and loss_type != "simpo":
        raise ValueError(f"gamma is the target margin of loss_type 'simpo', not of {loss_type!r}")
    if rpo_alpha < 0:
        raise ValueError(f"rpo_alpha must be >= 0, got {rpo_alpha}")
    normalise = loss_type in ("lndpo", "simpo")
    if normalise and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(f"loss_type {loss_type!r} needs chosen_lengths and rejected_lengths (response tokens)")
    dtype = policy_chosen_logps.dtype
    sc = 1.0 / chosen_lengths.to(dtype) if normalise else 1.0          # (B,) or 1.0
    sr = 1.0 / rejected_lengths.to(dtype) if normalise else 1.0        # (B,) or 1.0
    use_ref = not (reference_free or loss_type == "simpo")
    ref_c, ref_r = (reference_chosen_logps, reference_rejected_logps) if use_ref else (0.0, 0.0)
    pi_logratios = sc * policy_chosen_logps - sr * policy_rejected_logps   # (B,)
    ref_logratios = sc * ref_c - sr * ref_r                                # (B,) or 0.0
    h = pi_logratios - ref_logratios                                       # (B,) (4)
    chosen_rewards = (beta * sc * (policy_chosen_logps - ref_c)).detach()      # (B,) (3) rhat_w
    rejected_rewards = (beta * sr * (policy_rejected_logps - ref_r)).detach()  # (B,) (3) rhat_l
    return h, chosen_rewards, rejected_rewards, sc, sr, use_ref


def preference_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                    beta=0.1, loss_type="dpo", label_smoothing=0.0, reference_free=False, gamma=0.0,
                    chosen_lengths=None, rejected_lengths=None, rpo_alpha=0.0, policy_chosen_nll=None):
    """Per-pair preference loss. With h = pi_logratios - ref_logratios, u = beta * h - gamma, eps = label_smoothing:

        dpo     -log sigmoid(u)                                        Eq. 7 of arXiv:2305.18290
        cdpo    -(1-eps) log sigmoid(u) - eps log sigmoid(-u)          conservative DPO, Eq. 3 of
                    Mitchell 2023 (ericmitchell.ai/cdpo.pdf): the expected DPO loss when each label is
                    flipped with probability eps. Its optimum is finite: sigmoid(u) = 1 - eps.
        robust  (-(1-eps) log sigmoid(u) + eps log sigmoid(-u)) / (1 - 2 eps)
                    provably robust DPO, Chowdhury et al. 2024 (arXiv:2403.00409): an unbiased estimate of
                    the clean DPO loss under flips, (1-eps) robust(h) + eps robust(-h) = dpo(h). It differs
                    from cdpo by the SIGN of the eps term (and the 1/(1-2 eps) factor); libraries that expose
                    one `label_smoothing` for both are the origin of the confusion between them. eps < 0.5.
        ipo     (h - 1/(2 beta))^2                                     Eq. 17 of Azar et al. 2023
                    (arXiv:2310.12036). IPO takes whatever log-probs it is given. We pass SUMMED log-probs,
                    as the authors' DPO code does, because the IPO paper defines h on sequence
                    log-likelihood ratios; TRL divides by the response length: pass
                    sequence_logps(average=True) to get that variant.
        hinge   relu(1 - u)                                            SLiC-HF, Zhao et al. 2023
                    (arXiv:2305.10425), with the reference log-ratio as in TRL; margin 1/beta on h.
        lndpo   dpo on length-normalised log-probs: policy AND reference logps divided by chosen_lengths /
                    rejected_lengths (required).
        simpo   -log sigmoid(beta (pi_w/|y_w| - pi_l/|y_l|) - gamma)    SimPO, Meng et al. 2024
                    (arXiv:2405.14734): reference-free, length-normalised (lengths required). The paper uses
                    beta around 2.0-2.5 and gamma around 0.5-1.5, not this function's defaults.

    reference_free=True (any type): log pi_ref := 0, so ref_logratios = 0, as the authors' reference-free DPO.
    RPO (Pang et al. 2024, arXiv:2404.19733): rpo_alpha > 0 adds rpo_alpha * policy_chosen_nll to the loss of
    any type. policy_chosen_nll defaults to the per-token mean NLL of the chosen response,
    -policy_chosen_logps / chosen_lengths (or -policy_chosen_logps when no lengths are given). The paper
    uses a length-normalised NLL of the winning sequence, and its weight 1 is TRL's recommended rpo_alpha;
    TRL adds one scalar per batch instead: the cross-entropy averaged over all chosen tokens of the batch. Pass your own
    policy_chosen_nll (B,) for another variant (preference_loss_grad then treats it as a separate input).

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) log pi(y_w|x), log pi(y_l|x) from sequence_logps.
        reference_chosen_logps, reference_rejected_logps: (B,) the same under pi_ref (no grad).
        beta: > 0. chosen_lengths, rejected_lengths: (B,) response token counts (>= 1), int or float.
    Returns:
        losses (B,), chosen_rewards (B,), rejected_rewards (B,). Rewards are detached: beta * (policy -
        reference) log-probs, length-normalised for lndpo/simpo, with log pi_ref = 0 when reference-free.
    """
    h, chosen_rewards, rejected_rewards, _, _, _ = _margin(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta,
        loss_type, label_smoothing, reference_free, gamma, chosen_lengths, rejected_lengths, rpo_alpha)
    eps, u = label_smoothing, beta * h - gamma                                  # (B,)
    if loss_type in ("dpo", "lndpo", "simpo"):
        losses = -F.logsigmoid(u)                                               # (5) Eq. 7
    elif loss_type == "cdpo":
        losses = -(1 - eps) * F.logsigmoid(u) - eps * F.logsigmoid(-u)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(u) + eps * F.logsigmoid(-u)) / (1 - 2 * eps)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:  # hinge
        losses = torch.relu(1 - u)
    if rpo_alpha > 0:
        if policy_chosen_nll is None:
            n = chosen_lengths if chosen_lengths is not None else 1.0
            policy_chosen_nll = -policy_chosen_logps / n                        # (B,) per-token mean NLL
        losses = losses + rpo_alpha * policy_chosen_nll
    return losses, chosen_rewards, rejected_rewards


def preference_loss_grad(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                         beta=0.1, loss_type="dpo", label_smoothing=0.0, reference_free=False, gamma=0.0,
                         chosen_lengths=None, rejected_lengths=None, rpo_alpha=0.0, policy_chosen_nll=None):
    """Closed-form gradient of preference_loss(...)[0].mean(), written from the derivation (no autograd).

    Same arguments as preference_loss. Per pair, with u = beta * h - gamma and s = sigmoid:
        dpo, lndpo, simpo  dl/dh = -beta * s(-u)                      (6): beta * sigmoid(rhat_l - rhat_w)
        cdpo               dl/dh = beta * (-(1-eps) s(-u) + eps s(u))
        robust             dl/dh = beta * (-(1-eps) s(-u) - eps s(u)) / (1 - 2 eps)
        ipo                dl/dh = 2 * (h - 1/(2 beta))
        hinge              dl/dh = -beta * [u < 1]
    then the mean over B pairs and dh/dlogp: h = sc*(pi_w - ref_w) - sr*(pi_l - ref_l), sc = 1/|y_w| for
    lndpo/simpo else 1 (same for sr), and ref terms 0 when reference-free or simpo. RPO adds
    rpo_alpha/B * d nll/d pi_w = -rpo_alpha/(B |y_w|) (or -rpo_alpha/B without lengths) to the first output;
    an explicit policy_chosen_nll is a separate input and adds nothing here.

    Returns:
        (d_policy_chosen, d_policy_rejected, d_reference_chosen, d_reference_rejected), each (B,).
    """
    h, _, _, sc, sr, use_ref = _margin(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta,
        loss_type, label_smoothing, reference_free, gamma, chosen_lengths, rejected_lengths, rpo_alpha)
    eps, u, s, B = label_smoothing, beta * h - gamma, torch.sigmoid, h.shape[0]
    if loss_type in ("dpo", "lndpo", "simpo"):
        dl_dh = -beta * s(-u)                                                   # (6)
    elif loss_type == "cdpo":
        dl_dh = beta * (-(1 - eps) * s(-u) + eps * s(u))
    elif loss_type == "robust":
        dl_dh = beta * (-(1 - eps) * s(-u) - eps * s(u)) / (1 - 2 * eps)
    elif loss_type == "ipo":
        dl_dh = 2 * (h - 1 / (2 * beta))
    else:  # hinge; at u == 1 exactly we take 0, as autograd's relu does
        dl_dh = -beta * (u < 1).to(h.dtype)
    g = dl_dh / B                                                               # (B,) d mean / dh_i
    d_policy_chosen, d_policy_rejected = g * sc, -g * sr                        # (6) +w, -l
    zero = torch.zeros_like(g)
    d_reference_chosen, d_reference_rejected = (-g * sc, g * sr) if use_ref else (zero, zero)
    if rpo_alpha > 0 and policy_chosen_nll is None:
        n = chosen_lengths.to(g.dtype) if chosen_lengths is not None else 1.0
        d_policy_chosen = d_policy_chosen - rpo_alpha / (B * n)
    return d_policy_chosen, d_policy_rejected, d_reference_chosen, d_reference_rejected


def implicit_reward_weight(chosen_rewards, rejected_rewards):
    """sigmoid(rhat_l - rhat_w), (B,): the weight of each pair in the DPO gradient, step (6).

    Near 1 for a pair the implicit reward misranks, near 0 for one it already ranks right by a wide margin.
    For dpo, lndpo and reference-free dpo, d losses.mean() / d policy_chosen_logps = -(beta/B) * sc * weight.

    Args:
        chosen_rewards, rejected_rewards: (B,) as returned by preference_loss.
    """
    return torch.sigmoid(rejected_rewards - chosen_rewards)                    # (B,) (6)


# ---- training ----
#
# The trainer: `python dpo.py --task hh --data FILE --model gpt2 ...`. Everything with a side effect is in
# train() and main(); the pieces below it (batch_logps, the reference pass) are what the tests check.


@dataclasses.dataclass
class TrainConfig:
    task: str = field("jsonl", "jsonl (--data FILE with prompt/chosen/rejected), hh (Anthropic HH file or "
                      "subset/split name) or imdb (the paper's sentiment experiment, end to end)")
    data: str = field(None, "training pairs: a JSONL file, an HH .jsonl(.gz) file or name such as harmless-base/train")
    eval_data: str = field(None, "held-out pairs (same format); default: --n-eval pairs split off --data")
    n_eval: int = field(256, "held-out pairs split off --data when --eval-data is not given")
    model: str = field("gpt2", "policy: hub name, local folder (HF layout or our checkpoint), or random:L,H,C "
                       "for a random-initialised GPT with L layers, H heads, C channels")
    ref: str = field(None, "reference model (same forms); default: a frozen copy of the initial policy")
    out: str = field("runs/dpo", "output folder: metrics.jsonl, curves.png, checkpoint/")
    loss_type: str = field("dpo", f"one of {', '.join(LOSS_TYPES)}")
    beta: float = field(0.1, "beta: strength of the KL constraint (paper: 0.1)")
    label_smoothing: float = field(0.0, "eps of cdpo/robust: assumed probability that a label is flipped")
    reference_free: bool = field(False, "log pi_ref := 0 (reference-free DPO)")
    gamma: float = field(0.0, "SimPO's target margin")
    rpo_alpha: float = field(0.0, "weight of the NLL term on the chosen response (RPO); 0 = off")
    average_logps: bool = field(False, "length-average sequence log-probs instead of summing (paper: sum)")
    optimizer: str = field("rmsprop", "rmsprop (paper) or adamw")
    lr: float = field(1e-6, "peak learning rate (paper: 1e-6)")
    adam_eps: float = field(1e-8, "AdamW's epsilon. Adam moves every parameter about lr a step however small its "
                            "gradient; a larger epsilon (e.g. 1e-3) damps the parameters with tiny gradients, such as "
                            "the head rows of tokens the data never prefers, and makes every step smaller")
    warmup_steps: int = field(150, "linear warm-up steps (paper: 150)")
    batch_size: int = field(64, "pairs per optimiser step (paper: 64)")
    micro_batch_size: int = field(8, "pairs per forward/backward; gradients accumulate over batch/micro")
    max_length: int = field(512, "longest prompt+response in tokens")
    max_prompt_length: int = field(256, "prompts longer than this keep their end (when the pair is too long)")
    max_grad_norm: float = field(10.0, "gradient-norm clipping (the authors' code: 10)")
    skip_nonfinite: bool = field(False, "skip (and count) a batch whose loss or gradient is NaN/inf instead of "
                                 "stopping the run; the weights are never updated from it")
    steps: int = field(0, "optimiser steps; 0 = --epochs passes over the data")
    epochs: int = field(1, "passes over the training pairs when --steps is 0")
    eval_every: int = field(100, "evaluate on held-out pairs every N steps (and at the end)")
    save_every: int = field(500, "write the checkpoint every N steps (and at the end)")
    keep_checkpoints: bool = field(False, "also keep a copy of every saved checkpoint as step-N/")
    precompute_ref: bool = field(False, "one pass computes all reference log-probs, then the reference model is freed")
    share_prompt: bool = field(True, "compute each prompt once for its chosen and rejected responses (keys and values "
                               "shared, gradients through both) when that saves at least 20%% of the tokens "
                               "(worth_sharing); --no-share-prompt: always one row per prompt+response")
    weights_dtype: str = field("float32", "float32 or bfloat16: the dtype the policy and reference are loaded in "
                               "(shard by shard, never a float32 copy). bfloat16 halves weight memory; gradients "
                               "and optimiser state take the parameters' dtype, so full fine-tuning at lr 1e-6 "
                               "loses most updates to bfloat16 rounding: pair it with --lora-rank")
    grad_checkpoint: bool = field(False, "activation checkpointing: keep only each block's input and recompute the "
                                  "block in backward (activations ~L times smaller, one extra forward of compute)")
    compile: bool = field(False, "torch.compile every transformer block (regional: the blocks share one compiled graph, "
                          "so it compiles in about one block's time); fuses the small element-wise kernels on a GPU. "
                          "The first steps (and each new sequence length, until shapes are marked dynamic) are slow "
                          "while it compiles; results equal eager up to float rounding (also with --grad-checkpoint and "
                          "--lora-rank, checked; with LoRA the adapters-off reference passes add graphs, and past "
                          "torch's recompile limit of 8 the rest runs eagerly, with a warning)")
    trainable: str = field("all", "which weights training updates: all (the paper) or head (the output head only, "
                           "every block and embedding frozen: the policy can then only re-weight tokens, "
                           "log pi(y_t | .) = log pi_ref(y_t | .) + a learned per-token shift of the logits; used by "
                           "the IMDb CPU preset, see IMDB_PRESETS). A tied head (GPT-2) is the token embedding, "
                           "which then trains too")
    lora_rank: int = field(0, "LoRA (Hu et al. 2021) adapters of this rank on every block's attention and MLP "
                           "projections; base weights frozen, the reference is the base with the adapters off "
                           "(no second model); 0 = full fine-tuning")
    lora_alpha: float = field(0.0, "LoRA scale numerator: the update is (alpha / rank) B A; 0 = the rank (scale 1)")
    lora_dropout: float = field(0.0, "dropout on the LoRA input (training only)")
    fsdp: bool = field(False, "under torchrun: shard parameters, gradients and optimiser state over the processes "
                       "(PyTorch FSDP, fully_shard per block); otherwise each process holds a full copy (DDP)")
    estimate_memory: bool = field(False, "print the memory arithmetic for --model (comma-separated: a table) and "
                                  "these flags on 24/40/80 GB cards, then exit; nothing is loaded or downloaded")
    resume: bool = field(False, "continue from OUT/checkpoint exactly where it stopped")
    overwrite: bool = field(False, "start afresh even if OUT holds a run")
    stop_after: int = field(0, "exit after N steps of this invocation (for time-boxed jobs and resume tests)")
    device: str = field("auto", "cuda, mps or cpu (auto: the first available)")
    dtype: str = field("auto", "bfloat16 autocast or float32 (auto: bfloat16 on cuda, float32 otherwise)")
    seed: int = field(0, "seeds the initialisation, the data order and the held-out split")


def load_pairs(cfg):
    """(train pairs, held-out pairs) as lists of {"prompt","chosen","rejected"} from the task's source."""
    if cfg.task == "hh":
        read = read_hh
        data = cfg.data or "harmless-base/train"
        eval_data = cfg.eval_data or (None if cfg.data else "harmless-base/test")
    elif cfg.task in ("jsonl", "imdb"):
        if not cfg.data:
            raise InputError(f"--task {cfg.task} needs --data FILE.jsonl with prompt, chosen and rejected on each line")
        read, data, eval_data = read_jsonl_pairs, cfg.data, cfg.eval_data
    else:
        raise InputError(f"--task {cfg.task}: unknown task; use jsonl, hh or imdb")
    pairs = read(data)
    if eval_data:
        return pairs, read(eval_data)
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    n_eval = min(cfg.n_eval, len(pairs) // 10)
    return [pairs[i] for i in order[n_eval:]], [pairs[i] for i in order[:n_eval]]


def tokenize_all(pairs, cfg, what, tokenizer=None):
    """Token ids of every pair, with the model's tokenizer (None: GPT-2's); pairs that already carry ids
    (sampled completions, whose decoded text might not re-encode to the same tokens) are kept as they are,
    with their "group"."""
    items = [p if "prompt_ids" in p else
             tokenize_pair(p["prompt"], p["chosen"], p["rejected"], cfg.max_length, cfg.max_prompt_length,
                           tokenizer=tokenizer)
             for p in pairs]
    cut = sum(it.get("truncated", False) for it in items)
    if cut:
        print(f"{what}: {cut} of {len(items)} pairs truncated to max_length {cfg.max_length} "
              f"(prompts to {cfg.max_prompt_length}, keeping their end)")
    return items


def loss_from_logps(cfg, policy_logps, ref_logps, batch):
    """Per-pair losses and rewards from the (2B,) policy and (B, 2) reference log-probs of a batch."""
    pc, pr = policy_logps.chunk(2)  # (B,), (B,)
    lengths = batch["response_lens"].float()
    lc, lr = lengths.chunk(2)
    return preference_loss(pc, pr, ref_logps[:, 0], ref_logps[:, 1], beta=cfg.beta, loss_type=cfg.loss_type,
                           label_smoothing=cfg.label_smoothing, reference_free=cfg.reference_free,
                           gamma=cfg.gamma, chosen_lengths=lc, rejected_lengths=lr, rpo_alpha=cfg.rpo_alpha)


def check_config(cfg):
    """Every flag checked before anything is loaded or written: a wrong one costs seconds, not a run."""
    if not cfg.beta > 0:  # also catches nan
        raise InputError(f"--beta {cfg.beta}: beta must be > 0 (it scales the KL penalty; paper: 0.1)")
    if cfg.loss_type not in LOSS_TYPES:
        raise InputError(f"--loss-type {cfg.loss_type}: use one of {', '.join(LOSS_TYPES)}")
    one = torch.ones(1)
    try:  # the loss's own checks (label_smoothing, gamma, rpo_alpha), worded with the flags
        _margin(one, one, one, one, cfg.beta, cfg.loss_type, cfg.label_smoothing, cfg.reference_free, cfg.gamma,
                one, one, cfg.rpo_alpha)
    except ValueError as e:
        msg = str(e)
        for name in ("label_smoothing", "loss_type", "rpo_alpha", "gamma"):
            msg = msg.replace(name, "--" + name.replace("_", "-"))
        raise InputError(msg) from None
    for name in ("batch_size", "micro_batch_size", "save_every", "eval_every", "max_prompt_length"):
        if getattr(cfg, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be at least 1")
    if cfg.steps < 0 or (cfg.steps == 0 and cfg.epochs < 1):
        raise InputError(f"--steps {cfg.steps} --epochs {cfg.epochs}: give --steps >= 1, "
                         f"or --steps 0 and --epochs >= 1")
    if cfg.batch_size % cfg.micro_batch_size:
        raise InputError(f"--batch-size {cfg.batch_size} is not a multiple of --micro-batch-size "
                         f"{cfg.micro_batch_size}; choose a divisor")
    if cfg.optimizer not in ("rmsprop", "adamw"):
        raise InputError(f"--optimizer {cfg.optimizer}: use rmsprop or adamw")
    if not 0 < cfg.lr < math.inf:
        raise InputError(f"--lr {cfg.lr}: the learning rate must be a positive number (paper: 1e-6)")
    if not 0 < cfg.adam_eps < math.inf:
        raise InputError(f"--adam-eps {cfg.adam_eps}: must be a positive number (default 1e-8)")
    if cfg.max_prompt_length >= cfg.max_length:
        raise InputError(f"--max-prompt-length {cfg.max_prompt_length} must be below --max-length {cfg.max_length}")
    if cfg.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise InputError(f"--dtype {cfg.dtype}: use auto, float32, bfloat16 or float16")
    if cfg.weights_dtype not in ("float32", "bfloat16"):
        raise InputError(f"--weights-dtype {cfg.weights_dtype}: use float32 or bfloat16")
    if cfg.lora_rank < 0 or not cfg.lora_alpha >= 0 or not 0 <= cfg.lora_dropout < 1:
        raise InputError(f"--lora-rank {cfg.lora_rank} --lora-alpha {cfg.lora_alpha} --lora-dropout {cfg.lora_dropout}: "
                         f"the rank must be >= 0 (0 = off), alpha >= 0 and the dropout in [0, 1)")
    if cfg.lora_rank and cfg.ref:
        raise InputError(f"--ref {cfg.ref} with --lora-rank: the LoRA reference is the base model with its adapters "
                         f"off; drop --ref")
    if cfg.trainable not in ("all", "head"):
        raise InputError(f"--trainable {cfg.trainable}: use all (the paper) or head")
    if cfg.trainable == "head" and (cfg.lora_rank or cfg.fsdp):
        raise InputError(f"--trainable head with {'--lora-rank' if cfg.lora_rank else '--fsdp'}: choose one way of "
                         f"limiting what trains (the head alone is small: DDP holds it on every process)")
    if cfg.compile and cfg.fsdp:
        raise InputError("--compile with --fsdp is not supported (untested here); drop one of them")
    if cfg.lora_rank and cfg.fsdp:
        raise InputError("--lora-rank with --fsdp is not supported: the frozen base fits where the adapters train; "
                         "drop --fsdp (each process then holds the base, DDP syncs the adapters)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.fsdp and world == 1:
        raise InputError("--fsdp shards over several processes: launch with torchrun --nproc_per_node=N dpo.py ...")
    if cfg.batch_size % world:
        raise InputError(f"--batch-size {cfg.batch_size} does not split over {world} processes: use a multiple of "
                         f"{world} (it is the global batch)")
    kind = cfg.device.split(":")[0]
    if kind not in ("auto", "cpu", "cuda", "mps"):
        raise InputError(f"--device {cfg.device}: use auto, cpu, cuda (or cuda:N) or mps")
    mps = getattr(torch.backends, "mps", None)
    if kind == "cuda" and not torch.cuda.is_available() or kind == "mps" and not (mps and mps.is_available()):
        raise InputError(f"--device {cfg.device}: this machine has no such device; use --device cpu (or auto)")


def evaluate_pairs(cfg, policy, items, ref_lp, device, dtype, rank=0, world=1, pad_id=EOS):
    """Held-out loss, implicit-reward accuracy and margin. Under torchrun each process scores its share
    of the pairs (shard) and the sums are added over the processes."""
    share, n_real = shard(len(items), rank, world)
    policy.eval()
    sums = torch.zeros(3, dtype=torch.float64)  # loss, accuracy, margin
    with torch.no_grad():
        for i in range(0, len(share), cfg.micro_batch_size):
            ids = share[i:i + cfg.micro_batch_size]
            batch = make_batch([items[j] for j in ids], device, cfg.share_prompt, pad_id)  # no grad: no checkpointing
            with autocast(device, dtype):
                lp = batch_logps(policy, batch, cfg.average_logps).float()
            loss, cr, rr = loss_from_logps(cfg, lp, ref_lp[ids].to(device), batch)
            real = (torch.arange(i, i + len(ids)) < n_real).to(device)  # padding of the last share counts 0
            sums += torch.stack([loss[real].sum(), (cr > rr)[real].float().sum(), (cr - rr)[real].sum()]).double().cpu()
    policy.train()
    if world > 1:
        sums = all_reduce_sum(dict(enumerate(sums.tolist())), device)
        sums = torch.tensor(list(sums.values()), dtype=torch.float64)
    loss, acc, margin = (sums / max(len(items), 1)).tolist()
    return {"eval/loss": loss, "eval/accuracy": acc, "eval/margin": margin}


def save_checkpoint(folder, policy, state, tokenizer_file=None):
    """Model (HF layout) + train_state.pt in one folder, swapped in atomically: a kill at any moment
    leaves either the previous checkpoint or this one, never a mixture. A LoRA policy is saved with its
    adapters merged into the weights, W + (alpha/r) B A, and the adapters alone in adapters.safetensors."""
    tmp = folder.rstrip("/") + ".writing"
    adapters = lora_state_dict(policy)
    if adapters:  # LoRA: the merged model (any HF loader reads it) plus the adapters alone, for --resume
        with lora_merged(policy, device="cpu"):
            save_pretrained(policy, tmp)  # itself atomic: tmp appears complete or not at all
        save_safetensors(adapters, os.path.join(tmp, "adapters.safetensors"))
    else:
        save_pretrained(policy, tmp)
    if tokenizer_file:  # a non-GPT-2 tokenizer travels with the weights, so the checkpoint loads as --model
        shutil.copyfile(tokenizer_file, os.path.join(tmp, "tokenizer.json"))
    torch.save(state, os.path.join(tmp, "train_state.pt.tmp"))
    os.replace(os.path.join(tmp, "train_state.pt.tmp"), os.path.join(tmp, "train_state.pt"))
    old = folder.rstrip("/") + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(folder):
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def recover_checkpoint(folder):
    """A kill between save_checkpoint's last two renames leaves no `folder`: the previous checkpoint is
    `.old` and the new one `.writing`, complete (it holds train_state.pt, written last). Put the new one in place."""
    new = folder.rstrip("/") + ".writing"
    if not os.path.exists(folder) and os.path.exists(os.path.join(new, "train_state.pt")):
        os.replace(new, folder)


# ----------------------------------------------------------------------------------------------
# Many processes: `torchrun --nproc_per_node=N dpo.py ...` (N GPUs, or N CPU processes with gloo).
# --batch-size stays the GLOBAL batch: each process takes its contiguous 1/N of every step's pairs, and the
# gradient is the same sum over all pairs / batch_size as in one process. Metrics are summed over the
# processes; only process 0 logs and writes metrics.jsonl and checkpoints.

def init_processes(device):
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) joins the process group, NCCL on CUDA and
    gloo on CPU; each process takes GPU number LOCAL_RANK. One process: (0, 1, device), nothing to join."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def shard(n, rank, world):
    """This process's contiguous share of n items: (indices, how many are real). Every process gets
    ceil(n / world) indices, the last share padded with repeats of item 0 (to be ignored), so that all
    run the same number of forward passes: FSDP's collectives need every process in every forward."""
    size = -(-n // world)
    real = list(range(rank * size, min(n, (rank + 1) * size)))
    return real + [0] * (size - len(real)), len(real)


def all_reduce_sum(values, device):
    """{key: number} summed over the processes (every process passes the same keys, in the same order)."""
    t = torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(values, t.tolist()))


def reference_logps_all(reference, items, micro_batch_size, device, dtype, average, rank=0, world=1,
                        share_prompt=True, pad_id=EOS):
    """reference_logps of every pair, (P, 2). With several processes each scores its share and the shares
    are all-gathered, so that every process ends with the whole table."""
    if world == 1:
        return reference_logps(reference, items, micro_batch_size, device, dtype, average,
                               share_prompt=share_prompt, pad_id=pad_id)
    share, _ = shard(len(items), rank, world)
    if not share:
        return torch.zeros(0, 2)
    mine = reference_logps(reference, [items[i] for i in share], micro_batch_size, device, dtype, average,
                           show=rank == 0, share_prompt=share_prompt, pad_id=pad_id).to(device)  # (S, 2); NCCL gathers GPU tensors
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine)
    return torch.cat(parts).cpu()[:len(items)]  # shares are contiguous: the padding is at the end


class LogpsModule(nn.Module):
    """batch_logps of a GPT as the forward() of a module. DistributedDataParallel synchronises gradients,
    and FSDP gathers parameters, around the forward() of the module they wrap; GPT.forward returns logits,
    not the response log-probs DPO needs, and the output head runs after it. Wrapping this puts it all inside."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch, average=False):
        return batch_logps(self.model, batch, average)  # (2B,)


def wrap_for_processes(model, device, fsdp):
    """A GPT ready for several processes, as a LogpsModule that batch_logps calls.

    DDP (default): every process holds the whole model; during backward the gradients are averaged over
    the processes in buckets, overlapping with the computation. Costs one all-reduce of the gradients a step.
    FSDP (--fsdp): fully_shard on every block, then on the whole: each process keeps 1/N of the parameters,
    gradients and optimiser state, and all-gathers a block's weights only while that block runs (forward
    and again in backward), then reduce-scatters its gradients. Costs ~1.5x DDP's communication."""
    wrapped = LogpsModule(model)
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(device.split(":")[0], (dist.get_world_size(),))
        for block in model.h:
            fully_shard(block, mesh=mesh)
        return fully_shard(wrapped, mesh=mesh)
    return nn.parallel.DistributedDataParallel(wrapped, device_ids=[device] if device.startswith("cuda") else None)


def gathered_model(policy, wrapped):
    """An ordinary GPT with the full weights of an FSDP-sharded policy, on process 0 (None elsewhere), for
    save_pretrained. Every process must call it: the shards are gathered (into host memory)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    full = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    with torch.device("meta"):
        model = GPT(policy.config)
    model.load_state_dict({k.removeprefix("model."): v for k, v in full.items()}, assign=True)
    if policy.config.tie_word_embeddings:
        model.lm_head.weight = model.wte.weight
    return model


def _local(t):
    """This process's part of a tensor (an FSDP parameter is a DTensor: its local shard)."""
    return t.to_local() if hasattr(t, "to_local") else t


def train(cfg, train_pairs=None, eval_pairs=None, ref_lp=None, reference=None, log=print):
    """Trains a policy with a preference loss. Returns (policy, list of per-step metric dicts).

    train_pairs/eval_pairs (lists of {"prompt","chosen","rejected"}) override cfg.data; ref_lp
    ({"train": (P, 2), "eval": (Q, 2)} tensors) supplies precomputed reference log-probs, so every run of
    a beta sweep reuses one reference pass.

    Faults: bad input raises InputError before anything is trained; a non-finite loss or gradient raises
    TrainingError naming the step and the pairs, before the weights change (cfg.skip_nonfinite: the batch
    is skipped and counted instead); weights are checked finite before every save.

    Under torchrun (WORLD_SIZE > 1) every process runs this function on its share of each step's pairs:
    see "Many processes" above; the metrics equal a one-process run's on the same global batch."""
    check_config(cfg)
    device, dtype = pick_device(cfg.device), cfg.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    rank, world, device = init_processes(device)
    if rank != 0:
        log = lambda *a, **k: None  # noqa: E731  (process 0 speaks for all)
    weights_dtype = getattr(torch, cfg.weights_dtype)
    ckpt = os.path.join(cfg.out, "checkpoint")
    recover_checkpoint(ckpt)
    if os.path.exists(ckpt) and not (cfg.resume or cfg.overwrite):
        raise InputError(f"{cfg.out} already holds a run; pass --resume to continue it, --overwrite to replace "
                         f"it, or choose another --out")
    if cfg.resume and not os.path.exists(os.path.join(ckpt, "train_state.pt")):
        raise InputError(f"--resume: {ckpt} holds no checkpoint to resume from; drop --resume to start afresh")
    if cfg.resume:
        try:
            state = torch.load(os.path.join(ckpt, "train_state.pt"), weights_only=False)
        except Exception as e:  # torch raises RuntimeError, EOFError or pickle errors on a damaged file
            raise InputError(f"{ckpt}/train_state.pt: cannot read it ({str(e).splitlines()[0][:80]}); the file is "
                             f"damaged: restore it, or start afresh with --overwrite") from None
        saved = state.get("config", {})
        changed = [k for k in ("model", "ref", "optimizer", "batch_size", "seed", "weights_dtype", "lora_rank", "fsdp",
                               "trainable")
                   # a change breaks exact resume (the number of processes may change: the global batch is the same)
                   if saved.get(k, getattr(cfg, k)) != getattr(cfg, k)]
        if changed:
            was = ", ".join(f"--{k.replace('_', '-')} {saved[k]}" for k in changed)
            raise InputError(f"--resume: {ckpt} was trained with {was}; pass the same values to continue it exactly, "
                             f"or choose another --out")
    try:  # unwritable, or under a file: found now, not at the first checkpoint
        os.makedirs(cfg.out, exist_ok=True)
        open(os.path.join(cfg.out, f".write-test{rank}"), "w").close()
        os.remove(os.path.join(cfg.out, f".write-test{rank}"))
    except OSError as e:
        raise InputError(f"--out {cfg.out}: cannot write there ({e.strerror}: {e.filename}); "
                         f"choose another --out") from None
    torch.manual_seed(cfg.seed)

    if train_pairs is None:
        train_pairs, eval_pairs = load_pairs(cfg)
    # the policy's own tokenizer: GPT-2's BPE, or a tokenizer.json (Pythia/NeoX) converted to tiktoken
    if not cfg.model.startswith("random:"):
        resolve_checkpoint(cfg.model)  # a missing folder or an offline hub name: that error first, in one line
    tokenizer = load_tokenizer(cfg.model)
    pad_id = tokenizer.eos_id if tokenizer.eos_id is not None else 0  # padding is masked: any valid id
    tokenizer_file = None if tokenizer.to_id is None else hub_file(cfg.model, "tokenizer.json")
    train_items = tokenize_all(train_pairs, cfg, "train", tokenizer)
    eval_items = tokenize_all(eval_pairs or [], cfg, "eval", tokenizer)
    if len(train_items) < cfg.batch_size:
        raise InputError(f"only {len(train_items)} training pairs, fewer than --batch-size {cfg.batch_size}; "
                         f"lower --batch-size or add data")
    if cfg.share_prompt and not worth_sharing(train_items + eval_items):
        log(f"note: prompts too short to be worth computing once (sharing would save under "
            f"{SHARE_MIN_SAVING:.0%} of the tokens): each row computes its own")
        cfg = dataclasses.replace(cfg, share_prompt=False)

    lora = cfg.lora_rank > 0
    load_device = "cpu" if cfg.fsdp else device  # FSDP moves each process's shards to the GPU as it shards
    # LoRA resumes from the base model plus the saved adapters: the checkpoint's weights are merged ones
    policy = load_model(cfg.resume and not lora and ckpt or cfg.model, load_device, cfg.seed, weights_dtype)
    if lora:
        add_lora(policy, cfg.lora_rank, cfg.lora_alpha or cfg.lora_rank, cfg.lora_dropout)
        if cfg.resume:
            path = os.path.join(ckpt, "adapters.safetensors")
            if not os.path.exists(path):
                raise InputError(f"--resume: {path} is missing: the run was not trained with --lora-rank, or the "
                                 f"checkpoint is incomplete; restore it or start afresh with --overwrite")
            load_lora_state_dict(policy, load_safetensors(path), path)
    if cfg.trainable == "head":
        train_only_head(policy)
    policy.grad_checkpoint = cfg.grad_checkpoint  # read by GPT.forward
    if reference is None and ref_lp is None:
        if lora:
            reference = policy  # with its adapters switched off (lora_disabled): the frozen base model
        elif cfg.ref:
            reference = load_model(cfg.ref, load_device, cfg.seed, weights_dtype)
        elif cfg.resume:
            reference = load_model(cfg.model, load_device, cfg.seed, weights_dtype)
        elif cfg.precompute_ref:
            reference = policy  # untrained yet, the policy is the reference: the one pass needs no copy
        else:
            reference = copy.deepcopy(policy)
    if reference is not None and reference is not policy:
        reference.eval().requires_grad_(False)  # frozen: never trained, never in the optimiser
        if cfg.compile:
            compile_blocks(reference)
    if cfg.compile:  # after the reference's deepcopy: a copy of a compiled block would call the original's code
        compile_blocks(policy)
    reference_mode = (lambda: lora_disabled(policy)) if lora else contextlib.nullcontext
    longest = max(len(it["prompt_ids"]) + max(len(it["chosen_ids"]), len(it["rejected_ids"]))
                  for it in train_items + eval_items)
    for spec, m in ((cfg.resume and ckpt or cfg.model, policy), (cfg.ref or "the reference model", reference)):
        if m is not None and m.config.vocab_size < tokenizer.vocab_size:
            raise InputError(f"{spec}: a vocabulary of {m.config.vocab_size} tokens, but the data is tokenised with "
                             f"{tokenizer.name}'s {tokenizer.vocab_size}; pass a model that uses that tokenizer, "
                             f"or put the model's tokenizer.json beside its weights")
        if m is not None and m.config.block_size < longest:
            raise InputError(f"{spec}: {m.config.block_size} positions, but the longest pair has {longest} tokens; "
                             f"lower --max-length to {m.config.block_size}")
    per_ckpt = policy.num_params() * 4 * (3 if cfg.optimizer == "adamw" else 2)  # float32 weights + optimiser state
    need = per_ckpt * (1 if os.path.exists(ckpt) else 2)  # the previous and the new checkpoint, while saving
    free = shutil.disk_usage(cfg.out).free
    if free < need:
        raise InputError(f"--out {cfg.out}: {free / 1e9:.2f} GB free, but checkpoints need about {need / 1e9:.2f} GB "
                         f"(the previous and the new one while saving); free some space or choose another --out")
    if cfg.weights_dtype != "float32" and not lora:
        log(f"note: --weights-dtype {cfg.weights_dtype} without --lora-rank: the optimiser state is {cfg.weights_dtype} "
            f"too, and an update smaller than ~0.4% of a weight rounds away (lr {cfg.lr:g})")
    fwd = policy if world == 1 else wrap_for_processes(policy, device, cfg.fsdp)  # what computes log pi(y|x)
    if reference is policy:
        ref_fwd = fwd if cfg.fsdp else policy  # a no-grad forward of a full copy needs no wrapper
    else:
        ref_fwd = wrap_for_processes(reference, device, True) if reference is not None and cfg.fsdp else reference
    if ref_lp is None and cfg.precompute_ref:
        with reference_mode():
            ref_lp = {name: reference_logps_all(ref_fwd, items, cfg.micro_batch_size, device, dtype, cfg.average_logps,
                                                rank, world, cfg.share_prompt, pad_id)
                      for name, items in (("train", train_items), ("eval", eval_items))}
        reference = ref_fwd = None  # freed: training holds only the policy
    if cfg.fsdp:
        fwd.reshard()  # a no-grad forward leaves the root's parameters gathered: no backward reshards them
    fwd.train()

    trainable = [p for p in fwd.parameters() if p.requires_grad]  # LoRA: the adapters; --trainable head: the head
    if cfg.optimizer == "rmsprop":
        optimizer = torch.optim.RMSprop(trainable, lr=cfg.lr)
    else:  # fused: one kernel over all tensors (as transformers' Trainer by default); FSDP's DTensors: the plain one
        fused = device.split(":")[0] in ("cpu", "cuda") and not cfg.fsdp
        optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, eps=cfg.adam_eps, fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (cfg.warmup_steps + 1)))
    steps_per_epoch = len(train_items) // cfg.batch_size
    total_steps = cfg.steps or cfg.epochs * steps_per_epoch
    step, skipped, saved_step = 0, 0, None
    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    if cfg.resume:
        if cfg.fsdp:  # saved whole (gathered); each process keeps its shard of it
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            set_optimizer_state_dict(fwd, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        step = saved_step = state["step"]
        skipped = state.get("skipped", 0)
        if rank == 0 and os.path.exists(metrics_path):  # drop lines logged after the checkpoint (or cut by a kill)
            lines = [ln for ln in open(metrics_path) if ln.endswith("\n") and json.loads(ln)["step"] <= step]
            with open(metrics_path + ".tmp", "w") as f:
                f.writelines(lines)
            os.replace(metrics_path + ".tmp", metrics_path)
        log(f"resumed from {ckpt} at step {step}")
    elif rank == 0 and os.path.exists(metrics_path):
        os.remove(metrics_path)
    log(f"{len(train_items)} train pairs, {len(eval_items)} held-out | {total_steps} steps of {cfg.batch_size} "
        f"pairs | {policy.num_params() / 1e6:.1f}M parameters"
        + (f", {sum(p.numel() for p in trainable):,} trained ("
           + (f"LoRA rank {cfg.lora_rank})" if lora else "the output head)") if lora or cfg.trainable == "head" else "")
        + f" | {device} {dtype}, weights {cfg.weights_dtype}"
        + (f" | {world} processes, {'FSDP' if cfg.fsdp else 'DDP'}" if world > 1 else ""))

    history, run_start, eval_ref = [], step, None
    while step < total_steps:
        epoch, k = divmod(step, steps_per_epoch)
        order = epoch_order(train_items, torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        idx = order[k * cfg.batch_size:(k + 1) * cfg.batch_size]  # the data position is the step
        mine = [idx[j] for j in shard(len(idx), rank, world)[0]]  # this process's pairs (one process: all)
        t0, fault = time.time(), None
        # the step's sums stay on the device and are read once at its end: a read (.item()) waits for the
        # device, and one per micro-batch would leave a GPU idle while Python queues the next micro-batch
        keys = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected")
        sums, n_tokens, finite = torch.zeros(len(keys), device=device, dtype=torch.float64), 0, []
        mbs = micro_batches(train_items, mine, cfg.micro_batch_size)
        for m, mb in enumerate(mbs):
            # DDP all-reduces the gradients in the last micro-batch's backward only; FSDP reduce-scatters them
            # in every backward, so that they stay sharded
            ddp_accumulate = isinstance(fwd, nn.parallel.DistributedDataParallel) and m < len(mbs) - 1
            with fwd.no_sync() if ddp_accumulate else contextlib.nullcontext():
                batch, tokens = make_batch([train_items[i] for i in mb], device, shares_prompt(cfg), pad_id, True)
                n_tokens += tokens  # the tokens actually computed
                with autocast(device, dtype):
                    policy_logps = batch_logps(fwd, batch, cfg.average_logps).float()  # (2B,) one forward
                if ref_lp is not None:
                    ref = ref_lp["train"][mb].to(device)  # (B, 2)
                else:
                    with torch.no_grad(), reference_mode(), autocast(device, dtype):
                        ref = torch.stack(batch_logps(ref_fwd, batch, cfg.average_logps).float().chunk(2), 1)
                losses, cr, rr = loss_from_logps(cfg, policy_logps, ref, batch)
                finite.append(torch.isfinite(losses))  # checked at the step's end (a NaN loss gives NaN gradients)
                # accumulating sums / batch = the full-batch mean; DDP and FSDP average the gradients over the
                # processes, and x world turns that average back into the sum over all the step's pairs
                (losses.sum() * world / cfg.batch_size).backward()
            pc, pr = policy_logps.detach().chunk(2)
            sums += torch.stack([v.sum() for v in (losses.detach(), cr, rr, (cr > rr).float(), cr - rr, pc, pr)]).double()
        finite = torch.cat(finite).tolist()  # the step's one wait for the device, with the sums below
        sums = dict(zip(keys, sums.tolist()))
        if not all(finite):
            bad = [i for i, ok in zip([i for mb in mbs for i in mb], finite) if not ok]
            m = next(k for k, mb in enumerate(mbs) if bad[0] in mb)
            fault = (f"non-finite loss in micro-batch {m + 1} (training pairs {bad[:8]}, "
                     f"the first with prompt {train_pairs[bad[0]]['prompt'][:40]!r})")
        if world > 1:  # the whole step's metrics, and a fault on any process stops (or skips) on every one
            sums = all_reduce_sum({**sums, "tokens": n_tokens, "fault": fault is not None}, device)
            n_tokens = int(sums.pop("tokens"))
            if sums.pop("fault") and fault is None:
                fault = "non-finite loss on another process"
        if fault:
            grad_norm = math.nan
        else:
            norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
            grad_norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()  # FSDP: a DTensor
        if not fault and not math.isfinite(grad_norm):
            fault = f"non-finite gradient norm (training pairs {idx[:8]}{'...' if len(idx) > 8 else ''})"
        last_good = (f"the last good checkpoint is {ckpt} (step {saved_step})" if saved_step else
                     "no checkpoint saved yet")
        if fault and not cfg.skip_nonfinite:
            raise TrainingError(f"step {step + 1}: {fault}; weights not updated, {last_good}; try a lower --lr, "
                                f"--dtype float32, or --skip-nonfinite to skip such batches")
        lr = scheduler.get_last_lr()[0]
        if fault:  # --skip-nonfinite: the batch is consumed (the data position stays the step), the weights are not
            skipped += 1
        else:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if device.startswith("cuda"):
            torch.cuda.synchronize()  # the step's time includes its optimiser kernels, not the next step
        dt = time.time() - t0
        if fault:
            log(f"step {step}/{total_steps} | skipped: {fault} | {skipped} skipped so far (--skip-nonfinite)")
        else:
            row = {"step": step, **{k_: v / cfg.batch_size for k_, v in sums.items()}, "grad_norm": grad_norm,
                   "lr": lr, "tokens_per_s": n_tokens / dt, "step_s": dt}
            if eval_items and (step % cfg.eval_every == 0 or step == total_steps):
                if eval_ref is None:  # the reference never changes: its held-out log-probs are computed once
                    if ref_lp is not None:
                        eval_ref = ref_lp["eval"]
                    else:
                        with reference_mode():
                            eval_ref = reference_logps_all(ref_fwd, eval_items, cfg.micro_batch_size, device, dtype,
                                                           cfg.average_logps, rank, world, cfg.share_prompt, pad_id)
                row.update(evaluate_pairs(cfg, fwd if cfg.fsdp else policy, eval_items, eval_ref, device, dtype,
                                          rank, world, pad_id))
                if cfg.fsdp:
                    fwd.reshard()  # (as after the reference pass): the optimiser's state is keyed by the shards
            history.append(row)
            if rank == 0:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
            log(f"step {step}/{total_steps} | loss {row['loss']:.4f} | acc {row['rewards/accuracies']:.2f} | margin "
                f"{row['rewards/margins']:.3f} | chosen {row['rewards/chosen']:.3f} | rejected {row['rewards/rejected']:.3f}"
                f" | grad {grad_norm:.2f} | lr {lr:.2e} | {row['tokens_per_s']:.0f} tok/s | {dt * 1000:.0f} ms"
                + (f" | eval loss {row['eval/loss']:.4f} acc {row['eval/accuracy']:.2f}" if "eval/loss" in row else ""))
        if step % cfg.save_every == 0 or step == total_steps or step - run_start == cfg.stop_after:
            bad = [n for n, p in policy.named_parameters() if not torch.isfinite(_local(p)).all()]
            n_bad = all_reduce_sum({"bad": len(bad)}, device)["bad"] if world > 1 else len(bad)
            if n_bad:  # finite gradients can still overflow the weights (fp16, huge --lr): never save those
                raise TrainingError(f"step {step}: non-finite weights in {bad[0] if bad else 'a shard of another process'} "
                                    f"({n_bad:.0f} tensors); not saved, {last_good}; try a lower --lr or --dtype float32")
            if cfg.fsdp:  # gathered whole on process 0: the checkpoint does not depend on the number of processes
                from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
                opt_state = get_optimizer_state_dict(fwd, optimizer,
                                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
                to_save = gathered_model(policy, fwd)
            else:
                opt_state, to_save = optimizer.state_dict(), policy
            failed = None
            if rank == 0:
                state = {"step": step, "optimizer": opt_state, "scheduler": scheduler.state_dict(),
                         "rng": torch.get_rng_state(), "config": dataclasses.asdict(cfg), "skipped": skipped}
                try:
                    save_checkpoint(ckpt, to_save, state, tokenizer_file)
                    if cfg.keep_checkpoints:
                        save_checkpoint(os.path.join(cfg.out, f"step-{step}"), to_save, state, tokenizer_file)
                except OSError as e:
                    failed = f"cannot write the checkpoint to {ckpt} ({e.strerror or e})"
            if world > 1 and all_reduce_sum({"failed": failed is not None}, device)["failed"]:  # (also a barrier)
                failed = failed or "process 0 could not write the checkpoint"
            if failed:
                raise TrainingError(f"step {step}: {failed}; {last_good}; free some space or choose another --out")
            saved_step = step
        if step - run_start == cfg.stop_after:
            log(f"stopping after {cfg.stop_after} steps (--stop-after); continue with --resume")
            break
    if skipped:
        log(f"{skipped} of {step} batches skipped for a non-finite loss or gradient (--skip-nonfinite)")
    return policy, history


class TrainingError(RuntimeError):
    """A numerical fault during training (non-finite loss or gradient): one line, run stops cleanly."""


def parse_args(argv=None, cls=TrainConfig):
    """TrainConfig (or ImdbConfig) from the command line: one flag per field, its help from the field."""
    return util_parse_args(cls, argv, __doc__.split("\n")[0])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    keep_freed_memory()  # 400 MB logits tensors are reused, not re-mapped from the kernel every step
    if "--task" in argv and argv[argv.index("--task") + 1:][:1] == ["imdb"] and "--data" not in argv:
        i = argv.index("--task")
        try:  # the whole experiment; `--task imdb --data PAIRS.jsonl` trains on a pairs file instead
            imdb.run(parse_args(argv[:i] + argv[i + 2:], imdb.ImdbConfig), train, TrainConfig)
        except (InputError, TrainingError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    cfg = parse_args(argv)
    if cfg.estimate_memory:  # arithmetic only: nothing is loaded, downloaded or written
        try:
            check_config(dataclasses.replace(cfg, device="auto"))
            print(memory.memory_report(cfg))
        except InputError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    who = f"process {rank}: " if world > 1 else ""
    if rank == 0:
        print("config: " + " ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items()))
    fresh = not os.path.exists(cfg.out)
    try:
        _, history = train(cfg)
    except (InputError, TrainingError) as e:
        print(f"{who}error: {e}", file=sys.stderr)
        if rank == 0 and fresh and os.path.isdir(cfg.out) and not os.listdir(cfg.out):
            os.rmdir(cfg.out)  # nothing left behind: a folder this run created and never wrote to
        return 2
    except KeyboardInterrupt:
        print(f"{who}interrupted; the last checkpoint (if any) is {os.path.join(cfg.out, 'checkpoint')}, "
              f"continue with --resume", file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():
            # free the wrapped models (FSDP/DDP hooks form reference cycles) while the process group and the
            # interpreter are both alive: gloo work still referenced at interpreter exit can abort the process
            gc.collect()
            dist.destroy_process_group()
    if rank != 0:
        return 0
    try:
        from eval import plot_training_curves
        plot_training_curves(os.path.join(cfg.out, "metrics.jsonl"), os.path.join(cfg.out, "curves.png"))
    except ImportError:
        pass
    last = history[-1] if history else {}
    print("done: " + " | ".join(f"{k} {v:.4f}" for k, v in last.items() if k.startswith(("loss", "rewards/acc", "eval/"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
