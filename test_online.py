"""Tests for online DPO (online.py) and for what it rides on in the IMDb experiment: --methods (which methods a
run trains and evaluates; the stages no chosen method needs are not planned) and the reward model's best epoch
(ppo.train_reward_model with a held-out set, Appendix C.1).

    python -m pytest -q test_online.py
"""
import json
import math
import os

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(HERE, "..", "shared", "tiktoken"))
IMDB = os.environ.get("DPO_IMDB", os.path.join(HERE, "..", "shared", "data", "aclImdb_v1.tar.gz"))
needs_imdb = pytest.mark.skipif(not os.path.exists(IMDB), reason=f"IMDb archive not found at {IMDB} (set DPO_IMDB)")

import dpo
import imdb


def planned(**changes):
    cfg = imdb.ImdbConfig(preset="tiny", out="unused", imdb=IMDB, **changes).resolved()
    return set(imdb.plan(cfg, True, log=lambda s: None).plan)


# ----------------------------------------------------------------------------------------------
# --methods

def test_methods_default_plans_every_stage_of_the_preset():
    assert planned() == {"sft", "classifier", "pairs", "reference", "dpo-beta0.1", "reference-rankings",
                         "dpo-pl-beta0.1", "preferred-ft", "unlikelihood-alpha0.1", "reward_model", "ppo-gt", "ppo",
                         "best-of-n", "implicit-samples"}
    assert planned(methods=",".join(imdb.METHODS[:8])) == planned()


def test_methods_plan_only_the_stages_the_chosen_methods_need():
    assert planned(methods="dpo,ppo-gt") == {"sft", "classifier", "pairs", "reference", "dpo-beta0.1",
                                             "implicit-samples", "ppo-gt"}
    assert planned(methods="ppo-gt") == {"sft", "classifier", "pairs", "ppo-gt"}
    assert planned(methods="best-of-n") == {"sft", "classifier", "pairs", "best-of-n"}
    assert planned(methods="best-of-n-rm") == {"sft", "classifier", "pairs", "reward_model", "best-of-n"}
    assert planned(methods="ppo") == {"sft", "classifier", "pairs", "reward_model", "ppo"}
    assert planned(methods="unlikelihood,dpo-pl") == {"sft", "classifier", "pairs", "unlikelihood-alpha0.1",
                                                      "reference-rankings", "dpo-pl-beta0.1", "implicit-samples"}


def test_methods_do_not_change_the_keys_of_the_stages_they_keep():
    def keys(**changes):
        cfg = imdb.ImdbConfig(preset="tiny", out="unused", imdb=IMDB, **changes).resolved()
        return {n: s.key for n, s in imdb.plan(cfg, True, log=lambda s: None).plan.items()}
    base, some = keys(), keys(methods="dpo,ppo-gt,ppo")
    assert all(base[s] == some[s] for s in some)


@pytest.mark.parametrize("value", ["dpo,nope", "", "DPO"])
def test_a_bad_method_is_refused_in_one_line_before_any_stage(tmp_path, capsys, value):
    out = tmp_path / "run"
    argv = ["--task", "imdb", "--preset", "tiny", "--out", str(out), "--imdb", IMDB, "--device", "cpu",
            "--methods", value]
    assert dpo.main(argv) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith(f"error: --methods {value!r}") and "choose from dpo," in err[0], err
    assert not out.exists()


@needs_imdb
def test_a_tiny_run_of_dpo_and_ppo_gt_only(tmp_path):
    out = tmp_path / "run"
    argv = ["--task", "imdb", "--preset", "tiny", "--out", str(out), "--imdb", IMDB, "--device", "cpu",
            "--methods", "dpo,ppo-gt"]
    assert dpo.main(argv) == 0
    rows = json.load(open(out / "results.json"))
    assert {r["method"] for r in rows} == {"SFT", "DPO", "PPO-GT"}
    assert not (out / "reward_model").exists() and not (out / "ppo").exists() and not (out / "preferred-ft").exists()
    assert json.load(open(out / "summary.json"))["reward_model_accuracy"] is None


# ----------------------------------------------------------------------------------------------
# The reward model's best epoch (Appendix C.1)

