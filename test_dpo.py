"""Tests for the DPO maths in dpo.py: hand-computed losses, closed-form gradients against autograd in
float64, sequence log-probs against F.cross_entropy and a slow loop.

    python -m pytest -q test_dpo.py -k plain        # exercise tier 1: plain DPO (dpo_loss_grad, sequence_logps_grad)
    python -m pytest -q test_dpo.py -k "grad or chain"   # tier 2: every loss variant (preference_loss_grad)
    python -m pytest -q test_dpo.py        # add -s to see the largest gradient error per loss type
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from dpo import (LOSS_TYPES, dpo_loss, dpo_loss_grad, implicit_reward_weight, plackett_luce_loss,
                 plackett_luce_loss_grad, preference_loss, preference_loss_grad, sequence_logps, sequence_logps_grad)


def f64(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def softplus(x):  # -log sigmoid(-x) = log(1 + e^x), for the hand arithmetic
    return math.log1p(math.exp(x))


# ----------------------------------------------------------------------------------------------
# 1. Hand-computed values

# Every row below uses policy (chosen, rejected) = (-10, -12) and, unless it says otherwise,
# reference (-11, -11), beta = 0.1: pi_logratios = -10 - (-12) = 2, ref_logratios = 0, h = 2, beta*h = 0.2.
#   -log sigmoid(0.2) = log(1 + e^-0.2) = log(1.818730753) = 0.5981388694 =: A;  softplus(0.2) = A + 0.2.
A = softplus(-0.2)
HAND = {
    # dpo: -log sigmoid(0.2) = A. Rewards 0.1 * (-10 + 11) = 0.1 and 0.1 * (-12 + 11) = -0.1.
    "dpo": (dict(), A, (0.1, -0.1)),
    # cdpo, eps = 0.1: 0.9 A + 0.1 (A + 0.2) = A + 0.02 = 0.6181388694
    "cdpo": (dict(loss_type="cdpo", label_smoothing=0.1), A + 0.02, (0.1, -0.1)),
    # robust, eps = 0.1: (0.9 A - 0.1 (A + 0.2)) / 0.8 = (0.8 A - 0.02) / 0.8 = A - 0.025 = 0.5731388694
    "robust": (dict(loss_type="robust", label_smoothing=0.1), A - 0.025, (0.1, -0.1)),
    # ipo: (h - 1/(2 beta))^2 = (2 - 5)^2 = 9
    "ipo": (dict(loss_type="ipo"), 9.0, (0.1, -0.1)),
    # hinge: relu(1 - 0.2) = 0.8; with beta = 1: relu(1 - 2) = 0
    "hinge": (dict(loss_type="hinge"), 0.8, (0.1, -0.1)),
    "hinge beta=1": (dict(loss_type="hinge", beta=1.0), 0.0, (1.0, -1.0)),
    # reference (-10.5, -11.5): ref_logratios = 1, h = 1, loss = -log sigmoid(0.1) = 0.6443966601 ...
    "dpo ref": (dict(ref=(-10.5, -11.5)), softplus(-0.1), (0.05, -0.05)),
    # ... reference-free ignores it: h = 2, loss = A; rewards 0.1 * (-10) = -1 and 0.1 * (-12) = -1.2
    "reference_free": (dict(ref=(-10.5, -11.5), reference_free=True), A, (-1.0, -1.2)),
    # lndpo, lengths (4, 2): h = (-10/4 + 12/2) - (-11/4 + 11/2) = 3.5 - 2.75 = 0.75,
    #   loss = -log sigmoid(0.075) = 0.6563501408; rewards 0.1 * (-2.5 + 2.75) = 0.025, 0.1 * (-6 + 5.5) = -0.05
    "lndpo": (dict(loss_type="lndpo", lengths=(4, 2)), softplus(-0.075), (0.025, -0.05)),
    # simpo, beta 2, gamma 1, lengths (4, 2): 2 * (-10/4 + 12/2) - 1 = 2 * 3.5 - 1 = 6,
    #   loss = -log sigmoid(6) = 0.0024756851; rewards 2 * (-2.5) = -5, 2 * (-6) = -12
    "simpo": (dict(loss_type="simpo", beta=2.0, gamma=1.0, lengths=(4, 2)), softplus(-6.0), (-5.0, -12.0)),
    # RPO, alpha 0.5, no lengths: A + 0.5 * 10 = 5.5981388694
    "dpo+rpo": (dict(rpo_alpha=0.5), A + 5.0, (0.1, -0.1)),
    # RPO, alpha 0.5, lengths (4, 2): per-token NLL 10/4 = 2.5, A + 0.5 * 2.5 = A + 1.25
    "dpo+rpo lengths": (dict(rpo_alpha=0.5, lengths=(4, 2)), A + 1.25, (0.1, -0.1)),
    # RPO with an explicit NLL of 3: A + 0.5 * 3 = A + 1.5
    "dpo+rpo nll": (dict(rpo_alpha=0.5, nll=3.0), A + 1.5, (0.1, -0.1)),
}


def _hand_args(spec):
    spec = dict(spec)
    ref = spec.pop("ref", (-11.0, -11.0))
    lengths = spec.pop("lengths", None)
    if lengths is not None:
        spec.update(chosen_lengths=torch.tensor([lengths[0]]), rejected_lengths=torch.tensor([lengths[1]]))
    if "nll" in spec:
        spec["policy_chosen_nll"] = f64(spec.pop("nll"))
    return (f64(-10.0), f64(-12.0), f64(ref[0]), f64(ref[1])), spec


@pytest.mark.parametrize("name", HAND)
def test_hand_computed_values(name):
    """See the arithmetic in the comments of HAND above."""
    spec, want_loss, (want_chosen, want_rejected) = HAND[name]
    args, kwargs = _hand_args(spec)
    losses, chosen_rewards, rejected_rewards = preference_loss(*args, **kwargs)
    assert_close(losses, f64(want_loss), atol=1e-12, rtol=0)
    assert_close(chosen_rewards, f64(want_chosen), atol=1e-12, rtol=0)
    assert_close(rejected_rewards, f64(want_rejected), atol=1e-12, rtol=0)


def test_hand_values_written_out():
    """The numbers quoted in the comments, so that a typo in A itself would show."""
    assert abs(A - 0.5981388694) < 1e-10
    assert abs(softplus(-0.075) - 0.6563501408) < 1e-10 and abs(softplus(-6.0) - 0.0024756851) < 1e-10


def test_hinge_gradient_by_hand():
    """beta = 0.1, h = (2, 15, 30): beta*h = (0.2, 1.5, 3). Only the first pair is inside the margin, so
    dL/dpolicy_chosen = (-beta/B, 0, 0) = (-1/30, 0, 0), and the loss is (0.8 + 0 + 0) / 3."""
    pc, pr, ref = f64(-10.0, -10.0, -10.0), f64(-12.0, -25.0, -40.0), f64(-11.0, -11.0, -11.0)
    losses, _, _ = preference_loss(pc, pr, ref, ref, loss_type="hinge")
    assert_close(losses, f64(0.8, 0.0, 0.0), atol=1e-12, rtol=0)
    d_chosen, d_rejected, _, _ = preference_loss_grad(pc, pr, ref, ref, loss_type="hinge")
    assert_close(d_chosen, f64(-1 / 30, 0.0, 0.0), atol=1e-12, rtol=0)
    assert_close(d_rejected, f64(1 / 30, 0.0, 0.0), atol=1e-12, rtol=0)


@pytest.mark.parametrize("loss_type", ["dpo", "cdpo", "robust", "lndpo"])
def test_loss_is_log2_and_rewards_zero_at_init(loss_type):
    """policy == reference gives h = 0: -log sigmoid(0) = log 2 (and so for cdpo, robust, lndpo)."""
    gen = torch.Generator().manual_seed(0)
    logps = -50 * torch.rand(2, 5, generator=gen, dtype=torch.float64)
    lengths = torch.randint(1, 20, (2, 5), generator=gen)
    losses, chosen_rewards, rejected_rewards = preference_loss(
        logps[0], logps[1], logps[0].clone(), logps[1].clone(), loss_type=loss_type,
        label_smoothing=0.2 if loss_type in ("cdpo", "robust") else 0.0,
        chosen_lengths=lengths[0], rejected_lengths=lengths[1])
    assert_close(losses, torch.full((5,), math.log(2), dtype=torch.float64), atol=1e-12, rtol=0)
    assert (chosen_rewards == 0).all() and (rejected_rewards == 0).all()


# ----------------------------------------------------------------------------------------------
# 2. Closed-form gradients against autograd (float64)

GRAD_CASES = {
    "dpo": dict(),
    "cdpo": dict(loss_type="cdpo", label_smoothing=0.2),
    "robust": dict(loss_type="robust", label_smoothing=0.2),
    "ipo": dict(loss_type="ipo"),
    "hinge": dict(loss_type="hinge", beta=0.5),
    "lndpo": dict(loss_type="lndpo", lengths=True),
    "simpo": dict(loss_type="simpo", beta=2.0, gamma=1.0, lengths=True),
    "dpo reference_free": dict(reference_free=True),
    "ipo reference_free": dict(loss_type="ipo", reference_free=True),
    "hinge reference_free": dict(loss_type="hinge", beta=0.5, reference_free=True),
    "dpo rpo": dict(rpo_alpha=0.7),
    "dpo rpo lengths": dict(rpo_alpha=0.7, lengths=True),
    "robust rpo": dict(loss_type="robust", label_smoothing=0.3, rpo_alpha=1.0, lengths=True),
    "ipo rpo": dict(loss_type="ipo", rpo_alpha=1.0),
    "lndpo rpo": dict(loss_type="lndpo", rpo_alpha=1.0, lengths=True),
    "simpo rpo": dict(loss_type="simpo", beta=2.5, gamma=0.5, rpo_alpha=1.0, lengths=True),
    "dpo rpo explicit nll": dict(rpo_alpha=1.0, explicit_nll=True),
}
assert {case.get("loss_type", "dpo") for case in GRAD_CASES.values()} == set(LOSS_TYPES)


def _random_pairs(case, B=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logps = [-5 - 40 * torch.rand(B, generator=gen, dtype=torch.float64) for _ in range(4)]  # 4 x (B,)
    kwargs = {k: v for k, v in case.items() if k not in ("lengths", "explicit_nll")}
    if case.get("lengths"):
        kwargs.update(chosen_lengths=torch.randint(1, 30, (B,), generator=gen),
                      rejected_lengths=torch.randint(1, 30, (B,), generator=gen))
    if case.get("explicit_nll"):
        kwargs["policy_chosen_nll"] = torch.rand(B, generator=gen, dtype=torch.float64)
    return logps, kwargs


@pytest.mark.parametrize("name", GRAD_CASES)
def test_preference_loss_grad_matches_autograd(name):
    logps, kwargs = _random_pairs(GRAD_CASES[name])
    leaves = [x.clone().requires_grad_(True) for x in logps]
    losses, chosen_rewards, rejected_rewards = preference_loss(*leaves, **kwargs)
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad  # detached
    losses.mean().backward()
    auto = [torch.zeros_like(x) if x.grad is None else x.grad for x in leaves]  # None: input unused
    closed = preference_loss_grad(*logps, **kwargs)
    err = max((c - a).abs().max().item() for c, a in zip(closed, auto))
    print(f"\n  max |closed-form - autograd| {name:22s} {err:.1e}", end="")
    for c, a in zip(closed, auto):
        assert_close(c, a, atol=1e-10, rtol=0)
    if kwargs.get("loss_type") == "hinge":  # the inputs must exercise both sides of the hinge
        h = (logps[0] - logps[1]) - (0 if kwargs.get("reference_free") else logps[2] - logps[3])
        assert (kwargs["beta"] * h < 1).any() and (kwargs["beta"] * h > 1).any()


@pytest.mark.parametrize("reference_free", [False, True])
def test_dpo_gradient_weight_is_implicit_reward_weight(reference_free):
    """dL/dpolicy_chosen = -(beta/B) sigmoid(rhat_l - rhat_w), the opposite for policy_rejected, and the
    negations for the reference log-probs (zero when reference-free)."""
    (pc, pr, rc, rr), _ = _random_pairs({}, seed=1)
    beta, B = 0.1, pc.shape[0]
    _, chosen_rewards, rejected_rewards = preference_loss(pc, pr, rc, rr, beta, reference_free=reference_free)
    weight = implicit_reward_weight(chosen_rewards, rejected_rewards)
    h = (pc - pr) - (0 if reference_free else rc - rr)
    assert_close(weight, torch.sigmoid(-beta * h), atol=1e-12, rtol=0)
    g = preference_loss_grad(pc, pr, rc, rr, beta, reference_free=reference_free)
    assert_close(g[0], -(beta / B) * weight, atol=1e-12, rtol=0)
    assert_close(g[1], (beta / B) * weight, atol=1e-12, rtol=0)
    ref_sign = 0 if reference_free else 1
    assert_close(g[2], ref_sign * (beta / B) * weight, atol=1e-12, rtol=0)
    assert_close(g[3], -ref_sign * (beta / B) * weight, atol=1e-12, rtol=0)


def test_gradient_step_raises_chosen_lowers_rejected_and_weights_misranked_pairs_more():
    """Pair 0 is ranked right (h = +20), pair 1 misranked (h = -20). A descent step x - lr * dL/dx raises
    log pi(y_w), lowers log pi(y_l) and lowers L; the misranked pair moves sigmoid(2)/sigmoid(-2) = e^2 =
    7.39 times more. The y_w/y_l-swapped gradient of the paper's appendix fails every one of these."""
    pc, pr, ref = f64(-10.0, -30.0), f64(-30.0, -10.0), f64(-20.0, -20.0)
    d_chosen, d_rejected, _, _ = preference_loss_grad(pc, pr, ref, ref, beta=0.1)
    assert (d_chosen < 0).all() and (d_rejected > 0).all()
    assert_close(d_chosen[1] / d_chosen[0], torch.tensor(math.e ** 2, dtype=torch.float64))
    lr = 1.0
    new_pc, new_pr = pc - lr * d_chosen, pr - lr * d_rejected
    assert (new_pc > pc).all() and (new_pr < pr).all()
    before = preference_loss(pc, pr, ref, ref)[0].mean()
    after = preference_loss(new_pc, new_pr, ref, ref)[0].mean()
    assert after < before


