"""Tests for the DPO trainer in dpo.py: one concatenated forward, gradient accumulation, precomputed
reference log-probs, exact resume, learning on a synthetic preference, and the command line.

    python -m pytest -q test_train.py
"""
import gzip
import json
import os
import random

import pytest
import torch

os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "tiktoken"))

import dpo
import data
from data import collate_pairs, tokenize_pair
from eval import completion_logps
from machinery import fast
from machinery.hf import load_model
from model import GPT, GPTConfig

HERE = os.path.dirname(os.path.abspath(__file__))
HH_SAMPLE = os.environ.get("DPO_HH_SAMPLE", os.path.join(HERE, "..", "shared", "data", "hh-rlhf", "harmless-base-test.jsonl.gz"))
WORDS = "the a movie film plot actor scene story was is very quite rather and but so".split()


def synthetic_pairs(n, seed=0):
    """Chosen responses contain ' excellent', rejected ones ' awful'; otherwise random words."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
        body = [rng.choice(WORDS) for _ in range(rng.randint(3, 8))]
        k = rng.randint(0, len(body))
        pairs.append({"prompt": prompt, "chosen": " " + " ".join(body[:k] + ["excellent"] + body[k:]),
                      "rejected": " " + " ".join(body[:k] + ["awful"] + body[k:])})
    return pairs


def tiny_cfg(tmp_path, **kw):
    base = dict(model="random:2,2,32", out=str(tmp_path / "run"), batch_size=8, micro_batch_size=4, max_length=64,
                max_prompt_length=32, steps=4, warmup_steps=0, lr=1e-3, optimizer="adamw", eval_every=1000,
                save_every=1000, device="cpu")
    return dpo.TrainConfig(**{**base, **kw})


def quiet(*a, **k):
    pass


def test_concatenated_forward_equals_separate_forwards():
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32))
    items = [tokenize_pair(p["prompt"], p["chosen"], p["rejected"]) for p in synthetic_pairs(5)]
    both = dpo.batch_logps(m, collate_pairs(items))  # (10,)
    chosen_only = [{"prompt_ids": it["prompt_ids"], "chosen_ids": it["chosen_ids"], "rejected_ids": it["chosen_ids"]} for it in items]
    rejected_only = [{"prompt_ids": it["prompt_ids"], "chosen_ids": it["rejected_ids"], "rejected_ids": it["rejected_ids"]} for it in items]
    sep_c = torch.stack([dpo.batch_logps(m, collate_pairs([it]))[0] for it in chosen_only])
    sep_r = torch.stack([dpo.batch_logps(m, collate_pairs([it]))[1] for it in rejected_only])
    torch.testing.assert_close(both, torch.cat([sep_c, sep_r]), atol=1e-4, rtol=1e-6)
    batch = collate_pairs(items)  # and the fast head-on-response-only path equals the textbook one
    slow = dpo.sequence_logps(m(batch["input_ids"]), batch["input_ids"], batch["loss_mask"])
    torch.testing.assert_close(both, slow, atol=1e-4, rtol=1e-6)


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_gradient_accumulation_equals_full_batch(tmp_path):
    pairs = synthetic_pairs(40)
    a, _ = dpo.train(tiny_cfg(tmp_path / "a", micro_batch_size=8, steps=2), pairs[:32], pairs[32:], log=quiet)
    b, _ = dpo.train(tiny_cfg(tmp_path / "b", micro_batch_size=2, steps=2), pairs[:32], pairs[32:], log=quiet)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=2e-6, rtol=0)


def test_precomputed_reference_equals_on_the_fly(tmp_path):
    pairs = synthetic_pairs(40)
    a, ha = dpo.train(tiny_cfg(tmp_path / "a", steps=3), pairs[:32], pairs[32:], log=quiet)
    b, hb = dpo.train(tiny_cfg(tmp_path / "b", steps=3, precompute_ref=True), pairs[:32], pairs[32:], log=quiet)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
    assert [h["loss"] for h in ha] == pytest.approx([h["loss"] for h in hb], abs=1e-6)
    assert ha[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)  # policy == reference at step 1: log 2


def test_worth_sharing_by_hand():
    """Sharing 2 rows' prompt of p tokens with responses of r tokens computes p + 2r tokens instead of 2p + 2r."""
    pair = lambda p, r: {"prompt_ids": [1] * p, "chosen_ids": [2] * r, "rejected_ids": [3] * r}
    assert fast.worth_sharing([pair(8, 2)])  # 12 of 20 tokens: saves 40%
    assert not fast.worth_sharing([pair(2, 8)])  # 18 of 20: saves 10%
    assert fast.worth_sharing([pair(4, 6)])  # 16 of 20: exactly 20%
    assert not fast.worth_sharing([pair(4, 7)])  # 18 of 22: 18%
    # 4 samples of one prefix (6 pairs, 4 distinct rows): 2 + 4*3 = 14 of 4*5 = 20 tokens
    samples = [[5, 6, 7], [8, 9, 9], [7, 7, 7], [6, 6, 6]]
    assert fast.worth_sharing([{"prompt_ids": [1, 2], "chosen_ids": samples[i], "rejected_ids": samples[j]}
                              for i in range(4) for j in range(i + 1, 4)])


