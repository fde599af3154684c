"""The paper's theory on a problem small enough to list every response: DPO's minimiser is the KL-constrained
optimum pi* = pi_ref * exp(r / beta) / Z (Section 4, Eq. 4), and a trained policy is a reward model up to a
prompt-only shift (Section 5.1, Lemmas 1-2, Theorem 1).

    python toy.py                     # prints KL(pi || pi*) as DPO trains; writes results/toy.png
    python -m pytest -q test_toy.py   # the claims below, each checked

The toy: P prompts, each with the same N responses; a reference policy pi_ref(y|x) and a reward r(x, y), both
random; a tabular policy pi(y|x) = softmax(theta[x])_y. Everything is exact: Z(x) is a sum over N responses.

  (a) Expected (soft) labels on every pair: pairs (y, y') drawn from pi_ref, labelled y > y' with the Bradley-Terry
      probability sigmoid(r(x,y) - r(x,y')). The expected DPO loss is minimised exactly where
      beta * log pi/pi_ref(y) - beta * log pi/pi_ref(y') = r(x,y) - r(x,y') for every pair, i.e. at pi = pi*.
  (b) Sampled hard labels (what real data is): n pairs, each drawn from pi_ref and labelled by a coin with the
      Bradley-Terry probability; KL(pi || pi*) shrinks as n grows.
  (c) Theorem 1: after (a), the implicit reward beta * log pi/pi_ref equals r up to a per-prompt constant.

The loss is dpo.py's dpo_loss on the log-probs of the pairs: the same function the trainer uses.
"""
import dataclasses
import os
import sys

import torch
import torch.nn.functional as F

from dpo import dpo_loss


@dataclasses.dataclass
class Toy:
    ref_logprobs: torch.Tensor  # (P, N) log pi_ref(y|x)
    reward: torch.Tensor        # (P, N) r(x, y)
    beta: float


