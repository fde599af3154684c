"""Tests for machinery/corpora.py (the dialogue and summarization data) and its download helpers in hub.py.

    TIKTOKEN_CACHE_DIR=../shared/tiktoken python -m pytest -q test_corpora.py

The real HH harmless-base test file is read in place when present ($DPO_HH or ../shared/data/hh-rlhf/), else those
tests are skipped. The TL;DR and CNN/DM readers run on fixtures/ (hand-written, in the sources' formats). No test
touches the network: the downloads are made to fail offline.
"""
import json
import os
import urllib.error

HERE = os.path.dirname(os.path.abspath(__file__))
os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(HERE, "..", "shared", "tiktoken"))

import pytest  # noqa: E402

import data  # noqa: E402
from data import InputError  # noqa: E402
from machinery import corpora, hub  # noqa: E402

FIXTURES = os.path.join(HERE, "fixtures")
HH_DIR = os.environ.get("DPO_HH") or os.path.join(HERE, "..", "shared", "data", "hh-rlhf")
H, A = "\n\nHuman:", "\n\nAssistant:"


@pytest.fixture(scope="module")
def hh_test_pairs():
    path = os.path.join(HH_DIR, "harmless-base-test.jsonl.gz")
    if not os.path.isfile(path):
        path = os.path.join(HH_DIR, "harmless-base", "test.jsonl.gz")
    if not os.path.isfile(path):
        pytest.skip(f"the HH harmless-base test file is not in {HH_DIR} (set DPO_HH to its folder)")
    return data.read_hh(path)


# ----------------------------------------------------------------------------------------------
# Anthropic HH

def test_single_turn_count_on_the_real_file(hh_test_pairs):
    """2,312 pairs, 662 with one Human and one Assistant turn in prompt + chosen (notes/judging-and-data.md)."""
    assert len(hh_test_pairs) == 2312
    evaluation = corpora.single_turn(hh_test_pairs)
    assert len(evaluation) == 662
    assert all(p["prompt"].count(H) == 1 and p["prompt"].endswith(A) for p in evaluation)
    # the prompt alone gives the same 662; requiring the rejected transcript single-turn too drops one
    assert sum(corpora.is_single_turn(p["prompt"] + p["rejected"]) for p in evaluation) == 661


def test_is_single_turn():
    assert corpora.is_single_turn(f"{H} Hi?{A} Hello.")
    assert not corpora.is_single_turn(f"{H} Hi?{A} Hello.{H} Bye?{A} Bye.")
    assert not corpora.is_single_turn(f"{H} Hi?")
    assert not corpora.is_single_turn("Human: Hi? Assistant: Hello.")  # the turns start with a blank line


def test_two_shot_prompt_on_real_lines(hh_test_pairs):
    train, _, evaluation = corpora.split_by_prompt(hh_test_pairs, (0.8, 0.1, 0.1), seed=0)
    examples = corpora.two_shot_examples(train)
    first_two = [p for p in train if (p["prompt"] + p["chosen"]).count(H) == 1][:2]
    assert examples == [p["prompt"] + p["chosen"] for p in first_two]  # whole chosen transcripts, file order
    query = corpora.single_turn(evaluation)[0]["prompt"]
    prompt = corpora.two_shot_prompt(query, examples)
    assert prompt == examples[0] + examples[1] + query
    assert prompt.startswith(H) and prompt.endswith(A) and prompt.count(H) == 3 and prompt.count(A) == 3
    eval_prompts = {p["prompt"] for p in evaluation}
    assert not any(p["prompt"] in eval_prompts for p in first_two)


def test_two_shot_prompt_literal_and_errors():
    examples = [f"{H} Hi?{A} Hello!", f"{H} Capital of France?{A} Paris."]
    assert corpora.two_shot_prompt(f"{H} 2+2?{A}", examples) == (
        "\n\nHuman: Hi?\n\nAssistant: Hello!\n\nHuman: Capital of France?\n\nAssistant: Paris."
        "\n\nHuman: 2+2?\n\nAssistant:")
    with pytest.raises(InputError, match="must end with"):
        corpora.two_shot_prompt(f"{H} 2+2?{A} 4", examples)
    with pytest.raises(InputError, match="not an HH transcript"):
        corpora.two_shot_prompt(f"{H} 2+2?{A}", ["Hi there", examples[1]])
    with pytest.raises(InputError, match="needs 2"):
        corpora.two_shot_examples([{"prompt": f"{H} a{A}", "chosen": " b", "rejected": " c"}])