def test_robust_and_cdpo_differ_by_the_sign_of_the_eps_term():
    """With eps the flip probability: cdpo(h) = (1-eps) dpo(h) + eps dpo(-h) (expected loss under flips),
    while robust is unbiased, (1-eps) robust(h) + eps robust(-h) = dpo(h). Swapping chosen and rejected
    negates h. Far past the margin cdpo pulls h back (its optimum is finite), robust keeps pushing."""
    (pc, pr, rc, rr), _ = _random_pairs({}, seed=2)
    eps = 0.2
    def loss(kind, swap=False):
        args = (pr, pc, rr, rc) if swap else (pc, pr, rc, rr)
        return preference_loss(*args, loss_type=kind, label_smoothing=eps if kind != "dpo" else 0.0)[0]
    assert_close(loss("cdpo"), (1 - eps) * loss("dpo") + eps * loss("dpo", swap=True))
    assert_close((1 - eps) * loss("robust") + eps * loss("robust", swap=True), loss("dpo"))
    u = 0.1 * ((pc - pr) - (rc - rr))
    eps_term = F.logsigmoid(-u)  # cdpo subtracts eps * this, robust adds it
    assert_close(loss("cdpo") - (1 - 2 * eps) * loss("robust"), -2 * eps * eps_term)
    far = (f64(0.0), f64(-200.0), f64(0.0), f64(0.0))  # beta h = 20: sigmoid(u) > 1 - eps
    assert preference_loss_grad(*far, loss_type="cdpo", label_smoothing=eps)[0] > 0
    assert preference_loss_grad(*far, loss_type="robust", label_smoothing=eps)[0] < 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(loss_type="kto"), "unknown loss_type"),
    (dict(beta=0.0), "beta must be > 0"),
    (dict(beta=-0.1), "beta must be > 0"),
    (dict(loss_type="robust", label_smoothing=0.5), "label_smoothing must be in"),
    (dict(loss_type="robust", label_smoothing=0.7), "label_smoothing must be in"),
    (dict(loss_type="cdpo", label_smoothing=-0.1), "label_smoothing must be in"),
    (dict(label_smoothing=0.1), "'cdpo' or 'robust'"),
    (dict(gamma=1.0), "simpo"),
    (dict(loss_type="lndpo"), "chosen_lengths"),
    (dict(loss_type="simpo", chosen_lengths=torch.tensor([3])), "rejected_lengths"),
    (dict(rpo_alpha=-1.0), "rpo_alpha"),
])
def test_bad_options_raise(kwargs, match):
    args = (f64(-10.0), f64(-12.0), f64(-11.0), f64(-11.0))
    for fn in (preference_loss, preference_loss_grad):
        with pytest.raises(ValueError, match=match):
            fn(*args, **kwargs)


