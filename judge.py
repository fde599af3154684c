"""The win-rate judge (arXiv:2305.18290, Section 6.3 and Appendix C.2): a judge reads a query and two responses
and says which is better; the win rate of a policy is the share of its responses the judge prefers to a baseline's.

    OPENAI_API_KEY=... python eval.py --win-rate SAMPLES.jsonl --judge api --judge-model gpt-4o --out runs/wr
    python eval.py --win-rate SAMPLES.jsonl --judge rm --judge-model runs/rm_judge --out runs/wr   # offline

SAMPLES.jsonl holds one JSON object a line with "prompt", "response" (the policy's) and "baseline" (the other
method's, e.g. the SFT model's or the chosen answer of the data). Two judges, one interface,
judge.compare(items) -> verdicts, items (query, response_a, response_b), a verdict {"winner": "A"|"B"|None,
"reply": text}:
  * ApiJudge: any OpenAI-compatible chat-completions server (base URL + "/chat/completions", temperature 0),
    prompted with the paper's own judge prompts, PROMPTS below, verbatim. The key comes from $OPENAI_API_KEY and
    is sent only in the Authorization header: it is never printed or written, and any echo of it in a server's
    reply is masked. A server on localhost/127.0.0.1 may be used without a key (a local model server).
  * RewardModelJudge: offline, a Bradley-Terry reward model (ppo.RewardModel) that train_rm_judge fits to
    preference pairs; the response it scores higher wins, a tie is no verdict.

The win rate, with the paper's conventions (App. C.2; the authors' TL;DR script):
    (1) each sample's A/B order is drawn from random.Random(seed), one draw per sample in index order, so it
        never depends on which call returns first, and it is recorded (response_first)
    (2) the judge must answer A or B; a reply we cannot parse is invalid: left out of n, counted and shown
    (3) p  = wins / n                 over the n valid verdicts
    (4) se = sqrt(p (1 - p) / n)
agreement() is the same with the human labels of held-out pairs: how often the judge picks the chosen response.

Every judgment is appended to out/judge_cache.jsonl as it arrives, keyed by a hash of what was asked (judge model
and URL, or reward-model folder, and the prompt with its order): a repeated or interrupted run never asks twice.
The final judgments.jsonl and win_rate.json are written atomically (a temporary file, then os.replace).

Choices where the paper says nothing:
  * "news" is prompt (C) with "forum post" -> "news article" and its "Post:" label -> "Article:".
  * dialogue: an Anthropic HH prompt "\\n\\nHuman: q\\n\\nAssistant:" is shown as its human turn q; a multi-turn
    prompt as the whole transcript without its final "\\n\\nAssistant:". summarization/news: the prompt is the
    post; a trailing "TL;DR:" cue is dropped. Query and responses are shown stripped of surrounding whitespace.
  * the verdict is the LAST line starting with "More helpful:" (dialogue) or "Preferred:" (summarization, news),
    any case, quotes and markdown asterisks tolerated; its value must be A or B, else the reply is invalid.
  * calls: the first is made alone, so that a wrong key (401/403), URL (404) or host stops the run at once with
    one line; the rest run `workers` at a time; 429, 5xx, timeouts and dropped connections are retried with
    backoff * 2^k seconds (k = 0, 1, ...), `retries` times.

Tests: test_judge.py, offline, against a fake server in a thread. test_prompts_are_the_papers_verbatim (the text
the server receives, written out by hand), test_order_is_seeded_recorded_and_mapped_back, test_parse_verdict,
test_win_rate_counts_by_hand (3 of 4: 0.75 ± sqrt(.75 * .25 / 4); invalid replies counted and shown),
test_retries_*, test_cache_* (a second run asks nothing; a failed or interrupted run resumes), test_key_* (sent,
never written or printed), test_bad_input_* and test_unreachable_or_refused_stops_at_the_first_call (one line),
test_rm_judge_*.
"""
import concurrent.futures
import dataclasses
import hashlib
import http.client
import json
import math
import os
import random
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request

import torch

