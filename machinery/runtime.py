"""Run plumbing for dpo.train: what a real training run needs besides the DPO step itself. Each concern is one
named call from train(); none changes what a step computes.

    Run            the run's context: device and dtype, processes (torchrun), the --out folder, --resume
                   (its saved state and config check), the step's pairs, the numeric guard, the log line and
                   metrics.jsonl, checkpoints (atomic), --stop-after
    Run.models     the policy (LoRA, head-only, activation checkpointing, compile) and its Reference: one of five
                   sources (a table passed in, --precompute-ref, the LoRA base, --ref, a frozen copy of the policy)
    StepStats      the step's metrics summed on the device and read once at its end
    check_flags    every run flag checked before anything is loaded or written

Tests: test_reliability.py (bad input, kill -9 and --resume, NaN guard, full disk), test_scale.py (two torchrun
processes give one process's loss curve, LoRA, FSDP), test_train.py (accumulation, precomputed reference, compile).
"""
import contextlib
import copy
import dataclasses
import gc
import json
import math
import os
import shutil
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn

from data import EOS, InputError, epoch_order
from machinery.fast import (SHARE_MIN_SAVING, batch_logps, compile_blocks, pair_length, reference_logps,
                            worth_sharing)
from machinery.hf import load_model, save_pretrained
from machinery.hub import resolve_checkpoint
from machinery.integrity import kill_point, verify_digest, write_digest
from machinery.lora import add_lora, load_lora_state_dict, lora_disabled, lora_merged, lora_state_dict, train_only_head
from machinery.safetensors import load_safetensors, save_safetensors
from machinery.tokenizers import hub_file, load_tokenizer
from machinery.util import autocast, pick_device
from model import GPT


class TrainingError(RuntimeError):
    """A numerical fault during training (non-finite loss or gradient): one line, run stops cleanly."""


