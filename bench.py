"""Speed, side by side in one run: this project against TRL's DPOTrainer and Hugging Face generate on the
same work (same weights, data, optimiser, dtype and thread count). The machine is shared and noisy, so
compare the ratios of one run, not figures from different runs.

    python bench.py --trl-python ../trl-venv/bin/python          # every workload; table + bench.json
    python bench.py hh sweep                                    # some workloads (TRL sides skipped
                                                                # when --trl-python is not given)
    python bench.py gpu --trl-python python3                    # on a GPU, TRL installed beside

TRL and transformers are benchmark-only: install them in a separate virtual environment, e.g.
    python -m venv ../trl-venv && ../trl-venv/bin/pip install torch==2.13.0 && \\
        ../trl-venv/bin/pip install transformers==5.24.0 trl==1.16.0 accelerate datasets

Workloads (random-initialised GPT-2-shaped models, float32 on CPU / bfloat16 on a GPU):
    fixed     8 pairs a step, prompt 8 + responses 48 tokens; the gpt2 shape (12 x 768) and 4 x 256;
              --steps steps after --warmup; ours (dpo.train) vs TRL's DPOTrainer, reference on the fly
    hh        the first 256 pairs of the Anthropic HH sample (max length 512), 8 pairs a step in one
              shared order: 32 steps, 4 x 256 shape; ours (length-sorted micro-batches, each prompt
              computed once) vs TRL (pads every step to its longest row)
    sweep     a beta sweep of 3 runs over the first 128 HH pairs: ours with the reference log-probs computed once
              (--precompute-ref) vs the reference model run at every step
    sampling  64 prompts (4-16 tokens) x 48 new tokens, gpt2 shape, temperature 1: ours (KV cache) vs
              transformers' generate (KV cache) on the same weights
    cache     16 prompts x 48 new tokens: ours with the KV cache vs recomputing the sequence every step
    gpu       (for a GPU) the gpt2-large shape, 64 pairs a step of 16 + 240 tokens, micro-batches of 16 pairs on
              both sides, bf16 autocast: ours vs TRL, MFU against a bf16 matmul, peak GPU memory; then
              --gpu-variants of ours (a larger micro-batch, --compile, the profiler's table, ...)
    ops       operators one micro-batch of the gpu workload sends to kernels (on a GPU, launches Python must
              issue) and the ones that make the host wait for the device, ours vs TRL, counted on the CPU

Each side runs in its own process, so peak RSS (resident memory) is that side's alone. Achieved FLOP/s
counts 8*N*T per DPO step (policy forward+backward 6NT, reference forward 2NT; N = parameters including
the head, T = real tokens, prompt counted in both rows) over the step time, against a float32 (CPU) or
bfloat16 (GPU) matmul measured in the same run; it is "useful" FLOP/s, so skipping work raises it.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = {"gpt2": (12, 12, 768), "4x256": (4, 4, 256), "36x64": (36, 4, 64), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280)}
EOS = 50256


def matmul_peak(device, dtype, n=None, reps=5):
    n = n or (8192 if str(device).startswith("cuda") else 2048)  # large enough to fill the machine
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for _ in range(reps + 1):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(times[1:])


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def peaks(device):
    """Peak resident memory of this process, and on a GPU the peak of the memory torch allocated there."""
    out = {"peak_rss_gb": peak_rss_gb()}
    if str(device).startswith("cuda"):
        out["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return out


def pair_tokens(it):
    """Real tokens of a pair as both sides compute them: the prompt in the chosen and the rejected row."""
    return 2 * len(it["prompt_ids"]) + len(it["chosen_ids"]) + len(it["rejected_ids"])


# ----------------------------------------------------------------------------------------------
# workers: each runs in its own process and prints one line "RESULT {json}"

def worker_ours_dpo(spec):
    """dpo.train on the given pairs; returns per-step seconds (the trainer's own step timing)."""
    import dpo
    from machinery import fast
    if "head_keep_bytes" in spec:  # a variant: keep the head's softmax rows up to this size (see fast.HeadLogps)
        fast.HEAD_KEEP_BYTES = spec["head_keep_bytes"]
    pairs = [dict(p, prompt="", chosen="", rejected="") for p in spec["pairs"]]
    cfg = dpo.TrainConfig(model=spec["model"], out=spec["out"], optimizer="adamw", lr=1e-6, warmup_steps=0,
                          batch_size=spec["batch"], micro_batch_size=spec["micro"], steps=spec["steps"],
                          eval_every=10 ** 9, save_every=10 ** 9, overwrite=True, max_length=1024,
                          max_prompt_length=1023, seed=0, device=spec["device"], beta=spec.get("beta", 0.1),
                          share_prompt=spec.get("share_prompt", True), compile=spec.get("compile", False),
                          weights_dtype=spec.get("weights_dtype", "float32"))
    ref_lp, t_ref = None, 0.0
    cache = spec.get("ref_cache")  # a sweep's later runs read the table the first one wrote (timed too)
    if cache and os.path.exists(cache):
        t0 = time.perf_counter()
        ref_lp = torch.load(cache)
        t_ref = time.perf_counter() - t0
    elif spec.get("precompute_ref"):
        from machinery.fast import reference_logps
        from machinery.hf import load_model
        reference = load_model(spec["model"], cfg.device)
        t0 = time.perf_counter()
        ref_lp = {"train": reference_logps(reference, pairs, spec["ref_micro"], cfg.device,
                                               share_prompt=cfg.share_prompt), "eval": torch.zeros(0, 2)}
        if cache:
            torch.save(ref_lp, cache)
        t_ref = time.perf_counter() - t0
        del reference
    if not spec.get("profile"):
        _, history = dpo.train(cfg, train_pairs=pairs, eval_pairs=[], ref_lp=ref_lp, log=lambda s: None)
        return {"step_s": [h["step_s"] for h in history], "ref_pass_s": t_ref, **peaks(spec["device"])}
    from torch.profiler import ProfilerActivity, profile  # where the time goes: a table of operators and kernels
    gpu = spec["device"].startswith("cuda")
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])) as prof:
        _, history = dpo.train(cfg, train_pairs=pairs, eval_pairs=[], ref_lp=ref_lp, log=lambda s: None)
    events = prof.key_averages()
    sort = "self_device_time_total" if gpu else "self_cpu_time_total"
    with open(spec["profile"], "w") as f:
        f.write(events.table(sort_by=sort, row_limit=45))
    busy = sum(getattr(e, sort) for e in events) / 1e6 if gpu else None  # kernel seconds, loading included
    return {"step_s": [h["step_s"] for h in history], "ref_pass_s": t_ref, "device_busy_s": busy,
            **peaks(spec["device"])}


