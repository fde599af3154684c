"""Tests for the IMDb experiment (`python dpo.py --task imdb`): pair construction, and a micro run of the
whole pipeline (tiny model, tens of prefixes, a few steps) that checks every artefact.

    python -m pytest -q test_imdb.py
"""
import json
import os
import struct

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(HERE, "..", "shared", "tiktoken"))
IMDB = os.environ.get("DPO_IMDB", os.path.join(HERE, "..", "shared", "data", "aclImdb_v1.tar.gz"))

import dpo
import imdb
from data import EOS, decode, encode
from machinery.hf import from_pretrained, save_pretrained
from model import GPT, GPTConfig


def test_four_samples_make_six_pairs_higher_reward_chosen():
    prompt = [EOS] + encode("This movie")
    samples = [encode(" was great"), encode(" was awful"), encode(" was fine"), encode(" bored me")]
    rewards = [0.9, 0.1, 0.6, 0.2]
    pairs = imdb.make_pairs(prompt, samples, rewards, group=7)
    assert len(pairs) == 6
    assert all(p["chosen_reward"] > p["rejected_reward"] and p["group"] == 7 for p in pairs)
    got = {(p["chosen"], p["rejected"]) for p in pairs}
    assert got == {(" was great", " was awful"), (" was great", " was fine"), (" was great", " bored me"),
                   (" was fine", " was awful"), (" bored me", " was awful"), (" was fine", " bored me")}
    assert pairs[0]["prompt"] == "This movie" and pairs[0]["prompt_ids"] == prompt


def test_ties_make_no_pair():
    pairs = imdb.make_pairs([EOS, 1], [[2], [3], [4], [5]], [0.5, 0.5, 0.9, 0.1], group=0)
    assert len(pairs) == 5  # the tie (samples 0 and 1) carries no preference
    assert not any({tuple(p["chosen_ids"]), tuple(p["rejected_ids"])} == {(2,), (3,)} for p in pairs)


def test_ranking_is_best_first_ties_in_sampling_order_and_all_ties_none():
    r = imdb.make_ranking([EOS, 1], [[2], [3], [4], [5]], [0.5, 0.5, 0.9, 0.1], group=3)
    assert r["responses_ids"] == [[4], [2], [3], [5]] and r["rewards"] == [0.9, 0.5, 0.5, 0.1] and r["group"] == 3
    assert imdb.make_ranking([EOS, 1], [[2], [2]], [0.5, 0.5], group=0) is None  # no preference to learn


def test_best_of_n_rows_by_hand():
    """Two prefixes, 4 samples each; N = 2 looks at the first 2 samples, N = 4 at all:
        r*        [0.1, 0.9, 0.5, 0.3]   [0.8, 0.2, 0.6, 0.95]
        RM score  [0.0, -1., 2.0, 3.0]   [1.0, 0.0, 0.0, 0.0]
    by r*:  N=2 keeps 0.9 and 0.8 (mean 0.85, s.e. std(0.9, 0.8)/sqrt 2 = 0.0707/1.414 = 0.05); N=4 0.9, 0.95 (0.925)
    by RM:  N=2 keeps sample 0 of each (0.1, 0.8: 0.45);  N=4 sample 3 and 0 (0.3, 0.8: 0.55)
    KL: log 2 - 1/2 = 0.1931, log 4 - 3/4 = 0.6363 (upper bounds, kl_se 0)."""
    true = [[0.1, 0.9, 0.5, 0.3], [0.8, 0.2, 0.6, 0.95]]
    rm = [[0.0, -1.0, 2.0, 3.0], [1.0, 0.0, 0.0, 0.0]]
    by_true = imdb.best_of_n_rows("Best-of-N", true, true, [2, 4])
    by_rm = imdb.best_of_n_rows("Best-of-N (RM)", true, rm, [2, 4])
    assert [round(r["reward"], 6) for r in by_true] == [0.85, 0.925] and abs(by_true[0]["reward_se"] - 0.05) < 1e-9
    assert [round(r["reward"], 6) for r in by_rm] == [0.45, 0.55]
    assert [round(r["kl"], 4) for r in by_true] == [0.1931, 0.6363] and all(r["kl_se"] == 0 for r in by_true + by_rm)
    assert [r["best_of"] for r in by_rm] == [2, 4] and {r["method"] for r in by_rm} == {"Best-of-N (RM)"}
    prompts, completions = [[EOS, 10], [EOS, 11]], [[20 + i] for i in range(8)]
    shown = imdb.best_of_n_rows("Best-of-N", true, true, [4], prompts, completions)[0]["samples"]
    assert [s["reward"] for s in shown] == [0.9, 0.95]  # the kept samples: 1 of prefix 0 and 3 of prefix 1
    assert [s["completion"] for s in shown] == [decode([21]), decode([27])]