def test_short_prompts_are_not_shared(tmp_path):
    """The synthetic prompts save under 20% when shared: the run says so and trains as --no-share-prompt does."""
    pairs = synthetic_pairs(40)
    lines = []
    a, ha = dpo.train(tiny_cfg(tmp_path / "a", steps=2), pairs[:32], pairs[32:], log=lines.append)
    b, hb = dpo.train(tiny_cfg(tmp_path / "b", steps=2, share_prompt=False), pairs[:32], pairs[32:], log=quiet)
    assert any("prompts too short to be worth computing once" in ln for ln in lines), lines
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_compile_equals_eager(tmp_path, monkeypatch):
    """--compile (torch.compile per block) trains the same model as eager, up to float rounding. Both shared-prompt
    passes run (the prompt recorded, the responses attending to it), and the reference is its own compiled copy:
    had it called the policy's compiled code, every loss would stay log 2."""
    monkeypatch.setattr(fast, "SHARE_MIN_SAVING", 0.0)  # share these short prompts too
    pairs = synthetic_pairs(24)
    a, ha = dpo.train(tiny_cfg(tmp_path / "a", steps=2, model="random:1,2,32"), pairs[:16], pairs[16:], log=quiet)
    b, hb = dpo.train(tiny_cfg(tmp_path / "b", steps=2, model="random:1,2,32", compile=True), pairs[:16], pairs[16:],
                      log=quiet)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=0)
    assert [h["loss"] for h in ha] == pytest.approx([h["loss"] for h in hb], abs=1e-5)
    assert abs(hb[1]["loss"] - 0.6931471805599453) > 1e-3  # the policy moved away from the reference