def trl_trainer(spec, callbacks=()):
    """TRL's DPOTrainer on the same pairs in the same order (sequential sampler), reference model on the fly."""
    import copy
    import warnings
    warnings.filterwarnings("ignore")
    import datasets
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    from trl import DPOConfig, DPOTrainer

    # a word-level vocabulary "t0".."t50255" + "<|endoftext|>" = the GPT-2 ids exactly, so TRL's tokenisation
    # of the text below gives back our token ids (checked after TRL prepares the dataset)
    vocab = {f"t{i}": i for i in range(EOS)}
    vocab["<|endoftext|>"] = EOS
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                                     pad_token="<|endoftext|>")
    text = lambda ids: " ".join("<|endoftext|>" if i == EOS else f"t{i}" for i in ids)
    pairs = spec["pairs"]
    ds = datasets.Dataset.from_list([{"prompt": text(p["prompt_ids"]), "chosen": " " + text(p["chosen_ids"]),
                                      "rejected": " " + text(p["rejected_ids"])} for p in pairs])
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel.from_pretrained(spec["model"], dtype=torch.float32)
    micro = spec.get("micro", spec["batch"])  # the same micro-batches as ours: gradient accumulation
    args = DPOConfig(output_dir=spec["out"], per_device_train_batch_size=micro, max_steps=spec["steps"],
                     gradient_accumulation_steps=spec["batch"] // micro,
                     learning_rate=1e-6, lr_scheduler_type="constant", warmup_steps=0, beta=spec.get("beta", 0.1),
                     bf16=spec["device"].startswith("cuda"), fp16=False, gradient_checkpointing=False,
                     report_to="none", logging_steps=10 ** 6,
                     save_strategy="no", eval_strategy="no", max_length=None, use_cpu=spec["device"] == "cpu",
                     dataloader_num_workers=0, seed=0, disable_tqdm=True, precompute_ref_log_probs=False)

    class InOrder(DPOTrainer):  # the pairs in the given order, as ours sees them
        def _get_train_sampler(self, *a, **k):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    trainer = InOrder(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=ds,
                      processing_class=tokenizer, callbacks=list(callbacks))
    for i in (0, len(pairs) - 1):  # the exact token ids reach TRL
        row = trainer.train_dataset[i]
        assert (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) == \
               (pairs[i]["prompt_ids"], pairs[i]["chosen_ids"], pairs[i]["rejected_ids"]), "token ids differ"
    return trainer


