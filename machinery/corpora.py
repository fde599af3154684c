"""Readers for the paper's dialogue and summarization data (Section 6, Appendices B-C of arXiv:2305.18290):
the single-turn Anthropic HH prompts and the 2-shot baseline's prompt, splits by prompt, Reddit TL;DR posts and
human comparisons, and CNN/DailyMail articles. Like data.py's readers they return plain lists of dicts, and a bad
line raises data.InputError naming `file:line` and what to do. machinery/hub.py finds or downloads the files.

    DPO_HH=../shared/data/hh-rlhf TIKTOKEN_CACHE_DIR=../shared/tiktoken python -c "import data; from machinery \\
    import corpora, hub; print(len(corpora.single_turn(data.read_hh(hub.hh_path('harmless-base/test')))))"  # 662

Sources (field names checked in the public code named here):
  Anthropic HH    https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main/<subset>/<split>.jsonl.gz, read by
                  data.read_hh (lines {"chosen", "rejected"}, whole "\\n\\nHuman: ...\\n\\nAssistant: ..." transcripts).
  TL;DR posts     TLDR_URL = .../summarize-from-feedback/datasets/tldr_3_filtered/{train,valid,test}.jsonl, lines
                  {"id", "subreddit", "title", "post", "summary"}: openai/summarize-from-feedback
                  summarize_from_feedback/datasets/tldr.py (URL, "summary" -> reference) and the field list in
                  vwxyzjn/summarize_from_feedback_details summarize_from_feedback_details/tldr_dataset.py.
  comparisons     TLDR_COMPARISONS_URL = .../summarize-from-feedback/dataset/comparisons/<batch>.json: JSON lines
                  despite the name, {"info": {"id", "post", "title", "subreddit"} or, for news, {"id", "article",
                  "title", "site"}, "summaries": [{"text", "policy", "note"}, x2], "choice": 0|1, "worker", "batch",
                  "split": "train"|"valid1"|"valid2", "extra": {"confidence"}}: openai/summarize-from-feedback
                  README.md ("Comparisons"); the 23 batch names in the Hugging Face loading script of the dataset
                  openai/summarize_from_feedback (_split_generators), of which batch0_cnndm, cnndm0 and cnndm2 are
                  CNN/DM (vwxyzjn tldr_dataset.py: cnndm_batches). We tell them apart by the info fields.
  CNN/DailyMail   the blob keeps .../summarize-from-feedback/datasets/cnndm/url_lists/{all,...}_{test,...}.txt,
                  titles.json and cache_test/{cnn,dailymail}/stories/<sha1 of url>.story, one file per article
                  (openai .../datasets/cnndm.py), too many files to fetch one by one; read_cnndm takes JSON lines
                  instead, {"article", "reference"} (our --eval-data) or {"article", "highlights"} (the Hugging Face
                  cnn_dailymail 3.0.0 fields: article, highlights, id).

Prompt formats (literal strings, checked character by character in test_corpora.py):
  TL;DR   TLDR_FORMAT  "SUBREDDIT: r/{subreddit}\\n\\nTITLE: {title}\\n\\nPOST: {post}\\n\\nTL;DR:", the reference
          " {summary}" with a leading space: openai summarize_from_feedback/utils/experiment_helpers.py (tldr_task:
          format_str, ref_format_str " {reference}"); vwxyzjn tldr_dataset.py uses the same. Double newlines, not
          single. Comparison summaries already begin with a space (README example; vwxyzjn's comment); one that
          does not gets one, so prompt + response always reads "TL;DR: text". The sources also cut the post at
          its last newline until the prompt fits 512 tokens; we leave truncation to data.tokenize_pair.
  CNN/DM  CNNDM_FORMAT "Article:\\n{article}\\n\\nTL;DR:\\n" and the reference as is: experiment_helpers.py
          (cnndm_task: format_str, ref_format_str "{reference}"); vwxyzjn tldr_dataset.py formats the CNN/DM
          comparisons (TL;DR policies summarizing news, the paper's Section 6.3 setting) the same way.
  HH 2-shot  two_shot_prompt: two whole training transcripts, then the query prompt (see its docstring).

Tests (test_corpora.py): single_turn finds 662 of the 2,312 pairs in the real harmless-base test file; the 2-shot
prompt is built from real lines and holds three Human turns; split_by_prompt's groups share no prompt and are
reproducible; each reader parses fixtures/ files in the sources' formats, and each malformed line (bad JSON, a
missing field, a wrong type, choice out of range, an unknown split) is a one-line `file:line` error; the prompt
templates are compared with literal strings; offline, hub.tldr_path and hub.tldr_comparisons_paths name the file,
the URL and $DPO_TLDR.
"""
import random

from data import InputError, _json_type, _jsonl  # the HH pairs themselves come from data.read_hh

