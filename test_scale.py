"""Tests for scaling up: the memory arithmetic (--estimate-memory), activation checkpointing
(--grad-checkpoint), LoRA adapters (--lora-rank), bfloat16 weights (--weights-dtype) and several processes
(torchrun: DDP, and FSDP with --fsdp), all on CPU with tiny models.

    python -m pytest -q test_scale.py
"""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(HERE, "..", "shared", "tiktoken"))

import dpo  # noqa: E402
from data import InputError, collate_pairs, tokenize_pair  # noqa: E402
from machinery import fast, memory  # noqa: E402
from machinery.hf import config_to_hf, from_pretrained, load_model, save_pretrained  # noqa: E402
from machinery.lora import add_lora, lora_disabled, lora_merged, lora_state_dict  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from test_train import quiet, synthetic_pairs, tiny_cfg, write_jsonl  # noqa: E402


def meta_params(config):
    with torch.device("meta"):
        return GPT(config).num_params()


# ----------------------------------------------------------------------------------------------
# Memory arithmetic

def test_parameter_count_from_the_shape_equals_the_model():
    for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"):
        c = GPTConfig.named(name)
        assert memory.count_params(c) == meta_params(c), name
    assert memory.count_params(GPTConfig.named("gpt2")) == 124_439_808  # the published GPT-2 small count
    for kw in (dict(n_inner=100, tie_word_embeddings=False), dict(bias=False, block_size=64)):
        c = GPTConfig(n_layer=3, n_head=2, n_embd=32, **kw)
        assert memory.count_params(c) == meta_params(c), kw
    fields = GPTConfig.__dataclass_fields__
    for name, shape in memory.KNOWN_SHAPES.items():  # Pythia and GPT-J, once GPTConfig has their flags
        if all(k in fields for k in shape):
            c = GPTConfig(**shape)
            assert memory.count_params(c) == meta_params(c), name
    assert memory.count_params(memory.model_shape("EleutherAI/pythia-2.8b")) == 2_775_208_960


def test_memory_estimate_terms():
    base = dpo.TrainConfig(model="gpt2-large")
    e = memory.estimate_memory("gpt2-large", base)
    P = memory.count_params(GPTConfig.named("gpt2-large"))
    assert e["weights"] == e["gradients"] == e["optimizer"] == e["reference"] == 4 * P  # RMSprop: one float32 buffer
    assert memory.estimate_memory("gpt2-large", dpo.TrainConfig(optimizer="adamw"))["optimizer"] == 8 * P
    assert memory.estimate_memory("gpt2-large", dpo.TrainConfig(precompute_ref=True))["reference"] == 0
    half = memory.estimate_memory("gpt2-large", dpo.TrainConfig(weights_dtype="bfloat16"))
    assert half["weights"] == half["optimizer"] == 2 * P and half["optimizer_dtype"] == "bfloat16"
    assert half["autocast"] == 0  # bf16 weights need no bf16 copies
    ck = memory.estimate_memory("gpt2-large", dpo.TrainConfig(grad_checkpoint=True))
    assert ck["activations"] < e["activations"] / 5 and ck["head"] == e["head"]
    lora = memory.estimate_memory("gpt2-large", dpo.TrainConfig(lora_rank=8, weights_dtype="bfloat16"))
    assert lora["reference"] == 0 and lora["optimizer_dtype"] == "float32"
    assert lora["trainable"] == 36 * 8 * (8 * 1280 + 2 * 5120) and lora["optimizer"] == 4 * lora["trainable"]
    assert e["fits"] == {24: False, 40: True, 80: True}
    j = memory.estimate_memory("EleutherAI/gpt-j-6b", dpo.TrainConfig(lora_rank=16, weights_dtype="bfloat16",
                                                                   grad_checkpoint=True))
    assert j["fits"][24] and memory.estimate_memory("gpt-j-6b", base)["fits"] == {24: False, 40: False, 80: False}
    fs = memory.estimate_memory("gpt-j-6b", dpo.TrainConfig(fsdp=True), world_size=8)
    assert fs["weights"] == memory.estimate_memory("gpt-j-6b", base)["weights"] / 8


