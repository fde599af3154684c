"""The dialogue and summarization experiments (generation.py) at micro scale: every stage, both judges, the stage
records (a rerun reuses all, a changed flag recomputes its stages and nothing upstream), bad flags refused before
anything is written, greedy sampling, and the GPU presets' code path on a random model in the HF layout.

    TIKTOKEN_CACHE_DIR=../shared/tiktoken DPO_HH=../shared/data/hh-rlhf python -m pytest -q test_generation.py
"""
import http.server
import json
import os
import random
import re
import subprocess
import sys
import threading

import pytest
import torch

import dpo
import eval as ev
import generation
from machinery import corpora
from machinery.hf import save_pretrained
from model import GPT, GPTConfig
from test_stages import kill_in_turn

HERE = os.path.dirname(os.path.abspath(__file__))
os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(HERE, "..", "shared", "tiktoken"))
HH_DIR = os.environ.get("DPO_HH", os.path.join(HERE, "..", "shared", "data", "hh-rlhf"))
HH = os.path.join(HH_DIR, "harmless-base-test.jsonl.gz")
needs_hh = pytest.mark.skipif(not os.path.exists(HH), reason=f"the shared HH file is not at {HH} (set DPO_HH)")


def statuses(text):
    """{stage: reuse/resume/compute/recompute} from the plan Stages.explain prints."""
    return dict(re.findall(r"^  (\S+)\s+(reuse|resume|compute|recompute)\s", text, re.M))


def run(args, capsys):
    rc = dpo.main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def hh_run(tmp_path_factory):
    """One micro run of `python dpo.py --task hh --preset tiny` (rm judge), shared by the hh tests."""
    if not os.path.exists(HH):
        pytest.skip(f"the shared HH file is not at {HH} (set DPO_HH)")
    out = tmp_path_factory.mktemp("hh") / "run"
    calls = []
    real = corpora.two_shot_prompt
    mp = pytest.MonkeyPatch()
    mp.setattr(corpora, "two_shot_prompt", lambda p, ex: calls.append((p, ex)) or real(p, ex))
    try:
        assert dpo.main(["--task", "hh", "--preset", "tiny", "--hh-train", HH, "--out", str(out), "--device", "cpu"]) == 0
    finally:
        mp.undo()
    return out, calls


@needs_hh
def test_hh_every_stage_at_micro_scale(hh_run):
    out, two_shot_calls = hh_run
    for f in ("results.csv", "results.json", "win_rates.png", "training.png", "samples.md", "summary.json",
              "agreement/agreement.json", "judge_rm/accuracy.json", "bon_rm/head.pt", "sft/config.json"):
        assert (out / f).exists(), f
    rows = json.load(open(out / "results.json"))
    main = [r for r in rows if r["step"] is None]
    assert {(r["method"], r["temperature"]) for r in main} == {
        (m, t) for m in ("DPO", "Preferred-FT", "Best of N", "2-shot") for t in (0.25, 0.5, 0.75, 1.0)}
    assert all(r["n"] + r["invalid"] == 6 and 0 <= r["win_rate"] <= 1 for r in main)
    r = main[0]
    assert r["se"] == pytest.approx((r["win_rate"] * (1 - r["win_rate"]) / r["n"]) ** 0.5)
    steps = sorted(r["step"] for r in rows if r["step"] is not None)
    assert steps == [4, 8, 12, 15]  # 240 pairs / 16 a step, 4 checkpoints (and the last) for the training curve
    # every samples file is eval.py --win-rate's input, judged against the test set's chosen response
    splits = json.load(open(out / "data" / "splits.json"))
    evals = splits["eval"]["hh"]
    lines = [json.loads(l) for l in open(out / "samples" / "dpo" / "hh-T0.25.jsonl")]
    assert [(l["prompt"], l["baseline"]) for l in lines] == [(e["prompt"], e["reference"]) for e in evals]
    # the evaluation prompts are single-turn, and none is a prompt of the policy's or the judge's pairs
    assert evals and all(corpora.is_single_turn(e["prompt"] + e["reference"]) for e in evals)
    trained = {p["prompt"] for p in splits["policy"] + splits["judge"]}
    assert not trained & {e["prompt"] for e in evals}
    # the 2-shot baseline was prompted with corpora.two_shot_prompt: two training dialogues, then the query
    assert len(two_shot_calls) == 4 * len(evals)
    assert {p for p, _ in two_shot_calls} == {e["prompt"] for e in evals}
    assert all(ex == corpora.two_shot_examples(splits["policy"]) for _, ex in two_shot_calls)
    agreement = json.load(open(out / "agreement" / "agreement.json"))
    assert agreement["n"] == 16 and agreement["se"] > 0