# ----------------------------------------------------------------------------------------------
# 3. Sequence log-probs against references, and their gradient

def _batch(N=3, T=6, V=11, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(N, T, V, generator=gen, dtype=dtype)             # (N, T, V)
    labels = torch.randint(0, V, (N, T), generator=gen)                        # (N, T)
    loss_mask = torch.rand(N, T, generator=gen) < 0.6                          # (N, T)
    loss_mask[:, 0], loss_mask[:, -1] = False, True  # position 0 is never predicted; >= 1 response token
    return logits, labels, loss_mask


def _logps64(logits, labels, loss_mask, average=False):
    """Independent float64 oracle: log_softmax, gather, masked sum (written without model.token_logps)."""
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)                 # (N, T-1, V)
    picked = logp.gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]    # (N, T-1)
    mask = loss_mask[:, 1:]
    total = (picked * mask).sum(-1)                                            # (N,)
    return total / mask.sum(-1) if average else total


def test_sequence_logps_matches_cross_entropy_and_a_loop():
    logits, labels, loss_mask = _batch(N=4, T=9, V=17)
    labels = labels.masked_fill(~loss_mask, -100)  # ids at masked positions are ignored
    got = sequence_logps(logits.float(), labels, loss_mask)
    assert got.dtype == torch.float32 and got.shape == (4,)
    targets = labels[:, 1:].masked_fill(~loss_mask[:, 1:], -100)
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="none")  # (N, T-1)
    assert_close(got, -ce.sum(-1).float(), atol=1e-5, rtol=1e-6)
    loop = torch.zeros(4, dtype=torch.float64)
    for i in range(4):
        for t in range(1, 9):
            if loss_mask[i, t]:
                loop[i] += torch.log_softmax(logits[i, t - 1], dim=-1)[labels[i, t]]
    assert_close(got, loop.float(), atol=1e-5, rtol=1e-6)
    assert_close(sequence_logps(logits.float(), labels, loss_mask, average=True),
                 (loop / loss_mask[:, 1:].sum(-1)).float(), atol=1e-5, rtol=1e-6)
    changed = logits.float().clone()
    changed[:, -1] += 100.0  # the last position predicts nothing
    assert torch.equal(sequence_logps(changed, labels, loss_mask), got)