def test_estimate_memory_cli_needs_no_download(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("machinery.hub.download", lambda *a, **k: pytest.fail("--estimate-memory must not download"))
    assert dpo.main(["--estimate-memory", "--model", "gpt2-large,EleutherAI/pythia-2.8b,EleutherAI/gpt-j-6b"]) == 0
    out = capsys.readouterr().out
    assert "| EleutherAI/gpt-j-6b | 6.05B | LoRA r16 on bfloat16, --grad-checkpoint |" in out
    assert out.count("| gpt2-large |") == len(memory.MEMORY_SETTINGS)
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config_to_hf(GPTConfig(n_layer=2, n_head=2, n_embd=32))))
    assert dpo.main(["--estimate-memory", "--model", str(folder), "--lora-rank", "4"]) == 0
    out = capsys.readouterr().out
    assert "2 layers, 32 channels" in out and "the policy with its LoRA adapters off" in out and "total" in out
    assert dpo.main(["--estimate-memory", "--model", "EleutherAI/unknown-7b"]) == 2
    assert "no shape known without a download" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Activation checkpointing

def dpo_like_loss(model, items):
    """The DPO loss against a zero reference, in the model's dtype (float64 here: sequence_logps keeps it)."""
    batch = collate_pairs(items)
    lp = dpo.sequence_logps(model(batch["input_ids"]), batch["input_ids"], batch["loss_mask"])  # (2B,)
    chosen, rejected = lp.chunk(2)
    return -torch.nn.functional.logsigmoid(0.1 * (chosen - rejected)).mean()


def test_grad_checkpoint_gives_the_same_loss_and_gradients(monkeypatch):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=3, n_head=2, n_embd=32)).double()
    items = [tokenize_pair(p["prompt"], p["chosen"], p["rejected"]) for p in synthetic_pairs(4)]
    plain = dpo_like_loss(model, items)
    plain.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    calls, real = [0], torch.utils.checkpoint.checkpoint
    def counted(*a, **k):
        calls[0] += 1
        return real(*a, **k)
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counted)
    model.grad_checkpoint = True
    ck = dpo_like_loss(model, items)
    ck.backward()
    assert calls[0] == 3  # one checkpoint per block
    assert ck.item() == pytest.approx(plain.item(), abs=1e-12)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=1e-12, rtol=1e-10, msg=n)
    with torch.no_grad():  # no checkpointing without a backward to come
        dpo_like_loss(model, items)
    assert calls[0] == 3


# ----------------------------------------------------------------------------------------------
# LoRA

def test_lora_starts_at_the_base_model_and_trains_only_adapters():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32)).double()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    idx = torch.randint(0, 50257, (2, 9))
    base_logits = model(idx)
    add_lora(model, rank=4, alpha=8)
    assert torch.equal(model(idx), base_logits)  # B = 0: the initial policy is the reference exactly
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(lora_state_dict(model))
    assert len(lora_state_dict(model)) == 2 * 4 * 2  # A and B on 4 projections in 2 blocks
    items = [tokenize_pair(p["prompt"], p["chosen"], p["rejected"]) for p in synthetic_pairs(3)]
    dpo_like_loss(model, items).backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == n.endswith(("lora_A", "lora_B")), n
    with torch.no_grad():  # move the adapters away from 0
        for p in lora_state_dict(model).values():
            p.add_(0.05 * torch.randn_like(p))
    adapted = model(idx)
    assert not torch.allclose(adapted, base_logits)
    with lora_disabled(model):  # the reference: the frozen original, no second copy of the weights
        assert torch.equal(model(idx), base_logits)
    assert torch.equal(model(idx), adapted)  # switched back on
    with lora_merged(model):  # W + (alpha/r) B A: an ordinary GPT with the same function
        assert not any(n.endswith(("lora_A", "lora_B")) for n, _ in model.named_parameters())
        torch.testing.assert_close(model(idx), adapted, atol=1e-10, rtol=0)
    torch.testing.assert_close(model(idx), adapted, atol=0, rtol=0)
    for n, p in model.named_parameters():  # the base weights themselves never changed
        if n in original:
            assert torch.equal(p, original[n]), n