def marker_pairs(n, generator, reverse=False):
    """Pairs whose chosen response holds token 7 (reverse: whose rejected one does), as in test_ppo."""
    def response(with_marker):
        tokens = torch.randint(8, 32, (4,), generator=generator).tolist()
        if with_marker:
            tokens[int(torch.randint(4, (1,), generator=generator))] = 7
        return tokens
    pairs = []
    for _ in range(n):
        prompt = [1] + torch.randint(8, 32, (2,), generator=generator).tolist()
        marked, plain = response(True), response(False)
        pairs.append({"prompt_ids": prompt, "chosen_ids": plain if reverse else marked,
                      "rejected_ids": marked if reverse else plain})
    return pairs


def test_reward_model_keeps_the_best_epoch_not_the_last(tmp_path, monkeypatch):
    """Held-out pairs labelled against the training rule (the marker is REJECTED there): every epoch of fitting
    the training pairs lowers the held-out accuracy, so the best epoch is the first. The kept model is then
    exactly the one-epoch model (the same seed: the same first epoch). Resumable: a run broken after epoch 2 and
    resumed from its checkpoint (which carries the best weights so far) ends with the same weights."""
    from machinery.stages import Checkpoints
    import ppo
    from model import GPT, GPTConfig
    g = torch.Generator().manual_seed(0)
    train_pairs, held_out = marker_pairs(64, g), marker_pairs(40, g, reverse=True)
    torch.manual_seed(0)
    trunk = GPT(GPTConfig(vocab_size=32, block_size=32, n_layer=1, n_head=2, n_embd=32)).eval()
    kw = dict(train_trunk=True, batch_size=16, lr=3e-3, seed=0)
    model, accuracy = ppo.train_reward_model(trunk, train_pairs, epochs=3, held_out=held_out, **kw)
    one, _ = ppo.train_reward_model(trunk, train_pairs, epochs=1, **kw)
    last, last_acc = ppo.train_reward_model(trunk, train_pairs, epochs=3, **kw)
    assert len(accuracy.per_epoch) == 3 and accuracy.per_epoch[0] > max(accuracy.per_epoch[1:]), accuracy.per_epoch
    assert accuracy.best_epoch == 1 and last_acc.best_epoch == 3 and last_acc.per_epoch == []
    assert accuracy(held_out) == accuracy.per_epoch[0]
    assert all(torch.equal(v, one.state_dict()[k]) for k, v in model.state_dict().items())
    assert not all(torch.equal(v, last.state_dict()[k]) for k, v in model.state_dict().items())
    # ties keep the earlier epoch: a held-out set every epoch ranks the same (each pair both ways) -> epoch 1
    both = held_out[:1] + [{**held_out[0], "chosen_ids": held_out[0]["rejected_ids"],
                            "rejected_ids": held_out[0]["chosen_ids"]}]
    tied, tied_acc = ppo.train_reward_model(trunk, train_pairs, epochs=2, held_out=both, **kw)
    assert tied_acc.per_epoch == [0.5, 0.5] and tied_acc.best_epoch == 1
    # broken after epoch 2 (4 batches an epoch), resumed from the checkpoint at step 8
    calls, real = [0], ppo.pair_scores

    def breaking(m, pairs):
        if torch.is_grad_enabled():
            calls[0] += 1
            if calls[0] == 9:
                raise KeyboardInterrupt
        return real(m, pairs)
    monkeypatch.setattr(ppo, "pair_scores", breaking)
    folder = str(tmp_path / "rm")
    with pytest.raises(KeyboardInterrupt):
        ppo.train_reward_model(trunk, train_pairs, epochs=3, held_out=held_out,
                               checkpoints=Checkpoints(folder, 4, 12, keep=False, log=lambda s: None), **kw)
    monkeypatch.setattr(ppo, "pair_scores", real)
    printed = []
    resumed, resumed_acc = ppo.train_reward_model(trunk, train_pairs, epochs=3, held_out=held_out,
                                                  checkpoints=Checkpoints(folder, 4, 12, keep=False,
                                                                          log=printed.append), **kw)
    assert printed == ["rm: resumed at step 8 of 12"]
    assert resumed_acc.per_epoch == accuracy.per_epoch and resumed_acc.best_epoch == 1
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in resumed.state_dict().items())