def worker_trl_dpo(spec):
    """trl_trainer's training, each step timed."""
    import transformers
    times = []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            sync(spec["device"])
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            sync(spec["device"])
            times.append(time.perf_counter() - self.t0)

    trainer = trl_trainer(spec, [Timer()])
    trainer.train()
    return {"step_s": times, **peaks(spec["device"])}


def count_ops(fn):
    """Runs fn() and counts the operators it sends to kernels (views, which launch none, left out) and the ones
    that make the host wait for the device: .item(), nonzero, a boolean-mask selection (the result's size is
    data). On a GPU each counted operator is a kernel launch that Python must issue."""
    import collections
    from torch.utils._python_dispatch import TorchDispatchMode
    views = {"view", "_unsafe_view", "t", "transpose", "split", "split_with_sizes", "expand", "slice", "select",
             "unsqueeze", "squeeze", "permute", "detach", "alias", "as_strided", "unbind", "_reshape_alias"}

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops, self.waits = collections.Counter(), 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.__name__.split(".")[0]
            if name not in views:
                self.ops[name] += 1
            boolean = name.startswith("index") and any(isinstance(t, torch.Tensor) and t.dtype == torch.bool
                                                        for t in (args[1] or []))
            self.waits += name in ("_local_scalar_dense", "nonzero", "masked_select") or boolean
            return func(*args, **(kwargs or {}))

    with Count() as c:
        fn()
    return {"ops": sum(c.ops.values()), "waits": c.waits, "top": c.ops.most_common(6)}


def worker_ours_ops(spec):
    """Operators in one micro-batch of ours: policy forward, reference forward, backward; the head chunked as
    on a GPU (fast.head_chunk_rows)."""
    import copy
    from machinery import fast
    from machinery.hf import from_pretrained
    gpu_rows = fast.head_chunk_rows
    fast.head_chunk_rows = lambda device, vocab_size: gpu_rows("cuda", vocab_size)  # the GPU's rule, on the CPU
    policy = from_pretrained(spec["model"])
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    items = spec["pairs"]
    batch = fast.make_batch(items, "cpu", fast.worth_sharing(items))  # as dpo.train decides
    out = {}
    out["ours"] = count_ops(lambda: out.setdefault("lp", fast.batch_logps(policy, batch)))
    with torch.no_grad():
        ref = count_ops(lambda: fast.batch_logps(reference, batch))
    back = count_ops(lambda: out.pop("lp").sum().backward())
    res = out["ours"]
    return {"ops": res["ops"] + ref["ops"] + back["ops"], "waits": res["waits"] + ref["waits"] + back["waits"],
            "forward": res["ops"], "backward": back["ops"], "shared_prompt": "response_ids" in batch}


def worker_trl_ops(spec):
    """The same for TRL: its loss on the same micro-batch (policy and reference forwards), then backward."""
    trainer = trl_trainer(spec)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    out = {}
    fwd = count_ops(lambda: out.setdefault("loss", trainer.compute_loss(trainer.model, batch)))
    back = count_ops(lambda: out.pop("loss").backward())
    return {"ops": fwd["ops"] + back["ops"], "waits": fwd["waits"] + back["waits"], "backward": back["ops"]}


