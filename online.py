"""Online DPO: DPO on pairs the CURRENT policy samples and a reward labels, an iteration at a time; the IMDb
experiment runs it as "Online DPO (r*)" (labelled by the ground-truth classifier, comparable to PPO-GT) and
"Online DPO (RM)" (labelled by the learned reward model, comparable to PPO) with --methods online-dpo-gt,online-dpo-rm.

    python dpo.py --task imdb --preset tiny --methods dpo,online-dpo-gt
    (dpo.main passes online_dpo=(dpo_loss, make_optimizer) to imdb.main; imdb.run refuses the online methods
    in one line without them)

Each iteration (train_online_dpo):
  (1) take the next `prefixes` training prefixes x (a seeded shuffle of them, pass after pass)
  (2) sample K >= 2 responses y_1..y_K of each from the current policy pi_theta
  (3) label them: r(x, y_k) for each (K reward calls per prefix); every pair (i, j) with r_i != r_j is a
      preference pair, the higher reward chosen (K(K-1)/2 pairs a prefix at most; a tie makes none)
  (4) one DPO step on all the iteration's pairs: the loss passed in (dpo.py's dpo_loss, Eq. 7 of
      arXiv:2305.18290, on SUMMED log-probs, scaled by beta), pi_ref = pi_SFT (fixed), the optimiser and warm-up
      the caller builds (dpo.py's make_optimizer: the same rules as offline DPO) and offline DPO's gradient
      clipping at max_grad_norm
The labels consumed are counted per iteration (reward calls and labelled pairs) for the reward-vs-labels plot.

This follows OAIF, Guo et al. 2024 ("Direct Language Model Alignment from Online AI Feedback", arXiv:2402.04792):
sample 2 responses from the current policy, let an annotator pick the preferred one, take a DPO step. Where
ours differs: the annotator is a scalar reward (r* or the learned reward model), not an LLM comparing the two;
K may exceed 2 and then every pair of the K samples is used (as the offline IMDb pairs are); pi_ref stays pi_SFT
(as in OAIF); one optimiser step per iteration over all of its pairs.

Tests (test_online.py): at K = 2, with the samples drawn from pi_SFT and frozen (no fresh sampling), the first
iteration equals one offline DPO step (dpo.py's train) on the same pairs: the same loss and the same weights
after the step; the label accounting of a micro run checked by hand; a run killed after a checkpoint resumes
there and ends with the same weights; a step's loss and gradient, each distinct sample scored once, equal those
of every pair scored alone.
"""
import dataclasses
import time

import torch

import eval as ev


@dataclasses.dataclass
class OnlineConfig:
    iterations: int = 10       # DPO steps, each on freshly sampled and labelled pairs
    prefixes: int = 16         # training prefixes sampled per iteration
    samples: int = 2           # K responses per prefix (>= 2); every unequal-reward pair of them is labelled
    beta: float = 0.1          # DPO's beta (the same as offline DPO's)
    max_new_tokens: int = 24
    max_grad_norm: float = 10.0  # offline DPO's clipping (dpo.py TrainConfig.max_grad_norm)
    sample_batch_size: int = 64
    seed: int = 0


def label_pairs(prompts, completions, rewards, k):
    """(3): every pair of each prefix's k samples with unequal rewards, the higher chosen. completions and rewards
    are prefix-major (k per prefix). Returns a list of (prompt_ids, chosen_ids, rejected_ids)."""
    pairs = []
    for p, prompt in enumerate(prompts):
        for i in range(p * k, (p + 1) * k):
            for j in range(i + 1, (p + 1) * k):
                if rewards[i] != rewards[j]:
                    w, l = (i, j) if rewards[i] > rewards[j] else (j, i)
                    pairs.append((prompt, completions[w], completions[l]))
    return pairs


def iteration_prompts(prompts, iteration, per_iteration, seed):
    """(1): the prefixes of one iteration: positions iteration * per_iteration ... of the passes over `prompts`,
    each pass in its own seeded order (so a resumed run draws what the uninterrupted one drew)."""
    out = []
    for position in range(iteration * per_iteration, (iteration + 1) * per_iteration):
        epoch, k = divmod(position, len(prompts))
        order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        out.append(prompts[order[k].item()])
    return out