def test_ppo_config_of_each_preset():
    """The GPU preset runs PPO at the paper's scale with TRL's settings (adaptive KL to 6 nats from beta 0.2, one lr
    for policy and value head); the CPU preset with a fixed beta, the head's lr and the value head's own."""
    gpu = imdb.ppo_config(imdb.ImdbConfig(preset="gpu").resolved())
    assert (gpu.batch_size, gpu.lr, gpu.value_lr, gpu.adaptive_kl, gpu.kl_coef, gpu.kl_target) == \
        (1024, 1.41e-5, None, True, 0.2, 6.0)
    assert gpu.max_new_tokens == 48 and gpu.ppo_epochs == 4 and gpu.clip == 0.2 and gpu.lam == 0.95
    cpu = imdb.ppo_config(imdb.ImdbConfig(preset="cpu").resolved())
    assert not cpu.adaptive_kl and cpu.value_lr > cpu.lr and cpu.max_new_tokens == 24


def micro_args(out, n_prefixes, betas):
    """A micro run: the tiny preset (the CPU preset with a 1-block model, 300 reviews a split, tiny batches, 4 PPO
    iterations of 8 rollouts: seconds, not minutes)."""
    return ["--task", "imdb", "--preset", "tiny", "--out", str(out), "--imdb", IMDB, "--n-prefixes", str(n_prefixes),
            "--betas", betas, "--device", "cpu"]