def _prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, EOS, (int(torch.randint(4, 17, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def worker_ours_sample(spec):
    from machinery.hf import from_pretrained
    model = from_pretrained(spec["model"], device=spec["device"])
    prompts = _prompts(spec["n_prompts"])
    times = []
    for use_cache in ([True] if spec.get("cache_only", True) else [True, False]):
        t0 = time.perf_counter()
        out, mask = model.generate(prompts, spec["new_tokens"], temperature=1.0, eos_id=-1, use_cache=use_cache,
                                   generator=torch.Generator(spec["device"]).manual_seed(1))
        sync(spec["device"])
        times.append(time.perf_counter() - t0)
        assert int(mask.sum()) == len(prompts) * spec["new_tokens"]
    return {"seconds": times, "tokens": len(prompts) * spec["new_tokens"], "peak_rss_gb": peak_rss_gb()}


def worker_hf_sample(spec):
    import transformers
    model = transformers.GPT2LMHeadModel.from_pretrained(spec["model"], dtype=torch.float32).to(spec["device"]).eval()
    prompts = _prompts(spec["n_prompts"])
    T = max(map(len, prompts))
    ids = torch.tensor([[EOS] * (T - len(p)) + p for p in prompts], device=spec["device"])  # left padding
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts], device=spec["device"])
    torch.manual_seed(1)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=spec["new_tokens"], min_new_tokens=spec["new_tokens"], pad_token_id=EOS,
                             use_cache=True)
    sync(spec["device"])
    dt = time.perf_counter() - t0
    assert out.shape == (len(prompts), T + spec["new_tokens"])
    return {"seconds": [dt], "tokens": len(prompts) * spec["new_tokens"], "peak_rss_gb": peak_rss_gb()}


WORKERS = {"ours-dpo": worker_ours_dpo, "trl-dpo": worker_trl_dpo, "ours-sample": worker_ours_sample,
           "hf-sample": worker_hf_sample, "ours-ops": worker_ours_ops, "trl-ops": worker_trl_ops}