def test_interrupt_and_resume_is_bit_identical(tmp_path):
    pairs = synthetic_pairs(40)
    full, _ = dpo.train(tiny_cfg(tmp_path / "full", steps=6, save_every=2), pairs[:32], pairs[32:], log=quiet)
    dpo.train(tiny_cfg(tmp_path / "cut", steps=6, save_every=2, stop_after=3), pairs[:32], pairs[32:], log=quiet)
    assert json.loads(open(tmp_path / "cut" / "run" / "metrics.jsonl").readlines()[-1])["step"] == 3
    resumed, _ = dpo.train(tiny_cfg(tmp_path / "cut", steps=6, save_every=2, resume=True), pairs[:32], pairs[32:], log=quiet)
    for (n, p), q in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n
    steps = [json.loads(l)["step"] for l in open(tmp_path / "cut" / "run" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_learning_a_synthetic_preference(tmp_path):
    """A tiny random model learns that ' excellent' beats ' awful' within seconds: held-out implicit-reward
    accuracy >= 0.9 (at step 0 every reward is 0, so accuracy is 0)."""
    pairs = synthetic_pairs(300, seed=1)
    cfg = tiny_cfg(tmp_path, steps=30, batch_size=16, micro_batch_size=16, lr=3e-3, eval_every=30)
    _, hist = dpo.train(cfg, pairs[:256], pairs[256:], log=quiet)
    assert hist[-1]["eval/accuracy"] >= 0.9, hist[-1]
    assert hist[-1]["eval/loss"] < 0.5


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def test_cli_jsonl_run_and_refusals(tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    write_jsonl(data, synthetic_pairs(60))
    out = tmp_path / "run"
    args = ["--task", "jsonl", "--data", str(data), "--model", "random:1,2,32", "--out", str(out), "--batch-size", "8",
            "--micro-batch-size", "4", "--steps", "2", "--max-length", "64", "--max-prompt-length", "32", "--n-eval", "8"]
    assert dpo.main(args) == 0
    rows = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2] and "eval/loss" in rows[-1]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "grad_norm", "lr", "tokens_per_s"):
        assert key in rows[0]
    assert os.path.exists(out / "checkpoint" / "model.safetensors") and os.path.exists(out / "checkpoint" / "train_state.pt")
    capsys.readouterr()
    assert dpo.main(args) == 2  # a finished run is not overwritten silently
    assert "already holds a run" in capsys.readouterr().err
    assert dpo.main(args + ["--overwrite", "--beta", "0"]) == 2
    assert "beta must be > 0" in capsys.readouterr().err
    assert dpo.main(args + ["--overwrite", "--batch-size", "6"]) == 2
    assert "not a multiple of --micro-batch-size" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    assert dpo.main(["--data", str(bad), "--out", str(tmp_path / "r2")]) == 2
    assert f"{bad}:2" in capsys.readouterr().err


@pytest.mark.skipif(not os.path.exists(HH_SAMPLE), reason=f"Anthropic HH sample not found at {HH_SAMPLE}")
def test_hh_sample_short_run(tmp_path):
    """A few steps on the real HH sample with a tiny random model: finite, loss starts at log 2."""
    cfg = tiny_cfg(tmp_path, task="hh", data=HH_SAMPLE, steps=3, max_length=128, max_prompt_length=64, n_eval=16)
    _, hist = dpo.train(cfg, log=quiet)
    assert hist[0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)


def test_distinct_rows_scored_once_give_the_same_logps_and_grouped_order():
    """The 6 pairs formed from 4 samples of one prompt: 12 rows, 4 distinct; same log-probs either way."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32))
    samples = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    items = [{"prompt_ids": [50256, 3, 4], "chosen_ids": samples[i], "rejected_ids": samples[j], "group": 0}
             for i in range(4) for j in range(i + 1, 4)]
    full = collate_pairs(items)
    distinct = collate_pairs(items, distinct=True)
    assert full["input_ids"].shape[0] == 12 and distinct["input_ids"].shape[0] == 4
    torch.testing.assert_close(dpo.batch_logps(m, distinct), dpo.batch_logps(m, full), atol=1e-5, rtol=0)
    groups = [{"group": g} for g in (0, 0, 1, 1, 1, 2)]
    order = data.epoch_order(groups, torch.Generator().manual_seed(0))
    assert sorted(order) == list(range(6))
    runs = [groups[i]["group"] for i in order]
    for g in set(runs):  # each group's pairs are contiguous
        pos = [p for p, r in enumerate(runs) if r == g]
        assert pos[-1] - pos[0] + 1 == len(pos)


def test_micro_batches_sort_by_length_and_keep_groups():
    import dpo
    items = [{"prompt_ids": [1] * p, "chosen_ids": [2] * c, "rejected_ids": [3] * r, **({"group": g} if g is not None else {})}
             for p, c, r, g in [(1, 5, 2, 0), (1, 1, 1, 0), (1, 9, 9, 1), (2, 1, 1, 1), (1, 3, 3, 2), (1, 2, 2, 2)]]
    mbs = dpo.micro_batches(items, [5, 4, 3, 2, 1, 0], 2)
    assert sorted(i for mb in mbs for i in mb) == list(range(6))  # a partition of the step
    assert [sorted(mb) for mb in mbs] == [[2, 3], [0, 1], [4, 5]]  # groups whole, longest group first
    plain = [dict(it) for it in items]
    for it in plain:
        it.pop("group")
    mbs = dpo.micro_batches(plain, list(range(6)), 2)
    lengths = [max(fast.pair_length(plain[i]) for i in mb) for mb in mbs]
    assert lengths == sorted(lengths, reverse=True) and [fast.pair_length(plain[i]) for i in mbs[0]] == [10, 6]
    assert dpo.micro_batches(plain, [3, 1], 8) == [[3, 1]]  # one micro-batch: the step's order as it is


@pytest.mark.parametrize("arch", ["gpt2", "rotary"])
def test_shared_prompt_forward_equals_concatenated_forward(arch):
    """Each prompt computed once (collate_shared + shared_prompt_logps) gives the log-probs and the
    gradients of the plain concatenated forward, with shared prompts, repeated responses and lengths that
    differ on both sides (right-padded prompts: their padding must be masked for the responses)."""
    torch.manual_seed(0)
    extra = dict(pos_embedding="rotary", rotary_dim=8, parallel_residual=True) if arch == "rotary" else {}
    m = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, **extra))
    items = [tokenize_pair(p["prompt"], p["chosen"], p["rejected"]) for p in synthetic_pairs(6, seed=3)]
    items.append(dict(items[0], rejected_ids=items[1]["chosen_ids"]))  # the prompt of pair 0 again
    items.append(dict(items[2], chosen_ids=items[2]["rejected_ids"][:1]))  # a one-token response
    shared = fast.collate_shared(items)
    assert len(shared["prompt_ids"]) == 6 and shared["prompt_lens"].tolist() != [shared["prompt_ids"].size(1)] * 6
    a = dpo.batch_logps(m, collate_pairs(items, distinct=True))
    b = dpo.batch_logps(m, shared)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-6)
    w = torch.randn(len(a), generator=torch.Generator().manual_seed(0))
    ga = torch.autograd.grad((a * w).sum(), list(m.parameters()))
    gb = torch.autograd.grad((b * w).sum(), list(m.parameters()))
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)


def test_rankings_of_two_train_exactly_like_their_pairs(tmp_path):
    """dpo.train_rankings (Appendix A.3 as a run) on K = 2 rankings is train() on the same pairs: the same first
    loss, and after 3 full-batch steps the same weights. Its log-probs come from the left-padded eval path, the
    trainer's from the right-padded fast path, so agreement is to float32 round-off. AdamW's epsilon is set to 1
    so that an update is ~lr * gradient, not its sign: a sign would magnify round-off in near-zero gradients."""
    items = [tokenize_pair(p["prompt"], p["chosen"], p["rejected"]) for p in synthetic_pairs(8, seed=3)]
    pairs = [{**it, "prompt": "", "chosen": "", "rejected": ""} for it in items]  # id-carrying: used as they are
    rankings = [{"prompt_ids": it["prompt_ids"], "responses_ids": [it["chosen_ids"], it["rejected_ids"]]} for it in items]
    cfg = tiny_cfg(tmp_path, batch_size=8, micro_batch_size=8, steps=3, lr=1e-2, adam_eps=1.0, beta=0.5)
    policy, history = dpo.train(cfg, pairs, [], log=quiet)
    reference = load_model(cfg.model, "cpu", cfg.seed)
    ref_lp = completion_logps(reference, [r["prompt_ids"] for r in rankings for _ in range(2)],
                              [y for r in rankings for y in r["responses_ids"]]).view(8, 2)
    rcfg = tiny_cfg(tmp_path, out=str(tmp_path / "rankings"), batch_size=8, micro_batch_size=8, steps=3, lr=1e-2,
                    adam_eps=1.0, beta=0.5, save_every=3)
    ranked, losses = dpo.train_rankings(rcfg, rankings, ref_lp, log=quiet)
    assert abs(losses[0] - history[0]["loss"]) < 1e-5 and abs(losses[0] - 0.6931) < 1e-3  # log 2 at the start
    moved = 0
    for (name, a), b in zip(policy.state_dict().items(), ranked.state_dict().values()):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-4, msg=name)
        moved += not torch.equal(a, reference.state_dict()[name])
    assert moved > 0 and os.path.exists(tmp_path / "rankings" / "step-3" / "model.safetensors")