@pytest.mark.skipif(not os.path.exists(IMDB), reason=f"IMDb archive not found at {IMDB} (set DPO_IMDB)")
def test_micro_pipeline_produces_every_artefact(tmp_path, capsys):
    out = tmp_path / "imdb"
    args = micro_args(out, n_prefixes=24, betas="0.1,1")
    assert dpo.main(args) == 0
    for name in ("sft/model.safetensors", "classifier.pt", "pairs.jsonl", "reference_logps.pt", "results.csv",
                 "results.json", "frontier.png", "summary.json", "rankings.jsonl",
                 "implicit-reward.png", "implicit_samples.json", "reward_model/head.pt", "reward_model/accuracy.json",
                 "ppo-gt/step-4/model.safetensors", "ppo/history.jsonl", "best_of_n_samples.json"):
        assert (out / name).exists(), name
    for stage in ("sft", "classifier", "pairs", "reference", "dpo-beta0.1", "dpo-beta1", "preferred-ft",
                  "unlikelihood-alpha0.1", "reference-rankings", "dpo-pl-beta0.1", "reward_model", "ppo-gt", "ppo",
                  "best-of-n", "implicit-samples"):  # every stage recorded as done, with the key of its settings
        assert json.load(open(out / "records" / f"{stage}.json"))["status"] == "done", stage
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pairs = [json.loads(l) for l in open(out / "pairs.jsonl")]
    groups = {}
    for p in pairs:
        groups.setdefault(p["group"], []).append(p)
        assert p["chosen_reward"] > p["rejected_reward"] and 3 <= len(p["prompt_ids"]) <= 9
    assert len(groups) == 24 and all(len(g) <= 6 for g in groups.values()) and len(pairs) > 24 * 5
    rows = json.load(open(out / "results.json"))
    methods = [r["method"] for r in rows]
    assert methods.count("SFT") == 1 and methods.count("DPO") >= 4 and "Preferred-FT" in methods
    assert methods.count("DPO-PL") >= 2
    for method in ("Preferred-FT", "Unlikelihood", "PPO", "PPO-GT"):  # several points along each run
        steps = [r["step"] for r in rows if r["method"] == method]
        assert len(steps) >= 3 and steps == sorted(steps), (method, steps)
    assert [r["step"] for r in rows if r["method"] == "PPO"] == [1, 2, 3, 4]
    for method in ("Best-of-N", "Best-of-N (RM)"):  # N = 2, 4; the KL is the analytic bound log N - (N-1)/N
        bon = [r for r in rows if r["method"] == method]
        assert [r["best_of"] for r in bon] == [2, 4] and all(r["kl_estimate"].startswith("upper bound") for r in bon)
        assert [round(r["kl"], 4) for r in bon] == [0.1931, 0.6363] and all(r["n"] == 8 for r in bon)
    samples = json.load(open(out / "best_of_n_samples.json"))
    assert len(samples["completions"]) == len(samples["rewards"]) == len(samples["rm_scores"]) == 8 * 4
    summary = json.load(open(out / "summary.json"))
    assert 0 <= summary["reward_model_accuracy"] <= 1
    assert summary["reward_model_accuracy"] == json.load(open(out / "reward_model/accuracy.json"))["heldout_accuracy"]
    rankings = [json.loads(l) for l in open(out / "rankings.jsonl")]
    assert all(len(r["responses_ids"]) == 4 and r["rewards"] == sorted(r["rewards"], reverse=True) for r in rankings)
    for method in ("DPO", "DPO-PL"):  # the last checkpoint of each run carries its implicit-reward statistics
        last = [r for r in rows if r["method"] == method and "implicit_pearson" in r]
        assert len(last) == (2 if method == "DPO" else 1), method
        assert all(-1 <= r["implicit_spearman"] <= 1 and 0 <= r["implicit_accuracy"] <= 1 for r in last)
    assert all(0 <= r["heldout_accuracy"] <= 1 for r in rows if r["method"] == "DPO")
    assert rows[0]["kl"] == 0 and all(0 <= r["reward"] <= 1 for r in rows)
    header = open(out / "results.csv").readline().strip().split(",")
    assert header[:3] == ["method", "reward", "reward_se"] or {"method", "reward", "kl"} <= set(header)
    # the CPU preset trains the output head only, in DPO and in the baselines alike (--trainable head)
    sft_w = from_pretrained(str(out / "sft")).state_dict()
    last = max((d for d in os.listdir(out / "dpo-beta0.1") if d.startswith("step-")), key=lambda d: int(d[5:]))
    last_pl = max((d for d in os.listdir(out / "dpo-pl-beta0.1") if d.startswith("step-")), key=lambda d: int(d[5:]))
    last_ft = max((d for d in os.listdir(out / "preferred-ft") if d.startswith("step-")), key=lambda d: int(d[5:]))
    last_ul = max((d for d in os.listdir(out / "unlikelihood-alpha0.1") if d.startswith("step-")), key=lambda d: int(d[5:]))
    for folder in (out / "dpo-beta0.1" / last, out / "preferred-ft" / last_ft, out / "unlikelihood-alpha0.1" / last_ul,
                   out / "dpo-pl-beta0.1" / last_pl, out / "ppo-gt" / "step-4", out / "ppo" / "step-4"):
        trained = from_pretrained(str(folder)).state_dict()
        assert [k for k in sft_w if not torch.equal(sft_w[k], trained[k])] == ["lm_head.weight"], folder
    # a second run finds every stage cached and gives the same table
    capsys.readouterr()
    assert dpo.main(args) == 0
    printed = capsys.readouterr().out
    assert "SFT: cached" in printed and printed.count(" reuse ") == 15 and " compute" not in printed
    assert json.load(open(out / "results.json")) == rows


