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
from data import EOS, encode
from machinery.hf import from_pretrained
from model import GPT


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


def micro_args(out, n_prefixes, betas):
    """A micro run of the CPU preset: a 1-block model, 300 reviews a split, tiny batches (seconds, not minutes)."""
    return ["--task", "imdb", "--preset", "cpu", "--out", str(out), "--imdb", IMDB, "--model", "scratch:1,2,32",
            "--sft-tokens", "8000", "--n-prefixes", str(n_prefixes), "--max-new-tokens", "6", "--betas", betas,
            "--alphas", "0.1", "--batch-size", "12", "--micro-batch-size", "6", "--eval-prompts", "8",
            "--classifier-epochs", "1", "--max-reviews", "300", "--device", "cpu"]


@pytest.mark.skipif(not os.path.exists(IMDB), reason=f"IMDb archive not found at {IMDB} (set DPO_IMDB)")
def test_micro_pipeline_produces_every_artefact(tmp_path, capsys):
    out = tmp_path / "imdb"
    args = micro_args(out, n_prefixes=24, betas="0.1,1")
    assert dpo.main(args) == 0
    for name in ("sft/model.safetensors", "classifier.pt", "pairs.jsonl", "reference_logps.pt", "results.csv",
                 "results.json", "frontier.png", "summary.json", "dpo-beta0.1/done", "preferred-ft/model.safetensors",
                 "unlikelihood-alpha0.1/model.safetensors", "rankings.jsonl", "dpo-pl-beta0.1/done",
                 "implicit-reward.png", "implicit_samples.json"):
        assert (out / name).exists(), name
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
    assert "Unlikelihood" in methods and methods.count("DPO-PL") >= 2
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
    for folder in (out / "dpo-beta0.1" / last, out / "preferred-ft", out / "unlikelihood-alpha0.1",
                   out / "dpo-pl-beta0.1" / last_pl):
        trained = from_pretrained(str(folder)).state_dict()
        assert [k for k in sft_w if not torch.equal(sft_w[k], trained[k])] == ["lm_head.weight"], folder
    # a second run finds every stage cached and gives the same table
    capsys.readouterr()
    assert dpo.main(args) == 0
    assert "SFT: cached" in capsys.readouterr().out
    assert json.load(open(out / "results.json")) == rows


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