def test_lora_training_learns_saves_merged_and_resumes_exactly(tmp_path):
    pairs = synthetic_pairs(120, seed=2)
    kw = dict(lora_rank=8, lr=2e-2, batch_size=16, micro_batch_size=8, steps=12, eval_every=12, save_every=4)
    policy, hist = dpo.train(tiny_cfg(tmp_path / "full", **kw), pairs[:100], pairs[100:], log=quiet)
    assert hist[0]["loss"] == pytest.approx(0.6931, abs=1e-4)  # policy == reference at step 1
    assert hist[-1]["eval/loss"] < 0.67 and hist[-1]["eval/accuracy"] >= 0.9, hist[-1]  # log 2 = 0.693 at the start
    assert hist[-1]["loss"] < hist[0]["loss"] - 0.02
    torch.manual_seed(0)
    base = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32))  # what random:2,2,32 with seed 0 builds
    idx = torch.randint(0, 50257, (2, 9))
    with torch.no_grad(), lora_disabled(policy):
        torch.testing.assert_close(policy(idx), base(idx), atol=0, rtol=0)  # the frozen base is untouched
    ckpt = tmp_path / "full" / "run" / "checkpoint"
    merged = from_pretrained(str(ckpt))  # the checkpoint is an ordinary model: the merged weights
    with torch.no_grad():
        torch.testing.assert_close(merged(idx), policy(idx), atol=1e-5, rtol=0)
    assert (ckpt / "adapters.safetensors").exists()
    dpo.train(tiny_cfg(tmp_path / "cut", **kw, stop_after=5), pairs[:100], pairs[100:], log=quiet)
    resumed, _ = dpo.train(tiny_cfg(tmp_path / "cut", **kw, resume=True), pairs[:100], pairs[100:], log=quiet)
    for (n, p), q in zip(policy.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n


def test_trainable_head_changes_only_the_output_head(tmp_path):
    """--trainable head (the IMDb CPU preset): DPO learns, and every weight but lm_head stays bit-identical."""
    torch.manual_seed(0)
    base = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, tie_word_embeddings=False))
    save_pretrained(base, str(tmp_path / "m"))
    pairs = synthetic_pairs(120, seed=2)
    kw = dict(model=str(tmp_path / "m"), trainable="head", lr=2e-2, batch_size=16, micro_batch_size=8, steps=10,
              eval_every=10)
    policy, hist = dpo.train(tiny_cfg(tmp_path, **kw), pairs[:100], pairs[100:], log=quiet)
    assert hist[0]["loss"] == pytest.approx(0.6931, abs=1e-4)
    assert hist[-1]["loss"] < hist[0]["loss"] - 0.02, hist[-1]
    before = dict(base.named_parameters())
    for n, p in policy.named_parameters():
        assert torch.equal(p, before[n]) != n.startswith("lm_head"), n  # the head moved, nothing else did


