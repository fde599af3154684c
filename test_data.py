"""Tests for data.py: tokens, IMDb and preference-pair readers, tokenised pairs, masks and batches.

    TIKTOKEN_CACHE_DIR=../shared/tiktoken python -m pytest -q test_data.py

The real IMDb archive and HH sample are used when present ($DPO_IMDB or ../shared/data/...), else skipped.
"""
import collections
import gzip
import io
import json
import os
import tarfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(HERE, "..", "shared", "tiktoken"))

import pytest  # noqa: E402
import torch  # noqa: E402

import data  # noqa: E402
from data import EOS, InputError  # noqa: E402
from machinery import hub  # noqa: E402

REAL_IMDB = os.environ.get("DPO_IMDB") or os.path.join(HERE, "..", "shared", "data", "aclImdb_v1.tar.gz")
REAL_HH = os.path.join(HERE, "..", "shared", "data", "hh-rlhf", "harmless-base-test.jsonl.gz")


# ----------------------------------------------------------------------------------------------
# Tokens

def test_encode_known_ids():
    assert data.encode("Hello world") == [15496, 995]
    ids = data.encode("Hello world, this movie was great!")
    assert ids == [15496, 995, 11, 428, 3807, 373, 1049, 0]
    assert data.decode(ids) == "Hello world, this movie was great!"
    assert data.decode(torch.tensor(ids)) == "Hello world, this movie was great!"


def test_literal_endoftext_is_ordinary_text():
    ids = data.encode("a <|endoftext|> b")
    assert EOS not in ids
    assert data.decode(ids) == "a <|endoftext|> b"
    assert data.decode([EOS]) == "<|endoftext|>"


def test_get_encoding_offline_error_names_the_env_var(monkeypatch):
    def offline(name):
        raise OSError("Failed to resolve openaipublic.blob.core.windows.net")
    monkeypatch.setattr(data.tiktoken, "get_encoding", offline)
    data.get_encoding.cache_clear()
    try:
        with pytest.raises(InputError, match="TIKTOKEN_CACHE_DIR"):
            data.get_encoding()
    finally:
        monkeypatch.undo()
        data.get_encoding.cache_clear()
    assert data.encode("Hello world") == [15496, 995]


# ----------------------------------------------------------------------------------------------
# IMDb

TINY = {  # name under aclImdb/ -> text
    "train/pos/3_8.txt": "Great fun.<br /><br />Loved it.",
    "train/pos/1_10.txt": "Best film ever.",
    "train/neg/12_1.txt": "Awful<br/>really<br>bad.",
    "train/neg/2_4.txt": "Meh. \u00e9t\u00e9 <|endoftext|>",
    "test/pos/0_7.txt": "Fine.",
    "test/neg/5_3.txt": "Dull.",
    "train/unsup/0_0.txt": "unlabelled: must be ignored",
    "train/urls_pos.txt": "http://example.com",
    "README": "readme",
}


def write_tree(root, files):
    for name, text in files.items():
        p = os.path.join(root, "aclImdb", name)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "w", encoding="utf-8") as f:
            f.write(text)