def make_toy(n_prompts=3, n_responses=6, beta=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    ref_logprobs = torch.log_softmax(torch.randn(n_prompts, n_responses, generator=g, dtype=torch.float64), -1)
    reward = torch.randn(n_prompts, n_responses, generator=g, dtype=torch.float64)
    return Toy(ref_logprobs, reward, beta)


def optimal_logprobs(ref_logprobs, reward, beta):
    """log pi*(y|x) = log pi_ref(y|x) + r(x,y)/beta - log Z(x), Z(x) = sum_y pi_ref(y|x) exp(r(x,y)/beta) (Eq. 4)."""
    unnormalised = ref_logprobs + reward / beta                                     # (P, N)
    return unnormalised - torch.logsumexp(unnormalised, -1, keepdim=True)           # (P, N)


def kl(logp, logq):
    """KL(p || q) per prompt, (P,), from log-probabilities over the N responses."""
    return (logp.exp() * (logp - logq)).sum(-1)


def all_pairs(toy):
    """Every ordered pair (x, y, y') with y != y': its probability under pi_ref and its Bradley-Terry label."""
    P, N = toy.reward.shape
    x, y, y2 = torch.meshgrid(torch.arange(P), torch.arange(N), torch.arange(N), indexing="ij")
    keep = y != y2
    x, y, y2 = x[keep], y[keep], y2[keep]
    weight = (toy.ref_logprobs[x, y] + toy.ref_logprobs[x, y2]).exp() / P          # drawn: a prompt, then two responses
    label = torch.sigmoid(toy.reward[x, y] - toy.reward[x, y2])                     # p(y > y' | x), Bradley-Terry
    return x, y, y2, weight, label


def expected_loss(theta, toy, pairs=None):
    """The expected DPO loss over pi_ref's pairs with soft labels: each pair counts as "y wins" with its
    Bradley-Terry probability and as "y' wins" otherwise. dpo_loss gives both orders. pairs: all_pairs(toy),
    computed once by a caller that evaluates the loss many times."""
    x, y, y2, weight, label = all_pairs(toy) if pairs is None else pairs
    logprobs = torch.log_softmax(theta, -1)
    win, _, _ = dpo_loss(logprobs[x, y], logprobs[x, y2], toy.ref_logprobs[x, y], toy.ref_logprobs[x, y2], toy.beta)
    lose, _, _ = dpo_loss(logprobs[x, y2], logprobs[x, y], toy.ref_logprobs[x, y2], toy.ref_logprobs[x, y], toy.beta)
    return (weight * (label * win + (1 - label) * lose)).sum()


def sample_pairs(toy, n, generator):
    """n preference pairs as real data gives them: a prompt, two responses from pi_ref, the winner by a coin."""
    P, N = toy.reward.shape
    x = torch.randint(P, (n,), generator=generator)
    y = torch.multinomial(toy.ref_logprobs[x].exp(), 2, replacement=True, generator=generator)  # (n, 2)
    first_wins = torch.rand(n, generator=generator, dtype=torch.float64) < torch.sigmoid(
        toy.reward[x, y[:, 0]] - toy.reward[x, y[:, 1]])
    chosen = torch.where(first_wins, y[:, 0], y[:, 1])
    rejected = torch.where(first_wins, y[:, 1], y[:, 0])
    keep = chosen != rejected  # a pair of one response twice carries no preference
    return x[keep], chosen[keep], rejected[keep]


def pairs_loss(theta, toy, x, chosen, rejected):
    logprobs = torch.log_softmax(theta, -1)
    losses, _, _ = dpo_loss(logprobs[x, chosen], logprobs[x, rejected], toy.ref_logprobs[x, chosen],
                            toy.ref_logprobs[x, rejected], toy.beta)
    return losses.mean()


def fit(loss_fn, theta, steps=200, log=None):
    """Full-batch L-BFGS from theta (a copy); log(step, theta) now and then. Returns the fitted theta."""
    theta = theta.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=20, tolerance_grad=1e-12, tolerance_change=1e-14,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn(theta)
        loss.backward()
        return loss
    for step in range(steps):
        opt.step(closure)
        if log and (step + 1) % max(1, steps // 10) == 0:
            log(step + 1, theta.detach())
    return theta.detach()


def implicit_reward(theta, toy):
    """beta * log pi/pi_ref (P, N): Theorem 1 says it is r plus a function of the prompt alone."""
    return toy.beta * (torch.log_softmax(theta, -1) - toy.ref_logprobs)


def main(argv=None):
    toy = make_toy()
    star = optimal_logprobs(toy.ref_logprobs, toy.reward, toy.beta)
    start = toy.ref_logprobs.clone()  # the policy starts at pi_ref, as DPO's does
    print(f"toy: {toy.reward.shape[0]} prompts x {toy.reward.shape[1]} responses, beta {toy.beta}; "
          f"KL(pi_ref || pi*) = {kl(toy.ref_logprobs, star).mean():.4f}")
    log = lambda step, theta: print(f"  soft labels | L-BFGS step {step:3d} | KL(pi || pi*) "  # noqa: E731
                                    f"{kl(torch.log_softmax(theta, -1), star).mean():.2e}")
    pairs = all_pairs(toy)
    theta = fit(lambda t: expected_loss(t, toy, pairs), start, steps=50, log=log)
    spread = (implicit_reward(theta, toy) - toy.reward).std(-1).max()
    print(f"  Theorem 1: beta log pi/pi_ref - r varies within a prompt by at most {spread:.1e} (std)")
    g = torch.Generator().manual_seed(1)
    for n in (100, 1000, 10_000, 100_000):
        x, chosen, rejected = sample_pairs(toy, n, g)
        fitted = fit(lambda t: pairs_loss(t, toy, x, chosen, rejected), start, steps=30)
        print(f"  {n:>7,} sampled pairs, hard labels | KL(pi || pi*) {kl(torch.log_softmax(fitted, -1), star).mean():.2e}")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "toy.png")
    plot(toy, theta, star, path)
    print(f"wrote {path}")
    return 0


def plot(toy, theta, star, path, prompt=0):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    N = toy.reward.shape[1]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.27
    for k, (name, logp) in enumerate((("pi_ref", toy.ref_logprobs), ("pi* (Eq. 4)", star),
                                      ("pi (DPO, soft labels)", torch.log_softmax(theta, -1)))):
        ax.bar(torch.arange(N) + (k - 1) * width, logp[prompt].exp(), width, label=name)
    ax.set_xlabel(f"response y (prompt {prompt}); reward r = " + ", ".join(f"{v:.1f}" for v in toy.reward[prompt]))
    ax.set_ylabel("probability")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
