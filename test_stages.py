"""Long runs you can trust (machinery/stages.py, machinery/integrity.py, imdb.py's plan): a changed flag recomputes
the stages it feeds and what depends on them, nothing else; a kill inside any resumable stage resumes there and
gives the uninterrupted run's results; changed checkpoint bytes are refused in one line; every bad flag is refused
before any stage output exists.

    python -m pytest -q test_stages.py
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(HERE, "..", "shared", "tiktoken"))
IMDB = os.environ.get("DPO_IMDB", os.path.join(HERE, "..", "shared", "data", "aclImdb_v1.tar.gz"))
needs_imdb = pytest.mark.skipif(not os.path.exists(IMDB), reason=f"IMDb archive not found at {IMDB} (set DPO_IMDB)")

import dpo
import imdb
from data import InputError
from machinery.hf import from_pretrained, save_pretrained
from machinery.stages import Checkpoints, Stages
from model import GPT, GPTConfig


def tiny(out, *extra):
    return ["--task", "imdb", "--preset", "tiny", "--out", str(out), "--imdb", IMDB, "--device", "cpu",
            *map(str, extra)]


# ----------------------------------------------------------------------------------------------
# Which stages each setting feeds (written out by hand, from what each stage computes), and their dependants

DIRECT = {  # flag -> (a new value, the stages it feeds directly)
    "seed": (1, "sft classifier pairs dpo-beta0.1 dpo-pl-beta0.1 preferred-ft unlikelihood-alpha0.1 reward_model "
                "ppo-gt ppo best-of-n implicit-samples"),
    "max_reviews": (200, "sft classifier pairs best-of-n implicit-samples"),
    "model": ("scratch:1,2,64", "sft"), "sft_tokens": (4000, "sft"), "sft_lr": (1e-3, "sft"),
    "sft_batch_size": (8, "sft"),
    "classifier_epochs": (2, "classifier"), "reward": ("siebert", "classifier"),
    "n_prefixes": (30, "pairs"), "n_samples": (3, "pairs dpo-pl-beta0.1 implicit-samples"),
    "max_new_tokens": (8, "pairs ppo-gt ppo best-of-n implicit-samples"),
    "sample_batch_size": (64, "pairs reference-rankings best-of-n implicit-samples"),
    "micro_batch_size": (3, "reference dpo-beta0.1 reward_model"),
    "optimizer": ("rmsprop", "dpo-beta0.1 dpo-pl-beta0.1"), "lr": (1e-3, "dpo-beta0.1 dpo-pl-beta0.1"),
    "warmup_steps": (2, "dpo-beta0.1 dpo-pl-beta0.1"), "adam_eps": (1e-6, "dpo-beta0.1 dpo-pl-beta0.1"),
    "batch_size": (6, "dpo-beta0.1 dpo-pl-beta0.1 preferred-ft unlikelihood-alpha0.1"),
    "eval_every": (2, "dpo-beta0.1 dpo-pl-beta0.1 preferred-ft unlikelihood-alpha0.1"),
    "trainable": ("all", "dpo-beta0.1 dpo-pl-beta0.1 preferred-ft unlikelihood-alpha0.1 ppo-gt ppo"),
    "baseline_lr": (1e-3, "preferred-ft unlikelihood-alpha0.1"),
    "rm_trainable": ("head", "reward_model"), "rm_epochs": (2, "reward_model"), "rm_lr": (1e-3, "reward_model"),
    **{name: (value, "ppo-gt ppo") for name, value in (
        ("ppo_iterations", 8), ("ppo_batch_size", 16), ("ppo_minibatch_size", 4), ("ppo_epochs", 2), ("ppo_lr", 1e-3),
        ("ppo_value_lr", 1e-3), ("ppo_kl_coef", 0.1), ("ppo_kl_target", 6.0), ("ppo_lam", 0.95))},
    "eval_prompts": (4, "best-of-n implicit-samples"),  # and every policy's eval.json (keyed, test below)
    "best_of_n": ("2,8", "best-of-n"),
    "device": ("cpu", ""), "sample_batch_size_same": None,
}
DIRECT.pop("sample_batch_size_same")
NEEDS = {"pairs": "sft classifier", "reference": "sft pairs", "dpo-beta0.1": "sft pairs reference",
         "reference-rankings": "sft pairs", "dpo-pl-beta0.1": "sft pairs reference-rankings",
         "preferred-ft": "sft pairs", "unlikelihood-alpha0.1": "sft pairs", "reward_model": "sft pairs",
         "ppo-gt": "sft pairs classifier", "ppo": "sft pairs reward_model", "best-of-n": "sft classifier reward_model",
         "implicit-samples": "sft classifier"}


def keys(**changes):
    cfg = imdb.ImdbConfig(preset="tiny", out="unused", imdb=IMDB, **changes).resolved()
    return {name: stage.key for name, stage in imdb.plan(cfg, True, log=lambda s: None).plan.items()}


def downstream(stages):
    """The stages and everything that reads them, by NEEDS."""
    found = set(stages)
    while True:
        more = {s for s, needs in NEEDS.items() if found & set(needs.split())} - found
        if not more:
            return found
        found |= more


@pytest.mark.parametrize("name", sorted(DIRECT))
def test_a_changed_setting_changes_the_key_of_its_stages_and_their_dependants_only(name):
    base = keys()
    value, feeds = DIRECT[name]
    changed = keys(**{name: value})
    assert set(base) == set(changed)
    assert {s for s in base if base[s] != changed[s]} == downstream(feeds.split()), name


def test_a_new_beta_or_alpha_adds_its_run_and_changes_nothing_else():
    base = keys()
    more = keys(betas="0.1,1", alphas="0.1,0.2", ranking_betas="0.1,0.5")
    assert set(more) - set(base) == {"dpo-beta1", "unlikelihood-alpha0.2", "dpo-pl-beta0.5"}
    assert all(more[s] == base[s] for s in base)
    assert keys(best_of_n="4") == base  # the same largest N: the same samples, other rows of them
    assert "ppo" not in keys(ppo_iterations=0) and "best-of-n" not in keys(best_of_n="")


def test_stage_records_by_hand(tmp_path):
    """Reuse, recompute with the changed setting named, a dependant recomputed because its input changed, a stage
    outside the plan kept when its inputs match and removed when they don't, a changed file noticed."""
    lines = []
    s = Stages(str(tmp_path), log=lines.append)
    s.add("a", {"x": 1}, [], ["a.txt"])
    s.add("b", {"y": 2}, ["a"], ["b"])
    s.add("c", {"z": 3}, ["a"], ["c.txt"])
    s.explain()
    for name, path in (("a", "a.txt"), ("c", "c.txt")):
        s.begin(name)
        (tmp_path / path).write_text(name)
        s.finish(name)
    s.begin("b")
    os.makedirs(tmp_path / "b")
    s.finish("b")
    again = Stages(str(tmp_path), log=lines.append)
    again.add("a", {"x": 1}, [], ["a.txt"])
    again.add("b", {"y": 2}, ["a"], ["b"])
    lines.clear()
    again.explain()
    assert [ln.split()[:2] for ln in lines[1:]] == [["a", "reuse"], ["b", "reuse"], ["c", "kept"]]
    (tmp_path / "a.txt").write_text("edited")
    lines.clear()
    again.explain()
    assert "a.txt changed since it was written" in lines[1] and not (tmp_path / "a.txt").exists()
    changed = Stages(str(tmp_path), log=lines.append)
    changed.add("a", {"x": 5}, [], ["a.txt"])
    changed.add("b", {"y": 2}, ["a"], ["b"])
    lines.clear()
    changed.explain(final=["results.csv"])
    assert "--x 1 -> 5" in lines[1] or "not computed" in lines[1]
    assert "a changed" in lines[2] and not (tmp_path / "b").exists()
    assert lines[3].split()[:2] == ["c", "removed"] and not (tmp_path / "c.txt").exists()