def test_split_by_prompt_is_disjoint_and_reproducible(hh_test_pairs):
    groups = corpora.split_by_prompt(hh_test_pairs, (0.8, 0.1, 0.1), seed=0)
    prompts = [{p["prompt"] for p in g} for g in groups]
    assert not (prompts[0] & prompts[1]) and not (prompts[0] & prompts[2]) and not (prompts[1] & prompts[2])
    assert sum(map(len, groups)) == len(hh_test_pairs)
    distinct = len({p["prompt"] for p in hh_test_pairs})  # 2,310: two prompts appear twice
    assert [len(s) for s in prompts] == [round(0.8 * distinct), round(0.9 * distinct) - round(0.8 * distinct),
                                         distinct - round(0.9 * distinct)]
    assert groups == corpora.split_by_prompt(hh_test_pairs, (0.8, 0.1, 0.1), seed=0)
    assert groups != corpora.split_by_prompt(hh_test_pairs, (0.8, 0.1, 0.1), seed=1)
    order = {id(p): i for i, p in enumerate(hh_test_pairs)}
    assert all([order[id(p)] for p in g] == sorted(order[id(p)] for p in g) for g in groups)  # file order kept


def test_split_by_prompt_keeps_a_prompts_pairs_together():
    pairs = [{"prompt": f"{H} q{i % 5}{A}", "chosen": f" c{i}", "rejected": f" r{i}"} for i in range(20)]
    groups = corpora.split_by_prompt(pairs, (0.6, 0.4), seed=3)
    assert sorted(map(len, groups)) == [8, 12]  # 3 and 2 prompts, 4 pairs each
    assert not ({p["prompt"] for p in groups[0]} & {p["prompt"] for p in groups[1]})
    with pytest.raises(ValueError, match="sum to 1"):
        corpora.split_by_prompt(pairs, (0.5, 0.4), seed=0)


# ----------------------------------------------------------------------------------------------
# TL;DR posts and comparisons, CNN/DM (fixtures)

def fixture(name):
    return os.path.join(FIXTURES, name)


def test_tldr_prompt_template_literal():
    assert corpora.tldr_prompt("AskReddit", "A title", "Line one.\n\nLine two.") == (
        "SUBREDDIT: r/AskReddit\n\nTITLE: A title\n\nPOST: Line one.\n\nLine two.\n\nTL;DR:")
    assert corpora.TLDR_FORMAT == "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
    assert corpora.CNNDM_FORMAT == "Article:\n{article}\n\nTL;DR:\n"


def test_read_tldr_posts_fixture():
    posts = corpora.read_tldr_posts(fixture("tldr_posts.jsonl"))
    assert [p["id"] for p in posts] == ["t3_fx0001", "t3_fx0002"]
    assert posts[1]["prompt"] == (
        "SUBREDDIT: r/personalfinance\n\nTITLE: Should I pay off my car loan early?\n\nPOST: The loan is at 3% and "
        "I have six months of savings. Is it better to invest the extra money instead?\n\nTL;DR:")
    assert posts[1]["reference"] == " 3% car loan, emergency fund done: pay it off early or invest?"


def test_read_tldr_comparisons_fixture():
    path = fixture("tldr_comparisons.json")
    train = corpora.read_tldr_comparisons(path, split="train")
    assert train == [{
        "prompt": "SUBREDDIT: r/relationships\n\nTITLE: My roommate [24F] keeps eating my food, how do I bring it up?"
                  "\n\nPOST: We have lived together for a year. Every week some of my groceries vanish.\n\nI don't "
                  "want a fight, but I am tired of buying twice.\n\nTL;DR:",
        "chosen": " my roommate eats my groceries every week; how do I raise it calmly?",  # summaries[choice=1]
        "rejected": " roommate takes my food and I want it to stop."}]
    posts = corpora.read_tldr_posts(fixture("tldr_posts.jsonl"))
    assert train[0]["prompt"] == posts[0]["prompt"]  # the same prompt from both sources
    valid = corpora.read_tldr_comparisons([path], split="valid2")
    assert [p["chosen"] for p in valid] == [" low-rate car loan, savings in place: pay early or invest the money?"]
    assert corpora.read_tldr_comparisons(path, split="valid") == valid  # the CNN/DM line (valid2) is skipped
    with pytest.raises(InputError, match="no TL;DR comparisons with split valid1"):
        corpora.read_tldr_comparisons(path, split="valid1")
    with pytest.raises(InputError, match="unknown comparison split 'test'"):
        corpora.read_tldr_comparisons(path, split="test")


