"""ppo.py, formula by formula: GAE against a per-sequence Python loop; whitening, the clipped losses, reward shaping
and the KL controller against hand arithmetic; rollout log-probs against a fresh forward without the KV cache; the
Bradley-Terry reward model; best-of-N's KL against exact enumeration; and the whole PPO update converging to
pi* = pi_ref exp(r/beta)/Z (Eq. 4) on toy.py's enumerable problem. `-k ppo` selects them."""
import math
import time

import pytest
import torch
from torch.testing import assert_close

import ppo
import toy
from machinery.lora import train_only_head
from model import GPT, GPTConfig


@pytest.fixture(autouse=True)
def one_thread():
    """Every test here runs ops of a few thousand elements, where a second thread's start-up and barriers cost more
    than the work (as in eval.train_classifier); on a busy 2-core machine, 10-40x more: the reward-model test took
    22 s with two threads and 0.5 s with one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_gpt(vocab_size=16, seed=0, tied=True):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32,
                         tie_word_embeddings=tied)).eval()


# ---- GAE, whitening, the losses, reward shaping, the KL controller

def slow_gae(rewards, values, lengths, gamma, lam):
    """One sequence at a time, in Python floats: delta_t = r_t + gamma V_{t+1} - V_t (V_L = 0), A_t = sum_l
    (gamma lam)^l delta_{t+l}, R_t = A_t + V_t."""
    advantages, returns = torch.zeros_like(rewards), torch.zeros_like(rewards)
    for i, L in enumerate(lengths):
        r, v = rewards[i, :L].tolist(), values[i, :L].tolist() + [0.0]
        for t in range(L):
            a = sum((gamma * lam) ** k * (r[t + k] + gamma * v[t + k + 1] - v[t + k]) for k in range(L - t))
            advantages[i, t], returns[i, t] = a, a + v[t]
    return advantages, returns


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_ppo_gae_matches_a_per_sequence_loop(gamma, lam):
    g = torch.Generator().manual_seed(0)
    lengths = [7, 1, 3, 5, 2]
    mask = torch.arange(7) < torch.tensor(lengths)[:, None]  # (5, 7) right-padded responses
    rewards = torch.randn(5, 7, generator=g, dtype=torch.float64) * mask
    values = torch.randn(5, 7, generator=g, dtype=torch.float64)  # junk past the end: must be ignored
    advantages, returns = ppo.gae(rewards, values, mask, gamma, lam)
    expected_advantages, expected_returns = slow_gae(rewards, values, lengths, gamma, lam)
    assert_close(advantages, expected_advantages, atol=1e-12, rtol=0)
    assert_close(returns, expected_returns, atol=1e-12, rtol=0)
    if gamma == lam == 1.0:  # lambda = 1: the Monte Carlo return minus the baseline, R_t = sum_{k>=t} r_k
        assert_close(returns, rewards.flip(1).cumsum(1).flip(1) * mask, atol=1e-12, rtol=0)


def test_ppo_whiten_by_hand():
    """x = 1, 2, 3 (and 99 masked): mean 2, population variance (1 + 0 + 1) / 3 = 2/3, so (x - 2) / sqrt(2/3)
    = -sqrt(1.5), 0, sqrt(1.5) = -1.2247..., 0, 1.2247...; the masked entry becomes 0."""
    x = torch.tensor([[1.0, 2.0, 3.0, 99.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False]])
    assert_close(ppo.whiten(x, mask, eps=0.0), torch.tensor([[-1.5 ** 0.5, 0.0, 1.5 ** 0.5, 0.0]], dtype=torch.float64))


def test_ppo_policy_loss_by_hand_clipped_and_not():
    """clip 0.2, so the ratio is clipped to [0.8, 1.2]; each token's term is max(-A rho, -A clip(rho)):
        a: A = +1, rho = 1.5: max(-1.5, -1.2) = -1.2   clipped (rho past 1 + eps in A's direction: no gradient)
        b: A = +1, rho = 0.5: max(-0.5, -0.8) = -0.5   not clipped (rho moved against A: the gradient stays)
        c: A = -2, rho = 1.5: max( 3.0,  2.4) =  3.0   not clipped
        d: A = -2, rho = 0.5: max( 1.0,  1.6) =  1.6   clipped
        e: masked
    loss = (-1.2 - 0.5 + 3.0 + 1.6) / 4 = 0.725, clip fraction 2/4. d loss / d logp_new = -A rho / 4 where not
    clipped: b -1 * 0.5 / 4 = -0.125, c 2 * 1.5 / 4 = 0.75, and 0 at a, d, e."""
    ratio = torch.tensor([[1.5, 0.5, 1.5, 0.5, 7.0]], dtype=torch.float64)
    logp_old = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -1.0]], dtype=torch.float64)
    logp_new = (logp_old + ratio.log()).requires_grad_(True)
    advantages = torch.tensor([[1.0, 1.0, -2.0, -2.0, 5.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, True, False]])
    loss, clip_fraction = ppo.policy_loss(logp_new, logp_old, advantages, mask, clip=0.2)
    assert_close(loss, torch.tensor(0.725, dtype=torch.float64))
    assert clip_fraction.item() == 0.5
    loss.backward()
    assert_close(logp_new.grad, torch.tensor([[0.0, -0.125, 0.75, 0.0, 0.0]], dtype=torch.float64))


def test_ppo_value_loss_by_hand_clipped_and_not():
    """clip 0.2, V_old = 1 everywhere, so V_clip = clip(V, 0.8, 1.2):
        a: V 1.5, R 2.0: V_clip 1.2; max((1.5-2)^2, (1.2-2)^2) = max(0.25, 0.64) = 0.64   clipped term wins
        b: V 1.5, R 1.0: V_clip 1.2; max(0.25, 0.04) = 0.25                               unclipped wins
        c: V 1.1, R 3.0: V_clip 1.1; max(3.61, 3.61) = 3.61                               inside the range
        d: masked
    loss = 0.5 * (0.64 + 0.25 + 3.61) / 3 = 0.75, clip fraction 1/3."""
    values_new = torch.tensor([[1.5, 1.5, 1.1, 9.0]], dtype=torch.float64)
    returns = torch.tensor([[2.0, 1.0, 3.0, -9.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False]])
    loss, clip_fraction = ppo.value_loss(values_new, torch.ones_like(values_new), returns, mask, clip=0.2)
    assert_close(loss, torch.tensor(0.75, dtype=torch.float64))
    assert_close(clip_fraction.item(), 1 / 3)


def test_ppo_shaped_rewards_by_hand():
    """kl_coef 0.5, r_t = -0.5 (logp - ref_logp), the score added at the last response token:
        row 0 (3 tokens): logp - ref = 0.5, -1, 0   -> -0.25, 0.5, 0 + 2 (score)   = -0.25, 0.5, 2.0
        row 1 (2 tokens): logp - ref = -0.1, 0.4, - -> 0.05, -0.2 - 1 (score), 0   = 0.05, -1.2, 0"""
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -0.3, -9.0]], dtype=torch.float64)
    ref_logp = torch.tensor([[-1.5, -1.0, -0.5], [-0.1, -0.7, -1.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    rewards = ppo.shaped_rewards(torch.tensor([2.0, -1.0]), logp, ref_logp, mask, kl_coef=0.5)
    assert_close(rewards, torch.tensor([[-0.25, 0.5, 2.0], [0.05, -1.2, 0.0]], dtype=torch.float64))


def test_ppo_kl_controllers_by_hand():
    """AdaptiveKL(0.2, target 6, horizon 10000):
        KL 9,   64 rollouts:    error = clip(9/6 - 1 = 0.5)  = 0.2;  0.2 * (1 + 0.2 * 64/10000)  = 0.200256
        KL 5.4, 100 rollouts:   error = 5.4/6 - 1 = -0.1;  0.200256 * (1 - 0.1 * 100/10000)       = 0.200055744
        KL 0,   10000 rollouts: error = clip(-1) = -0.2;   0.200055744 * (1 - 0.2)               = 0.1600445952
    FixedKL never moves."""
    controller = ppo.AdaptiveKL(0.2, target=6.0, horizon=10000)
    for kl, n, expected in ((9.0, 64, 0.200256), (5.4, 100, 0.200055744), (0.0, 10000, 0.1600445952)):
        controller.update(kl, n)
        assert controller.value == pytest.approx(expected, rel=1e-12)
    fixed = ppo.FixedKL(0.1)
    fixed.update(100.0, 64)
    assert fixed.value == 0.1


# ---- Rollouts

def test_ppo_rollout_logps_equal_a_fresh_forward_without_cache():
    """The log-probs kept while sampling with the KV cache (left-padded prompts of 2-6 tokens, responses stopped
    by EOS at different lengths) equal each sequence's own forward, one row at a time without padding or cache,
    and equal response_logps, the batched forward the PPO update uses (so rho = 1 before the first step)."""
    eos = 1
    policy = tiny_gpt()
    prompts = [[eos, 5], [eos, 3, 4, 9], [eos, 2, 2, 2, 8, 7], [eos, 6, 6], [eos, 11], [eos, 12, 13, 14, 15]] * 2
    roll = ppo.rollout(policy, prompts, max_new_tokens=12, eos_id=eos, generator=torch.Generator().manual_seed(0))
    lengths = roll.mask.sum(-1)
    assert len(set(lengths.tolist())) > 2 and (lengths < 12).any()  # responses of different lengths, some by EOS
    assert bool((roll.mask == (torch.arange(roll.mask.size(1)) < lengths[:, None])).all())  # a prefix of each row
    assert bool((roll.response[~roll.mask] == 0).all()) and bool((roll.logps[~roll.mask] == 0).all())
    for i, (prompt, sequence) in enumerate(zip(prompts, roll.sequences())):
        response = roll.response[i, :lengths[i]]
        assert sequence == prompt + response.tolist()
        assert response[-1] == eos or lengths[i] == 12
        with torch.no_grad():
            logits = policy(torch.tensor([sequence]))[0, len(prompt) - 1:-1]  # (L, V) predicts the response
        assert_close(roll.logps[i, :lengths[i]], torch.log_softmax(logits, -1)[torch.arange(len(response)), response],
                     atol=1e-5, rtol=0)
    with torch.no_grad():
        assert_close(ppo.response_logps(policy, roll) * roll.mask, roll.logps, atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk", [1, 5, 12, 64])
def test_ppo_reference_logps_and_values_in_chunks_equal_one_pass(chunk):
    """The chunked pass ppo_step makes (the GPU preset: 1,024 rollouts in chunks of 64) equals one pass over the
    whole batch, row for row, with a non-zero value head; chunks of 5 leave a ragged last chunk of 2."""
    eos = 1
    policy, reference = tiny_gpt(seed=0), tiny_gpt(seed=1)
    prompts = [[eos, 5], [eos, 3, 4, 9], [eos, 2, 2, 2, 8, 7], [eos, 6, 6], [eos, 11], [eos, 12, 13, 14, 15]] * 2
    roll = ppo.rollout(policy, prompts, max_new_tokens=8, eos_id=eos, generator=torch.Generator().manual_seed(0))
    value_head = ppo.ValueHead(32)
    torch.nn.init.normal_(value_head.linear.weight)
    ref_logps, values = ppo.reference_logps_and_values(reference, policy, value_head, roll, chunk)
    with torch.no_grad():
        expected_values = value_head(ppo.response_hidden(policy, roll))
        assert_close(ref_logps, ppo.response_logps(reference, roll), atol=1e-5, rtol=0)
    assert_close(values, expected_values, atol=1e-5, rtol=0)
    assert values.abs().mean() > 0.1 and ref_logps.shape == values.shape == roll.response.shape


# ---- The reward model

def test_ppo_reward_model_loss_is_bradley_terry():
    """-log sigmoid(d) = log(1 + exp(-d)) for d = s_w - s_l = 1, -2, 0.5: the mean of log(1 + e^-1),
    log(1 + e^2), log(1 + e^-0.5); accuracy 2/3 (the second pair is misranked)."""
    chosen, rejected = torch.tensor([1.0, 0.0, 3.0]), torch.tensor([0.0, 2.0, 2.5])
    loss, accuracy = ppo.reward_model_loss(chosen, rejected)
    expected = (math.log1p(math.exp(-1)) + math.log1p(math.exp(2)) + math.log1p(math.exp(-0.5))) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert accuracy.item() == pytest.approx(2 / 3)


def marker_pairs(n, marker, generator):
    """Pairs in imdb.make_pairs' format where the chosen response contains `marker` and the rejected one not."""
    def response(with_marker):
        length = int(torch.randint(3, 7, (1,), generator=generator))
        tokens = [t for t in torch.randint(2, 32, (length,), generator=generator).tolist() if t != marker] or [2]
        if with_marker:
            tokens.insert(int(torch.randint(len(tokens) + 1, (1,), generator=generator)), marker)
        return tokens
    prompts = [[1] + torch.randint(2, 32, (int(torch.randint(1, 4, (1,), generator=generator)),),
                                   generator=generator).tolist() for _ in range(n)]
    return [{"prompt_ids": p, "chosen_ids": response(True), "rejected_ids": response(False)} for p in prompts]


@pytest.mark.parametrize("train_trunk,n_embd,lr,epochs", [(False, 256, 2e-2, 4), (True, 32, 3e-3, 3)])
def test_ppo_reward_model_ranks_held_out_pairs(train_trunk, n_embd, lr, epochs):
    """A tiny random GPT, pairs whose chosen response holds token 7 somewhere: the trained reward model ranks > 90%
    of held-out pairs right (measured over seeds 0-3: 99-100% with the head only, 98-100% with the trunk
    trained; chance is 50%). The head-only probe needs hidden states wider than the 32-token vocabulary: at
    n_embd 32 the random trunk's last hidden state mixes the marker with the other tokens' directions and a
    linear head reaches 72-77%, at 128 86-97%. The trunk it was given is not modified."""
    g = torch.Generator().manual_seed(0)
    train_pairs, held_out = marker_pairs(300, 7, g), marker_pairs(200, 7, g)
    torch.manual_seed(0)
    trunk = GPT(GPTConfig(vocab_size=32, block_size=64, n_layer=1, n_head=2, n_embd=n_embd)).eval()
    before = {k: v.clone() for k, v in trunk.state_dict().items()}
    model, accuracy = ppo.train_reward_model(trunk, train_pairs, train_trunk=train_trunk, epochs=epochs, lr=lr)
    assert accuracy(held_out) > 0.9
    assert all(torch.equal(v, trunk.state_dict()[k]) for k, v in before.items())
    scores = model.score([p["prompt_ids"] + p["chosen_ids"] for p in held_out[:3]])
    assert scores.shape == (3,)


# ---- Best-of-N

def best_of_n_distribution(p, reward, n):
    """Exact pi_bon over K outcomes with distinct rewards: P(best of n = y) = F(y)^n - F_-(y)^n, where F(y) is the
    probability of a reward <= r(y) and F_-(y) of a reward < r(y)."""
    order = reward.argsort()
    F = p[order].cumsum(0)                                         # (K,) in reward order
    q = torch.empty_like(p)
    q[order] = F ** n - (F - p[order]).clamp(min=0) ** n
    return q


def test_ppo_best_of_n_picks_the_highest_score():
    assert ppo.best_of_n(torch.tensor([[0.1, 0.9, 0.3], [2.0, -1.0, 5.0]])).tolist() == [1, 2]


def test_ppo_best_of_n_kl_is_the_continuous_limit_and_an_upper_bound():
    """Enumerate pi_bon exactly. (a) The enumeration matches sampling (best_of_n over draws). (b) With 100,000
    equally likely outcomes (a nearly continuous reward) KL(pi_bon || pi) equals log n - (n-1)/n (measured:
    below it by at most 1.2e-9 for n <= 16; tolerance 1e-6). (c) On a 6-outcome distribution it is strictly
    below the formula, an upper bound (measured: 0.158 vs 0.193 at n = 2, 0.452 vs 0.636 at 4, 1.478 vs 1.835
    at 16); for two equally likely outcomes and n = 2, 1/4 log 1/2 + 3/4 log 3/2 = 0.131 vs log 2 - 1/2 = 0.193."""
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
    reward = torch.randn(6, generator=g, dtype=torch.float64)
    draws = torch.multinomial(p, 200_000 * 4, replacement=True, generator=g).view(200_000, 4)  # (M, n=4)
    picked = draws[torch.arange(len(draws)), ppo.best_of_n(reward[draws])]
    frequency = torch.bincount(picked, minlength=6).double() / len(draws)
    q = best_of_n_distribution(p, reward, 4)
    assert_close(frequency, q, atol=4e-3, rtol=0)  # (a) std of a frequency <= 0.5 / sqrt(200,000) = 1.1e-3
    kl = lambda q, p: (q * (q / p).log()).sum().item()  # noqa: E731
    uniform = torch.full((100_000,), 1e-5, dtype=torch.float64)
    for n in (1, 2, 4, 16):
        assert kl(best_of_n_distribution(uniform, torch.arange(100_000.0), n), uniform) == pytest.approx(
            ppo.best_of_n_kl(n), abs=1e-6)  # (b)
        assert kl(best_of_n_distribution(p, reward, n), p) < ppo.best_of_n_kl(n) - 1e-3 or n == 1  # (c)
    half = torch.tensor([0.5, 0.5], dtype=torch.float64)
    assert kl(best_of_n_distribution(half, torch.tensor([0.0, 1.0]), 2), half) == pytest.approx(
        0.25 * math.log(0.5) + 0.75 * math.log(1.5))


# ---- The whole update: PPO reaches pi* on the enumerable toy

def test_ppo_toy_converges_to_pi_star():
    """PPO with a fixed KL coefficient beta and the known reward reaches pi* = pi_ref exp(r/beta)/Z (Eq. 4) on
    toy.make_toy(3 prompts, 6 responses, beta 1): a tabular policy softmax(theta[x]) and a tabular value V[x],
    one-token responses (T = 1), 64 samples per prompt per iteration, updated by ppo.py's own shaped_rewards,
    gae, whiten and ppo_update (clipped surrogate + 0.1 * clipped value loss, 4 epochs, gradient clipping).

    Why pi*: with the penalty inside the reward, R = r - beta (log pi - log pi_ref), E[grad log pi * R] =
    grad(E[r] - beta KL) because E[grad log pi] = 0 (ppo.py step 3), so the fixed point is pi*; there R =
    beta log Z(x) for every response, so V converges to beta log Z(x) too.
    Measured (AdamW lr 0.01, no weight decay, seeds 0-4): KL(pi || pi*) 0.397 at pi_ref, 8e-4 to 9e-4 after 50
    iterations, 1.0e-4 to 1.9e-4 after 150 (the floor: the sampling noise of 192 samples an iteration under a
    constant step size; 300 iterations stay there). The tolerance 1e-3 is 5x that floor and 400x below the start.
    V within 0.002 of beta log Z (tolerance 0.02). About 1 s on one thread (tolerance 10 s)."""
    t = toy.make_toy(n_prompts=3, n_responses=6, beta=1.0)
    ref_logprobs, reward = t.ref_logprobs.float(), t.reward.float()                   # (P, N)
    star = toy.optimal_logprobs(t.ref_logprobs, t.reward, t.beta)
    P, N = ref_logprobs.shape
    theta = ref_logprobs.clone().requires_grad_(True)                                 # pi starts at pi_ref
    V = torch.zeros(P, requires_grad=True)
    cfg = ppo.PPOConfig(ppo_epochs=4, minibatch_size=3 * 64, adaptive_kl=False, kl_coef=t.beta)
    optimizer = torch.optim.AdamW([theta, V], lr=0.01, weight_decay=cfg.weight_decay)  # as train_ppo
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    x = torch.arange(P).repeat_interleave(64)                                         # (B,) the prompt of each rollout
    mask = torch.ones(len(x), 1, dtype=torch.bool)                                    # (B, T=1)
    log_pi = lambda: torch.log_softmax(theta, -1)  # noqa: E731                       # (P, N)
    start = time.time()
    for iteration in range(150):
        with torch.no_grad():
            y = torch.multinomial(log_pi().exp()[x], 1, generator=g).squeeze(1)       # (B,) sampled responses
            logps = log_pi()[x, y][:, None]                                           # (B, 1)
            rewards = ppo.shaped_rewards(reward[x, y], logps, ref_logprobs[x, y][:, None], mask, cfg.kl_coef)
            values = V[x][:, None].clone()                                            # (B, 1)
            advantages, returns = ppo.gae(rewards, values, mask, cfg.gamma, cfg.lam)
        batch = {"logps": logps, "values": values, "advantages": ppo.whiten(advantages, mask), "returns": returns,
                 "mask": mask}
        evaluate = lambda rows: (log_pi()[x[rows], y[rows]][:, None], V[x[rows]][:, None])  # noqa: E731
        ppo.ppo_update(batch, evaluate, optimizer, cfg)
    seconds = time.time() - start
    final = log_pi().detach().double()
    assert toy.kl(t.ref_logprobs, star).mean() > 0.3                                 # far from pi* at the start
    assert toy.kl(final, star).mean() < 1e-3, toy.kl(final, star)
    log_Z = torch.logsumexp(t.ref_logprobs + t.reward / t.beta, -1)                  # (P,)
    assert_close(V.detach().double(), t.beta * log_Z, atol=0.02, rtol=0)
    assert seconds < 10, seconds


# ---- train_ppo end to end on a tiny GPT

def test_ppo_train_ppo_raises_the_reward_and_keeps_the_trunk():
    """A tiny GPT, head-only (machinery.lora.train_only_head, the CPU preset's rule), reward = the share of response
    tokens equal to 5: the score rises (measured, seeds 0-2: from 0.05-0.08 at the first iteration to a mean of
    0.27-0.49 over iterations 6-8), the trunk does not move, the KL coefficient adapts, and the callback sees
    every iteration."""
    eos = 1
    policy = train_only_head(tiny_gpt(tied=False))  # untied, as the CPU preset's SFT model (sft.py)
    reference = tiny_gpt(tied=False)                # the same weights
    trunk_before = {k: v.clone() for k, v in policy.state_dict().items() if not k.startswith("lm_head")}
    prompts = [[eos, i] for i in range(2, 16)]

    def reward_fn(sequences):
        return torch.tensor([sum(t == 5 for t in s[2:]) / max(1, len(s) - 2) for s in sequences])
    seen = []
    cfg = ppo.PPOConfig(iterations=8, batch_size=32, minibatch_size=16, lr=3e-2, max_new_tokens=8, kl_coef=0.05,
                        kl_target=1.0, kl_horizon=100, eos_id=eos)
    history = ppo.train_ppo(policy, reference, reward_fn, prompts, cfg, log=None,
                            callback=lambda iteration, model, stats: seen.append(iteration))
    assert seen == list(range(1, 9)) and len(history) == 8
    assert abs(history[0]["kl"]) < 1e-5  # the first rollout comes from pi = pi_ref
    assert {"score", "kl", "kl_coef", "policy_loss", "value_loss", "clip_fraction", "length"} <= set(history[0])
    first, last = history[0]["score"], sum(h["score"] for h in history[-3:]) / 3
    assert last > first + 0.1, [round(h["score"], 3) for h in history]
    assert history[-1]["kl_coef"] != history[0]["kl_coef"]
    assert all(torch.equal(v, policy.state_dict()[k]) for k, v in trunk_before.items())


def test_ppo_value_lr_trains_the_value_head_alone_when_the_policy_lr_is_zero():
    """value_lr is the value head's own learning rate: with lr 0 the policy stays bit-identical (every rollout comes
    from pi_ref, so the sampled KL is 0 throughout) while the value head, at value_lr, fits the returns (a score of
    1 at the last token, no KL, gamma = lambda = 1: R_t = 1 everywhere), from a loss of 0.5 * (0 - 1)^2 = 0.5 at
    V = 0 (the first minibatch) to under 0.05. With value_lr None it takes lr, here 0: the loss stays 0.5."""
    policy = train_only_head(tiny_gpt(tied=False))
    reference = tiny_gpt(tied=False)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    prompts = [[1, i] for i in range(2, 16)]
    reward_fn = lambda sequences: torch.ones(len(sequences))  # noqa: E731
    losses = {}
    for value_lr in (0.05, None):
        cfg = ppo.PPOConfig(iterations=6, batch_size=16, minibatch_size=16, lr=0.0, value_lr=value_lr,
                            max_new_tokens=4, kl_coef=0.1, adaptive_kl=False, lam=1.0, value_clip=10.0, eos_id=1)
        history = ppo.train_ppo(policy, reference, reward_fn, prompts, cfg, log=None)
        assert all(torch.equal(v, policy.state_dict()[k]) for k, v in before.items())
        assert all(abs(h["kl"]) < 1e-5 for h in history)
        losses[value_lr] = [h["value_loss"] for h in history]
    assert losses[0.05][-1] < 0.05 and losses[0.05][-1] < losses[0.05][0] < 0.5, losses
    assert all(abs(v - 0.5) < 1e-6 for v in losses[None]), losses
