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
    (the chosen_rewards and rejected_rewards returned by dpo_loss and preference_loss).
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
import dataclasses
import os
import sys
import time

import torch
import torch.nn.functional as F

import generation
import imdb
from data import InputError, read_hh, read_jsonl_pairs, tokenize_pair
from machinery import memory
from eval import batch_completion_logps
from machinery.fast import batch_logps, keep_freed_memory, make_batch, micro_batches, shares_prompt
from machinery.hf import load_model
from machinery.hub import hh_path
from machinery.lora import train_only_head
from machinery.runtime import (Run, StepStats, all_reduce_sum, check_flags, model_tokenizer, run_command,
                               shard)
from machinery.stages import Checkpoints
from machinery.util import autocast, field, pick_device
from machinery.util import parse_args as util_parse_args
from model import token_logps


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


def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta=0.1):
    """The DPO loss of each pair, Eq. 7 of arXiv:2305.18290: steps (3)-(5) above. What `python dpo.py` trains by
    default; preference_loss below adds the variants.

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) log pi(y_w|x), log pi(y_l|x) from sequence_logps.
        reference_chosen_logps, reference_rejected_logps: (B,) the same under pi_ref (no grad).
        beta: > 0, the strength of the KL constraint in (1) (paper: 0.1).
    Returns:
        losses (B,), chosen_rewards (B,), rejected_rewards (B,): the implicit rewards rhat of (3), detached.
    """
    pi_logratios = policy_chosen_logps - policy_rejected_logps                          # (B,)
    ref_logratios = reference_chosen_logps - reference_rejected_logps                   # (B,)
    h = pi_logratios - ref_logratios                                                    # (B,) (4)
    losses = -F.logsigmoid(beta * h)                                                    # (B,) (5) Eq. 7
    chosen_rewards = (beta * (policy_chosen_logps - reference_chosen_logps)).detach()   # (B,) (3) rhat_w
    rejected_rewards = (beta * (policy_rejected_logps - reference_rejected_logps)).detach()  # (B,) (3) rhat_l
    return losses, chosen_rewards, rejected_rewards


def dpo_loss_grad(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                  beta=0.1):
    """Closed-form gradient of dpo_loss(...)[0].mean() with respect to the policy log-probs, step (6), no autograd:

        dL/dlog pi(y_w|x)_i = -(beta/B) * sigmoid(-beta h_i) = -(beta/B) * sigmoid(rhat_l - rhat_w)
                            = -dL/dlog pi(y_l|x)_i

    Returns:
        (d_policy_chosen, d_policy_rejected), each (B,). Chain it with sequence_logps_grad to reach the logits.
    """
    h = (policy_chosen_logps - policy_rejected_logps) - (reference_chosen_logps - reference_rejected_logps)  # (B,) (4)
    weight = torch.sigmoid(-beta * h)                                # (B,) (6) sigmoid(rhat_l - rhat_w)
    d_policy_chosen = -beta * weight / len(h)                        # (B,) (6)
    return d_policy_chosen, -d_policy_chosen


# ---- The variants: the same margin h, other losses (cDPO, robust DPO, IPO, SLiC hinge, length-normalised DPO,
# SimPO, RPO, reference-free), with their closed-form gradients. test_dpo.py checks each against autograd.

LOSS_TYPES = ("dpo", "cdpo", "robust", "ipo", "hinge", "lndpo", "simpo")