# ----------------------------------------------------------------------------------------------
# Real runs: the tiny preset into one --out

@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("stages") / "base"
    assert dpo.main(tiny(out)) == 0
    return out


def rows_by_method(out):
    rows = json.load(open(out / "results.json"))
    return {m: [r for r in rows if r["method"] == m] for m in dict.fromkeys(r["method"] for r in rows)}


@needs_imdb
def test_changed_settings_recompute_what_they_feed_and_equal_a_fresh_run(base_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(base_run, out)
    before = rows_by_method(out)
    capsys.readouterr()
    assert dpo.main(tiny(out, "--lr", "1e-3")) == 0
    printed = capsys.readouterr().out
    recomputed = {ln.split()[0] for ln in printed.splitlines() if ln.startswith("  ") and " recompute " in ln}
    assert recomputed == {"dpo-beta0.1", "dpo-pl-beta0.1"}, printed
    assert "--lr 0.0004 -> 0.001" in printed
    after = rows_by_method(out)
    assert after["DPO"] != before["DPO"] and after["DPO-PL"] != before["DPO-PL"]
    assert all(after[m] == before[m] for m in before if m not in ("DPO", "DPO-PL"))
    fresh = tmp_path / "fresh"
    assert dpo.main(tiny(fresh, "--lr", "1e-3")) == 0
    assert json.load(open(fresh / "results.json")) == json.load(open(out / "results.json"))
    # an evaluation setting: the evaluations are redone, no policy is retrained
    capsys.readouterr()
    assert dpo.main(tiny(out, "--lr", "1e-3", "--eval-prompts", "4")) == 0
    printed = capsys.readouterr().out
    recomputed = {ln.split()[0] for ln in printed.splitlines() if ln.startswith("  ") and " recompute " in ln}
    assert recomputed == {"best-of-n", "implicit-samples"}, printed
    rows = json.load(open(out / "results.json"))
    assert all(r["n"] == 4 for r in rows if "n" in r) and "SFT eval: reused" not in printed


def kill_in_turn(cmd, points):
    """Runs cmd once per (point, message) of points with DPO_TEST_KILL=point (machinery/integrity.kill_point: SIGKILL
    right after that checkpoint), then once to the end; each run after a kill must print `message` (where it
    resumed). The same threads as an uninterrupted run in its own process: the same sums."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    expected_resume = None
    for point, resumed in points + [(None, None)]:
        p = subprocess.run(cmd, env={**env, **({"DPO_TEST_KILL": point} if point else {})}, capture_output=True,
                           text=True, timeout=300)
        if expected_resume:
            assert expected_resume in p.stdout, (expected_resume, p.stdout[-3000:], p.stderr[-2000:])
        if point:
            assert p.returncode == -9, (point, p.returncode, p.stdout[-2000:], p.stderr[-2000:])
        else:
            assert p.returncode == 0, p.stderr[-2000:]
        expected_resume = resumed


@needs_imdb
def test_a_kill_inside_each_resumable_stage_resumes_there_and_gives_the_same_results(base_run, tmp_path):
    """SIGKILL (DPO_TEST_KILL, machinery/integrity.kill_point) right after a checkpoint of each resumable stage in
    turn, each rerun killed in the next one; the last rerun finishes. Each resumes at its checkpoint (not from
    step 0), and results.csv equals the uninterrupted run's."""
    out = tmp_path / "killed"
    points = [("sft-checkpoints:2", "sft-checkpoints: resumed at step 2 of 3"),
              ("dpo-beta0.1:3", "DPO beta 0.1: 11 steps (resuming after step 3)"),
              ("dpo-pl-beta0.1:3", "dpo-pl-beta0.1: resumed at step 3 of 11"),
              ("preferred-ft:6", "preferred-ft: resumed at step 6 of 11"),
              ("unlikelihood-alpha0.1:3", "unlikelihood-alpha0.1: resumed at step 3 of 11"),
              ("reward_model-checkpoints:6", "reward_model-checkpoints: resumed at step 6 of 23"),
              ("ppo-gt:2", "ppo-gt: resumed at step 2 of 4"),
              ("ppo:3", "ppo: resumed at step 3 of 4")]
    kill_in_turn([sys.executable, os.path.join(HERE, "dpo.py"), *tiny(out)], points)
    assert (out / "results.csv").read_text() == (base_run / "results.csv").read_text()


def flip(path, offset_from_end=100):
    """Changes one byte of the tensor data (near the end: past the safetensors header)."""
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01  # a mantissa bit: the weights stay finite, only the digest can tell
    path.write_bytes(bytes(data))


def one_line_error(capsys, argv, *expected):
    capsys.readouterr()
    assert dpo.main(argv) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    for piece in expected:
        assert piece in err[0], err[0]
    return err[0]


@needs_imdb
def test_changed_bytes_in_a_stage_checkpoint_are_refused_and_deleting_it_recomputes_it(base_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(base_run, out)
    flip(out / "sft" / "model.safetensors")
    one_line_error(capsys, tiny(out), "sft/model.safetensors: its contents differ from the digest", "corrupt",
                   "a rerun of its stage computes it again")
    shutil.rmtree(out / "sft")
    capsys.readouterr()
    assert dpo.main(tiny(out)) == 0
    assert "sft is missing" in capsys.readouterr().out
    assert (out / "results.csv").read_text() == (base_run / "results.csv").read_text()


def test_resume_refuses_a_checkpoint_with_changed_bytes_in_one_line(tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Question {i}?", "chosen": f" Yes {i}.", "rejected": f" No {i}!"})
                            + "\n" for i in range(8)))
    args = ["--task", "jsonl", "--data", str(data), "--model", "random:1,2,32", "--out", str(tmp_path / "run"),
            "--batch-size", "4", "--micro-batch-size", "2", "--steps", "4", "--max-length", "48", "--n-eval", "0",
            "--device", "cpu", "--optimizer", "adamw", "--lr", "1e-3", "--warmup-steps", "0", "--save-every", "1",
            "--keep-checkpoints"]
    assert dpo.main(args + ["--stop-after", "2"]) == 0
    flip(tmp_path / "run" / "checkpoint" / "model.safetensors")
    one_line_error(capsys, args + ["--resume"], "checkpoint/model.safetensors: its contents differ from the digest",
                   "step-1", "--overwrite")


def test_a_non_finite_weight_at_load_is_called_corruption(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32))
    with torch.no_grad():
        model.wte.weight[3, 5] = float("nan")
    save_pretrained(model, str(tmp_path / "ck"))
    os.remove(tmp_path / "ck" / "digest.json")  # as a checkpoint from elsewhere: the finiteness check still holds
    with pytest.raises(InputError, match="non-finite values in wte.weight: the checkpoint is corrupt"):
        from_pretrained(str(tmp_path / "ck"))


