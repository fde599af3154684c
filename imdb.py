"""The IMDb sentiment experiment (Section 6.1 and Appendix C.1 of the paper, Fig. 2 left), end to end:

    python dpo.py --task imdb [--preset cpu|gpu] [--out runs/imdb]

Stages, each cached on disk so that a re-run skips what is finished (--methods: only those the chosen methods need):
  1. SFT: the base model fine-tuned on IMDb train reviews (or, on CPU, a small GPT trained from scratch)
  2. the ground-truth reward r*(x, y) = P(positive | x + y): a classifier trained on IMDb train labels
  3. preference pairs: prefixes of 2-8 tokens of train reviews, 4 samples each from pi_SFT, scored by r*,
     all 6 pairs per prefix (higher reward = chosen)
  4. policies: DPO for a beta sweep, Preferred-FT (SFT on the chosen completions), Unlikelihood (alpha sweep), and
     DPO-PL: each prefix's ranking of its 4 samples as one Plackett-Luce term instead of 6 pairs (Appendix A.3);
     the RLHF baselines (ppo.py): a reward model fitted to the same pairs, PPO on it ("PPO") and PPO on r*
     itself ("PPO-GT"); every run saved at several points along its training
     with --methods online-dpo-gt,online-dpo-rm (not in any preset's default), online DPO (online.py): DPO steps
     on pairs the current policy samples, labelled by r* or by the reward model, the labels counted
  5. evaluation on prefixes of IMDb test reviews: mean r* and KL(pi || pi_SFT) of the policy's own samples,
     Best-of-N from pi_SFT (by r* and by the reward model), a table and the reward/KL frontier plot; and, for
     each DPO policy, how well its implicit reward beta log pi/pi_SFT ranks fresh samples of those prefixes by
     r* (Section 5.1)
"""
import dataclasses
import json
import math
import os
import shutil
import sys
import time

import torch

import eval as ev
import online
import ppo
import sft
from data import EOS, InputError, decode, read_imdb
from machinery import plan as run_plan
from machinery.fast import reference_logps
from machinery.hf import from_pretrained, save_pretrained
from machinery.hub import imdb_path
from machinery.lora import train_only_head
from machinery.integrity import atomic_write, save_torch, write_json
from machinery.runtime import TrainingError
from machinery.runtime import check_flags as runtime_check_flags
from machinery.stages import Checkpoints, Stages, flag, keyed_json
from machinery.tokenizers import load_tokenizer
from machinery.util import field, parse_args, pick_device
from model import GPT

IMDB_PRESETS = {
    # The paper's setup (one GPU): gpt2-large, one epoch of SFT, 25,000 prefixes, DPO with RMSprop at lr 1e-6.
    "gpu": dict(model="gpt2-large", sft_tokens=0, sft_lr=1e-5, sft_batch_size=16, n_prefixes=25_000,
                max_new_tokens=48, betas="0.05,0.1,1,5", alphas="0.01,0.1", optimizer="rmsprop", lr=1e-6,
                warmup_steps=150, batch_size=64, micro_batch_size=8, baseline_lr=1e-6, eval_every=100,
                eval_prompts=512, sample_batch_size=128, adam_eps=1e-8, trainable="all",
                reward="siebert",  # the paper's r* (the bag-of-tokens classifier, printed, if it cannot be loaded)
                # the RLHF baselines (Appendix C.1): the reward model trains every weight, 3 epochs, the best epoch by
                # held-out pair accuracy kept (the paper's rule; its model is gpt2-large, here the SFT model with a
                # scalar head);
                # PPO with TRL's gpt2-sentiment settings (the paper's "TRL" run; PPOConfig's defaults) at the
                # paper's 1,024 rollouts per PPO step, 100 steps (about 4 passes over the 25,000 prefixes)
                rm_trainable="all", rm_epochs=3, rm_lr=1e-5, ppo_iterations=100, ppo_batch_size=1024,
                ppo_minibatch_size=64, ppo_epochs=4, ppo_lr=1.41e-5, ppo_value_lr=0, ppo_kl_coef=0.2,
                ppo_kl_target=6.0, ppo_lam=0.95, best_of_n="2,4,16,64"),
    # Two CPU cores, offline, in about 18 minutes (17 min 37 s at a matmul peak of ~315 GFLOP/s): a small GPT trained
    # from scratch, 2,400 prefixes, head only;
    # beta 0.5 and Unlikelihood alpha 0.01 left out of the sweeps (they traced beta 1's and alpha 0.1's frontiers:
    # README) to keep the run with PPO, PPO-GT and Best-of-N within 20 minutes.
    "cpu": dict(model="scratch", sft_tokens=500_000, sft_lr=5e-3, sft_batch_size=16, n_prefixes=2400,
                max_new_tokens=24, betas="0.05,0.1,1", alphas="0.1", optimizer="adamw", lr=4e-4,
                warmup_steps=10, batch_size=48, micro_batch_size=48, baseline_lr=2e-4, eval_every=0,
                eval_prompts=256, sample_batch_size=256, adam_eps=1e-8, trainable="head", reward="bow",
                # PPO trains the output head only, as DPO does; the value head (a new linear head, its own lr 1e-2:
                # at the policy's lr it fits the returns too slowly to be a baseline) and the reward model train
                # regardless: the reward model all weights, because its scalar head alone on the frozen SFT model
                # ranks the held-out pairs at chance (51%; all weights, one epoch at lr 1e-4: 64%, as DPO's implicit
                # reward). PPO-GT's tuning (lr, minibatch, lambda) is tabled in the README, "How the CPU preset was
                # chosen"
                rm_trainable="all", rm_epochs=1, rm_lr=1e-4, ppo_iterations=40,
                ppo_batch_size=64, ppo_minibatch_size=64, ppo_epochs=4, ppo_lr=5e-4, ppo_value_lr=1e-2,
                ppo_kl_coef=0.05, ppo_kl_target=0, ppo_lam=1.0, best_of_n="2,4,8,16"),
}
# Every stage in about a minute on 2 cores, for trying the pipeline and for bug reports (the tests' micro run):
# the CPU preset with a 1-block model, 300 reviews a split, 24 prefixes, 6-token samples, 4 PPO iterations of 8.
IMDB_PRESETS["tiny"] = {**IMDB_PRESETS["cpu"], **dict(
    model="scratch:1,2,32", sft_tokens=8000, n_prefixes=24, max_new_tokens=6, betas="0.1", alphas="0.1",
    batch_size=12, micro_batch_size=6, eval_prompts=8, classifier_epochs=1, max_reviews=300, ppo_iterations=4,
    ppo_batch_size=8, ppo_minibatch_size=8, ppo_epochs=1, best_of_n="2,4")}
for _preset in ("gpu", "cpu"):
    IMDB_PRESETS[_preset].update(classifier_epochs=10, max_reviews=0)
# --methods: every method the pipeline can train and evaluate (the name, the stages it needs are planned in plan()),
# and each preset's default: all the methods it has always run.
# Online DPO (online.py) is not in any default: add online-dpo-gt,online-dpo-rm to --methods.
METHODS = ("dpo", "dpo-pl", "preferred-ft", "unlikelihood", "ppo-gt", "ppo", "best-of-n", "best-of-n-rm",
           "online-dpo-gt", "online-dpo-rm")
ONLINE = {"online-dpo-gt": "Online DPO (r*)", "online-dpo-rm": "Online DPO (RM)"}  # stage -> method of its rows
RM_METHODS = ("PPO", "Best-of-N (RM)", "Online DPO (RM)")  # the methods that climb the learned reward model
for _preset in IMDB_PRESETS.values():
    _preset.setdefault("methods", ",".join(METHODS[:8]))
# Online DPO's size, matched to one epoch of offline DPO so that on-policy sampling is the only difference: K = 4
# samples of each prefix (6 pairs at most, as the offline pairs), enough prefixes an iteration for offline DPO's
# batch of pairs, as many iterations as offline DPO's steps. CPU: 8 prefixes (<= 48 pairs, 32 reward calls) x 285
# iterations (13,680 pairs, 9,120 reward calls: offline DPO's); GPU: 11 prefixes (<= 66 pairs, batch 64) x 2,200
# iterations (offline: 23,750 training prefixes x 6 / 64 = 2,226 steps); tiny: 4 iterations of 6 prefixes, K = 2.
IMDB_PRESETS["gpu"].update(online_iterations=2200, online_prefixes=11, online_samples=4)
IMDB_PRESETS["cpu"].update(online_iterations=285, online_prefixes=8, online_samples=4)
IMDB_PRESETS["tiny"].update(online_iterations=4, online_prefixes=6, online_samples=2)


