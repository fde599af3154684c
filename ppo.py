"""PPO for language models (Ziegler et al. 2019, arXiv:1909.08593; Stiennon et al. 2020, arXiv:2009.01325): the RL
baseline the DPO paper compares against on IMDb (Fig. 2, "PPO" with a learned reward model, "PPO-GT" with the
ground-truth reward), written to be read beside dpo.py: both solve the same objective, DPO in closed form, PPO
by sampling.

    python -m pytest -q test_ppo.py          # every formula below against hand arithmetic or a slow loop

There is no command line of its own; the API (the IMDb integration calls it):
    history = train_ppo(policy, reference, reward_fn, prompts, PPOConfig(...), log=print, callback=None)
trains `policy` (a model.GPT; only its parameters with requires_grad: call machinery.lora.train_only_head first
for the CPU preset's head-only rule) in place; reward_fn maps full token lists (prompt + response) to a (N,)
tensor of scores (eval.BowClassifier.score, or RewardModel.score from train_reward_model); prompts are token-id
lists (IMDb: EOS followed by 2-8 review tokens).

Shape notation
    B    rollouts (prompt + sampled response) in a batch
    T    response time steps (right-padded: a response stops at its first EOS)
    C    channels (n_embd); V vocabulary

Derivation (plain-text math; code lines tagged `# (n)`)
(1) The KL-regularised objective, the same as dpo.py's step (1):
        J(pi) = E_{x, y ~ pi(.|x)}[ r(x,y) ] - beta * KL( pi(.|x) || pi_ref(.|x) )
    whose optimum is pi*(y|x) = pi_ref(y|x) exp(r(x,y)/beta) / Z(x) (Eq. 4). DPO fits pi* from preferences;
    PPO climbs J by sampling from pi.
(2) Per-token reward shaping. KL(pi || pi_ref) = E_y[ sum_t log pi(y_t|s_t) - log pi_ref(y_t|s_t) ] with
    s_t = (x, y_<t), so J = E_y[ sum_t r_t ] with
        r_t = -beta * (log pi(y_t|s_t) - log pi_ref(y_t|s_t)) + [t = last response token] * r(x, y)
(3) The gradient. Treat the penalty as a reward (not differentiated): with R(y) = sum_t r_t,
        grad J = E_y[ grad log pi(y) * R(y) ] - beta * E_y[ grad log pi(y) ] = E_y[ grad log pi(y) * R(y) ]
    because E_y[grad log pi(y)] = grad sum_y pi(y) = 0. The score-function estimate is unbiased for grad J, so
    its fixed point is pi* (test_ppo_toy_converges_to_pi_star).
(4) A value head V(s_t) predicts the return from s_t; it is a separate linear head reading the policy's final
    hidden states, DETACHED: the value loss trains only the head and never moves the policy, whose update is
    the surrogate (6) alone (in the CPU preset only the policy's untied output head trains, so the hidden states
    are fixed anyway). TRL instead shares the trunk and lets the value loss into it.
    GAE(gamma, lambda), with V = 0 after the last token:
        delta_t = r_t + gamma V(s_{t+1}) - V(s_t),   A_t = delta_t + gamma lambda A_{t+1},   R_t = A_t + V(s_t)
    R_t is the value target; lambda trades the bias of V against the variance of the sampled rewards.
(5) Whitened advantages: A_t <- (A_t - mean A) / std A over the batch's response tokens (subtracting a constant
    is a baseline; dividing rescales the step).
(6) The clipped surrogate, with rho_t = pi_theta(y_t|s_t) / pi_old(y_t|s_t) (pi_old: the policy that sampled):
        L_pi = mean_t max( -A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps) )
    At rho = 1 its gradient is -A_t grad log pi (step 3); clipping stops a step moving a ratio past 1 +- eps in
    the direction its advantage favours.
(7) The clipped value loss, V_clip = V_old + clip(V - V_old, -eps_v, eps_v):
        L_V = 0.5 * mean_t max( (V - R_t)^2, (V_clip - R_t)^2 )
(8) L = L_pi + c_v L_V, minimised for several epochs of minibatches over each rollout batch (the samples are
    reused; the clipping keeps pi near pi_old), with the gradient norm clipped.
(9) beta fixed, or Ziegler's proportional controller toward a target sequence KL:
        e = clip(KL / KL_target - 1, -0.2, 0.2),   beta <- beta * (1 + e * n / horizon)   (n: rollouts in the batch)
(10) Best-of-N, the paper's other baseline: sample N, keep the highest-scoring. Its KL to the sampler is at most
        log N - (N - 1) / N   (Beirami et al. 2024, arXiv:2401.01879; best_of_n_kl).

Defaults: the paper gives no PPO hyperparameters for IMDb; PPOConfig takes the classic gpt2-sentiment ones (TRL's
example, after Ziegler et al.): 4 PPO epochs, lr 1.41e-5, initial KL coefficient 0.2 adaptive to target 6 nats
with horizon 10,000, gamma 1, lambda 0.95, clip 0.2, value clip 0.2, value loss coefficient 0.1, AdamW
(without weight decay; the value head at the policy's lr unless value_lr is given).

Which test proves what (test_ppo.py): gae -> a per-sequence Python loop; whiten, policy_loss, value_loss,
shaped_rewards, AdaptiveKL -> hand arithmetic; rollout -> a fresh forward without the KV cache;
reference_logps_and_values (chunked) -> one pass; reward_model_loss
-> the formula and its accuracy, train_reward_model -> held-out ranking; best_of_n_kl -> exact enumeration of the
best-of-N distribution; the whole update -> convergence to pi* on toy.py's enumerable problem.
"""
import copy
import dataclasses
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import EOS, left_pad
from model import KVCache, sample_next, token_logps