@needs_hh
def test_a_rerun_reuses_every_stage_and_a_changed_flag_recomputes_its_stages(hh_run, capsys):
    out, _ = hh_run
    base = ["--task", "hh", "--preset", "tiny", "--hh-train", HH, "--out", str(out), "--device", "cpu"]
    rc, text, _ = run(base, capsys)
    assert rc == 0 and set(statuses(text).values()) == {"reuse"}, statuses(text)
    rc, text, _ = run(base + ["--temperatures", "0.25,1"], capsys)
    st = statuses(text)
    assert rc == 0 and all(st[s] == "reuse" for s in ("data", "base", "sft", "dpo", "bon_rm", "judge_rm", "curve",
                                                       "judge-curve", "agreement"))
    assert all(st[f"{k}-{m}"] == "recompute" for k in ("samples", "judge")
               for m in ("dpo", "preferred-ft", "best-of-n", "2-shot"))
    rc, text, _ = run(base + ["--temperatures", "0.25,1", "--beta", "0.2"], capsys)
    st = statuses(text)
    assert rc == 0 and [s for s, v in st.items() if v == "recompute"] == [
        "dpo", "samples-dpo", "judge-dpo", "curve", "judge-curve"], st
    assert "--beta 0.1 -> 0.2" in text


def bad(capsys, tmp_path, *args):
    out = tmp_path / "never"
    rc, _, err = run(["--task", "hh", "--preset", "tiny", "--hh-train", HH, "--out", str(out), *args], capsys)
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert not out.exists()
    return err


@needs_hh
def test_a_kill_inside_each_resumable_stage_resumes_there_and_gives_the_same_results(tmp_path):
    """SIGKILL (DPO_TEST_KILL, machinery/integrity.kill_point) right after a checkpoint of each resumable stage of
    `--task hh --preset tiny` in turn (SFT, DPO, Best of N's reward model, the reward-model judge), each rerun killed
    in the next one; the last rerun finishes. Each rerun says where it resumed, and results.csv equals that of the
    same command run once, uninterrupted, in a process of its own (as the kills are: the same threads, the same sums)."""
    out, whole = tmp_path / "killed", tmp_path / "whole"
    points = [("sft.run:6", "sft.run: resumed at step 6 of 15"),
              ("dpo:8", "  dpo                      resume     interrupted"),
              ("bon_rm.run:8", "bon_rm.run: resumed at step 8 of 15"),
              ("judge_rm.run:12", "judge_rm.run: resumed at step 12 of 22")]
    cmd = [sys.executable, os.path.join(HERE, "dpo.py"), "--task", "hh", "--preset", "tiny", "--hh-train", HH,
           "--out", str(out), "--device", "cpu"]
    kill_in_turn(cmd, points)
    assert subprocess.run(cmd[:-4] + ["--out", str(whole), "--device", "cpu"], capture_output=True,
                          timeout=300).returncode == 0
    assert (out / "results.csv").read_text() == (whole / "results.csv").read_text()
    assert not (out / "judge_rm.run").exists() and not (out / "bon_rm.run").exists() and not (out / "sft.run").exists()


def test_bad_flags_are_refused_in_one_line_before_any_stage_writes(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert "--temperatures" in bad(capsys, tmp_path, "--temperatures", "0.5,-1")
    assert "--judge nope" in bad(capsys, tmp_path, "--judge", "nope")
    assert "--judge-model" in bad(capsys, tmp_path, "--judge", "api")
    assert "OPENAI_API_KEY" in bad(capsys, tmp_path, "--judge", "api", "--judge-model", "gpt-4o")
    assert "--fractions" in bad(capsys, tmp_path, "--fractions", "0.5,0.5")
    assert "--preset" in bad(capsys, tmp_path, "--preset", "huge")
    assert "--max-prompt-length" in bad(capsys, tmp_path, "--max-prompt-length", "200")
    rc, _, err = run(["--task", "tldr", "--preset", "cpu", "--out", str(tmp_path / "t")], capsys)
    assert rc == 2 and "--preset cpu" in err and not (tmp_path / "t").exists()


def test_greedy_samples_equal_the_argmax_chain():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, block_size=64, n_layer=1, n_head=2, n_embd=32)).eval()
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11]]
    sampled = ev.sample_completions(model, prompts, 1, 8, generator=torch.Generator().manual_seed(1), temperature=0,
                                    eos_id=-1)
    for p, s in zip(prompts, sampled):
        ids = list(p)
        with torch.no_grad():
            for _ in range(8):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        assert s == ids[len(p):]


# ---- TL;DR: files in the sources' formats, the rm judge, then an OpenAI-compatible server

WORDS = "rent roommate loan car job boss cat dog move city money friend wedding exam sleep gym".split()


def write_tldr(folder, n_train=24, n_test=6, n_comparisons=48):
    """A $DPO_TLDR folder: tldr_3_filtered/{train,test}.jsonl and comparisons/batch1.json, in the real fields."""
    rng = random.Random(0)
    (folder / "tldr_3_filtered").mkdir(parents=True)
    (folder / "comparisons").mkdir()

    def post(i):
        w = rng.sample(WORDS, 3)
        return {"id": f"t3_{i}", "subreddit": "relationships", "title": f"My {w[0]} and my {w[1]}",
                "post": f"I have a problem with my {w[0]}. It is about the {w[1]} and the {w[2]}.",
                "summary": f"{w[0]} problem about {w[1]}"}
    for split, n in (("train", n_train), ("test", n_test)):
        with open(folder / "tldr_3_filtered" / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(post(i + (1000 if split == "test" else 0))) + "\n" for i in range(n))
    with open(folder / "comparisons" / "batch1.json", "w") as f:
        for i in range(n_comparisons):
            p = post(2000 + i)
            f.write(json.dumps({"info": {"id": p["id"], "post": p["post"], "title": p["title"],
                                         "subreddit": p["subreddit"]},
                                "summaries": [{"text": " " + p["summary"], "policy": "ref", "note": None},
                                              {"text": " something else", "policy": "sup2", "note": None}],
                                "choice": i % 2 and 0, "worker": "w", "batch": "batch1",
                                "split": "train" if i < n_comparisons - 12 else "valid1", "extra": {}}) + "\n")
    return folder