# ----------------------------------------------------------------------------------------------
# Online DPO (online.py)

def tiny_sft(folder):
    from machinery.hf import save_pretrained
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    save_pretrained(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64)), str(folder))
    return str(folder)


def toy_reward(sequences):
    """A made-up reward: the share of even token ids (distinct enough that ties are rare)."""
    return torch.tensor([sum(t % 2 == 0 for t in s) / len(s) for s in sequences])


def test_online_dpo_step_scores_distinct_rows_once_with_the_gradient_of_every_pair_scored_alone(tmp_path, monkeypatch):
    """K = 4 samples of 2 prefixes (a sample shared by up to 3 pairs, one response repeated on purpose): dpo_step's
    loss and clipped gradient equal those of the plain computation, every pair's chosen and rejected rows scored
    on their own (2B rows, duplicates and all), to float rounding."""
    import eval as ev
    import online
    from machinery.hf import from_pretrained
    sft_dir = tiny_sft(tmp_path / "sft")
    reference = from_pretrained(sft_dir).requires_grad_(False)
    prompts = [[50256, 11, 12], [50256, 13]]
    samples = ev.sample_completions(reference, prompts, 4, 5, generator=torch.Generator().manual_seed(3))
    samples[3] = list(samples[2])  # two equal samples of the first prefix: one row
    rows = [p for p in prompts for _ in range(4)]
    rewards = [float(sum(x + y)) for x, y in zip(rows, samples)]  # distinct but for the equal samples (a tie)
    pairs = online.label_pairs(prompts, samples, rewards, 4)
    assert len(pairs) == 5 + 6  # the tie makes no pair
    cfg = online.OnlineConfig(beta=0.1, max_grad_norm=1e9)

    class Keep(torch.optim.SGD):  # records the gradient the step was taken with
        def step(self, closure=None):
            self.grads = [p.grad.clone() for p in self.param_groups[0]["params"]]
    fast = from_pretrained(sft_dir)
    opt = Keep(fast.parameters(), lr=0.0)
    scored, real = [], ev.batch_completion_logps
    monkeypatch.setattr(ev, "batch_completion_logps", lambda m, xs, ys: scored.append(len(xs)) or real(m, xs, ys))
    loss, accuracy, norm = online.dpo_step(fast, reference, pairs, dpo.dpo_loss, opt,
                                           torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), cfg)
    monkeypatch.undo()
    assert scored[0] == 7  # 8 samples, two of them equal: 7 rows for 22 pair sides

    plain = from_pretrained(sft_dir)
    prompts2 = [x for x, _, _ in pairs] * 2
    responses = [yw for _, yw, _ in pairs] + [yl for _, _, yl in pairs]
    pol = torch.stack([ev.batch_completion_logps(plain, [x], [y])[0] for x, y in zip(prompts2, responses)])  # one by one
    ref = torch.stack([ev.batch_completion_logps(reference, [x], [y])[0] for x, y in zip(prompts2, responses)])
    losses, _, _ = dpo.dpo_loss(*pol.chunk(2), *ref.chunk(2), 0.1)
    losses.mean().backward()
    assert abs(loss - losses.mean().item()) < 1e-6
    for g, p in zip(opt.grads, plain.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-4)
    assert norm > 0