# ---- Rollouts: sample from the current policy with the KV cache, keeping log pi of each sampled token

@dataclasses.dataclass
class Rollout:
    input_ids: torch.Tensor       # (B, P + T) left-padded prompts, then the responses (id 0 after a row's EOS)
    attention_mask: torch.Tensor  # (B, P + T) 0 on prompt padding
    response: torch.Tensor        # (B, T) the sampled tokens, 0 after EOS
    logps: torch.Tensor           # (B, T) log pi(y_t | s_t) under the policy that sampled, 0 off the mask
    mask: torch.Tensor            # (B, T) bool, True on response tokens (through the first EOS)

    def rows(self, index):
        """The Rollout of some of its rows (index: a LongTensor or a slice)."""
        return Rollout(*(getattr(self, f.name)[index] for f in dataclasses.fields(Rollout)))

    def sequences(self):
        """The prompt + response token lists (no padding): what reward_fn scores."""
        prompt_length = self.input_ids.size(1) - self.response.size(1)
        prompts = [row[m.bool()].tolist() for row, m in zip(self.input_ids[:, :prompt_length],
                                                            self.attention_mask[:, :prompt_length])]
        return [p + row[m].tolist() for p, row, m in zip(prompts, self.response, self.mask)]


@torch.no_grad()
def rollout(policy, prompts, max_new_tokens, eos_id=EOS, generator=None):
    """Samples one response per prompt from `policy` at temperature 1 (PPO's ratio needs the sampler to be pi
    itself), as GPT.generate does, but keeps log pi of each sampled token from the very logits it was drawn
    from. A row stops at its first eos_id (kept). prompts: list of B non-empty token-id lists. Returns a Rollout."""
    device = policy.wte.weight.device
    ids, prompt_mask = left_pad(prompts, pad_id=0)                                         # (B, P) each
    B, P = ids.shape
    attention_mask = torch.cat([prompt_mask, torch.ones(B, max_new_tokens, dtype=torch.long)], 1).to(device)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)                               # (B, P + max_new)
    cache = KVCache(policy.config, B, P + max_new_tokens, policy.wte.weight.dtype, device)
    x, done = ids.to(device), torch.zeros(B, dtype=torch.bool, device=device)
    tokens, logps, masks = [], [], []
    for t in range(max_new_tokens):
        n = P + t
        hidden = policy(x, attention_mask=attention_mask[:, :n], position_ids=positions[:, n - x.size(1):n],
                        cache=cache, return_hidden=True)                                   # (B, x.size(1), C)
        logits = policy.lm_head(hidden[:, -1])                                             # (B, V)
        token = sample_next(logits, generator=generator).masked_fill(done, 0)              # (B,)
        logp = token_logps(logits[:, None], token[:, None])[:, 0]                          # (B,)
        tokens.append(token)
        logps.append(logp.masked_fill(done, 0.0))
        masks.append(~done)
        done = done | (token == eos_id)
        x = token[:, None]                                                                 # (B, 1)
        if bool(done.all()):
            break
    response = torch.stack(tokens, 1)                                                      # (B, T)
    return Rollout(torch.cat([ids.to(device), response], 1), attention_mask[:, :P + response.size(1)], response,
                   torch.stack(logps, 1), torch.stack(masks, 1))