def test_sequence_logps_empty_response_is_zero_not_nan():
    logits, labels, loss_mask = _batch()
    loss_mask[1] = False
    for average in (False, True):
        out = sequence_logps(logits, labels, loss_mask, average=average)
        assert out[1] == 0 and torch.isfinite(out).all()
        grad = sequence_logps_grad(logits, labels, loss_mask, torch.ones(3), average=average)
        assert (grad[1] == 0).all() and torch.isfinite(grad).all()


def test_sequence_logps_bf16_logits_give_float32_result():
    """bf16 logits over a 5000-token vocab: the log-softmax runs in float32, so the result matches a float64
    computation on the same (bf16-rounded) logits, and is near the float32 logits' result."""
    logits, labels, loss_mask = _batch(N=2, T=8, V=5000, dtype=torch.float32)
    logits = 10 * logits
    out = sequence_logps(logits.bfloat16(), labels, loss_mask)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert_close(out, _logps64(logits.bfloat16(), labels, loss_mask).float(), atol=1e-4, rtol=1e-6)
    assert_close(out, sequence_logps(logits, labels, loss_mask), atol=1.0, rtol=0.02)


@pytest.mark.parametrize("average", [False, True])
def test_plain_sequence_logps_grad_matches_autograd(average):
    logits, labels, loss_mask = _batch(N=3, T=6, V=11)
    dlogps = torch.randn(3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert_close(_logps64(logits, labels, loss_mask, average),  # an independent check of sequence_logps
                 sequence_logps(logits, labels, loss_mask, average), atol=1e-12, rtol=0)
    leaf = logits.clone().requires_grad_(True)
    (sequence_logps(leaf, labels, loss_mask, average) * dlogps).sum().backward()  # the "fake loss" trick
    closed = sequence_logps_grad(logits, labels, loss_mask, dlogps, average)
    print(f"\n  max |closed-form - autograd| sequence_logps average={average} "
          f"{(closed - leaf.grad).abs().max().item():.1e}", end="")
    assert closed.dtype == torch.float64
    assert_close(closed, leaf.grad, atol=1e-10, rtol=0)
    leaf32 = logits.float().requires_grad_(True)  # and through sequence_logps itself, in float32
    (sequence_logps(leaf32, labels, loss_mask, average) * dlogps.float()).sum().backward()
    assert_close(sequence_logps_grad(leaf32.detach(), labels, loss_mask, dlogps.float(), average), leaf32.grad,
                 atol=1e-6, rtol=1e-5)


CHAIN_CASES = ["dpo", "ipo", "robust", "simpo rpo", "dpo reference_free"]


@pytest.mark.parametrize("name", CHAIN_CASES)
def test_chain_rule_to_logits_matches_autograd(name):
    """preference_loss_grad composed with sequence_logps_grad == autograd of the mean loss with respect to
    the logits of 2B stacked rows (chosen rows, then rejected rows)."""
    B, T, V = 3, 7, 13
    logits, labels, loss_mask = _batch(N=2 * B, T=T, V=V, seed=4)           # (2B, T, V)
    reference_logps = -30 * torch.rand(2 * B, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    lengths = loss_mask[:, 1:].sum(-1)                                       # (2B,)
    kwargs = {k: v for k, v in GRAD_CASES[name].items() if k != "lengths"}
    kwargs.update(chosen_lengths=lengths[:B], rejected_lengths=lengths[B:])

    def closed_and_autograd(logits, logps_fn):
        leaf = logits.clone().requires_grad_(True)
        logps = logps_fn(leaf, labels, loss_mask)                            # (2B,)
        preference_loss(logps[:B], logps[B:], reference_logps[:B], reference_logps[B:], **kwargs)[0].mean().backward()
        logps = logps.detach().to(reference_logps.dtype)
        d = preference_loss_grad(logps[:B], logps[B:], reference_logps[:B], reference_logps[B:], **kwargs)
        dlogps = torch.cat([d[0], d[1]])                                     # (2B,)
        return sequence_logps_grad(logits, labels, loss_mask, dlogps), leaf.grad

    closed, auto = closed_and_autograd(logits, _logps64)                     # float64 end to end
    print(f"\n  max |closed-form - autograd| chain {name:18s} {(closed - auto).abs().max().item():.1e}", end="")
    assert_close(closed, auto, atol=1e-10, rtol=0)
    closed, auto = closed_and_autograd(logits.float(), sequence_logps)       # the real float32 path
    assert_close(closed, auto.float(), atol=1e-6, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# Tier 1 of the exercises: plain DPO only (dpo_loss, dpo_loss_grad, sequence_logps_grad); `-k plain` selects these
# and the sequence_logps_grad test above. No loss variant (preference_loss_grad) is needed to pass them.

def _pairs64(B=5, seed=6):
    g = torch.Generator().manual_seed(seed)
    return [-40 * torch.rand(B, generator=g, dtype=torch.float64) for _ in range(4)]  # pi_w, pi_l, ref_w, ref_l


def test_plain_dpo_loss_by_hand():
    """Policy (-10, -12), reference (-11, -11), beta 0.1: h = 2 - 0 = 2, loss = -log sigmoid(0.2) = A (see HAND),
    rewards 0.1 * (-10 + 11) = 0.1 and 0.1 * (-12 + 11) = -0.1."""
    losses, chosen_rewards, rejected_rewards = dpo_loss(f64(-10.0), f64(-12.0), f64(-11.0), f64(-11.0), beta=0.1)
    assert losses.item() == pytest.approx(A, abs=1e-12)
    assert (chosen_rewards.item(), rejected_rewards.item()) == pytest.approx((0.1, -0.1), abs=1e-12)


def test_plain_dpo_loss_equals_the_dpo_variant_exactly():
    """What trains by default (dpo_loss) and preference_loss(loss_type="dpo") give the same bits."""
    for dtype in (torch.float32, torch.float64):
        args = [x.to(dtype) for x in _pairs64()]
        for ours, variant in zip(dpo_loss(*args, beta=0.1), preference_loss(*args, beta=0.1)):
            assert_close(ours, variant, atol=0, rtol=0)


def test_plain_dpo_loss_grad_matches_autograd():
    """The gradient (Section 4's unnumbered equation) by hand: dL/dlog pi(y_w) = -(beta/B) sigmoid(-beta h) = -dL/dlog pi(y_l), against autograd of the mean loss."""
    pi_w, pi_l, ref_w, ref_l = _pairs64()
    for beta in (0.1, 0.5, 2.0):
        leaves = [pi_w.clone().requires_grad_(True), pi_l.clone().requires_grad_(True)]
        dpo_loss(*leaves, ref_w, ref_l, beta=beta)[0].mean().backward()
        d_chosen, d_rejected = dpo_loss_grad(pi_w, pi_l, ref_w, ref_l, beta=beta)
        assert_close(d_chosen, leaves[0].grad, atol=1e-12, rtol=0)
        assert_close(d_rejected, leaves[1].grad, atol=1e-12, rtol=0)
        assert (d_chosen < 0).all() and (d_rejected > 0).all()  # descent raises log pi(y_w), lowers log pi(y_l)


def test_plain_chain_rule_to_logits_matches_autograd():
    """dpo_loss_grad composed with sequence_logps_grad == autograd of the mean DPO loss with respect to the logits
    of 2B stacked rows (chosen rows, then rejected rows), in float64."""
    B, T, V = 3, 7, 13
    logits, labels, loss_mask = _batch(N=2 * B, T=T, V=V, seed=4)           # (2B, T, V)
    reference_logps = -30 * torch.rand(2 * B, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    leaf = logits.clone().requires_grad_(True)
    logps = sequence_logps(leaf, labels, loss_mask)                         # (2B,)
    dpo_loss(logps[:B], logps[B:], reference_logps[:B], reference_logps[B:])[0].mean().backward()
    logps = logps.detach()
    d_chosen, d_rejected = dpo_loss_grad(logps[:B], logps[B:], reference_logps[:B], reference_logps[B:])
    closed = sequence_logps_grad(logits, labels, loss_mask, torch.cat([d_chosen, d_rejected]))
    assert_close(closed, leaf.grad, atol=1e-10, rtol=0)


# ----------------------------------------------------------------------------------------------
# Plackett-Luce rankings (Appendix A.3): `-k plackett` selects these

def test_plackett_luce_with_two_responses_is_dpo():
    pi_w, pi_l, ref_w, ref_l = _pairs64()
    losses, rewards = plackett_luce_loss(torch.stack([pi_w, pi_l], 1), torch.stack([ref_w, ref_l], 1), beta=0.3)
    dpo_losses, chosen_rewards, rejected_rewards = dpo_loss(pi_w, pi_l, ref_w, ref_l, beta=0.3)
    assert_close(losses, dpo_losses, atol=1e-12, rtol=0)
    assert_close(rewards, torch.stack([chosen_rewards, rejected_rewards], 1), atol=1e-12, rtol=0)


def test_plackett_luce_three_responses_by_hand():
    """Rewards (beta 1, reference 0) 2, 1, 0 for the ranking best first:
    -log[e^2 / (e^2 + e^1 + e^0)] - log[e^1 / (e^1 + e^0)] = log(1 + e^-1 + e^-2) + log(1 + e^-1)
    = 0.4076059644 + 0.3132616875 = 0.7208676519."""
    losses, rewards = plackett_luce_loss(f64(2.0, 1.0, 0.0)[None], torch.zeros(1, 3, dtype=torch.float64), beta=1.0)
    assert losses.item() == pytest.approx(0.7208676519, abs=1e-9)
    assert rewards.tolist() == [[2.0, 1.0, 0.0]]
    reversed_ranking, _ = plackett_luce_loss(f64(0.0, 1.0, 2.0)[None], torch.zeros(1, 3, dtype=torch.float64), beta=1.0)
    assert reversed_ranking.item() > losses.item()  # the ranking the rewards contradict costs more


@pytest.mark.parametrize("K", [2, 3, 4, 6])
def test_plackett_luce_grad_matches_autograd(K):
    g = torch.Generator().manual_seed(K)
    policy = -40 * torch.rand(5, K, generator=g, dtype=torch.float64)
    reference = -40 * torch.rand(5, K, generator=g, dtype=torch.float64)
    for beta in (0.1, 1.0):
        leaves = [policy.clone().requires_grad_(True), reference.clone().requires_grad_(True)]
        plackett_luce_loss(*leaves, beta=beta)[0].mean().backward()
        d_policy, d_reference = plackett_luce_loss_grad(policy, reference, beta=beta)
        assert_close(d_policy, leaves[0].grad, atol=1e-12, rtol=0)
        assert_close(d_reference, leaves[1].grad, atol=1e-12, rtol=0)
        assert_close(d_policy.sum(-1), torch.zeros(5, dtype=torch.float64), atol=1e-12, rtol=0)  # a shift of all: no change


def test_chosen_logp_falls_while_the_margin_grows():
    """Tier 5: why rewards/chosen can fall (dpo.py's docstring, (b)-(c)). A unigram model, one softmax p = softmax(z)
    shared by every position, and one pair: chosen "a b", rejected "a a". log pi(y_w) = log p_a + log p_b,
    log pi(y_l) = 2 log p_a, so the margin is log p_b - log p_a and a gradient step moves z along e_b - e_a. To
    first order that changes log pi(y_w) by (e_a + e_b - 2p) . (e_b - e_a) = 2 (p_a - p_b) times the step: when b is
    already likelier than a, the chosen response LOSES probability while the margin grows, because it shares token
    a (and the normaliser) with the rejected one. Exact, with the project's sequence_logps and dpo_loss."""
    a, b, lr = 0, 1, 0.02
    z = torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64, requires_grad=True)  # p_b > p_a
    labels = torch.tensor([[2, a, b], [2, a, a]])  # a one-token prompt (2), then chosen / rejected
    loss_mask = torch.tensor([[False, True, True], [False, True, True]])

    def logps(z):
        return sequence_logps(z.expand(2, 3, 3), labels, loss_mask)  # (2,) every position predicts with softmax(z)
    ref = logps(z).detach()
    loss = dpo_loss(logps(z)[:1], logps(z)[1:], ref[:1], ref[1:], beta=1.0)[0].mean()
    loss.backward()
    with torch.no_grad():
        new = logps(z - lr * z.grad)
        p = torch.softmax(z, -1)
    margin_change = (new[0] - new[1]) - (ref[0] - ref[1])
    chosen_change = new[0] - ref[0]
    assert margin_change > 0 and chosen_change < 0  # the margin grows, the chosen log-prob falls
    step = lr * z.grad.norm() / math.sqrt(2)  # dz = step * (e_b - e_a), and |e_b - e_a| = sqrt(2)
    assert_close(chosen_change, 2 * (p[a] - p[b]) * step, rtol=0.02, atol=0)  # first order in the step
