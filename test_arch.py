"""Tests for the GPT-J and GPT-NeoX (Pythia) paths of model.py and the RoBERTa classifier (machinery/roberta.py):
logits against transformers (a test-only oracle on random-initialised tiny models saved with save_pretrained), rotary
embeddings under left padding and the KV cache, save_pretrained round trips, and config.json errors.

    python -m pytest -q -s test_arch.py      # -s prints the largest logit difference per architecture
"""
import json

import pytest
import torch

from data import InputError
from machinery.hf import config_to_hf, from_pretrained, save_pretrained
from machinery.roberta import EncoderConfig, RobertaClassifier
from machinery.safetensors import load_safetensors, save_safetensors
from model import GPT, GPTConfig

transformers = pytest.importorskip("transformers", reason="transformers (test-only oracle) is not installed")

V = 1000  # vocabulary of the tiny models
SHAPE = dict(n_layer=2, n_head=4, n_embd=64)  # head size 16


def randomise(m, seed):
    """HF initialises biases to 0 and LayerNorms to 1: perturb them so that every key matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias") or "norm" in name.lower() or ".ln_" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return m.eval()


def hf_model(arch, seed=0):
    torch.manual_seed(seed)
    L, H, C = SHAPE["n_layer"], SHAPE["n_head"], SHAPE["n_embd"]
    if arch == "gptj":  # rotary on 8 of 16 dims per head, interleaved pairs
        cfg = transformers.GPTJConfig(vocab_size=V, n_positions=64, n_layer=L, n_head=H, n_embd=C, rotary_dim=8,
                                      initializer_range=0.1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        m = transformers.GPTJForCausalLM(cfg)
    elif arch.startswith("neox"):  # rotary on half of each head, a non-default base
        cfg = transformers.GPTNeoXConfig(vocab_size=V, max_position_embeddings=64, num_hidden_layers=L,
                                         num_attention_heads=H, hidden_size=C, intermediate_size=3 * C,
                                         rotary_pct=0.5, rotary_emb_base=5000, hidden_act="gelu",
                                         use_parallel_residual=arch == "neox-parallel", hidden_dropout=0.0,
                                         initializer_range=0.1,
                                         attention_dropout=0.0)
        m = transformers.GPTNeoXForCausalLM(cfg)
    else:
        cfg = transformers.RobertaConfig(vocab_size=V, max_position_embeddings=40, num_hidden_layers=L,
                                         num_attention_heads=H, hidden_size=C, intermediate_size=3 * C,
                                         type_vocab_size=1, layer_norm_eps=1e-5, hidden_dropout_prob=0.0,
                                         attention_probs_dropout_prob=0.0, initializer_range=0.1,
                                         id2label={0: "neg", 1: "neutral", 2: "pos"},
                                         label2id={"neg": 0, "neutral": 1, "pos": 2})
        m = transformers.RobertaForSequenceClassification(cfg)
    return randomise(m, seed + 1)


CAUSAL = ["gptj", "neox-parallel", "neox-sequential"]


def batch(B=3, T=17, seed=1, low=0):
    """Random tokens, rows right-padded to lengths T, T-6, T-11 (pad id 1, RoBERTa's; mask 0)."""
    idx = torch.randint(low, V, (B, T), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(B, T, dtype=torch.long)
    for i, n in enumerate([T, T - 6, T - 11][:B]):
        mask[i, n:] = 0
    return idx.masked_fill(mask == 0, 1), mask


@pytest.fixture(scope="module", params=CAUSAL + ["roberta"])
def pair(request, tmp_path_factory):
    """(arch, the transformers model, ours loaded from its save_pretrained folder, the folder)."""
    folder = tmp_path_factory.mktemp(request.param)
    hf = hf_model(request.param)
    hf.save_pretrained(folder)
    assert (folder / "model.safetensors").exists()
    return request.param, hf, from_pretrained(str(folder)), folder


def logits_diff(arch, ours, hf, idx, mask):
    """Largest |ours - transformers| over the real (unpadded) positions."""
    with torch.no_grad():
        if arch == "roberta":
            return (ours.classify(idx, mask) - hf(idx, attention_mask=mask).logits).abs().max().item()
        d = (ours(idx, attention_mask=mask) - hf(idx, attention_mask=mask).logits).abs()  # (B, T, V)
        return d[mask.bool()].max().item()


def test_logits_match_transformers(pair):
    """The largest difference over every real position (classification logits for RoBERTa), right padded."""
    arch, hf, ours, _ = pair
    idx, mask = batch(low=3)  # real tokens avoid RoBERTa's special ids 0-2
    idx[:, 0] = 0  # <s>
    diff = logits_diff(arch, ours, hf, idx, mask)
    full = logits_diff(arch, ours, hf, idx.masked_fill(mask == 0, 7), torch.ones_like(mask))  # no padding at all
    print(f"\n{arch}: max |logit difference| vs transformers = {max(diff, full):.2e} (float32)")
    assert diff < 1e-5 and full < 1e-5
    if arch == "roberta":  # the encoder's hidden states too, on every real token
        with torch.no_grad():
            h = ours(idx, attention_mask=mask, return_hidden=True)
            h = h - hf.roberta(idx, attention_mask=mask).last_hidden_state  # (B, T, C)
        print(f"roberta: max |hidden-state difference| = {h[mask.bool()].abs().max():.2e}")
        assert h[mask.bool()].abs().max() < 1e-5
        # without a mask, classify masks config.pad_token_id
        torch.testing.assert_close(ours.classify(idx), ours.classify(idx, mask), atol=0, rtol=0)
        assert ours.config.labels == ("neg", "neutral", "pos")
    else:  # right padding needs no mask under causal attention
        with torch.no_grad():
            real = mask.bool()
            torch.testing.assert_close(ours(idx)[real], ours(idx, attention_mask=mask)[real], atol=1e-6, rtol=0)


def test_config_flags_read_from_config_json(pair):
    arch, _, ours, _ = pair
    c = ours.config
    expect = {"gptj": dict(pos_embedding="rotary", rotary_dim=8, rotary_interleaved=True, shared_layernorm=True,
                           parallel_residual=True, attn_bias=False, lm_head_bias=True, tie_word_embeddings=False),
              "neox-parallel": dict(pos_embedding="rotary", rotary_dim=8, rotary_base=5000.0, rotary_interleaved=False,
                                    parallel_residual=True, attn_bias=True, activation="gelu", n_inner=192),
              "neox-sequential": dict(parallel_residual=False),
              "roberta": dict(causal=False, post_layernorm=True, embedding_layernorm=True, pos_offset=2,
                              pad_token_id=1, type_vocab_size=1, num_labels=3, block_size=40, activation="gelu")}[arch]
    assert {k: getattr(c, k) for k in expect} == expect
    assert (ours.lm_head is None) == (arch == "roberta") and (ours.wpe is None) == (arch != "roberta")


@pytest.mark.parametrize("arch", ["gptj", "neox-parallel"])
def test_rotary_left_padding_and_kv_cache(arch, tmp_path):
    hf = hf_model(arch)
    hf.save_pretrained(tmp_path)
    m = from_pretrained(str(tmp_path))
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15]]
    T = 7
    left = torch.zeros(3, T, dtype=torch.long)
    lmask = torch.zeros(3, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        left[i, T - len(p):], lmask[i, T - len(p):] = torch.tensor(p), 1
    with torch.no_grad():
        out = m(left, attention_mask=lmask)
        for i, p in enumerate(prompts):  # a left-padded row equals the unpadded sequence (positions count real tokens)
            torch.testing.assert_close(out[i, T - len(p):], m(torch.tensor([p]))[0], atol=1e-5, rtol=0)
        # and equals transformers given the same position ids
        ref = hf(left, attention_mask=lmask, position_ids=(lmask.cumsum(-1) - 1).clamp(min=0)).logits
        assert (out - ref)[lmask.bool()].abs().max() < 1e-5
    a, _ = m.generate(prompts, 10, temperature=0, eos_id=-1)
    b, _ = m.generate(prompts, 10, temperature=0, eos_id=-1, use_cache=False)
    assert torch.equal(a, b)
    for i in (0, 2):  # greedy continuation = argmax of the unpadded forward, step by step
        seq = torch.tensor([prompts[i]])
        for t in range(10):
            nxt = m(seq)[0, -1].argmax()
            assert nxt == a[i, t]
            seq = torch.cat([seq, nxt.view(1, 1)], 1)
    assert torch.equal(a, hf.generate(left, attention_mask=lmask, max_new_tokens=10, do_sample=False,
                                      pad_token_id=0)[:, T:])  # transformers' own cached greedy search agrees


def test_save_pretrained_round_trip_through_transformers(pair, tmp_path):
    arch, _, _, folder = pair
    ours = from_pretrained(str(folder))  # a copy: the module's fixture stays as loaded
    with torch.no_grad():  # new values, so the file can only come from our writer
        for p in ours.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_pretrained(ours, str(tmp_path / "ckpt"))
    auto = transformers.AutoModelForSequenceClassification if arch == "roberta" else transformers.AutoModelForCausalLM
    hf, info = auto.from_pretrained(str(tmp_path / "ckpt"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert type(hf).__name__ == json.loads((tmp_path / "ckpt" / "config.json").read_text())["architectures"][0]
    idx, mask = batch(low=3)
    assert logits_diff(arch, ours, hf.eval(), idx, mask) < 1e-5
    again = from_pretrained(str(tmp_path / "ckpt"))
    assert again.config == ours.config
    for (n, p), (_, q) in zip(ours.named_parameters(), again.named_parameters()):
        assert torch.equal(p, q), n


def test_bf16_load(pair):
    arch, _, ours, folder = pair
    half = from_pretrained(str(folder), dtype=torch.bfloat16)
    assert half.wte.weight.dtype == torch.bfloat16
    idx, mask = batch(low=3)
    with torch.no_grad():
        a = ours.classify(idx, mask) if arch == "roberta" else ours(idx, attention_mask=mask)
        b = half.classify(idx, mask) if arch == "roberta" else half(idx, attention_mask=mask)
    torch.testing.assert_close(b.float(), a, atol=0.05 * a.abs().max().item(), rtol=0)


def test_old_style_neox_config_and_buffers(tmp_path):
    """transformers < 5 wrote rotary_pct / rotary_emb_base and kept rotary and mask buffers in checkpoints."""
    hf = hf_model("neox-sequential")
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg.update(rotary_pct=rope["partial_rotary_factor"], rotary_emb_base=rope["rope_theta"])
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    sd = {**load_safetensors(str(tmp_path / "model.safetensors")),
          "gpt_neox.layers.0.attention.rotary_emb.inv_freq": torch.ones(4),
          "gpt_neox.layers.1.attention.masked_bias": torch.tensor(-1e4),
          "gpt_neox.layers.1.attention.bias": torch.ones(1, 1, 4, 4)}
    save_safetensors({k: v.clone() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    ours = from_pretrained(str(tmp_path))
    assert (ours.config.rotary_dim, ours.config.rotary_base) == (8, 5000.0)
    idx, mask = batch()
    assert logits_diff("neox", ours, hf, idx, mask) < 1e-5


def _edit_config(folder, **edits):
    cfg = json.loads((folder / "config.json").read_text())
    for k, v in edits.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("arch,edits,message", [
    ("gptj", dict(rotary_dim=32), "rotary_dim 32 must be even and between 2 and the head size 16"),
    ("gptj", dict(activation_function="relu"), "activation_function 'relu'"),
    ("neox-parallel", dict(rope_parameters={"rope_type": "linear", "factor": 2.0}), "rope_type 'linear'"),
    ("neox-parallel", dict(hidden_size=None), "no integer hidden_size"),
    ("roberta", dict(architectures=["RobertaForMaskedLM"]), "only RobertaForSequenceClassification"),
    ("roberta", dict(is_decoder=True), "a RoBERTa decoder"),
    ("roberta", dict(model_type="bert"), "model_type 'bert' is not supported"),
])
def test_bad_config_json(tmp_path, arch, edits, message):
    hf_model(arch).save_pretrained(tmp_path)
    _edit_config(tmp_path, **edits)
    with pytest.raises(InputError, match=r"config\.json: .*" + message.replace("(", r"\(").replace(")", r"\)")):
        from_pretrained(str(tmp_path))


def test_key_table_errors_name_the_file(tmp_path):
    hf_model("gptj").save_pretrained(tmp_path)
    sd = load_safetensors(str(tmp_path / "model.safetensors"))
    del sd["transformer.h.1.attn.v_proj.weight"]  # a third of our fused c_attn
    save_safetensors({k: v.clone() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(InputError, match=r"lacks 1 weights, e\.g\. h\.1\.attn\.c_attn\.weight;.*not a GPT-J model"):
        from_pretrained(str(tmp_path))
    sd["transformer.h.1.attn.v_proj.weight"] = torch.zeros(64, 64)
    sd["transformer.h.0.attn.c_attn.weight"] = torch.zeros(64, 192)  # a GPT-2 key in a GPT-J file
    save_safetensors({k: v.clone() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(InputError, match=r"model\.safetensors: unknown key "
                                         r"'transformer\.h\.0\.attn\.c_attn\.weight' for a 2-layer GPT-J"):
        from_pretrained(str(tmp_path))
    del sd["transformer.h.0.attn.c_attn.weight"]
    sd["transformer.h.0.attn.q_proj.weight"] = torch.zeros(64, 32)
    save_safetensors({k: v.clone() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(InputError, match=r"q_proj\.weight has shape \(64, 32\) but .* expects \(64, 64\)"):
        from_pretrained(str(tmp_path))


def test_flag_validation_and_head_errors():
    with pytest.raises(ValueError, match="shared_layernorm needs parallel_residual"):
        GPTConfig(shared_layernorm=True)
    with pytest.raises(ValueError, match="pos_embedding 'alibi' is not supported"):
        GPTConfig(pos_embedding="alibi")
    with pytest.raises(ValueError, match="rotary_dim 5 must be even"):
        GPTConfig(**SHAPE, pos_embedding="rotary", rotary_dim=5)
    assert GPTConfig(**SHAPE, pos_embedding="rotary").rotary_dim == 16  # None: the whole head
    # flags a GPT-2 file cannot express: refused before anything is written
    with pytest.raises(ValueError, match="a gpt2 checkpoint cannot express parallel_residual=True"):
        config_to_hf(GPTConfig(**SHAPE, parallel_residual=True))
    torch.manual_seed(0)
    enc = RobertaClassifier(EncoderConfig(**SHAPE, vocab_size=V, block_size=32, type_vocab_size=1, pos_offset=2,
                                          pad_token_id=1, num_labels=2))
    idx = torch.randint(3, V, (2, 9))
    assert enc.classify(idx).shape == (2, 2)
    with pytest.raises(ValueError, match="classification head, not a language-model head"):
        enc(idx)  # no logits per token (return_hidden=True gives the hidden states)
    assert not hasattr(enc, "generate") and not hasattr(enc, "logps")  # an encoder neither samples nor scores tokens
    with pytest.raises(ValueError, match="exceeds block_size 32 - pos_offset 2"):
        enc.classify(torch.randint(3, V, (1, 31)))
    assert not hasattr(GPT(GPTConfig(**SHAPE, vocab_size=V)), "classify")  # a GPT has no classification head


def test_dpo_trains_a_neox_model_with_its_own_tokenizer(tmp_path):
    """dpo.train on a Pythia-layout folder holding its own tokenizer.json (ids unlike GPT-2's, EOS = 0):
    the pairs are tokenised with that tokenizer (ids equal the `tokenizers` library's), padded with its
    EOS, and the checkpoint carries tokenizer.json so that it loads back as --model."""
    tokenizers = pytest.importorskip("tokenizers")
    import random

    import dpo
    import machinery.tokenizers as mtok
    from tokenizers import decoders, models, pre_tokenizers, trainers
    words = "the a movie film plot actor scene story was is very good bad excellent awful".split()
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(200)]
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|padding|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder = tmp_path / "pythia-tiny"
    torch.manual_seed(0)
    cfg = transformers.GPTNeoXConfig(vocab_size=tok.get_vocab_size(), max_position_embeddings=128, num_hidden_layers=2,
                                     num_attention_heads=2, hidden_size=32, intermediate_size=64, rotary_pct=0.5,
                                     hidden_act="gelu", eos_token_id=0, bos_token_id=0)
    transformers.GPTNeoXForCausalLM(cfg).save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    pairs = [{"prompt": " ".join(rng.choice(words) for _ in range(4)), "chosen": " excellent film", "rejected": " awful film"}
             for _ in range(24)]
    ours = mtok.load_tokenizer(str(folder))
    assert ours.eos_id == 0 and ours.encode(pairs[0]["prompt"]) == tok.encode(pairs[0]["prompt"]).ids
    tcfg = dpo.TrainConfig(model=str(folder), out=str(tmp_path / "run"), batch_size=8, micro_batch_size=4, steps=3,
                           optimizer="adamw", lr=1e-3, warmup_steps=0, eval_every=3, save_every=3, device="cpu")
    items = dpo.tokenize_all(pairs, tcfg, "train", ours)
    assert items[0]["chosen_ids"] == tok.encode(" excellent film").ids + [0]  # EOS = 0 appended
    policy, history = dpo.train(tcfg, pairs[:16], pairs[16:], log=lambda s: None)
    assert history[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-5) and len(history) == 3
    ckpt = tmp_path / "run" / "checkpoint"
    assert (ckpt / "tokenizer.json").read_text() == (folder / "tokenizer.json").read_text()
    assert mtok.load_tokenizer(str(ckpt)).encode("the movie") == tok.encode("the movie").ids
    reloaded = from_pretrained(str(ckpt))
    assert reloaded.config.model_type == "gpt_neox"
    for p, q in zip(policy.parameters(), reloaded.parameters()):
        assert torch.equal(p, q)