def check_flags(cfg):
    """The run's flags (everything but the loss's, which dpo.check_config checks first), before anything is
    loaded or written: a wrong one costs seconds, not a run."""
    for name in ("batch_size", "micro_batch_size", "save_every", "eval_every", "max_prompt_length"):
        if getattr(cfg, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be at least 1")
    if cfg.steps < 0 or (cfg.steps == 0 and cfg.epochs < 1):
        raise InputError(f"--steps {cfg.steps} --epochs {cfg.epochs}: give --steps >= 1, "
                         f"or --steps 0 and --epochs >= 1")
    if cfg.batch_size % cfg.micro_batch_size:
        raise InputError(f"--batch-size {cfg.batch_size} is not a multiple of --micro-batch-size "
                         f"{cfg.micro_batch_size}; choose a divisor")
    if cfg.optimizer not in ("rmsprop", "adamw"):
        raise InputError(f"--optimizer {cfg.optimizer}: use rmsprop or adamw")
    if not 0 < cfg.lr < math.inf:
        raise InputError(f"--lr {cfg.lr}: the learning rate must be a positive number (paper: 1e-6)")
    if not 0 < cfg.adam_eps < math.inf:
        raise InputError(f"--adam-eps {cfg.adam_eps}: must be a positive number (default 1e-8)")
    if cfg.max_prompt_length >= cfg.max_length:
        raise InputError(f"--max-prompt-length {cfg.max_prompt_length} must be below --max-length {cfg.max_length}")
    if cfg.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise InputError(f"--dtype {cfg.dtype}: use auto, float32, bfloat16 or float16")
    if cfg.weights_dtype not in ("float32", "bfloat16"):
        raise InputError(f"--weights-dtype {cfg.weights_dtype}: use float32 or bfloat16")
    if cfg.lora_rank < 0 or not cfg.lora_alpha >= 0 or not 0 <= cfg.lora_dropout < 1:
        raise InputError(f"--lora-rank {cfg.lora_rank} --lora-alpha {cfg.lora_alpha} --lora-dropout {cfg.lora_dropout}: "
                         f"the rank must be >= 0 (0 = off), alpha >= 0 and the dropout in [0, 1)")
    if cfg.lora_rank and cfg.ref:
        raise InputError(f"--ref {cfg.ref} with --lora-rank: the LoRA reference is the base model with its adapters "
                         f"off; drop --ref")
    if cfg.trainable not in ("all", "head"):
        raise InputError(f"--trainable {cfg.trainable}: use all (the paper) or head")
    if cfg.trainable == "head" and (cfg.lora_rank or cfg.fsdp):
        raise InputError(f"--trainable head with {'--lora-rank' if cfg.lora_rank else '--fsdp'}: choose one way of "
                         f"limiting what trains (the head alone is small: DDP holds it on every process)")
    if cfg.compile and cfg.fsdp:
        raise InputError("--compile with --fsdp is not supported (untested here); drop one of them")
    if cfg.lora_rank and cfg.fsdp:
        raise InputError("--lora-rank with --fsdp is not supported: the frozen base fits where the adapters train; "
                         "drop --fsdp (each process then holds the base, DDP syncs the adapters)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.fsdp and world == 1:
        raise InputError("--fsdp shards over several processes: launch with torchrun --nproc_per_node=N dpo.py ...")
    if cfg.batch_size % world:
        raise InputError(f"--batch-size {cfg.batch_size} does not split over {world} processes: use a multiple of "
                         f"{world} (it is the global batch)")
    kind = cfg.device.split(":")[0]
    if kind not in ("auto", "cpu", "cuda", "mps"):
        raise InputError(f"--device {cfg.device}: use auto, cpu, cuda (or cuda:N) or mps")
    mps = getattr(torch.backends, "mps", None)
    if kind == "cuda" and not torch.cuda.is_available() or kind == "mps" and not (mps and mps.is_available()):
        raise InputError(f"--device {cfg.device}: this machine has no such device; use --device cpu (or auto)")


def run_command(train, cfg):
    """train(cfg) as a command: bad input or a numerical fault is one line `error: ...` (status 2; a folder this
    run created and never wrote to is removed), Ctrl-C says where the last checkpoint is (status 130), and the
    process group is closed in the end. Returns (status, history)."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    who = f"process {rank}: " if world > 1 else ""
    if rank == 0:
        print("config: " + " ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items()))
    fresh = not os.path.exists(cfg.out)
    try:
        return 0, train(cfg)[1]
    except (InputError, TrainingError) as e:
        print(f"{who}error: {e}", file=sys.stderr)
        if rank == 0 and fresh and os.path.isdir(cfg.out) and not os.listdir(cfg.out):
            os.rmdir(cfg.out)  # nothing left behind: a folder this run created and never wrote to
        return 2, []
    except KeyboardInterrupt:
        print(f"{who}interrupted; the last checkpoint (if any) is {os.path.join(cfg.out, 'checkpoint')}, "
              f"continue with --resume", file=sys.stderr)
        return 130, []
    finally:
        if dist.is_initialized():
            # free the wrapped models (FSDP/DDP hooks form reference cycles) while the process group and the
            # interpreter are both alive: gloo work still referenced at interpreter exit can abort the process
            gc.collect()
            dist.destroy_process_group()


def model_tokenizer(spec):
    """(tokenizer, the tokenizer.json to copy into checkpoints or None) of a --model: GPT-2's BPE, or the model's
    own tokenizer.json converted to tiktoken (Pythia/NeoX). A missing folder or an offline hub name fails here first,
    in one line."""
    if not spec.startswith("random:"):
        resolve_checkpoint(spec)
    tokenizer = load_tokenizer(spec)
    return tokenizer, None if tokenizer.to_id is None else hub_file(spec, "tokenizer.json")


class Run:
    """One training run's context (see the module docstring). Built first thing in dpo.train."""

    def __init__(self, cfg, log=print):
        device, dtype = pick_device(cfg.device), cfg.dtype
        self.dtype = ("bfloat16" if device.startswith("cuda") else "float32") if dtype == "auto" else dtype
        self.rank, self.world, self.device = init_processes(device)
        self.log = log if self.rank == 0 else (lambda *a, **k: None)  # process 0 speaks for all
        self.cfg, self.ckpt = cfg, os.path.join(cfg.out, "checkpoint")
        self.metrics_path = os.path.join(cfg.out, "metrics.jsonl")
        self.history, self.skipped, self.saved_step, self.start_step, self.step = [], 0, None, 0, 0
        self.state = self._open_out(cfg)  # the saved training state under --resume, else None

    def _open_out(self, cfg):
        """--out checked before anything is loaded: a run there needs --resume or --overwrite, --resume needs a
        readable checkpoint trained with the same settings, and the folder must be writable."""
        recover_checkpoint(self.ckpt)
        if os.path.exists(self.ckpt) and not (cfg.resume or cfg.overwrite):
            raise InputError(f"{cfg.out} already holds a run; pass --resume to continue it, --overwrite to replace "
                             f"it, or choose another --out")
        if cfg.resume and not os.path.exists(os.path.join(self.ckpt, "train_state.pt")):
            raise InputError(f"--resume: {self.ckpt} holds no checkpoint to resume from; drop --resume to start afresh")
        state = None
        if cfg.resume:
            kept = sorted((d for d in os.listdir(cfg.out) if d[:5] == "step-" and d[5:].isdigit()), key=lambda d: int(d[5:]))
            earlier = kept[-2:-1]  # the newest kept step-N is the checkpoint itself
            verify_digest(self.ckpt, f"put the previous checkpoint in its place (rm -r {self.ckpt}; cp -r "
                                     f"{os.path.join(cfg.out, earlier[0])} {self.ckpt}) and --resume, or start afresh "
                                     f"with --overwrite" if earlier else "start afresh with --overwrite (no earlier "
                                     "checkpoint is kept: --keep-checkpoints keeps them)")
            try:
                state = torch.load(os.path.join(self.ckpt, "train_state.pt"), weights_only=False)
            except Exception as e:  # torch raises RuntimeError, EOFError or pickle errors on a damaged file
                raise InputError(f"{self.ckpt}/train_state.pt: cannot read it ({str(e).splitlines()[0][:80]}); the "
                                 f"file is damaged: restore it, or start afresh with --overwrite") from None
            saved = state.get("config", {})
            changed = [k for k in ("model", "ref", "optimizer", "batch_size", "seed", "weights_dtype", "lora_rank",
                                   "fsdp", "trainable")
                       # a change breaks exact resume (the number of processes may change: the global batch is the same)
                       if saved.get(k, getattr(cfg, k)) != getattr(cfg, k)]
            if changed:
                was = ", ".join(f"--{k.replace('_', '-')} {saved[k]}" for k in changed)
                raise InputError(f"--resume: {self.ckpt} was trained with {was}; pass the same values to continue it "
                                 f"exactly, or choose another --out")
        try:  # unwritable, or under a file: found now, not at the first checkpoint
            os.makedirs(cfg.out, exist_ok=True)
            open(os.path.join(cfg.out, f".write-test{self.rank}"), "w").close()
            os.remove(os.path.join(cfg.out, f".write-test{self.rank}"))
        except OSError as e:
            raise InputError(f"--out {cfg.out}: cannot write there ({e.strerror}: {e.filename}); "
                             f"choose another --out") from None
        return state

    def use_data(self, cfg, train_items, eval_items, tokenizer, tokenizer_file):
        """Checks there is a batch of pairs and decides, once for the run, whether prompts are shared
        (fast.worth_sharing); returns the config the run then uses."""
        self.pad_id = tokenizer.eos_id if tokenizer.eos_id is not None else 0  # padding is masked: any valid id
        self.tokenizer, self.tokenizer_file = tokenizer, tokenizer_file
        if len(train_items) < cfg.batch_size:
            raise InputError(f"only {len(train_items)} training pairs, fewer than --batch-size {cfg.batch_size}; "
                             f"lower --batch-size or add data")
        if cfg.share_prompt and not worth_sharing(train_items + eval_items):
            self.log(f"note: prompts too short to be worth computing once (sharing would save under "
                     f"{SHARE_MIN_SAVING:.0%} of the tokens): each row computes its own")
            cfg = dataclasses.replace(cfg, share_prompt=False)
        self.cfg = cfg
        return cfg

    def models(self, reference, ref_lp, train_items, eval_items):
        """(policy, fwd, Reference): the policy as configured (--lora-rank, --trainable, --grad-checkpoint,
        --compile), the module that computes its log-probs (DDP/FSDP-wrapped under torchrun, else the policy)
        and where the reference log-probs come from."""
        cfg, lora = self.cfg, self.cfg.lora_rank > 0
        weights_dtype = getattr(torch, cfg.weights_dtype)
        load_device = "cpu" if cfg.fsdp else self.device  # FSDP moves each process's shards to the GPU as it shards
        # LoRA resumes from the base model plus the saved adapters: the checkpoint's weights are merged ones
        policy = load_model(cfg.resume and not lora and self.ckpt or cfg.model, load_device, cfg.seed, weights_dtype)
        if lora:
            add_lora(policy, cfg.lora_rank, cfg.lora_alpha or cfg.lora_rank, cfg.lora_dropout)
            if cfg.resume:
                path = os.path.join(self.ckpt, "adapters.safetensors")
                if not os.path.exists(path):
                    raise InputError(f"--resume: {path} is missing: the run was not trained with --lora-rank, or the "
                                     f"checkpoint is incomplete; restore it or start afresh with --overwrite")
                load_lora_state_dict(policy, load_safetensors(path), path)
        if cfg.trainable == "head":
            train_only_head(policy)
        policy.grad_checkpoint = cfg.grad_checkpoint  # read by GPT.forward
        if reference is None and ref_lp is None:
            if lora:
                reference = policy  # with its adapters switched off (lora_disabled): the frozen base model
            elif cfg.ref or cfg.resume:
                reference = load_model(cfg.ref or cfg.model, load_device, cfg.seed, weights_dtype)
            elif cfg.precompute_ref:
                reference = policy  # untrained yet, the policy is the reference: the one pass needs no copy
            else:
                reference = copy.deepcopy(policy)
        if reference is not None and reference is not policy:
            reference.eval().requires_grad_(False)  # frozen: never trained, never in the optimiser
            if cfg.compile:
                compile_blocks(reference)
        if cfg.compile:  # after the reference's deepcopy: a copy of a compiled block would call the original's code
            compile_blocks(policy)
        self._check_fits(policy, reference, train_items + eval_items)
        if self.pad_id >= min(m.config.vocab_size for m in (policy, reference) if m is not None):
            self.pad_id = 0  # a tiny vocabulary without the tokenizer's EOS (toy.py): padding is masked, any id will do
        fwd = policy if self.world == 1 else wrap_for_processes(policy, self.device, cfg.fsdp)
        if reference is policy:
            ref_fwd = fwd if cfg.fsdp else policy  # a no-grad forward of a full copy needs no wrapper
        else:
            ref_fwd = wrap_for_processes(reference, self.device, True) if reference is not None and cfg.fsdp else reference
        ref = Reference(self, ref_fwd, policy if lora else None, ref_lp, train_items, eval_items)
        if cfg.fsdp:
            fwd.reshard()  # a no-grad forward leaves the root's parameters gathered: no backward reshards them
        fwd.train()
        return policy, fwd, ref

    def _check_fits(self, policy, reference, items):
        """The models can read the data (vocabulary, positions), and --out has room for two checkpoints.
        Pairs tokenised here from text (dpo.tokenize_all: they carry "truncated") need the tokenizer's whole
        vocabulary; pairs that came with token ids (sampled completions, toy.py's tiny vocabulary) need only
        their largest id."""
        cfg = self.cfg
        longest = max(map(pair_length, items))  # tokens in the longest row
        from_text = any("truncated" in it for it in items)
        given = [it for it in items if "truncated" not in it]
        top = max((max(it["prompt_ids"] + it["chosen_ids"] + it["rejected_ids"]) for it in given), default=-1)
        for spec, m in ((cfg.resume and self.ckpt or cfg.model, policy), (cfg.ref or "the reference model", reference)):
            if m is not None and from_text and m.config.vocab_size < self.tokenizer.vocab_size:
                raise InputError(f"{spec}: a vocabulary of {m.config.vocab_size} tokens, but the data is tokenised "
                                 f"with {self.tokenizer.name}'s {self.tokenizer.vocab_size}; pass a model that uses "
                                 f"that tokenizer, or put the model's tokenizer.json beside its weights")
            if m is not None and top >= m.config.vocab_size:
                raise InputError(f"{spec}: a vocabulary of {m.config.vocab_size} tokens, but the pairs' token ids "
                                 f"go up to {top}; pass the model those ids were made for")
            if m is not None and m.config.block_size < longest:
                raise InputError(f"{spec}: {m.config.block_size} positions, but the longest pair has {longest} "
                                 f"tokens; lower --max-length to {m.config.block_size}")
        per_ckpt = policy.num_params() * 4 * (3 if cfg.optimizer == "adamw" else 2)  # float32 weights + optimiser state
        need = per_ckpt * (1 if os.path.exists(self.ckpt) else 2)  # the previous and the new checkpoint, while saving
        free = shutil.disk_usage(cfg.out).free
        if free < need:
            raise InputError(f"--out {cfg.out}: {free / 1e9:.2f} GB free, but checkpoints need about {need / 1e9:.2f} "
                             f"GB (the previous and the new one while saving); free some space or choose another --out")
        if cfg.weights_dtype != "float32" and not cfg.lora_rank:
            self.log(f"note: --weights-dtype {cfg.weights_dtype} without --lora-rank: the optimiser state is "
                     f"{cfg.weights_dtype} too, and an update smaller than ~0.4% of a weight rounds away (lr {cfg.lr:g})")

    def resume(self, fwd, optimizer, scheduler):
        """The step to start from: 0, or under --resume the saved one, with the optimiser, scheduler and RNG
        state restored and metrics.jsonl cut back to it."""
        cfg, state = self.cfg, self.state
        if state is None:
            if self.rank == 0 and os.path.exists(self.metrics_path):
                os.remove(self.metrics_path)
            return 0
        if cfg.fsdp:  # saved whole (gathered); each process keeps its shard of it
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            set_optimizer_state_dict(fwd, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        self.start_step = self.saved_step = state["step"]
        self.skipped = state.get("skipped", 0)
        if self.rank == 0 and os.path.exists(self.metrics_path):  # drop lines logged after the checkpoint (or cut by a kill)
            lines = [ln for ln in open(self.metrics_path) if ln.endswith("\n") and json.loads(ln)["step"] <= self.start_step]
            with open(self.metrics_path + ".tmp", "w") as f:
                f.writelines(lines)
            os.replace(self.metrics_path + ".tmp", self.metrics_path)
        self.log(f"resumed from {self.ckpt} at step {self.start_step}")
        return self.start_step

    def describe(self, policy, trainable, n_train, n_eval, total_steps):
        cfg = self.cfg
        self.log(f"{n_train} train pairs, {n_eval} held-out | {total_steps} steps of {cfg.batch_size} "
                 f"pairs | {policy.num_params() / 1e6:.1f}M parameters"
                 + (f", {sum(p.numel() for p in trainable):,} trained ("
                    + (f"LoRA rank {cfg.lora_rank})" if cfg.lora_rank else "the output head)")
                    if cfg.lora_rank or cfg.trainable == "head" else "")
                 + f" | {self.device} {self.dtype}, weights {cfg.weights_dtype}"
                 + (f" | {self.world} processes, {'FSDP' if cfg.fsdp else 'DDP'}" if self.world > 1 else ""))

    def step_pairs(self, items, step):
        """(the step's pairs, this process's share of them). The data position is the step: epoch order seeded
        by (seed, epoch), so a resumed run sees the same batches."""
        steps_per_epoch = len(items) // self.cfg.batch_size
        epoch, k = divmod(step, steps_per_epoch)
        order = epoch_order(items, torch.Generator().manual_seed(self.cfg.seed * 1000 + epoch))
        idx = order[k * self.cfg.batch_size:(k + 1) * self.cfg.batch_size]
        return idx, [idx[j] for j in shard(len(idx), self.rank, self.world)[0]]  # one process: all of them

    def no_sync(self, fwd, last):
        """DDP all-reduces the gradients in the last micro-batch's backward only; FSDP reduce-scatters them in
        every backward, so that they stay sharded."""
        accumulate = isinstance(fwd, nn.parallel.DistributedDataParallel) and not last
        return fwd.no_sync() if accumulate else contextlib.nullcontext()

    @property
    def last_good(self):
        return f"the last good checkpoint is {self.ckpt} (step {self.saved_step})" if self.saved_step else \
            "no checkpoint saved yet"

    def guard(self, stats, trainable, step, idx, train_pairs):
        """The numeric guard, after the step's backward and before the optimiser: the step's one read of the
        device (StepStats.read), then the gradient norm clipped. A non-finite loss or gradient norm raises
        TrainingError naming the step and pairs (weights not updated), or under --skip-nonfinite marks the step
        skipped. Returns (grad_norm, fault or None)."""
        fault = stats.read(train_pairs)
        if self.world > 1:  # the whole step's metrics, and a fault on any process stops (or skips) on every one
            sums = all_reduce_sum({**stats.sums, "tokens": stats.tokens, "fault": fault is not None}, self.device)
            stats.tokens = int(sums.pop("tokens"))
            if sums.pop("fault") and fault is None:
                fault = "non-finite loss on another process"
            stats.sums = sums
        grad_norm = math.nan
        if not fault:
            norm = torch.nn.utils.clip_grad_norm_(trainable, self.cfg.max_grad_norm)
            grad_norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()  # FSDP: a DTensor
            if not math.isfinite(grad_norm):
                fault = f"non-finite gradient norm (training pairs {idx[:8]}{'...' if len(idx) > 8 else ''})"
        if fault and not self.cfg.skip_nonfinite:
            raise TrainingError(f"step {step + 1}: {fault}; weights not updated, {self.last_good}; try a lower --lr, "
                                f"--dtype float32, or --skip-nonfinite to skip such batches")
        self.skipped += bool(fault)  # --skip-nonfinite: the batch is consumed (the data position stays the step)
        return grad_norm, fault

    def step_row(self, step, total_steps, stats, grad_norm, lr, fault, t0):
        """The step's metrics row (None for a skipped step), timed to the end of its device work."""
        self.step = step
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()  # the step's time includes its optimiser kernels, not the next step
        dt = time.time() - t0
        if fault:
            self.log(f"step {step}/{total_steps} | skipped: {fault} | {self.skipped} skipped so far (--skip-nonfinite)")
            return None
        return {"step": step, **{k: v / self.cfg.batch_size for k, v in stats.sums.items()}, "grad_norm": grad_norm,
                "lr": lr, "tokens_per_s": stats.tokens / dt, "step_s": dt}

    def log_step(self, row, total_steps):
        """One line per step, and the same numbers appended to metrics.jsonl (process 0)."""
        if row is None:
            return
        self.history.append(row)
        if self.rank == 0:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        self.log(f"step {row['step']}/{total_steps} | loss {row['loss']:.4f} | acc {row['rewards/accuracies']:.2f} | "
                 f"margin {row['rewards/margins']:.3f} | chosen {row['rewards/chosen']:.3f} | rejected "
                 f"{row['rewards/rejected']:.3f} | grad {row['grad_norm']:.2f} | lr {row['lr']:.2e} | "
                 f"{row['tokens_per_s']:.0f} tok/s | {row['step_s'] * 1000:.0f} ms"
                 + (f" | eval loss {row['eval/loss']:.4f} acc {row['eval/accuracy']:.2f}" if "eval/loss" in row else ""))

    def stops_after(self, step):
        """--stop-after N: this invocation ends after N steps (a checkpoint is written first)."""
        if step - self.start_step == self.cfg.stop_after:
            self.log(f"stopping after {self.cfg.stop_after} steps (--stop-after); continue with --resume")
            return True
        return False

    def maybe_save(self, step, total_steps, policy, fwd, optimizer, scheduler):
        """Every --save-every steps, at the end and before --stop-after: the checkpoint, written atomically after
        checking that every weight is finite (never saves NaN)."""
        cfg = self.cfg
        if not (step % cfg.save_every == 0 or step == total_steps or step - self.start_step == cfg.stop_after):
            return
        bad = [n for n, p in policy.named_parameters() if not torch.isfinite(local(p)).all()]
        n_bad = all_reduce_sum({"bad": len(bad)}, self.device)["bad"] if self.world > 1 else len(bad)
        if n_bad:  # finite gradients can still overflow the weights (fp16, huge --lr): never save those
            raise TrainingError(f"step {step}: non-finite weights in {bad[0] if bad else 'a shard of another process'} "
                                f"({n_bad:.0f} tensors); not saved, {self.last_good}; try a lower --lr or --dtype float32")
        if cfg.fsdp:  # gathered whole on process 0: the checkpoint does not depend on the number of processes
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
            opt_state = get_optimizer_state_dict(fwd, optimizer,
                                                 options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            to_save = gathered_model(policy, fwd)
        else:
            opt_state, to_save = optimizer.state_dict(), policy
        failed = None
        if self.rank == 0:
            state = {"step": step, "optimizer": opt_state, "scheduler": scheduler.state_dict(),
                     "rng": torch.get_rng_state(), "config": dataclasses.asdict(cfg), "skipped": self.skipped}
            try:  # the kept copy first: a kill between the two resumes from the previous checkpoint and rewrites it
                if cfg.keep_checkpoints:
                    save_checkpoint(os.path.join(cfg.out, f"step-{step}"), to_save, state, self.tokenizer_file)
                save_checkpoint(self.ckpt, to_save, state, self.tokenizer_file)
            except OSError as e:
                failed = f"cannot write the checkpoint to {self.ckpt} ({e.strerror or e})"
        if self.world > 1 and all_reduce_sum({"failed": failed is not None}, self.device)["failed"]:  # (a barrier)
            failed = failed or "process 0 could not write the checkpoint"
        if failed:
            raise TrainingError(f"step {step}: {failed}; {self.last_good}; free some space or choose another --out")
        self.saved_step = step
        kill_point(cfg.out, step)

    def finish(self):
        if self.skipped:
            self.log(f"{self.skipped} of {self.step} batches skipped for a non-finite loss or gradient (--skip-nonfinite)")


class StepStats:
    """One step's metrics, summed on the device over its micro-batches and read once at its end: a read
    (.item()) waits for the device, and one per micro-batch would leave a GPU idle while Python queues the next."""
    KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
            "logps/chosen", "logps/rejected")

    def __init__(self, device):
        self.sums = torch.zeros(len(self.KEYS), device=device, dtype=torch.float64)
        self.tokens, self.finite, self.micro_batches = 0, [], []

    def add(self, pairs, losses, chosen_rewards, rejected_rewards, policy_logps, tokens):
        self.micro_batches.append(list(pairs))
        self.tokens += tokens  # the tokens actually computed
        self.finite.append(torch.isfinite(losses))  # checked at the step's end (a NaN loss gives NaN gradients)
        policy_chosen, policy_rejected = policy_logps.detach().chunk(2)
        self.sums += torch.stack([v.sum() for v in (losses.detach(), chosen_rewards, rejected_rewards,
                                                    (chosen_rewards > rejected_rewards).float(),
                                                    chosen_rewards - rejected_rewards, policy_chosen,
                                                    policy_rejected)]).double()

    def read(self, train_pairs):
        """The one wait for the device: sums become numbers; returns a fault message if a loss was not finite."""
        finite = torch.cat(self.finite).tolist()
        self.sums = dict(zip(self.KEYS, self.sums.tolist()))
        if all(finite):
            return None
        order = [i for mb in self.micro_batches for i in mb]
        bad = [i for i, ok in zip(order, finite) if not ok]
        m = next(k for k, mb in enumerate(self.micro_batches) if bad[0] in mb)
        return (f"non-finite loss in micro-batch {m + 1} (training pairs {bad[:8]}, "
                f"the first with prompt {train_pairs[bad[0]]['prompt'][:40]!r})")


class Reference:
    """log pi_ref(y|x) of the training and held-out pairs: from a table (passed in, e.g. by the IMDb beta sweep,
    or computed once by --precompute-ref, after which no reference model stays in memory) or from a no-grad pass
    of the reference model at every step (with LoRA: the policy with its adapters switched off)."""

    def __init__(self, run, model, lora_policy, table, train_items, eval_items):
        self.run, self.model, self.table = run, model, table
        self.mode = (lambda: lora_disabled(lora_policy)) if lora_policy is not None else contextlib.nullcontext
        if table is None and run.cfg.precompute_ref:
            self.table = {"train": self.all(train_items), "eval": self.all(eval_items)}
            self.model = None  # freed: training holds only the policy
        self.held_out_table = None if self.table is None else self.table["eval"]

    def all(self, items):
        """(P, 2) [chosen, rejected] for every pair, in one pass (each process its share, then gathered)."""
        run, cfg = self.run, self.run.cfg
        with self.mode():
            return reference_logps_all(self.model, items, cfg.micro_batch_size, run.device, run.dtype,
                                       cfg.average_logps, run.rank, run.world, cfg.share_prompt, run.pad_id)

    def logps(self, batch, pairs):
        """(B, 2) for the pairs of one micro-batch."""
        if self.table is not None:
            return self.table["train"][pairs].to(self.run.device)
        with torch.no_grad(), self.mode(), autocast(self.run.device, self.run.dtype):
            return torch.stack(batch_logps(self.model, batch, self.run.cfg.average_logps).float().chunk(2), 1)

    def held_out(self, eval_items):
        """(Q, 2) for the held-out pairs, computed once: the reference never changes."""
        if self.held_out_table is None:
            self.held_out_table = self.all(eval_items)
        return self.held_out_table


def save_checkpoint(folder, policy, state, tokenizer_file=None):
    """Model (HF layout) + train_state.pt in one folder, swapped in atomically: a kill at any moment
    leaves either the previous checkpoint or this one, never a mixture. A LoRA policy is saved with its
    adapters merged into the weights, W + (alpha/r) B A, and the adapters alone in adapters.safetensors."""
    tmp = folder.rstrip("/") + ".writing"
    adapters = lora_state_dict(policy)
    if adapters:  # LoRA: the merged model (any HF loader reads it) plus the adapters alone, for --resume
        with lora_merged(policy, device="cpu"):
            save_pretrained(policy, tmp)  # itself atomic: tmp appears complete or not at all
        save_safetensors(adapters, os.path.join(tmp, "adapters.safetensors"))
    else:
        save_pretrained(policy, tmp)
    if tokenizer_file:  # a non-GPT-2 tokenizer travels with the weights, so the checkpoint loads as --model
        shutil.copyfile(tokenizer_file, os.path.join(tmp, "tokenizer.json"))
    torch.save(state, os.path.join(tmp, "train_state.pt.tmp"))
    os.replace(os.path.join(tmp, "train_state.pt.tmp"), os.path.join(tmp, "train_state.pt"))
    write_digest(tmp)  # every file, checked on --resume and whenever the folder is loaded
    old = folder.rstrip("/") + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(folder):
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def recover_checkpoint(folder):
    """A kill between save_checkpoint's last two renames leaves no `folder`: the previous checkpoint is
    `.old` and the new one `.writing`, complete (it holds train_state.pt, written last). Put the new one in place."""
    new = folder.rstrip("/") + ".writing"
    if not os.path.exists(folder) and os.path.exists(os.path.join(new, "train_state.pt")):
        os.replace(new, folder)


# ----------------------------------------------------------------------------------------------
# Many processes: `torchrun --nproc_per_node=N dpo.py ...` (N GPUs, or N CPU processes with gloo).
# --batch-size stays the GLOBAL batch: each process takes its contiguous 1/N of every step's pairs, and the
# gradient is the same sum over all pairs / batch_size as in one process. Metrics are summed over the
# processes; only process 0 logs and writes metrics.jsonl and checkpoints.

def init_processes(device):
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) joins the process group, NCCL on CUDA and
    gloo on CPU; each process takes GPU number LOCAL_RANK. One process: (0, 1, device), nothing to join."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def shard(n, rank, world):
    """This process's contiguous share of n items: (indices, how many are real). Every process gets
    ceil(n / world) indices, the last share padded with repeats of item 0 (to be ignored), so that all
    run the same number of forward passes: FSDP's collectives need every process in every forward."""
    size = -(-n // world)
    real = list(range(rank * size, min(n, (rank + 1) * size)))
    return real + [0] * (size - len(real)), len(real)


def all_reduce_sum(values, device):
    """{key: number} summed over the processes (every process passes the same keys, in the same order)."""
    t = torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(values, t.tolist()))


def reference_logps_all(reference, items, micro_batch_size, device, dtype, average, rank=0, world=1,
                        share_prompt=True, pad_id=EOS):
    """reference_logps of every pair, (P, 2). With several processes each scores its share and the shares
    are all-gathered, so that every process ends with the whole table."""
    if world == 1:
        return reference_logps(reference, items, micro_batch_size, device, dtype, average,
                               share_prompt=share_prompt, pad_id=pad_id)
    share, _ = shard(len(items), rank, world)
    if not share:
        return torch.zeros(0, 2)
    mine = reference_logps(reference, [items[i] for i in share], micro_batch_size, device, dtype, average,
                           show=rank == 0, share_prompt=share_prompt, pad_id=pad_id).to(device)  # (S, 2); NCCL gathers GPU tensors
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine)
    return torch.cat(parts).cpu()[:len(items)]  # shares are contiguous: the padding is at the end


class LogpsModule(nn.Module):
    """batch_logps of a GPT as the forward() of a module. DistributedDataParallel synchronises gradients,
    and FSDP gathers parameters, around the forward() of the module they wrap; GPT.forward returns logits,
    not the response log-probs DPO needs, and the output head runs after it. Wrapping this puts it all inside."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch, average=False):
        return batch_logps(self.model, batch, average)  # (2B,)


def wrap_for_processes(model, device, fsdp):
    """A GPT ready for several processes, as a LogpsModule that batch_logps calls.

    DDP (default): every process holds the whole model; during backward the gradients are averaged over
    the processes in buckets, overlapping with the computation. Costs one all-reduce of the gradients a step.
    FSDP (--fsdp): fully_shard on every block, then on the whole: each process keeps 1/N of the parameters,
    gradients and optimiser state, and all-gathers a block's weights only while that block runs (forward
    and again in backward), then reduce-scatters its gradients. Costs ~1.5x DDP's communication."""
    wrapped = LogpsModule(model)
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(device.split(":")[0], (dist.get_world_size(),))
        for block in model.h:
            fully_shard(block, mesh=mesh)
        return fully_shard(wrapped, mesh=mesh)
    return nn.parallel.DistributedDataParallel(wrapped, device_ids=[device] if device.startswith("cuda") else None)


def gathered_model(policy, wrapped):
    """An ordinary GPT with the full weights of an FSDP-sharded policy, on process 0 (None elsewhere), for
    save_pretrained. Every process must call it: the shards are gathered (into host memory)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    full = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    with torch.device("meta"):
        model = GPT(policy.config)
    model.load_state_dict({k.removeprefix("model."): v for k, v in full.items()}, assign=True)
    if policy.config.tie_word_embeddings:
        model.lm_head.weight = model.wte.weight
    return model


def local(t):
    """This process's part of a tensor (an FSDP parameter is a DTensor: its local shard)."""
    return t.to_local() if hasattr(t, "to_local") else t