class ValueHead(nn.Module):
    """V(s_t) = w . hidden_t + b, on the policy's final hidden states, detached (step 4). Starts at V = 0."""

    def __init__(self, n_embd):
        super().__init__()
        self.linear = nn.Linear(n_embd, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden):
        return self.linear(hidden.detach().float()).squeeze(-1)                           # (B, T)


def response_hidden(model, batch):
    """The final hidden states that read s_t = (x, y_<t) for every response position t of a Rollout-like batch:
    (B, T, C). Column P-1+t of the row predicts y_t (through lm_head) and is the state V values."""
    T = batch.response.size(1)
    hidden = model(batch.input_ids, attention_mask=batch.attention_mask, return_hidden=True)  # (B, P + T, C)
    return hidden[:, -T - 1:-1]                                                            # (B, T, C)


def response_logps(model, batch, hidden=None):
    """log pi(y_t | s_t) of every response token, (B, T) float32 (a fresh forward, no cache)."""
    hidden = response_hidden(model, batch) if hidden is None else hidden
    return token_logps(model.lm_head(hidden), batch.response)                             # (B, T)


# ---- The formulas, each on (B, T) tensors with a response mask

def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def shaped_rewards(score, logp, ref_logp, mask, kl_coef):
    """Step (2): r_t = -kl_coef * (logp_t - ref_logp_t) on response tokens, plus the sequence score at each row's
    last response token. score (B,); logp, ref_logp (B, T); mask (B, T) bool, a prefix of each row. -> (B, T)."""
    rewards = -kl_coef * (logp - ref_logp) * mask                                         # (B, T) (2)
    last = mask.sum(-1) - 1                                                                # (B,)
    rewards[torch.arange(len(last), device=last.device), last] += score.to(rewards.dtype)  # (2)
    return rewards


def gae(rewards, values, mask, gamma, lam):
    """Step (4): advantages A_t and returns R_t = A_t + V(s_t), (B, T) each, 0 off the mask. Responses are
    right-padded, so a row's value after its last token is 0 (the episode ended)."""
    T = rewards.size(1)
    mask = mask.to(rewards.dtype)
    advantages = torch.zeros_like(rewards)
    next_value, next_advantage = torch.zeros_like(rewards[:, 0]), torch.zeros_like(rewards[:, 0])  # (B,)
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]                          # (B,) (4)
        advantages[:, t] = (delta + gamma * lam * next_advantage) * mask[:, t]             # (B,) (4)
        next_value, next_advantage = values[:, t] * mask[:, t], advantages[:, t]
    return advantages, (advantages + values) * mask                                        # (4) R_t = A_t + V(s_t)


