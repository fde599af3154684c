"""Evaluation for the IMDb experiment (arXiv:2305.18290, Section 6.1, Fig. 2 left): the ground-truth reward
classifier, sampling, the sequence-level KL to the reference, tables and plots.

    TIKTOKEN_CACHE_DIR=../shared/tiktoken DPO_IMDB=../shared/data/aclImdb_v1.tar.gz \\
        python eval.py --classifier runs/classifier.pt --policy runs/dpo --reference runs/sft

The paper's ground-truth reward is a sentiment classifier, r*(x, y) = P(positive | x + y). We train our
own: logistic regression on the bag of distinct GPT-2 tokens of a review (BowClassifier), trained once on
the IMDb train reviews and frozen. RobertaReward scores with the paper's own classifier instead
(siebert/sentiment-roberta-large-english; `dpo.py --task imdb --reward siebert`) when its weights can be
had. Each method is placed on the reward/KL frontier by sampling completions y ~ pi(.|x) for test prompts
x and reporting
    reward  E_{x, y~pi}[ r*(x, y) ]
    KL      E_{x, y~pi}[ log pi(y|x) - log pi_ref(y|x) ]    = E_x KL(pi(.|x) || pi_ref(.|x)), sequence level
both with standard errors over the samples.

Shape notation: N sequences, T time, V vocabulary.
"""
import csv
import dataclasses
import io
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import judge as judge_lib
from data import InputError
from machinery.fast import logps as response_logps
from machinery.hf import from_pretrained
from machinery.hub import imdb_path, resolve_checkpoint
from machinery.roberta import RobertaClassifier
from machinery.tokenizers import hub_file, roberta_ids_from_gpt2
from machinery.util import Progress, field
from machinery.util import parse_args as util_parse_args


# ----------------------------------------------------------------------------------------------
# The ground-truth reward: a bag-of-tokens sentiment classifier