def test_bfloat16_weights_load_without_a_float32_copy_and_set_the_optimizer_dtype(tmp_path):
    torch.manual_seed(0)
    save_pretrained(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32)), str(tmp_path / "m"))
    m = load_model(str(tmp_path / "m"), "cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    pairs = synthetic_pairs(40)
    dpo.train(tiny_cfg(tmp_path, model=str(tmp_path / "m"), weights_dtype="bfloat16", steps=1), pairs[:32],
              pairs[32:], log=quiet)
    state = torch.load(tmp_path / "run" / "checkpoint" / "train_state.pt", weights_only=False)["optimizer"]["state"]
    assert {t.dtype for s in state.values() for k, t in s.items() if k != "step"} == {torch.bfloat16}


@pytest.mark.parametrize("extra, expected", [
    (["--lora-rank", "4", "--fsdp"], "--lora-rank with --fsdp is not supported"),
    (["--trainable", "head", "--lora-rank", "4"], "--trainable head with --lora-rank: choose one way"),
    (["--trainable", "embeddings"], "--trainable embeddings: use all (the paper) or head"),
    (["--fsdp"], "--fsdp shards over several processes: launch with torchrun"),
    (["--lora-rank", "-1"], "the rank must be >= 0"),
    (["--lora-rank", "4", "--ref", "gpt2"], "drop --ref"),
    (["--weights-dtype", "float16"], "--weights-dtype float16: use float32 or bfloat16"),
])
def test_scale_flag_refusals(tmp_path, capsys, extra, expected):
    data = tmp_path / "pairs.jsonl"
    write_jsonl(data, synthetic_pairs(20))
    assert dpo.main(["--data", str(data), "--model", "random:1,2,32", "--out", str(tmp_path / "r"), *extra]) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1, err


def test_batch_must_split_over_the_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(InputError, match="--batch-size 8 does not split over 3 processes"):
        dpo.check_config(tiny_cfg(tmp_path))


# ----------------------------------------------------------------------------------------------
# Several processes: torchrun on CPU (gloo) equals one process on the same global batch

RUN_ARGS = ["--task", "jsonl", "--model", "random:2,2,32", "--batch-size", "8", "--micro-batch-size", "2",
            "--steps", "3", "--max-length", "64", "--max-prompt-length", "32", "--n-eval", "8", "--optimizer",
            "adamw", "--lr", "1e-3", "--warmup-steps", "0", "--eval-every", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The 1-process run every multi-process run is compared with: (data file, metrics rows)."""
    folder = tmp_path_factory.mktemp("one")
    data = folder / "pairs.jsonl"
    # long prompts (a shared context + the question), so that each prompt is computed once (worth_sharing):
    # the multi-process runs then exercise the two-pass shared forward, which FSDP gathers parameters for twice
    write_jsonl(data, [dict(p, prompt="the film story and the actor in the scene was " + p["prompt"])
                       for p in synthetic_pairs(48, seed=3)])
    items = [tokenize_pair(p["prompt"], p["chosen"], p["rejected"]) for p in map(json.loads, open(data))]
    assert fast.worth_sharing(items)
    assert dpo.main(RUN_ARGS + ["--data", str(data), "--out", str(folder / "run")]) == 0
    return data, [json.loads(ln) for ln in open(folder / "run" / "metrics.jsonl")]


def torchrun(n, args, timeout=600):  # generous: a loaded 2-core machine
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "--standalone",
           os.path.join(HERE, "dpo.py"), *args]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=HERE, timeout=timeout)
    if proc.returncode != 0 and "terminate called without an active exception" in proc.stderr:
        # A rare abort inside gloo's C++ threads (seen once in CI in ~100 runs, never reproduced here; cf.
        # pytorch/pytorch#179291). Not a wrong result: run once more, and say so; a second abort fails the test.
        print("gloo aborted a process ('terminate called without an active exception'); running again")
        shutil.rmtree(args[args.index("--out") + 1], ignore_errors=True)
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=HERE, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, time.time() - t0


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_equal_one_process(tmp_path, one_process, mode):
    data, rows1 = one_process
    out = tmp_path / "run"
    proc, seconds = torchrun(2, RUN_ARGS + ["--data", str(data), "--out", str(out)] + (["--fsdp"] if mode == "fsdp" else []))
    rows2 = [json.loads(ln) for ln in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows2] == [1, 2, 3]  # written once, by process 0
    keys = ["loss", "rewards/chosen", "rewards/margins", "rewards/accuracies", "logps/chosen", "grad_norm",
            "eval/loss", "eval/accuracy"]
    diff = max(abs(a[k] - b[k]) for a, b in zip(rows1, rows2) for k in keys if k in a)
    assert all(("eval/loss" in a) == ("eval/loss" in b) for a, b in zip(rows1, rows2))
    assert diff < 1e-5, diff
    assert sorted(os.listdir(out)) == ["checkpoint", "curves.png", "metrics.jsonl"]  # one checkpoint, no leftovers
    assert proc.stdout.count("step 3/3") == 1  # only process 0 logs
    print(f"{mode}: 2 processes vs 1, max metric difference {diff:.2e}, {seconds:.1f} s")