def _margin(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
            beta, loss_type, label_smoothing, reference_free, gamma, chosen_lengths, rejected_lengths, rpo_alpha):
    """Check the options shared by preference_loss and preference_loss_grad, and compute the margin.

    Returns h (B,), chosen_rewards (B,), rejected_rewards (B,), and the factors dh/dlogp needs:
    chosen_scale, rejected_scale (1/|y| for the length-normalised losses, else 1.0) and use_ref (False: log
    pi_ref := 0)."""
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
    chosen_scale = 1.0 / chosen_lengths.to(dtype) if normalise else 1.0      # (B,) or 1.0
    rejected_scale = 1.0 / rejected_lengths.to(dtype) if normalise else 1.0  # (B,) or 1.0
    use_ref = not (reference_free or loss_type == "simpo")
    ref_chosen, ref_rejected = (reference_chosen_logps, reference_rejected_logps) if use_ref else (0.0, 0.0)
    pi_logratios = chosen_scale * policy_chosen_logps - rejected_scale * policy_rejected_logps  # (B,)
    ref_logratios = chosen_scale * ref_chosen - rejected_scale * ref_rejected                  # (B,) or 0.0
    h = pi_logratios - ref_logratios                                                           # (B,) (4)
    chosen_rewards = (beta * chosen_scale * (policy_chosen_logps - ref_chosen)).detach()         # (B,) (3) rhat_w
    rejected_rewards = (beta * rejected_scale * (policy_rejected_logps - ref_rejected)).detach()  # (B,) (3) rhat_l
    return h, chosen_rewards, rejected_rewards, chosen_scale, rejected_scale, use_ref


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
    then the mean over B pairs and dh/dlogp: h = chosen_scale * (pi_w - ref_w) - rejected_scale * (pi_l - ref_l),
    chosen_scale = 1/|y_w| for lndpo/simpo else 1 (rejected_scale likewise), and ref terms 0 when reference-free
    or simpo. RPO adds
    rpo_alpha/B * d nll/d pi_w = -rpo_alpha/(B |y_w|) (or -rpo_alpha/B without lengths) to the first output;
    an explicit policy_chosen_nll is a separate input and adds nothing here.

    Returns:
        (d_policy_chosen, d_policy_rejected, d_reference_chosen, d_reference_rejected), each (B,).
    """
    h, _, _, chosen_scale, rejected_scale, use_ref = _margin(
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
    d_policy_chosen, d_policy_rejected = g * chosen_scale, -g * rejected_scale  # (6) +w, -l
    zero = torch.zeros_like(g)
    d_reference_chosen, d_reference_rejected = (-g * chosen_scale, g * rejected_scale) if use_ref else (zero, zero)
    if rpo_alpha > 0 and policy_chosen_nll is None:
        n = chosen_lengths.to(g.dtype) if chosen_lengths is not None else 1.0
        d_policy_chosen = d_policy_chosen - rpo_alpha / (B * n)
    return d_policy_chosen, d_policy_rejected, d_reference_chosen, d_reference_rejected


def implicit_reward_weight(chosen_rewards, rejected_rewards):
    """sigmoid(rhat_l - rhat_w), (B,): the weight of each pair in the DPO gradient, step (6).

    Near 1 for a pair the implicit reward misranks, near 0 for one it already ranks right by a wide margin.
    For dpo, lndpo and reference-free dpo, d losses.mean() / d policy_chosen_logps = -(beta/B) * chosen_scale * weight.

    Args:
        chosen_rewards, rejected_rewards: (B,) as returned by preference_loss.
    """
    return torch.sigmoid(rejected_rewards - chosen_rewards)                    # (B,) (6)


# ---- Rankings of K responses: Plackett-Luce (Appendix A.3 of the paper). A ranking tau of K responses, best first,
# has probability prod_k exp(r_k) / sum_{j>=k} exp(r_j) under the reward r; substituting (3) cancels Z(x) as in (4).

def plackett_luce_loss(policy_logps, reference_logps, beta=0.1):
    """The DPO loss of K-way rankings (Appendix A.3, the Plackett-Luce model), per prompt:

        rhat_k = beta * (log pi(y_k|x) - log pi_ref(y_k|x))                    (3), responses ranked best first
        L = -sum_{k=1}^{K-1} [ rhat_k - log sum_{j=k}^{K} exp(rhat_j) ]        (the k = K term is 0)

    K = 2 is the DPO loss, Eq. 7: -(rhat_1 - log(e^rhat_1 + e^rhat_2)) = -log sigmoid(rhat_1 - rhat_2).

    Args:
        policy_logps, reference_logps: (B, K) summed log-probs of K responses to each of B prompts, best first.
        beta: > 0.
    Returns:
        losses (B,), rewards (B, K): the implicit rewards rhat, detached.
    """
    rewards = beta * (policy_logps - reference_logps)                               # (B, K) (3)
    tail = torch.logcumsumexp(rewards.flip(-1), dim=-1).flip(-1)                    # (B, K) log sum_{j>=k} e^rhat_j
    losses = -(rewards - tail)[:, :-1].sum(-1)                                      # (B,)
    return losses, rewards.detach()


def plackett_luce_loss_grad(policy_logps, reference_logps, beta=0.1):
    """Closed-form gradient of plackett_luce_loss(...)[0].mean(), no autograd. With p_kj = exp(rhat_j) /
    sum_{i>=k} exp(rhat_i) for j >= k (the probability that y_j is picked first among y_k..y_K):

        dL/drhat_j = sum_{k<=j} p_kj - [j < K]        (the k = K term, p_KK - 1 = 0, is included for free)
        dL/dlog pi(y_j|x) = (beta/B) * dL/drhat_j = -dL/dlog pi_ref(y_j|x)

    A response ranked high is pushed up by 1 and down by its chance of being picked first in every
    suffix it belongs to: as in (6), the rankings the implicit reward already gets right weigh little.
    Returns (d_policy, d_reference), each (B, K)."""
    rewards = beta * (policy_logps - reference_logps)                               # (B, K)
    B, K = rewards.shape
    tail = torch.logcumsumexp(rewards.flip(-1), dim=-1).flip(-1)                    # (B, K) indexed by k
    suffix = torch.ones(K, K, dtype=torch.bool, device=rewards.device).triu()       # (K, K) [k, j]: j >= k
    p = torch.exp(rewards[:, None, :] - tail[:, :, None]) * suffix                  # (B, K, K) p_kj
    d_rewards = p.sum(1) - 1                                                        # (B, K)
    d_policy = beta * d_rewards / B
    return d_policy, -d_policy


# ---- Training: `python dpo.py --task hh --model gpt2`. train() below is one DPO step after another; every
# concern of a real run (processes, resume, checkpoints, numeric guards, LoRA, fast paths) is one named call
# into machinery/, whose files say what each does and which test proves it.


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
    adam_eps: float = field(1e-8, "AdamW's epsilon: a larger one damps the steps of parameters with tiny gradients")
    warmup_steps: int = field(150, "linear warm-up steps (paper: 150)")
    batch_size: int = field(64, "pairs per optimiser step (paper: 64)")
    micro_batch_size: int = field(8, "pairs per forward/backward; gradients accumulate over batch/micro")
    max_length: int = field(512, "longest prompt+response in tokens")
    max_prompt_length: int = field(None, "prompts longer than this keep their end (when the pair is too long); "
                                   "default: half of --max-length")
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
                               "(shard by shard, never a float32 copy); the optimiser state takes the same dtype, so "
                               "full fine-tuning at lr 1e-6 loses most updates to bfloat16 rounding: pair it with "
                               "--lora-rank")
    grad_checkpoint: bool = field(False, "activation checkpointing: keep only each block's input and recompute the "
                                  "block in backward (activations ~L times smaller, one extra forward of compute)")
    compile: bool = field(False, "torch.compile every transformer block (one graph shared by all blocks; fuses the small "
                          "element-wise kernels on a GPU); the first steps are slow while it compiles")
    trainable: str = field("all", "which weights training updates: all (the paper) or head (the output head only, "
                           "every block and embedding frozen: the policy can then only re-weight tokens, "
                           "log pi(y_t | .) = log pi_ref(y_t | .) + a learned per-token shift of the logits; the IMDb CPU "
                           "preset). A tied head (GPT-2) is the token embedding, which then trains too")
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

    def __post_init__(self):
        if self.max_prompt_length is None:  # derived, so that any --max-length alone is valid
            self.max_prompt_length = self.max_length // 2



def check_config(cfg):
    """Every flag checked before anything is loaded or written: a wrong one costs seconds, not a run.
    The loss's own checks first (worded with the flags), then the run's (runtime.check_flags)."""
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
    check_flags(cfg)  # the run's flags: sizes, optimiser, dtypes, LoRA, processes, device


def load_pairs(cfg):
    """(train pairs, held-out pairs) as lists of {"prompt","chosen","rejected"} from the task's source."""
    if cfg.task == "hh":
        read = lambda source: read_hh(hh_path(source))  # noqa: E731  (a file, or a name found/downloaded)
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


