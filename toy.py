"""The paper's theory on a problem small enough to list every response: DPO's minimiser is the KL-constrained
optimum pi* = pi_ref * exp(r / beta) / Z (Section 4, Eq. 4), and a trained policy is a reward model up to a
prompt-only shift (Section 5.1, Lemmas 1-2, Theorem 1). Twice: on a table, and on our GPT trained by dpo.train.

    python toy.py                     # both; KL(pi || pi*) as DPO trains; ~45 s on 2 CPU cores;
                                      # writes results/toy.png and results/toy-gpt.png
    python -m pytest -q test_toy.py   # the claims below, each checked

The tabular toy: P prompts, each with the same N responses; a reference policy pi_ref(y|x) and a reward r(x, y),
both random; a tabular policy pi(y|x) = softmax(theta[x])_y. Everything is exact: Z(x) is a sum over N responses.

  (a) Expected (soft) labels on every pair: pairs (y, y') drawn from pi_ref, labelled y > y' with the Bradley-Terry
      probability sigmoid(r(x,y) - r(x,y')). The expected DPO loss is minimised exactly where
      beta * log pi/pi_ref(y) - beta * log pi/pi_ref(y') = r(x,y) - r(x,y') for every pair, i.e. at pi = pi*.
  (b) Sampled hard labels (what real data is): n pairs, each drawn from pi_ref and labelled by a coin with the
      Bradley-Terry probability; KL(pi || pi*) shrinks as n grows.
  (c) Theorem 1: after (a), the implicit reward beta * log pi/pi_ref equals r up to a per-prompt constant.

The loss is dpo.py's dpo_loss on the log-probs of the pairs: the same function the trainer uses.

The GPT toy: model.py's GPT (1 layer, 32 channels, random weights) on a vocabulary of 4 tokens; prompts are the
one-token sequences "a", "b", "c", and the responses every 2-token sequence, "aa" .. "dd": 16 per prompt, so
pi(y|x) of every response, Z(x) and pi* are computed exactly from one forward pass. (a) and (b) above are then
run by dpo.train itself, the project's trainer, with its own data path, log-prob code (machinery/fast.py),
loss, AdamW and checkpoints: the pairs are handed to it as token ids, and nothing of it is copied here.
Soft labels (a) go through the unmodified trainer by repetition: with r = log w for small integers w, the
Bradley-Terry label w / (w + w') is met exactly by putting (y > y') w times and (y' > y) w' times in the data
(soft_label_pairs). Measured (python toy.py): KL(pi || pi*) from 0.121 at pi_ref to 2e-9 in 300 full-batch
AdamW steps (~6 s); with hard labels, after 200 steps, 1.3e-2 from 3,000 sampled pairs and 1.7e-3 from 30,000.
300 pairs overfit: most response pairs are seen once or never, DPO pushes their margins without bound, and KL
grows with the steps, past pi_ref's (the overfitting that IPO, arXiv:2310.12036, was proposed to avoid).
"""
import copy
import dataclasses
import itertools
import os
import sys
import tempfile
import time

import torch

from dpo import TrainConfig, dpo_loss, sequence_logps, train
from machinery.hf import save_pretrained
from machinery.util import field, parse_args
from model import GPT, GPTConfig


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


# ---- The GPT case: the same claims for our GPT, trained by dpo.train itself ----------------------------------

LETTERS = "abcdefghijklmnopqrstuvwxyz"  # token t is written LETTERS[t]: prompt "a", response "bd"


@dataclasses.dataclass
class GPTToy:
    folder: str           # the reference GPT in the Hugging Face layout: TrainConfig(model=folder) trains from it
    prompts: list         # P prompts, each one token: [[0], [1], ...]
    responses: list       # N responses: every sequence of response_len tokens, [[0, 0], [0, 1], ...]
    weight: torch.Tensor  # (P, N) int64 w(x, y) in 1..4; the reward is r = log w
    toy: Toy              # its ref_logprobs enumerated from the GPT, reward log w, beta


