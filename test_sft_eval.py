"""Tests of sft.py and eval.py: losses against slow references, the KL estimator against an exact sum over
every sequence of a tiny vocabulary, the reward classifier, and the table/plot files.

    TIKTOKEN_CACHE_DIR=../shared/tiktoken DPO_IMDB=../shared/data/aclImdb_v1.tar.gz python -m pytest -q test_sft_eval.py
"""
import csv
import itertools
import json
import math
import os
import time

import pytest
import torch
import torch.nn.functional as F

import data
import eval as ev
import sft
from model import GPT, GPTConfig


def tiny_gpt(seed, vocab_size=5, block_size=8, std=None):
    """A tiny random GPT; std overrides the init so that its distributions are far from uniform."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=1, n_head=2, n_embd=16))
    if std is not None:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, std)
    return model.eval()


def full_logps(model, seq):
    """log pi(seq[t] | seq[<t]) for t >= 1 from the full logits and an explicit log-softmax: (T-1,) float64."""
    logits = model(torch.tensor([seq]))[0, :-1].double()  # (T-1, V)
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(seq[1:])[:, None]).squeeze(-1)


# ----------------------------------------------------------------------------------------------
# The KL estimator

def test_sequence_kl_matches_exact_kl_on_tiny_vocabulary():
    """Every y in {0..4}^3 after a fixed prompt: exact KL = sum_y pi(y) log pi(y)/ref(y), with pi(y) from the
    full logits of each sequence (independent of model.logps and of the padded batches). (a) the per-sample
    sequence_kl weighted by pi(y) gives the exact KL; (b) the Monte-Carlo mean over 4000 samples drawn by
    sample_completions lies within 4 standard errors of it."""
    policy, reference = tiny_gpt(1, std=0.5), tiny_gpt(2, std=0.5)
    prompt, L = [3, 1], 3
    ys = [list(y) for y in itertools.product(range(5), repeat=L)]
    with torch.no_grad():
        log_pi = torch.stack([full_logps(policy, prompt + y)[len(prompt) - 1:].sum() for y in ys])  # (125,)
        log_ref = torch.stack([full_logps(reference, prompt + y)[len(prompt) - 1:].sum() for y in ys])
    pi = log_pi.exp()
    assert abs(pi.sum().item() - 1.0) < 1e-6
    exact = (pi * (log_pi - log_ref)).sum().item()
    assert exact > 0.05  # the two models differ enough for the test to mean something

    k = ev.sequence_kl(policy, reference, [prompt] * len(ys), ys, batch_size=50).double()  # (125,)
    assert abs((pi * k).sum().item() - exact) < 1e-5  # (a)
    torch.testing.assert_close(k, log_pi - log_ref, atol=1e-4, rtol=0)

    gen = torch.Generator().manual_seed(0)
    samples = ev.sample_completions(policy, [prompt], 4000, L, batch_size=1000, generator=gen, eos_id=-1)
    assert len(samples) == 4000 and all(len(y) == L for y in samples)
    mc = ev.sequence_kl(policy, reference, [prompt] * len(samples), samples, batch_size=1000)
    mean, se = ev.mean_se(mc)
    assert abs(mean - exact) < 4 * se, (mean, se, exact)  # (b)


def test_sample_completions_order_and_eos():
    """Prompt-major order (greedy decoding makes each prompt's rows identical), EOS kept and nothing after
    it, lengths at most max_new_tokens, samples fixed by the generator."""
    model = tiny_gpt(2, block_size=16, std=0.5)
    prompts = [[1], [2, 3, 4]]
    greedy = ev.sample_completions(model, prompts, 3, 6, batch_size=4, temperature=0.0, eos_id=-1)
    assert greedy[0] != greedy[3]  # precondition: this model's greedy completion depends on the prompt
    assert greedy[0] == greedy[1] == greedy[2] and greedy[3] == greedy[4] == greedy[5]
    assert greedy[0] == ev.sample_completions(model, prompts[:1], 1, 6, temperature=0.0, eos_id=-1)[0]
    assert greedy[3] == ev.sample_completions(model, prompts[1:], 1, 6, temperature=0.0, eos_id=-1)[0]
    out = ev.sample_completions(model, prompts, 3, 6, batch_size=4, generator=torch.Generator().manual_seed(0), eos_id=0)
    assert len(out) == 6
    for y in out:
        assert 1 <= len(y) <= 6
        assert 0 not in y[:-1] and (len(y) == 6 or y[-1] == 0)  # stops at the first EOS (id 0 here), keeps it
    again = ev.sample_completions(model, prompts, 3, 6, batch_size=4, generator=torch.Generator().manual_seed(0), eos_id=0)
    assert again == out


# ----------------------------------------------------------------------------------------------
# Losses of sft.py

def test_lm_loss_equals_cross_entropy_and_train_lm_reports_it():
    """lm_loss == F.cross_entropy on the full logits; train_lm's first reported loss is that of its first batch."""
    model = tiny_gpt(0, vocab_size=50, block_size=16, std=0.3)
    tokens = torch.randint(0, 50, (500,), generator=torch.Generator().manual_seed(1))
    windows = sft.random_windows(tokens, 4, 16, torch.Generator().manual_seed(7))  # (4, 16)
    logits = model(windows)  # (4, 16, 50)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 50), windows[:, 1:].reshape(-1))
    torch.testing.assert_close(sft.lm_loss(model, windows), expected, atol=1e-5, rtol=1e-5)
    losses = sft.train_lm(model, tokens, steps=3, batch_size=4, seq_len=16, lr=1e-2, warmup=1,
                          generator=torch.Generator().manual_seed(7), log=lambda s: None)
    assert len(losses) == 3
    assert abs(losses[0] - expected.item()) < 1e-5


def test_random_windows_are_contiguous_slices():
    tokens = torch.arange(100)
    w = sft.random_windows(tokens, 8, 10, torch.Generator().manual_seed(0))
    assert w.shape == (8, 10)
    assert torch.equal(w[:, 1:] - w[:, :-1], torch.ones(8, 9, dtype=torch.long))
    assert w.max().item() <= 99


def test_review_tokens_put_eos_before_each_review():
    ids = sft.review_tokens([{"text": "Great film."}, "Bad."])
    assert ids.dtype == torch.long
    assert ids.tolist() == [data.EOS] + data.encode("Great film.") + [data.EOS] + data.encode("Bad.")


def test_lr_schedule_warmup_then_cosine_to_ten_percent():
    lrs = [sft.lr_at(s, 100, 1.0, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


def test_init_unigram_bias_starts_at_the_unigram_model():
    """After init the loss is close to the unigram entropy of the stream, far below log V."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=60, block_size=16, n_layer=1, n_head=2, n_embd=16, tie_word_embeddings=False))
    tokens = torch.multinomial(torch.tensor([50.0, 20, 10, 5] + [0.1] * 56), 2000, replacement=True,
                               generator=torch.Generator().manual_seed(0))
    before = sft.eval_lm(model, tokens, seq_len=16)
    sft.init_unigram_bias(model, tokens)
    after = sft.eval_lm(model, tokens, seq_len=16)
    counts = torch.bincount(tokens, minlength=60).double() + 1
    p = counts / counts.sum()
    unigram_entropy = -(p * p.log()).sum().item()
    assert before > math.log(60) - 0.1
    assert abs(after - unigram_entropy) < 0.15, (after, unigram_entropy)
    with pytest.raises(ValueError):
        sft.init_unigram_bias(tiny_gpt(0), tokens)  # tied head


def test_nll_loss_counts_completion_tokens_only():
    """Preferred-FT loss = mean_i -[log p(x_i + y_i) - log p(x_i)]: the chain rule removes the prompt
    tokens. Prompts of different lengths exercise the left padding."""
    model = tiny_gpt(3, vocab_size=11, block_size=16, std=0.3)
    prompts = [[10, 4, 5], [10], [10, 7, 7, 7, 2]]
    completions = [[1, 2, 3], [4, 0], [9]]
    loss, stats = sft.sequence_loss(model, prompts, completions, "nll")
    with torch.no_grad():
        ref = [full_logps(model, p + c).sum() - full_logps(model, p).sum() for p, c in zip(prompts, completions)]
    torch.testing.assert_close(stats["chosen_logps"].double(), torch.stack(ref), atol=1e-5, rtol=0)
    torch.testing.assert_close(loss.double(), -torch.stack(ref).mean(), atol=1e-5, rtol=0)
    # changing the completion changes the loss; the prompt counts only as context
    loss2, _ = sft.sequence_loss(model, prompts, [[1, 2, 4], [4, 0], [9]], "nll")
    assert abs(loss2.item() - loss.item()) > 1e-4


def test_unlikelihood_loss_matches_slow_loop_with_explicit_softmax():
    """L = mean_i -[log p(y_w) + alpha * sum_t log(1 - p(y_l,t))], value and gradient."""
    prompts = [[10, 4], [10, 1, 1, 8]]
    chosen, rejected = [[1, 2, 3], [4]], [[5, 6], [7, 7, 0, 3]]
    alpha = 0.7
    model = tiny_gpt(4, vocab_size=11, block_size=16, std=0.3)
    model.requires_grad_(True)
    loss, stats = sft.sequence_loss(model, prompts, chosen, "unlikelihood", rejected=rejected, alpha=alpha)
    loss.backward()
    fast_grad = model.wte.weight.grad.clone()

    slow = tiny_gpt(4, vocab_size=11, block_size=16, std=0.3)
    slow.requires_grad_(True)
    total = 0.0
    for x, yw, yl in zip(prompts, chosen, rejected):
        logp_w = 0.0
        for t in range(len(yw)):
            seq = x + yw[:t]
            probs = torch.softmax(slow(torch.tensor([seq]))[0, -1].double(), -1)
            logp_w = logp_w + torch.log(probs[yw[t]])
        unlike = 0.0
        for t in range(len(yl)):
            seq = x + yl[:t]
            probs = torch.softmax(slow(torch.tensor([seq]))[0, -1].double(), -1)
            unlike = unlike + torch.log(1 - probs[yl[t]])
        total = total - (logp_w + alpha * unlike)
    slow_loss = total / len(prompts)
    slow_loss.backward()
    assert abs(loss.item() - slow_loss.item()) < 1e-5
    torch.testing.assert_close(fast_grad, slow.wte.weight.grad, atol=1e-5, rtol=1e-4)
    assert stats["rejected_logps"].shape == (2,)


def test_log1m_exp_is_finite_and_accurate():
    x = torch.tensor([-30.0, -5.0, -0.7, -0.69, -1e-3, -1e-8, 0.0], dtype=torch.float64, requires_grad=True)
    y = sft.log1m_exp(x)
    assert torch.isfinite(y).all()
    exact = torch.log(1 - torch.exp(x[:5].detach()))
    torch.testing.assert_close(y[:5].detach(), exact, rtol=1e-5, atol=1e-12)
    assert y[-1].item() == pytest.approx(math.log(1e-6), rel=1e-3)  # p = 1 is clamped, not -inf
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    # float32 near p = 0 and p = 1: log(-expm1(x)) for x near 0, log1p(-exp(x)) far below
    x32 = torch.tensor([-1e-5, -1e-3, -20.0])
    exact32 = torch.log(-torch.expm1(x32.double()))
    torch.testing.assert_close(sft.log1m_exp(x32).double(), exact32, rtol=1e-5, atol=1e-12)


def test_train_sequences_lowers_the_loss_and_validates_arguments():
    model = tiny_gpt(5, vocab_size=11, block_size=16)
    model.requires_grad_(True)
    prompts, completions = [[10, 1], [10, 2]] * 4, [[3, 4, 0], [5, 6, 0]] * 4
    seen = []  # the callback runs after every step, with the model as trained so far
    losses = sft.train_sequences(model, prompts, completions, epochs=15, batch_size=4, lr=3e-2, warmup=1,
                                 generator=torch.Generator().manual_seed(0), log=lambda s: None,
                                 callback=lambda step, m: seen.append((step, m is model)))
    assert len(losses) == 30 and seen == [(step, True) for step in range(1, 31)]
    assert losses[-1] < 0.5 * losses[0]
    with pytest.raises(ValueError):
        sft.train_sequences(model, prompts, completions, steps=1, epochs=1, log=lambda s: None)
    with pytest.raises(ValueError):
        sft.sequence_loss(model, prompts, completions, "unlikelihood")  # no rejected


# ----------------------------------------------------------------------------------------------
# The reward classifier

def synthetic_reviews(n, seed):
    """10 random filler tokens from 100..119 plus token 5 (positive) or token 6 (negative) at a random place."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        label = i % 2
        ids = torch.randint(100, 120, (10,), generator=g).tolist()
        ids.insert(int(torch.randint(0, 11, (1,), generator=g)), 5 if label else 6)
        out.append({"ids": ids, "label": label})
    return out


def test_classifier_learns_synthetic_task_and_round_trips(tmp_path):
    train, test = synthetic_reviews(400, 0), synthetic_reviews(200, 1)
    clf = ev.train_classifier(train, epochs=20, batch_size=50, vocab_size=400, log=None)
    assert ev.accuracy(clf, test) == 1.0
    s = clf.score([[5, 101, data.EOS], [6, 101], [data.EOS]])  # (3,)  # EOS is ignored; an empty bag gives sigmoid(b)
    assert s[0] > 0.9 and s[1] < 0.1
    assert s[2].item() == pytest.approx(torch.sigmoid(clf.bias).item())
    path = str(tmp_path / "clf" / "classifier.pt")
    clf.save(path)
    loaded = ev.BowClassifier.load(path)
    assert torch.equal(loaded.score([r["ids"] for r in test]), clf.score([r["ids"] for r in test]))
    assert not any(p.requires_grad for p in loaded.parameters())


def test_classifier_bags_and_score_by_hand():
    """P(positive) = sigmoid(b + mean of w over the DISTINCT tokens, EOS dropped)."""
    flat, offsets = ev.bags([[3, 3, 2, data.EOS], [], [7]])
    assert flat.tolist() == [2, 3, 7] and offsets.tolist() == [0, 2, 2]
    clf = ev.BowClassifier(10)
    with torch.no_grad():
        clf.weight.copy_(torch.arange(10.0) / 10)
        clf.bias.fill_(-0.1)
    expected = torch.sigmoid(torch.tensor([-0.1 + (0.3 + 0.2) / 2, -0.1, -0.1 + 0.7]))
    torch.testing.assert_close(clf.score([[3, 3, 2, data.EOS], [], [7]]), expected)


def test_evaluate_reports_reward_and_zero_kl_for_the_reference():
    model = tiny_gpt(6, vocab_size=400, block_size=16)
    clf = ev.train_classifier(synthetic_reviews(100, 0), epochs=2, batch_size=50, vocab_size=400, log=None)
    gen = torch.Generator().manual_seed(0)
    res = ev.evaluate(model, model, clf, [[1, 5], [1, 6]], n_samples=3, max_new_tokens=4,
                      generator=gen, n_show=2)
    assert res["n"] == 6 and res["kl"] == 0.0 and 0 < res["reward"] < 1 and res["reward_se"] > 0
    assert len(res["samples"]) == 2 and set(res["samples"][0]) == {"prompt", "completion", "reward", "kl"}
    other = tiny_gpt(7, vocab_size=400, block_size=16, std=0.5)
    res2 = ev.evaluate(other, model, clf, [[1, 5]], n_samples=8, max_new_tokens=4, generator=gen)
    assert res2["kl"] > 0


# ----------------------------------------------------------------------------------------------
# Tables and plots

ROWS = [{"method": "SFT", "reward": 0.53, "reward_se": 0.02, "kl": 0.0, "kl_se": 0.0, "samples": [{"prompt": "a"}]},
        {"method": "DPO", "beta": 0.1, "reward": 0.79, "reward_se": 0.015, "kl": 3.5, "kl_se": 0.2},
        {"method": "DPO", "beta": 0.5, "reward": 0.69, "reward_se": 0.018, "kl": 0.9, "kl_se": 0.1},
        {"method": "Preferred-FT", "reward": 0.59, "reward_se": 0.02, "kl": 0.6, "kl_se": 0.05},
        {"method": "Unlikelihood", "alpha": 0.5, "reward": 0.6, "reward_se": 0.02, "kl": 2.0, "kl_se": 0.3}]


def test_write_table(tmp_path):
    ev.write_table(ROWS, str(tmp_path / "t" / "frontier.csv"), str(tmp_path / "t" / "frontier.json"))
    with open(tmp_path / "t" / "frontier.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["method", "reward", "reward_se", "kl", "kl_se", "beta", "alpha"]
    assert len(table) == 5 and table[1]["beta"] == "0.1" and table[0]["beta"] == ""
    with open(tmp_path / "t" / "frontier.json") as f:
        assert json.load(f) == ROWS


def test_plots_write_png_files(tmp_path):
    png = tmp_path / "frontier.png"
    ev.plot_frontier(ROWS, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    metrics = tmp_path / "metrics.jsonl"
    with open(metrics, "w") as f:
        for step in range(1, 21):
            rec = {"step": step, "loss": 0.69 - 0.01 * step, "rewards/margins": 0.05 * step,
                   "rewards/accuracies": min(1.0, 0.5 + 0.03 * step)}
            if step % 5 == 0:
                rec["eval/loss"] = 0.7 - 0.01 * step
            f.write(json.dumps(rec) + "\n")
    curves = tmp_path / "curves.png"
    ev.plot_training_curves(str(metrics), str(curves))
    assert curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and curves.stat().st_size > 5000


# ----------------------------------------------------------------------------------------------
# Real data

IMDB = os.environ.get("DPO_IMDB") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "data",
                                                   "aclImdb_v1.tar.gz")


@pytest.mark.skipif(not os.path.exists(IMDB), reason=f"IMDb data not found at {IMDB}: set DPO_IMDB to "
                                                     f"aclImdb_v1.tar.gz")
def test_classifier_on_imdb_reaches_85_percent():
    """Bag-of-tokens logistic regression, trained on the 25,000 train reviews, on every 5th test review
    (5,000, balanced). The full test split gives ~88%; the subset keeps the tokenisation time down."""
    t0 = time.time()
    train, test = data.read_imdb("train", IMDB), data.read_imdb("test", IMDB)[::5]
    clf = ev.train_classifier(train, epochs=10, log=None)
    acc = ev.accuracy(clf, test)
    assert acc >= 0.85, acc
    print(f"IMDb classifier: accuracy {acc:.4f} on {len(test)} test reviews, {time.time() - t0:.1f} s in all")


def test_command_lines_parse_their_dataclasses():
    """sft.py, eval.py and dpo.py share one flag builder (model.parse_args): defaults, typed values, --no-flags."""
    import dpo
    import eval as ev
    import sft
    assert sft.parse_args([]) == sft.TrainConfig()
    cfg = sft.parse_args(["--tokens", "1000", "--lr", "1e-4", "--init", "gpt2"])
    assert (cfg.tokens, cfg.lr, cfg.init) == (1000, 1e-4, "gpt2")
    assert ev.parse_args(["--prompts", "8", "--temperature", "0.7"]) == ev.EvalConfig(prompts=8, temperature=0.7)
    d = dpo.parse_args(["--no-share-prompt", "--beta", "0.2", "--precompute-ref"])
    assert (d.share_prompt, d.beta, d.precompute_ref) == (False, 0.2, True)
    assert dpo.parse_args([]).share_prompt is True


def test_ranks_and_correlations_by_hand():
    assert ev.ranks([3.0, 1.0, 3.0, 2.0]).tolist() == [3.5, 1.0, 3.5, 2.0]  # the tied 3s share ranks 3 and 4
    # Spearman by the textbook formula for untied data: 1 - 6 sum d^2 / (n (n^2 - 1)) = 1 - 6 * 2 / 60 = 0.8
    x, y = [1.0, 2.0, 3.0, 4.0], [10.0, 30.0, 20.0, 40.0]
    assert abs(ev.pearson(ev.ranks(x), ev.ranks(y)) - 0.8) < 1e-12
    a, b = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    b = a + b  # correlated; Pearson against numpy's corrcoef
    assert abs(ev.pearson(a, b) - float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 1e-12


def test_implicit_reward_stats_by_hand_and_blind_to_a_prompt_shift():
    true = torch.tensor([[0.1, 0.5, 0.9], [0.2, 0.2, 0.8]], dtype=torch.float64)  # 2 prompts x 3 samples
    implicit = torch.tensor([[1.0, 2.0, 0.0], [5.0, 5.0, 7.0]], dtype=torch.float64)
    # prompt 0: pairs (0,1) agree, (0,2) and (1,2) disagree; prompt 1: (0,1) tied in r* (not counted), (0,2) and
    # (1,2) agree: 3 of 5
    stats = ev.implicit_reward_stats(implicit.flatten(), true.flatten(), 3)
    assert abs(stats["accuracy"] - 0.6) < 1e-12
    centred = lambda t: (t - t.mean(-1, keepdim=True)).flatten()  # noqa: E731
    assert abs(stats["pearson_within"] - ev.pearson(centred(implicit), centred(true))) < 1e-12
    assert abs(stats["pearson"] - ev.pearson(implicit.flatten(), true.flatten())) < 1e-12
    tied = ev.implicit_reward_stats(torch.tensor([1.0, 2.0, 0.0, 5.0, 5.0, 5.0]), true.flatten(), 3)
    assert abs(tied["accuracy"] - 0.4) < 1e-12  # prompt 1's two counted pairs tie in the implicit reward: a half each
    # Theorem 1: the implicit reward is defined up to f(x); a per-prompt shift leaves the within-prompt numbers alone
    shifted = ev.implicit_reward_stats((implicit + torch.tensor([[100.0], [-50.0]])).flatten(), true.flatten(), 3)
    assert shifted["accuracy"] == stats["accuracy"]
    assert abs(shifted["pearson_within"] - stats["pearson_within"]) < 1e-12
    assert abs(shifted["pearson"] - stats["pearson"]) > 0.1  # the raw correlation is not blind to it
