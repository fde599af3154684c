"""Reliability: bad input gives one clear line and exit status 2 (no traceback, nothing half-written);
a run killed with SIGKILL resumes bit-identically; a non-finite loss or gradient stops the run (or is
skipped behind --skip-nonfinite) and NaN weights are never saved.

    python -m pytest -q test_reliability.py

Most cases go through the command line, dpo.main(argv), in this process. Cases covered at the library
level elsewhere (test_data.py, test_model.py) are repeated here end to end, through the CLI, on purpose.
No test touches the network: downloads are monkeypatched.
"""
import errno
import gzip
import io
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import tarfile
import time
import types
import urllib.error

HERE = os.path.dirname(os.path.abspath(__file__))
os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(HERE, "..", "shared", "tiktoken"))

import pytest  # noqa: E402
import torch  # noqa: E402

import data  # noqa: E402
import dpo  # noqa: E402
import machinery.hf  # noqa: E402
import shutil  # noqa: E402
from data import InputError  # noqa: E402
from machinery import hub, runtime  # noqa: E402
from machinery.hf import from_pretrained, save_pretrained  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

REAL_IMDB = os.environ.get("DPO_IMDB") or os.path.join(HERE, "..", "shared", "data", "aclImdb_v1.tar.gz")
REAL_HH = os.path.join(HERE, "..", "shared", "data", "hh-rlhf", "harmless-base-test.jsonl.gz")
WORDS = "the a movie film plot actor scene story was is very quite rather and but so".split()
H, A = "\n\nHuman:", "\n\nAssistant:"


def pairs(n, seed=0):
    """Synthetic pairs: chosen responses end in ' excellent', rejected ones in ' awful'."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))
        body = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))
        out.append({"prompt": prompt, "chosen": f" {body} excellent", "rejected": f" {body} awful"})
    return out


def write_lines(path, lines, gz=False):
    raw = b"".join((ln if isinstance(ln, bytes) else ln.encode("utf-8")) + b"\n" for ln in lines)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return str(path)


def good_lines(n=16):
    return [json.dumps(p) for p in pairs(n)]


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    """dpo.main draws curves.png through eval.py (matplotlib) after a run: seconds these tests don't need."""
    monkeypatch.setitem(sys.modules, "eval", None)  # `from eval import ...` raises ImportError, which main skips


@pytest.fixture
def good(tmp_path):
    return write_lines(tmp_path / "good.jsonl", good_lines())


def args(data_path, out, *extra):
    """A tiny, fast run; later flags override earlier ones (argparse keeps the last)."""
    return ["--task", "jsonl", "--data", str(data_path), "--model", "random:1,2,32", "--out", str(out),
            "--batch-size", "4", "--micro-batch-size", "2", "--steps", "2", "--max-length", "48",
            "--max-prompt-length", "24", "--n-eval", "0", "--device", "cpu", "--optimizer", "adamw", "--lr", "1e-3",
            "--warmup-steps", "0", "--save-every", "1", *map(str, extra)]


def cli_error(capsys, argv, *expected):
    """dpo.main(argv) must return 2 and print exactly one line, `error: ...`, holding every expected piece."""
    earlier = capsys.readouterr().out
    rc = dpo.main(argv)
    captured = capsys.readouterr()
    err = captured.err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for piece in expected:
        assert piece in lines[0], lines[0]
    kept = [ln for ln in (earlier + captured.out).splitlines(True) if ln.startswith("message:")]
    print("".join(kept) + "message: " + lines[0])  # `pytest -rP` lists every case's message
    return lines[0]


def assert_nothing_written(out):
    assert not os.path.exists(out), os.listdir(out)


# ----------------------------------------------------------------------------------------------
# Bad preference data, through the CLI: file:line, what is wrong, what to do