def dpo_step(policy, reference, pairs, loss_fn, optimizer, scheduler, cfg):
    """(4): one DPO step on pairs [(prompt_ids, chosen_ids, rejected_ids)]: summed log-probs of chosen and
    rejected under the policy (with grad) and pi_ref (without), loss_fn(...)[0].mean() backward, clipped, one
    optimiser and scheduler step. Each distinct (prompt, response) row is scored once and its log-prob used by
    every pair it is in (K samples make up to K(K-1)/2 pairs of only K rows: at K = 4, 4 rows instead of 12); the
    same sums as scoring the 2B rows one by one (test_online.py -k distinct_rows).
    Returns (loss, accuracy of the implicit reward, gradient norm)."""
    row = {}                                                                   # (prompt, response) -> its row
    for x, yw, yl in pairs:
        for y in (yw, yl):
            row.setdefault((tuple(x), tuple(y)), len(row))
    prompts, responses = [list(x) for x, _ in row], [list(y) for _, y in row]  # N <= 2B distinct rows
    chosen = torch.tensor([row[tuple(x), tuple(yw)] for x, yw, _ in pairs])    # (B,) row of each pair's y_w
    rejected = torch.tensor([row[tuple(x), tuple(yl)] for x, _, yl in pairs])  # (B,) and of its y_l
    policy_logps = ev.batch_completion_logps(policy, prompts, responses).float()              # (N,) with grad
    reference_logps = ev.completion_logps(reference, prompts, responses, cfg.sample_batch_size)  # (N,) no grad
    reference_logps = reference_logps.to(policy_logps.device)
    losses, chosen_rewards, rejected_rewards = loss_fn(policy_logps[chosen], policy_logps[rejected],
                                                       reference_logps[chosen], reference_logps[rejected], cfg.beta)
    losses.mean().backward()
    trainable = [p for p in policy.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return losses.mean().item(), (chosen_rewards > rejected_rewards).float().mean().item(), grad_norm.item()


def train_online_dpo(policy, reference, reward_fn, prompts, cfg, loss_fn, optimizer, scheduler, sample=None,
                     checkpoints=None, log=print):
    """Online DPO (steps (1)-(4) above) of `policy` (trained in place; the weights its optimizer holds) against the
    frozen `reference` (pi_SFT). reward_fn(token lists) -> (N,) scores labels the samples; prompts: the training
    prefixes (token lists); loss_fn: dpo.py's dpo_loss; optimizer, scheduler: dpo.py's make_optimizer over the
    trained weights. sample(policy, prompts, k) -> prefix-major completions replaces sampling from the current
    policy (the test's frozen pi_SFT samples). checkpoints (machinery.stages.Checkpoints, counting iterations):
    saved with the optimiser, scheduler, sampling generator and history; resumed from the newest.
    Returns the history: one dict per iteration with its reward_calls and pairs (labels) and their running totals."""
    device = policy.wte.weight.device
    generator = torch.Generator(device).manual_seed(cfg.seed)
    if sample is None:
        def sample(model, xs, k):
            return ev.sample_completions(model, xs, k, cfg.max_new_tokens, cfg.sample_batch_size, generator)
    start, saved = checkpoints.resume(policy, optimizer, [generator]) if checkpoints else (0, {})
    if saved:
        scheduler.load_state_dict(saved["scheduler"])
    history = saved.get("history", [])
    for it in range(start, cfg.iterations):
        t0 = time.time()
        xs = iteration_prompts(prompts, it, cfg.prefixes, cfg.seed)                     # (1)
        completions = sample(policy, xs, cfg.samples)                                    # (2) P*K, prefix-major
        rows = [x for x in xs for _ in range(cfg.samples)]
        rewards = reward_fn([x + y for x, y in zip(rows, completions)]).tolist()         # (3) P*K reward calls
        pairs = label_pairs(xs, completions, rewards, cfg.samples)                       # (3)
        loss = accuracy = grad_norm = None
        if pairs:  # all ties: labels spent, no preference, no step
            loss, accuracy, grad_norm = dpo_step(policy, reference, pairs, loss_fn, optimizer, scheduler, cfg)  # (4)
        before = history[-1] if history else {"reward_calls_total": 0, "pairs_total": 0}
        history.append({"iteration": it + 1, "reward_calls": len(rewards), "pairs": len(pairs),
                        "reward_calls_total": before["reward_calls_total"] + len(rewards),
                        "pairs_total": before["pairs_total"] + len(pairs), "score": sum(rewards) / len(rewards),
                        "loss": loss, "accuracy": accuracy, "grad_norm": grad_norm, "seconds": time.time() - t0})
        if log:
            log(f"online DPO iteration {it + 1}/{cfg.iterations} | score {history[-1]['score']:.3f} | pairs "
                f"{len(pairs)} | loss {loss if loss is None else round(loss, 4)} | labels {history[-1]['pairs_total']}")
        if checkpoints:
            checkpoints.maybe_save(it + 1, policy, optimizer, [generator], scheduler=scheduler.state_dict(),
                                   history=history)
    return history
