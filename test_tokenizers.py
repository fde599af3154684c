"""Tests for the tokenizers of other models (machinery/tokenizers.py): a byte-level BPE tokenizer.json converted
to tiktoken, with ids remapped as in GPT-NeoX/Pythia, and RoBERTa's ids from GPT-2 tokens; and eval.RobertaReward.

    TIKTOKEN_CACHE_DIR=../shared/tiktoken python -m pytest -q test_tokenizers.py

The oracles are the `tokenizers` library (encode/decode of the same tokenizer.json) and transformers'
RoBERTa tokenizer and RobertaForSequenceClassification (random weights), all test-only and offline: the
tokenizers are trained here or built from GPT-2's BPE files in the tiktoken cache.
"""
import hashlib
import json
import os
import random
import unicodedata

HERE = os.path.dirname(os.path.abspath(__file__))
os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(HERE, "..", "shared", "tiktoken"))

import pytest  # noqa: E402
import torch  # noqa: E402

import data  # noqa: E402
from data import EOS, InputError  # noqa: E402
import machinery.tokenizers as mtok  # noqa: E402  (ours; `tokenizers` is the oracle)

tokenizers = pytest.importorskip("tokenizers", reason="tokenizers (test-only oracle) is not installed")

# Text that exercises the regex split, the byte-level alphabet and the added tokens.
FRAGMENTS = ["the", " movie", "Don't", " I'll", " they're", " we've", "'s", "'S", "café", " naïve", "Ærø", " Straße",
             "日本語", "中文字", "😀", "👍🏽", "e\u0301", "ﬁne", "123", " 3.14", "1,000", "٣٤", "!!!", "?!", "...", "(", ")",
             '"', "'", "-", "—", "<br />", "<|endoftext|>", "<|padding|>", "<|endof", " ", "  ", "   ", "    ", "\t",
             "\n", "\n\n", "\r\n", " \n ", "\u00a0", "\u3000", "\u2028", "\u0085", "\u200b", "\x0b", "\x0c", "\x00"]
TEXTS = ["Hello world", "", " ", "  leading spaces", "trailing spaces   ", "  both  ", "a  b   c    d", "line\nbreak\n",
         "\n\nparagraph\n\n\n", "tab\tseparated\t\tvalues\t", "mixed \t\n \n\t end", "café naïve résumé", "日本語のテキスト",
         "emoji 😀👍🏽🇫🇷 end", "digits 0123456789 and 3.14159, 1,000,000", "punctuation!?.,;:()[]{}<>@#$%^&*~`|\\/",
         "contractions: I'm, you're, it's, we'll, they've, he'd, can't, DON'T", "combining e\u0301 vs é",
         "<|endoftext|> in the middle <|endoftext|>", "x<|padding|>y", "twenty-four spaces:" + " " * 24 + "end"]


def fuzz_texts(n, seed):
    rng = random.Random(seed)
    return ["".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 20))) for _ in range(n)]


def gpt2_file(url_tail):
    """GPT-2's vocab.bpe / encoder.json from the tiktoken cache (tiktoken names each file sha1(url))."""
    url = f"https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/{url_tail}"
    path = os.path.join(os.environ["TIKTOKEN_CACHE_DIR"], hashlib.sha1(url.encode()).hexdigest())
    if not os.path.exists(path):
        pytest.skip(f"GPT-2's {url_tail} is not in the tiktoken cache {os.environ['TIKTOKEN_CACHE_DIR']}")
    return path


def gpt2_merges():
    with open(gpt2_file("vocab.bpe"), encoding="utf-8") as f:
        return [tuple(line.split()) for line in f.read().split("\n")[1:] if line]


def gpt2_vocab():
    with open(gpt2_file("encoder.json"), encoding="utf-8") as f:
        return json.load(f)


def hf_tokenizer(vocab, merges, normalizer=None, add_prefix_space=False, special=(), added=()):
    """A `tokenizers` byte-level BPE: the reference implementation the conversion must agree with."""
    from tokenizers import decoders, models, normalizers, pre_tokenizers
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    tok.decoder = decoders.ByteLevel()
    if normalizer:
        tok.normalizer = getattr(normalizers, normalizer)()
    tok.add_special_tokens(list(special))
    tok.add_tokens(list(added))
    return tok