def test_online_dpo_first_iteration_at_k2_on_frozen_sft_samples_equals_one_offline_dpo_step(tmp_path):
    """K = 2 samples of each of 6 prefixes drawn once from pi_SFT and frozen (online DPO's sampler replaced by
    them): online DPO's first iteration and dpo.py's train (one step, the batch = all the pairs) on the same
    labelled pairs give the same loss and the same weights after the step (to float rounding: the trainer's
    fast log-prob path equals eval's to 1e-4)."""
    import eval as ev
    import online
    from machinery.hf import from_pretrained
    sft_dir = tiny_sft(tmp_path / "sft")
    sft = from_pretrained(sft_dir).requires_grad_(False)
    prompts = [[50256, 10 + i, 20 + i] for i in range(6)]
    frozen = ev.sample_completions(sft, prompts, 2, 5, generator=torch.Generator().manual_seed(1))
    rewards = toy_reward([p + c for p, c in zip([p for p in prompts for _ in range(2)], frozen)]).tolist()
    pairs = online.label_pairs(prompts, frozen, rewards, 2)
    assert 3 <= len(pairs) <= 6
    offline_pairs = [{"prompt_ids": x, "chosen_ids": w, "rejected_ids": l, "group": i}
                     for i, (x, w, l) in enumerate(pairs)]
    tcfg = dpo.TrainConfig(task="imdb", model=sft_dir, out=str(tmp_path / "offline"), beta=0.1, optimizer="adamw",
                           lr=1e-3, warmup_steps=2, batch_size=len(pairs), micro_batch_size=len(pairs), steps=1,
                           device="cpu", seed=0, max_length=64, max_prompt_length=16)
    offline_policy, history = dpo.train(tcfg, offline_pairs, [], log=lambda s: None)

    policy = from_pretrained(sft_dir)
    optimizer, scheduler = dpo.make_optimizer(tcfg, [p for p in policy.parameters() if p.requires_grad], "cpu")
    ocfg = online.OnlineConfig(iterations=1, prefixes=6, samples=2, beta=0.1, max_grad_norm=tcfg.max_grad_norm)
    by_prompt = {tuple(p): frozen[2 * i:2 * i + 2] for i, p in enumerate(prompts)}
    online_history = online.train_online_dpo(
        policy, sft, toy_reward, prompts, ocfg, dpo.dpo_loss, optimizer, scheduler, log=None,
        sample=lambda model, xs, k: [y for x in xs for y in by_prompt[tuple(x)]])  # frozen pi_SFT samples
    assert online_history[0]["pairs"] == len(pairs) and online_history[0]["reward_calls"] == 12
    assert abs(online_history[0]["loss"] - history[0]["loss"]) < 1e-5, (online_history[0]["loss"], history[0]["loss"])
    before, moved = sft.state_dict(), 0
    for name, weight in offline_policy.state_dict().items():
        torch.testing.assert_close(policy.state_dict()[name], weight, atol=1e-5, rtol=1e-4)
        moved += not torch.equal(weight, before[name])
    assert moved > 0  # the step changed the weights


def test_online_dpo_label_accounting_by_hand():
    """2 prefixes of 2 tokens, K = 3 fixed samples each, the reward = the sequence length. Prefix A's samples have
    1, 2, 2 tokens -> rewards 3, 4, 4: pairs (2 > 1) and (3 > 1), the tie (2, 3) none -> 2 pairs; prefix B's
    1, 1, 1 -> all tied -> 0 pairs. Per iteration (both prefixes): 2 x 3 = 6 reward calls, 2 labelled pairs; after
    3 iterations 18 calls and 6 pairs. An iteration of prefix B alone (prefixes=1) spends 3 calls, takes no step."""
    import online
    from model import GPT, GPTConfig
    a, b = [5, 6], [7, 8]
    fixed = {tuple(a): [[1], [2, 2], [3, 3]], tuple(b): [[4], [4], [4]]}
    torch.manual_seed(0)
    policy, reference = GPT(GPTConfig(vocab_size=16, block_size=16, n_layer=1, n_head=1, n_embd=8)), None
    reference = GPT(GPTConfig(vocab_size=16, block_size=16, n_layer=1, n_head=1, n_embd=8)).requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    length = lambda seqs: torch.tensor([float(len(s)) for s in seqs])  # noqa: E731
    sample = lambda model, xs, k: [y for x in xs for y in fixed[tuple(x)]]  # noqa: E731
    cfg = online.OnlineConfig(iterations=3, prefixes=2, samples=3)
    history = online.train_online_dpo(policy, reference, length, [a, b], cfg, dpo.dpo_loss, optimizer, scheduler,
                                      sample=sample, log=None)
    assert [(h["reward_calls"], h["pairs"]) for h in history] == [(6, 2)] * 3
    assert [(h["reward_calls_total"], h["pairs_total"]) for h in history] == [(6, 2), (12, 4), (18, 6)]
    assert online.label_pairs([a], fixed[tuple(a)], [3, 4, 4], 3) == [(a, [2, 2], [1]), (a, [3, 3], [1])]
    alone = online.train_online_dpo(policy, reference, length, [b], online.OnlineConfig(iterations=1, prefixes=1,
                                    samples=3), dpo.dpo_loss, optimizer, scheduler, sample=sample, log=None)
    assert (alone[0]["reward_calls"], alone[0]["pairs"], alone[0]["loss"]) == (3, 0, None)