@dataclasses.dataclass
class ImdbConfig:
    out: str = field("runs/imdb", "output folder: one sub-folder per stage, results.csv/json, frontier.png")
    preset: str = field("auto", "gpu (the paper's setup), cpu (about 18 min on 2 cores), tiny (every stage in about a "
                        "minute, for trying the pipeline) or auto (gpu if one is present)")
    model: str = field(None, "base model: scratch, scratch:L,H,C, a hub name or folder (preset's if unset)")
    sft_tokens: int = field(None, "SFT training tokens; 0 = one epoch of IMDb train")
    sft_lr: float = field(None, "SFT peak learning rate")
    sft_batch_size: int = field(None, "SFT windows (of 128 tokens) per step")
    n_prefixes: int = field(None, "train-review prefixes to sample completions for (paper: 25,000)")
    n_samples: int = field(4, "samples per prefix; every pair of them is a preference pair (4 -> 6 pairs)")
    max_new_tokens: int = field(None, "tokens per sampled completion")
    betas: str = field(None, "DPO beta sweep, comma-separated (paper: 0.05,0.1,1,5)")
    ranking_betas: str = field("0.1", "betas of DPO-PL, trained on each prefix's whole ranking of its samples (one "
                               "Plackett-Luce term, Appendix A.3) instead of its pairs; empty: none")
    alphas: str = field(None, "Unlikelihood alpha sweep, comma-separated")
    optimizer: str = field(None, "rmsprop (paper) or adamw, for DPO and the baselines")
    lr: float = field(None, "DPO learning rate")
    adam_eps: float = field(None, "AdamW epsilon for DPO (see dpo.py --help); the baselines keep AdamW's 1e-8")
    baseline_lr: float = field(None, "Preferred-FT and Unlikelihood learning rate")
    trainable: str = field(None, "which weights every method trains: all (the paper) or head (the output head only; "
                           "the CPU preset, see IMDB_PRESETS)")
    warmup_steps: int = field(None, "linear warm-up steps")
    batch_size: int = field(None, "pairs per step (paper: 64)")
    dpo_epochs: int = field(1, "passes of DPO over the training pairs (the paper: 1; more: to look for over-optimization "
                            "of r*); above 1, a checkpoint every quarter epoch")
    micro_batch_size: int = field(None, "pairs per forward/backward")
    eval_every: int = field(None, "evaluate a DPO checkpoint every N steps (0: after a quarter, half, three quarters and "
                            "all of the run)")
    eval_prompts: int = field(None, "prefixes of IMDb test reviews to evaluate on (one sample each)")
    sample_batch_size: int = field(None, "sequences per generate call")
    rm_trainable: str = field(None, "the learned reward model of 'PPO' (the SFT model with a scalar head, Bradley-Terry on "
                              "the training pairs): all (every weight) or head (the scalar head on the frozen SFT model)")
    rm_epochs: int = field(None, "reward model epochs over the training pairs, the epoch with the best held-out pair "
                           "accuracy kept (the paper: 3; the CPU preset: 1)")
    rm_lr: float = field(None, "reward model learning rate (AdamW)")
    ppo_iterations: int = field(None, "PPO iterations (rollout batches) of PPO and PPO-GT, each saved after a quarter, "
                                "half, three quarters and all of them; 0: no PPO")
    ppo_batch_size: int = field(None, "rollouts per PPO iteration (the paper: 1,024)")
    ppo_minibatch_size: int = field(None, "rollouts per PPO gradient step")
    ppo_epochs: int = field(None, "PPO passes over each rollout batch")
    ppo_lr: float = field(None, "PPO learning rate of the policy (AdamW; the weights --trainable names)")
    ppo_value_lr: float = field(None, "PPO learning rate of the value head (0: --ppo-lr)")
    ppo_kl_coef: float = field(None, "PPO's KL coefficient beta (the initial one with --ppo-kl-target)")
    ppo_kl_target: float = field(None, "sequence KL (nats) the adaptive KL controller steers to; 0: beta fixed")
    ppo_lam: float = field(None, "GAE lambda (1: each token's advantage is the sampled return minus V, no bootstrapping)")
    methods: str = field(None, "methods to train and evaluate, comma-separated, from: dpo (the --betas sweep), dpo-pl "
                         "(--ranking-betas), preferred-ft, unlikelihood (--alphas), ppo-gt (PPO on r*), ppo (PPO on "
                         "the learned reward model), best-of-n (by r*), best-of-n-rm (by the reward model), online-dpo-gt "
                         "and online-dpo-rm (online DPO labelled by r* or by the reward model: online.py); stages no "
                         "chosen method needs are not run (preset: all but the online ones)")
    online_iterations: int = field(None, "online DPO iterations (DPO steps on freshly sampled, labelled pairs), each "
                                   "run saved after a quarter, half, three quarters and all of them")
    online_prefixes: int = field(None, "training prefixes online DPO samples per iteration")
    online_samples: int = field(None, "K: samples per prefix of online DPO from the current policy (>= 2); every "
                                "pair of unequal reward is labelled. Its beta: DPO's plotted one (0.1 if swept)")
    best_of_n: str = field(None, "Best-of-N sizes N, comma-separated, from one draw of the largest N samples of pi_SFT per "
                           "evaluation prefix; empty: no Best-of-N")
    classifier_epochs: int = field(None, "epochs of the bag-of-tokens reward classifier")
    reward: str = field(None, "ground-truth reward: bow (the project's bag-of-tokens classifier, trained here; the CPU "
                        "preset's) or siebert (the paper's siebert/sentiment-roberta-large-english, the GPU preset's; "
                        "falls back to bow with a printed note when its weights cannot be loaded), or a local folder")
    max_reviews: int = field(None, "use only this many reviews per split (0 = all 25,000)")
    imdb: str = field(None, "IMDb archive or extracted folder (default: $DPO_IMDB, else download)")
    device: str = field("auto", "cuda, mps or cpu (auto: the first available)")
    seed: int = field(0, "seeds every stage")

    def resolved(self):
        """The preset's values for every field left unset (auto: gpu when CUDA is present, said so)."""
        preset = self.preset
        if preset == "auto":
            preset = "gpu" if torch.cuda.is_available() else "cpu"
            print(f"--preset auto: {'a GPU is' if preset == 'gpu' else 'no GPU'} present, using the {preset} preset")
        if preset not in IMDB_PRESETS:
            raise InputError(f"--preset {self.preset}: use gpu, cpu, tiny or auto")
        values = {k: (IMDB_PRESETS[preset].get(k) if v is None else v) for k, v in dataclasses.asdict(self).items()}
        return dataclasses.replace(self, **{**values, "preset": preset})


def make_pairs(prompt_ids, completions, rewards, group):
    """All pairs of one prefix's samples, the higher reward chosen: 4 samples give 6 pairs. A tie
    carries no preference and makes no pair. Pairs keep token ids (decoding and re-encoding sampled
    tokens need not give the same ids) and the text, so the file also serves `--task jsonl`."""
    pairs = []
    for i in range(len(completions)):
        for j in range(i + 1, len(completions)):
            if rewards[i] == rewards[j]:
                continue
            w, l = (i, j) if rewards[i] > rewards[j] else (j, i)
            pairs.append({"prompt": decode([t for t in prompt_ids if t != EOS]), "chosen": decode(completions[w]),
                          "rejected": decode(completions[l]), "prompt_ids": list(prompt_ids),
                          "chosen_ids": completions[w], "rejected_ids": completions[l], "group": group,
                          "chosen_reward": rewards[w], "rejected_reward": rewards[l]})
    return pairs


def make_ranking(prompt_ids, completions, rewards, group):
    """One prefix's samples ranked by reward, best first, for the Plackett-Luce loss; None when all rewards are
    equal (no preference, as make_pairs makes no pair). Ties keep the sampling order (sort is stable): the
    samples are drawn independently, so that order is random; identical samples (what ties mostly are) give
    the same loss in either order."""
    if len(set(rewards)) == 1:
        return None
    order = sorted(range(len(completions)), key=lambda i: -rewards[i])
    return {"prompt_ids": list(prompt_ids), "responses_ids": [completions[i] for i in order],
            "rewards": [rewards[i] for i in order], "group": group}


def _cached_json(path, compute, what):
    """Runs compute() and stores its JSON result at path (atomically), or reads it back if a previous run did."""
    if os.path.exists(path):
        print(f"{what}: cached in {path}")
        with open(path) as f:
            return json.load(f)
    result = compute()
    write_json(path, result)
    return result


def held_out_groups(groups):
    """The prefixes whose pairs are held out (5%): every 20th (group % 20 == 19), or, with too few prefixes
    for one of those to have pairs, the last prefix (none when there is only one)."""
    held = {g for g in range(len(groups)) if g % 20 == 19} & set(groups)
    return held or (set(sorted(groups)[-1:]) if len(groups) >= 2 else set())