def test_checkpoints_keep_one_trainer_state_and_resume_exactly(tmp_path):
    """A toy trainer through Checkpoints: killed (stopped) after step 3, resumed, it ends where an uninterrupted
    run ends, weights and random state alike; only the newest step-N holds trainer_state.pt."""
    def run(stop=None):
        torch.manual_seed(0)
        model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=64, block_size=16))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(1)
        ck = Checkpoints(str(tmp_path / ("a" if stop is None else "b")), every=2, total=6, log=lambda s: None)
        start, saved = ck.resume(model, opt, [g])
        for step in range(start, 6):
            x = torch.randint(64, (4, 8), generator=g)                                     # (B, T)
            logits = model(x[:, :-1])                                                      # (B, T-1, V)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), x[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            ck.maybe_save(step + 1, model, opt, [g])
            if stop == step + 1:
                return None
        return model.state_dict(), g.get_state()
    whole = run()
    assert run(stop=4) is None
    resumed = run(stop=99)
    assert all(torch.equal(whole[0][k], resumed[0][k]) for k in whole[0]) and torch.equal(whole[1], resumed[1])
    held = [d for d in sorted(os.listdir(tmp_path / "b")) if os.path.exists(tmp_path / "b" / d / "trainer_state.pt")]
    assert held == ["step-6"] and sorted(os.listdir(tmp_path / "b")) == ["step-2", "step-4", "step-6"]
    for d in ("step-2", "step-4"):  # their digests still verify without the dropped trainer state
        from_pretrained(str(tmp_path / "b" / d))


