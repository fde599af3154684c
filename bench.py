"""Speed measurements, side by side in one run (this machine is shared and noisy: compare ratios).

    python bench.py                 # every workload below, printed as a table and saved to bench.json
    python bench.py sampling        # one workload

Workloads (random-initialised weights, float32 on CPU / bfloat16 autocast on a GPU):
    sampling   16 prompts x 48 new tokens, gpt2 shape: KV cache vs recomputing the whole sequence per step
    dpo-step   8 pairs x (8 prompt + 48 response) tokens, gpt2 and 4x256 shapes: one DPO optimiser step,
               tokens/s and achieved FLOP/s against this machine's measured matmul peak (8*N*T FLOPs a step)
"""
import argparse
import json
import statistics
import sys
import time

import torch

import dpo
from model import GPT, GPTConfig


def matmul_peak(device, dtype, n=2048, reps=5):
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
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_sampling(device, n_prompts=16, new_tokens=48, shape="gpt2"):
    torch.manual_seed(0)
    model = GPT(GPTConfig.named(shape)).to(device).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 50257, (int(torch.randint(4, 17, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n_prompts)]
    rows = []
    for use_cache in (True, False):
        t0 = time.perf_counter()
        out, mask = model.generate(prompts, new_tokens, temperature=1.0, eos_id=-1, use_cache=use_cache,
                                   generator=torch.Generator(device).manual_seed(1))
        sync(device)
        dt = time.perf_counter() - t0
        rows.append({"workload": f"sampling {shape} {n_prompts}x{new_tokens}", "variant": "kv-cache" if use_cache else "no cache",
                     "seconds": dt, "tokens_per_s": int(mask.sum()) / dt})
    rows[0]["speedup"] = rows[1]["seconds"] / rows[0]["seconds"]
    return rows


def bench_dpo_step(device, shape, pairs=8, prompt=8, response=48, steps=5, peak=None):
    torch.manual_seed(0)
    cfg = GPTConfig.named("gpt2") if shape == "gpt2" else GPTConfig(n_layer=4, n_head=4, n_embd=256)
    policy = GPT(cfg).to(device).train()
    reference = GPT(cfg).to(device).eval().requires_grad_(False)
    reference.load_state_dict(policy.state_dict())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50257, (2 * pairs, prompt + response), generator=g)
    ids[pairs:, :prompt] = ids[:pairs, :prompt]  # chosen and rejected share the prompt
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, prompt:] = True
    batch = {"input_ids": ids.to(device), "loss_mask": mask.to(device)}
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    times = []
    for i in range(steps + 1):
        sync(device)
        t0 = time.perf_counter()
        with dpo.autocast(device, dtype):
            lp = dpo.batch_logps(policy, batch).float()
            with torch.no_grad():
                ref = dpo.batch_logps(reference, batch).float()
        pc, pr = lp.chunk(2)
        rc, rr = ref.chunk(2)
        losses, _, _ = dpo.preference_loss(pc, pr, rc, rr, beta=0.1)
        losses.mean().backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 10.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - t0)
    t = statistics.median(times[1:])
    n_tokens = ids.numel()
    flops = 8 * policy.num_params() * n_tokens
    row = {"workload": f"dpo-step {shape} {pairs}x({prompt}+{response})", "variant": "ours",
           "seconds": t, "tokens_per_s": n_tokens / t, "params_M": policy.num_params() / 1e6}
    if peak:
        row["flops_fraction_of_peak"] = flops / t / peak
    return [row]


def main(argv=None):
    parser = argparse.ArgumentParser(description="speed benchmarks")
    parser.add_argument("workloads", nargs="*", default=["sampling", "dpo-step"], help="sampling, dpo-step")
    parser.add_argument("--device", default="auto", help="cuda, mps or cpu (auto: the first available)")
    parser.add_argument("--out", default="bench.json", help="where to write the table as JSON")
    args = parser.parse_args(argv)
    device = dpo.pick_device(args.device)
    peak = matmul_peak(device, torch.bfloat16 if device.startswith("cuda") else torch.float32)
    print(f"device {device} | threads {torch.get_num_threads()} | matmul peak {peak / 1e9:.0f} GFLOP/s")
    rows = []
    for w in args.workloads:
        if w == "sampling":
            rows += bench_sampling(device)
        elif w == "dpo-step":
            rows += bench_dpo_step(device, "gpt2", peak=peak) + bench_dpo_step(device, "4x256", peak=peak)
        else:
            sys.exit(f"error: unknown workload {w!r}; use sampling or dpo-step")
    for r in rows:
        print(" | ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
    with open(args.out, "w") as f:
        json.dump({"device": device, "threads": torch.get_num_threads(), "matmul_peak_flops": peak, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