BAD_LINES = [  # (id, the bad line 3 of the file, pieces of the message after "bad.jsonl:3: ")
    ("malformed-json", '{"prompt": "a", "chosen": "b", "rejected": "c"', ["invalid JSON", "one JSON object per line"]),
    ("not-an-object", '["a", "b", "c"]', ["expected a JSON object, got an array"]),
    ("missing-key", '{"prompt": "a", "chosen": "b"}', ['missing key "rejected"', "each line needs prompt, chosen, rejected"]),
    ("misspelt-key", '{"prompt": "a", "choosen": "b", "rejected": "c"}', ['missing key "chosen"; did you mean "choosen"? rename it']),
    ("non-string-value", '{"prompt": "a", "chosen": 1, "rejected": "c"}', ['"chosen" is a number, not a string']),
    ("null-value", '{"prompt": "a", "chosen": "b", "rejected": null}', ['"rejected" is null, not a string']),
    ("empty-prompt", '{"prompt": "", "chosen": "b", "rejected": "c"}', ['"prompt" is empty; fill it in or remove the line']),
    ("empty-chosen", '{"prompt": "a", "chosen": "", "rejected": "c"}', ['"chosen" is empty']),
    ("empty-rejected", '{"prompt": "a", "chosen": "b", "rejected": ""}', ['"rejected" is empty']),
    ("non-utf8", b'{"prompt": "a", "chosen": "caf\xe9", "rejected": "c"}', ["not valid UTF-8", "save the file as UTF-8"]),
]


@pytest.mark.parametrize("bad,expected", [b[1:] for b in BAD_LINES], ids=[b[0] for b in BAD_LINES])
def test_bad_jsonl_line(tmp_path, capsys, bad, expected):
    path = write_lines(tmp_path / "bad.jsonl", good_lines(2) + [bad] + good_lines(4))
    cli_error(capsys, args(path, tmp_path / "run"), f"{path}:3: ", *expected)
    assert_nothing_written(tmp_path / "run")