def write_archive(path, files):
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            raw = text.encode("utf-8")
            info = tarfile.TarInfo("aclImdb/" + name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return str(path)


@pytest.fixture
def tiny_archive(tmp_path):
    return write_archive(tmp_path / "aclImdb_v1.tar.gz", TINY)


def test_read_imdb_tiny_archive(tiny_archive):
    train = data.read_imdb("train", tiny_archive)
    assert [(r["label"], r["id"], r["rating"]) for r in train] == [(0, 2, 4), (0, 12, 1), (1, 1, 10), (1, 3, 8)]
    texts = {r["id"]: r["text"] for r in train}
    assert texts[3] == "Great fun.\n\nLoved it."
    assert texts[12] == "Awful\nreally\nbad."
    assert texts[2] == "Meh. \u00e9t\u00e9 <|endoftext|>"
    test = data.read_imdb("test", tiny_archive)
    assert [(r["label"], r["id"], r["rating"], r["text"]) for r in test] == [(0, 5, 3, "Dull."), (1, 0, 7, "Fine.")]
    with pytest.raises(ValueError):
        data.read_imdb("unsup", tiny_archive)


def test_read_imdb_folder_matches_archive(tmp_path, tiny_archive):
    write_tree(tmp_path / "x", TINY)
    for split in ("train", "test"):
        want = data.read_imdb(split, tiny_archive)
        assert data.read_imdb(split, str(tmp_path / "x")) == want  # the parent of aclImdb/
        assert data.read_imdb(split, str(tmp_path / "x" / "aclImdb")) == want  # aclImdb/ itself


def test_read_imdb_returns_copies(tiny_archive):
    data.read_imdb("train", tiny_archive)[0]["text"] = "edited"
    assert data.read_imdb("train", tiny_archive)[0]["text"] != "edited"


def test_imdb_bad_inputs_name_the_path(tmp_path, tiny_archive):
    missing = str(tmp_path / "nope.tar.gz")
    with pytest.raises(InputError, match="nope.tar.gz"):
        data.read_imdb("train", missing)

    raw = open(tiny_archive, "rb").read()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match="cut.tar.gz.*truncated"):
        data.read_imdb("train", str(cut))

    garbage = tmp_path / "garbage.tar.gz"
    garbage.write_bytes(b"this is not an archive\n" * 10)
    with pytest.raises(InputError, match="garbage.tar.gz"):
        data.read_imdb("train", str(garbage))

    empty = write_archive(tmp_path / "empty.tar.gz", {"README": "x", "train/unsup/0_0.txt": "y"})
    with pytest.raises(InputError, match="empty.tar.gz: no train reviews"):
        data.read_imdb("train", empty)

    (tmp_path / "emptydir").mkdir()
    with pytest.raises(InputError, match="emptydir: no test reviews"):
        data.read_imdb("test", str(tmp_path / "emptydir"))


def test_imdb_path_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_IMDB", "/from/env")
    assert hub.imdb_path("/from/arg") == "/from/arg"
    assert hub.imdb_path() == "/from/env"
    monkeypatch.delenv("DPO_IMDB")
    monkeypatch.setenv("DPO_CACHE", str(tmp_path))
    calls = []

    def offline(url, dest, what=None):  # as model.download words it
        calls.append((url, dest))
        raise InputError(f"cannot download {url} (no network); you seem to be offline: download it by hand to {dest}")
    monkeypatch.setattr(hub, "download", offline)
    with pytest.raises(InputError) as e:
        hub.imdb_path()
    assert calls == [(data.IMDB_URL, str(tmp_path / "aclImdb_v1.tar.gz"))]
    assert data.IMDB_URL in str(e.value) and "DPO_IMDB" in str(e.value) and str(tmp_path) in str(e.value)
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def real_imdb():
    if not os.path.exists(REAL_IMDB):
        pytest.skip(f"real IMDb archive not found at {REAL_IMDB} (set DPO_IMDB)")
    t0 = time.time()
    splits = {split: data.read_imdb(split, REAL_IMDB) for split in ("train", "test")}
    print(f"read both IMDb splits in {time.time() - t0:.1f} s")
    return splits


@pytest.mark.parametrize("split,hist", [
    ("train", {1: {7: 2496, 8: 3009, 9: 2263, 10: 4732}, 0: {1: 5100, 2: 2284, 3: 2420, 4: 2696}}),
    ("test", {1: {7: 2307, 8: 2850, 9: 2344, 10: 4999}, 0: {1: 5022, 2: 2302, 3: 2541, 4: 2635}}),
])
def test_real_imdb(real_imdb, split, hist):
    rows = real_imdb[split]
    assert len(rows) == 25_000
    assert collections.Counter(r["label"] for r in rows) == {0: 12_500, 1: 12_500}
    for label in (0, 1):
        assert collections.Counter(r["rating"] for r in rows if r["label"] == label) == hist[label]
        assert sorted(r["id"] for r in rows if r["label"] == label) == list(range(12_500))
    assert not any("<br" in r["text"] for r in rows)
    assert rows == sorted(rows, key=lambda r: (r["label"], r["id"]))