# ----------------------------------------------------------------------------------------------
# Anthropic HH: single-turn prompts, the 2-shot baseline, splits by prompt

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def is_single_turn(transcript):
    """True if a transcript has exactly one "\\n\\nHuman:" and one "\\n\\nAssistant:" turn."""
    return transcript.count(HUMAN) == 1 and transcript.count(ASSISTANT) == 1


def single_turn(pairs):
    """The pairs whose prompt + chosen transcript is single-turn: the paper's dialogue evaluation prompts. (On the
    harmless-base test file 662 of 2,312; 661 if the rejected transcript must be single-turn too: one rejected
    response there holds a second "\\n\\nAssistant:" of its own.)"""
    return [p for p in pairs if is_single_turn(p["prompt"] + p["chosen"])]


def two_shot_examples(train_pairs, n=2):
    """Fixed examples for the 2-shot baseline: the whole chosen transcripts (prompt + chosen) of the first `n`
    single-turn pairs, in file order, of the TRAINING pairs. The paper does not say which dialogues it used;
    the first ones are reproducible and never an evaluation prompt."""
    examples = [p["prompt"] + p["chosen"] for p in single_turn(train_pairs)[:n]]
    if len(examples) < n:
        raise InputError(f"the training pairs hold {len(examples)} single-turn dialogues, the 2-shot prompt needs {n}; "
                         f"pass more training pairs")
    return examples


def two_shot_prompt(prompt, examples):
    """The 2-shot baseline's prompt (Section 6, the base model prompted with examples): the example transcripts,
    each "\\n\\nHuman: ...\\n\\nAssistant: ...", then the query prompt, which ends with "\\n\\nAssistant:". It reads
    as one HH transcript whose earlier turns show the kind of answer wanted, so the base model continues as the
    assistant. prompt + response is the same transcript the evaluation pairs hold."""
    for text in (*examples, prompt):
        if not text.startswith(HUMAN) or ASSISTANT not in text:
            raise InputError(f'not an HH transcript: {text[:40]!r}...; each must start with "\\n\\nHuman:" and hold '
                             f'an "\\n\\nAssistant:" turn')
    if not prompt.endswith(ASSISTANT):
        raise InputError(f'the query prompt must end with "\\n\\nAssistant:", it ends with {prompt[-20:]!r}')
    return "".join(examples) + prompt


def split_by_prompt(pairs, fractions, seed=0):
    """Split pairs into len(fractions) groups with no prompt in two groups, e.g. (0.8, 0.1, 0.1) for policy pairs,
    judge (reward model) pairs and evaluation prompts. The distinct prompts are shuffled with random.Random(seed)
    and cut by the fractions (rounded; the last group takes the rest); pairs keep their order within a group."""
    if not fractions or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {fractions}")
    prompts = list(dict.fromkeys(p["prompt"] for p in pairs))  # distinct, in order of appearance
    random.Random(seed).shuffle(prompts)
    group_of, start, total = {}, 0, 0.0
    for g, f in enumerate(fractions):
        total += f
        end = len(prompts) if g == len(fractions) - 1 else round(total * len(prompts))
        group_of.update((prompt, g) for prompt in prompts[start:end])
        start = end
    groups = [[] for _ in fractions]
    for p in pairs:
        groups[group_of[p["prompt"]]].append(p)
    return groups


# ----------------------------------------------------------------------------------------------
# Reddit TL;DR (Stiennon et al. 2020): posts with reference summaries, and human comparisons

TLDR_URL = "https://openaipublic.blob.core.windows.net/summarize-from-feedback/datasets/tldr_3_filtered/{split}.jsonl"
TLDR_SPLITS = ("train", "valid", "test")
TLDR_COMPARISONS_URL = "https://openaipublic.blob.core.windows.net/summarize-from-feedback/dataset/comparisons/{batch}"
TLDR_COMPARISON_BATCHES = tuple(f"batch{i}.json" for i in (3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18,
                                                          19, 20, 22)) + ("edit_b2_eval_test.json",)
CNNDM_COMPARISON_BATCHES = ("batch0_cnndm.json", "cnndm0.json", "cnndm2.json")  # news only: not downloaded
COMPARISON_SPLITS = ("train", "valid1", "valid2")  # Stiennon et al. chose models on "valid1", reported "valid2"
TLDR_FORMAT = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
CNNDM_FORMAT = "Article:\n{article}\n\nTL;DR:\n"


def tldr_prompt(subreddit, title, post):
    """The TL;DR prompt the sources' SFT and reward models read (TLDR_FORMAT)."""
    return TLDR_FORMAT.format(subreddit=subreddit, title=title, post=post)