def loss_from_logps(cfg, policy_logps, reference_logps, batch):
    """Per-pair losses and rewards from the (2B,) policy and (B, 2) reference log-probs of a batch: the paper's
    dpo_loss by default, preference_loss for the variants (the two agree on plain DPO, test_dpo.py)."""
    policy_chosen_logps, policy_rejected_logps = policy_logps.chunk(2)  # (B,), (B,)
    reference_chosen_logps, reference_rejected_logps = reference_logps.unbind(1)  # (B,), (B,)
    if cfg.loss_type == "dpo" and not (cfg.reference_free or cfg.rpo_alpha):
        return dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                        cfg.beta)
    chosen_lengths, rejected_lengths = batch["response_lens"].float().chunk(2)  # (B,), (B,)
    return preference_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                           beta=cfg.beta, loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing,
                           reference_free=cfg.reference_free, gamma=cfg.gamma, chosen_lengths=chosen_lengths,
                           rejected_lengths=rejected_lengths, rpo_alpha=cfg.rpo_alpha)


def make_optimizer(cfg, params, device):
    """RMSprop (the paper) or AdamW over the trained parameters, with the linear warm-up of the paper."""
    if cfg.optimizer == "rmsprop":
        optimizer = torch.optim.RMSprop(params, lr=cfg.lr)
    else:  # fused: one kernel over all tensors (as transformers' Trainer by default); FSDP's DTensors: the plain one
        fused = device.split(":")[0] in ("cpu", "cuda") and not cfg.fsdp
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, eps=cfg.adam_eps, fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (cfg.warmup_steps + 1)))
    return optimizer, scheduler