# ----------------------------------------------------------------------------------------------
# JSONL pairs

def write_lines(path, lines, gz=False):
    raw = b"".join((ln if isinstance(ln, bytes) else ln.encode("utf-8")) + b"\n" for ln in lines)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return str(path)


GOOD = [json.dumps({"prompt": "Q: 2+2?\nA:", "chosen": " 4", "rejected": " 5", "extra": 1}),
        "",
        json.dumps({"prompt": "Say hi", "chosen": " hi \u00e9", "rejected": " no"})]


@pytest.mark.parametrize("gz", [False, True])
def test_read_jsonl_pairs_good(tmp_path, gz):
    pairs = data.read_jsonl_pairs(write_lines(tmp_path / "p.jsonl", GOOD, gz))
    assert pairs == [{"prompt": "Q: 2+2?\nA:", "chosen": " 4", "rejected": " 5"},
                     {"prompt": "Say hi", "chosen": " hi \u00e9", "rejected": " no"}]


@pytest.mark.parametrize("bad,what", [  # the bad line is line 4, after GOOD
    ('{"prompt": "a", "chosen": "b", "rejected": "c"', "invalid JSON"),
    ('["a", "b", "c"]', "expected a JSON object, got an array"),
    ('{"prompt": "a", "chosen": "b"}', 'missing key "rejected"'),
    ('{"prompt": "a", "choosen": "b", "rejected": "c"}', 'missing key "chosen"; did you mean "choosen"'),
    ('{"prompt": "a", "chosen": 1, "rejected": "c"}', '"chosen" is a number, not a string'),
    ('{"prompt": "a", "chosen": "b", "rejected": null}', '"rejected" is null, not a string'),
    ('{"prompt": "a", "chosen": "", "rejected": "c"}', '"chosen" is empty'),
    ('{"prompt": "", "chosen": "b", "rejected": "c"}', '"prompt" is empty'),
    (b'{"prompt": "a", "chosen": "caf\xe9", "rejected": "c"}', "not valid UTF-8"),
])
def test_read_jsonl_pairs_errors_name_file_and_line(tmp_path, bad, what):
    path = write_lines(tmp_path / "bad.jsonl", GOOD + [bad])
    with pytest.raises(InputError) as e:
        data.read_jsonl_pairs(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:4: ") and what in msg and "\n" not in msg, msg


def test_read_jsonl_pairs_empty_missing_and_truncated(tmp_path):
    with pytest.raises(InputError, match="empty.jsonl: no pairs"):
        data.read_jsonl_pairs(write_lines(tmp_path / "empty.jsonl", ["", "  "]))
    with pytest.raises(InputError, match="missing.jsonl: cannot open"):
        data.read_jsonl_pairs(str(tmp_path / "missing.jsonl"))
    raw = gzip.compress(("\n".join(GOOD * 50) + "\n").encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match="cut.jsonl.gz"):
        data.read_jsonl_pairs(str(tmp_path / "cut.jsonl.gz"))


def test_identical_pairs_are_kept_and_warned(tmp_path, capsys):
    same = json.dumps({"prompt": "p", "chosen": " same", "rejected": " same"})
    pairs = data.read_jsonl_pairs(write_lines(tmp_path / "s.jsonl", GOOD + [same, same]))
    assert len(pairs) == 4
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "2 pairs have identical chosen and rejected" in err
    data.read_jsonl_pairs(write_lines(tmp_path / "g.jsonl", GOOD))
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------------------------
# Anthropic HH

H, A = "\n\nHuman:", "\n\nAssistant:"


def test_split_hh_single_turn():
    prompt, c, r = data.split_hh(f"{H} Hi?{A} Sure, hello.", f"{H} Hi?{A} Go away.")
    assert (prompt, c, r) == (f"{H} Hi?{A}", " Sure, hello.", " Go away.")


def test_split_hh_uses_last_shared_assistant():
    shared = f"{H} Q1{A} A1{H} Q2{A}"
    # the responses start alike (" I") and "\n\nAssistant:" occurs earlier too: the prompt stops at the last one
    prompt, c, r = data.split_hh(shared + " I can help.", shared + " I won't.")
    assert (prompt, c, r) == (shared, " I can help.", " I won't.")
    # transcripts that differ in an earlier turn: the prompt ends at the last Assistant they share
    prompt, c, r = data.split_hh(f"{H} Q1{A} Yes{H} Q2{A} A2", f"{H} Q1{A} No{H} Q2{A} A2")
    assert (prompt, c, r) == (f"{H} Q1{A}", f" Yes{H} Q2{A} A2", f" No{H} Q2{A} A2")
    # identical transcripts: everything through the last Assistant is prompt
    assert data.split_hh(shared + " x", shared + " x") == (shared, " x", " x")


def test_split_hh_without_assistant_raises():
    with pytest.raises(ValueError, match="Assistant"):
        data.split_hh(f"{H} hello", f"{H} bye")
    with pytest.raises(ValueError):  # an Assistant turn, but not in the shared start
        data.split_hh(f"{H} a{A} x", f"{H} b{A} x")


def hh_line(c, r):
    return json.dumps({"chosen": c, "rejected": r})


def test_read_hh_local_file_and_errors(tmp_path):
    good = [hh_line(f"{H} Hi{A} Hello", f"{H} Hi{A} No")]
    path = write_lines(tmp_path / "hh.jsonl.gz", good, gz=True)
    assert data.read_hh(path) == [{"prompt": f"{H} Hi{A}", "chosen": " Hello", "rejected": " No"}]
    bad = write_lines(tmp_path / "bad.jsonl", good + [hh_line(f"{H} a", f"{H} b")])
    with pytest.raises(InputError, match=r"bad.jsonl:2: no .*Assistant"):
        data.read_hh(bad)
    bad = write_lines(tmp_path / "bad2.jsonl", good + [json.dumps({"chosen": "x", "rejcted": "y"})])
    with pytest.raises(InputError, match=r'bad2.jsonl:2: missing key "rejected"; did you mean "rejcted"'):
        data.read_hh(bad)
    with pytest.raises(InputError, match="not a name like"):
        data.read_hh(hub.hh_path(str(tmp_path / "missing.jsonl")))
    with pytest.raises(InputError, match="unknown HH subset"):
        data.read_hh(hub.hh_path("harmful-base/test"))


def test_read_hh_names(tmp_path, monkeypatch):
    line = [hh_line(f"{H} Hi{A} Hello", f"{H} Hi{A} No")]
    (tmp_path / "hh" / "helpful-base").mkdir(parents=True)
    write_lines(tmp_path / "hh" / "helpful-base" / "train.jsonl.gz", line, gz=True)
    write_lines(tmp_path / "hh" / "harmless-base-test.jsonl.gz", line, gz=True)
    monkeypatch.setenv("DPO_HH", str(tmp_path / "hh"))
    assert len(data.read_hh(hub.hh_path("helpful-base/train"))) == 1
    assert len(data.read_hh(hub.hh_path("harmless-base/test"))) == 1
    with pytest.raises(InputError, match="DPO_HH="):
        data.read_hh(hub.hh_path("helpful-online/test"))

    monkeypatch.delenv("DPO_HH")
    monkeypatch.setenv("DPO_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_download(url, dest, what=None):
        calls.append((url, dest))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        write_lines(type(tmp_path)(dest), line, gz=True)
        return dest
    monkeypatch.setattr(hub, "download", fake_download)
    assert len(data.read_hh(hub.hh_path("helpful-online/test"))) == 1
    assert calls == [("https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main/helpful-online/test.jsonl.gz",
                      str(tmp_path / "cache" / "hh-rlhf" / "helpful-online" / "test.jsonl.gz"))]

    def offline(url, dest, what=None):
        raise InputError(f"cannot download {url} (no network); you seem to be offline: download it by hand to {dest}")
    monkeypatch.setattr(hub, "download", offline)
    with pytest.raises(InputError, match=r"helpful-base/test.jsonl.gz.*set DPO_HH to a folder holding"):
        data.read_hh(hub.hh_path("helpful-base/test"))


def test_read_hh_real_sample():
    if not os.path.exists(REAL_HH):
        pytest.skip(f"HH sample not found at {REAL_HH}")
    with gzip.open(REAL_HH, "rt", encoding="utf-8") as f:
        raw = [json.loads(line) for line in f]
    pairs = data.read_hh(REAL_HH)
    assert len(pairs) == len(raw) == 2312
    for p, r in zip(pairs, raw):
        assert p["prompt"].endswith("\n\nAssistant:")
        assert p["prompt"] + p["chosen"] == r["chosen"]
        assert p["prompt"] + p["rejected"] == r["rejected"]


# ----------------------------------------------------------------------------------------------
# Tokenised pairs, masks, batches

PAIRS = [("Q: 2+2?\nA:", " 4", " five, I think"),
         ("Review: This movie was", " great! Loved it.", " bad."),
         ("x", " <|endoftext|> literal", " y")]


def test_collate_masks_select_exactly_the_responses():
    items = [data.tokenize_pair(*p) for p in PAIRS]
    batch = data.collate_pairs(items)
    B = len(PAIRS)
    ids, att, loss = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    lens = [len(data.encode(p)) + len(data.encode(r)) + 1 for p, c, r in PAIRS for r in (c, r)]
    assert ids.shape == att.shape == loss.shape == (2 * B, max(lens))
    assert ids.dtype == att.dtype == torch.long and loss.dtype == torch.bool
    for i in range(2 * B):
        prompt, chosen, rejected = PAIRS[i % B]
        response = chosen if i < B else rejected
        assert data.decode(ids[i][loss[i]]) == response + "<|endoftext|>"
        n = int(att[i].sum())
        assert att[i, :n].all() and not att[i, n:].any() and (ids[i, n:] == EOS).all()
        assert data.decode(ids[i, : batch["prompt_lens"][i]]) == prompt
        assert batch["prompt_lens"][i] + batch["response_lens"][i] == n
        assert not loss[i, : batch["prompt_lens"][i]].any() and not loss[i, n:].any()


def test_collate_pad_id_and_errors():
    item = {"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5, 6]}
    batch = data.collate_pairs([item], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0, 0], [1, 2, 4, 5, 6]]
    assert batch["loss_mask"].tolist() == [[False, False, True, False, False], [False, False, True, True, True]]
    with pytest.raises(ValueError, match="empty prompt"):
        data.collate_pairs([{"prompt_ids": [], "chosen_ids": [3], "rejected_ids": [4]}])
    with pytest.raises(ValueError):
        data.collate_pairs([])


def test_tokenize_pair_no_truncation():
    out = data.tokenize_pair("Hello", " world", " there")
    assert out == {"prompt_ids": [15496], "chosen_ids": [995, EOS], "rejected_ids": data.encode(" there") + [EOS],
                   "truncated": False}


def test_tokenize_pair_separate_tokenisation():
    # no merge across the boundary: separate == joint
    out = data.tokenize_pair("Hello", " world", " x")
    assert out["prompt_ids"] + out["chosen_ids"][:-1] == data.encode("Hello world")
    # a prompt ending mid-word: jointly "Hello" is one token, separately "Hel" + "lo"
    out = data.tokenize_pair("Hel", "lo world", " x")
    assert out["prompt_ids"] == data.encode("Hel")
    assert out["chosen_ids"][:-1] == data.encode("lo world")
    assert out["prompt_ids"] + out["chosen_ids"][:-1] != data.encode("Hello world")


def test_tokenize_pair_truncation():
    prompt = " ".join(f"p{i}" for i in range(200))
    long_c, long_r = " yes" * 100, " no" * 80
    P, C, R = data.encode(prompt), data.encode(long_c) + [EOS], data.encode(long_r) + [EOS]
    assert len(P) > 64 and len(C) > 64

    out = data.tokenize_pair(prompt, long_c, long_r, max_length=128, max_prompt_length=64)
    assert out["prompt_ids"] == P[-64:] and out["truncated"]
    assert out["chosen_ids"] == C[:64] and out["rejected_ids"] == R[:64]
    assert data.decode(out["prompt_ids"]).endswith("p199")

    out = data.tokenize_pair(prompt, long_c, long_r, max_length=128, max_prompt_length=64, truncation_mode="keep_start")
    assert out["prompt_ids"] == P[:64] and data.decode(out["prompt_ids"]).startswith("p0")

    # short prompt, long responses: only the responses are cut, to max_length - len(prompt)
    out = data.tokenize_pair("Q:", long_c, " ok", max_length=50, max_prompt_length=20)
    assert out["prompt_ids"] == data.encode("Q:") and len(out["chosen_ids"]) == 50 - len(out["prompt_ids"])
    assert out["rejected_ids"] == data.encode(" ok") + [EOS] and out["truncated"]

    # long prompt, short responses that then fit: only the prompt is cut
    out = data.tokenize_pair(prompt, " a", " b", max_length=128, max_prompt_length=64)
    assert out["prompt_ids"] == P[-64:] and out["chosen_ids"] == data.encode(" a") + [EOS]

    # the tightest setting still leaves one response token, and every row fits
    for max_length, max_prompt in [(5, 4), (2, 1), (128, 64), (300, 100)]:
        out = data.tokenize_pair(prompt, long_c, long_r, max_length=max_length, max_prompt_length=max_prompt)
        batch = data.collate_pairs([out])
        assert batch["input_ids"].shape[1] <= max_length
        assert (batch["response_lens"] >= 1).all()
    with pytest.raises(ValueError, match="max_prompt_length"):
        data.tokenize_pair("a", "b", "c", max_length=64, max_prompt_length=64)
    with pytest.raises(ValueError, match="truncation_mode"):
        data.tokenize_pair("a", "b", "c", truncation_mode="middle")


def test_batches_deterministic_and_complete():
    items = list(range(23))
    run = lambda seed, **kw: list(data.batches(items, 5, generator=torch.Generator().manual_seed(seed), **kw))
    state = torch.get_rng_state()
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is untouched
    assert a == b and a != c
    assert sum(a, []) == torch.randperm(23, generator=torch.Generator().manual_seed(0)).tolist()
    assert [len(x) for x in a] == [5, 5, 5, 5, 3]
    assert sorted(sum(a, [])) == items and sum(a, []) != items
    assert [len(x) for x in run(0, drop_last=True)] == [5, 5, 5, 5]
    assert list(data.batches(items, 10, shuffle=False)) == [items[:10], items[10:20], items[20:]]
    assert list(data.batches(items[:11], 5, shuffle=False)) == [items[:5], items[5:10], [10]]
    with pytest.raises(ValueError, match="generator"):
        data.batches(items, 5)  # raised at the call, not at the first next()


def test_left_pad():
    ids, mask = data.left_pad([[1, 2, 3], [4], []])
    assert ids.tolist() == [[1, 2, 3], [EOS, EOS, 4], [EOS, EOS, EOS]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long