def neox_like(vocab, seed=0):
    """The same tokens under shuffled ids, <|endoftext|> at 0 and <|padding|> at 1 (as in GPT-NeoX/Pythia): ids no
    longer follow merge order, and the bytes are not at 0..255."""
    rest = [t for t in vocab if t not in ("<|endoftext|>", "<|padding|>")]
    random.Random(seed).shuffle(rest)
    return {"<|endoftext|>": 0, "<|padding|>": 1, **{t: i + 2 for i, t in enumerate(rest)}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small byte-level BPE trained by `tokenizers` (ids in merge order, specials at 0 and 1, NFC, runs of spaces
    as added tokens, like NeoX), and the same tokenizer with its ids shuffled and with add_prefix_space."""
    from tokenizers import pre_tokenizers, trainers
    folder = tmp_path_factory.mktemp("bpe")
    tok = hf_tokenizer({}, [], normalizer="NFC")
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<|endoftext|>", "<|padding|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        corpus = [f.read()] + fuzz_texts(300, seed=1)
    tok.train_from_iterator(corpus, trainer)
    tok.add_tokens(["  ", "    ", " " * 24])
    paths = {"trained": str(folder / "trained.json")}
    tok.save(paths["trained"])
    spec = json.load(open(paths["trained"]))
    vocab, merges = spec["model"]["vocab"], [tuple(m) if isinstance(m, list) else tuple(m.split(" "))
                                              for m in spec["model"]["merges"]]
    for name, kw in [("permuted", dict(normalizer="NFC")), ("prefix_space", dict(add_prefix_space=True))]:
        hf = hf_tokenizer(neox_like(vocab, seed=len(name)), merges, special=["<|endoftext|>", "<|padding|>"],
                          added=["  ", "    "], **kw)
        paths[name] = str(folder / f"{name}.json")
        hf.save(paths[name])
    return paths


def hf_encode(hf, text, allow_special=False):
    hf.encode_special_tokens = not allow_special  # our default: a literal "<|endoftext|>" is ordinary text
    return hf.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("which", ["trained", "permuted", "prefix_space"])
def test_converted_tokenizer_matches_tokenizers(trained, which):
    hf = tokenizers.Tokenizer.from_file(trained[which])
    tok = mtok.tokenizer_from_json(trained[which])
    if which != "trained":  # the ids really are out of merge order
        assert tok.to_id[256:] != sorted(tok.to_id[256:])
    assert tok.eos_id == 0 and tok.vocab_size == hf.get_vocab_size(with_added_tokens=True)
    normalize = (lambda t: t) if which == "prefix_space" else (lambda t: unicodedata.normalize("NFC", t))
    for text in TEXTS + fuzz_texts(150, seed=2):
        ids = tok.encode(text)
        assert ids == hf_encode(hf, text), repr(text)
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=False), repr(text)
        if which != "prefix_space":
            assert tok.decode(ids) == normalize(text), repr(text)  # round trip, up to NFC
        assert tok.encode(text, allow_special=True) == hf_encode(hf, text, allow_special=True), repr(text)


def test_special_tokens(trained):
    tok = mtok.tokenizer_from_json(trained["permuted"])
    plain = tok.encode("a<|endoftext|>b<|padding|>")
    assert 0 not in plain and 1 not in plain and tok.decode(plain) == "a<|endoftext|>b<|padding|>"
    ids = tok.encode("a<|endoftext|>b<|padding|>", allow_special=True)
    assert ids[1] == 0 and ids[-1] == 1 and tok.decode(ids) == "a<|endoftext|>b<|padding|>"
    assert tok.encode("x  y") == [tok.encode("x")[0], tok.added["  "], tok.encode("y")[0]]  # an added run of spaces
    assert tok.decode(torch.tensor([0, 1])) == "<|endoftext|><|padding|>"
    assert tok.decode([10**6]) == ""  # an id with no token (a padded embedding row) decodes to nothing
    assert mtok.tokenizer_from_json(trained["permuted"], eos_id=1).eos_id == 1


def test_gpt2_sized_neox_permutation(tmp_path):
    """GPT-2's 50,000 merges under NeoX-like ids, NFC and runs of spaces as added tokens: equal to `tokenizers`;
    and the tokenizer.json of GPT-2 itself loads as tiktoken's GPT-2."""
    vocab, merges = gpt2_vocab(), gpt2_merges()
    hf = hf_tokenizer(neox_like({**vocab, "<|padding|>": len(vocab)}), merges, normalizer="NFC",
                      special=["<|endoftext|>", "<|padding|>"], added=[" " * n for n in (2, 4, 8, 24)])
    hf.save(str(tmp_path / "neox.json"))
    tok = mtok.tokenizer_from_json(str(tmp_path / "neox.json"))
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    for text in TEXTS + fuzz_texts(100, seed=3) + [readme]:
        assert tok.encode(text) == hf_encode(hf, text), repr(text[:80])
        assert tok.encode(text, allow_special=True) == hf_encode(hf, text, allow_special=True), repr(text[:80])
    ids = tok.encode(readme)
    assert tok.decode(ids) == unicodedata.normalize("NFC", readme)

    os.makedirs(tmp_path / "gpt2")
    hf_tokenizer(vocab, merges, special=["<|endoftext|>"]).save(str(tmp_path / "gpt2" / "tokenizer.json"))
    converted = mtok.tokenizer_from_json(str(tmp_path / "gpt2" / "tokenizer.json"))
    for text in TEXTS + [readme]:
        assert converted.encode(text) == data.encode(text)  # the conversion of GPT-2 is GPT-2
    assert mtok.load_tokenizer(str(tmp_path / "gpt2")) is mtok.gpt2_tokenizer()
    os.makedirs(tmp_path / "neox")
    os.replace(tmp_path / "neox.json", tmp_path / "neox" / "tokenizer.json")
    with open(tmp_path / "neox" / "config.json", "w") as f:
        json.dump({"eos_token_id": 0}, f)
    neox = mtok.load_tokenizer(str(tmp_path / "neox"))
    assert neox.eos_id == 0 and neox.encode("Hello world") == hf_encode(hf, "Hello world")


def test_load_tokenizer_gpt2_cases(tmp_path):
    gpt2 = mtok.gpt2_tokenizer()
    assert gpt2.eos_id == EOS and gpt2.vocab_size == 50257 and gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.decode([15496, 995, EOS]) == "Hello world<|endoftext|>"
    assert gpt2.encode("<|endoftext|>", allow_special=True) == [EOS] and EOS not in gpt2.encode("<|endoftext|>")
    for spec in (None, "gpt2", "openai-community/gpt2-large", "random:2,2,64", "scratch", str(tmp_path)):
        assert mtok.load_tokenizer(spec) is gpt2  # no tokenizer.json in tmp_path: our checkpoints are GPT-2's


def test_unsupported_tokenizer_json(tmp_path):
    from tokenizers import models
    tokenizers.Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")).save(str(tmp_path / "wp.json"))
    with pytest.raises(InputError, match="model type 'WordPiece' is not supported"):
        mtok.tokenizer_from_json(str(tmp_path / "wp.json"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(InputError, match="not a readable tokenizer.json"):
        mtok.tokenizer_from_json(str(tmp_path / "bad.json"))


def test_tokenize_pair_with_another_tokenizer(trained):
    tok = mtok.tokenizer_from_json(trained["permuted"])
    item = data.tokenize_pair("Review: the movie", " was great", " was bad", tokenizer=tok)
    assert item["prompt_ids"] == tok.encode("Review: the movie")
    assert item["chosen_ids"] == tok.encode(" was great") + [0] and item["rejected_ids"][-1] == 0
    assert data.tokenize_pair("a", "b", "c") == data.tokenize_pair("a", "b", "c", tokenizer=mtok.gpt2_tokenizer())


# ----------------------------------------------------------------------------------------------
# RoBERTa: GPT-2's BPE with RoBERTa's ids

@pytest.fixture(scope="module")
def roberta_files(tmp_path_factory):
    """A vocab.json with GPT-2's tokens under RoBERTa-like ids (<s> 0, <pad> 1, </s> 2, <unk> 3, the rest
    shuffled, <mask> last) and GPT-2's merges as merges.txt."""
    folder = tmp_path_factory.mktemp("roberta")
    tokens = [t for t in gpt2_vocab() if t != "<|endoftext|>"]
    random.Random(0).shuffle(tokens)
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, **{t: i + 4 for i, t in enumerate(tokens)}}
    vocab["<mask>"] = len(vocab)
    with open(folder / "vocab.json", "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(folder / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in gpt2_merges()))
    return str(folder / "vocab.json"), str(folder / "merges.txt"), vocab


def roberta_oracle(vocab_json, merges_txt):
    transformers = pytest.importorskip("transformers", reason="transformers (test-only oracle) is not installed")
    assert os.path.dirname(vocab_json) == os.path.dirname(merges_txt)
    return transformers.RobertaTokenizerFast.from_pretrained(os.path.dirname(vocab_json))  # a local folder: offline


def test_roberta_ids_match_transformers(roberta_files):
    vocab_json, merges_txt, vocab = roberta_files
    oracle = roberta_oracle(vocab_json, merges_txt)
    texts = [t for t in TEXTS + fuzz_texts(100, seed=4) if t] + ["a long review " * 40]
    for max_len in (512, 16):
        ids, mask = mtok.roberta_ids_from_gpt2([data.encode(t) for t in texts], vocab_json, max_len=max_len)
        want = oracle(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        assert torch.equal(ids, want["input_ids"]) and torch.equal(mask, want["attention_mask"])
    # an independent plain loop for one text, EOS dropped, and the framing of an empty list
    text = "I loved this film! 😀"
    by_hand = [vocab["".join(mtok.byte_alphabet()[b] for b in data.get_encoding().decode_single_token_bytes(t))]
               for t in data.encode(text)]
    ids, mask = mtok.roberta_ids_from_gpt2([[EOS] + data.encode(text) + [EOS], []], vocab_json)
    assert ids[0].tolist() == [0] + by_hand + [2] and ids[1].tolist() == [0, 2] + [1] * len(by_hand)
    assert mask.sum(1).tolist() == [len(by_hand) + 2, 2]


def test_byte_alphabet():
    alphabet = mtok.byte_alphabet()
    assert len(set(alphabet)) == 256 and alphabet[ord(" ")] == "Ġ" and alphabet[ord("\n")] == "Ċ" and alphabet[65] == "A"
    assert mtok.token_bytes("Ġthe") == b" the" and mtok.token_bytes("".join(alphabet)) == bytes(range(256))
    vocab = gpt2_vocab()  # GPT-2's own file spells every token in this alphabet
    assert all(mtok.token_bytes(t) == data.get_encoding().decode_single_token_bytes(i) for t, i in vocab.items()
               if i != EOS)


# ----------------------------------------------------------------------------------------------
# eval.RobertaReward on a random RobertaForSequenceClassification

def test_positive_label(tmp_path):
    import eval as ev
    for id2label, want in [({"0": "NEGATIVE", "1": "POSITIVE"}, 1), ({"0": "POSITIVE", "1": "NEGATIVE"}, 0),
                           ({"0": "LABEL_0", "1": "LABEL_1"}, 1)]:
        (tmp_path / "config.json").write_text(json.dumps({"id2label": id2label}))
        assert ev.positive_label(str(tmp_path / "config.json")) == want
    (tmp_path / "config.json").write_text(json.dumps({"id2label": {"0": "joy", "1": "anger"}}))
    with pytest.raises(InputError, match="no positive class"):
        ev.positive_label(str(tmp_path / "config.json"))


def test_roberta_reward_matches_transformers(tmp_path, roberta_files):
    import shutil

    import eval as ev
    transformers = pytest.importorskip("transformers", reason="transformers (test-only oracle) is not installed")
    vocab_json, merges_txt, vocab = roberta_files
    torch.manual_seed(0)
    config = transformers.RobertaConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=64, max_position_embeddings=40, type_vocab_size=1,
                                        id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1})
    hf = transformers.RobertaForSequenceClassification(config).eval()
    hf.save_pretrained(str(tmp_path / "clf"))
    # what run_imdb's --reward falls back on: InputError for a missing folder or a missing vocab.json
    with pytest.raises(InputError, match="no such folder"):
        ev.RobertaReward.load(str(tmp_path / "absent"))
    with pytest.raises(InputError, match="no vocab.json"):
        ev.RobertaReward.load(str(tmp_path / "clf"))
    shutil.copy(vocab_json, tmp_path / "clf" / "vocab.json")
    reward = ev.RobertaReward.load(str(tmp_path / "clf"), batch_size=3)
    assert reward.max_len == 38 and reward.positive == 1

    texts = ["A wonderful film.", "Terrible, boring, far too long.", "", "ok " * 60, "It was 😀 and naïve", "Meh"]
    token_lists = [[EOS] + data.encode(t) for t in texts]  # prompts start with EOS; it is dropped
    token_lists[0] = [EOS] + [t for piece in ("A", " wond", "erful", " fi", "lm.") for t in data.encode(piece)]
    assert data.decode(token_lists[0]) == "<|endoftext|>" + texts[0] and token_lists[0][1:] != data.encode(texts[0])
    got = reward.score(token_lists)
    tok = roberta_oracle(vocab_json, merges_txt)
    batch = tok(texts, padding=True, truncation=True, max_length=38, return_tensors="pt")
    with torch.no_grad():
        want = hf(**batch).logits.softmax(-1)[:, 1]
    assert got.dtype == torch.float32 and got.shape == (len(texts),)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