def test_online_dpo_resumes_from_its_checkpoint_with_the_same_weights(tmp_path, monkeypatch):
    """Sampling from the current policy: a run broken in iteration 3 resumes after iteration 2 (its checkpoint
    holds the optimiser, scheduler, sampling generator and history) and ends with the uninterrupted run's weights."""
    import eval as ev
    import online
    from machinery.hf import from_pretrained
    from machinery.stages import Checkpoints
    sft_dir = tiny_sft(tmp_path / "sft")
    sft = from_pretrained(sft_dir).requires_grad_(False)
    prompts = [[50256, 10 + i] for i in range(5)]
    cfg = online.OnlineConfig(iterations=3, prefixes=2, samples=2, max_new_tokens=4)
    tcfg = dpo.TrainConfig(task="imdb", model=sft_dir, out=str(tmp_path / "x"), optimizer="adamw", lr=1e-2,
                           warmup_steps=1, device="cpu")

    def run(folder, printed=None):
        policy = from_pretrained(sft_dir)
        optimizer, scheduler = dpo.make_optimizer(tcfg, list(policy.parameters()), "cpu")
        checkpoints = Checkpoints(str(folder), 1, cfg.iterations, log=(lambda s: None) if printed is None else printed.append)
        history = online.train_online_dpo(policy, sft, toy_reward, prompts, cfg, dpo.dpo_loss, optimizer, scheduler,
                                          checkpoints=checkpoints, log=None)
        return policy, history
    whole, whole_history = run(tmp_path / "whole")
    assert sorted(os.listdir(tmp_path / "whole")) == ["step-1", "step-2", "step-3"]
    calls, real = [0], ev.sample_completions

    def breaking(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(ev, "sample_completions", breaking)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "broken")
    monkeypatch.setattr(ev, "sample_completions", real)
    printed = []
    resumed, resumed_history = run(tmp_path / "broken", printed)
    assert printed == ["broken: resumed at step 2 of 3"]
    assert [h["pairs_total"] for h in resumed_history] == [h["pairs_total"] for h in whole_history]
    for name, weight in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], weight), name


def test_planned_online_stages_and_their_inputs():
    cfg = imdb.ImdbConfig(preset="tiny", out="unused", imdb=IMDB, methods="online-dpo-gt,online-dpo-rm").resolved()
    stages = imdb.plan(cfg, True, log=lambda s: None).plan
    assert set(stages) == {"sft", "classifier", "pairs", "reward_model", "online-dpo-gt", "online-dpo-rm"}
    assert set(stages["online-dpo-gt"].inputs) == {"sft", "pairs", "classifier"}
    assert set(stages["online-dpo-rm"].inputs) == {"sft", "pairs", "reward_model"}
    assert stages["online-dpo-gt"].settings["beta"] == 0.1 and stages["online-dpo-gt"].settings["online_samples"] == 2
    assert "online-dpo-gt" not in planned() and "online-dpo-gt" not in \
        planned(methods=",".join(m for m in imdb.METHODS if not m.startswith("online")))


def test_the_plan_leaves_the_global_random_state_as_it_found_it():
    """print_plan builds and runs a model (its initialisation and dropout draw from torch's global generator); the
    stages after it must draw what they drew without it."""
    cfg = imdb.ImdbConfig(preset="tiny", out="unused", imdb=IMDB, methods="dpo", device="cpu").resolved()
    printed = []
    torch.manual_seed(5)
    state = torch.get_rng_state().clone()
    imdb.print_plan(cfg, imdb.plan(cfg, True, log=lambda s: None), [{"text": "x" * 400}], "cpu", printed.append)
    assert torch.equal(state, torch.get_rng_state())
    assert printed[0].startswith("plan (tiny preset") and printed[-1].split()[:2] == ["total", "estimate"]