def make_gpt_toy(folder, vocab_size=4, n_prompts=3, response_len=2, beta=1.0, seed=0, head_std=0.08):
    """A random 1-layer GPT on a vocabulary of vocab_size tokens, saved to folder; every response of response_len
    tokens is listed (no EOS: responses all have that length, so sum_y pi(y|x) = 1 over the list). The head is
    untied and drawn with std head_std (GPT-2: 0.02) so that pi_ref is visibly not uniform, yet gives every
    response at least ~0.5%: a response pi_ref almost never samples cannot be learnt from sampled pairs (b).
    The reward r(x, y) = log w(x, y), w random in 1..4, makes the Bradley-Terry probability
    sigmoid(r - r') = w / (w + w') a ratio of small integers (see soft_label_pairs)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab_size, block_size=8, n_layer=1, n_head=2, n_embd=32,
                          tie_word_embeddings=False))
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, head_std)
    save_pretrained(model, folder)
    prompts = [[x] for x in range(n_prompts)]
    responses = [list(y) for y in itertools.product(range(vocab_size), repeat=response_len)]
    weight = torch.randint(1, 5, (n_prompts, len(responses)), generator=torch.Generator().manual_seed(seed))
    ref_logprobs = enumerate_logprobs(model, prompts, responses)
    return GPTToy(folder, prompts, responses, weight, Toy(ref_logprobs, weight.double().log(), beta))


def enumerate_logprobs(model, prompts, responses):
    """(P, N) float64 log pi(y|x) of every response to every prompt, by dpo.sequence_logps (the log-prob code of
    the reader's path) on a float64 copy of the model: exact for its float32 weights, so that KL down to 1e-12
    is measurable. Prompts of one length, responses of one length."""
    model = copy.deepcopy(model).double().eval()
    ids = torch.tensor([x + y for x in prompts for y in responses])                 # (P*N, T)
    loss_mask = torch.zeros_like(ids, dtype=torch.bool)                             # (P*N, T)
    loss_mask[:, len(prompts[0]):] = True  # the response tokens
    with torch.no_grad():
        return sequence_logps(model(ids), ids, loss_mask).view(len(prompts), len(responses))  # (P, N)


def as_pair(gt, x, chosen, rejected):
    """One preference pair as dpo.train takes it: token ids (kept as they are by dpo.tokenize_all) and text."""
    ids = (gt.prompts[x], gt.responses[chosen], gt.responses[rejected])
    text = ["".join(LETTERS[t] for t in seq) for seq in ids]
    return {"prompt_ids": ids[0], "chosen_ids": ids[1], "rejected_ids": ids[2],
            "prompt": text[0], "chosen": text[1], "rejected": text[2]}


def soft_label_pairs(gt):
    """Expected labels through an unmodified trainer: for every prompt and every two responses y, y', the pair
    (y > y') w(x,y) times and (y' > y) w(x,y') times. Their mean DPO loss is, per pair, (w+w') times the
    expected loss under the Bradley-Terry label p = w / (w+w') = sigmoid(r - r'); each such term is smallest at
    beta * h = r - r', and pi* meets all of them at once, so pi* is the minimiser (whatever positive weight
    each pair carries). 3 prompts x 120 response pairs x (w+w') ~ 1,900 pairs for the default toy."""
    P, N = gt.weight.shape
    pairs = []
    for x in range(P):
        for y, y2 in itertools.combinations(range(N), 2):
            pairs += [as_pair(gt, x, y, y2)] * int(gt.weight[x, y]) + [as_pair(gt, x, y2, y)] * int(gt.weight[x, y2])
    return pairs


def soft_label_minimum(gt):
    """The mean loss of soft_label_pairs at pi*, where sigmoid(beta h) = w / (w + w') on every pair: the
    Bradley-Terry labels' entropy, sum over (y > y') copies of -log(w / (w + w')) over the number of copies."""
    w = gt.weight.double()[:, :, None]                                              # (P, N, 1) w(x, y)
    w2 = gt.weight.double()[:, None, :]                                             # (P, 1, N) w(x, y')
    copies = (w * ~torch.eye(w.shape[1], dtype=torch.bool)).expand(-1, -1, w.shape[1])  # (P, N, N), 0 for y = y'
    return (copies * -torch.log(w / (w + w2))).sum() / copies.sum()


def hard_label_pairs(gt, n, generator):
    """n pairs as real data gives them (sample_pairs above: two responses from pi_ref, a Bradley-Terry coin)."""
    return [as_pair(gt, *map(int, xyz)) for xyz in zip(*sample_pairs(gt.toy, n, generator))]


def train_gpt(gt, pairs, out, steps, cfg):
    """dpo.train on pairs from gt.folder, stopping at each of `steps` (increasing) with --resume in between
    (the same run as one call, checkpoint by checkpoint); yields (step, policy, metrics history) at each.
    Full batches (every pair every step), AdamW, float32 on the CPU; the trainer's own lines are not shown."""
    for k, s in enumerate(steps):
        tc = TrainConfig(model=gt.folder, out=out, beta=gt.toy.beta, optimizer="adamw", lr=cfg.lr, warmup_steps=0,
                         batch_size=len(pairs), micro_batch_size=len(pairs), steps=s, max_length=8,
                         share_prompt=False, device="cpu", dtype="float32", save_every=s, seed=cfg.seed,
                         resume=k > 0, overwrite=k == 0)
        policy, history = train(tc, pairs, [], log=lambda *a, **kw: None)
        yield s, policy, history


@dataclasses.dataclass
class ToyConfig:
    lr: float = field(3e-3, "AdamW's learning rate for the GPT")
    steps: int = field(300, "DPO steps on the soft-label pairs (KL printed every --every)")
    every: int = field(50, "print KL(pi || pi*) every N steps")
    pairs: str = field("300,3000,30000", "sampled hard-label pair counts, comma-separated")
    hard_steps: str = field("50,100,200", "steps at which the hard-label runs report KL, comma-separated")
    beta: float = field(1.0, "beta of the GPT toy: pi* = pi_ref w^(1/beta) / Z")
    seed: int = field(0, "seeds the GPT, the rewards and the sampled pairs")
    tabular: bool = field(True, "also run the tabular toy first (--no-tabular: the GPT only)")
    out: str = field("results", "folder for the figures toy.png and toy-gpt.png")


def gpt_main(cfg, work):
    """The GPT case: soft labels (KL printed as it trains), the hard-label sweep, the figure."""
    gt = make_gpt_toy(os.path.join(work, "reference"), beta=cfg.beta, seed=cfg.seed)
    star = optimal_logprobs(gt.toy.ref_logprobs, gt.toy.reward, gt.toy.beta)
    P, N = gt.weight.shape
    V, L = max(max(y) for y in gt.responses) + 1, len(gt.responses[0])
    print(f"GPT toy, trained by dpo.train: a random 1-layer GPT on {V} tokens, {P} one-token prompts x all {N} "
          f"{L}-token responses\n  r = log w, w in 1..4; beta {cfg.beta:g}; pi* = pi_ref w^(1/beta) / Z; "
          f"KL(pi_ref || pi*) = {kl(gt.toy.ref_logprobs, star).mean():.3f}")
    pairs = soft_label_pairs(gt)
    print(f"  soft labels: {len(pairs):,} pairs (every two responses, each order w times), full batch, AdamW "
          f"lr {cfg.lr:g}; loss at pi*: {soft_label_minimum(gt):.5f}")
    t0 = time.time()
    steps = list(range(cfg.every, cfg.steps + 1, cfg.every))
    for step, policy, history in train_gpt(gt, pairs, os.path.join(work, "soft"), steps, cfg):
        logp = enumerate_logprobs(policy, gt.prompts, gt.responses)
        print(f"  step {step:4d} | loss {history[-1]['loss']:.5f} | KL(pi || pi*) {kl(logp, star).mean():.1e} | "
              f"{time.time() - t0:.1f} s")
    hard_steps = [int(s) for s in cfg.hard_steps.split(",")]
    print(f"  hard labels (pairs drawn from pi_ref, a Bradley-Terry coin): KL(pi || pi*) after "
          f"{', '.join(map(str, hard_steps))} steps")
    g = torch.Generator().manual_seed(cfg.seed + 1)
    for n in (int(v) for v in cfg.pairs.split(",")):
        sampled = hard_label_pairs(gt, n, g)
        kls = [kl(enumerate_logprobs(p, gt.prompts, gt.responses), star).mean()
               for _, p, _ in train_gpt(gt, sampled, os.path.join(work, f"hard-{n}"), hard_steps, cfg)]
        print(f"  {n:>7,} pairs | " + " | ".join(f"{v:.1e}" for v in kls) + f" | {time.time() - t0:.1f} s"
              + (" | overfits: margins of pairs seen once grow without bound" if kls[-1] > kls[0] else ""))
    path = os.path.join(cfg.out, "toy-gpt.png")
    plot_gpt(gt, logp, star, path, step)
    print(f"wrote {path}")


def main(argv=None):
    cfg = parse_args(ToyConfig, argv, __doc__.split("\n")[0])
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(1)  # models this small run fastest on one thread (several wait on each other: ~3x slower)
    os.makedirs(cfg.out, exist_ok=True)
    if cfg.tabular:
        tabular_main(cfg.out)
    with tempfile.TemporaryDirectory() as work:  # the GPT runs' folders: reference model, checkpoints
        gpt_main(cfg, work)
    return 0


def tabular_main(out="results"):
    toy = make_toy()
    star = optimal_logprobs(toy.ref_logprobs, toy.reward, toy.beta)
    start = toy.ref_logprobs.clone()  # the policy starts at pi_ref, as DPO's does
    print(f"toy: {toy.reward.shape[0]} prompts x {toy.reward.shape[1]} responses, beta {toy.beta}; "
          f"KL(pi_ref || pi*) = {kl(toy.ref_logprobs, star).mean():.4f}")
    log = lambda step, theta: print(f"  soft labels | L-BFGS step {step:3d} | KL(pi || pi*) "  # noqa: E731
                                    f"{kl(torch.log_softmax(theta, -1), star).mean():.2e}")
    pairs = all_pairs(toy)
    theta = fit(lambda t: expected_loss(t, toy, pairs), start, steps=3, log=log)
    spread = (implicit_reward(theta, toy) - toy.reward).std(-1).max()
    print(f"  Theorem 1: beta log pi/pi_ref - r varies within a prompt by at most {spread:.1e} (std)")
    g = torch.Generator().manual_seed(1)
    for n in (100, 1000, 10_000, 100_000):
        x, chosen, rejected = sample_pairs(toy, n, g)
        fitted = fit(lambda t: pairs_loss(t, toy, x, chosen, rejected), start, steps=30)
        print(f"  {n:>7,} sampled pairs, hard labels | KL(pi || pi*) {kl(torch.log_softmax(fitted, -1), star).mean():.2e}")
    path = os.path.join(out, "toy.png")
    plot(toy, theta, star, path)
    print(f"wrote {path}")


def plot(toy, theta, star, path, prompt=0):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    N = toy.reward.shape[1]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.27
    for k, (name, logp) in enumerate((("pi_ref", toy.ref_logprobs), ("pi* (Eq. 4)", star),
                                      ("pi (DPO, soft labels)", torch.log_softmax(theta, -1)))):
        ax.bar((torch.arange(N) + (k - 1) * width).tolist(), logp[prompt].exp().tolist(), width, label=name)
    ax.set_xlabel(f"response y (prompt {prompt}); reward r = " + ", ".join(f"{v:.1f}" for v in toy.reward[prompt]))
    ax.set_ylabel("probability")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_gpt(gt, logp, star, path, steps, prompt=0):
    """pi_ref, pi* and the trained GPT's pi over every response to one prompt, bars side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    N = len(gt.responses)
    fig, ax = plt.subplots(figsize=(10, 3.8))
    width = 0.27
    for k, (name, lp) in enumerate((("pi_ref (the random GPT)", gt.toy.ref_logprobs), ("pi* = pi_ref w^(1/beta) / Z",
                                    star), ("pi (the GPT after dpo.train, soft labels)", logp))):
        ax.bar((torch.arange(N) + (k - 1) * width).tolist(), lp[prompt].exp().tolist(), width, label=name)
    ax.set_xticks(range(N), ["".join(LETTERS[t] for t in y) + f"\nw={int(w)}"
                             for y, w in zip(gt.responses, gt.weight[prompt])])
    ax.set_xlabel(f"response y to the prompt '{LETTERS[gt.prompts[prompt][0]]}', with its reward r = log w")
    ax.set_ylabel("probability")
    ax.set_ylim(0, 1.3 * max(lp[prompt].exp().max().item() for lp in (gt.toy.ref_logprobs, star, logp)))  # room for the legend
    ax.set_title(f"DPO's minimiser is pi* (beta {gt.toy.beta:g}): after {steps} steps of dpo.train, "
                 f"KL(pi || pi*) = {kl(logp, star)[prompt]:.0e} for this prompt", fontsize=10)
    ax.legend(ncol=3, loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