def run_worker(python, name, spec, tmp, threads, required=True):
    """Runs one worker in a fresh process with the given thread count; returns its result dict (or, when
    not required, None after printing why it failed)."""
    path = os.path.join(tmp, f"spec-{name}.json")
    with open(path, "w") as f:
        json.dump(spec, f)
    path_ = os.pathsep.join([HERE] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONPATH=path_,
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([python, os.path.abspath(__file__), "--worker", name, "--spec", path],
                          capture_output=True, text=True, env=env)
    results = [ln[7:] for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not results:
        if not required:
            print(f"worker {name} failed (exit {proc.returncode}), left out:\n{proc.stderr[-3000:]}", flush=True)
            return None
        sys.exit(f"error: worker {name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(results[-1])


# ----------------------------------------------------------------------------------------------
# the workloads

def make_model(shape, folder, device):
    """A random-initialised GPT-2-shaped model written once in the Hugging Face layout: both sides load it."""
    from machinery.hf import save_pretrained
    from model import GPT, GPTConfig
    if not os.path.exists(os.path.join(folder, "model.safetensors")):
        torch.manual_seed(0)
        n_layer, n_head, n_embd = SHAPES[shape]
        save_pretrained(GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd)), folder)
    return folder


def n_params(shape):
    n_layer, _, c = SHAPES[shape]
    return 50257 * c + 1024 * c + n_layer * (12 * c * c + 13 * c) + 2 * c  # tied head counted once


def fixed_pairs(n, prompt=8, response=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda k: torch.randint(0, EOS, (k,), generator=g).tolist()
    return [{"prompt_ids": r(prompt), "chosen_ids": r(response - 1) + [EOS], "rejected_ids": r(response - 1) + [EOS]}
            for _ in range(n)]


def hh_pairs(n=256, max_length=512):
    import data
    pairs = data.read_hh(os.path.join(os.environ.get("DPO_HH", os.path.join(HERE, "..", "shared", "data", "hh-rlhf")),
                                      "harmless-base-test.jsonl.gz"))[:n]
    items = [data.tokenize_pair(p["prompt"], p["chosen"], p["rejected"], max_length, max_length // 2) for p in pairs]
    items = [{k: it[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for it in items]
    order = data.epoch_order(items, torch.Generator().manual_seed(0))  # dpo.train's order for seed 0, epoch 0
    return [items[i] for i in order]


def dpo_row(workload, variant, res, pairs, batch, warmup, shape, peak):
    """Tokens/s over the steps after warm-up (real tokens over summed step times) and FLOP/s fraction."""
    steps = res["step_s"][warmup:]
    tokens = sum(pair_tokens(p) for p in pairs[warmup * batch:(warmup + len(steps)) * batch])
    seconds = sum(steps)
    row = {"workload": workload, "variant": variant, "median_step_s": statistics.median(steps),
           "tokens_per_s": tokens / seconds, "peak_rss_gb": res["peak_rss_gb"]}
    if "peak_gpu_gb" in res:
        row["peak_gpu_gb"] = res["peak_gpu_gb"]
    if peak:
        row["fraction_of_peak"] = 8 * n_params(shape) * tokens / seconds / peak
    return row


def with_ratio(rows, ours, other, key="tokens_per_s"):
    rows[ours]["ratio"] = rows[ours][key] / rows[other][key]
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description="speed: ours vs TRL's DPOTrainer and HF generate, side by side")
    parser.add_argument("workloads", nargs="*", default=["fixed", "hh", "sweep", "sampling"],
                        help="fixed, hh, sweep, sampling, cache, gpu, ops")
    parser.add_argument("--trl-python", default=None, help="python of a virtual environment with trl and transformers")
    parser.add_argument("--shapes", default="gpt2,4x256", help="model shapes for the fixed workload")
    parser.add_argument("--steps", type=int, default=20, help="timed steps of the fixed workload")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--hh-micro", type=int, default=1, help="our micro-batch (pairs) on HH")
    parser.add_argument("--hh-pairs", type=int, default=256, help="the first N pairs of the HH sample")
    parser.add_argument("--sweep-pairs", type=int, default=128, help="the first N HH pairs for the beta sweep")
    parser.add_argument("--gpu-shape", default="gpt2-large", help="model shape of the gpu workload")
    parser.add_argument("--gpu-batch", type=int, default=64, help="pairs a step in the gpu workload (the paper's 64)")
    parser.add_argument("--gpu-micro", type=int, default=16, help="pairs a forward/backward in the gpu workload (both sides)")
    parser.add_argument("--gpu-steps", type=int, default=10, help="timed steps of the gpu workload")
    parser.add_argument("--gpu-tokens", default="16,240", help="prompt,response tokens of the gpu workload's pairs")
    parser.add_argument("--gpu-variants", default="kept,micro2x",
                        help="more runs of ours in the gpu workload: kept, micro2x, micro4x, compile, compile-micro2x, "
                             "bf16-weights, profile (writes --profile-out)")
    parser.add_argument("--profile-out", default="profile.txt", help="the profiler's table (variant profile)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads of every side")
    parser.add_argument("--device", default="auto", help="cuda, mps or cpu")
    parser.add_argument("--out", default="bench.json", help="where to write the table as JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:  # inside a worker process
        with open(args.spec) as f:
            spec = json.load(f)
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
        print("RESULT " + json.dumps(WORKERS[args.worker](spec)), flush=True)
        return

    from machinery.util import pick_device
    device = pick_device(args.device)
    torch.set_num_threads(args.threads)
    peak = matmul_peak(device, torch.bfloat16 if device.startswith("cuda") else torch.float32)
    print(f"device {device} | threads {args.threads} | matmul peak {peak / 1e9:.0f} GFLOP/s | "
          f"TRL: {args.trl_python or 'not given (ours only)'}", flush=True)
    tmp = tempfile.mkdtemp(prefix="dpo-bench-")
    rows = []

    def show(new):
        for r in new:
            print(" | ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()), flush=True)
        rows.extend(new)

    def dpo_pair(workload, shape, pairs, steps, warmup, micro, **extra):
        model = make_model(shape, os.path.join(tmp, shape), device)
        spec = {"model": model, "pairs": pairs, "batch": 8, "steps": steps, "device": device,
                "out": os.path.join(tmp, "run"), **extra}
        new = [dpo_row(workload, "ours", run_worker(sys.executable, "ours-dpo", dict(spec, micro=micro), tmp, args.threads),
                       pairs, 8, warmup, shape, peak)]
        if args.trl_python:
            new.append(dpo_row(workload, "trl", run_worker(args.trl_python, "trl-dpo", spec, tmp, args.threads),
                               pairs, 8, warmup, shape, peak))
            with_ratio(new, 0, 1)
        show(new)

    for w in args.workloads:
        if w == "fixed":
            for shape in args.shapes.split(","):
                n = args.warmup + args.steps
                dpo_pair(f"fixed {shape} 8x(8+48)", shape, fixed_pairs(8 * n), n, args.warmup, 8)
        elif w == "hh":
            pairs = hh_pairs(args.hh_pairs)
            dpo_pair(f"hh 4x256 {len(pairs)} pairs", "4x256", pairs, len(pairs) // 8, 2, args.hh_micro)
        elif w == "sweep":
            pairs, shape = hh_pairs(args.sweep_pairs), "4x256"
            model = make_model(shape, os.path.join(tmp, shape), device)
            spec = {"model": model, "pairs": pairs, "batch": 8, "steps": len(pairs) // 8, "device": device,
                    "out": os.path.join(tmp, "run"), "micro": args.hh_micro, "ref_micro": 8}
            totals = {}
            cache = os.path.join(tmp, "sweep-reference.pt")
            for variant, pre in (("ours, reference cached once", True), ("ours, reference on the fly", False)):
                total, rss = 0.0, 0.0
                for i, beta in enumerate((0.05, 0.1, 0.5)):  # cached: run 1 computes and saves, runs 2-3 load
                    res = run_worker(sys.executable, "ours-dpo",
                                     dict(spec, beta=beta, precompute_ref=pre, ref_cache=cache if pre else None),
                                     tmp, args.threads)
                    total += sum(res["step_s"]) + res["ref_pass_s"]
                    rss = max(rss, res["peak_rss_gb"])
                totals[variant] = {"workload": f"sweep hh 4x256 {len(pairs)} pairs, 3 betas", "variant": variant, "seconds": total,
                                   "peak_rss_gb": rss}
            new = list(totals.values())
            new[0]["ratio"] = new[1]["seconds"] / new[0]["seconds"]
            show(new)
        elif w == "gpu":  # bf16 autocast on a GPU (float32 elsewhere), fp32 weights and AdamW on both sides
            shape, batch, micro, warm = args.gpu_shape, args.gpu_batch, args.gpu_micro, args.warmup
            prompt, response = map(int, args.gpu_tokens.split(","))
            n = warm + args.gpu_steps
            pairs = fixed_pairs(batch * n, prompt, response)
            model = make_model(shape, os.path.join(tmp, shape), device)
            spec = {"model": model, "pairs": pairs, "batch": batch, "micro": micro, "steps": n, "device": device,
                    "out": os.path.join(tmp, "run")}
            name = f"gpu {shape} {batch}x({prompt}+{response}) micro {micro}"
            new = [dpo_row(name, "ours", run_worker(sys.executable, "ours-dpo", spec, tmp, args.threads),
                           pairs, batch, warm, shape, peak)]
            if args.trl_python:
                res = run_worker(args.trl_python, "trl-dpo", spec, tmp, args.threads, required=False)
                if res:
                    new.append(dpo_row(name, "trl", res, pairs, batch, warm, shape, peak))
                    with_ratio(new, 0, 1)
            show(new)
            variants = {"kept": ("ours, head softmax kept (no recompute)", {"head_keep_bytes": 2 ** 40}),
                        "micro2x": (f"ours, micro {2 * micro}", {"micro": 2 * micro}),
                        "micro4x": (f"ours, micro {min(4 * micro, batch)}", {"micro": min(4 * micro, batch)}),
                        "compile": ("ours, --compile", {"compile": True}),
                        "compile-micro2x": (f"ours, --compile, micro {2 * micro}", {"compile": True, "micro": 2 * micro}),
                        "bf16-weights": ("ours, --weights-dtype bfloat16", {"weights_dtype": "bfloat16"}),
                        "profile": ("ours, under the profiler", {"profile": os.path.abspath(args.profile_out)})}
            for v in filter(None, args.gpu_variants.split(",")):  # each in its own process, after the main rows
                if v not in variants:
                    sys.exit(f"error: --gpu-variants {v}: use {', '.join(variants)}")
                variant, extra = variants[v]
                res = run_worker(sys.executable, "ours-dpo", dict(spec, **extra), tmp, args.threads, required=False)
                if res:
                    row = dpo_row(name, variant, res, pairs, batch, warm, shape, peak)
                    if res.get("device_busy_s"):
                        row["device_busy_s"] = res["device_busy_s"]
                    show([row])
        elif w == "ops":  # kernel launches per micro-batch of the gpu workload, counted on the CPU
            prompt, response = map(int, args.gpu_tokens.split(","))
            shape = "36x64"  # gpt2-large's 36 blocks (the count does not depend on the width)
            model = make_model(shape, os.path.join(tmp, shape), device)
            spec = {"model": model, "pairs": fixed_pairs(args.gpu_micro, prompt, response), "batch": args.gpu_micro,
                    "steps": 1, "device": "cpu", "out": os.path.join(tmp, "run")}
            name = f"ops, 36 blocks, {args.gpu_micro}x({prompt}+{response})"
            new = [{"workload": name, "variant": "ours", **run_worker(sys.executable, "ours-ops", spec, tmp, args.threads)}]
            if args.trl_python:
                new.append({"workload": name, "variant": "trl",
                            **run_worker(args.trl_python, "trl-ops", spec, tmp, args.threads)})
            show(new)
        elif w == "sampling":
            model = make_model("gpt2", os.path.join(tmp, "gpt2"), device)
            spec = {"model": model, "n_prompts": 64, "new_tokens": 48, "device": device}
            res = run_worker(sys.executable, "ours-sample", spec, tmp, args.threads)
            new = [{"workload": "sampling gpt2 64x48", "variant": "ours (KV cache)", "seconds": res["seconds"][0],
                    "tokens_per_s": res["tokens"] / res["seconds"][0], "peak_rss_gb": res["peak_rss_gb"]}]
            if args.trl_python:
                res = run_worker(args.trl_python, "hf-sample", spec, tmp, args.threads)
                new.append({"workload": "sampling gpt2 64x48", "variant": "transformers generate", "seconds": res["seconds"][0],
                            "tokens_per_s": res["tokens"] / res["seconds"][0], "peak_rss_gb": res["peak_rss_gb"]})
                with_ratio(new, 0, 1)
            show(new)
        elif w == "cache":
            model = make_model("gpt2", os.path.join(tmp, "gpt2"), device)
            res = run_worker(sys.executable, "ours-sample", {"model": model, "n_prompts": 16, "new_tokens": 48,
                                                              "device": device, "cache_only": False}, tmp, args.threads)
            new = [{"workload": "sampling gpt2 16x48", "variant": v, "seconds": s, "tokens_per_s": res["tokens"] / s}
                   for v, s in zip(("ours, KV cache", "ours, no cache"), res["seconds"])]
            show(with_ratio(new, 0, 1))
        else:
            sys.exit(f"error: unknown workload {w!r}; use fixed, hh, sweep, sampling, cache, gpu or ops")
    with open(args.out, "w") as f:
        json.dump({"device": device, "threads": args.threads, "matmul_peak_flops": peak,
                   "command": "python bench.py " + " ".join(argv if argv is not None else sys.argv[1:]), "rows": rows},
                  f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