def evaluate_pairs(cfg, run, policy, fwd, items, reference_table):
    """Held-out loss, implicit-reward accuracy and margin. Under torchrun each process scores its share
    of the pairs (shard) and the sums are added over the processes."""
    model = fwd if cfg.fsdp else policy  # FSDP: the sharded module gathers its weights; else the plain GPT
    share, n_real = shard(len(items), run.rank, run.world)
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)  # loss, accuracy, margin
    with torch.no_grad():
        for i in range(0, len(share), cfg.micro_batch_size):
            ids = share[i:i + cfg.micro_batch_size]
            batch = make_batch([items[j] for j in ids], run.device, cfg.share_prompt, run.pad_id)  # no grad: shares
            with autocast(run.device, run.dtype):
                policy_logps = batch_logps(model, batch, cfg.average_logps).float()
            reference_logps = reference_table[ids].to(run.device)  # (B, 2)
            losses, chosen_rewards, rejected_rewards = loss_from_logps(cfg, policy_logps, reference_logps, batch)
            real = (torch.arange(i, i + len(ids)) < n_real).to(run.device)  # padding of the last share counts 0
            sums += torch.stack([losses[real].sum(), (chosen_rewards > rejected_rewards)[real].float().sum(),
                                 (chosen_rewards - rejected_rewards)[real].sum()]).double().cpu()
    model.train()
    if run.world > 1:
        summed = all_reduce_sum(dict(enumerate(sums.tolist())), run.device)
        sums = torch.tensor(list(summed.values()), dtype=torch.float64)
    if cfg.fsdp:
        fwd.reshard()  # (as after the reference pass): the optimiser's state is keyed by the shards
    loss, acc, margin = (sums / max(len(items), 1)).tolist()
    return {"eval/loss": loss, "eval/accuracy": acc, "eval/margin": margin}