def whiten(x, mask, eps=1e-8):
    """Step (5): (x - mean) / sqrt(var + eps) over the masked entries (population variance), 0 off the mask."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) / torch.sqrt(var + eps) * mask                                       # (5)


def policy_loss(logp_new, logp_old, advantages, mask, clip):
    """Step (6), the clipped surrogate as a masked token mean. Returns (loss, clip fraction: the share of tokens
    whose clipped term is the larger, i.e. that get no gradient)."""
    ratio = torch.exp(logp_new - logp_old)                                                 # (B, T) rho_t
    unclipped = -advantages * ratio                                                        # (B, T) (3) at rho = 1
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)                                # (B, T)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)                            # (6)
    return loss, masked_mean((clipped > unclipped).float(), mask).detach()


def value_loss(values_new, values_old, returns, mask, clip):
    """Step (7): 0.5 * masked mean of max((V - R)^2, (V_clip - R)^2). Returns (loss, clip fraction)."""
    values_clipped = values_old + (values_new - values_old).clamp(-clip, clip)             # (B, T)
    unclipped, clipped = (values_new - returns) ** 2, (values_clipped - returns) ** 2      # (B, T)
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)                      # (7)
    return loss, masked_mean((clipped > unclipped).float(), mask).detach()


class FixedKL:
    def __init__(self, coef):
        self.value = coef

    def update(self, kl, n_steps):
        pass


class AdaptiveKL:
    """Step (9), Ziegler et al.'s proportional controller (their code: lm-human-preferences, AdaptiveKLController)."""

    def __init__(self, coef, target, horizon):
        self.value, self.target, self.horizon = coef, target, horizon

    def update(self, kl, n_steps):
        error = min(max(kl / self.target - 1, -0.2), 0.2)                                  # (9)
        self.value *= 1 + error * n_steps / self.horizon                                   # (9)


# ---- Training

@dataclasses.dataclass
class PPOConfig:
    iterations: int = 100           # rollout batches
    batch_size: int = 64            # rollouts per iteration (prompts drawn at random, with replacement)
    minibatch_size: int = 16        # rollouts per gradient step
    ppo_epochs: int = 4             # passes over each rollout batch (step 8)
    lr: float = 1.41e-5             # AdamW, the policy's trainable weights
    value_lr: float = None          # AdamW, the value head (None: lr). It starts at V = 0 and is one linear map:
                                    # at the policy's lr it may fit the returns too slowly to serve as a baseline
    weight_decay: float = 0.0       # > 0 adds an L2 term to J and moves its optimum off pi*
    max_new_tokens: int = 24
    kl_coef: float = 0.2            # beta, initial value if adaptive
    adaptive_kl: bool = True        # step (9); False keeps beta fixed
    kl_target: float = 6.0          # nats, sequence level
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2               # eps of step (6)
    value_clip: float = 0.2         # eps_v of step (7)
    vf_coef: float = 0.1            # c_v of step (8)
    max_grad_norm: float = 1.0
    eos_id: int = EOS
    seed: int = 0