def test_empty_missing_and_truncated_data_files(tmp_path, capsys):
    empty = write_lines(tmp_path / "empty.jsonl", ["", "   "])
    cli_error(capsys, args(empty, tmp_path / "run"), f"{empty}: no pairs found")
    cli_error(capsys, args(tmp_path / "nope.jsonl", tmp_path / "run"), "nope.jsonl: cannot open (No such file", "check the path")
    raw = gzip.compress(("\n".join(good_lines(200)) + "\n").encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(raw[: len(raw) // 2])
    cli_error(capsys, args(tmp_path / "cut.jsonl.gz", tmp_path / "run"), "cut.jsonl.gz: cannot read the gzip data",
              "truncated")
    assert_nothing_written(tmp_path / "run")


def test_identical_chosen_and_rejected_are_kept_counted_and_warned(tmp_path, capsys):
    same = json.dumps({"prompt": "p", "chosen": " same", "rejected": " same"})
    path = write_lines(tmp_path / "same.jsonl", good_lines(14) + [same, same])
    capsys.readouterr()
    assert dpo.main(args(path, tmp_path / "run", "--batch-size", 16, "--micro-batch-size", 16, "--steps", 1)) == 0
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and f"{path}: 2 pairs have identical chosen and rejected" in err, err
    print("message:", err.strip())


def test_prompt_longer_than_max_length_keeps_a_response_token(tmp_path, capsys):
    """A 300-word prompt with --max-length 12: the prompt keeps its end, each response >= 1 token, and the
    first loss is log 2 (policy == reference) with a non-zero gradient: no NaN, no silent zero loss."""
    long = [{"prompt": " ".join(WORDS * 20), "chosen": " yes " * 30, "rejected": " no " * 30}] * 4 + pairs(4)
    path = write_lines(tmp_path / "long.jsonl", [json.dumps(p) for p in long])
    for p in long:
        item = data.tokenize_pair(p["prompt"], p["chosen"], p["rejected"], max_length=12, max_prompt_length=11)
        assert len(item["chosen_ids"]) >= 1 and len(item["rejected_ids"]) >= 1
        assert len(item["prompt_ids"]) + max(len(item["chosen_ids"]), len(item["rejected_ids"])) <= 12
    capsys.readouterr()
    assert dpo.main(args(path, tmp_path / "run", "--max-length", 12, "--max-prompt-length", 11,
                         "--batch-size", 8, "--micro-batch-size", 8, "--steps", 1)) == 0
    assert "train: 4 of 8 pairs truncated to max_length 12" in capsys.readouterr().out
    row = json.loads(open(tmp_path / "run" / "metrics.jsonl").readline())
    assert row["loss"] == pytest.approx(math.log(2), abs=1e-6) and math.isfinite(row["grad_norm"]) and row["grad_norm"] > 0


# ----------------------------------------------------------------------------------------------
# Anthropic HH and IMDb sources

def test_hh_transcript_without_assistant(tmp_path, capsys):
    ok = json.dumps({"chosen": f"{H} Hi{A} Hello", "rejected": f"{H} Hi{A} Go away"})
    bad = json.dumps({"chosen": f"{H} Hi there", "rejected": f"{H} Bye"})
    path = write_lines(tmp_path / "hh.jsonl", [ok, bad])
    cli_error(capsys, args(path, tmp_path / "run", "--task", "hh"), f"{path}:2: ", 'no "\\n\\nAssistant:"',
              "each transcript must hold a dialogue")
    cli_error(capsys, args("harmful-base/train", tmp_path / "run", "--task", "hh"), "unknown HH subset 'harmful-base'",
              "use one of harmless-base")
    assert_nothing_written(tmp_path / "run")


@pytest.mark.skipif(not os.path.exists(REAL_HH), reason=f"Anthropic HH sample not found at {REAL_HH}")
def test_real_hh_sample_with_one_broken_line(tmp_path, capsys):
    with gzip.open(REAL_HH, "rt", encoding="utf-8") as f:
        lines = [next(f).rstrip("\n") for _ in range(20)]
    obj = json.loads(lines[6])
    lines[6] = json.dumps({"chosen": obj["chosen"].replace("Assistant:", "Bot:"), "rejected": obj["rejected"]})
    path = write_lines(tmp_path / "hh.jsonl.gz", lines, gz=True)
    cli_error(capsys, args(path, tmp_path / "run", "--task", "hh"), f"{path}:7: ", "Assistant:")


def tiny_archive(path, n=40):
    with tarfile.open(path, "w:gz") as tar:
        for i in range(n):
            raw = (f"review {i} " + " ".join(random.Random(i).choice(WORDS) for _ in range(300))).encode()
            info = tarfile.TarInfo(f"aclImdb/train/{'pos' if i % 2 else 'neg'}/{i}_{8 if i % 2 else 2}.txt")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return str(path)


def imdb_error(path, *expected):
    with pytest.raises(InputError) as e:
        data.read_imdb("train", str(path))
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    for piece in expected:
        assert piece in msg, msg
    print("message:", msg)


def test_imdb_path_neither_archive_nor_folder(tmp_path):
    """--task imdb is being wired to data.read_imdb; these are its messages."""
    (tmp_path / "notes.txt").write_text("not an archive\n")
    imdb_error(tmp_path / "notes.txt", "not a readable .tar.gz archive", "pass the extracted aclImdb/ folder")
    imdb_error(tmp_path / "nowhere", "no such file or folder", "or set DPO_IMDB")
    (tmp_path / "somefolder").mkdir()
    imdb_error(tmp_path / "somefolder", "no train reviews found", "pass the archive")


def test_imdb_truncated_archive(tmp_path):
    raw = open(tiny_archive(tmp_path / "full.tar.gz"), "rb").read()
    (tmp_path / "cut.tar.gz").write_bytes(raw[: len(raw) // 2])
    imdb_error(tmp_path / "cut.tar.gz", "may be truncated or corrupt", "download")


@pytest.mark.skipif(not os.path.exists(REAL_IMDB), reason=f"real IMDb archive not found at {REAL_IMDB} (set DPO_IMDB)")
def test_real_imdb_archive_truncated(tmp_path):
    with open(REAL_IMDB, "rb") as f:
        (tmp_path / "aclImdb_v1.tar.gz").write_bytes(f.read(1 << 20))  # the first MiB of 28
    imdb_error(tmp_path / "aclImdb_v1.tar.gz", "truncated or corrupt", data.IMDB_URL)


# ----------------------------------------------------------------------------------------------
# Models and checkpoints

def checkpoint(folder, **shape):
    """A checkpoint as a download gives it: without the digest.json our own folders carry (test_stages.py tests
    that), so that the edits below reach the safetensors and config readers."""
    torch.manual_seed(0)
    save_pretrained(GPT(GPTConfig(**{"n_layer": 1, "n_head": 2, "n_embd": 32, **shape})), str(folder))
    os.remove(os.path.join(folder, "digest.json"))
    return str(folder)


def test_truncated_checkpoint(tmp_path, good, capsys):
    ck = checkpoint(tmp_path / "ck")
    raw = (tmp_path / "ck" / "model.safetensors").read_bytes()
    (tmp_path / "ck" / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    cli_error(capsys, args(good, tmp_path / "run", "--model", ck), "ck/model.safetensors", "truncated", "download it again")
    (tmp_path / "ck" / "model.safetensors").write_bytes(raw[:5])
    cli_error(capsys, args(good, tmp_path / "run", "--model", ck), "not a safetensors file, or truncated")
    assert_nothing_written(tmp_path / "run")


def test_checkpoint_from_another_architecture(tmp_path, good, capsys):
    """Weights of a 64-channel model under a 32-channel config.json: the first key, with both shapes."""
    ck = checkpoint(tmp_path / "ck")
    checkpoint(tmp_path / "wide", n_embd=64)
    os.replace(tmp_path / "wide" / "model.safetensors", tmp_path / "ck" / "model.safetensors")
    cli_error(capsys, args(good, tmp_path / "run", "--model", ck), "transformer.wte.weight has shape (50257, 64)",
              "expects (50257, 32)", "belong to different models")
    checkpoint(tmp_path / "deep", n_layer=2)  # two layers of weights, a one-layer config.json
    os.replace(tmp_path / "deep" / "model.safetensors", tmp_path / "ck" / "model.safetensors")
    cli_error(capsys, args(good, tmp_path / "run", "--model", ck), "unknown key 'transformer.h.1.", "for a 1-layer GPT-2")


@pytest.mark.parametrize("edit,expected", [
    ({"model_type": "llama"}, "model_type 'llama' is not supported; pass a GPT-2 checkpoint"),
    ({"n_layer": None}, "no integer n_layer; copy config.json"),
], ids=["unknown-model-type", "missing-key"])
def test_bad_config_json(tmp_path, good, capsys, edit, expected):
    ck = checkpoint(tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    (tmp_path / "ck" / "config.json").write_text(json.dumps({k: v for k, v in {**cfg, **edit}.items() if v is not None}))
    cli_error(capsys, args(good, tmp_path / "run", "--model", ck), "ck/config.json: ", expected)


def test_model_incompatible_with_the_data(tmp_path, good, capsys):
    small_vocab = checkpoint(tmp_path / "v", vocab_size=101)
    cli_error(capsys, args(good, tmp_path / "run", "--model", small_vocab), "a vocabulary of 101 tokens",
              "pass a model that uses that tokenizer")
    short = checkpoint(tmp_path / "s", block_size=8)
    cli_error(capsys, args(good, tmp_path / "run", "--model", short), "8 positions, but the longest pair has",
              "lower --max-length to 8")
    assert_nothing_written(tmp_path / "run")


@pytest.mark.parametrize("failure,expected", [
    ("offline", ["cannot download someone/no-such-model (offline?)", "put config.json and model.safetensors",
                 "https://huggingface.co/someone/no-such-model", "or pass a local folder"]),
    (404, ["someone/no-such-model: no such model on the Hugging Face hub", "check the name"]),
    (401, ["someone/no-such-model: no such model on the Hugging Face hub", "private or gated"]),  # what the hub answers
])
def test_hub_name_that_does_not_exist(tmp_path, good, capsys, monkeypatch, failure, expected):
    monkeypatch.setenv("DPO_CACHE", str(tmp_path / "cache"))

    def urlopen(req, *a, **k):
        if failure == "offline":
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
        raise urllib.error.HTTPError(req.full_url, failure, "Unauthorized" if failure == 401 else "Not Found", {}, None)
    monkeypatch.setattr(hub.urllib.request, "urlopen", urlopen)
    cli_error(capsys, args(good, tmp_path / "run", "--model", "someone/no-such-model"), *expected)
    assert_nothing_written(tmp_path / "run")


@pytest.mark.parametrize("spec,expected", [
    ("random:bad", "--model random:bad: write random:LAYERS,HEADS,CHANNELS"),
    ("random:1,3,32", "the channels a multiple of the heads"),
    ("./no/such/folder", "./no/such/folder: no such folder; pass a folder with config.json"),
])
def test_bad_model_spec(tmp_path, good, capsys, spec, expected):
    cli_error(capsys, args(good, tmp_path / "run", "--model", spec), expected)
    assert_nothing_written(tmp_path / "run")


# ----------------------------------------------------------------------------------------------
# Flags: checked before anything is loaded or written

@pytest.mark.parametrize("extra,expected", [
    (["--beta", "0"], "--beta 0.0: beta must be > 0"),
    (["--beta", "-0.1"], "--beta -0.1: beta must be > 0"),
    (["--beta", "nan"], "--beta nan: beta must be > 0"),
    (["--batch-size", "5"], "--batch-size 5 is not a multiple of --micro-batch-size 2; choose a divisor"),
    (["--micro-batch-size", "0"], "--micro-batch-size 0: must be at least 1"),
    (["--label-smoothing", "0.1"], "--label-smoothing is used by --loss-type 'cdpo' or 'robust', not 'dpo'"),
    (["--loss-type", "simpo", "--gamma", "-1", "--rpo-alpha", "-1"], "--rpo-alpha must be >= 0"),
    (["--loss-type", "kto"], "--loss-type kto: use one of dpo"),
    (["--task", "bogus"], "--task bogus: unknown task; use jsonl, hh or imdb"),
    (["--max-prompt-length", "48"], "--max-prompt-length 48 must be below --max-length 48"),
    (["--steps", "-1"], "give --steps >= 1"),
    (["--lr", "-0.001"], "--lr -0.001: the learning rate must be a positive number"),
    (["--dtype", "fp8"], "--dtype fp8: use auto, float32, bfloat16 or float16"),
    (["--device", "tpu"], "--device tpu: use auto, cpu, cuda"),
    (["--compile", "--fsdp"], "--compile with --fsdp is not supported (untested here); drop one of them"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_flag(tmp_path, good, capsys, extra, expected):
    cli_error(capsys, args(good, tmp_path / "run", *extra), expected)
    assert_nothing_written(tmp_path / "run")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_requested_without_a_gpu(tmp_path, good, capsys):
    cli_error(capsys, args(good, tmp_path / "run", "--device", "cuda"), "--device cuda: this machine has no such device")


def test_unparsable_flag_value_exits_2_without_traceback(tmp_path, good, capsys):
    """argparse's own convention: its usage text, then one `error:` line, status 2."""
    with pytest.raises(SystemExit) as e:
        dpo.main(args(good, tmp_path / "run", "--batch-size", "four"))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].endswith("invalid int value: 'four'")
    print("message:", err.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# The output folder

def test_finished_run_is_refused_unless_told(tmp_path, good, capsys):
    run = tmp_path / "run"
    assert dpo.main(args(good, run)) == 0
    before = (run / "checkpoint" / "model.safetensors").read_bytes()
    cli_error(capsys, args(good, run), f"{run} already holds a run; pass --resume to continue it, --overwrite")
    assert (run / "checkpoint" / "model.safetensors").read_bytes() == before
    assert dpo.main(args(good, run, "--overwrite", "--seed", 1)) == 0
    assert (run / "checkpoint" / "model.safetensors").read_bytes() != before


def test_output_folder_under_a_file(tmp_path, good, capsys):
    """Tests run as root, where chmod does not stop writing; a path under a regular file fails for everyone."""
    (tmp_path / "somefile").write_text("x")
    cli_error(capsys, args(good, tmp_path / "somefile" / "run"), "cannot write there (Not a directory",
              "choose another --out")


def test_too_little_disk_space_is_found_before_training(tmp_path, good, capsys, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: types.SimpleNamespace(free=1000))
    cli_error(capsys, args(good, tmp_path / "run"), "0.00 GB free, but checkpoints need about 0.04 GB")
    assert_nothing_written(tmp_path / "run")


def test_resume_without_a_checkpoint(tmp_path, good, capsys):
    cli_error(capsys, args(good, tmp_path / "run", "--resume"), "holds no checkpoint to resume from; drop --resume")


def test_resume_with_other_settings_or_a_damaged_state(tmp_path, good, capsys):
    run = tmp_path / "run"
    assert dpo.main(args(good, run, "--steps", 4, "--stop-after", 1)) == 0
    cli_error(capsys, args(good, run, "--steps", 4, "--resume", "--optimizer", "rmsprop"),
              "was trained with --optimizer adamw; pass the same values")
    cli_error(capsys, args(good, run, "--steps", 4, "--resume", "--model", "random:1,2,64"),
              "was trained with --model random:1,2,32")
    state = run / "checkpoint" / "train_state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    cli_error(capsys, args(good, run, "--steps", 4, "--resume"), "train_state.pt: its contents differ from the digest",
              "corrupt", "start afresh with --overwrite")
    os.remove(run / "checkpoint" / "digest.json")  # a checkpoint from before digests: the reader's own message
    cli_error(capsys, args(good, run, "--steps", 4, "--resume"), "train_state.pt: cannot read it", "damaged")


# ----------------------------------------------------------------------------------------------
# Interrupted runs

def subprocess_env(tmp_path):
    return {**os.environ, "TIKTOKEN_CACHE_DIR": os.environ["TIKTOKEN_CACHE_DIR"], "DPO_CACHE": str(tmp_path / "cache"),
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_cli_subprocess_exits_2_with_one_line(tmp_path, good):
    (tmp_path / "somefile").write_text("x")
    p = subprocess.run([sys.executable, os.path.join(HERE, "dpo.py"), *args(good, tmp_path / "somefile" / "run")],
                       capture_output=True, text=True, env=subprocess_env(tmp_path), timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip().splitlines() == [p.stderr.strip()] and p.stderr.startswith("error: --out "), p.stderr


def load_weights(folder):
    return dict(from_pretrained(str(folder)).named_parameters())


def test_kill_9_then_resume_is_bit_identical(tmp_path, capsys):
    """A real training process (`python dpo.py ...`) is killed with SIGKILL after its first checkpoint; the
    checkpoint it leaves loads, and --resume finishes with weights bit-identical to an uninterrupted run.
    The uninterrupted run and the resumed one go through dpo.main in this process, on one thread like the
    subprocess (OMP_NUM_THREADS=1), which saves two interpreter start-ups (about 6 s each here)."""
    path = write_lines(tmp_path / "tiny.jsonl", good_lines())
    steps, ckpt = 8, tmp_path / "cut" / "checkpoint"

    def argv(out, *extra):
        return args(path, out, "--steps", steps, "--micro-batch-size", 4, "--max-length", 32, "--max-prompt-length", 16,
                    *extra)
    cut = subprocess.Popen([sys.executable, os.path.join(HERE, "dpo.py"), *argv(tmp_path / "cut")],
                           env=subprocess_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert dpo.main(argv(tmp_path / "full")) == 0  # while the subprocess starts up
        deadline = time.time() + 60
        while not (ckpt / "train_state.pt").exists() and cut.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(0.15)  # into the next step or the next save
        assert cut.poll() is None, f"the run ended before it could be killed: raise `steps`\n{cut.stderr.read()}"
        cut.send_signal(signal.SIGKILL)
        assert cut.wait() == -signal.SIGKILL

        runtime.recover_checkpoint(str(ckpt))  # what --resume does first (a no-op unless killed between two renames)
        state = torch.load(ckpt / "train_state.pt", weights_only=False)
        assert 1 <= state["step"] < steps
        load_weights(ckpt)  # the checkpoint left by the kill loads
        capsys.readouterr()
        assert dpo.main(argv(tmp_path / "cut", "--resume")) == 0
        assert f"resumed from {ckpt} at step {state['step']}" in capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)
        if cut.poll() is None:
            cut.kill()
    a, b = load_weights(tmp_path / "full" / "checkpoint"), load_weights(ckpt)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    logged = [json.loads(ln)["step"] for ln in open(tmp_path / "cut" / "metrics.jsonl")]
    assert logged == list(range(1, steps + 1))
    print(f"killed at step {state['step']} of {steps}; resumed; {len(a)} tensors bit-identical")


def test_ctrl_c_gives_one_line_and_status_130(tmp_path, good, capsys, monkeypatch):
    def interrupted(cfg):
        raise KeyboardInterrupt
    monkeypatch.setattr(dpo, "train", interrupted)
    capsys.readouterr()
    assert dpo.main(args(good, tmp_path / "run")) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("interrupted; ") and "continue with --resume" in err, err
    print("message:", err.strip())


class Killed(BaseException):
    """Stands for SIGKILL inside this process: nothing after it runs, no handler catches it."""


def test_kill_between_the_two_renames_of_a_save(tmp_path, good, monkeypatch):
    """The one moment when OUT/checkpoint does not exist: the old one was renamed away, the new one not yet
    renamed in. --resume puts the complete new one back and the result is still bit-identical."""
    train = pairs(16)
    cfg = dict(model="random:1,2,32", batch_size=4, micro_batch_size=4, steps=4, max_length=48, max_prompt_length=24,
               n_eval=0, device="cpu", optimizer="adamw", lr=1e-3, warmup_steps=0, save_every=1)
    full, _ = dpo.train(dpo.TrainConfig(out=str(tmp_path / "full"), **cfg), train, [], log=lambda *a: None)
    real_replace, swaps = os.replace, []

    def replace(src, dst):
        if str(src).endswith("checkpoint.writing") and len(swaps) == 2:
            raise Killed()  # the save of step 3: checkpoint/ (step 2) already renamed to checkpoint.old
        swaps.append(src) if str(src).endswith("checkpoint.writing") else None
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Killed):
        dpo.train(dpo.TrainConfig(out=str(tmp_path / "cut"), **cfg), train, [], log=lambda *a: None)
    monkeypatch.setattr(os, "replace", real_replace)
    assert not (tmp_path / "cut" / "checkpoint").exists() and (tmp_path / "cut" / "checkpoint.old").exists()
    resumed, _ = dpo.train(dpo.TrainConfig(out=str(tmp_path / "cut"), resume=True, **cfg), train, [], log=lambda *a: None)
    for (name, p), q in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    assert torch.load(tmp_path / "cut" / "checkpoint" / "train_state.pt", weights_only=False)["step"] == 4


def test_resume_ignores_a_metrics_line_cut_by_a_kill(tmp_path, good):
    run = tmp_path / "run"
    assert dpo.main(args(good, run, "--steps", 3, "--stop-after", 1)) == 0
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "loss": 0.69')  # a kill in the middle of writing the next line
    assert dpo.main(args(good, run, "--steps", 3, "--resume")) == 0
    assert [json.loads(ln)["step"] for ln in open(run / "metrics.jsonl")] == [1, 2, 3]


# ----------------------------------------------------------------------------------------------
# Numerical faults: stop with step and batch named (or skip behind --skip-nonfinite); never save NaN

def inject(monkeypatch, at_call, kind):
    """Make the policy's log-probs non-finite on its `at_call`-th training forward (2 per step here: batch 4,
    micro-batch 2): kind "loss" puts NaN into pair 0's chosen log-prob, kind "grad" leaves the loss finite and
    makes its gradient NaN."""
    real, calls = dpo.batch_logps, [0]

    class NanGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * math.nan

    def batch_logps(model, batch, average=False):
        logps = real(model, batch, average)
        if model.training:
            calls[0] += 1
            if calls[0] == at_call:
                if kind == "loss":
                    return torch.where(torch.arange(len(logps)) == 0, math.nan, logps)
                return NanGrad.apply(logps)
        return logps
    monkeypatch.setattr(dpo, "batch_logps", batch_logps)


def assert_finite_checkpoint(ckpt, step):
    state = torch.load(os.path.join(ckpt, "train_state.pt"), weights_only=False)
    assert state["step"] == step
    for name, p in load_weights(ckpt).items():
        assert torch.isfinite(p).all(), name
    for s in state["optimizer"]["state"].values():
        assert all(torch.isfinite(t).all() for t in s.values() if torch.is_tensor(t))
    return state


def test_nan_loss_stops_naming_step_and_batch(tmp_path, good, capsys, monkeypatch):
    inject(monkeypatch, at_call=5, kind="loss")  # step 3, micro-batch 1
    run = tmp_path / "run"
    msg = cli_error(capsys, args(good, run, "--steps", 5), "step 3: non-finite loss in micro-batch 1 (training pairs [",
                    "the first with prompt '", "--skip-nonfinite",
                    f"weights not updated, the last good checkpoint is {run}/checkpoint (step 2)")
    assert re.search(r"training pairs \[\d+\], the first", msg), msg  # only pair 0 of the micro-batch is NaN
    assert_finite_checkpoint(run / "checkpoint", 2)
    assert [json.loads(ln)["step"] for ln in open(run / "metrics.jsonl")] == [1, 2]


def test_nan_gradient_stops_naming_step(tmp_path, good, capsys, monkeypatch):
    inject(monkeypatch, at_call=4, kind="grad")  # step 2, micro-batch 2: the loss is finite, its gradient is not
    run = tmp_path / "run"
    cli_error(capsys, args(good, run, "--steps", 5), "step 2: non-finite gradient norm (training pairs [",
              "the last good checkpoint is", "(step 1)")
    assert_finite_checkpoint(run / "checkpoint", 1)


def test_nan_before_any_checkpoint(tmp_path, good, capsys, monkeypatch):
    inject(monkeypatch, at_call=1, kind="loss")
    cli_error(capsys, args(good, tmp_path / "run", "--steps", 5), "step 1: non-finite loss", "no checkpoint saved yet")


def test_skip_nonfinite_skips_counts_and_never_saves_nan(tmp_path, good, capsys, monkeypatch):
    inject(monkeypatch, at_call=5, kind="loss")
    run = tmp_path / "run"
    capsys.readouterr()
    assert dpo.main(args(good, run, "--steps", 5, "--skip-nonfinite")) == 0
    out = capsys.readouterr().out
    assert "step 3/5 | skipped: non-finite loss in micro-batch 1" in out and "1 skipped so far" in out, out
    assert "1 of 5 batches skipped for a non-finite loss or gradient" in out
    state = assert_finite_checkpoint(run / "checkpoint", 5)
    assert state["skipped"] == 1
    assert [json.loads(ln)["step"] for ln in open(run / "metrics.jsonl")] == [1, 2, 4, 5]


def test_nan_weights_are_never_saved(tmp_path, good, capsys, monkeypatch):
    """A finite gradient can still overflow the weights (fp16, a huge --lr): the save refuses them."""
    real_step, calls = torch.optim.AdamW.step, [0]

    def step(self, *a, **k):
        out = real_step(self, *a, **k)
        calls[0] += 1
        if calls[0] == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(math.inf)
        return out
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    run = tmp_path / "run"
    cli_error(capsys, args(good, run, "--steps", 4), "step 2: non-finite weights in wte.weight", "not saved",
              "the last good checkpoint is", "(step 1)")
    assert_finite_checkpoint(run / "checkpoint", 1)


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path, good, capsys, monkeypatch):
    real, calls = machinery.hf.save_safetensors, [0]

    def save(tensors, path, metadata=None):
        calls[0] += 1
        if calls[0] == 2:
            with open(path + ".tmp", "wb") as f:
                f.write(b"half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(tensors, path, metadata)
    monkeypatch.setattr(machinery.hf, "save_safetensors", save)
    run = tmp_path / "run"
    cli_error(capsys, args(good, run, "--steps", 4), f"step 2: cannot write the checkpoint to {run}/checkpoint "
              "(No space left on device)", "(step 1)", "free some space")
    assert_finite_checkpoint(run / "checkpoint", 1)