def numbers(cfg, name, kind=float, low=0.0, strict=True, empty=False):
    """A comma-separated flag's values, each checked: --betas 0.1,1 -> [0.1, 1.0]; one line naming the flag if bad."""
    text = getattr(cfg, name)
    try:
        values = [kind(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        values = None
    ok = values is not None and (values or empty) and all(math.isfinite(v) and (v > low if strict else v >= low)
                                                          for v in values)
    if not ok:
        what = f"{'integers' if kind is int else 'numbers'} {'>' if strict else '>='} {low:g}, comma-separated"
        raise InputError(f"{flag(name)} {text!r}: use {what}{' (empty: none)' if empty else ''}")
    return values


def chosen_methods(cfg):
    """--methods as a set of names from METHODS; one line naming the flag for an unknown or empty choice."""
    chosen = [m.strip() for m in str(cfg.methods).split(",") if m.strip()]
    unknown = [m for m in chosen if m not in METHODS]
    if unknown or not chosen:
        raise InputError(f"--methods {cfg.methods!r}: {'unknown ' + ', '.join(unknown) + '; ' if unknown else ''}"
                         f"choose from {','.join(METHODS)}")
    return set(chosen)


def check_flags(cfg, TrainConfig):
    """Every flag of the experiment, before the first stage: a bad value is refused in one line naming it (it used
    to surface as a traceback after earlier stages had run). Then the trainer's own flags, as DPO will see them."""
    chosen_methods(cfg)
    at_least = {1: ("n_samples", "max_new_tokens", "sft_batch_size", "batch_size", "micro_batch_size", "eval_prompts",
                    "sample_batch_size", "rm_epochs", "ppo_batch_size", "ppo_minibatch_size", "ppo_epochs",
                    "classifier_epochs", "n_prefixes", "online_iterations", "online_prefixes", "dpo_epochs"),
                2: ("online_samples",),
                0: ("sft_tokens", "eval_every", "warmup_steps", "ppo_iterations", "max_reviews")}
    for low, names in at_least.items():
        for name in names:
            if getattr(cfg, name) < low:
                raise InputError(f"{flag(name)} {getattr(cfg, name)}: must be at least {low}")
    for name in ("sft_lr", "lr", "baseline_lr", "rm_lr", "ppo_lr", "adam_eps"):
        if not 0 < getattr(cfg, name) < math.inf:
            raise InputError(f"{flag(name)} {getattr(cfg, name)}: must be a positive number")
    for name in ("ppo_value_lr", "ppo_kl_coef", "ppo_kl_target"):
        if not 0 <= getattr(cfg, name) < math.inf:
            raise InputError(f"{flag(name)} {getattr(cfg, name)}: must be a number >= 0")
    if not 0 <= cfg.ppo_lam <= 1:
        raise InputError(f"--ppo-lam {cfg.ppo_lam}: GAE lambda lies in [0, 1]")
    if cfg.ppo_minibatch_size > cfg.ppo_batch_size:
        raise InputError(f"--ppo-minibatch-size {cfg.ppo_minibatch_size} exceeds --ppo-batch-size {cfg.ppo_batch_size}")
    numbers(cfg, "betas")
    numbers(cfg, "ranking_betas", empty=True)
    numbers(cfg, "alphas", low=0, strict=False, empty=True)
    numbers(cfg, "best_of_n", kind=int, low=1, strict=False, empty=True)
    for name, choices in (("trainable", ("all", "head")), ("rm_trainable", ("all", "head"))):
        if getattr(cfg, name) not in choices:
            raise InputError(f"{flag(name)} {getattr(cfg, name)}: use {' or '.join(choices)}")
    if cfg.reward not in ("bow", "siebert") and not os.path.isdir(cfg.reward):
        raise InputError(f"--reward {cfg.reward}: use bow, siebert or a folder holding a RoBERTa classifier")
    if cfg.model.startswith("scratch:"):
        try:
            n_layer, n_head, n_embd = (int(v) for v in cfg.model[len("scratch:"):].split(","))
            assert min(n_layer, n_head, n_embd) >= 1 and n_embd % n_head == 0
        except (ValueError, AssertionError):
            raise InputError(f"--model {cfg.model}: write scratch:LAYERS,HEADS,CHANNELS (channels a multiple of "
                             f"the heads), e.g. scratch:2,2,64") from None
    elif cfg.model.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(cfg.model)):
        raise InputError(f"--model {cfg.model}: no such folder")
    check_size(cfg)
    for beta in numbers(cfg, "betas"):  # what DPO's trainer will be given, checked by its own rules now
        runtime_check_flags(dpo_config(cfg, TrainConfig, beta, "<sft>", os.path.join(cfg.out, "x"), 1, cfg.device))


def check_size(cfg):
    """Refuses, before anything is trained, a run whose training pairs cannot fill one batch."""
    per_prefix = cfg.n_samples * (cfg.n_samples - 1) // 2  # pairs of one prefix's samples, at most (ties: fewer)
    if per_prefix < 1:
        raise InputError(f"--n-samples {cfg.n_samples}: a preference pair needs at least 2 samples per prefix")
    most = lambda n: (n - len(held_out_groups(range(n)))) * per_prefix  # noqa: E731 (training pairs, at most)
    if most(cfg.n_prefixes) < cfg.batch_size:
        need = cfg.n_prefixes + 1
        while most(need) < cfg.batch_size:
            need += 1
        raise InputError(f"--n-prefixes {cfg.n_prefixes} gives at most {most(cfg.n_prefixes)} training pairs, fewer "
                         f"than one batch (--batch-size {cfg.batch_size}): use --n-prefixes {need} or more, or a "
                         f"smaller --batch-size")


def main(argv, train, TrainConfig, train_rankings=None, online_dpo=None):
    """`python dpo.py --task imdb [flags]` (argv without --task imdb): the experiment, errors in one line."""
    try:
        run(parse_args(ImdbConfig, argv, __doc__.split("\n")[0]), train, TrainConfig, train_rankings=train_rankings,
            online_dpo=online_dpo)
    except (InputError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def run(cfg, train, TrainConfig, log=print, train_rankings=None, online_dpo=None):
    """The whole IMDb experiment; returns the result rows (method, beta/alpha, step, reward, KL, ...).
    train, TrainConfig and train_rankings are dpo.py's, passed in by dpo.main: the pipeline drives the trainers
    without importing dpo.py back (without train_rankings, no DPO-PL). online_dpo: (dpo_loss, make_optimizer),
    dpo.py's, for the online DPO methods. Each stage caches its result under cfg.out."""
    cfg = cfg.resolved()
    check_flags(cfg, TrainConfig)  # every flag, before the first stage
    if online_dpo is None and chosen_methods(cfg) & set(ONLINE):
        raise InputError(f"--methods {cfg.methods}: online DPO needs dpo.py's dpo_loss and make_optimizer, which this "
                         f"caller did not pass (imdb.run(..., online_dpo=(dpo_loss, make_optimizer)))")
    device = pick_device(cfg.device)
    os.makedirs(cfg.out, exist_ok=True)
    times, t_start = {}, time.time()
    log("imdb config: " + " ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items()))
    stages = plan(cfg, train_rankings is not None, log)
    stages.explain(final=REPORT_FILES)  # which stages are reused, resumed or (re)computed, and why

    def stage(name):
        times[name] = time.time() - t_start - sum(times.values())

    train_reviews, test_reviews = read_reviews(cfg)
    stage("read IMDb")
    print_plan(cfg, stages, train_reviews, device, log)  # the plan and its estimated time, before the first stage
    stage("plan")
    sft_dir, sft_model = sft_stage(cfg, stages, train_reviews, device, log)
    stage("SFT")
    classifier, clf_acc = reward_stage(cfg, stages, train_reviews, test_reviews, device, log)
    stage("reward model")
    train_pairs, eval_pairs = pairs_stage(cfg, stages, train_reviews, sft_model, classifier, device, log)
    stage("pairs")
    methods = chosen_methods(cfg)
    runs = []
    if "dpo" in methods:
        ref_lp = reference_stage(cfg, stages, sft_model, train_pairs, eval_pairs, device)
        stage("reference log-probs")
        runs += dpo_stage(cfg, stages, train, TrainConfig, sft_dir, train_pairs, eval_pairs, ref_lp, device, log)
    if train_rankings is not None and "dpo-pl" in methods:
        runs += ranking_stage(cfg, stages, train_rankings, TrainConfig, sft_dir, sft_model, eval_pairs, device, log)
    runs += baseline_stages(cfg, stages, sft_dir, train_pairs, device, log)
    stage("training")
    reward_model, rm_acc = None, None
    if "reward_model" in stages.plan:
        reward_model, rm_acc = reward_model_stage(cfg, stages, sft_model, train_pairs, eval_pairs, device, log)
        stage("reward model of PPO")
    if "ppo-gt" in stages.plan:
        runs += ppo_stage(cfg, stages, "PPO-GT", classifier.score, sft_dir, sft_model, train_pairs, device, log)
    if "ppo" in stages.plan:
        runs += ppo_stage(cfg, stages, "PPO", reward_model.score, sft_dir, sft_model, train_pairs, device, log)
    stage("PPO")
    for name, method in ONLINE.items():
        if name in stages.plan:
            reward_fn = classifier.score if name == "online-dpo-gt" else reward_model.score
            runs += online_stage(cfg, stages, name, method, reward_fn, TrainConfig, online_dpo, sft_dir, sft_model,
                                 train_pairs, device, log)
            stage(method)
    rows = evaluation_stage(cfg, stages, runs, sft_dir, sft_model, classifier, test_reviews, device, log,
                            reward_model)
    stage("evaluation")
    if "best-of-n" in stages.plan:
        rows += best_of_n_stage(cfg, stages, sft_model, classifier, reward_model if "best-of-n-rm" in methods else None,
                                test_reviews, device, log)
        stage("best-of-N")
    add_labels(cfg, rows, train_pairs)
    if "implicit-samples" in stages.plan:
        implicit_reward_stage(cfg, stages, runs, rows, sft_model, classifier, test_reviews, device, log)
        stage("implicit reward")
    report(cfg, rows, clf_acc, rm_acc, times, t_start, log)
    return rows


REPORT_FILES = ("results.csv", "results.json", "frontier.png", "summary.json", "implicit-reward.png", "labels.png",
                "overoptimization.png")


LATE_FLAGS = {"dpo_epochs": 1}  # flag -> the value that computes what runs made before the flag existed computed


def plan(cfg, with_rankings, log):
    """Every stage of the run, keyed on the flags that feed it and on its inputs (machinery/stages.py): a changed
    flag recomputes the stages it feeds and everything downstream of them, nothing else."""
    stages = Stages(cfg.out, log)
    add = stages.add
    methods = chosen_methods(cfg)  # a stage no chosen method needs is not planned

    def flags(*names):  # a flag added after runs were keyed enters a key only when it differs from its neutral value
        return {n: getattr(cfg, n) for n in names if n not in LATE_FLAGS or getattr(cfg, n) != LATE_FLAGS[n]}
    reviews = {"imdb": imdb_identity(cfg), **flags("max_reviews", "seed")}
    add("sft", {**reviews, **flags("model", "sft_tokens", "sft_lr", "sft_batch_size")}, [], ["sft", "sft-checkpoints"])
    add("classifier", {**reviews, **flags("reward", "classifier_epochs")}, [],
        ["classifier.pt", "classifier_accuracy.json", "reward_accuracy.json"])
    add("pairs", {**reviews, **flags("n_prefixes", "n_samples", "max_new_tokens", "sample_batch_size")},
        ["sft", "classifier"], ["pairs.jsonl", "rankings.jsonl"])
    if "dpo" in methods:
        add("reference", flags("micro_batch_size"), ["sft", "pairs"], ["reference_logps.pt"])
    training = flags("optimizer", "lr", "warmup_steps", "batch_size", "eval_every", "adam_eps", "trainable", "seed")
    for beta in numbers(cfg, "betas") if "dpo" in methods else []:
        add(f"dpo-beta{beta:g}", {**training, **flags("micro_batch_size", "dpo_epochs"), "beta": beta},
            ["sft", "pairs", "reference"], [f"dpo-beta{beta:g}"])
    if with_rankings and "dpo-pl" in methods and numbers(cfg, "ranking_betas", empty=True):
        add("reference-rankings", flags("sample_batch_size"), ["sft", "pairs"], ["reference_rankings.pt"])
        for beta in numbers(cfg, "ranking_betas", empty=True):
            add(f"dpo-pl-beta{beta:g}", {**training, **flags("n_samples"), "beta": beta},
                ["sft", "pairs", "reference-rankings"], [f"dpo-pl-beta{beta:g}"])
    baseline = flags("baseline_lr", "batch_size", "eval_every", "trainable", "seed")
    if "preferred-ft" in methods:
        add("preferred-ft", baseline, ["sft", "pairs"], ["preferred-ft"])
    for alpha in numbers(cfg, "alphas", low=0, strict=False, empty=True) if "unlikelihood" in methods else []:
        add(f"unlikelihood-alpha{alpha:g}", {**baseline, "alpha": alpha}, ["sft", "pairs"], [f"unlikelihood-alpha{alpha:g}"])
    ppo = cfg.ppo_iterations > 0 and "ppo" in methods
    sizes = numbers(cfg, "best_of_n", kind=int, low=1, strict=False, empty=True)
    if ppo or (sizes and "best-of-n-rm" in methods) or "online-dpo-rm" in methods:
        add("reward_model", flags("rm_trainable", "rm_epochs", "rm_lr", "micro_batch_size", "seed"), ["sft", "pairs"],
            ["reward_model", "reward_model-checkpoints"])
    rl = flags("ppo_iterations", "ppo_batch_size", "ppo_minibatch_size", "ppo_epochs", "ppo_lr", "ppo_value_lr",
               "ppo_kl_coef", "ppo_kl_target", "ppo_lam", "max_new_tokens", "trainable", "seed")
    if cfg.ppo_iterations > 0 and "ppo-gt" in methods:
        add("ppo-gt", rl, ["sft", "pairs", "classifier"], ["ppo-gt"])
    if ppo:
        add("ppo", rl, ["sft", "pairs", "reward_model"], ["ppo"])
    online_settings = {**flags("online_iterations", "online_prefixes", "online_samples", "max_new_tokens",
                               "sample_batch_size", "optimizer", "lr", "warmup_steps", "adam_eps", "trainable", "seed"),
                       "beta": _plotted_beta(cfg)}
    for name in ONLINE:
        if name in methods:
            add(name, online_settings,
                ["sft", "pairs", "classifier" if name == "online-dpo-gt" else "reward_model"], [name])
    evaluation = {**reviews, **flags("eval_prompts", "max_new_tokens", "sample_batch_size")}
    if sizes and methods & {"best-of-n", "best-of-n-rm"}:  # the reward model scores the draw for best-of-n-rm only
        add("best-of-n", {**evaluation, "largest_n": max(sizes)},
            ["sft", "classifier"] + (["reward_model"] if "best-of-n-rm" in methods else []), ["best_of_n_samples.json"])
    if methods & {"dpo", "dpo-pl"}:
        add("implicit-samples", {**evaluation, **flags("n_samples")}, ["sft", "classifier"], ["implicit_samples.json"])
    stages.evaluation = evaluation  # what each policy's eval.json is keyed on, with the policy's stage
    return stages


# ----------------------------------------------------------------------------------------------
# The plan, printed before the first stage (machinery/plan.py): each planned stage's size and an estimated time

def plan_sizes(cfg, train_reviews):
    """What machinery/plan.py needs to size the stages and only this pipeline knows."""
    return {"train_prefixes": cfg.n_prefixes - len(held_out_groups(range(cfg.n_prefixes))),
            "sft_tokens": cfg.sft_tokens or sum(len(r["text"]) for r in train_reviews) // 4,  # 0: an epoch, ~4 chars/token
            "largest_n": max(numbers(cfg, "best_of_n", kind=int, low=1, strict=False, empty=True), default=0),
            "online": set(ONLINE)}


def base_model(cfg, device):
    """The run's base model (--model) as it starts: scratch[:L,H,C] built (initialised from torch's global
    generator), otherwise loaded. The SFT stage trains one; the plan times one."""
    if cfg.model.startswith("scratch"):
        config = sft.scratch_config()
        if ":" in cfg.model:
            n_layer, n_head, n_embd = (int(v) for v in cfg.model.partition(":")[2].split(","))
            config = dataclasses.replace(config, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
        return GPT(config).to(device)
    return from_pretrained(cfg.model, device=device)


def plan_lines(cfg, stages, train_reviews, speed=None):
    return run_plan.plan_lines(cfg, stages, plan_sizes(cfg, train_reviews), speed)


def print_plan(cfg, stages, train_reviews, device, log):
    run_plan.print_plan(cfg, stages, plan_sizes(cfg, train_reviews), lambda: base_model(cfg, device), device, log)


def imdb_identity(cfg):
    """The IMDb data as a stage input: the archive's (or folder's) name and size, not its path (a copy elsewhere is
    the same data). Offline and absent: the path as given (reading it then fails in one line)."""
    try:
        path = imdb_path(cfg.imdb)
    except InputError:
        return str(cfg.imdb)
    size = os.path.getsize(path) if os.path.isfile(path) else sum(
        os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
    return f"{os.path.basename(os.path.normpath(path))} {size} bytes"


def read_reviews(cfg):
    """IMDb train and test reviews (--max-reviews: a seeded random subset of each)."""
    train_reviews, test_reviews = read_imdb("train", imdb_path(cfg.imdb)), read_imdb("test", imdb_path(cfg.imdb))
    if cfg.max_reviews:
        def pick(reviews):  # the first of a seeded permutation (the same seed for both splits)
            order = torch.randperm(len(reviews), generator=torch.Generator().manual_seed(cfg.seed))
            return [reviews[i] for i in order[:cfg.max_reviews].tolist()]
        train_reviews, test_reviews = pick(train_reviews), pick(test_reviews)
    return train_reviews, test_reviews


def sft_stage(cfg, stages, train_reviews, device, log):
    """1. SFT: the base model (or a scratch GPT) trained on IMDb train reviews, saved in out/sft (checkpoints along
    the way in out/sft-checkpoints, a tenth of the run apart, removed at the end).
    Returns the folder and the frozen SFT model (the reference, and the sampler of the pairs)."""
    sft_dir = os.path.join(cfg.out, "sft")
    if stages.done("sft"):
        log(f"SFT: cached in {sft_dir}")
    else:
        stages.begin("sft")
        tokens = sft.review_tokens(train_reviews)
        if cfg.model.startswith("scratch"):
            torch.manual_seed(cfg.seed)  # the scratch model's initialisation
            model = base_model(cfg, device)
            sft.init_unigram_bias(model, tokens)
        else:
            model = base_model(cfg, device)
            if load_tokenizer(cfg.model).to_id is not None:  # prompts, pairs and the reward all use GPT-2 ids
                raise InputError(f"--model {cfg.model}: its tokenizer is not GPT-2's; the IMDb experiment tokenises "
                                 f"with GPT-2's BPE throughout: use a GPT-2-tokenised model (gpt2*, GPT-J)")
        seq_len = min(128, model.config.block_size)
        n_tokens = cfg.sft_tokens or len(tokens)  # 0: one epoch
        steps = max(1, n_tokens // (cfg.sft_batch_size * seq_len))
        log(f"SFT: {model.num_params() / 1e6:.1f}M parameters, {steps} steps of {cfg.sft_batch_size}x{seq_len} tokens")
        checkpoints = Checkpoints(os.path.join(cfg.out, "sft-checkpoints"), math.ceil(steps / 10), steps, keep=False,
                                  log=log)
        sft.train_lm(model, tokens, steps, cfg.sft_batch_size, seq_len, cfg.sft_lr,
                     generator=torch.Generator().manual_seed(cfg.seed), log=log, checkpoints=checkpoints)
        save_pretrained(model, sft_dir)
        shutil.rmtree(checkpoints.folder)
        stages.finish("sft")
    return sft_dir, from_pretrained(sft_dir, device=device).requires_grad_(False)


def reward_stage(cfg, stages, train_reviews, test_reviews, device, log):
    """2. The ground-truth reward r*(x, y) = P(positive | x + y) and its test accuracy: the bag-of-tokens
    classifier (trained here, out/classifier.pt) or, with --reward siebert or a folder, a RoBERTa one."""
    classifier = None  # --reward siebert or a folder: a RoBERTa sentiment classifier (the paper's choice)
    if cfg.reward != "bow":
        try:
            classifier = ev.RobertaReward.load(ev.SIEBERT if cfg.reward == "siebert" else cfg.reward, device=device)
            log(f"reward classifier: {cfg.reward} (RoBERTa)")
        except (InputError, OSError) as e:
            log(f"reward classifier: cannot load {cfg.reward} ({e}); using the bag-of-tokens classifier instead")
    clf_path = os.path.join(cfg.out, "classifier.pt")
    done = stages.done("classifier")
    if not done:
        stages.begin("classifier")
    if classifier is None and done:
        classifier = ev.BowClassifier.load(clf_path)
        log(f"reward classifier: cached in {clf_path}")
    elif classifier is None:
        classifier = ev.train_classifier(train_reviews, epochs=cfg.classifier_epochs,
                                         generator=torch.Generator().manual_seed(cfg.seed), log=log)
        classifier.save(clf_path + ".tmp")
        os.replace(clf_path + ".tmp", clf_path)
    bow = isinstance(classifier, ev.BowClassifier)  # a RoBERTa reward is checked on ~2,000 test reviews, not 25,000
    acc_reviews = test_reviews if bow else test_reviews[::max(1, len(test_reviews) // 2000)]
    clf_acc = _cached_json(os.path.join(cfg.out, "classifier_accuracy.json" if bow else "reward_accuracy.json"),
                           lambda: {"test_accuracy": ev.accuracy(classifier, acc_reviews), "n": len(acc_reviews)},
                           "classifier accuracy")
    if not done:
        stages.finish("classifier")
    log(f"reward classifier: {100 * clf_acc['test_accuracy']:.1f}% on {clf_acc['n']} test reviews")
    return classifier, clf_acc


def pairs_stage(cfg, stages, train_reviews, sft_model, classifier, device, log):
    """3. Preference pairs (out/pairs.jsonl): n_samples completions of each train-review prefix from the SFT
    model, scored by r*, every pair of them; split into training pairs and held-out ones (held_out_groups)."""
    pairs_path, rankings_path = os.path.join(cfg.out, "pairs.jsonl"), os.path.join(cfg.out, "rankings.jsonl")
    if stages.done("pairs"):
        with open(pairs_path) as f:
            pairs = [json.loads(line) for line in f]
        log(f"pairs: cached in {pairs_path}")
    else:
        stages.begin("pairs")
        g = torch.Generator().manual_seed(cfg.seed)
        prompts = ev.imdb_prompts(train_reviews, cfg.n_prefixes, generator=g)
        completions = ev.sample_completions(sft_model, prompts, cfg.n_samples, cfg.max_new_tokens,
                                            cfg.sample_batch_size, torch.Generator(device).manual_seed(cfg.seed))
        rows = [p for p in prompts for _ in range(cfg.n_samples)]
        rewards = classifier.score([p + c for p, c in zip(rows, completions)]).tolist()
        pairs, rankings = [], []
        for i, p in enumerate(prompts):
            s = slice(i * cfg.n_samples, (i + 1) * cfg.n_samples)
            pairs += make_pairs(p, completions[s], rewards[s], group=i)
            rankings += [r for r in [make_ranking(p, completions[s], rewards[s], group=i)] if r]
        for path, lines in ((rankings_path, rankings), (pairs_path, pairs)):
            atomic_write(path, lambda f: f.writelines(json.dumps(x) + "\n" for x in lines))
        stages.finish("pairs")
    groups = {p["group"] for p in pairs}
    held_out = held_out_groups(groups)
    train_pairs = [p for p in pairs if p["group"] not in held_out]
    eval_pairs = [p for p in pairs if p["group"] in held_out]
    log(f"pairs: {len(pairs)} from {len(groups)} prefixes ({len(train_pairs)} train, {len(eval_pairs)} held out)")
    if len(train_pairs) < cfg.batch_size:
        raise InputError(f"{pairs_path}: {len(train_pairs)} training pairs, fewer than one batch (--batch-size "
                         f"{cfg.batch_size}): use more --n-prefixes (and a new --out) or a smaller --batch-size")
    return train_pairs, eval_pairs


def reference_stage(cfg, stages, sft_model, train_pairs, eval_pairs, device):
    """Reference log-probs (out/reference_logps.pt): one pass, reused by every run of the beta sweep."""
    return _stage_tensor(stages, "reference", os.path.join(cfg.out, "reference_logps.pt"), lambda: {
        "train": reference_logps(sft_model, train_pairs, cfg.micro_batch_size, device),  # pairs carry ids
        "eval": reference_logps(sft_model, eval_pairs, cfg.micro_batch_size, device)})


def dpo_config(cfg, TrainConfig, beta, sft_dir, out, every, device, resume=False, epochs=1):
    """The TrainConfig of one DPO run of the sweep (also checked before the first stage: check_flags)."""
    return TrainConfig(task="imdb", model=sft_dir, out=out, beta=beta, optimizer=cfg.optimizer, lr=cfg.lr,
                       warmup_steps=cfg.warmup_steps, batch_size=cfg.batch_size, micro_batch_size=cfg.micro_batch_size,
                       epochs=epochs, eval_every=every, save_every=every, keep_checkpoints=True, resume=resume,
                       device=device, seed=cfg.seed, max_length=1024, max_prompt_length=16, adam_eps=cfg.adam_eps,
                       trainable=cfg.trainable)


def dpo_stage(cfg, stages, train, TrainConfig, sft_dir, train_pairs, eval_pairs, ref_lp, device, log):
    """4a. DPO for each beta of the sweep: the project's trainer (dpo.py's train, passed in), checkpoints
    kept along training (out/dpo-beta{beta}/step-N); an interrupted run continues with the trainer's --resume.
    Returns (method, key, beta, folder, step) per checkpoint."""
    runs = []  # (method, label key, value, checkpoint folder, step)
    steps_per_epoch = len(train_pairs) // cfg.batch_size
    steps_per_run = cfg.dpo_epochs * steps_per_epoch
    every = _checkpoint_every(steps_per_epoch, cfg.eval_every)  # 4 per epoch, or --eval-every
    for beta in numbers(cfg, "betas"):
        name = f"dpo-beta{beta:g}"
        out = os.path.join(cfg.out, name)
        if not stages.done(name):
            stages.begin(name)
            resume = os.path.exists(os.path.join(out, "checkpoint", "train_state.pt"))
            saved = max((s for *_, s in _checkpoints("DPO", "beta", beta, out)), default=0) if resume else 0
            log(f"DPO beta {beta:g}: {steps_per_run} steps{f' ({cfg.dpo_epochs} epochs)' if cfg.dpo_epochs > 1 else ''}"
                f"{f' (resuming after step {saved})' if resume else ''}")
            train(dpo_config(cfg, TrainConfig, beta, sft_dir, out, every, device, resume, cfg.dpo_epochs), train_pairs,
                  eval_pairs,
                  ref_lp=ref_lp, log=lambda s: None)
            stages.finish(name)
        runs += _checkpoints("DPO", "beta", beta, out)
    return runs


def ranking_stage(cfg, stages, train_rankings, TrainConfig, sft_dir, sft_model, eval_pairs, device, log):
    """4c. DPO-PL for each beta of --ranking-betas: dpo.py's train_rankings on the ranking of each training prefix's
    samples (out/rankings.jsonl; the prefixes DPO trains on), as many prefixes per step as DPO's batch holds
    (batch_size / pairs per prefix), hence as many steps, with DPO's optimiser and checkpoints at the same
    fractions of the run. Returns its runs as dpo_stage."""
    betas = numbers(cfg, "ranking_betas", empty=True)
    path = os.path.join(cfg.out, "rankings.jsonl")
    if not betas:
        return []
    held_out = {p["group"] for p in eval_pairs}
    rankings = [r for r in ev.read_jsonl(path) if r["group"] not in held_out]
    per_step = max(1, cfg.batch_size // (cfg.n_samples * (cfg.n_samples - 1) // 2))  # 48 pairs = 8 prefixes' 6
    steps_per_run = len(rankings) // per_step
    every = _checkpoint_every(steps_per_run, cfg.eval_every)
    reference = _stage_tensor(stages, "reference-rankings", os.path.join(cfg.out, "reference_rankings.pt"), lambda: ev.completion_logps(
        sft_model, [r["prompt_ids"] for r in rankings for _ in r["responses_ids"]],
        [y for r in rankings for y in r["responses_ids"]], cfg.sample_batch_size).view(len(rankings), -1))  # (R, K)
    runs = []
    for beta in betas:
        name = f"dpo-pl-beta{beta:g}"
        out = os.path.join(cfg.out, name)
        if not stages.done(name):
            stages.begin(name)
            tcfg = TrainConfig(task="imdb", model=sft_dir, out=out, beta=beta, optimizer=cfg.optimizer, lr=cfg.lr,
                               warmup_steps=cfg.warmup_steps, batch_size=per_step, micro_batch_size=per_step,
                               epochs=1, save_every=every, device=device, seed=cfg.seed, adam_eps=cfg.adam_eps,
                               trainable=cfg.trainable, resume=True)  # from its newest checkpoint, if any
            log(f"DPO-PL beta {beta:g}: {steps_per_run} steps of {per_step} rankings of {cfg.n_samples}")
            train_rankings(tcfg, rankings, reference, log=log)
            stages.finish(name)
        runs += _checkpoints("DPO-PL", "beta", beta, out)
    return runs


def _stage_tensor(stages, name, path, compute):
    """The stage `name` whose one output is compute(), stored at path with torch.save, or read back if done."""
    return _stage_file(stages, name, path, compute, save_torch, torch.load)


def baseline_stages(cfg, stages, sft_dir, train_pairs, device, log):
    """4b. Preferred-FT (SFT on the chosen completions) and Unlikelihood (each alpha), trained with the same
    optimiser family, data and number of passes as DPO (sft.train_sequences). Returns their runs as dpo_stage."""
    runs = []
    steps_per_run = len(train_pairs) // cfg.batch_size
    prompts_ = [p["prompt_ids"] for p in train_pairs]
    chosen_, rejected_ = [p["chosen_ids"] for p in train_pairs], [p["rejected_ids"] for p in train_pairs]
    baselines = [("Preferred-FT", None, None, "nll")] + [("Unlikelihood", "alpha", float(a), "unlikelihood")
                                                         for a in numbers(cfg, "alphas", low=0, strict=False, empty=True)]
    baselines = [b for b in baselines if b[0].lower() in chosen_methods(cfg)]  # --methods
    every = _checkpoint_every(steps_per_run, cfg.eval_every)  # DPO's evaluation points
    for method, key, value, objective in baselines:
        name = method.lower() + (f"-alpha{value:g}" if value is not None else "")
        out = os.path.join(cfg.out, name)
        if not stages.done(name):
            stages.begin(name)
            log(f"{method}{f' alpha {value:g}' if value is not None else ''}: {steps_per_run} steps")
            model = from_pretrained(sft_dir, device=device)
            if cfg.trainable == "head":  # the same weights train as in the DPO runs
                train_only_head(model)
            sft.train_sequences(model, prompts_, chosen_, steps=steps_per_run, batch_size=cfg.batch_size,
                                lr=cfg.baseline_lr, objective=objective, rejected=rejected_, alpha=value or 0.0,
                                generator=torch.Generator().manual_seed(cfg.seed), log=lambda s: None,
                                groups=[p["group"] for p in train_pairs],
                                checkpoints=Checkpoints(out, every, steps_per_run, log=log))
            stages.finish(name)
        runs += _checkpoints(method, key, value, out)
    return runs


def _checkpoint_every(total, every=0):
    """Steps between saved checkpoints: `every`, or 0 for a quarter of `total` (saved after a quarter, half, three
    quarters and all of a run; _saver also saves the last step)."""
    return every or max(1, math.ceil(total / 4))


def _checkpoints(method, key, value, out):
    """A finished run's checkpoints out/step-N, ascending, as (method, label key, value, folder, step) tuples."""
    steps = sorted(int(d[5:]) for d in os.listdir(out) if d[:5] == "step-" and d[5:].isdigit())
    return [(method, key, value, os.path.join(out, f"step-{s}"), s) for s in steps]


def reward_model_stage(cfg, stages, sft_model, train_pairs, eval_pairs, device, log):
    """4d. The learned reward model of "PPO" (ppo.train_reward_model): the SFT model with a scalar head, fitted by
    Bradley-Terry to the training pairs DPO learns from; --rm-trainable head trains the scalar head alone on the
    frozen SFT model, all: every weight. Its ranking accuracy on the held-out pairs (those DPO reports its
    held-out accuracy on) is the number to compare with DPO's implicit reward; with --rm-epochs above 1 the epoch
    with the best held-out accuracy is kept (Appendix C.1; that accuracy is then a selected one). Saved in out/reward_model: head.pt,
    the trunk (model.safetensors) only when it trained, accuracy.json last; checkpoints along the way (a quarter
    of the run apart) in out/reward_model-checkpoints. Returns (model, accuracy dict)."""
    folder = os.path.join(cfg.out, "reward_model")
    acc_path = os.path.join(folder, "accuracy.json")
    if stages.done("reward_model"):
        with open(acc_path) as f:
            acc = json.load(f)
        trunk = from_pretrained(folder, device=device) if acc["trainable"] == "all" else sft_model
        model = ppo.RewardModel(trunk).to(device).requires_grad_(False)
        model.head.load_state_dict(torch.load(os.path.join(folder, "head.pt")))
        log(f"reward model: cached in {folder}")
        return model, acc
    stages.begin("reward_model")
    t0 = time.time()
    total = cfg.rm_epochs * math.ceil(len(train_pairs) / cfg.micro_batch_size)
    checkpoints = Checkpoints(folder + "-checkpoints", math.ceil(total / 4), total, keep=False, log=log)
    model, accuracy = ppo.train_reward_model(sft_model, train_pairs, train_trunk=cfg.rm_trainable == "all",
                                             epochs=cfg.rm_epochs, batch_size=cfg.micro_batch_size, lr=cfg.rm_lr,
                                             seed=cfg.seed, log=log, checkpoints=checkpoints, held_out=eval_pairs)
    acc = {"heldout_accuracy": accuracy(eval_pairs), "n": len(eval_pairs), "trainable": cfg.rm_trainable,
           "per_epoch": accuracy.per_epoch, "best_epoch": accuracy.best_epoch,
           "train_accuracy": accuracy(train_pairs[::max(1, len(train_pairs) // 2000)]), "seconds": time.time() - t0}
    os.makedirs(folder, exist_ok=True)
    if cfg.rm_trainable == "all":
        save_pretrained(model.trunk, folder)
    save_torch(os.path.join(folder, "head.pt"), model.head.state_dict())
    write_json(acc_path, acc)
    shutil.rmtree(checkpoints.folder)
    stages.finish("reward_model")
    log(f"reward model ({cfg.rm_trainable}): held-out pair accuracy {acc['heldout_accuracy']:.3f} on {len(eval_pairs)}"
        f" pairs, {acc['seconds']:.0f} s")
    return model, acc


def ppo_config(cfg):
    """The ppo.PPOConfig of a resolved ImdbConfig (--ppo-value-lr 0: the policy's lr; --ppo-kl-target 0: beta fixed)."""
    return ppo.PPOConfig(iterations=cfg.ppo_iterations, batch_size=cfg.ppo_batch_size,
                         minibatch_size=cfg.ppo_minibatch_size, ppo_epochs=cfg.ppo_epochs, lr=cfg.ppo_lr,
                         value_lr=cfg.ppo_value_lr or None, max_new_tokens=cfg.max_new_tokens,
                         kl_coef=cfg.ppo_kl_coef, adaptive_kl=cfg.ppo_kl_target > 0,
                         kl_target=cfg.ppo_kl_target or ppo.PPOConfig.kl_target, lam=cfg.ppo_lam, seed=cfg.seed)


def ppo_stage(cfg, stages, method, reward_fn, sft_dir, sft_model, train_pairs, device, log):
    """4e. PPO (ppo.train_ppo) from the SFT model against the frozen SFT model, on the training prefixes (those of
    the training pairs: the prefixes DPO learns from), rewarded by reward_fn: r* for "PPO-GT", the learned reward
    model for "PPO". The policy trains the weights --trainable names, as DPO (the CPU preset: the output head
    only; the value head is a separate linear head and trains regardless). Saved after a quarter, half, three
    quarters and all of the iterations (out/ppo-gt/step-N, N = iterations), with history.jsonl (one line per
    iteration). Returns its runs as dpo_stage."""
    if cfg.ppo_iterations <= 0:
        return []
    out = os.path.join(cfg.out, method.lower())
    if not stages.done(method.lower()):
        stages.begin(method.lower())
        prompts = list({p["group"]: p["prompt_ids"] for p in train_pairs}.values())  # one per training prefix
        pcfg = ppo_config(cfg)
        policy = from_pretrained(sft_dir, device=device)
        if cfg.trainable == "head":
            train_only_head(policy)
        log(f"{method}: {cfg.ppo_iterations} iterations of {cfg.ppo_batch_size} rollouts")
        os.makedirs(out, exist_ok=True)
        checkpoints = Checkpoints(out, _checkpoint_every(cfg.ppo_iterations), cfg.ppo_iterations, log=log)
        history = ppo.train_ppo(policy, sft_model, reward_fn, prompts, pcfg, log=None, checkpoints=checkpoints)
        atomic_write(os.path.join(out, "history.jsonl"), lambda f: f.writelines(json.dumps(h) + "\n" for h in history))
        stages.finish(method.lower())
    return _checkpoints(method, None, None, out)


def online_stage(cfg, stages, name, method, reward_fn, TrainConfig, online_dpo, sft_dir, sft_model, train_pairs,
                 device, log):
    """4f. Online DPO (online.py): from the SFT model against the frozen SFT model, each iteration
    --online-prefixes training prefixes (those DPO and PPO learn from), --online-samples samples each from the
    current policy, every pair labelled by reward_fn (r* for "Online DPO (r*)", the learned reward model for
    "Online DPO (RM)"), one DPO step with DPO's beta (the plotted one), optimiser, warm-up and clipping (dpo.py's
    dpo_loss and make_optimizer, passed in as online_dpo), the weights --trainable names. Saved after a quarter,
    half, three quarters and all of the iterations (out/NAME/step-N), with history.jsonl (labels per iteration).
    Returns its runs as dpo_stage."""
    dpo_loss, make_optimizer = online_dpo
    out = os.path.join(cfg.out, name)
    beta = _plotted_beta(cfg)
    if not stages.done(name):
        stages.begin(name)
        prompts = list({p["group"]: p["prompt_ids"] for p in train_pairs}.values())  # one per training prefix
        policy = from_pretrained(sft_dir, device=device)
        if cfg.trainable == "head":
            train_only_head(policy)
        every = _checkpoint_every(cfg.online_iterations)
        tcfg = dpo_config(cfg, TrainConfig, beta, sft_dir, out, every, device)
        optimizer, scheduler = make_optimizer(tcfg, [p for p in policy.parameters() if p.requires_grad], device)
        ocfg = online.OnlineConfig(iterations=cfg.online_iterations, prefixes=cfg.online_prefixes,
                                   samples=cfg.online_samples, beta=beta, max_new_tokens=cfg.max_new_tokens,
                                   max_grad_norm=tcfg.max_grad_norm, sample_batch_size=cfg.sample_batch_size,
                                   seed=cfg.seed)
        log(f"{method}: {cfg.online_iterations} iterations of {cfg.online_prefixes} prefixes x {cfg.online_samples} "
            f"samples, beta {beta:g}")
        os.makedirs(out, exist_ok=True)
        checkpoints = Checkpoints(out, every, cfg.online_iterations, log=log)
        history = online.train_online_dpo(policy, sft_model, reward_fn, prompts, ocfg, dpo_loss, optimizer, scheduler,
                                          checkpoints=checkpoints, log=None)
        atomic_write(os.path.join(out, "history.jsonl"), lambda f: f.writelines(json.dumps(h) + "\n" for h in history))
        stages.finish(name)
    return _checkpoints(method, "beta", beta, out)


def add_labels(cfg, rows, train_pairs):
    """The labels each checkpoint consumed to reach it, added to its row: reward_calls (calls of the reward that
    labels: r* or the learned reward model) and, for the DPO methods, labels (labelled pairs).
      DPO: the training pairs its steps have seen (step x batch, at most all of them) and the reward calls behind
        them (n_samples per prefix, pro rata: labels x n_samples x training prefixes / training pairs)
      PPO, PPO-GT: one reward call per rollout, step x ppo_batch_size
      Best-of-N, Best-of-N (RM): N per evaluation prefix, N x n
      Online DPO: counted by the run (history.jsonl): reward calls and labelled pairs"""
    prefixes = len({p["group"] for p in train_pairs})
    for row in rows:
        if row["method"] == "DPO":
            row["labels"] = min(row["step"] * cfg.batch_size, len(train_pairs))
            row["reward_calls"] = round(row["labels"] * cfg.n_samples * prefixes / len(train_pairs))
        elif row["method"] in ("PPO", "PPO-GT"):
            row["reward_calls"] = row["step"] * cfg.ppo_batch_size
        elif row["method"] in ("Best-of-N", "Best-of-N (RM)"):
            row["reward_calls"] = row["best_of"] * row["n"]
    for name, method in ONLINE.items():
        path = os.path.join(cfg.out, name, "history.jsonl")
        if not os.path.exists(path):
            continue
        history = {h["iteration"]: h for h in ev.read_jsonl(path)}
        for row in rows:
            if row["method"] == method and row["step"] in history:
                row["labels"] = history[row["step"]]["pairs_total"]
                row["reward_calls"] = history[row["step"]]["reward_calls_total"]


def best_of_n_rows(method, true_rewards, selection_scores, sizes, prompts=None, completions=None, n_show=3,
                   proxy_scores=None):
    """Best-of-N rows from one draw: true_rewards and selection_scores (P, M), the r* and the selecting score of
    M samples of each of P prefixes. For each N in sizes, each prefix keeps the best of its FIRST N samples by
    selection_scores (ppo.best_of_n); the row's reward is the mean r* of the kept samples (± its standard error),
    its KL ppo.best_of_n_kl(N) = log N - (N - 1)/N, an analytic upper bound (kl_estimate says so; kl_se 0).
    With prompts (P token lists) and completions (P * M, prefix-major), the row shows the first n_show kept.
    With proxy_scores (P, M), the learned reward model's scores, the row gets their mean over the kept samples
    as rm_score (± rm_score_se)."""
    true_rewards = torch.as_tensor(true_rewards, dtype=torch.float64)
    selection_scores = torch.as_tensor(selection_scores, dtype=torch.float64)
    rows = []
    for n in sizes:
        best = ppo.best_of_n(selection_scores[:, :n])                                      # (P,)
        kept = true_rewards.gather(1, best[:, None])[:, 0]                                 # (P,)
        reward, reward_se = ev.mean_se(kept)
        row = {"method": method, "best_of": n, "step": 0, "reward": reward, "reward_se": reward_se,
               "kl": ppo.best_of_n_kl(n), "kl_se": 0.0, "kl_estimate": "upper bound log N - (N-1)/N",
               "n": len(kept)}
        if proxy_scores is not None:
            proxy = torch.as_tensor(proxy_scores, dtype=torch.float64).gather(1, best[:, None])[:, 0]  # (P,)
            row["rm_score"], row["rm_score_se"] = ev.mean_se(proxy)
        if prompts is not None:
            m = true_rewards.size(1)
            row["samples"] = [{"prompt": decode([t for t in prompts[i] if t != EOS]),
                               "completion": decode(completions[i * m + int(best[i])]),
                               "reward": round(kept[i].item(), 4)} for i in range(min(n_show, len(prompts)))]
        rows.append(row)
    return rows


def best_of_n_stage(cfg, stages, sft_model, classifier, reward_model, test_reviews, device, log):
    """5c. Best-of-N (the paper's Appendix D.1): max N samples of each evaluation prefix from pi_SFT (one draw,
    out/best_of_n_samples.json), scored by r* and by the learned reward model; for each N, each prefix's best of
    its first N samples by r* ("Best-of-N") and by the reward model ("Best-of-N (RM)"), rows by best_of_n_rows.
    The KL is the analytic bound log N - (N-1)/N, not the sample estimate the other rows use: that needs
    log pi_bon(y|x), which no model gives (ppo.best_of_n_kl)."""
    sizes = numbers(cfg, "best_of_n", kind=int, low=1, strict=False, empty=True)
    if not sizes:
        return []
    prompts = ev.imdb_prompts(test_reviews, cfg.eval_prompts, generator=torch.Generator().manual_seed(cfg.seed + 1))
    m = max(sizes)
    rows_x = [p for p in prompts for _ in range(m)]

    def draw():
        completions = ev.sample_completions(sft_model, prompts, m, cfg.max_new_tokens, cfg.sample_batch_size,
                                            torch.Generator(device).manual_seed(cfg.seed + 4))
        sequences = [p + c for p, c in zip(rows_x, completions)]
        return {"completions": completions, "rewards": classifier.score(sequences).tolist(),
                **({"rm_scores": reward_model.score(sequences, cfg.sample_batch_size).tolist()} if reward_model else {})}
    samples = _stage_json(stages, "best-of-n", os.path.join(cfg.out, "best_of_n_samples.json"), draw, log)
    true = torch.tensor(samples["rewards"]).view(len(prompts), m)                          # (P, M)
    methods, rows = chosen_methods(cfg), []
    if "best-of-n" in methods:
        rows += best_of_n_rows("Best-of-N", true, true, sizes, prompts, samples["completions"])
    if "best-of-n-rm" in methods:
        rm = torch.tensor(samples["rm_scores"]).view(len(prompts), m)                      # (P, M)
        rows += best_of_n_rows("Best-of-N (RM)", true, rm, sizes, prompts, samples["completions"], proxy_scores=rm)
    return rows


class ProxyScored:
    """r*, as ev.evaluate asks for it (score(token lists) -> (N,)), that also keeps the learned reward model's
    scores of the same sequences in rm_scores: the proxy reward beside the true one of one policy's samples."""

    def __init__(self, classifier, reward_model, batch_size):
        self.classifier, self.reward_model, self.batch_size = classifier, reward_model, batch_size
        self.rm_scores = None

    def score(self, token_lists):
        self.rm_scores = self.reward_model.score(token_lists, self.batch_size)  # (N,)
        return self.classifier.score(token_lists)                               # (N,)


def evaluation_stage(cfg, stages, runs, sft_dir, sft_model, classifier, test_reviews, device, log, reward_model=None):
    """5. Evaluation on prefixes of IMDb test reviews: mean r* and KL(pi || pi_SFT) of each policy's own
    samples (one each), cached per policy in its folder's eval.json, keyed on the evaluation's flags and the
    policy's stage. With reward_model, the rows of the methods that climb it (RM_METHODS) and SFT's also get
    rm_score (± rm_score_se): its mean score of the same samples (the over-optimization figure; their eval.json
    keyed on it too; the r* and KL of every row are those of the same samples as without it). Returns the rows,
    SFT first."""
    eval_prompts = ev.imdb_prompts(test_reviews, cfg.eval_prompts, generator=torch.Generator().manual_seed(cfg.seed + 1))

    def evaluate(policy, proxy):
        scorer = ProxyScored(classifier, reward_model, cfg.sample_batch_size) if proxy else classifier
        result = ev.evaluate(policy, sft_model, scorer, eval_prompts, 1, cfg.max_new_tokens,
                             torch.Generator(device).manual_seed(cfg.seed + 2), cfg.sample_batch_size)
        if proxy:
            result["rm_score"], result["rm_score_se"] = ev.mean_se(scorer.rm_scores)
        return result

    def cached(folder, stage, compute, what, proxy):
        inputs = {"policy": stages.key(stage), "sft": stages.key("sft"), "classifier": stages.key("classifier"),
                  **({"reward_model": stages.key("reward_model")} if proxy else {})}
        return keyed_json(os.path.join(folder, "eval.json"), stages.evaluation, inputs, lambda: compute(proxy), what,
                          log)
    proxied = reward_model is not None and any(m in RM_METHODS for m, *_ in runs)
    rows = [{"method": "SFT", **cached(sft_dir, "sft", lambda proxy: evaluate(sft_model, proxy), "SFT eval", proxied),
             "step": 0}]
    for method, key, value, folder, step in runs:
        res = cached(folder, _stage_of(folder), lambda proxy: evaluate(from_pretrained(folder, device=device), proxy),
                     f"{method} eval", reward_model is not None and method in RM_METHODS)
        rows.append({"method": method, **({key: value} if key else {}), "step": step, **res})
    return rows


def implicit_reward_stage(cfg, stages, runs, rows, sft_model, classifier, test_reviews, device, log):
    """5b. "Your language model is secretly a reward model" (Section 5.1), measured: n_samples fresh samples from
    pi_SFT of each evaluation prefix (test reviews), scored by r* (out/implicit_samples.json); for the last
    checkpoint of each DPO and DPO-PL run, its implicit reward beta * log pi/pi_SFT on them against r*
    (eval.implicit_reward_stats: Pearson, Spearman, Pearson within a prefix, ranking accuracy; cached in the
    folder's implicit.json), added to that run's rows as implicit_*; DPO's rows also get heldout_accuracy, the
    trainer's implicit-reward accuracy on the held-out pairs (metrics.jsonl). Writes out/implicit-reward.png
    for the DPO run of beta 0.1 (or the first beta)."""
    prompts = ev.imdb_prompts(test_reviews, cfg.eval_prompts, generator=torch.Generator().manual_seed(cfg.seed + 1))
    rows_x = [p for p in prompts for _ in range(cfg.n_samples)]

    def draw():
        completions = ev.sample_completions(sft_model, prompts, cfg.n_samples, cfg.max_new_tokens,
                                            cfg.sample_batch_size, torch.Generator(device).manual_seed(cfg.seed + 3))
        return {"completions": completions,
                "rewards": classifier.score([p + c for p, c in zip(rows_x, completions)]).tolist()}
    samples = _stage_json(stages, "implicit-samples", os.path.join(cfg.out, "implicit_samples.json"), draw, log)
    reference = None
    last = {}  # (method, beta) -> (folder, step) of the run's last checkpoint
    for method, _, beta, folder, step in runs:
        if method in ("DPO", "DPO-PL") and step >= last.get((method, beta), ("", -1))[1]:
            last[method, beta] = (folder, step)
    for (method, beta), (folder, step) in last.items():
        def measure():
            nonlocal reference
            if reference is None:
                reference = ev.completion_logps(sft_model, rows_x, samples["completions"], cfg.sample_batch_size)
            policy = from_pretrained(folder, device=device)
            implicit = beta * (ev.completion_logps(policy, rows_x, samples["completions"], cfg.sample_batch_size)
                               - reference)  # (N,) beta log pi/pi_SFT
            return {**ev.implicit_reward_stats(implicit, samples["rewards"], cfg.n_samples),
                    "implicit": implicit.tolist()}
        stats = keyed_json(os.path.join(folder, "implicit.json"), {"beta": beta},
                           {"policy": stages.key(_stage_of(folder)), "samples": stages.key("implicit-samples")},
                           measure, f"{method} implicit reward", log)
        row = next(r for r in rows if r["method"] == method and r.get("beta") == beta and r["step"] == step)
        row.update({f"implicit_{k}": v for k, v in stats.items() if k != "implicit"})
        if method == "DPO" and beta == _plotted_beta(cfg):
            ev.plot_implicit_reward(stats["implicit"], samples["rewards"], cfg.n_samples,
                                    os.path.join(cfg.out, "implicit-reward.png"),
                                    f"DPO beta {beta:g} (step {step}): implicit vs true reward, "
                                    f"{len(prompts)} test prefixes x {cfg.n_samples} samples from pi_SFT")
    for row in rows:  # the trainer's held-out accuracy at each DPO checkpoint
        if row["method"] == "DPO":
            metrics = ev.read_jsonl(os.path.join(cfg.out, f"dpo-beta{row['beta']:g}", "metrics.jsonl"))
            row["heldout_accuracy"] = next((m["eval/accuracy"] for m in metrics
                                            if m["step"] == row["step"] and "eval/accuracy" in m), None)


def _stage_of(folder):
    """The stage a checkpoint folder out/NAME/step-N belongs to: NAME."""
    return os.path.basename(os.path.dirname(os.path.normpath(folder)))


def _stage_json(stages, name, path, compute, log):
    """The stage `name` whose one output is compute()'s JSON at path, or read back if done."""
    if stages.done(name):
        log(f"{name}: cached in {path}")
    return _stage_file(stages, name, path, compute, write_json, _read_json)


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _stage_file(stages, name, path, compute, save, load):
    """load(path) if the stage is done, else compute() saved at path by save(path, result) within the stage."""
    if stages.done(name):
        return load(path)

    def make():
        result = compute()
        save(path, result)
        return result
    return stages.run(name, make)


def _plotted_beta(cfg):
    betas = numbers(cfg, "betas")
    return 0.1 if 0.1 in betas else betas[0]


def report(cfg, rows, clf_acc, rm_acc, times, t_start, log):
    """results.csv/json, frontier.png and summary.json in out; the table, the stage times, the held-out pair
    accuracy of the reward model beside DPO's, and one sample per method printed."""
    ev.write_table(rows, os.path.join(cfg.out, "results.csv"), os.path.join(cfg.out, "results.json"))
    ev.plot_frontier(rows, os.path.join(cfg.out, "frontier.png"))
    if any(r["method"] in ONLINE.values() for r in rows):  # reward against the labels each method consumed
        ev.plot_reward_vs_labels(rows, os.path.join(cfg.out, "labels.png"))
    if any("rm_score" in r for r in rows if r["method"] != "SFT"):  # the proxy and the true reward along KL
        ev.plot_overoptimization(rows, os.path.join(cfg.out, "overoptimization.png"))
    total = time.time() - t_start
    log("")
    log(f"{'method':<15}{'beta/alpha/N':>13}{'step':>6}{'reward':>15}{'KL (nats)':>16}")
    for r in rows:
        label = r.get("beta", r.get("alpha", r.get("best_of", "")))
        kl = f"{r['kl']:>9.2f} ± {r['kl_se']:.2f}" if "kl_estimate" not in r else f"{r['kl']:>9.2f} (bound)"
        rm = f"   RM score {r['rm_score']:.3f} ± {r['rm_score_se']:.3f}" if "rm_score" in r else ""
        log(f"{r['method']:<15}{label!s:>13}{r['step']:>6}{r['reward']:>9.3f} ± {r['reward_se']:.3f}{kl}{rm}")
    log(f"reward classifier test accuracy {100 * clf_acc['test_accuracy']:.1f}% | " +
        " | ".join(f"{k} {v:.0f} s" for k, v in times.items()) + f" | total {total:.0f} s")
    for r in rows:
        if "implicit_pearson" in r:
            log(f"implicit reward, {r['method']} beta {r['beta']:g} step {r['step']}: Pearson {r['implicit_pearson']:.3f}, "
                f"Spearman {r['implicit_spearman']:.3f}, within a prefix {r['implicit_pearson_within']:.3f}, "
                f"ranking accuracy {r['implicit_accuracy']:.3f} (fresh test samples)" +
                (f", {r['heldout_accuracy']:.3f} (held-out pairs)" if r.get("heldout_accuracy") is not None else ""))
    if rm_acc is not None:
        log(f"reward model of PPO ({rm_acc['trainable']}): held-out pair accuracy {rm_acc['heldout_accuracy']:.3f} on "
            f"{rm_acc['n']} pairs (training pairs {rm_acc['train_accuracy']:.3f}); DPO's implicit reward on the same "
            "pairs, last step: " + ", ".join(f"beta {r['beta']:g} {r['heldout_accuracy']:.3f}" for r in rows
                                             if r["method"] == "DPO" and "implicit_pearson" in r
                                             and r.get("heldout_accuracy") is not None))
    for method in ("PPO-GT", "PPO"):
        history = os.path.join(cfg.out, method.lower(), "history.jsonl")
        if os.path.exists(history):
            h = ev.read_jsonl(history)
            log(f"{method}: {len(h)} iterations, {sum(x['seconds'] for x in h) / len(h):.2f} s each; the reward it "
                f"trains on, first and last rollouts: {h[0]['score']:.3f} -> {h[-1]['score']:.3f} (KL {h[-1]['kl']:.2f}, "
                f"beta {h[-1]['kl_coef']:.3f})")
    for method in dict.fromkeys(r["method"] for r in rows):
        sample = next(r for r in rows[::-1] if r["method"] == method)["samples"][0]
        log(f"sample, {method}: {sample['prompt']!r} -> {sample['completion']!r} (reward {sample['reward']:.2f})")
    write_json(os.path.join(cfg.out, "summary.json"), {
        "times_s": times, "total_s": total, "classifier_accuracy": clf_acc["test_accuracy"],
        "reward_model_accuracy": rm_acc["heldout_accuracy"] if rm_acc else None, "config": dataclasses.asdict(cfg)})
    log(f"wrote {cfg.out}/results.csv, results.json, frontier.png, summary.json")
