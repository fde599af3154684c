"""The plan a long IMDb run prints before its first stage: each planned stage's size (steps, samples, rollouts)
and an estimated time, extrapolated from one timed micro-batch of the run's own model through the trainers' code
and one generate call. imdb.print_plan calls it; nothing here is needed to follow the paper, and nothing here
changes what a run computes (test_online.py::test_the_plan_leaves_the_global_random_state_as_it_found_it).

    measure_speed  tokens/s of the trainers' passes (machinery.fast.logps: the head on the scored positions only)
    plan_lines     (stage, what it runs, estimated seconds) for each planned stage; sizes checked by hand in
                   test_online.py (-k "tiny_run or matches_one_epoch or dpo_epochs")
    print_plan     both, printed

Measured against a quiet default CPU run (README, "Stage times"): 15 min 37 s estimated, 1,054 s spent in the
stages; the reward model is under-estimated the most (33 s against 52 s).
"""
import math
import time

import torch

from machinery.fast import logps
from machinery.lora import train_only_head


def measure_speed(cfg, model, device):
    """`model`, the run's own base model, on one micro-batch of 2 * micro_batch_size rows of (8 + max_new_tokens) tokens, each
    timed after a warm-up pass, through the code the stages run (machinery.fast.logps: the output head on the scored
    positions only): "all", forward+backward training every weight, scoring every position (SFT); "trunk", the
    blocks alone, forward+backward with a scalar read-out (the reward model: no output head); "trained", the
    weights --trainable names, scoring the completion positions (DPO, PPO, online DPO, the baselines); "forward",
    the same without gradients (reference log-probs, KL); and "generate", one generate call of sample_batch_size
    rows x max_new_tokens tokens, in seconds. Rates are in tokens (all the rows' positions) a second. The model
    (the run's base model, freshly built) is trained in place: pass one to throw away."""
    g = torch.Generator().manual_seed(cfg.seed)
    T = min(8 + cfg.max_new_tokens, model.config.block_size)
    x = torch.randint(0, 50000, (2 * cfg.micro_batch_size, T), generator=g).to(device)  # (2B, T)
    everything = torch.ones_like(x, dtype=torch.bool)                                    # (2B, T) SFT scores all
    completion = everything.clone()
    completion[:, :T - cfg.max_new_tokens] = False                                       # the completion's positions

    def tokens_per_s(backward, loss):
        for _ in range(2):  # the first pass warms up (allocations, kernels); the second is timed
            _sync(device)
            t0 = time.time()
            with torch.set_grad_enabled(backward):
                value = loss()
            if backward:
                value.backward()
            _sync(device)
            seconds = time.time() - t0
        model.zero_grad(set_to_none=True)
        return x.numel() / seconds
    speed = {"all": tokens_per_s(True, lambda: logps(model, x, everything).sum()),
             "trunk": tokens_per_s(True, lambda: model(x, return_hidden=True)[:, -1].sum()),
             "forward": tokens_per_s(False, lambda: logps(model, x, completion).sum())}
    if cfg.trainable == "head":
        train_only_head(model)
    speed["trained"] = tokens_per_s(True, lambda: logps(model, x, completion).sum())
    prompts = torch.randint(0, 50000, (cfg.sample_batch_size, 8), generator=g).tolist()
    model.eval()
    t0 = time.time()
    with torch.no_grad():
        model.generate(prompts, cfg.max_new_tokens, eos_id=-1, generator=torch.Generator(device).manual_seed(0))
    _sync(device)
    return {**speed, "generate": time.time() - t0}


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def plan_lines(cfg, stages, sizes, speed=None):
    """The plan: (stage, what it runs, estimated seconds or None) for each planned stage, in order. speed: (training
    tokens/s, seconds per generate call) from measure_speed, or None (no estimates). Counts of pairs are upper bounds
    (a tie between two samples makes no pair); a stage already done is listed as cached, its estimate 0. sizes:
    what only the pipeline knows (imdb.plan_sizes): {"train_prefixes": prefixes left after the held-out ones,
    "sft_tokens": SFT's training tokens, "largest_n": Best-of-N's largest N, "online": the online DPO stages}."""
    speed = speed or {}
    T = 8 + cfg.max_new_tokens                                   # a prefix (2-8 tokens) and its completion

    def rate(kind):  # seconds for a number of tokens (or, "generate", of samples), None without a measurement
        if kind not in speed:
            return lambda n: None
        if kind == "generate":
            return lambda n: n / cfg.sample_batch_size * speed[kind]  # a call's cost grows with its rows (the head)
        return lambda n: n / speed[kind]
    all_s, trunk_s, train_s, fwd_s, gen = rate("all"), rate("trunk"), rate("trained"), rate("forward"), rate("generate")
    add = lambda *xs: None if None in xs else sum(xs)            # noqa: E731
    per_prefix = cfg.n_samples * (cfg.n_samples - 1) // 2
    train_prefixes = sizes["train_prefixes"]
    train_pairs = train_prefixes * per_prefix                    # at most
    rows_per_pair = cfg.n_samples / max(1, per_prefix)           # a prefix's pairs stay together: each sample once
    dpo_steps = train_pairs // cfg.batch_size
    seq_len = 128                                                # sft_stage: min(128, block_size)
    sft_tokens = sizes["sft_tokens"]
    sft_steps = max(1, sft_tokens // (cfg.sft_batch_size * seq_len))
    lines = []
    checkpoints = 1  # policies to evaluate (SFT first)
    for name in stages.plan:
        if name == "sft":
            what, est = (f"{sft_steps:,} steps of {cfg.sft_batch_size} x {seq_len} tokens"
                         f"{'' if cfg.sft_tokens else ' (one epoch, ~4 characters a token)'}"), \
                all_s(sft_steps * cfg.sft_batch_size * seq_len)
        elif name == "classifier":
            what, est = (f"the bag-of-tokens r*, {cfg.classifier_epochs} epoch(s)" if cfg.reward == "bow" else
                         f"r* = {cfg.reward} (RoBERTa; the bag-of-tokens classifier if it cannot be loaded)"), None
        elif name == "pairs":
            n = cfg.n_prefixes * cfg.n_samples
            what, est = (f"{cfg.n_prefixes:,} prefixes x {cfg.n_samples} samples = {n:,} samples, <= "
                         f"{train_pairs:,} training pairs"), gen(n)
        elif name == "reference":
            what, est = f"log-probs of <= {cfg.n_prefixes * per_prefix:,} pairs", fwd_s(cfg.n_prefixes * cfg.n_samples * T)
        elif name.startswith("dpo-pl-beta"):
            per_step = max(1, cfg.batch_size // per_prefix)
            steps = train_prefixes // per_step
            what, est = f"<= {steps:,} steps of {per_step} rankings of {cfg.n_samples}", \
                train_s(steps * per_step * cfg.n_samples * T)
            checkpoints += 4
        elif name.startswith("dpo-beta"):
            steps = cfg.dpo_epochs * dpo_steps
            what, est = (f"<= {steps:,} steps of {cfg.batch_size} pairs ({cfg.dpo_epochs} epoch"
                         f"{'s' if cfg.dpo_epochs > 1 else ''})"), train_s(steps * cfg.batch_size * rows_per_pair * T)
            checkpoints += 4 * cfg.dpo_epochs if not cfg.eval_every else math.ceil(steps / cfg.eval_every)
        elif name == "reference-rankings":
            what, est = f"log-probs of <= {train_prefixes * cfg.n_samples:,} samples", \
                fwd_s(train_prefixes * cfg.n_samples * T)
        elif name.startswith(("preferred-ft", "unlikelihood")):
            what, est = f"<= {dpo_steps:,} steps of {cfg.batch_size} pairs", \
                train_s(dpo_steps * cfg.batch_size * rows_per_pair * T)
            checkpoints += 4 if not cfg.eval_every else math.ceil(dpo_steps / cfg.eval_every)
        elif name == "reward_model":
            batches = cfg.rm_epochs * math.ceil(train_pairs / cfg.micro_batch_size)
            what, est = (f"<= {batches:,} batches of {cfg.micro_batch_size} pairs ({cfg.rm_epochs} epoch"
                         f"{'s' if cfg.rm_epochs > 1 else ''})"), trunk_s(batches * cfg.micro_batch_size * 2 * T)
        elif name in ("ppo", "ppo-gt"):
            n = cfg.ppo_iterations * cfg.ppo_batch_size
            what = f"{cfg.ppo_iterations:,} iterations x {cfg.ppo_batch_size:,} rollouts = {n:,} rollouts"
            est = add(cfg.ppo_iterations * (gen(cfg.ppo_batch_size) or 0) if speed else None,
                      train_s(n * cfg.ppo_epochs * T), fwd_s(2 * n * T))
            checkpoints += 4
        elif name in sizes["online"]:
            n = cfg.online_iterations * cfg.online_prefixes * cfg.online_samples
            pairs = cfg.online_iterations * cfg.online_prefixes * cfg.online_samples * (cfg.online_samples - 1) // 2
            what = (f"{cfg.online_iterations:,} iterations x {cfg.online_prefixes} prefixes x K = {cfg.online_samples}"
                    f": {n:,} samples and reward calls, <= {pairs:,} pairs")
            est = add(cfg.online_iterations * (gen(cfg.online_prefixes * cfg.online_samples) or 0) if speed else None,
                      train_s(2 * pairs * T), fwd_s(2 * pairs * T))
            checkpoints += 4
        elif name == "best-of-n":
            n = sizes["largest_n"]
            what, est = f"{cfg.eval_prompts:,} test prefixes x {n} samples = {n * cfg.eval_prompts:,}", \
                gen(n * cfg.eval_prompts)
        elif name == "implicit-samples":
            n = cfg.eval_prompts * cfg.n_samples
            what, est = f"{cfg.eval_prompts:,} test prefixes x {cfg.n_samples} samples = {n:,}", gen(n)
        else:
            what, est = "", None
        lines.append((name, what, 0.0 if stages.done(name) else est))  # noqa: E501
    evaluation = checkpoints * cfg.eval_prompts
    lines.append(("evaluation", f"{checkpoints} policies (<=; SFT and each saved checkpoint) x {cfg.eval_prompts:,} "
                  f"test prefixes = {evaluation:,} samples", add(checkpoints * (gen(cfg.eval_prompts) or 0)
                                                                 if speed else None, fwd_s(2 * evaluation * T))))
    return lines


def print_plan(cfg, stages, sizes, make_model, device, log):
    """Prints the plan (plan_lines) before the first stage, with time estimates from one measurement of a model
    make_model() builds (measure_speed): a rough figure, labelled so; it changes no stage's key or result, nor the
    global random state."""
    t0 = time.time()
    cuda = list(range(torch.cuda.device_count())) if str(device).startswith("cuda") else []
    with torch.random.fork_rng(devices=cuda):  # its initialisation and dropout leave the global RNG as they found it
        speed = measure_speed(cfg, make_model(), device)
    log(f"plan ({cfg.preset} preset, {device}); estimate = extrapolated from one micro-batch of the model through "
        f"the trainers' code (tokens/s: all weights trained {speed['all']:,.0f}, blocks only {speed['trunk']:,.0f}, "
        f"{cfg.trainable} weights trained {speed['trained']:,.0f}, forward {speed['forward']:,.0f}) and one generate "
        f"call of {cfg.sample_batch_size} x {cfg.max_new_tokens} tokens ({speed['generate']:.2f} s), measured in "
        f"{time.time() - t0:.1f} s with the machine as loaded now; rough: reward calls and per-step overheads are "
        f"not counted):")
    total, lines = 0.0, plan_lines(cfg, stages, sizes, speed)
    width = max(len(what) for _, what, _ in lines)
    for name, what, est in lines:
        when = "cached" if name in stages.plan and stages.done(name) else ("not estimated" if est is None else f"estimate {_hms(est)}")
        log(f"  {name:<22} {what:<{width}} {when}")
        total += est or 0
    log(f"  {'total':<22} {'':<{width}} estimate {_hms(total)}")


def _hms(seconds):
    seconds = round(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