def test_dpo_epochs_keys_the_dpo_stages_only_when_above_one():
    def keys(**changes):
        cfg = imdb.ImdbConfig(preset="tiny", out="unused", imdb=IMDB, methods="dpo,ppo-gt", **changes).resolved()
        return {n: s.key for n, s in imdb.plan(cfg, True, log=lambda s: None).plan.items()}
    one, four = keys(), keys(dpo_epochs=4)
    assert one == keys(dpo_epochs=1)  # the default: the keys of runs made before the flag existed
    assert {n for n in one if one[n] != four[n]} == {"dpo-beta0.1"}
    cfg = imdb.ImdbConfig(preset="tiny", out="unused", imdb=IMDB, methods="dpo", dpo_epochs=4).resolved()
    lines = dict((name, what) for name, what, _ in imdb.plan_lines(cfg, imdb.plan(cfg, True, log=lambda s: None),
                                                                     [{"text": "x" * 400}]))
    assert lines["dpo-beta0.1"] == "<= 44 steps of 12 pairs (4 epochs)"  # 4 x (138 // 12), as dpo.py counts
    assert lines["evaluation"].startswith("17 policies")  # SFT + a checkpoint every quarter epoch


def test_the_cpu_presets_online_dpo_matches_one_epoch_of_offline_dpo():
    """The CPU preset sizes online DPO so that on-policy sampling is the only difference from offline DPO's epoch:
    as many steps, at most as many pairs a step (K = 4: 6 pairs a prefix, as the offline pairs), the same reward calls
    (4 a prefix). By hand: 2,400 prefixes, 120 held out, 2,280 x 6 = 13,680 pairs // 48 = 285 steps, 2,280 x 4 =
    9,120 reward calls; online: 285 x 8 prefixes x 4 = 9,120 calls, 285 x 8 x 6 = 13,680 pairs."""
    cfg = imdb.ImdbConfig(preset="cpu", out="unused", imdb=IMDB, methods="dpo,online-dpo-gt").resolved()
    lines = dict((name, what) for name, what, _ in imdb.plan_lines(cfg, imdb.plan(cfg, True, log=lambda s: None),
                                                                     [{"text": "x" * 400}]))
    assert lines["dpo-beta0.1"] == "<= 285 steps of 48 pairs (1 epoch)"
    assert lines["online-dpo-gt"] == "285 iterations x 8 prefixes x K = 4: 9,120 samples and reward calls, <= 13,680 pairs"
    assert cfg.online_prefixes * 6 == cfg.batch_size