# ----------------------------------------------------------------------------------------------
# Bad flags: one line naming the flag, before any stage output exists

@pytest.mark.parametrize("flag,value,named", [
    ("--ppo-batch-size", "0", "--ppo-batch-size 0"), ("--best-of-n", "0", "--best-of-n '0'"),
    ("--best-of-n", "abc", "--best-of-n 'abc'"), ("--max-new-tokens", "0", "--max-new-tokens 0"),
    ("--ranking-betas", "-1", "--ranking-betas '-1'"), ("--eval-prompts", "0", "--eval-prompts 0"),
    ("--ppo-iterations", "-1", "--ppo-iterations -1"), ("--betas", "0.1,x", "--betas '0.1,x'"),
    ("--alphas", "-0.5", "--alphas '-0.5'"), ("--ppo-minibatch-size", "64", "--ppo-minibatch-size 64"),
    ("--lr", "0", "--lr 0"), ("--ppo-lam", "2", "--ppo-lam 2"), ("--trainable", "some", "--trainable some"),
    ("--model", "scratch:1,3,32", "--model scratch:1,3,32"), ("--micro-batch-size", "5", "--micro-batch-size 5"),
    ("--optimizer", "sgd", "--optimizer sgd"), ("--reward", "nope", "--reward nope"),
    ("--n-samples", "1", "--n-samples 1"), ("--preset", "huge", "--preset huge"), ("--sft-lr", "-1", "--sft-lr -1"),
])
def test_bad_flags_are_refused_in_one_line_before_any_stage(tmp_path, capsys, flag, value, named):
    out = tmp_path / "run"
    one_line_error(capsys, tiny(out, flag, value), named)
    assert not out.exists()