class FakeChat(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible /chat/completions that always prefers Summary/Response A; records what it was asked."""
    asked = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        FakeChat.asked.append((body["model"], prompt))
        label = "More helpful" if prompt.startswith("For the following query") else "Preferred"
        reply = json.dumps({"choices": [{"message": {"content": f"Comparison: A is better.\n{label}: A"}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


def test_tldr_every_stage_with_the_rm_judge_then_an_api_judge(tmp_path, capsys, monkeypatch):
    tldr = write_tldr(tmp_path / "tldr")
    out = tmp_path / "run"
    args = ["--task", "tldr", "--preset", "tiny", "--tldr", str(tldr), "--out", str(out), "--device", "cpu"]
    rc, text, err = run(args, capsys)
    assert rc == 0, err
    rows = json.load(open(out / "results.json"))
    assert {(r["set"], r["method"], r["temperature"]) for r in rows if r["step"] is None} == {
        *((s, m, t) for m in ("DPO", "SFT", "Preferred-FT", "Best of N", "zero-shot") for s, ts in
          (("tldr", (0, 0.25, 0.5, 0.75, 1.0)), ("news", (0, 0.25))) for t in ts)}
    assert json.load(open(out / "summary.json"))["config"]["beta"] == 0.5  # the paper's TL;DR beta
    line = json.loads(open(out / "samples" / "sft" / "news-T0.jsonl").readline())
    assert line["prompt"].startswith("Article:\n") and line["baseline"] == "Town opens its first library. Books are free for everyone."
    # the api judge: a server on localhost (no key needed); only the judging stages are recomputed
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeChat)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    FakeChat.asked.clear()
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    try:
        rc, text, err = run(args + ["--judge", "api", "--judge-url", f"http://127.0.0.1:{server.server_port}/v1",
                                    "--judge-model", "fake-judge"], capsys)
    finally:
        server.shutdown()
    assert rc == 0, err
    st = statuses(text)
    assert {s for s, v in st.items() if v != "reuse"} == {
        *(f"judge-{m}" for m in ("dpo", "sft", "preferred-ft", "best-of-n", "zero-shot")), "judge-curve", "agreement"}
    assert re.search(r"judging: up to \d+ calls to fake-judge at http://127.0.0.1", text)
    prompts = [p for _, p in FakeChat.asked]
    assert any("summarizing the most important points in the given forum post" in p for p in prompts)
    assert any("in the given news article" in p and "\nArticle:\n" in p for p in prompts)
    rows = json.load(open(out / "results.json"))
    agreement = json.load(open(out / "agreement" / "agreement.json"))
    assert len(FakeChat.asked) == sum(r["n"] for r in rows) + agreement["n"]  # each sample and pair asked once
    wr = json.load(open(out / "judged" / "dpo" / "tldr-T0" / "win_rate.json"))
    assert wr["judge"].startswith("fake-judge") and wr["n"] == 6 and wr["invalid"] == 0


@needs_hh
def test_gpu_preset_at_tiny_scale(tmp_path, capsys):
    """The GPU preset's code path on a random GPT-2-layout folder: bfloat16 weights, the reference precomputed,
    activation checkpointing, RMSprop with warm-up, every weight trained. Only sizes and the data are changed."""
    torch.manual_seed(0)
    base = tmp_path / "tiny-gpt2"
    save_pretrained(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=256)), str(base))
    out = tmp_path / "gpu"
    rc, text, err = run(["--task", "hh", "--preset", "gpu", "--model", str(base), "--hh-train", HH, "--hh-test", "",
                         "--max-pairs", "64", "--batch-size", "16", "--micro-batch-size", "8", "--eval-prompts", "4",
                         "--agreement-pairs", "8", "--best-of", "2", "--max-length", "96", "--max-prompt-length", "48",
                         "--max-new-tokens", "4", "--sft-batch-size", "16", "--judge", "rm", "--judge-base", "sft",
                         "--temperatures", "1", "--lr", "1e-3", "--warmup-steps", "2", "--out", str(out),
                         "--device", "cpu"], capsys)
    assert rc == 0, err
    cfg = json.load(open(out / "summary.json"))["config"]
    assert (cfg["weights_dtype"], cfg["precompute_ref"], cfg["grad_checkpoint"], cfg["optimizer"]) == \
        ("bfloat16", True, True, "rmsprop")
    assert (out / "dpo" / "step-4").exists() and len(json.load(open(out / "results.json"))) == 4 + 4