@needs_imdb
def test_a_tiny_run_of_online_dpo_by_r_star_and_by_the_reward_model(tmp_path):
    """Every online stage at micro scale: 4 iterations of 6 prefixes x 2 samples, checkpoints after each, each row
    with the labels consumed to reach it (running totals of history.jsonl: 12 reward calls an iteration); beside
    them DPO, PPO and Best-of-N (RM), for the plan printed before the first stage, the labels of every method
    and the over-optimization figure (the reward model's score of the samples of each method that climbs it)."""
    out = tmp_path / "run"
    cfg = imdb.ImdbConfig(preset="tiny", out=str(out), imdb=IMDB, device="cpu",
                          methods="online-dpo-gt,online-dpo-rm,dpo,ppo,best-of-n-rm")
    printed = []
    rows = imdb.run(cfg, dpo.train, dpo.TrainConfig, log=printed.append, online_dpo=(dpo.dpo_loss, dpo.make_optimizer))
    # the plan, before the first stage, by hand for the tiny preset: 8,000 SFT tokens // (16 x 128) = 3 steps;
    # 24 prefixes x 4 samples = 96, prefix 19 held out: 23 x 6 = 138 training pairs at most, // 12 = 11 DPO steps,
    # 138 / 6 = 23 reward-model batches; PPO 4 x 8 = 32 rollouts; online 4 x 6 x 2 = 48 samples, <= 24 pairs;
    # Best-of-N 8 test prefixes x 4; evaluation: SFT + 4 checkpoints of each of 4 runs = 17 policies x 8 prefixes
    plan = printed[next(i for i, line in enumerate(printed) if line.startswith("plan (tiny preset")):]
    first_stage = next(i for i, line in enumerate(printed) if line.startswith("SFT: "))
    assert printed.index(plan[0]) < first_stage and "estimate = extrapolated" in plan[0]
    lines = {line.split()[0]: line for line in plan[1:plan.index(next(ln for ln in plan if ln.startswith("  total")))+1]}
    assert "3 steps of 16 x 128 tokens" in lines["sft"]
    assert "24 prefixes x 4 samples = 96 samples, <= 138 training pairs" in lines["pairs"]
    assert "<= 11 steps of 12 pairs (1 epoch)" in lines["dpo-beta0.1"]
    assert "<= 23 batches of 6 pairs (1 epoch)" in lines["reward_model"]
    assert "4 iterations x 8 rollouts = 32 rollouts" in lines["ppo"]
    assert "4 iterations x 6 prefixes x K = 2: 48 samples and reward calls, <= 24 pairs" in lines["online-dpo-gt"]
    assert "8 test prefixes x 4 samples = 32" in lines["best-of-n"]
    assert "17 policies" in lines["evaluation"] and "x 8 test prefixes = 136 samples" in lines["evaluation"]
    assert all("estimate " in lines[s] for s in ("sft", "pairs", "dpo-beta0.1", "ppo", "online-dpo-rm", "evaluation"))
    assert lines["total"].split()[-2] == "estimate"
    for method, name in (("Online DPO (r*)", "online-dpo-gt"), ("Online DPO (RM)", "online-dpo-rm")):
        mine = [r for r in rows if r["method"] == method]
        history = [json.loads(line) for line in open(out / name / "history.jsonl")]
        assert [r["step"] for r in mine] == [1, 2, 3, 4] and len(history) == 4
        assert [r["reward_calls"] for r in mine] == [12, 24, 36, 48]
        assert [r["labels"] for r in mine] == [h["pairs_total"] for h in history]
        assert all(h["pairs"] <= 6 for h in history) and all(r["beta"] == 0.1 for r in mine)
    assert {r["method"] for r in rows} == {"SFT", "Online DPO (r*)", "Online DPO (RM)", "DPO", "PPO", "Best-of-N (RM)"}
    assert "labels" in open(out / "results.csv").readline()
    # labels by hand: DPO step s has seen 12 s pairs (all at the last step), PPO step s 8 s rollouts, Best-of-N N x 8
    pairs = [json.loads(line) for line in open(out / "pairs.jsonl")]
    n_train = sum(p["group"] != 19 for p in pairs)
    for r in rows:
        if r["method"] == "DPO":
            assert r["labels"] == min(12 * r["step"], n_train)
            assert r["reward_calls"] == round(r["labels"] * 4 * 23 / n_train)
    assert [r["reward_calls"] for r in rows if r["method"] == "PPO"] == [8, 16, 24, 32]
    assert [r["reward_calls"] for r in rows if r["method"] == "Best-of-N (RM)"] == [16, 32]
    # the proxy beside r*: the reward model's score of the same samples, for SFT and each method that climbs it
    for r in rows:
        assert ("rm_score" in r) == (r["method"] in ("SFT", "PPO", "Best-of-N (RM)", "Online DPO (RM)")), r["method"]
        if "rm_score" in r:
            assert math.isfinite(r["rm_score"]) and math.isfinite(r["rm_score_se"]) and r["rm_score_se"] > 0
    header = open(out / "results.csv").readline().strip().split(",")
    assert {"rm_score", "rm_score_se", "reward_calls", "labels"} <= set(header)
    for png in ("labels.png", "overoptimization.png", "frontier.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    # the same run without the reward model's scores gives the same r* and KL (the samples are the same)
    sft = json.load(open(out / "sft" / "eval.json"))["result"]
    plain = imdb.ev.evaluate(imdb.from_pretrained(str(out / "sft")), imdb.from_pretrained(str(out / "sft")),
                             imdb.ev.BowClassifier.load(str(out / "classifier.pt")),
                             imdb.ev.imdb_prompts(imdb.read_reviews(cfg.resolved())[1], 8,
                                                  generator=torch.Generator().manual_seed(1)),
                             1, 6, torch.Generator().manual_seed(2), 256)
    assert plain["reward"] == sft["reward"] and plain["kl"] == sft["kl"] == 0