def _field(path, lineno, obj, key, kind=str, where=""):
    """obj[key], checked to be present and of `kind` (a non-empty string by default); `where` names the parent
    object in the message, e.g. "info."."""
    if not isinstance(obj, dict):
        raise InputError(f'{path}:{lineno}: "{where.rstrip(".")}" is {_json_type(obj)}, not an object; '
                         f"compare with the source's format")
    if key not in obj:
        raise InputError(f'{path}:{lineno}: missing key "{where}{key}"; compare with the source\'s format')
    value = obj[key]
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        name = {str: "a string", int: "an integer", dict: "an object", list: "an array"}[kind]
        raise InputError(f'{path}:{lineno}: "{where}{key}" is {_json_type(value)}, not {name}; '
                         f"compare with the source's format")
    if kind is str and not value.strip():
        raise InputError(f'{path}:{lineno}: "{where}{key}" is empty; fill it in or remove the line')
    return value


def _spaced(text):
    return text if text[:1].isspace() else " " + text


def read_tldr_posts(path):
    """Posts with reference summaries from a tldr_3_filtered .jsonl file: [{"id", "prompt", "reference"}], the
    prompt in TLDR_FORMAT, the reference " " + summary."""
    posts = []
    for lineno, obj in _jsonl(path):
        id_, subreddit, title, post, summary = (_field(path, lineno, obj, k)
                                                for k in ("id", "subreddit", "title", "post", "summary"))
        posts.append({"id": id_, "prompt": tldr_prompt(subreddit, title, post), "reference": " " + summary})
    if not posts:
        raise InputError(f"{path}: no posts found (the file is empty); check that it is the right file")
    return posts


def read_tldr_comparisons(paths, split="train"):
    """Preference pairs [{"prompt", "chosen", "rejected"}] from comparison batch files (one path or a list): the
    TL;DR comparisons (info has "post"; news ones, with "article", are skipped) whose "split" is `split`, one of
    "train", "valid1", "valid2", or "valid" for both valid ones. chosen = summaries[choice], rejected the other,
    each with a leading space. Every line is checked, whatever its split."""
    wanted = ("valid1", "valid2") if split == "valid" else (split,)
    if not set(wanted) <= set(COMPARISON_SPLITS):
        raise InputError(f"unknown comparison split {split!r}; use one of {', '.join(COMPARISON_SPLITS)} or valid")
    paths = [paths] if isinstance(paths, str) else list(paths)
    pairs, news = [], 0
    for path in paths:
        for lineno, obj in _jsonl(path):
            info = _field(path, lineno, obj, "info", dict)
            summaries = _field(path, lineno, obj, "summaries", list)
            choice = _field(path, lineno, obj, "choice", int)
            row_split = _field(path, lineno, obj, "split")
            if len(summaries) != 2:
                raise InputError(f'{path}:{lineno}: "summaries" holds {len(summaries)} summaries, not 2; '
                                 f"a comparison is between two summaries")
            texts = [_field(path, lineno, s, "text", where=f"summaries[{i}].") for i, s in enumerate(summaries)]
            if choice not in (0, 1):
                raise InputError(f'{path}:{lineno}: "choice" is {choice}, not 0 or 1; it indexes "summaries"')
            if row_split not in COMPARISON_SPLITS:
                raise InputError(f'{path}:{lineno}: "split" is {row_split!r}, not one of '
                                 f'{", ".join(COMPARISON_SPLITS)}; compare with the source\'s format')
            if "post" not in info:
                if "article" not in info:
                    raise InputError(f'{path}:{lineno}: "info" has neither "post" (TL;DR) nor "article" (CNN/DM); '
                                     f"compare with the source's format")
                news += 1
                continue
            subreddit, title, post = (_field(path, lineno, info, key, where="info.")
                                      for key in ("subreddit", "title", "post"))
            if row_split in wanted:
                pairs.append({"prompt": tldr_prompt(subreddit, title, post),
                              "chosen": _spaced(texts[choice]), "rejected": _spaced(texts[1 - choice])})
    if not pairs:
        raise InputError(f"{', '.join(paths)}: no TL;DR comparisons with split {split} ({news} news comparisons "
                         f"skipped); check the files and the split")
    return pairs


# ----------------------------------------------------------------------------------------------
# CNN/DailyMail: news articles and their reference highlights (the paper's out-of-distribution test, Section 6.3)

def read_cnndm(path):
    """Articles with references from a JSON-lines file: [{"prompt", "reference"}], the prompt in CNNDM_FORMAT.
    Each line holds "article" and "reference" (our --eval-data format) or "highlights" (Hugging Face's
    cnn_dailymail, one highlight a line: joined with spaces, as the sources join them)."""
    items = []
    for lineno, obj in _jsonl(path):
        article = _field(path, lineno, obj, "article")
        if "reference" not in obj and "highlights" in obj:
            reference = " ".join(_field(path, lineno, obj, "highlights").split("\n"))
        else:
            reference = _field(path, lineno, obj, "reference")
        items.append({"prompt": CNNDM_FORMAT.format(article=article), "reference": reference})
    if not items:
        raise InputError(f"{path}: no articles found (the file is empty); check that it is the right file")
    return items
