"""The paper's theory on the enumerable toy (toy.py): DPO's minimiser is pi* = pi_ref exp(r/beta)/Z (Eq. 4), a
trained policy's implicit reward is r up to a per-prompt constant (Theorem 1), and a prompt-only shift of r
changes neither pi* nor the preferences (Lemmas 1-2). `-k toy` selects them."""
import torch
from torch.testing import assert_close

import toy


def test_toy_soft_labels_reach_pi_star_exactly():
    """With the expected (soft) label on every pair the DPO loss's minimiser is pi* itself, so what is left is
    optimisation error: float64 L-BFGS to gradient 1e-12. KL is quadratic in the logit error, so KL < 1e-9
    means log pi within ~1e-4 of log pi*; measured: ~2e-12."""
    t = toy.make_toy(seed=3)
    star = toy.optimal_logprobs(t.ref_logprobs, t.reward, t.beta)
    theta = toy.fit(lambda th: toy.expected_loss(th, t), t.ref_logprobs, steps=20)
    assert toy.kl(t.ref_logprobs, star).mean() > 0.1  # there was somewhere to go
    assert toy.kl(torch.log_softmax(theta, -1), star).max() < 1e-9


def test_toy_theorem1_implicit_reward_is_r_up_to_a_prompt_constant():
    t = toy.make_toy(seed=4, n_prompts=4)
    theta = toy.fit(lambda th: toy.expected_loss(th, t), t.ref_logprobs, steps=20)
    gap = toy.implicit_reward(theta, t) - t.reward  # (P, N): the same number across each prompt's responses
    assert gap.std(-1).max() < 1e-4
    assert gap.mean(-1).std() > 1e-3  # ... but not across prompts: the constant is beta log Z(x), per prompt


def test_toy_lemmas_a_prompt_only_shift_of_the_reward_changes_nothing():
    t = toy.make_toy(seed=5)
    shift = torch.randn(t.reward.shape[0], 1, dtype=torch.float64) * 10  # f(x)
    assert_close(toy.optimal_logprobs(t.ref_logprobs, t.reward + shift, t.beta),
                 toy.optimal_logprobs(t.ref_logprobs, t.reward, t.beta), atol=1e-12, rtol=0)  # Lemma 2: same pi*
    shifted = toy.Toy(t.ref_logprobs, t.reward + shift, t.beta)
    assert_close(toy.all_pairs(shifted)[4], toy.all_pairs(t)[4], atol=1e-12, rtol=0)  # Lemma 1: same preferences


def test_toy_hard_labels_approach_pi_star_as_pairs_grow():
    """Sampled pairs with coin-flip labels: the fit is a maximum-likelihood estimate of the reward differences, so
    KL(pi || pi*) falls roughly like 1/n (toy.py printed 0.79, 0.010, 0.0020, 0.00025 for 1e2..1e5 pairs: with
    100, pairs seen once with one label drive their margins to infinity, and the fit is worse than pi_ref)."""
    t = toy.make_toy()
    star = toy.optimal_logprobs(t.ref_logprobs, t.reward, t.beta)
    g = torch.Generator().manual_seed(1)
    kls = []
    for n in (300, 20_000):
        x, chosen, rejected = toy.sample_pairs(t, n, g)
        theta = toy.fit(lambda th: toy.pairs_loss(th, t, x, chosen, rejected), t.ref_logprobs, steps=15)
        kls.append(toy.kl(torch.log_softmax(theta, -1), star).mean().item())
    assert kls[1] < kls[0] / 5 and kls[1] < 0.02, kls