def test_comparison_text_without_a_leading_space_gets_one(tmp_path):
    row = json.loads(open(fixture("tldr_comparisons.json")).readline())
    row["summaries"][1]["text"] = "no space"
    (tmp_path / "b.json").write_text(json.dumps(row) + "\n")
    assert corpora.read_tldr_comparisons(str(tmp_path / "b.json"))[0]["chosen"] == " no space"


def test_read_cnndm_fixtures():
    hf = corpora.read_cnndm(fixture("cnndm.jsonl"))
    assert hf == [{"prompt": "Article:\nA small town opened its first library on Monday.\n\nThe mayor said books "
                             "would be free for everyone.\n\nTL;DR:\n",
                   "reference": "Town opens its first library. Books are free for everyone."}]
    mine = corpora.read_cnndm(fixture("eval_data.jsonl"))
    assert mine[1] == {"prompt": "Article:\nThe city council approved a new bridge.\n\nTL;DR:\n",
                       "reference": "New bridge approved."}


def broken(tmp_path, name, source, edit):
    """A copy of a fixture whose second line is edited (`edit` returns the new line's text)."""
    lines = open(fixture(source)).read().splitlines()
    lines[1] = edit(json.loads(lines[1]))
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def without(obj, *keys):
    *parents, last = keys
    for k in parents:
        obj = obj[k]
    del obj[last]


def edited(change):
    def edit(obj):
        change(obj)
        return json.dumps(obj)
    return edit


COMPARISON_ERRORS = [
    (lambda o: "{not json", "invalid JSON"),
    (edited(lambda o: without(o, "choice")), 'missing key "choice"'),
    (edited(lambda o: o.update(choice=2)), '"choice" is 2, not 0 or 1'),
    (edited(lambda o: o.update(choice="0")), '"choice" is a string, not an integer'),
    (edited(lambda o: o.update(choice=True)), '"choice" is a boolean, not an integer'),
    (edited(lambda o: o.update(summaries=o["summaries"][:1])), '"summaries" holds 1 summaries, not 2'),
    (edited(lambda o: without(o, "summaries", 1, "text")), 'missing key "summaries\\[1\\].text"'),
    (edited(lambda o: o["summaries"].__setitem__(0, "text")), '"summaries\\[0\\]" is a string, not an object'),
    (edited(lambda o: without(o, "info", "title")), 'missing key "info.title"'),
    (edited(lambda o: o["info"].update(post=None)), '"info.post" is null, not a string'),
    (edited(lambda o: o.update(info=[])), '"info" is an array, not an object'),
    (edited(lambda o: o.update(split="test")), "\"split\" is 'test', not one of train, valid1, valid2"),
    (edited(lambda o: o.update(info={"id": "x"})), '"info" has neither "post"'),
]