class BowClassifier(nn.Module):
    """Logistic regression on the set of distinct tokens of a text (EOS excluded):
        P(positive | text) = sigmoid(b + mean_{u in U(text)} w_u),   U(text) = distinct token ids
    The mean (not the sum) keeps short texts (prompt + 32 tokens) and whole reviews on one scale."""

    def __init__(self, vocab_size=50257):
        super().__init__()
        self.vocab_size = vocab_size
        self.weight = nn.Parameter(torch.zeros(vocab_size))  # (V,) w_u
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, flat_ids, offsets):
        """Logits (N,) for N bags given as one flat id tensor (M,) and the start offset of each bag (N,),
        the layout of nn.EmbeddingBag (whose backward sorts all M ids: 10x slower here than index_add)."""
        lengths = torch.diff(offsets, append=torch.tensor([len(flat_ids)]))  # (N,)
        bag = torch.repeat_interleave(torch.arange(len(offsets)), lengths)  # (M,) the bag of each id
        sums = torch.zeros(len(offsets)).index_add(0, bag, self.weight.index_select(0, flat_ids))  # (N,)
        return sums / lengths.clamp(min=1) + self.bias  # (N,)

    @torch.no_grad()
    def score(self, token_lists):
        """P(positive) for each token list: (N,) float32 tensor. Token ids >= vocab_size are ignored."""
        return torch.sigmoid(self(*bags(token_lists, self.vocab_size)))

    def save(self, path):
        """torch.save of a small dict, atomically (temporary file, then rename)."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        torch.save({"vocab_size": self.vocab_size, "weight": self.weight.detach().cpu(),
                    "bias": self.bias.detach().cpu()}, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            clf = cls(state["vocab_size"])
            with torch.no_grad():
                clf.weight.copy_(state["weight"])
                clf.bias.copy_(state["bias"])
        except (OSError, RuntimeError, KeyError, TypeError) as e:
            raise InputError(f"{path}: not a classifier saved by eval.py ({type(e).__name__}: {e}); "
                             f"delete it and run eval.py --classifier {path} to train one") from None
        return clf.eval().requires_grad_(False)  # frozen: the ground-truth reward never changes


def bags(token_lists, vocab_size=50257):
    """The distinct tokens of each list (EOS and ids >= vocab_size dropped) as one flat int64 tensor plus
    the offset of each bag (N,), the input format of nn.EmbeddingBag. An empty bag scores sigmoid(b)."""
    return _concat([_bag(ids, vocab_size) for ids in token_lists])


def _bag(ids, vocab_size):
    ids = torch.unique(torch.as_tensor(ids, dtype=torch.long))  # sorted distinct ids
    return ids[(ids != data.EOS) & (ids >= 0) & (ids < vocab_size)]


def _concat(bag_list):
    lengths = torch.tensor([0] + [len(b) for b in bag_list[:-1]], dtype=torch.long)
    flat = torch.cat(bag_list) if bag_list else torch.zeros(0, dtype=torch.long)
    return flat, lengths.cumsum(0)


def _review_ids(review):
    return review["ids"] if "ids" in review else data.encode(review["text"])


def train_classifier(reviews, epochs=10, lr=0.1, batch_size=500, vocab_size=50257, generator=None, log=print):
    """Fits a BowClassifier by minimising the logistic loss mean_i BCE(sigmoid(logit_i), label_i) with Adam.

    reviews: dicts with "label" (1 positive, 0 negative) and "ids" (token list) or "text" (encoded here).
    Batches are reshuffled every epoch with `generator`. Returns the classifier, frozen."""
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    review_bags = [_bag(_review_ids(r), vocab_size) for r in reviews]  # computed once
    labels = torch.tensor([float(r["label"]) for r in reviews])  # (N,)
    clf = BowClassifier(vocab_size)
    opt = torch.optim.Adam(clf.parameters(), lr=lr)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ops of ~1e5 elements: thread start-up and barriers cost more than the work
    try:                      # (10x slower with 2 threads when another process shares the cores)
        for epoch in range(epochs):
            order = torch.randperm(len(review_bags), generator=generator).tolist()
            total = 0.0
            for s in range(0, len(order), batch_size):
                idx = order[s:s + batch_size]
                logits = clf(*_concat([review_bags[i] for i in idx]))  # (N,)
                loss = F.binary_cross_entropy_with_logits(logits, labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
            if log:
                log(f"classifier epoch {epoch + 1}/{epochs} | loss {total / len(order):.4f}")
    finally:
        torch.set_num_threads(threads)
    return clf.eval().requires_grad_(False)


def accuracy(classifier, reviews):
    """Fraction of reviews (dicts with "label" and "ids" or "text") whose label the classifier gets right."""
    scores = classifier.score([_review_ids(r) for r in reviews])  # (N,)
    labels = torch.tensor([r["label"] for r in reviews])
    return ((scores > 0.5).long() == labels).float().mean().item()


# ----------------------------------------------------------------------------------------------
# The paper's ground-truth reward: a RoBERTa sentiment classifier, with BowClassifier's interface

SIEBERT = "siebert/sentiment-roberta-large-english"  # the classifier the paper uses for IMDb


class RobertaReward:
    """P(positive | text) from a RoBERTa sequence classifier (the paper's: SIEBERT), as a frozen reward with
    BowClassifier's interface: score(token_lists) -> (N,) float32.

    RoBERTa's BPE is GPT-2's with other ids, so GPT-2 tokens become RoBERTa input by a table
    (machinery.tokenizers.roberta_ids_from_gpt2). Each token list is first decoded to text (EOS dropped) and
    re-encoded: a sampled token sequence need not be the BPE of its own text, and the classifier was trained on
    the latter, as its tokenizer would give it. Rows are scored in batches of similar length (sorted), at most max_len
    tokens each (<s> and </s> included; longer texts keep their start)."""

    def __init__(self, model, vocab_json, positive, batch_size=32, max_len=512):
        self.model = model.eval().requires_grad_(False)
        self.vocab_json, self.positive, self.batch_size, self.max_len = vocab_json, positive, batch_size, max_len

    @classmethod
    def load(cls, name_or_dir=SIEBERT, device="cpu", dtype=torch.float32, batch_size=32):
        """From a folder or hub name with config.json, the weights and vocab.json; a hub model is downloaded once
        into model.resolve_checkpoint's cache folder. InputError when the files cannot be had (offline)."""
        folder = resolve_checkpoint(name_or_dir)
        try:
            vocab_json = hub_file(name_or_dir, "vocab.json")
        except FileNotFoundError:
            raise InputError(f"{name_or_dir}: no vocab.json (RoBERTa's token ids) beside the weights; "
                             f"copy it from the model's hub page into {folder}") from None
        model = from_pretrained(folder, dtype=dtype, device=device)
        if not isinstance(model, RobertaClassifier):
            raise InputError(f"{name_or_dir}: config.json model_type {model.config.model_type!r} is not a RoBERTa "
                             f"sequence classifier (roberta); pass one such as {SIEBERT}")
        max_len = min(512, model.config.block_size - model.config.pos_offset)  # RoBERTa: 514 - 2
        return cls(model, vocab_json, positive_label(os.path.join(folder, "config.json")), batch_size, max_len)

    @torch.no_grad()
    def score(self, token_lists):
        """P(positive) for each GPT-2 token list: (N,) float32 tensor. EOS and ids >= 50257 are ignored."""
        ids = [data.encode(data.decode([t for t in row if 0 <= t < data.EOS])) for row in token_lists]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        device = next(self.model.parameters()).device
        out = torch.zeros(len(ids))  # (N,)
        for s in range(0, len(order), self.batch_size):
            rows = order[s:s + self.batch_size]
            input_ids, mask = roberta_ids_from_gpt2([ids[i] for i in rows], self.vocab_json, self.max_len)  # (b, T)
            logits = self.model.classify(input_ids.to(device), mask.to(device)).float()  # (b, num_labels)
            p = logits[:, 0].sigmoid() if logits.size(1) == 1 else logits.softmax(-1)[:, self.positive]  # (b,)
            out[rows] = p.cpu()
        return out


def positive_label(config_json):
    """The index of the positive class in a Hugging Face config.json's id2label: "POSITIVE" (or "POS"), else
    "LABEL_1" of an unnamed pair of labels."""
    try:
        with open(config_json) as f:
            names = {int(k): str(v).upper() for k, v in (json.load(f).get("id2label") or {}).items()}
    except (OSError, ValueError, AttributeError) as e:
        raise InputError(f"{config_json}: cannot read id2label ({e}); copy config.json from the model's hub page") from None
    for want in ("POSITIVE", "POS", "LABEL_1"):
        if want in names.values():
            return min(i for i, n in names.items() if n == want)
    raise InputError(f"{config_json}: no positive class among the labels {sorted(names.values())}; "
                     f"the reward needs a sentiment classifier with a POSITIVE label")


# ----------------------------------------------------------------------------------------------
# Prompts, sampling and the sequence-level KL

def imdb_prompts(reviews, n, min_len=2, max_len=8, generator=None):
    """The paper's IMDb prompts: a prefix of a review, here [EOS] + its first k tokens with k uniform in
    [min_len, max_len] (EOS marks a review's start, as in sft.review_tokens). Takes n reviews at random."""
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    order = torch.randperm(len(reviews), generator=generator)[:n].tolist()
    lengths = torch.randint(min_len, max_len + 1, (len(order),), generator=generator).tolist()
    return [[data.EOS] + _review_ids(reviews[i])[:k] for i, k in zip(order, lengths)]


@torch.no_grad()
def sample_completions(model, prompts, n_per_prompt, max_new_tokens, batch_size=64, generator=None,
                       temperature=1.0, top_k=None, top_p=None, eos_id=data.EOS):
    """n_per_prompt completions of every prompt, sampled with model.generate (KV cache) in batches.
    Returns a list of len(prompts) * n_per_prompt token lists, prompt-major (the completions of prompt i
    are items i*n_per_prompt ... i*n_per_prompt + n_per_prompt - 1). Each ends at its first eos_id (kept)
    or after max_new_tokens. `generator` must live on the model's device."""
    was_training = model.training
    model.eval()
    rows = [list(p) for p in prompts for _ in range(n_per_prompt)]
    out = []
    bar = Progress(len(rows), label="sample", unit="seq")
    for s in range(0, len(rows), batch_size):
        tokens, mask = model.generate(rows[s:s + batch_size], max_new_tokens, temperature=temperature, top_k=top_k,
                                      top_p=top_p, eos_id=eos_id, generator=generator)  # (N, n), (N, n)
        lengths = mask.sum(-1).tolist()  # the mask is 1 on a prefix of each row: the tokens up to EOS
        out.extend(row[:k] for row, k in zip(tokens.tolist(), lengths))
        bar.update(len(lengths))
    bar.close()
    model.train(was_training)
    return out


def batch_completion_logps(model, prompts, completions):
    """log pi(y|x) = sum_t log pi(y_t | x, y_<t) over the completion tokens of each (prompt, completion), one
    batch, with gradients: (N,) float32. Rows are left-padded by data.left_pad with id 0 (masked; 0 exists in
    every vocabulary, unlike EOS in a test model), so each completion is the last len(y) columns of its row."""
    device = model.wte.weight.device
    input_ids, attention_mask = data.left_pad([list(p) + list(c) for p, c in zip(prompts, completions)], pad_id=0)
    lengths = torch.tensor([len(c) for c in completions])  # (N,)
    target_mask = torch.arange(input_ids.size(1)) >= input_ids.size(1) - lengths[:, None]  # (N, T)
    logps = response_logps(model, input_ids.to(device), target_mask.to(device), attention_mask.to(device))  # (N, T)
    return logps.sum(-1)  # logps is 0 off the target positions


@torch.no_grad()
def completion_logps(model, prompts, completions, batch_size=64):
    """batch_completion_logps over any number of sequences, in batches, without gradients: (N,) on the CPU."""
    model_was_training = model.training
    model.eval()
    out = [batch_completion_logps(model, prompts[s:s + batch_size], completions[s:s + batch_size]).cpu()
           for s in range(0, len(prompts), batch_size)]
    model.train(model_was_training)
    return torch.cat(out) if out else torch.zeros(0)


def sequence_kl(policy, reference, prompts, completions, batch_size=64):
    """Per-sample log-ratio over the completion tokens: (N,) float32,
        k(x, y) = sum_t [log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)] = log pi(y|x) - log pi_ref(y|x).
    For completions sampled from the POLICY, E_{y~pi}[k(x, y)] = KL(pi(.|x) || pi_ref(.|x)) (sequence level),
    so the mean over the policy's own samples is an unbiased estimate of the paper's KL (single samples
    can be negative; the expectation cannot)."""
    return (completion_logps(policy, prompts, completions, batch_size)
            - completion_logps(reference, prompts, completions, batch_size))


def mean_se(x):
    """Mean and standard error of the mean of a 1-D tensor."""
    x = torch.as_tensor(x, dtype=torch.float64)
    se = x.std(unbiased=True).item() / math.sqrt(len(x)) if len(x) > 1 else float("nan")
    return x.mean().item(), se


def evaluate(policy, reference, classifier, prompts, n_samples, max_new_tokens, generator, batch_size=64,
             temperature=1.0, n_show=3):
    """Samples n_samples completions per prompt from the policy and scores them.

    Returns {"reward", "reward_se", "kl", "kl_se", "length", "n", "samples"}: reward = mean of
    classifier P(positive | prompt + completion), kl = mean of sequence_kl on the same samples (0 when
    policy is reference), both with standard errors over the N = len(prompts) * n_samples samples; length =
    mean completion tokens; samples = the first n_show as decoded {"prompt", "completion", "reward", "kl"}."""
    completions = sample_completions(policy, prompts, n_samples, max_new_tokens, batch_size, generator, temperature)
    rows = [list(p) for p in prompts for _ in range(n_samples)]
    rewards = classifier.score([p + c for p, c in zip(rows, completions)])  # (N,)
    kls = torch.zeros(len(rows)) if policy is reference else sequence_kl(policy, reference, rows, completions, batch_size)
    reward, reward_se = mean_se(rewards)
    kl, kl_se = mean_se(kls)
    samples = [{"prompt": data.decode([t for t in p if t != data.EOS]), "completion": data.decode(c),
                "reward": round(rewards[i].item(), 4), "kl": round(kls[i].item(), 4)}
               for i, (p, c) in enumerate(zip(rows[:n_show], completions[:n_show]))]
    return {"reward": reward, "reward_se": reward_se, "kl": kl, "kl_se": kl_se,
            "length": sum(map(len, completions)) / max(1, len(completions)), "n": len(rows), "samples": samples}


# ----------------------------------------------------------------------------------------------
# "Your language model is secretly a reward model" (Section 5.1), measured: how well a policy's implicit
# reward beta * log pi(y|x)/pi_ref(y|x) tracks the ground-truth one on samples it was not trained on

def ranks(x):
    """Ranks 1..N of a 1-D tensor (float64), tied values sharing their mean rank, as Spearman's correlation uses them."""
    x = torch.as_tensor(x, dtype=torch.float64)
    r = torch.empty_like(x)
    r[torch.argsort(x, stable=True)] = torch.arange(1, len(x) + 1, dtype=torch.float64)
    _, tie = torch.unique(x, return_inverse=True)  # tie[i]: which distinct value x[i] is
    mean_rank = torch.zeros(int(tie.max()) + 1, dtype=torch.float64).index_add_(0, tie, r) / torch.bincount(tie)
    return mean_rank[tie]


def pearson(x, y):
    """Pearson's correlation of two 1-D tensors (float64)."""
    x, y = (torch.as_tensor(v, dtype=torch.float64) for v in (x, y))
    x, y = x - x.mean(), y - y.mean()
    return ((x * y).sum() / (x.norm() * y.norm())).item()


def implicit_reward_stats(implicit, true, n_per_prompt):
    """Agreement of an implicit reward with the true one on n_per_prompt samples of each prompt (prompt-major,
    as sample_completions returns them): a dict of
        pearson, spearman   over all samples
        pearson_within      after subtracting each prompt's mean from both: Theorem 1 makes the implicit reward
                            r(x, y) + f(x), a prompt-only shift that carries no preference (Lemma 1), so only
                            differences between one prompt's samples are meaningful
        accuracy            of the pairs of one prompt's samples whose true rewards differ, the fraction the
                            implicit reward orders the same way (an implicit tie counts a half)"""
    implicit = torch.as_tensor(implicit, dtype=torch.float64).view(-1, n_per_prompt)  # (prompts, n)
    true = torch.as_tensor(true, dtype=torch.float64).view(-1, n_per_prompt)  # (prompts, n)
    centred = [(t - t.mean(-1, keepdim=True)).flatten() for t in (implicit, true)]
    i, j = torch.triu_indices(n_per_prompt, n_per_prompt, 1)  # every pair of one prompt's samples
    d_true, d_implicit = true[:, i] - true[:, j], implicit[:, i] - implicit[:, j]  # (prompts, pairs)
    agree = (torch.sign(d_implicit) == torch.sign(d_true)).double() + 0.5 * (d_implicit == 0)
    return {"pearson": pearson(implicit.flatten(), true.flatten()),
            "spearman": pearson(ranks(implicit.flatten()), ranks(true.flatten())),
            "pearson_within": pearson(*centred), "accuracy": agree[d_true != 0].mean().item()}


def plot_implicit_reward(implicit, true, n_per_prompt, path_png, title):
    """Two scatter plots of implicit against true reward: as they are, and with each prompt's mean subtracted."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    implicit = torch.as_tensor(implicit, dtype=torch.float64).view(-1, n_per_prompt)
    true = torch.as_tensor(true, dtype=torch.float64).view(-1, n_per_prompt)
    stats = implicit_reward_stats(implicit, true, n_per_prompt)
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, centre, name in ((axes[0], False, f"Pearson {stats['pearson']:.2f}, Spearman {stats['spearman']:.2f}"),
                             (axes[1], True, f"each prefix's mean removed: Pearson {stats['pearson_within']:.2f}")):
        x, y = ((t - t.mean(-1, keepdim=True)) if centre else t for t in (true, implicit))
        ax.scatter(x.flatten(), y.flatten(), s=5, alpha=0.4)
        ax.set_xlabel("true reward r*(x, y)" + (" - mean over x's samples" if centre else ""))
        ax.set_ylabel(r"implicit reward $\beta \log \pi/\pi_{\mathrm{ref}}$" + (" - mean" if centre else ""))
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    _save_figure(fig, path_png, dpi=110)


# ----------------------------------------------------------------------------------------------
# Tables and plots

def _atomic_write(path, text):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", newline="") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def _save_figure(fig, path, dpi):
    """Write a matplotlib figure atomically (temporary name, then rename) and close it."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path + ".tmp.png", dpi=dpi)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def write_table(rows, path_csv, path_json):
    """rows: list of dicts, e.g. {"method": "DPO", "beta": 0.1, "reward": ..., "reward_se": ..., "kl": ...}.
    The CSV has one column per scalar key (in order of first appearance; nested values such as "samples"
    go to the JSON only); the JSON holds the rows as given."""
    columns = []
    for row in rows:
        columns += [k for k, v in row.items() if k not in columns and not isinstance(v, (list, dict))]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _atomic_write(path_csv, buf.getvalue())
    _atomic_write(path_json, json.dumps(rows, indent=2) + "\n")


STYLES = {"DPO": ("o", "tab:orange"), "Preferred-FT": ("s", "tab:green"), "Unlikelihood": ("^", "tab:blue"),
          "SFT": ("*", "black"), "PPO": ("D", "tab:purple"), "PPO-GT": ("d", "tab:pink"),
          "Best-of-N": ("X", "tab:brown"), "Best-of-N (RM)": ("x", "tab:gray"), "DPO-PL": ("P", "tab:red"),
          "Online DPO (r*)": ("h", "tab:olive"), "Online DPO (RM)": ("H", "tab:cyan")}


def _point_label(row):
    if "label" in row:
        return str(row["label"])
    for key, sym in (("beta", "β"), ("alpha", "α"), ("best_of", "N")):
        if row.get(key) is not None:
            return f"{sym}={row[key]:g}"
    return ""


def _unoverlap(fig, ax, texts, points, radius=4):
    """Moves each annotation (in order) up or down, by whole heights (+1, -1, +2, -2, ...), to the nearest place
    where its box overlaps no earlier annotation's and no marker (points: (x, y) in data units, each a square of
    2 * radius pixels)."""
    from matplotlib.transforms import Bbox
    renderer = fig.canvas.get_renderer()
    placed = [Bbox.from_extents(px - radius, py - radius, px + radius, py + radius)
              for px, py in ax.transData.transform(points)] if points else []
    for text in texts:
        x, y = text.xyann  # offset in points; boxes are in pixels
        height = text.get_window_extent(renderer).height * 72 / fig.dpi
        for k in range(41):
            text.xyann = (x, y + (k + 1) // 2 * (1 if k % 2 else -1) * height)
            if not any(text.get_window_extent(renderer).overlaps(other) for other in placed):
                break
        placed.append(text.get_window_extent(renderer))


def plot_frontier(rows, path_png, title="IMDb Sentiment Generation"):
    """Reward (y) against KL(pi || pi_ref) (x), one marker and colour per row["method"], error bars of one
    standard error: the layout of Fig. 2 (left) of the paper. The points of one run (a method and its beta or
    alpha: the checkpoints along its training; Best-of-N: its N) are joined by a thin line in the rows' order and
    labelled once, at the last point, with beta, alpha or N (a method of one run needs no label: the legend names
    it); a label that would overlap an earlier one moves down. Rows with "kl_estimate" (Best-of-N: an analytic
    upper bound on the KL) are joined by a dashed line and the legend says so."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    texts = []
    for i, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
        marker, colour = STYLES.get(method, ("v", f"C{i}"))
        runs = {}  # (beta, alpha) -> the run's rows
        for r in rows:
            if r["method"] == method:
                runs.setdefault((r.get("beta"), r.get("alpha")), []).append(r)
        bound = any("kl_estimate" in r for r in rows if r["method"] == method)
        for j, pts in enumerate(runs.values()):
            ax.errorbar([r["kl"] for r in pts], [r["reward"] for r in pts],
                        xerr=[r.get("kl_se", 0) or 0 for r in pts], yerr=[r.get("reward_se", 0) or 0 for r in pts],
                        fmt=marker, color=colour, markersize=5, capsize=2, linewidth=0.8, elinewidth=0.6,
                        linestyle="--" if bound else "-",
                        label=None if j else method + (", KL: upper bound" if bound else ""))
            text = _point_label(pts[-1]) if len(runs) > 1 or "label" in pts[-1] or bound else ""
            if text:
                texts.append(ax.annotate(text, (pts[-1]["kl"], pts[-1]["reward"]), textcoords="offset points",
                                         xytext=(5, 3), fontsize=7, color=colour, zorder=5,
                                         bbox=dict(boxstyle="square,pad=0.1", fc="white", ec="none", alpha=0.7)))
    ax.set_xlabel(r"KL($\pi\,\|\,\pi_{\mathrm{ref}}$)")  # KL(π‖π_ref), as in the paper
    ax.set_ylabel("Reward")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    _unoverlap(fig, ax, texts, [(r["kl"], r["reward"]) for r in rows])
    _save_figure(fig, path_png, dpi=120)


def _runs_of(rows, method):
    """The rows of one method grouped by run (its beta or alpha; Best-of-N: one run over N), in the rows' order."""
    runs = {}
    for r in rows:
        if r["method"] == method:
            runs.setdefault((r.get("beta"), r.get("alpha")), []).append(r)
    return runs


def plot_reward_vs_labels(rows, path_png, title="IMDb: reward against labels used"):
    """Reward (y, ± one standard error) against the labels each point consumed (x, log scale): row["reward_calls"],
    the calls of the labelling reward (r* or the learned reward model) spent to reach that checkpoint (DPO: its
    training pairs' share of the offline dataset; PPO: its rollouts; online DPO: counted; Best-of-N: N per
    prefix). Rows without reward_calls (SFT, the methods that label nothing) are left out; SFT's reward is a
    dotted line. One marker and colour per method as in plot_frontier, the points of one run joined: solid where
    the calls are of r*, dashed where they are of the learned reward model (the methods whose rows carry rm_score),
    whose own training took the labels of the offline pairs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    labelled = [r for r in rows if r.get("reward_calls")]
    proxied = {r["method"] for r in labelled if "rm_score" in r}  # labelled by the learned reward model
    for i, method in enumerate(dict.fromkeys(r["method"] for r in labelled)):
        marker, colour = STYLES.get(method, ("v", f"C{i}"))
        runs = _runs_of(labelled, method)
        for j, pts in enumerate(runs.values()):
            label = None if j else method + (" (calls of the reward model)" if method in proxied else "")
            if len(runs) > 1:
                ax.annotate(_point_label(pts[-1]), (pts[-1]["reward_calls"], pts[-1]["reward"]), fontsize=7,
                            color=colour, textcoords="offset points", xytext=(4, 2))
            ax.errorbar([r["reward_calls"] for r in pts], [r["reward"] for r in pts],
                        yerr=[r.get("reward_se", 0) or 0 for r in pts], fmt=marker + ("--" if method in proxied else "-"),
                        color=colour, markersize=5, capsize=2, linewidth=0.8, elinewidth=0.6, label=label)
    sft = next((r for r in rows if r["method"] == "SFT"), None)
    if sft:
        ax.axhline(sft["reward"], color="black", linestyle=":", linewidth=0.8, label="SFT")
    ax.set_xscale("log")
    ax.set_xlabel("labels used (reward calls: of r*, solid; of the learned reward model, dashed)")
    ax.set_ylabel("Reward (r*)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    _save_figure(fig, path_png, dpi=120)


def plot_overoptimization(rows, path_png, title="IMDb: the learned reward (proxy) and r* (true) along KL"):
    """Over-optimization of the learned reward model: for every method whose rows carry rm_score (the ones that
    climb it: PPO, Best-of-N (RM), Online DPO (RM)), the reward model's score (left panel) and r* (right) of the
    same samples against KL(pi || pi_ref), ± one standard error, each run starting from SFT's point (KL 0) when
    SFT's row has an rm_score. A proxy that keeps rising while r* falls is over-optimization (Gao et al. 2022).
    Best-of-N's KL is its analytic upper bound (dashed, as in plot_frontier)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), sharex=True)
    sft = next((r for r in rows if r["method"] == "SFT" and "rm_score" in r), None)
    scored = [r for r in rows if r["method"] != "SFT" and "rm_score" in r]
    for i, method in enumerate(dict.fromkeys(r["method"] for r in scored)):
        marker, colour = STYLES.get(method, ("v", f"C{i}"))
        for j, pts in enumerate(_runs_of(scored, method).values()):
            pts = ([sft] if sft else []) + pts
            bound = any("kl_estimate" in r for r in pts)
            for ax, key in ((left, "rm_score"), (right, "reward")):
                ax.errorbar([r["kl"] for r in pts], [r[key] for r in pts],
                            xerr=[r.get("kl_se", 0) or 0 for r in pts], yerr=[r.get(key + "_se", 0) or 0 for r in pts],
                            fmt=marker, color=colour, markersize=5, capsize=2, linewidth=0.8, elinewidth=0.6,
                            linestyle="--" if bound else "-",
                            label=None if j else method + (", KL: upper bound" if bound else ""))
    left.set_ylabel("proxy: learned reward model score")
    right.set_ylabel("true: r*")
    for ax in (left, right):
        ax.set_xlabel(r"KL($\pi\,\|\,\pi_{\mathrm{ref}}$)")
        ax.grid(alpha=0.3)
    right.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle(title)
    fig.tight_layout()
    _save_figure(fig, path_png, dpi=120)


def read_jsonl(path):
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: cannot read JSON lines ({e}); pass the metrics.jsonl a training run wrote") from None


EVAL_KEYS = {"loss": ("eval/loss",), "rewards/margins": ("eval/margin", "eval/rewards/margins"),
             "rewards/accuracies": ("eval/accuracy", "eval/rewards/accuracies")}  # held-out versions, as dpo.py logs them


def plot_training_curves(metrics_jsonl_path, png_path):
    """Loss, rewards/margins and rewards/accuracies against step, one panel each, from a JSON-lines file of
    per-step dicts ({"step", "loss", ...}); the held-out values (EVAL_KEYS, e.g. "eval/loss") are drawn as
    dots in the same panel. Panels whose key never appears are left out."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    records = read_jsonl(metrics_jsonl_path)
    panels = [k for k in EVAL_KEYS if any(k in r for r in records)]
    if not panels:
        raise InputError(f"{metrics_jsonl_path}: no {', '.join(EVAL_KEYS)} in any line; pass a training run's metrics.jsonl")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, key in zip(axes[0], panels):
        for k, style, label in [(key, "-", "train")] + [(e, "o-", "held out") for e in EVAL_KEYS[key]]:
            pts = [(r["step"], r[k]) for r in records if r.get(k) is not None]
            if pts:
                ax.plot(*zip(*pts), style, label=label, markersize=3)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        if len(ax.get_lines()) > 1:
            ax.legend()
    _save_figure(fig, png_path, dpi=110)


# ----------------------------------------------------------------------------------------------
# Command line

@dataclasses.dataclass
class EvalConfig:
    classifier: str = field("runs/classifier.pt", "reward classifier file; trained on IMDb train and saved here if absent")
    policy: str = field(None, "policy checkpoint folder (or hub name) to evaluate; none: only train/test the classifier")
    reference: str = field(None, "reference (SFT) checkpoint for the KL; default: the policy (KL 0)")
    prompts: int = field(256, "number of test-review prompts (EOS + 2-8 tokens)")
    samples: int = field(1, "completions sampled per prompt")
    max_new_tokens: int = field(32, "completion length limit")
    batch_size: int = field(64, "sequences per generate/log-prob batch")
    temperature: float = field(1.0, "sampling temperature")
    classifier_epochs: int = field(10, "epochs when training the classifier")
    curves: str = field(None, "plot this metrics.jsonl to a .png beside it")
    out: str = field(None, "write the result as JSON here (with --win-rate: the folder for judgments.jsonl, "
                           "win_rate.json and the judge's cache)")
    imdb: str = field(None, "IMDb archive or extracted folder (default: $DPO_IMDB, else download)")
    device: str = field("cpu", "cpu, cuda or mps")
    seed: int = field(0, "seed for prompts and sampling (with --win-rate: for each sample's A/B order)")
    win_rate: str = field(None, "SAMPLES.jsonl (prompt, response, baseline per line): the judge's win rate of "
                                "response over baseline, instead of the IMDb evaluation (judge.py)")
    judge: str = field("api", "--win-rate judge: api (an OpenAI-compatible chat server; key in $OPENAI_API_KEY, "
                              "not needed on localhost) or rm (an offline reward model, judge.train_rm_judge)")
    judge_url: str = field(judge_lib.DEFAULT_URL, "--judge api: the server's base URL (requests go to URL/chat/completions)")
    judge_model: str = field(None, "--judge api: the model name (e.g. gpt-4o); --judge rm: the reward-model folder")
    judge_prompt: str = field("dialogue", "the paper's judge prompt: dialogue, summarization or news (App. C.2)")
    judge_workers: int = field(4, "--judge api: requests in flight at once")
    max_judge_calls: int = field(None, "refuse a --win-rate run that needs more uncached judge calls than this")


def parse_args(argv=None):
    """EvalConfig from the command line (argv=None reads sys.argv)."""
    return util_parse_args(EvalConfig, argv, __doc__.split("\n")[0])


def run(cfg):
    torch.manual_seed(cfg.seed)
    if cfg.win_rate:
        judge_lib.main(judge_lib.JudgeConfig(
            samples=cfg.win_rate, out=cfg.out, judge=cfg.judge, model=cfg.judge_model, url=cfg.judge_url,
            prompt=cfg.judge_prompt, workers=cfg.judge_workers, max_calls=cfg.max_judge_calls, seed=cfg.seed,
            device=cfg.device))
        return
    if cfg.curves:
        png = os.path.splitext(cfg.curves)[0] + ".png"
        plot_training_curves(cfg.curves, png)
        print(f"wrote {png}")
    test = None
    if os.path.exists(cfg.classifier):
        clf = BowClassifier.load(cfg.classifier)
    else:
        t0 = time.time()
        clf = train_classifier(data.read_imdb("train", imdb_path(cfg.imdb)), epochs=cfg.classifier_epochs,
                               generator=torch.Generator().manual_seed(cfg.seed))
        train_s = time.time() - t0
        test = data.read_imdb("test", imdb_path(cfg.imdb))
        print(f"classifier: test accuracy {accuracy(clf, test):.4f} on {len(test):,} reviews | trained in {train_s:.1f} s")
        clf.save(cfg.classifier)
        print(f"saved {cfg.classifier}")
    if not cfg.policy:
        return
    policy = from_pretrained(cfg.policy, device=cfg.device).requires_grad_(False)
    reference = policy if not cfg.reference or cfg.reference == cfg.policy else \
        from_pretrained(cfg.reference, device=cfg.device).requires_grad_(False)
    prompts = imdb_prompts(test or data.read_imdb("test", imdb_path(cfg.imdb)), cfg.prompts,
                           generator=torch.Generator().manual_seed(cfg.seed))
    generator = torch.Generator(cfg.device).manual_seed(cfg.seed)
    result = evaluate(policy, reference, clf, prompts, cfg.samples, cfg.max_new_tokens, generator, cfg.batch_size,
                      cfg.temperature)
    print(f"reward {result['reward']:.4f} ± {result['reward_se']:.4f} | KL {result['kl']:.3f} ± {result['kl_se']:.3f} "
          f"nats | {result['n']} samples, {result['length']:.1f} tokens on average")
    for s in result["samples"]:
        print(f"  [{s['reward']:.2f}] {s['prompt']!r} -> {s['completion']!r}")
    if cfg.out:
        _atomic_write(cfg.out, json.dumps({"config": dataclasses.asdict(cfg), **result}, indent=2) + "\n")


def main(argv=None):
    cfg = parse_args(argv)
    print(json.dumps(dataclasses.asdict(cfg)))
    try:
        run(cfg)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