@pytest.mark.skipif(not os.path.exists(IMDB), reason=f"IMDb archive not found at {IMDB} (set DPO_IMDB)")
def test_gpu_preset_at_tiny_scale(tmp_path, capsys):
    """The GPU preset's code path, which no card here runs: a base model loaded from a Hugging Face GPT-2 folder
    (a random 1-block one), every weight trained (RMSprop, warm-up 150, the reward model too), evaluation every
    --eval-every steps, and PPO as TRL's gpt2-sentiment: one lr for policy and value head, lambda 0.95, the KL
    coefficient adapted toward the target, and the reference pass in minibatch-sized chunks (16 rollouts, 4 a
    chunk). Only sizes are shrunk; the lr is raised so that one step visibly moves every weight."""
    torch.manual_seed(0)
    base = tmp_path / "tiny-gpt2"
    save_pretrained(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64)), str(base))
    out = tmp_path / "imdb"
    args = ["--task", "imdb", "--preset", "gpu", "--out", str(out), "--imdb", IMDB, "--model", str(base),
            "--sft-tokens", "2000", "--sft-batch-size", "4", "--n-prefixes", "24", "--max-new-tokens", "6",
            "--betas", "0.1", "--alphas", "0.1", "--batch-size", "12", "--micro-batch-size", "6", "--eval-every", "4",
            "--eval-prompts", "8", "--sample-batch-size", "16", "--classifier-epochs", "1", "--max-reviews", "300",
            "--device", "cpu", "--lr", "1e-3", "--ppo-iterations", "4", "--ppo-batch-size", "16",
            "--ppo-minibatch-size", "4", "--ppo-epochs", "1", "--ppo-lr", "1e-3", "--best-of-n", "2,4"]
    assert dpo.main(args) == 0
    summary = json.load(open(out / "summary.json"))
    assert summary["config"]["optimizer"] == "rmsprop" and summary["config"]["trainable"] == "all"
    # r* is the paper's classifier by default; offline here, its weights cannot be loaded: the printed fallback
    assert summary["config"]["reward"] == "siebert"
    assert "reward classifier: cannot load siebert (" in capsys.readouterr().out
    rows = json.load(open(out / "results.json"))
    steps = [r["step"] for r in rows if r["method"] == "DPO"]
    assert len(steps) >= 3 and steps[:-1] == list(range(4, steps[-1], 4))  # every 4 steps, and the last
    history = [json.loads(l) for l in open(out / "ppo-gt" / "history.jsonl")]
    coefs = [h["kl_coef"] for h in history]
    assert coefs[0] == 0.2 and len(set(coefs)) == 4  # adapted after every iteration
    sft_w = from_pretrained(str(out / "sft")).state_dict()
    for folder in (out / "dpo-beta0.1" / f"step-{steps[-1]}", out / "ppo-gt" / "step-4"):
        trained = from_pretrained(str(folder)).state_dict()
        assert all(not torch.equal(sft_w[k], trained[k]) for k in sft_w if k.endswith(".weight")), folder


@pytest.mark.skipif(not os.path.exists(IMDB), reason=f"IMDb archive not found at {IMDB} (set DPO_IMDB)")
def test_small_run_holds_out_one_prefix(tmp_path, capsys):
    # under 20 prefixes no group % 20 == 19 exists: the last prefix is held out instead (it used to end in a
    # traceback: reference log-probs of an empty held-out split)
    out = tmp_path / "imdb"
    assert dpo.main(micro_args(out, n_prefixes=16, betas="0.1")) == 0
    assert "from 16 prefixes" in capsys.readouterr().out
    ref = torch.load(out / "reference_logps.pt")
    groups = sorted({json.loads(l)["group"] for l in open(out / "pairs.jsonl")})
    assert imdb.held_out_groups(groups) == {groups[-1]} and 0 < len(ref["eval"]) <= 6
    assert (out / "results.json").exists()


def test_held_out_rule_and_too_few_prefixes_refused_before_anything_runs(tmp_path, capsys):
    assert imdb.held_out_groups(range(40)) == {19, 39}  # 5%: unchanged wherever it holds out a prefix
    assert imdb.held_out_groups(range(16)) == {15} and imdb.held_out_groups([0]) == set()
    out = tmp_path / "imdb"
    args = ["--task", "imdb", "--preset", "cpu", "--out", str(out), "--imdb", str(tmp_path / "no-such-archive"),
            "--n-prefixes", "2", "--batch-size", "12", "--device", "cpu"]
    assert dpo.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--n-prefixes 2 " in err and "--n-prefixes 3 or more" in err, err
    assert not out.exists()  # refused before reading IMDb, SFT or anything else