def train(cfg, train_pairs=None, eval_pairs=None, ref_lp=None, reference=None, log=print):
    """Trains a policy with a preference loss. Returns (policy, list of per-step metric dicts).

    train_pairs/eval_pairs (lists of {"prompt","chosen","rejected"}) override cfg.data; ref_lp
    ({"train": (P, 2), "eval": (Q, 2)}) supplies precomputed reference log-probs (a beta sweep computes them once).
    Bad input raises InputError before anything is trained; a non-finite loss or gradient raises TrainingError
    naming the step and pairs, before the weights change. Under torchrun every process runs this function on
    its share of each step's pairs, and the metrics equal one process's on the same global batch."""
    check_config(cfg)
    run = Run(cfg, log)  # device, processes, the --out folder, the --resume state
    torch.manual_seed(cfg.seed)
    if train_pairs is None:
        train_pairs, eval_pairs = load_pairs(cfg)
    tokenizer, tokenizer_file = model_tokenizer(cfg.model)  # GPT-2's BPE, or the model's own tokenizer.json
    train_items = tokenize_all(train_pairs, cfg, "train", tokenizer)
    eval_items = tokenize_all(eval_pairs or [], cfg, "eval", tokenizer)
    cfg = run.use_data(cfg, train_items, eval_items, tokenizer, tokenizer_file)  # a batch's worth; prompt sharing
    policy, fwd, reference = run.models(reference, ref_lp, train_items, eval_items)  # LoRA, compile, DDP/FSDP, pi_ref
    trainable = [p for p in fwd.parameters() if p.requires_grad]  # all, or the LoRA adapters, or the head
    optimizer, scheduler = make_optimizer(cfg, trainable, run.device)
    total_steps = cfg.steps or cfg.epochs * (len(train_items) // cfg.batch_size)
    start = run.resume(fwd, optimizer, scheduler)  # 0, or the saved step with the optimiser and RNG state
    run.describe(policy, trainable, len(train_items), len(eval_items), total_steps)
    for step in range(start, total_steps):
        t0 = time.time()
        idx, mine = run.step_pairs(train_items, step)  # the step's pairs and this process's share (one process: all)
        stats = StepStats(run.device)
        micro = micro_batches(train_items, mine, cfg.micro_batch_size)  # similar lengths together: the same sum
        for m, mb in enumerate(micro):
            with run.no_sync(fwd, last=m == len(micro) - 1):  # DDP: gradients all-reduced in the last backward
                batch, tokens = make_batch([train_items[i] for i in mb], run.device, shares_prompt(cfg), run.pad_id, True)
                with autocast(run.device, run.dtype):
                    # fast path, = sequence_logps(model(ids), ids, loss_mask) to 1e-4 (test_train.py::
                    # test_concatenated_forward_equals_separate_forwards): the head runs on response tokens only
                    policy_logps = batch_logps(fwd, batch, cfg.average_logps).float()  # (2B,) log pi(y|x)
                reference_logps = reference.logps(batch, mb)  # (B, 2) log pi_ref(y|x), no grad
                losses, chosen_rewards, rejected_rewards = loss_from_logps(cfg, policy_logps, reference_logps, batch)
                # summed over micro-batches / batch_size = the full batch's mean; DDP/FSDP average the gradients
                # over processes, and x world turns that average back into the sum over all the step's pairs
                (losses.sum() * run.world / cfg.batch_size).backward()
            stats.add(mb, losses, chosen_rewards, rejected_rewards, policy_logps, tokens)
        grad_norm, fault = run.guard(stats, trainable, step, idx, train_pairs)  # clip; NaN: raise, or skip the step
        lr = scheduler.get_last_lr()[0]
        if not fault:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        row = run.step_row(step + 1, total_steps, stats, grad_norm, lr, fault, t0)  # None if skipped
        if row and eval_items and ((step + 1) % cfg.eval_every == 0 or step + 1 == total_steps):
            row.update(evaluate_pairs(cfg, run, policy, fwd, eval_items, reference.held_out(eval_items)))
        run.log_step(row, total_steps)  # one line, and metrics.jsonl
        run.maybe_save(step + 1, total_steps, policy, fwd, optimizer, scheduler)  # atomic; never NaN weights
        if run.stops_after(step + 1):  # --stop-after
            break
    run.finish()
    return policy, run.history


def train_rankings(cfg, rankings, reference_logps, log=print):
    """Appendix A.3 as a run: each prompt's full ranking of its K responses is one Plackett-Luce term
    (plackett_luce_loss) instead of K(K-1)/2 pairs (the IMDb experiment's --ranking-betas). rankings: a list of
    {"prompt_ids", "responses_ids": K token lists, best first}; reference_logps: (R, K) log pi_ref. The
    optimiser, warm-up, clipping and --trainable are train()'s (cfg is a TrainConfig; batch_size counts
    rankings); one process. Writes cfg.out/step-N every save_every steps and at the end (machinery.stages.
    Checkpoints); with cfg.resume, continues from the newest. Returns (policy, per-step losses)."""
    check_config(cfg)
    if len(rankings) < cfg.batch_size:
        raise InputError(f"only {len(rankings)} rankings, fewer than one batch of {cfg.batch_size}; add data or lower "
                         f"the batch size")
    device = pick_device(cfg.device)
    policy = load_model(cfg.model, device, cfg.seed)
    if cfg.trainable == "head":
        train_only_head(policy)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(cfg, trainable, device)
    steps_per_epoch = len(rankings) // cfg.batch_size
    total_steps = cfg.steps or cfg.epochs * steps_per_epoch
    checkpoints = Checkpoints(cfg.out, cfg.save_every, total_steps, log=log)
    start, saved = checkpoints.resume(policy, optimizer) if cfg.resume else (0, {})
    if saved:
        scheduler.load_state_dict(saved["scheduler"])
    history = saved.get("history", [])
    for step in range(start, total_steps):
        epoch, k = divmod(step, steps_per_epoch)
        order = torch.randperm(len(rankings), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        idx = order[k * cfg.batch_size:(k + 1) * cfg.batch_size]
        batch = [rankings[i] for i in idx.tolist()]
        K = len(batch[0]["responses_ids"])
        prompts = [r["prompt_ids"] for r in batch for _ in range(K)]  # B*K rows, ranking-major
        responses = [y for r in batch for y in r["responses_ids"]]
        policy_logps = batch_completion_logps(policy, prompts, responses).view(len(batch), K)  # (B, K) log pi(y_k|x)
        losses, _ = plackett_luce_loss(policy_logps, reference_logps[idx].to(device), cfg.beta)  # (B,)
        losses.mean().backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        history.append(losses.mean().item())
        checkpoints.maybe_save(step + 1, policy, optimizer, scheduler=scheduler.state_dict(), history=history)
        if (step + 1) % cfg.save_every == 0 or step + 1 == total_steps:
            log(f"rankings: step {step + 1}/{total_steps} | loss {sum(history[-10:]) / len(history[-10:]):.4f}")
    return policy, history


def parse_args(argv=None, cls=TrainConfig):
    """TrainConfig (or ImdbConfig) from the command line: one flag per field, its help from the field."""
    return util_parse_args(cls, argv, __doc__.split("\n")[0])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    keep_freed_memory()  # large logits tensors are reused, not re-mapped from the kernel every step
    if "--task" in argv and argv[argv.index("--task") + 1:][:1] == ["imdb"] and "--data" not in argv:
        i = argv.index("--task")  # the whole experiment; `--task imdb --data PAIRS.jsonl` trains on a pairs file
        return imdb.main(argv[:i] + argv[i + 2:], train, TrainConfig, train_rankings,
                         online_dpo=(dpo_loss, make_optimizer))
    task = argv[argv.index("--task") + 1:][:1] if "--task" in argv else []
    if (task == ["tldr"] or task == ["hh"] and "--data" not in argv) and "--estimate-memory" not in argv:
        # the dialogue / summarization experiment (generation.py); `--task hh --data PAIRS` trains on a pairs file
        return generation.main(argv, train, TrainConfig)
    cfg = parse_args(argv)
    if cfg.estimate_memory:  # arithmetic only: nothing is loaded, downloaded or written
        return memory.main(cfg, check_config)
    status, history = run_command(train, cfg)  # errors in one line, Ctrl-C, the processes closed
    if status or int(os.environ.get("RANK", "0")) != 0:
        return status
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
