"""The paper's dialogue and summarization experiments (Section 6.3 and Appendices B-C of arXiv:2305.18290) as one
"generation experiment": train a policy, sample it, and ask a judge whether its answers beat the data's own.

    python dpo.py --task hh   [--preset gpu|cpu|tiny] [--judge api|rm] [--out runs/hh]     # Anthropic HH, Fig. 3
    python dpo.py --task tldr [--preset gpu|tiny] [--eval-data NEWS.jsonl] [--out runs/tldr] # TL;DR, Fig. 2 right;
                                                                                             # CNN/DM, Table 1
    python eval.py --win-rate OUT/samples/dpo/hh-T1.jsonl --judge rm --judge-model OUT/judge_rm --out DIR  # one file

TASKS below is the table of what differs between the two: data, temperatures, beta, methods and judge prompt.
Stages (machinery/stages.py: each planned and keyed on the flags that feed it before the first runs, so a rerun
reuses what is finished, resumes what was killed, and recomputes what a changed flag touches):
  data          the splits, by prompt (corpora.split_by_prompt): policy pairs, judge pairs, evaluation prompts
                with the baseline each answer is judged against (hh: the test set's chosen response, single-turn
                dialogues only; tldr: the reference summary; news: the CNN/DM highlights), and held-out human
                labels for judge validation                                                   -> data/splits.json
  base          --model as is, or (scratch) a small GPT language-modelled on the policy pairs' text   -> base/
  sft           hh: SFT on the chosen responses (Preferred-FT), which is also pi_ref; tldr: SFT on the reference
                summaries of the training posts                                                -> sft/
  dpo           dpo.py's train() from the SFT model, beta 0.1 (hh) or 0.5 (tldr), checkpoints along training
                                                                                                 -> dpo/step-N
  pft           tldr only: Preferred-FT, the SFT model fine-tuned on the chosen summaries       -> pft/
  bon_rm        the reward model of Best of N: ppo.train_reward_model on the policy pairs      -> bon_rm/
  judge_rm      --judge rm: judge.train_rm_judge on the judge pairs (prompts disjoint from the evaluation)
                                                                                                 -> judge_rm/
  samples-M     method M's answer to every evaluation prompt at each temperature, one file per temperature in
                eval.py --win-rate's format {"prompt", "response", "baseline"}           -> samples/M/SET-T*.jsonl
  judge-M       judge.win_rate of every samples file of M                     -> judged/M/SET-T*/win_rate.json
  curve         DPO's checkpoints sampled at --curve-temperatures and judged (Fig. 3 right)      -> curve/
  agreement     the judge against the human labels of held-out pairs, with its s.e.           -> agreement/
  report        results.csv/json, win_rates.png (Fig. 3 left / Fig. 2 right), training.png, samples.md,
                summary.json
Methods: hh DPO, Preferred-FT, Best of N (N samples of the SFT model, the reward model's best), 2-shot (the base
model prompted with two training dialogues); tldr DPO, SFT, Preferred-FT, Best of N, zero-shot (the base model).

Tests (test_generation.py): every stage at micro scale for hh (the shared HH file) and tldr (files in the sources'
formats), with the rm judge and with an OpenAI-compatible server started by the test; the evaluation prompts
are single-turn; the 2-shot baseline is prompted with corpora.two_shot_prompt; greedy samples equal the argmax
chain; a changed flag recomputes its stages and what depends on them and nothing else, a rerun reuses all; bad
flags are refused in one line before any stage writes; the GPU presets at tiny scale.
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
import judge as jd
import ppo
import sft
from data import InputError, read_hh, tokenize_pair
from machinery import corpora
from machinery.hf import from_pretrained, load_model, save_pretrained
from machinery.hub import hh_path, tldr_comparisons_paths, tldr_path
from machinery.integrity import atomic_write, save_torch, write_json
from machinery.runtime import TrainingError
from machinery.stages import Checkpoints, Stages
from machinery.tokenizers import load_tokenizer
from machinery.util import field, parse_args, pick_device
from model import GPT

# What differs between the experiments. Judge prompts: judge.PROMPTS (the paper's Appendix C.2, verbatim).
TASKS = {
    "hh": dict(beta=0.1, temperatures="0.25,0.5,0.75,1.0", prompt="dialogue",
               methods=("DPO", "Preferred-FT", "Best of N", "2-shot")),
    "tldr": dict(beta=0.5, temperatures="0,0.25,0.5,0.75,1.0", prompt="summarization", news_temperatures="0,0.25",
                 methods=("DPO", "SFT", "Preferred-FT", "Best of N", "zero-shot")),
}
HERE = os.path.dirname(os.path.abspath(__file__))
HH_TRAIN = "harmless-base/train,helpful-base/train,helpful-online/train,helpful-rejection-sampled/train"
HH_TEST = "harmless-base/test,helpful-base/test,helpful-online/test,helpful-rejection-sampled/test"

PRESETS = {
    # The paper's (one 80 GB card). Pythia-2.8B: DPO with bfloat16 weights, the reference log-probs precomputed
    # (no second model resident) and activation checkpointing: `python dpo.py --estimate-memory` puts full
    # fine-tuning of 2.8B there within one card, and it keeps the paper's update (every weight). GPT-J-6B: the
    # same three would leave the RMSprop state of 6B weights; LoRA rank 16 trains adapters only (README's table).
    ("hh", "gpu"): dict(fractions="0.7,0.15,0.15", model="EleutherAI/pythia-2.8b", hh_train=HH_TRAIN, hh_test=HH_TEST,
                        max_pairs=0,
                        pretrain_tokens=0, sft_epochs=1, sft_lr=1e-5, sft_batch_size=8, optimizer="rmsprop",
                        lr=1e-6, warmup_steps=150, batch_size=64, micro_batch_size=8, eval_prompts=256,
                        agreement_pairs=512, best_of=128, max_length=512, max_prompt_length=256,
                        max_new_tokens=256, sample_batch_size=32, judge="api", weights_dtype="bfloat16",
                        precompute_ref=True, grad_checkpoint=True, lora_rank=0, rm_lr=1e-5, rm_trainable="all",
                        judge_base="gpt2-large", judge_lr=1e-5, judge_trainable="all", trainable="all",
                        curve_temperatures="1.0"),
    # Two CPU cores, offline, sized for about 10 minutes (measured: 26 min with other jobs holding the load near
    # 6; README): the shared harmless-base test file split by prompt, a small GPT
    # from scratch (language-modelled on the policy pairs, then SFT on their chosen responses), the rm judge. The
    # judge gets 40% of the prompts: trained on 347 pairs it ranked held-out pairs at chance (0.478), on 1,618 at
    # 0.571 (README).
    ("hh", "cpu"): dict(model="scratch:4,4,128", hh_train="harmless-base/test", hh_test="", max_pairs=0,
                        fractions="0.45,0.4,0.15", pretrain_tokens=100_000, sft_epochs=1, sft_lr=1e-3,
                        sft_batch_size=32, optimizer="adamw", lr=2e-4, warmup_steps=5, batch_size=32,
                        micro_batch_size=32, eval_prompts=128, agreement_pairs=400, best_of=4, max_length=128,
                        max_prompt_length=64, max_new_tokens=32, sample_batch_size=128, judge="rm",
                        weights_dtype="float32", precompute_ref=True, grad_checkpoint=False, lora_rank=0, rm_lr=1e-4,
                        rm_trainable="all", judge_base="sft", judge_lr=1e-4, judge_trainable="all", trainable="all",
                        curve_temperatures="1.0"),
    # Every stage in about a minute: the tests' micro run.
    ("hh", "tiny"): dict(fractions="0.7,0.15,0.15", model="scratch:1,2,32", hh_train="harmless-base/test", hh_test="",
                         max_pairs=240,
                         pretrain_tokens=4000, sft_epochs=1, sft_lr=1e-3, sft_batch_size=16, optimizer="adamw",
                         lr=1e-3, warmup_steps=0, batch_size=16, micro_batch_size=16, eval_prompts=6,
                         agreement_pairs=16, best_of=2, max_length=96, max_prompt_length=48, max_new_tokens=6,
                         sample_batch_size=64, judge="rm", weights_dtype="float32", precompute_ref=True,
                         grad_checkpoint=False, lora_rank=0, rm_lr=1e-3, rm_trainable="head", judge_base="sft",
                         judge_lr=1e-3, judge_trainable="head", trainable="all", curve_temperatures="1.0"),
    ("tldr", "gpu"): dict(fractions="0.7,0.15,0.15", model="EleutherAI/gpt-j-6b", tldr="", eval_data="", max_pairs=0,
                          pretrain_tokens=0,
                          sft_epochs=1, sft_lr=1e-5, sft_batch_size=8, optimizer="rmsprop", lr=1e-6,
                          warmup_steps=150, batch_size=64, micro_batch_size=8, eval_prompts=256,
                          agreement_pairs=512, best_of=128, max_length=640, max_prompt_length=512,
                          max_new_tokens=64, sample_batch_size=32, judge="api", weights_dtype="bfloat16",
                          precompute_ref=True, grad_checkpoint=True, lora_rank=16, rm_lr=1e-5, rm_trainable="all",
                          judge_base="gpt2-large", judge_lr=1e-5, judge_trainable="all", trainable="all",
                          curve_temperatures="0"),
    ("tldr", "tiny"): dict(fractions="0.7,0.15,0.15", model="scratch:1,2,32", tldr="",
                           eval_data=os.path.join(HERE, "fixtures", "cnndm.jsonl"), max_pairs=0, pretrain_tokens=4000,
                           sft_epochs=1, sft_lr=1e-3, sft_batch_size=16, optimizer="adamw", lr=1e-3,
                           warmup_steps=0, batch_size=8, micro_batch_size=8, eval_prompts=6, agreement_pairs=16,
                           best_of=2, max_length=160, max_prompt_length=120, max_new_tokens=6, sample_batch_size=64,
                           judge="rm", weights_dtype="float32", precompute_ref=True, grad_checkpoint=False,
                           lora_rank=0, rm_lr=1e-3, rm_trainable="head", judge_base="sft", judge_lr=1e-3,
                           judge_trainable="head", trainable="all", curve_temperatures="0"),
}


@dataclasses.dataclass
class GenerationConfig:
    task: str = field("hh", "hh (dialogue, Fig. 3) or tldr (summarization, Fig. 2 right; CNN/DM, Table 1)")
    out: str = field(None, "output folder (default runs/TASK): one sub-folder per stage, results.csv, the plots")
    preset: str = field("auto", "gpu (the paper's), cpu (hh only: offline, 2 cores), tiny (every stage "
                        "in about a minute) or auto (gpu if one is present, else cpu for hh and tiny for tldr)")
    model: str = field(None, "base model: scratch:L,H,C (a GPT from scratch), a hub name or a folder")
    hh_train: str = field(None, "hh: comma-separated HH files or names (harmless-base/train, ...) of the pairs")
    hh_test: str = field(None, "hh: HH files or names of the evaluation prompts ('': split off --hh-train)")
    tldr: str = field(None, "tldr: a folder in $DPO_TLDR's layout (tldr_3_filtered/*.jsonl, comparisons/*.json); "
                      "default $DPO_TLDR, else downloaded")
    eval_data: str = field(None, "tldr: CNN/DailyMail articles, JSONL ({article, reference} or {article, "
                           "highlights}), for Table 1; '': none")
    fractions: str = field(None, "hh without --hh-test: shares of the prompts for policy pairs, judge "
                           "pairs and evaluation (split by prompt); tldr: the policy and judge shares of the train "
                           "comparisons (the first two, renormalised)")
    max_pairs: int = field(None, "use at most this many policy pairs (0: all)")
    pretrain_tokens: int = field(None, "scratch models: language-model tokens on the training text before SFT")
    sft_epochs: int = field(None, "SFT epochs (also Preferred-FT's for tldr)")
    sft_lr: float = field(None, "SFT learning rate (AdamW)")
    sft_batch_size: int = field(None, "SFT sequences per step")
    beta: float = field(None, "DPO beta (task default: hh 0.1, tldr 0.5, the paper's)")
    optimizer: str = field(None, "rmsprop (paper) or adamw, for DPO")
    lr: float = field(None, "DPO learning rate")
    warmup_steps: int = field(None, "DPO linear warm-up steps")
    batch_size: int = field(None, "DPO pairs per step (paper: 64)")
    micro_batch_size: int = field(None, "DPO pairs per forward/backward")
    trainable: str = field(None, "which weights DPO trains: all (the paper) or head")
    checkpoints: int = field(4, "DPO checkpoints along training, each sampled and judged for the training curve")
    weights_dtype: str = field(None, "float32 or bfloat16: the dtype of the models' weights (dpo.py --weights-dtype)")
    precompute_ref: bool = field(None, "DPO: one reference pass, then no reference model in memory")
    grad_checkpoint: bool = field(None, "DPO: activation checkpointing")
    lora_rank: int = field(None, "DPO: LoRA adapters of this rank (0: every weight trains)")
    max_length: int = field(None, "longest prompt + response in tokens (training)")
    max_prompt_length: int = field(None, "prompts keep their last this many tokens")
    rm_lr: float = field(None, "Best-of-N reward model learning rate")
    rm_trainable: str = field(None, "Best-of-N reward model: all (every weight) or head")
    best_of: int = field(None, "N of Best of N (paper: 128)")
    temperatures: str = field(None, "sampling temperatures, comma-separated (task default: the paper's; 0 = greedy)")
    news_temperatures: str = field(None, "tldr: temperatures of the CNN/DM evaluation (paper: 0,0.25)")
    curve_temperatures: str = field(None, "temperatures at which DPO's checkpoints are judged (Fig. 3 right)")
    eval_prompts: int = field(None, "evaluation prompts (paper: 256 or more)")
    agreement_pairs: int = field(None, "held-out human-labelled pairs the judge is validated on")
    max_new_tokens: int = field(None, "tokens per sampled response")
    sample_batch_size: int = field(None, "sequences per generate call")
    judge: str = field(None, "api (an OpenAI-compatible server; key in $OPENAI_API_KEY) or rm (a reward model "
                       "trained here on the judge pairs)")
    judge_url: str = field(jd.DEFAULT_URL, "api judge: the server's base URL")
    judge_model: str = field(None, "api judge: the model name (required); rm judge: a trained judge folder to use "
                             "instead of training one")
    judge_workers: int = field(4, "api judge: requests at a time")
    max_judge_calls: int = field(None, "refuse to start when more uncached judge calls than this are needed")
    judge_base: str = field(None, "rm judge: its trunk: sft (the SFT model; GPT-2-tokenised models) or a model")
    judge_lr: float = field(None, "rm judge learning rate")
    judge_trainable: str = field(None, "rm judge: all or head")
    device: str = field("auto", "cuda, mps or cpu (auto: the first available)")
    seed: int = field(0, "seeds every stage")

    def resolved(self):
        """The preset's and the task's values for every field left unset."""
        if self.task not in TASKS:
            raise InputError(f"--task {self.task}: use hh or tldr")
        preset = self.preset
        if preset == "auto":
            preset = "gpu" if torch.cuda.is_available() else "cpu" if self.task == "hh" else "tiny"
            print(f"--preset auto: using the {preset} preset")
        if (self.task, preset) not in PRESETS:
            have = sorted(p for t, p in PRESETS if t == self.task)
            raise InputError(f"--preset {self.preset}: --task {self.task} has {', '.join(have)} (or auto)")
        defaults = {**TASKS[self.task], **PRESETS[self.task, preset], "out": f"runs/{self.task}"}
        values = {k: (defaults.get(k) if v is None else v) for k, v in dataclasses.asdict(self).items()}
        return dataclasses.replace(self, **{**values, "preset": preset})


def floats(text, flag, low=0.0):
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise InputError(f"{flag} {text}: write numbers separated by commas") from None
    if any(not v >= low for v in values):
        raise InputError(f"{flag} {text}: every value must be >= {low}")
    return values


def check(cfg):
    """Every flag, in one line naming it, before any stage writes."""
    temps = floats(cfg.temperatures, "--temperatures")
    floats(cfg.curve_temperatures, "--curve-temperatures")
    if cfg.task == "tldr":
        floats(cfg.news_temperatures, "--news-temperatures")
    if not temps:
        raise InputError(f"--temperatures {cfg.temperatures!r}: give at least one")
    fr = floats(cfg.fractions, "--fractions")
    if len(fr) != 3 or abs(sum(fr) - 1) > 1e-6 or min(fr) <= 0:
        raise InputError(f"--fractions {cfg.fractions}: three positive shares summing to 1 (policy, judge, evaluation)")
    if not cfg.beta > 0:
        raise InputError(f"--beta {cfg.beta}: must be > 0")
    for name in ("batch_size", "micro_batch_size", "sft_batch_size", "best_of", "eval_prompts", "agreement_pairs",
                 "max_new_tokens", "sample_batch_size", "checkpoints", "sft_epochs"):
        if getattr(cfg, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be at least 1")
    if cfg.max_prompt_length >= cfg.max_length:
        raise InputError(f"--max-prompt-length {cfg.max_prompt_length}: must be below --max-length {cfg.max_length}")
    for name in ("rm_trainable", "judge_trainable", "trainable"):
        if getattr(cfg, name) not in ("all", "head"):
            raise InputError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: use all or head")
    if cfg.judge not in ("api", "rm"):
        raise InputError(f"--judge {cfg.judge}: use api (an OpenAI-compatible server) or rm (a reward model)")
    if cfg.judge == "api":
        if not cfg.judge_model:
            raise InputError("--judge-model: name the judge model for --judge api (e.g. gpt-4o), or use --judge rm")
        make_judge(cfg, None)  # the URL and $OPENAI_API_KEY, checked now
    elif cfg.judge_model and not os.path.exists(os.path.join(cfg.judge_model, "head.pt")):
        raise InputError(f"--judge-model {cfg.judge_model}: no head.pt there; pass a folder written by "
                         f"judge.train_rm_judge, or leave --judge-model out to train the judge here")
    if cfg.judge == "rm" and not cfg.judge_model and cfg.judge_base == "sft" and not cfg.model.startswith("scratch") \
            and load_tokenizer(cfg.model).to_id is not None:
        raise InputError(f"--judge-base sft: the rm judge reads GPT-2 tokens and --model {cfg.model} has another "
                         f"tokenizer; name a GPT-2-tokenised model (--judge-base gpt2-large)")
    if cfg.max_judge_calls is not None and cfg.max_judge_calls < 0:
        raise InputError(f"--max-judge-calls {cfg.max_judge_calls}: must be >= 0")
    if cfg.task == "tldr" and cfg.eval_data and not os.path.exists(cfg.eval_data):
        raise InputError(f"--eval-data {cfg.eval_data}: no such file (CNN/DM articles, one JSON object a line)")


def main(argv, train, TrainConfig):
    """`python dpo.py --task hh|tldr [flags]`: the experiment, errors in one line. train and TrainConfig are
    dpo.py's, passed in (imports go one way: dpo.py -> generation.py)."""
    try:
        run(parse_args(GenerationConfig, argv, __doc__.split("\n")[0]), train, TrainConfig)
    except (InputError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


# ----------------------------------------------------------------------------------------------
# The run: every stage planned, then each reused, resumed or computed

def run(cfg, train, TrainConfig, log=print):
    """The whole experiment; returns the result rows (set, method, temperature, step, win_rate, se, n)."""
    cfg = cfg.resolved()
    check(cfg)
    t_start = time.time()
    device = pick_device(cfg.device)
    os.makedirs(cfg.out, exist_ok=True)
    methods = TASKS[cfg.task]["methods"]
    stages = plan(cfg, methods, log)
    stages.explain(final=["results.csv", "results.json", "win_rates.png", "training.png", "samples.md", "summary.json"])
    splits = data_stage(cfg, stages, log)
    tok = load_tokenizer(None if cfg.model.startswith("scratch") else cfg.model)
    base = base_stage(cfg, stages, splits, tok, device, log)
    sft_dir = sft_stage(cfg, stages, base, splits, tok, device, log)
    dpo_steps = dpo_stage(cfg, stages, train, TrainConfig, sft_dir, splits, device, log)
    models = {"DPO": os.path.join(cfg.out, "dpo", f"step-{dpo_steps[-1]}"), "SFT": sft_dir, "Preferred-FT": sft_dir,
              "Best of N": sft_dir, "2-shot": base, "zero-shot": base}
    if cfg.task == "tldr":
        models["Preferred-FT"] = pft_stage(cfg, stages, sft_dir, splits, tok, device, log)
    bon_rm = bon_rm_stage(cfg, stages, sft_dir, splits, tok, device, log)
    rm_folder = judge_rm_stage(cfg, stages, sft_dir, splits, device, log)
    judges = {name: make_judge(cfg, rm_folder, name) for name in sets_of(cfg)}  # news: prompt (C) for articles
    files = {m: samples_stage(cfg, stages, m, models[m], splits, tok, bon_rm, device, log) for m in methods}
    curve_files = curve_stage(cfg, stages, dpo_steps, splits, tok, device, log)
    announce_judging(cfg, stages, methods, files, curve_files, judges, splits, log)
    rows, spent = [], {"calls": 0}  # judge calls made by this run, for --max-judge-calls
    for m in methods:
        rows += judge_stage(cfg, stages, m, files[m], judges, spent, log)
    rows += judge_stage(cfg, stages, "curve", curve_files, judges, spent, log)
    agreement = agreement_stage(cfg, stages, splits, judges[cfg.task], spent, log)
    report(cfg, rows, agreement, splits, files, time.time() - t_start, log)
    return rows


def sets_of(cfg):
    """The evaluation sets and their temperatures: hh or tldr, and news (CNN/DM) for tldr with --eval-data."""
    sets = {cfg.task: floats(cfg.temperatures, "--temperatures")}
    if cfg.task == "tldr" and cfg.eval_data:
        sets["news"] = floats(cfg.news_temperatures, "--news-temperatures")
    return sets


def plan(cfg, methods, log):
    """Every stage with the flags that feed it and the stages it reads."""
    s = lambda *names: {n: getattr(cfg, n) for n in names}  # noqa: E731
    stages = Stages(cfg.out, log)
    scratch = cfg.model.startswith("scratch")
    stages.add("data", s("task", "hh_train", "hh_test", "tldr", "eval_data", "fractions", "max_pairs", "eval_prompts",
                         "agreement_pairs",
                         "seed"), paths=["data"])
    stages.add("base", s("model", "pretrain_tokens", "max_length", "seed") if scratch else s("model"), ["data"],
               ["base"])
    train_flags = ("max_length", "max_prompt_length", "weights_dtype", "seed")
    stages.add("sft", s("sft_epochs", "sft_lr", "sft_batch_size", *train_flags), ["data", "base"], ["sft"])
    stages.add("dpo", s("beta", "optimizer", "lr", "warmup_steps", "batch_size", "micro_batch_size", "trainable",
                        "checkpoints", "precompute_ref", "grad_checkpoint", "lora_rank", *train_flags),
               ["data", "sft"], ["dpo"])
    if cfg.task == "tldr":
        stages.add("pft", s("sft_epochs", "sft_lr", "sft_batch_size", *train_flags), ["data", "sft"], ["pft"])
    stages.add("bon_rm", s("rm_lr", "rm_trainable", *train_flags), ["data", "sft"], ["bon_rm", "bon_rm.run"])
    judge_inputs = []
    if cfg.judge == "rm" and not cfg.judge_model:
        stages.add("judge_rm", s("judge_base", "judge_lr", "judge_trainable", "seed"),
                   ["data", "sft"] if cfg.judge_base == "sft" else ["data"], ["judge_rm", "judge_rm.run"])
        judge_inputs = ["judge_rm"]
    sampling = s("temperatures", "news_temperatures", "max_new_tokens", "max_prompt_length", "sample_batch_size",
                 "seed")
    model_stage = {"DPO": ["dpo"], "SFT": ["sft"], "Preferred-FT": ["pft" if cfg.task == "tldr" else "sft"],
                   "Best of N": ["sft", "bon_rm"], "2-shot": ["base"], "zero-shot": ["base"]}
    judging = s("judge", "judge_url", "judge_model", "seed")
    for m in methods:
        stages.add(f"samples-{slug(m)}", {**sampling, **(s("best_of") if m == "Best of N" else {})},
                   ["data", *model_stage[m]], [os.path.join("samples", slug(m))])
        stages.add(f"judge-{slug(m)}", judging, [f"samples-{slug(m)}", *judge_inputs],
                   [os.path.join("judged", slug(m))])
    stages.add("curve", s("curve_temperatures", "max_new_tokens", "max_prompt_length", "sample_batch_size", "seed"),
               ["data", "dpo"], ["curve"])
    stages.add("judge-curve", judging, ["curve", *judge_inputs], [os.path.join("judged", "curve")])
    stages.add("agreement", judging, ["data", *judge_inputs], ["agreement"])
    return stages


def slug(method):
    """A method's name in stage and folder names: "Best of N" -> best-of-n."""
    return method.lower().replace(" ", "-")


# ----------------------------------------------------------------------------------------------
# Data

def read_hh_sources(sources):
    pairs = []
    for source in [x for x in sources.split(",") if x.strip()]:
        pairs += read_hh(hh_path(source.strip()))
    return pairs


def make_splits(cfg, log):
    """{"policy", "judge", "heldout" (human-labelled pairs for judge validation), "eval": {set: [{prompt,
    reference}]}, "two_shot" (hh), "sft" (tldr: train posts as {prompt, reference})}."""
    fr = floats(cfg.fractions, "--fractions")
    if cfg.task == "hh":
        pairs = read_hh_sources(cfg.hh_train)
        if cfg.hh_test:
            policy, judge_pairs = corpora.split_by_prompt(pairs, (fr[0] / (fr[0] + fr[1]), fr[1] / (fr[0] + fr[1])),
                                                         cfg.seed)
            evaluation = read_hh_sources(cfg.hh_test)
        else:
            policy, judge_pairs, evaluation = corpora.split_by_prompt(pairs, fr, cfg.seed)
        single = corpora.single_turn(evaluation)  # the paper's evaluation prompts: one Human and one Assistant turn
        evals = {"hh": [{"prompt": p["prompt"], "reference": p["chosen"]} for p in single[:cfg.eval_prompts]]}
        split = {"two_shot": corpora.two_shot_examples(policy), "heldout": evaluation[:cfg.agreement_pairs]}
    else:
        folder = cfg.tldr or None
        batches = tldr_comparisons_paths(folder and os.path.join(folder, "comparisons"))
        comparisons = corpora.read_tldr_comparisons(batches, "train")
        policy, judge_pairs = corpora.split_by_prompt(comparisons, (fr[0] / (fr[0] + fr[1]), fr[1] / (fr[0] + fr[1])),
                                                      cfg.seed)
        heldout = corpora.read_tldr_comparisons(batches, "valid")
        test = corpora.read_tldr_posts(tldr_path("test", folder and os.path.join(folder, "tldr_3_filtered")))
        evals = {"tldr": [{"prompt": p["prompt"], "reference": p["reference"]} for p in test[:cfg.eval_prompts]]}
        if cfg.eval_data:
            evals["news"] = corpora.read_cnndm(cfg.eval_data)[:cfg.eval_prompts]
        train_posts = corpora.read_tldr_posts(tldr_path("train", folder and os.path.join(folder, "tldr_3_filtered")))
        split = {"sft": [{"prompt": p["prompt"], "reference": p["reference"]} for p in train_posts],
                 "heldout": heldout[:cfg.agreement_pairs]}
    if cfg.max_pairs:
        policy = policy[:cfg.max_pairs]
    if len(policy) < cfg.batch_size:
        raise InputError(f"{len(policy)} policy pairs, fewer than one DPO batch (--batch-size {cfg.batch_size}); "
                         f"use more data or a smaller --batch-size")
    if not judge_pairs or not split["heldout"] or not all(evals.values()):
        raise InputError(f"the data gives {len(judge_pairs)} judge pairs, {len(split['heldout'])} held-out pairs and "
                         f"{ {k: len(v) for k, v in evals.items()} } evaluation prompts; every one needs some: "
                         f"use more data or other --fractions")
    log(f"data: {len(policy)} policy pairs, {len(judge_pairs)} judge pairs, {len(split['heldout'])} held-out pairs, "
        + ", ".join(f"{len(v)} {k} evaluation prompts" for k, v in evals.items()))
    return {"policy": policy, "judge": judge_pairs, "eval": evals, **split}


def data_stage(cfg, stages, log):
    path = os.path.join(cfg.out, "data", "splits.json")

    def compute():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_json(path, make_splits(cfg, log))
    stages.run("data", compute)
    with open(path) as f:
        return json.load(f)


def tokenized(pairs, tok, cfg):
    """Pairs as token ids in the policy's tokenizer (data.tokenize_pair: exact boundaries, EOS after responses)."""
    return [tokenize_pair(p["prompt"], p["chosen"], p["rejected"], cfg.max_length, cfg.max_prompt_length,
                          tokenizer=tok) for p in pairs]


def dtype_of(cfg):
    return torch.bfloat16 if cfg.weights_dtype == "bfloat16" else torch.float32


# ----------------------------------------------------------------------------------------------
# Models: base, SFT, DPO, Preferred-FT, the reward model of Best of N, the rm judge

def base_stage(cfg, stages, splits, tok, device, log):
    """--model itself, or a scratch GPT language-modelled on the training text (a base model to prompt, 2-shot)."""
    if not cfg.model.startswith("scratch"):
        stages.run("base", lambda: None)
        return cfg.model
    folder = os.path.join(cfg.out, "base")

    def compute():
        texts = ([p["prompt"] + p["chosen"] for p in splits["policy"]] + [p["rejected"] for p in splits["policy"]]
                 if cfg.task == "hh" else [p["prompt"] + p["reference"] for p in splits["sft"]])
        tokens = sft.review_tokens(texts)
        shape = cfg.model.partition(":")[2]
        # shared-prompt batches pad prompts and responses separately: a batch can be wider than --max-length
        config = dataclasses.replace(sft.scratch_config(), block_size=2 * cfg.max_length)
        if shape:
            n_layer, n_head, n_embd = (int(v) for v in shape.split(","))
            config = dataclasses.replace(config, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
        torch.manual_seed(cfg.seed)
        model = GPT(config).to(device)
        sft.init_unigram_bias(model, tokens)
        seq_len = min(128, len(tokens) - 1, config.block_size)
        steps = max(1, cfg.pretrain_tokens // (cfg.sft_batch_size * seq_len))
        log(f"base: a {model.num_params() / 1e6:.1f}M GPT from scratch, {steps} steps on {len(tokens)} tokens")
        sft.train_lm(model, tokens, steps, cfg.sft_batch_size, seq_len, lr=5e-3, warmup=min(30, steps),
                     generator=torch.Generator().manual_seed(cfg.seed), log=log,
                     checkpoints=Checkpoints(folder + ".run", max(1, steps // 4), steps, keep=False, log=log))
        save_pretrained(model, folder)
        shutil.rmtree(folder + ".run", ignore_errors=True)
    stages.run("base", compute)
    return folder


def supervised(cfg, stages, name, start, prompts, completions, device, log):
    """sft.train_sequences from the model `start` (NLL of the completions given the prompts), resumable, saved in
    out/NAME."""
    folder = os.path.join(cfg.out, name)

    def compute():
        model = from_pretrained(start, dtype=dtype_of(cfg), device=device)
        model.grad_checkpoint = cfg.grad_checkpoint  # GPT.forward keeps each block's input only: GPT-J-6B's SFT
        steps = cfg.sft_epochs * math.ceil(len(prompts) / cfg.sft_batch_size)
        log(f"{name}: {steps} steps of {cfg.sft_batch_size} sequences")
        sft.train_sequences(model, prompts, completions, steps=steps, batch_size=cfg.sft_batch_size, lr=cfg.sft_lr,
                            generator=torch.Generator().manual_seed(cfg.seed), log=log,
                            checkpoints=Checkpoints(folder + ".run", max(1, steps // 4), steps, keep=False, log=log))
        save_pretrained(model, folder)
        shutil.rmtree(folder + ".run", ignore_errors=True)
    if not stages.resuming(name) and not stages.done(name):
        shutil.rmtree(folder + ".run", ignore_errors=True)
    stages.run(name, compute)
    return folder


def sft_stage(cfg, stages, base, splits, tok, device, log):
    """hh: SFT on the chosen responses of the policy pairs (Preferred-FT, the paper's pi_ref); tldr: on the
    reference summaries of the training posts."""
    if cfg.task == "hh":
        items = tokenized(splits["policy"], tok, cfg)
        prompts, completions = [x["prompt_ids"] for x in items], [x["chosen_ids"] for x in items]
    else:
        items = [tokenize_pair(p["prompt"], p["reference"], p["reference"], cfg.max_length, cfg.max_prompt_length,
                               tokenizer=tok) for p in splits["sft"]]
        prompts, completions = [x["prompt_ids"] for x in items], [x["chosen_ids"] for x in items]
    return supervised(cfg, stages, "sft", base, prompts, completions, device, log)


def pft_stage(cfg, stages, sft_dir, splits, tok, device, log):
    """tldr: Preferred-FT, the SFT model fine-tuned on the chosen summaries of the policy pairs."""
    items = tokenized(splits["policy"], tok, cfg)
    return supervised(cfg, stages, "pft", sft_dir, [x["prompt_ids"] for x in items], [x["chosen_ids"] for x in items],
                      device, log)


def dpo_stage(cfg, stages, train, TrainConfig, sft_dir, splits, device, log):
    """dpo.py's train() from the SFT model on the policy pairs (text: it tokenises with the model's tokenizer),
    checkpoints kept along training (out/dpo/step-N). Resumes a killed run (--resume). Returns the steps saved."""
    out = os.path.join(cfg.out, "dpo")
    policy = splits["policy"]
    total = len(policy) // cfg.batch_size
    every = max(1, math.ceil(total / cfg.checkpoints))

    def compute():
        resume = stages.resuming("dpo") and os.path.exists(os.path.join(out, "checkpoint", "train_state.pt"))
        tcfg = TrainConfig(task="jsonl", model=sft_dir, out=out, beta=cfg.beta, optimizer=cfg.optimizer, lr=cfg.lr,
                           warmup_steps=cfg.warmup_steps, batch_size=cfg.batch_size,
                           micro_batch_size=cfg.micro_batch_size, epochs=1, eval_every=every, save_every=every,
                           keep_checkpoints=True, resume=resume, overwrite=not resume, device=device, seed=cfg.seed,
                           max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                           weights_dtype=cfg.weights_dtype, precompute_ref=cfg.precompute_ref,
                           grad_checkpoint=cfg.grad_checkpoint, lora_rank=cfg.lora_rank, trainable=cfg.trainable)
        log(f"DPO beta {cfg.beta:g}: {total} steps of {cfg.batch_size} pairs, a checkpoint every {every}")
        train(tcfg, policy, splits["heldout"][:max(cfg.micro_batch_size, 64)], log=lambda s: None)
    stages.run("dpo", compute)
    return sorted(int(d[5:]) for d in os.listdir(out) if d.startswith("step-") and d[5:].isdigit())


def bon_rm_stage(cfg, stages, sft_dir, splits, tok, device, log):
    """Best of N's reward model: the SFT model with a scalar head (ppo.RewardModel), Bradley-Terry on the policy
    pairs (the paper: a reward model learned from the preference pairs); held-out accuracy on the held-out pairs."""
    folder = os.path.join(cfg.out, "bon_rm")

    def compute():
        trunk = from_pretrained(sft_dir, dtype=dtype_of(cfg), device=device)
        total = math.ceil(len(splits["policy"]) / cfg.micro_batch_size)  # one epoch of batches
        model, accuracy = ppo.train_reward_model(trunk, tokenized(splits["policy"], tok, cfg),
                                                 train_trunk=cfg.rm_trainable == "all", batch_size=cfg.micro_batch_size,
                                                 lr=cfg.rm_lr, seed=cfg.seed, log=log,
                                                 checkpoints=Checkpoints(folder + ".run", math.ceil(total / 4), total,
                                                                         keep=False, log=log))
        acc = accuracy(tokenized(splits["heldout"], tok, cfg))
        save_pretrained(model.trunk, folder)
        save_torch(os.path.join(folder, "head.pt"), model.head.state_dict())
        shutil.rmtree(folder + ".run", ignore_errors=True)
        write_json(os.path.join(folder, "accuracy.json"), {"heldout_accuracy": acc, "n": len(splits["heldout"])})
        log(f"Best-of-N reward model: held-out accuracy {acc:.3f} on {len(splits['heldout'])} pairs")
    stages.run("bon_rm", compute)
    return folder


def load_reward_model(folder, device):
    model = ppo.RewardModel(from_pretrained(folder, device=device)).to(device).requires_grad_(False)
    model.head.load_state_dict(torch.load(os.path.join(folder, "head.pt"), map_location=device, weights_only=True))
    return model


JUDGE_BATCH = 16  # pairs per step of the reward-model judge (judge.train_rm_judge's default)


def judge_rm_stage(cfg, stages, sft_dir, splits, device, log):
    """--judge rm: judge.train_rm_judge on the judge pairs (GPT-2 tokens), measured on the held-out pairs."""
    if cfg.judge != "rm":
        return None
    if cfg.judge_model:
        return cfg.judge_model
    folder = os.path.join(cfg.out, "judge_rm")

    def compute():
        base = sft_dir if cfg.judge_base == "sft" else cfg.judge_base
        gpt2 = lambda pairs: tokenized(pairs, None, cfg)  # noqa: E731 (the judge reads GPT-2 tokens, judge.rm_ids)
        total = math.ceil(len(splits["judge"]) / JUDGE_BATCH)  # one epoch of batches, resumable a quarter apart
        jd.train_rm_judge(gpt2(splits["judge"]), folder, base_model=load_model(base, device, cfg.seed),
                          held_out=gpt2(splits["heldout"]), train_trunk=cfg.judge_trainable == "all", lr=cfg.judge_lr,
                          batch_size=JUDGE_BATCH, seed=cfg.seed, device=device, log=log,
                          checkpoints=Checkpoints(folder + ".run", math.ceil(total / 4), total, keep=False, log=log))
        shutil.rmtree(folder + ".run", ignore_errors=True)
    stages.run("judge_rm", compute)
    return folder


def make_judge(cfg, rm_folder, name=None):
    """The judge of evaluation set `name`: the api judge with the paper's prompt for it (judge.PROMPTS: dialogue,
    summarization, or news for CNN/DM), or the rm judge."""
    prompt = "news" if name == "news" else TASKS[cfg.task]["prompt"]
    if cfg.judge == "api":
        return jd.ApiJudge(cfg.judge_url, cfg.judge_model, prompt, workers=cfg.judge_workers)
    return jd.RewardModelJudge(rm_folder, pick_device(cfg.device)) if rm_folder else None


# ----------------------------------------------------------------------------------------------
# Samples

def sample_texts(model, tok, prompts, cfg, temperature, n=1, seed=0, prompt_tokens=None):
    """n responses to each prompt (text) at `temperature` (0: greedy), decoded; prompts keep their last
    prompt_tokens (default --max-prompt-length, as in training) tokens; an HH response ends where the model
    starts a new Human turn."""
    ids = [tok.encode(p)[-(prompt_tokens or cfg.max_prompt_length):] for p in prompts]
    device = model.wte.weight.device
    out = ev.sample_completions(model, ids, n, cfg.max_new_tokens, cfg.sample_batch_size,
                                torch.Generator(device).manual_seed(seed), temperature=temperature, eos_id=tok.eos_id)
    texts = [tok.decode([t for t in c if t != tok.eos_id]) for c in out]
    return [t.split(corpora.HUMAN)[0] if cfg.task == "hh" else t for t in texts], out, ids


def write_samples(path, items, responses, extra):
    atomic_write(path, lambda f: f.writelines(json.dumps({"prompt": it["prompt"], "response": r,
                                                          "baseline": it["reference"], **extra}) + "\n"
                                              for it, r in zip(items, responses)))


def samples_stage(cfg, stages, method, model_dir, splits, tok, bon_rm, device, log):
    """Method's answer to every evaluation prompt at each temperature: out/samples/METHOD/SET-T{t}.jsonl, in
    eval.py --win-rate's format. A killed stage keeps its finished files."""
    folder = os.path.join(cfg.out, "samples", slug(method))
    files = {(name, t): os.path.join(folder, f"{name}-T{t:g}.jsonl") for name, temps in sets_of(cfg).items()
             for t in temps}

    def compute():
        os.makedirs(folder, exist_ok=True)
        model = from_pretrained(model_dir, dtype=dtype_of(cfg), device=device).requires_grad_(False)
        rm = load_reward_model(bon_rm, device) if method == "Best of N" else None
        for (name, t), path in files.items():
            if os.path.exists(path):
                continue
            items = splits["eval"][name]
            prompts = [it["prompt"] for it in items]
            if method == "2-shot":  # the base model, shown two training dialogues before the query
                prompts = [corpora.two_shot_prompt(p, splits["two_shot"]) for p in prompts]
            seed = cfg.seed + int(1000 * t)
            if method == "Best of N":  # N samples of the SFT model, the reward model's best
                texts, completions, ids = sample_texts(model, tok, prompts, cfg, t, cfg.best_of, seed)
                rows = [p for p in ids for _ in range(cfg.best_of)]
                scores = rm.score([p + c for p, c in zip(rows, completions)], cfg.sample_batch_size)
                best = ppo.best_of_n(scores.view(len(prompts), cfg.best_of))                  # (P,)
                texts = [texts[i * cfg.best_of + b] for i, b in enumerate(best.tolist())]
            else:  # 2-shot: the examples and the query fill the context (less the response)
                room = model.config.block_size - cfg.max_new_tokens if method == "2-shot" else None
                texts = sample_texts(model, tok, prompts, cfg, t, 1, seed, room)[0]
            write_samples(path, items, texts, {"method": method, "temperature": t})
            log(f"samples: {method}, {name}, T {t:g}: {len(texts)} -> {path}")
    stages.run(f"samples-{slug(method)}", compute)
    return files


def curve_stage(cfg, stages, dpo_steps, splits, tok, device, log):
    """DPO's checkpoints along training, each sampled at --curve-temperatures (Fig. 3 right): out/curve/."""
    folder = os.path.join(cfg.out, "curve")
    name = cfg.task
    files = {(name, t, s): os.path.join(folder, f"{name}-T{t:g}-step{s}.jsonl")
             for t in floats(cfg.curve_temperatures, "--curve-temperatures") for s in dpo_steps}

    def compute():
        os.makedirs(folder, exist_ok=True)
        items = splits["eval"][name]
        for (_, t, step), path in files.items():
            if not os.path.exists(path):
                model = from_pretrained(os.path.join(cfg.out, "dpo", f"step-{step}"), dtype=dtype_of(cfg),
                                        device=device).requires_grad_(False)
                texts = sample_texts(model, tok, [it["prompt"] for it in items], cfg, t, 1, cfg.seed + int(1000 * t))[0]
                write_samples(path, items, texts, {"method": "DPO", "temperature": t, "step": step})
    stages.run("curve", compute)
    return files


# ----------------------------------------------------------------------------------------------
# Judging

def cache_lines(folder):
    path = os.path.join(folder, jd.CACHE_FILE)
    if not os.path.exists(path):
        return 0
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def judge_stage(cfg, stages, method, files, judges, spent, log):
    """judge.win_rate of every samples file of `method` ("curve": DPO's checkpoints): out/judged/METHOD/SET-T*/
    win_rate.json, judgments.jsonl and the judge's cache. --max-judge-calls caps the calls of the whole run: each
    file may make only what is left (judge.win_rate refuses before its first call otherwise)."""
    name = f"judge-{slug(method)}"
    folder = os.path.join(cfg.out, "judged", slug(method))
    dirs = {key: os.path.join(folder, os.path.basename(path)[:-len(".jsonl")]) for key, path in files.items()}

    def compute():
        for key, path in files.items():
            left = None if cfg.max_judge_calls is None else cfg.max_judge_calls - spent["calls"]
            before = cache_lines(dirs[key])
            jd.win_rate(jd.read_samples(path), judges[key[0]], dirs[key], seed=cfg.seed, max_calls=left,
                        log=lambda s: log(f"  {os.path.relpath(path, cfg.out)}: {s}"))
            spent["calls"] += cache_lines(dirs[key]) - before  # the calls made (each is one line of the cache)
    stages.run(name, compute)
    rows = []
    for key, d in dirs.items():
        with open(os.path.join(d, "win_rate.json")) as f:
            res = json.load(f)
        rows.append({"set": key[0], "method": "DPO" if method == "curve" else method, "temperature": key[1],
                     "step": key[2] if len(key) > 2 else None, **{k: res[k] for k in ("win_rate", "se", "n",
                                                                                     "invalid")}})
    return rows


def announce_judging(cfg, stages, methods, files, curve_files, judges, splits, log):
    """Before the first judge call: how many calls, at most, to which model (cached ones cost nothing)."""
    todo = sum(sum(1 for _ in open(path)) for m in [*methods, "curve"] if not stages.done(f"judge-{slug(m)}")
               for path in (curve_files if m == "curve" else files[m]).values())
    todo += 0 if stages.done("agreement") else len(splits["heldout"])
    log(f"judging: up to {todo} calls to {judges[cfg.task].description}" +
        (f" (--max-judge-calls {cfg.max_judge_calls})" if cfg.max_judge_calls is not None else "") +
        "; judgments already cached cost nothing")


def agreement_stage(cfg, stages, splits, judge, spent, log):
    """The judge's agreement with the human labels of the held-out pairs (judge.agreement), with its s.e."""
    folder = os.path.join(cfg.out, "agreement")
    left = None if cfg.max_judge_calls is None else cfg.max_judge_calls - spent["calls"]
    stages.run("agreement", lambda: jd.agreement(splits["heldout"], judge, folder, cfg.seed, left, log))
    with open(os.path.join(folder, "agreement.json")) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------
# Report: the table, the plots, a few samples

def report(cfg, rows, agreement, splits, files, seconds, log):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    main_rows = [r for r in rows if r["step"] is None]
    ev.write_table(rows, os.path.join(cfg.out, "results.csv"), os.path.join(cfg.out, "results.json"))
    sets = sets_of(cfg)
    fig, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 4), squeeze=False)
    for ax, name in zip(axes[0], sets):
        for m in TASKS[cfg.task]["methods"]:
            pts = [r for r in main_rows if r["set"] == name and r["method"] == m and r["n"]]
            ax.errorbar([r["temperature"] for r in pts], [r["win_rate"] for r in pts], [r["se"] for r in pts],
                        marker="o", capsize=3, label=m)
        ax.axhline(0.5, color="grey", ls="--", lw=1)
        ax.set(xlabel="sampling temperature", ylabel=f"win rate vs {'chosen' if name == 'hh' else 'reference'}",
               title=f"{name}: judge {agreement['judge'][:40]}", ylim=(0, 1))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(cfg.out, "win_rates.png"), dpi=80)
    plt.close(fig)
    curve = [r for r in rows if r["step"] is not None and r["n"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ref_method = "Preferred-FT" if cfg.task == "hh" else "SFT"  # pi_ref: DPO's step 0
    for t in sorted({r["temperature"] for r in curve}):
        start = [{**r, "step": 0} for r in main_rows if r["method"] == ref_method and r["temperature"] == t
                 and r["set"] == cfg.task and r["n"]]
        pts = start + sorted((r for r in curve if r["temperature"] == t), key=lambda r: r["step"])
        ax.errorbar([r["step"] for r in pts], [r["win_rate"] for r in pts], [r["se"] for r in pts], marker="o",
                    capsize=3, label=f"DPO, T {t:g}")
    ax.axhline(0.5, color="grey", ls="--", lw=1)
    ax.set(xlabel="DPO step (0: pi_ref)", ylabel="win rate", title="win rate along DPO training", ylim=(0, 1))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(cfg.out, "training.png"), dpi=80)
    plt.close(fig)
    name, t = cfg.task, floats(cfg.temperatures, "--temperatures")[-1]
    lines = [f"# Samples ({name}, T {t:g}), beside the data's own answer\n"]
    per_method = {m: jd.read_samples(fs[name, t]) for m, fs in files.items()}
    for i, item in enumerate(splits["eval"][name][:3]):
        lines.append(f"## Prompt {i}\n\n```\n{item['prompt'].strip()[:600]}\n```\n\n"
                     f"**data**: {item['reference'].strip()}\n")
        lines += [f"**{m}**: {s[i]['response'].strip()}\n" for m, s in per_method.items()]
    atomic_write(os.path.join(cfg.out, "samples.md"), lambda f: f.write("\n".join(lines)))
    accuracies = {}
    for name in ("bon_rm", "judge_rm"):
        path = os.path.join(cfg.out, name, "accuracy.json")
        if os.path.exists(path):
            with open(path) as f:
                accuracies[name] = json.load(f)
    write_json(os.path.join(cfg.out, "summary.json"), {"seconds": seconds, "agreement": agreement, **accuracies,
                                                       "config": dataclasses.asdict(cfg)})
    log(f"\n{'set':<6}{'method':<14}{'T':>6}{'win rate':>18}{'n':>6}")
    for r in main_rows:
        wr = "-" if r["win_rate"] is None else f"{r['win_rate']:.3f} ± {r['se']:.3f}"
        log(f"{r['set']:<6}{r['method']:<14}{r['temperature']:>6g}{wr:>18}{r['n']:>6}")
    for r in curve:
        log(f"DPO step {r['step']}, T {r['temperature']:g}: {r['win_rate']:.3f} ± {r['se']:.3f} (n {r['n']})")
    if agreement["n"]:
        log(f"judge ({agreement['judge']}): agreement with human labels {agreement['agreement']:.3f} ± "
            f"{agreement['se']:.3f} on {agreement['n']} held-out pairs | {seconds:.0f} s")
    log(f"wrote {cfg.out}/results.csv, results.json, win_rates.png, training.png, samples.md, summary.json")