def ppo_update(batch, evaluate, optimizer, cfg, generator=None):
    """Step (8): cfg.ppo_epochs passes of shuffled minibatches over one rollout batch. batch: dict of (B, T)
    tensors "logps" (pi_old), "values" (V_old), "advantages", "returns", "mask", plus any rows evaluate needs;
    evaluate(rows) -> (logp_new, values_new), (b, T) each, for those rows of the batch (with grad).
    Returns the mean policy loss, value loss and clip fraction over all minibatches."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    B = batch["mask"].size(0)
    totals = torch.zeros(3)
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(B, generator=generator)
        for start in range(0, B, cfg.minibatch_size):
            rows = order[start:start + cfg.minibatch_size].to(batch["mask"].device)
            mb = {k: v[rows] for k, v in batch.items()}
            logp_new, values_new = evaluate(rows)                                          # (b, T) each
            pl, clip_fraction = policy_loss(logp_new, mb["logps"], mb["advantages"], mb["mask"], cfg.clip)
            vl, _ = value_loss(values_new, mb["values"], mb["returns"], mb["mask"], cfg.value_clip)
            optimizer.zero_grad(set_to_none=True)
            (pl + cfg.vf_coef * vl).backward()                                             # (8)
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)                      # (8)
            optimizer.step()
            totals += torch.tensor([pl.item(), vl.item(), clip_fraction.item()])
    n = cfg.ppo_epochs * math.ceil(B / cfg.minibatch_size)
    return dict(zip(("policy_loss", "value_loss", "clip_fraction"), (totals / n).tolist()))


@torch.no_grad()
def reference_logps_and_values(reference, policy, value_head, roll, chunk):
    """log pi_ref(y_t|s_t) and V_old(s_t) of a Rollout's response tokens, (B, T) each, computed `chunk` rollouts
    at a time: one pass over the paper's 1,024 rollouts of 48 tokens would hold (B, T, V) float32 logits, ~10 GB.
    Equals the one-pass response_logps / value_head(response_hidden) (test_ppo.py -k chunk)."""
    parts = [roll.rows(slice(s, s + chunk)) for s in range(0, roll.mask.size(0), chunk)]
    return (torch.cat([response_logps(reference, p) for p in parts]),                      # (B, T)
            torch.cat([value_head(response_hidden(policy, p)) for p in parts]))            # (B, T)


def ppo_step(policy, value_head, reference, reward_fn, prompts, optimizer, kl_controller, cfg, generator):
    """One PPO iteration on a list of prompts: rollouts, scores, shaped rewards, GAE, then ppo_update.
    Returns its stats: score, kl (mean sequence log pi/pi_ref), kl_coef (the beta used), length, losses."""
    roll = rollout(policy, prompts, cfg.max_new_tokens, cfg.eos_id, generator)
    score = torch.as_tensor(reward_fn(roll.sequences()), dtype=torch.float32).to(roll.mask.device)  # (B,)
    ref_logps, values = reference_logps_and_values(reference, policy, value_head, roll, cfg.minibatch_size)
    kl_coef = kl_controller.value                                                          # beta of (1)
    rewards = shaped_rewards(score, roll.logps, ref_logps, roll.mask, kl_coef)             # (B, T) (2)
    advantages, returns = gae(rewards, values, roll.mask, cfg.gamma, cfg.lam)              # (B, T) (4)
    batch = {"logps": roll.logps, "values": values, "advantages": whiten(advantages, roll.mask),  # (5)
             "returns": returns, "mask": roll.mask}

    def evaluate(rows):  # the minibatch's log pi and V under the current weights, with grad
        minibatch = roll.rows(rows)
        hidden = response_hidden(policy, minibatch)                                        # (b, T, C)
        return response_logps(policy, minibatch, hidden), value_head(hidden)               # (b, T) each
    stats = ppo_update(batch, evaluate, optimizer, cfg)
    kl = ((roll.logps - ref_logps) * roll.mask).sum(-1).mean().item()                     # sequence KL estimate
    kl_controller.update(kl, len(prompts))                                                 # (9)
    return {"score": score.mean().item(), "kl": kl, "kl_coef": kl_coef,
            "length": roll.mask.sum(-1).float().mean().item(), **stats}


def train_ppo(policy, reference, reward_fn, prompts, cfg, log=print, callback=None, checkpoints=None):
    """PPO on `policy` in place (its requires_grad parameters), against the frozen `reference` (usually the SFT
    model), with reward_fn(list of prompt + response token lists) -> (N,) scores. callback(iteration, policy,
    stats), if given, runs after every iteration; checkpoints (machinery.stages.Checkpoints), if given, saves the
    policy with the value head, optimiser, KL coefficient and generators at its iterations and resumes from the
    newest. Returns the history: one stats dict per iteration (ppo_step's, plus iteration and seconds)."""
    device = policy.wte.weight.device
    torch.manual_seed(cfg.seed)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    picker = torch.Generator().manual_seed(cfg.seed)
    reference.eval().requires_grad_(False)
    was_training = policy.training
    policy.eval()  # no dropout: log pi must be the same at sampling and at training
    value_head = ValueHead(policy.config.n_embd).to(device)
    optimizer = torch.optim.AdamW([{"params": [p for p in policy.parameters() if p.requires_grad]},
                                   {"params": value_head.parameters(), "lr": cfg.value_lr or cfg.lr}],
                                  lr=cfg.lr, weight_decay=cfg.weight_decay)
    kl_controller = (AdaptiveKL(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
                     else FixedKL(cfg.kl_coef))
    start, saved = checkpoints.resume(policy, optimizer, [generator, picker]) if checkpoints else (0, {})
    if saved:
        value_head.load_state_dict(saved["value_head"])
        kl_controller.value = saved["kl_coef"]
    history = saved.get("history", [])
    for iteration in range(start + 1, cfg.iterations + 1):
        t0 = time.time()
        picks = torch.randint(len(prompts), (cfg.batch_size,), generator=picker).tolist()
        stats = ppo_step(policy, value_head, reference, reward_fn, [prompts[i] for i in picks], optimizer,
                         kl_controller, cfg, generator)
        stats = {"iteration": iteration, **stats, "seconds": time.time() - t0}
        history.append(stats)
        if log:
            log(f"ppo {iteration}/{cfg.iterations} | score {stats['score']:.4f} | kl {stats['kl']:.3f} | "
                f"beta {stats['kl_coef']:.4f} | policy loss {stats['policy_loss']:.4f} | value loss "
                f"{stats['value_loss']:.4f} | clip {stats['clip_fraction']:.3f} | length {stats['length']:.1f} | "
                f"{stats['seconds'] * 1000:.0f} ms")
        if callback:
            callback(iteration, policy, stats)
        if checkpoints:
            checkpoints.maybe_save(iteration, policy, optimizer, [generator, picker], history=history,
                                   value_head=value_head.state_dict(), kl_coef=kl_controller.value)
    policy.train(was_training)
    return history


# ---- A reward model from preferences (Bradley-Terry), for "PPO" with a learned reward

class RewardModel(nn.Module):
    """A GPT trunk with a scalar linear head read at the last real token of prompt + response."""

    def __init__(self, trunk):
        super().__init__()
        self.trunk = trunk
        self.head = nn.Linear(trunk.config.n_embd, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids, lengths):
        """input_ids (N, L) right-padded (no attention mask needed under the causal mask), lengths (N,) -> (N,)."""
        hidden = self.trunk(input_ids, return_hidden=True)                                 # (N, L, C)
        last = hidden[torch.arange(len(lengths), device=lengths.device), lengths - 1]     # (N, C)
        return self.head(last.float()).squeeze(-1)                                         # (N,)

    @torch.no_grad()
    def score(self, token_lists, batch_size=64):
        """The reward of each full token list: (N,) float32 on the CPU (the reward_fn of train_ppo)."""
        return torch.cat([self(*_right_pad(token_lists[s:s + batch_size], self.head.weight.device)).cpu()
                          for s in range(0, len(token_lists), batch_size)])


def _right_pad(token_lists, device):
    lengths = torch.tensor([len(t) for t in token_lists])
    ids = torch.zeros(len(token_lists), int(lengths.max()), dtype=torch.long)               # (N, L) pad id 0
    for i, t in enumerate(token_lists):
        ids[i, :len(t)] = torch.tensor(t, dtype=torch.long)
    return ids.to(device), lengths.to(device)


def reward_model_loss(chosen_scores, rejected_scores):
    """Bradley-Terry: mean -log sigmoid(s_w - s_l) over pairs (B,), and the share ranked right (s_w > s_l)."""
    loss = -F.logsigmoid(chosen_scores - rejected_scores).mean()
    return loss, (chosen_scores > rejected_scores).float().mean()


def pair_scores(model, pairs):
    """Scores of prompt + chosen (B,) and prompt + rejected (B,) for pairs as imdb.make_pairs writes them."""
    rows = ([p["prompt_ids"] + p["chosen_ids"] for p in pairs] + [p["prompt_ids"] + p["rejected_ids"] for p in pairs])
    scores = model(*_right_pad(rows, model.head.weight.device))                            # (2B,) chosen first
    return scores[:len(pairs)], scores[len(pairs):]


def train_reward_model(trunk, pairs, train_trunk=False, epochs=1, batch_size=16, lr=1e-4, seed=0, log=None,
                       checkpoints=None, held_out=None):
    """Fits a RewardModel on a copy of `trunk` (the SFT model, say; it is not modified) to preference pairs (dicts
    with prompt_ids, chosen_ids, rejected_ids) with AdamW on the Bradley-Terry loss. train_trunk=False trains the
    scalar head only. checkpoints (machinery.stages.Checkpoints, counting batches over all epochs), if given,
    saves the trunk with the head, optimiser and generator and resumes from the newest.
    held_out (pairs), if given: after each epoch the model's ranking accuracy on them, and the weights of the epoch
    with the best one are kept (ties: the earlier epoch), as Appendix C.1 picks the reward model's epoch by
    validation accuracy (the best weights so far travel in the checkpoint; test_online.py checks a run whose best
    epoch is not the last). Note the kept model's accuracy on held_out is then a selected, optimistic number.
    Returns (model, accuracy) with accuracy(pairs) -> the share of pairs ranked right, and accuracy.per_epoch (the
    held-out accuracy after each epoch) and accuracy.best_epoch (1-based; the last epoch without held_out)."""
    model = RewardModel(copy.deepcopy(trunk)).to(trunk.wte.weight.device)
    model.trunk.requires_grad_(train_trunk)
    model.eval()  # no dropout; gradients flow all the same
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    per_epoch = math.ceil(len(pairs) / batch_size)

    @torch.no_grad()
    def accuracy(held_out, batch_size=64):
        right = 0
        for s in range(0, len(held_out), batch_size):
            chosen_scores, rejected_scores = pair_scores(model, held_out[s:s + batch_size])
            right += (chosen_scores > rejected_scores).sum().item()
        return right / len(held_out)

    done, saved = checkpoints.resume(model.trunk, optimizer, [generator]) if checkpoints else (0, {})
    if saved:
        model.head.load_state_dict(saved["head"])
    order = saved.get("order")
    per_epoch_acc, best = saved.get("per_epoch", []), saved.get("best")  # best: (epoch, accuracy, CPU state dict)
    for step in range(done, epochs * per_epoch):
        epoch, k = divmod(step, per_epoch)
        if k == 0:
            order = torch.randperm(len(pairs), generator=generator).tolist()
        loss, acc = reward_model_loss(*pair_scores(model, [pairs[i] for i in order[k * batch_size:(k + 1) * batch_size]]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if held_out and k == per_epoch - 1:  # end of an epoch: keep its weights if they rank held_out best so far
            per_epoch_acc.append(accuracy(held_out))
            if best is None or per_epoch_acc[-1] > best[1]:
                best = (epoch + 1, per_epoch_acc[-1],
                        {n: t.detach().to("cpu", copy=True) for n, t in model.state_dict().items()})
        if checkpoints:
            checkpoints.maybe_save(step + 1, model.trunk, optimizer, [generator], head=model.head.state_dict(),
                                   order=order, per_epoch=per_epoch_acc, best=best)
        if log and k == per_epoch - 1:
            log(f"reward model epoch {epoch + 1}/{epochs} | loss {loss.item():.4f} | acc {acc.item():.3f}" +
                (f" | held-out acc {per_epoch_acc[-1]:.3f}" if held_out else ""))
    if best is not None and best[0] != epochs:
        model.load_state_dict(best[2])
        if log:
            log(f"reward model: kept epoch {best[0]} of {epochs} (held-out accuracy {best[1]:.3f})")
    model.requires_grad_(False)
    accuracy.per_epoch, accuracy.best_epoch = per_epoch_acc, best[0] if best is not None else epochs
    return model, accuracy


# ---- Best-of-N

def best_of_n(scores):
    """scores (P, N): N samples' rewards for each of P prompts -> (P,) the index of the best sample of each."""
    return scores.argmax(-1)


def best_of_n_kl(n):
    """KL(pi_bon || pi) = log n - (n - 1) / n for the best of n samples of pi, step (10).

    With F(v) = P(r(Y) <= v) and F_-(v) = P(r(Y) < v) for Y ~ pi(.|x), and no ties between distinct responses,
        pi_bon(y) = F(r(y))^n - F_-(r(y))^n.
    When every single response has vanishing probability (a continuous reward distribution) this is
    n F(r(y))^(n-1) pi(y), and F(r(Y_bon)) ~ Beta(n, 1) gives KL = log n + (n-1) E[log F] = log n - (n-1)/n
    exactly. For a discrete pi (a real sampler) the formula is an UPPER bound (Beirami et al. 2024,
    arXiv:2401.01879), loose when single responses are likely;
    test_ppo_best_of_n_kl_is_the_continuous_limit_and_an_upper_bound enumerates both cases.

    Why not the sample-based estimate (eval.sequence_kl: the mean of log pi_policy - log pi_ref over the
    policy's samples)? It needs log pi_bon(y|x), and pi_bon has no tractable log-prob: F is the distribution of
    the reward over all of pi's responses to that prompt. Plugging in the sampler's own log-prob (pi = pi_ref)
    gives 0 for every sample."""
    return math.log(n) - (n - 1) / n                                                       # (10)