@pytest.mark.parametrize("edit,message", COMPARISON_ERRORS)
def test_comparison_errors_name_file_and_line(tmp_path, edit, message):
    path = broken(tmp_path, "batch.json", "tldr_comparisons.json", edit)
    with pytest.raises(InputError, match=f"batch.json:2: {message}") as e:
        corpora.read_tldr_comparisons(path, split="train")  # line 2 is a valid2 line: checked all the same
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("reader,source,edit,message", [
    (corpora.read_tldr_posts, "tldr_posts.jsonl", lambda o: "[1, 2]", "expected a JSON object, got an array"),
    (corpora.read_tldr_posts, "tldr_posts.jsonl", edited(lambda o: without(o, "summary")), 'missing key "summary"'),
    (corpora.read_tldr_posts, "tldr_posts.jsonl", edited(lambda o: o.update(title=7)),
     '"title" is a number, not a string'),
    (corpora.read_tldr_posts, "tldr_posts.jsonl", edited(lambda o: o.update(post=" ")), '"post" is empty'),
    (corpora.read_cnndm, "eval_data.jsonl", edited(lambda o: without(o, "reference")), 'missing key "reference"'),
    (corpora.read_cnndm, "eval_data.jsonl", edited(lambda o: o.update(article=["a"])), '"article" is an array'),
])
def test_post_and_article_errors_name_file_and_line(tmp_path, reader, source, edit, message):
    path = broken(tmp_path, "f.jsonl", source, edit)
    with pytest.raises(InputError, match=f"f.jsonl:2: {message}") as e:
        reader(path)
    assert "\n" not in str(e.value)


def test_empty_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    for reader in (corpora.read_tldr_posts, corpora.read_cnndm, corpora.read_tldr_comparisons):
        with pytest.raises(InputError, match="empty.jsonl"):
            reader(str(tmp_path / "empty.jsonl"))


# ----------------------------------------------------------------------------------------------
# Download helpers (hub.py): local files, $DPO_TLDR, and the one-line offline message

@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network: urlopen fails as it does without one; downloads go to an empty cache."""
    def urlopen(req, *a, **k):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(hub.urllib.request, "urlopen", urlopen)
    monkeypatch.setenv("DPO_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DPO_TLDR", raising=False)
    return tmp_path / "cache" / "summarize-from-feedback"


def test_tldr_path_offline_names_file_url_and_override(offline):
    with pytest.raises(InputError) as e:
        hub.tldr_path("valid")
    message = str(e.value)
    url = "https://openaipublic.blob.core.windows.net/summarize-from-feedback/datasets/tldr_3_filtered/valid.jsonl"
    assert url in message and str(offline / "tldr_3_filtered" / "valid.jsonl") in message
    assert "DPO_TLDR" in message and "offline" in message and "\n" not in message
    assert not (offline / "tldr_3_filtered" / "valid.jsonl").exists()


def test_tldr_comparisons_offline_names_file_url_and_override(offline):
    with pytest.raises(InputError) as e:
        hub.tldr_comparisons_paths()
    message = str(e.value)
    url = "https://openaipublic.blob.core.windows.net/summarize-from-feedback/dataset/comparisons/batch3.json"
    assert url in message and str(offline / "comparisons" / "batch3.json") in message
    assert "DPO_TLDR" in message and "\n" not in message


def test_tldr_paths_local(tmp_path, monkeypatch, offline):
    assert hub.tldr_path("train", fixture("tldr_posts.jsonl")) == fixture("tldr_posts.jsonl")
    (tmp_path / "tl" / "tldr_3_filtered").mkdir(parents=True)
    (tmp_path / "tl" / "comparisons").mkdir()
    (tmp_path / "tl" / "tldr_3_filtered" / "test.jsonl").write_text(open(fixture("tldr_posts.jsonl")).read())
    (tmp_path / "tl" / "comparisons" / "batch9.json").write_text(open(fixture("tldr_comparisons.json")).read())
    assert hub.tldr_path("test", str(tmp_path / "tl" / "tldr_3_filtered")).endswith("test.jsonl")
    monkeypatch.setenv("DPO_TLDR", str(tmp_path / "tl"))
    assert len(corpora.read_tldr_posts(hub.tldr_path("test"))) == 2
    assert len(corpora.read_tldr_comparisons(hub.tldr_comparisons_paths())) == 1
    assert hub.tldr_comparisons_paths(fixture("tldr_comparisons.json")) == [fixture("tldr_comparisons.json")]
    with pytest.raises(InputError, match="DPO_TLDR=.*holds neither .*train.jsonl"):
        hub.tldr_path("train")
    with pytest.raises(InputError, match="unknown TL;DR split 'dev'"):
        hub.tldr_path("dev")
    with pytest.raises(InputError, match="no comparison files"):
        hub.tldr_comparisons_paths(str(tmp_path / "tl" / "tldr_3_filtered"))