import data
import ppo
from data import EOS, InputError
from machinery.hf import from_pretrained, load_model, save_pretrained
from machinery.integrity import atomic_write, save_torch, write_json

DEFAULT_URL = "https://api.openai.com/v1"
CACHE_FILE = "judge_cache.jsonl"

# ----------------------------------------------------------------------------------------------
# The paper's judge prompts (Appendix C.2), verbatim; {query}, {a}, {b} are filled in by fill_prompt

_DIALOGUE = """For the following query to a chatbot, which response is more helpful?
Query: {query}
Response A:
{a}
Response B:
{b}
FIRST provide a one-sentence comparison of the two responses and explain which you feel is more helpful. \
SECOND, on a new line, state only "A" or "B" to indicate which response is more helpful. \
Your response should use the format:
Comparison: <one-sentence comparison and explanation>
More helpful: <"A" or "B">"""

_SUMMARIZATION = """Which of the following summaries does a better job of summarizing the most important points \
in the given forum post, without including unimportant or irrelevant details? A good summary is both precise \
and concise.
Post:
{query}
Summary A:
{a}
Summary B:
{b}
FIRST provide a one-sentence comparison of the two summaries, explaining which you prefer and why. \
SECOND, on a new line, state only "A" or "B" to indicate your choice. Your response should use the format:
Comparison: <one-sentence comparison and explanation>
Preferred: <"A" or "B">"""

PROMPTS = {
    "dialogue": _DIALOGUE,
    "summarization": _SUMMARIZATION,
    "news": _SUMMARIZATION.replace("forum post", "news article").replace("\nPost:\n", "\nArticle:\n"),
}
VERDICT_LABELS = {"dialogue": "More helpful", "summarization": "Preferred", "news": "Preferred"}


class JudgeError(InputError):
    """The judge cannot be asked (wrong key, URL or model, a server that keeps failing): one line, and what is
    cached stays cached. An InputError, so the command line prints `error: ...` and exits with status 2."""


def check_prompt_kind(kind):
    if kind not in PROMPTS:
        raise InputError(f"--judge-prompt {kind}: use one of {', '.join(PROMPTS)}")
    return kind


def fill_prompt(kind, query, a, b):
    """The judge prompt of `kind` with the query and the two responses. One pass over the template's own slots,
    so braces or slot names inside the texts are never substituted."""
    texts = {"query": shown_query(kind, query), "a": a.strip(), "b": b.strip()}
    return re.sub(r"\{(query|a|b)\}", lambda m: texts[m.group(1)], PROMPTS[check_prompt_kind(kind)])


def shown_query(kind, prompt):
    """What the judge sees as the query: for dialogue the human turn of an HH prompt (the transcript without its
    final "\\n\\nAssistant:" when there are several turns); for summaries the post without a trailing "TL;DR:"."""
    text = prompt.strip()
    if kind == "dialogue":
        if text.endswith("Assistant:"):
            text = text[:-len("Assistant:")].rstrip()
        turns = text.count("Human:") + text.count("Assistant:")
        if text.startswith("Human:") and turns == 1:
            text = text[len("Human:"):].strip()
    elif text.endswith("TL;DR:"):
        text = text[:-len("TL;DR:")].rstrip()
    return text


def parse_verdict(reply, label):
    """ "A", "B" or None from the LAST line of `reply` that starts with `label` ("More helpful" or "Preferred")
    and a colon, any case; markdown (**, #, -, >) and quotes around it are tolerated; any value but A/B is None."""
    for line in reversed((reply or "").splitlines()):
        text = line.strip().lstrip("*_#>- \t")
        if not text.lower().startswith(label.lower()):
            continue
        rest = text[len(label):].lstrip("*_ \t")
        if not rest.startswith(":"):
            continue
        value = rest[1:].strip(" \t*_\"'`.")
        return value.upper() if value.upper() in ("A", "B") else None
    return None


# ----------------------------------------------------------------------------------------------
# The API judge: an OpenAI-compatible chat-completions server through urllib

def _is_local(url):
    return urllib.parse.urlparse(url).hostname in ("localhost", "127.0.0.1", "::1")


class ApiJudge:
    """Asks `model` at the chat-completions server under base URL `url` (url + "/chat/completions")."""

    def __init__(self, url=DEFAULT_URL, model="gpt-4o", prompt_kind="dialogue", workers=4, timeout=60, retries=5,
                 backoff=1.0):
        self.url, self.model, self.prompt_kind = url.rstrip("/"), model, check_prompt_kind(prompt_kind)
        self.workers, self.timeout, self.retries, self.backoff = max(1, int(workers)), timeout, retries, backoff
        if urllib.parse.urlparse(self.url).scheme not in ("http", "https"):
            raise InputError(f"--judge-url {url}: write the server's base URL, e.g. {DEFAULT_URL}")
        self._key = os.environ.get("OPENAI_API_KEY", "")
        if not self._key and not _is_local(self.url):
            raise InputError(f"OPENAI_API_KEY is not set: export it to ask {self.url} (a server on localhost needs "
                             f"none), or use --judge rm for the offline judge")
        self.description = self._mask(f"{self.model} at {self.url}")

    def __repr__(self):
        return f"ApiJudge({self.description}, {self.prompt_kind})"  # never the key

    def key(self, item):
        """What identifies one request in the cache: the server, the model and the prompt (with its order)."""
        return json.dumps([self.url, self.model, self.prompt(item)])

    def prompt(self, item):
        return fill_prompt(self.prompt_kind, *item)

    def compare(self, items, on_verdict=None):
        """Verdicts for (query, a, b) items; on_verdict(i, verdict) runs as each arrives (in this thread). The
        first call is made alone; if any call fails for good, the rest are cancelled, the calls in flight are
        still delivered, and the JudgeError is raised."""
        verdicts = [None] * len(items)

        def deliver(i, verdict):
            verdicts[i] = verdict
            if on_verdict:
                on_verdict(i, verdict)
        if not items:
            return verdicts
        deliver(0, self.ask(items[0], first=True))
        error = None
        pool = concurrent.futures.ThreadPoolExecutor(self.workers)
        try:
            futures = {pool.submit(self.ask, item): i for i, item in enumerate(items[1:], 1)}
            for future in concurrent.futures.as_completed(futures):
                if future.cancelled():
                    continue
                try:
                    deliver(futures[future], future.result())
                except Exception as e:  # noqa: BLE001 (the first failure is raised once the calls in flight land)
                    if error is None:
                        error = e
                        for f in futures:
                            f.cancel()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # Ctrl-C too: nothing more is asked
        if error is not None:
            raise error
        return verdicts

    def ask(self, item, first=False):
        """One verdict, retrying 429, 5xx, timeouts and dropped connections."""
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": self.prompt(item)}],
                           "temperature": 0}).encode()
        last = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self._wait(attempt, last))
            try:
                reply = self._post(body)
            except urllib.error.HTTPError as e:
                if e.code != 429 and e.code < 500:
                    advice = _HTTP_ADVICE.get(e.code, _HTTP_ADVICE[0])
                    raise JudgeError(self._mask(f"{self.url}/chat/completions answered HTTP {e.code} "
                                                f"({_error_text(e)}); {advice}")) from None
                last = e
            except (TimeoutError, socket.timeout, ConnectionError, http.client.HTTPException) as e:
                last = e
            except urllib.error.URLError as e:
                if first and not isinstance(e.reason, (TimeoutError, socket.timeout)):
                    raise JudgeError(f"cannot reach {self.url} ({e.reason}); check --judge-url and that the "
                                     f"server is running") from None
                last = e
            else:
                return {"winner": parse_verdict(reply, VERDICT_LABELS[self.prompt_kind]), "reply": reply}
        raise JudgeError(self._mask(f"{self.url}/chat/completions failed {self.retries + 1} times (last: "
                                    f"{_short(last)}); rerun later: the judgments so far are cached")) from None

    def _post(self, body):
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        request = urllib.request.Request(self.url + "/chat/completions", data=body, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            raw = response.read()
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError(f"{self.url}/chat/completions answered, but not with a chat completion "
                             f"({len(raw)} bytes); check --judge-url (the base URL, e.g. {DEFAULT_URL})") from None
        return self._mask(content or "")

    def _wait(self, attempt, error):
        wait = self.backoff * 2 ** (attempt - 1)
        retry_after = getattr(error, "headers", None) and error.headers.get("Retry-After")
        if retry_after and retry_after.strip().isdigit():
            wait = max(wait, min(float(retry_after), 60.0))
        return wait

    def _mask(self, text):
        return text.replace(self._key, "***") if self._key else text


_HTTP_ADVICE = {401: "check OPENAI_API_KEY", 403: "the key may not use this model; check OPENAI_API_KEY and "
                "--judge-model", 404: "check --judge-url (the base URL, e.g. https://api.openai.com/v1) and "
                "--judge-model", 0: "check --judge-url and --judge-model"}


def _error_text(e):
    """A short, one-line account of a server's error body."""
    try:
        raw = e.read().decode("utf-8", "replace")
    except OSError:
        raw = ""
    try:
        raw = json.loads(raw)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        pass
    return " ".join(str(raw or e.reason).split())[:200]


def _short(e):
    return f"HTTP {e.code}" if isinstance(e, urllib.error.HTTPError) else f"{type(e).__name__}: {e}"[:200]


# ----------------------------------------------------------------------------------------------
# The reward-model judge: offline, a Bradley-Terry reward model (ppo.RewardModel)

def rm_ids(prompt, response):
    """The tokens a reward-model judge scores: encode(prompt) + encode(response) + [EOS], as data.tokenize_pair
    builds a row (prompt and response tokenised separately, EOS after the response)."""
    return data.encode(prompt) + data.encode(response) + [EOS]


def _pair_ids(pair):
    """prompt_ids/chosen_ids/rejected_ids of a pair: given, or tokenised from its prompt/chosen/rejected text."""
    if "chosen_ids" in pair:
        return pair
    return {"prompt_ids": data.encode(pair["prompt"]), "chosen_ids": data.encode(pair["chosen"]) + [EOS],
            "rejected_ids": data.encode(pair["rejected"]) + [EOS]}


def train_rm_judge(pairs, out_folder, base_model="gpt2", held_out=None, train_trunk=False, epochs=1,
                   batch_size=16, lr=1e-4, seed=0, device="cpu", log=print, checkpoints=None):
    """Fits a reward-model judge to preference pairs with ppo.train_reward_model and saves it in out_folder:
    the trunk (config.json + model.safetensors), head.pt, then accuracy.json (its held-out accuracy: the
    share of held-out pairs it ranks right). pairs: dicts with prompt_ids/chosen_ids/rejected_ids, or with
    prompt/chosen/rejected text (tokenised as rm_ids does). held_out: pairs to measure on; None: every 10th
    pair is held out. base_model: a GPT, or a hub name, folder or random:L,H,C spec. checkpoints: a
    machinery.stages.Checkpoints (counting batches) to resume an interrupted fit from. Returns the accuracy dict."""
    pairs = [_pair_ids(p) for p in pairs]
    if held_out is None:
        pairs, held_out = [p for i, p in enumerate(pairs) if i % 10 != 9], pairs[9::10] or pairs[-1:]
    held_out = [_pair_ids(p) for p in held_out]
    if not pairs or not held_out:
        raise InputError(f"train_rm_judge: {len(pairs)} training and {len(held_out)} held-out pairs; it needs some "
                         f"of each")
    trunk = load_model(base_model, device, seed) if isinstance(base_model, str) else base_model
    t0 = time.time()
    model, accuracy = ppo.train_reward_model(trunk, pairs, train_trunk=train_trunk, epochs=epochs,
                                             batch_size=batch_size, lr=lr, seed=seed, log=log, checkpoints=checkpoints)
    acc = {"heldout_accuracy": accuracy(held_out), "n": len(held_out), "train_accuracy": accuracy(pairs),
           "trainable": "all" if train_trunk else "head", "base_model": base_model if isinstance(base_model, str)
           else "a GPT passed in", "seconds": time.time() - t0}
    save_pretrained(model.trunk, out_folder)  # first: it replaces the whole folder
    save_torch(os.path.join(out_folder, "head.pt"), model.head.state_dict())
    write_json(os.path.join(out_folder, "accuracy.json"), acc)  # last: the folder is complete
    log(f"reward-model judge: held-out accuracy {acc['heldout_accuracy']:.3f} on {len(held_out)} pairs, "
        f"saved in {out_folder}")
    return acc


class RewardModelJudge:
    """Compares score(query + a) with score(query + b) under a reward model saved by train_rm_judge (or by the
    IMDb pipeline's reward_model_stage; one saved without its trunk needs the trunk it was trained on, `trunk`)."""

    prompt_kind = "reward model"

    def __init__(self, folder, device="cpu", trunk=None, batch_size=32):
        self.folder, self.batch_size = folder, batch_size
        head = os.path.join(folder, "head.pt")
        if not os.path.exists(head):
            raise InputError(f"{folder}: no head.pt; pass a reward-model folder written by judge.train_rm_judge")
        if os.path.exists(os.path.join(folder, "config.json")):
            trunk = from_pretrained(folder, device=device)
        elif trunk is None:
            raise InputError(f"{folder}: the reward model was saved without its trunk (config.json); retrain it "
                             f"with judge.train_rm_judge, which saves the whole model")
        self.model = ppo.RewardModel(trunk).to(device).requires_grad_(False)
        self.model.head.load_state_dict(torch.load(head, map_location=device, weights_only=True))
        self.block_size = trunk.config.block_size
        self.description = f"reward model {folder}"

    def __repr__(self):
        return f"RewardModelJudge({self.folder})"

    def key(self, item):
        return json.dumps([self.folder, *item])

    def score(self, prompts, responses):
        """The reward of each (prompt, response): (N,) float32. Rows longer than the model's context keep their end."""
        rows = [rm_ids(p, r)[-self.block_size:] for p, r in zip(prompts, responses)]
        return self.model.score(rows, self.batch_size)

    def compare(self, items, on_verdict=None):
        verdicts = []
        for s in range(0, len(items), self.batch_size):
            chunk = items[s:s + self.batch_size]
            queries = [q for q, _, _ in chunk]
            score_a = self.score(queries, [a for _, a, _ in chunk])
            score_b = self.score(queries, [b for _, _, b in chunk])
            for i, (sa, sb) in enumerate(zip(score_a.tolist(), score_b.tolist()), s):
                winner = "A" if sa > sb else "B" if sb > sa else None
                verdicts.append({"winner": winner, "reply": f"score A {sa:.4f} | score B {sb:.4f}"})
                if on_verdict:
                    on_verdict(i, verdicts[-1])
        return verdicts


# ----------------------------------------------------------------------------------------------
# Samples, the cache, the win rate

def read_samples(path):
    """SAMPLES.jsonl -> list of dicts, each with string "prompt", "response" and "baseline" (and its "line"),
    every line checked before any judge is asked."""
    samples = []
    for lineno, obj in data._jsonl(path):
        for key in ("prompt", "response", "baseline"):
            if key not in obj:
                raise InputError(f'{path}:{lineno}: missing "{key}"; each line needs "prompt", "response" and '
                                 f'"baseline" (the policy\'s and the baseline\'s responses to the prompt)')
            if not isinstance(obj[key], str):
                raise InputError(f'{path}:{lineno}: "{key}" is {data._json_type(obj[key])}, not a string; '
                                 f"write the text as a JSON string")
        samples.append({**obj, "line": lineno})
    if not samples:
        raise InputError(f"{path}: no samples (the file is empty); write one JSON object a line")
    return samples


def _hash(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_cache(path):
    """{key hash: verdict} from the cache file; unreadable lines (a run killed mid-write) are skipped."""
    cache = {}
    if not os.path.exists(path):
        return cache
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                entry = json.loads(line)
                cache[entry["key"]] = {"winner": entry["winner"], "reply": entry["reply"]}
            except (ValueError, KeyError, TypeError):
                continue
    return cache


def _open_cache(path):
    """The cache file opened for appending, on a fresh line even if the last one was cut short."""
    ends_cleanly = True
    if os.path.exists(path) and os.path.getsize(path):
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            ends_cleanly = f.read(1) == b"\n"
    f = open(path, "a", encoding="utf-8")
    if not ends_cleanly:
        f.write("\n")
    return f


def judge_pairs(queries, firsts, seconds, judge, out_dir, seed=0, max_calls=None, log=print):
    """Judges firsts[i] against seconds[i] for queries[i] with a seeded A/B order, through the cache in out_dir.
    Returns one record per pair: {"index", "first_is_a", "verdict" ("A"|"B"|None), "won" (True: the first won,
    False: the second, None: invalid), "reply"}."""
    rng = random.Random(seed)
    first_is_a = [rng.random() < 0.5 for _ in queries]                                     # (1)
    items = [(q, f, s) if fa else (q, s, f) for q, f, s, fa in zip(queries, firsts, seconds, first_is_a)]
    keys = [_hash(judge.key(item)) for item in items]
    os.makedirs(out_dir, exist_ok=True)
    cache_path = os.path.join(out_dir, CACHE_FILE)
    cache = read_cache(cache_path)
    todo = list(dict.fromkeys(k for k in keys if k not in cache))  # each distinct request once
    log(f"judge: {len(todo)} calls to {judge.description} ({len(keys) - len(todo)} of {len(keys)} cached in "
        f"{cache_path})")
    if max_calls is not None and len(todo) > max_calls:
        raise InputError(f"{len(todo)} judge calls needed, more than --max-judge-calls {max_calls}; raise it to "
                         f"go ahead (the {len(keys) - len(todo)} cached judgments cost nothing)")
    if todo:
        item_of = dict(zip(keys, items))
        with _open_cache(cache_path) as f:
            def store(i, verdict):
                cache[todo[i]] = verdict
                f.write(json.dumps({"key": todo[i], **verdict}) + "\n")
                f.flush()
            judge.compare([item_of[k] for k in todo], on_verdict=store)
    records = []
    for i, (k, fa) in enumerate(zip(keys, first_is_a)):
        verdict = cache[k]["winner"]
        won = None if verdict is None else (verdict == "A") == fa
        records.append({"index": i, "first_is_a": fa, "verdict": verdict, "won": won, "reply": cache[k]["reply"]})
    return records


def rate(records):
    """(3), (4): {"win_rate": wins / n, "se": sqrt(p (1 - p) / n), "n": valid verdicts, "wins", "invalid"}."""
    valid = [r["won"] for r in records if r["won"] is not None]
    n, wins = len(valid), sum(valid)
    p = wins / n if n else None
    se = math.sqrt(p * (1 - p) / n) if n else None
    return {"win_rate": p, "se": se, "n": n, "wins": wins, "invalid": len(records) - n}


def _summary_line(what, stats):
    if not stats["n"]:
        return f"{what} - (n 0, invalid {stats['invalid']})"
    return f"{what} {stats['win_rate']:.3f} ± {stats['se']:.3f} (n {stats['n']}, invalid {stats['invalid']})"


def _show_invalid(records, log, n_show=3):
    bad = [r for r in records if r["won"] is None]
    for r in bad[:n_show]:
        reply = r["reply"] if r["reply"] is None else " ".join(r["reply"].split())[:300]
        log(f"  invalid reply (pair {r['index']}): {reply!r}")
    if len(bad) > n_show:
        log(f"  ... and {len(bad) - n_show} more invalid replies")


def win_rate(samples, judge, out_dir, seed=0, max_calls=None, log=print):
    """The win rate of samples' "response" over their "baseline" under `judge`. Writes out_dir/judgments.jsonl
    (one line per sample) and out_dir/win_rate.json, logs `win rate 0.613 ± 0.030 (n 254, invalid 2)` and the
    first invalid replies. Returns the win_rate.json dict."""
    records = judge_pairs([s["prompt"] for s in samples], [s["response"] for s in samples],
                          [s["baseline"] for s in samples], judge, out_dir, seed, max_calls, log)
    lines = [{"index": r["index"], "line": s.get("line"), "winner": {True: "response", False: "baseline"}.get(r["won"]),
              "response_first": r["first_is_a"], "verdict": r["verdict"], "reply": r["reply"],
              "judge": judge.description} for r, s in zip(records, samples)]
    summary = {**rate(records), "judge": judge.description, "prompt_kind": judge.prompt_kind, "seed": seed,
               "samples": len(samples)}
    atomic_write(os.path.join(out_dir, "judgments.jsonl"), lambda f: f.writelines(json.dumps(x) + "\n" for x in lines))
    write_json(os.path.join(out_dir, "win_rate.json"), summary)
    log(_summary_line("win rate", summary))
    _show_invalid(records, log)
    return summary


def agreement(pairs, judge, out_dir, seed=0, max_calls=None, log=print):
    """How often the judge agrees with the human labels: pairs are dicts with "prompt", "chosen", "rejected"
    (held-out preference pairs); the rate at which the judge picks "chosen", over valid verdicts, with its s.e.
    Writes out_dir/agreement.jsonl and out_dir/agreement.json (same order randomisation and cache as win_rate)."""
    records = judge_pairs([p["prompt"] for p in pairs], [p["chosen"] for p in pairs], [p["rejected"] for p in pairs],
                          judge, out_dir, seed, max_calls, log)
    lines = [{"index": r["index"], "winner": {True: "chosen", False: "rejected"}.get(r["won"]),
              "chosen_first": r["first_is_a"], "verdict": r["verdict"], "reply": r["reply"],
              "judge": judge.description} for r in records]
    summary = {**rate(records), "judge": judge.description, "prompt_kind": judge.prompt_kind, "seed": seed,
               "pairs": len(pairs)}
    summary["agreement"] = summary.pop("win_rate")
    atomic_write(os.path.join(out_dir, "agreement.jsonl"), lambda f: f.writelines(json.dumps(x) + "\n" for x in lines))
    write_json(os.path.join(out_dir, "agreement.json"), summary)
    log(_summary_line("judge agreement with human labels", {**summary, "win_rate": summary["agreement"]}))
    _show_invalid(records, log)
    return summary


# ----------------------------------------------------------------------------------------------
# Entry (eval.py --win-rate, or the experiment pipeline without a subprocess)

@dataclasses.dataclass
class JudgeConfig:
    samples: str                   # SAMPLES.jsonl
    out: str                       # folder for judgments.jsonl, win_rate.json and the cache
    judge: str = "api"             # api or rm
    model: str = None              # api: the model name; rm: the reward-model folder
    url: str = DEFAULT_URL         # api: the server's base URL
    prompt: str = "dialogue"       # dialogue, summarization or news
    workers: int = 4
    max_calls: int = None          # refuse a run that needs more uncached calls than this
    seed: int = 0
    device: str = "cpu"


def make_judge(cfg):
    """The judge a JudgeConfig names."""
    if cfg.judge not in ("api", "rm"):
        raise InputError(f"--judge {cfg.judge}: use api (a chat-completions server) or rm (a reward-model folder)")
    if not cfg.model:
        raise InputError("--judge-model: name the judge: a model name for --judge api (e.g. gpt-4o), a "
                         "reward-model folder for --judge rm")
    if cfg.judge == "rm":
        return RewardModelJudge(cfg.model, cfg.device)
    return ApiJudge(cfg.url, cfg.model, cfg.prompt, workers=cfg.workers)


def main(cfg, log=print):
    """Reads and checks the samples, builds the judge, and returns win_rate()'s dict."""
    if not cfg.out:
        raise InputError("--win-rate needs --out DIR: the folder for judgments.jsonl, win_rate.json and the cache")
    check_prompt_kind(cfg.prompt)
    samples = read_samples(cfg.samples)
    return win_rate(samples, make_judge(cfg), cfg.out, cfg.seed, cfg.max_calls, log)
