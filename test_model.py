"""Tests for model.py: Hugging Face checkpoint I/O against transformers (a test-only oracle on
random-initialised models), padding invariance, KV-cache generation, sampling, downloads.

    python -m pytest -q test_model.py
"""
import http.server
import json
import os
import struct
import threading
import urllib.error

import pytest
import torch
import torch.nn.functional as F

import model as M
from data import InputError
from machinery import fast, hub
from machinery.hf import config_to_hf, from_pretrained, save_pretrained
from machinery.safetensors import load_safetensors, save_safetensors
from model import GPT, GPTConfig

transformers = pytest.importorskip("transformers", reason="transformers (test-only oracle) is not installed")

TINY = dict(n_layer=2, n_head=4, n_embd=32, vocab_size=101, block_size=64)


def hf_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=TINY["n_layer"], n_head=TINY["n_head"], n_embd=TINY["n_embd"],
                                  vocab_size=TINY["vocab_size"], n_positions=TINY["block_size"],
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **kw)
    m = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # HF initialises biases and LayerNorms to constants: randomise so every key matters
        for name, p in m.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return m


def tokens(B=3, T=17, seed=1):
    return torch.randint(0, TINY["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


def max_diff(ours, hf, idx):
    with torch.no_grad():
        return (ours(idx) - hf(idx).logits).abs().max().item()


@pytest.mark.parametrize("fmt", ["safetensors", "sharded-safetensors", "pytorch_model.bin", "sharded-bin"])
def test_logits_match_transformers(tmp_path, fmt):
    hf = hf_model()
    if fmt == "safetensors":
        hf.save_pretrained(tmp_path)
    elif fmt == "sharded-safetensors":
        hf.save_pretrained(tmp_path, max_shard_size="20KB")
        assert (tmp_path / "model.safetensors.index.json").exists()
    else:  # the pytorch_model.bin layout: a torch.save'd state dict (sharded: with its index)
        hf.config.save_pretrained(tmp_path)
        sd = {k: v.clone() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
        if fmt == "pytorch_model.bin":
            torch.save(sd, tmp_path / "pytorch_model.bin")
        else:
            keys = sorted(sd)
            halves = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
                      "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
            for file, ks in halves.items():
                torch.save({k: sd[k] for k in ks}, tmp_path / file)
            index = {"weight_map": {k: f for f, ks in halves.items() for k in ks}}
            (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    ours = from_pretrained(str(tmp_path))
    diff = max_diff(ours, hf, tokens())
    print(f"\n{fmt}: max |logit difference| vs transformers = {diff:.2e}")
    assert diff < 1e-5


def test_save_pretrained_round_trip_through_transformers(tmp_path):
    torch.manual_seed(0)
    ours = GPT(GPTConfig(**TINY)).eval()
    save_pretrained(ours, str(tmp_path / "ckpt"))
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "ckpt")).eval()
    assert max_diff(ours, hf, tokens()) < 1e-5
    again = from_pretrained(str(tmp_path / "ckpt"))
    for (n, p), (_, q) in zip(ours.named_parameters(), again.named_parameters()):
        assert torch.equal(p, q), n


def test_save_pretrained_bf16_round_trip(tmp_path):
    torch.manual_seed(0)
    ours = GPT(GPTConfig(**TINY)).to(torch.bfloat16)
    save_pretrained(ours, str(tmp_path / "ckpt"))
    again = from_pretrained(str(tmp_path / "ckpt"), dtype=torch.bfloat16)
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), again.parameters()))
    assert again.wte.weight.dtype == torch.bfloat16


def test_untied_head_and_parallel_residual_flags():
    torch.manual_seed(0)
    m = GPT(GPTConfig(**TINY, tie_word_embeddings=False, parallel_residual=True))
    assert m.lm_head.weight is not m.wte.weight
    assert m(tokens()).shape == (3, 17, TINY["vocab_size"])


def test_padding_invariance_left_and_right():
    torch.manual_seed(0)
    m = GPT(GPTConfig(**TINY)).eval()
    lengths = [5, 11, 8]
    seqs = [tokens(1, n, seed=i)[0] for i, n in enumerate(lengths)]
    T = max(lengths)
    with torch.no_grad():
        ref = [m(s[None])[0] for s in seqs]
        right = torch.zeros(3, T, dtype=torch.long)
        left = torch.zeros(3, T, dtype=torch.long)
        rmask = torch.zeros(3, T, dtype=torch.long)
        lmask = torch.zeros(3, T, dtype=torch.long)
        for i, s in enumerate(seqs):
            right[i, :len(s)], rmask[i, :len(s)] = s, 1
            left[i, T - len(s):], lmask[i, T - len(s):] = s, 1
        out_r, out_r_nomask, out_l = m(right, rmask), m(right), m(left, lmask)
    for i, s in enumerate(seqs):
        n = len(s)
        torch.testing.assert_close(out_r[i, :n], ref[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(out_r_nomask[i, :n], ref[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(out_l[i, T - n:], ref[i], atol=1e-5, rtol=0)
    assert torch.isfinite(out_l).all()  # padded queries never see an all-masked row
    # the mask matters: without it, a left-padded row differs from the unpadded one
    with torch.no_grad():
        assert not torch.allclose(m(left)[0, T - 5:], ref[0], atol=1e-3)


def test_left_padding_matches_transformers(tmp_path):
    hf = hf_model()
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(str(tmp_path))
    idx = tokens(2, 9)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :4] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(idx, attention_mask=mask, position_ids=pos).logits
        out = ours(idx, attention_mask=mask)
    torch.testing.assert_close(out[0, 4:], ref[0, 4:], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], ref[1], atol=1e-5, rtol=0)


def _write_fake_checkpoint(folder, tensors, cfg=TINY):
    os.makedirs(folder, exist_ok=True)
    save_safetensors(tensors, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config_to_hf(GPTConfig(**cfg)), f)


def test_key_table_rejects_unknown_key_and_wrong_shape(tmp_path):
    torch.manual_seed(0)
    hf = hf_model()
    sd = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    _write_fake_checkpoint(tmp_path / "a", {**sd, "transformer.h.0.attn.rotary.inv_freq": torch.ones(4)})
    with pytest.raises(InputError, match="unknown key 'transformer.h.0.attn.rotary.inv_freq'"):
        from_pretrained(str(tmp_path / "a"))
    bad = dict(sd)
    bad["transformer.h.1.mlp.c_fc.weight"] = torch.ones(32, 64)
    _write_fake_checkpoint(tmp_path / "b", bad)
    with pytest.raises(InputError, match=r"h\.1\.mlp\.c_fc\.weight has shape \(64, 32\).*expects \(128, 32\)"):
        from_pretrained(str(tmp_path / "b"))
    missing = {k: v for k, v in sd.items() if "ln_f" not in k}
    _write_fake_checkpoint(tmp_path / "c", missing)
    with pytest.raises(InputError, match="lacks 2 weights, e.g. ln_f.weight"):
        from_pretrained(str(tmp_path / "c"))
    extra_layer = {**sd, "transformer.h.2.ln_1.weight": torch.ones(32)}
    _write_fake_checkpoint(tmp_path / "d", extra_layer)
    with pytest.raises(InputError, match="unknown key 'transformer.h.2.ln_1.weight' for a 2-layer"):
        from_pretrained(str(tmp_path / "d"))


def test_truncated_safetensors_and_bad_config(tmp_path):
    torch.manual_seed(0)
    save_pretrained(GPT(GPTConfig(**TINY)), str(tmp_path / "ok"))
    path = tmp_path / "ok" / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="model.safetensors: its contents differ from the digest"):
        from_pretrained(str(tmp_path / "ok"))  # our own folders carry digest.json
    os.remove(tmp_path / "ok" / "digest.json")  # as a download: the readers' own messages
    with pytest.raises(InputError, match="truncated"):
        from_pretrained(str(tmp_path / "ok"))
    path.write_bytes(b"\x00" * 4)
    with pytest.raises(InputError, match="not a safetensors file"):
        from_pretrained(str(tmp_path / "ok"))
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    (tmp_path / "ok" / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(InputError, match="model_type 'llama' is not supported"):
        from_pretrained(str(tmp_path / "ok"))


def test_safetensors_writer_is_readable_by_the_safetensors_library(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    ts = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.randn(2, 2).half()}
    save_safetensors(ts, str(tmp_path / "x.safetensors"))
    back = st.load_file(str(tmp_path / "x.safetensors"))
    ours = load_safetensors(str(tmp_path / "x.safetensors"))
    for k in ts:
        assert torch.equal(back[k], ts[k]) and torch.equal(ours[k], ts[k])


def test_cached_generation_equals_uncached():
    torch.manual_seed(0)
    m = GPT(GPTConfig(**TINY)).eval()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]
    a, am = m.generate(prompts, 12, temperature=0, eos_id=-1)
    b, bm = m.generate(prompts, 12, temperature=0, eos_id=-1, use_cache=False)
    assert torch.equal(a, b) and am.all() and bm.all()
    # and sampling: same generator seed, same tokens with and without the cache
    c, _ = m.generate(prompts, 12, temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(3))
    d, _ = m.generate(prompts, 12, temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(3), use_cache=False)
    assert torch.equal(c, d)
    # greedy continuation equals argmax of the full forward of the unpadded prompt, step by step
    seq = torch.tensor([prompts[1]])
    for t in range(12):
        nxt = m(seq)[0, -1].argmax()
        assert nxt == a[1, t]
        seq = torch.cat([seq, nxt.view(1, 1)], 1)


def test_generation_stops_at_eos_and_pads():
    torch.manual_seed(0)
    m = GPT(GPTConfig(**TINY)).eval()
    prompts = [[1, 2, 3], [4, 5]]
    greedy, _ = m.generate(prompts, 10, temperature=0, eos_id=-1)
    eos = int(greedy[0, 2])  # declare the third greedy token of row 0 to be EOS
    out, mask = m.generate(prompts, 10, temperature=0, eos_id=eos, pad_id=0)
    first = (greedy[0] == eos).nonzero()[0].item()
    assert out[0, first] == eos and mask[0, first] == 1
    assert (mask[0, first + 1:] == 0).all() and (out[0, first + 1:] == 0).all()
    row1_eos = (greedy[1, :out.size(1)] == eos).nonzero()
    n1 = row1_eos[0].item() + 1 if len(row1_eos) else out.size(1)
    assert torch.equal(out[1, :n1], greedy[1, :n1]) and mask[1, :n1].all()


def test_sample_next_distribution_top_k_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]]).repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    draws = M.sample_next(logits, generator=g)
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    torch.testing.assert_close(freq, logits[0].softmax(-1), atol=0.015, rtol=0)
    k2 = M.sample_next(logits, top_k=2, generator=g)
    assert set(k2.tolist()) == {0, 1}
    p = logits[0].softmax(-1)  # sorted probs: .474 (0), .174 (1), .105 (4): top_p .6 keeps {0, 1}
    assert set(M.sample_next(logits, top_p=0.6, generator=g).tolist()) == {0, 1}
    assert set(M.sample_next(logits, top_p=0.4, generator=g).tolist()) == {0}
    assert p.argmax() == 0 and (M.sample_next(logits[:3], temperature=0) == 0).all()


def test_token_logps_float32_from_bf16():
    logits = torch.randn(2, 5, 50257) * 10
    labels = torch.randint(0, 50257, (2, 5))
    ref = torch.log_softmax(logits.double(), -1).gather(-1, labels[..., None])[..., 0]
    out = M.token_logps(logits.to(torch.bfloat16), labels)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(M.token_logps(logits, labels).double(), ref, atol=1e-4, rtol=0)


def test_hub_offline_and_missing_model_messages(tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_CACHE", str(tmp_path))

    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(hub.urllib.request, "urlopen", offline)
    with pytest.raises(InputError, match=r"cannot download gpt2 \(offline\?\): put config.json and model.safetensors "
                                         r"from https://huggingface.co/gpt2 into .*hub/gpt2"):
        from_pretrained("gpt2")

    def not_found(req, *a, **k):
        raise urllib.error.HTTPError(req.full_url, 404, "Not Found", {}, None)
    monkeypatch.setattr(hub.urllib.request, "urlopen", not_found)
    with pytest.raises(InputError, match="no such model on the Hugging Face hub"):
        from_pretrained("someone/no-such-model")
    with pytest.raises(InputError, match="no such folder"):
        from_pretrained("./does/not/exist")


def test_download_from_local_server_is_atomic_and_resumes(tmp_path):
    served = tmp_path / "srv"
    served.mkdir()
    payload = os.urandom(300_000)
    (served / "blob.bin").write_bytes(payload)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(served), **k)

        def log_message(self, *a):
            pass

        def send_head(self):  # honour "Range: bytes=N-" like the hub does
            rng = self.headers.get("Range")
            if not rng:
                return super().send_head()
            start = int(rng.split("=")[1].rstrip("-"))
            data = payload[start:]
            self.send_response(206)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            import io
            return io.BytesIO(data)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/blob.bin"
        dest = tmp_path / "out" / "blob.bin"
        dest.parent.mkdir()
        (tmp_path / "out" / "blob.bin.part").write_bytes(payload[:123_456])  # an interrupted earlier download
        hub.download(url, str(dest))
        assert dest.read_bytes() == payload and not (tmp_path / "out" / "blob.bin.part").exists()
        with pytest.raises(FileNotFoundError):
            hub.download(url.replace("blob", "nothing"), str(tmp_path / "out" / "x"))
        assert not (tmp_path / "out" / "x").exists()
    finally:
        server.shutdown()


def test_logps_on_selected_positions_equal_full_logits():
    torch.manual_seed(0)
    m = GPT(GPTConfig(**TINY))
    idx = tokens(4, 12)
    mask = torch.rand(4, 12, generator=torch.Generator().manual_seed(2)) < 0.5
    full = M.token_logps(m(idx)[:, :-1], idx[:, 1:])  # (4, 11)
    selected = fast.logps(m, idx, mask)
    expect = torch.where(mask[:, 1:], full, torch.zeros_like(full))
    torch.testing.assert_close(selected[:, 1:], expect, atol=1e-6, rtol=0)
    assert (selected[:, 0] == 0).all()
    # and the gradients agree
    g_full = torch.autograd.grad(expect.sum(), m.wte.weight)[0]
    g_fast = torch.autograd.grad(fast.logps(m, idx, mask).sum(), m.wte.weight)[0]
    torch.testing.assert_close(g_fast, g_full, atol=1e-6, rtol=0)


@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_head_logps_equal_the_plain_head_with_gradients(bias, keep, monkeypatch):
    """HeadLogps (chunked; the softmax rows kept for backward, or the logits recomputed there) against
    log_softmax of the full logits: values and the gradients of h, W and b, for a chunk size that does not
    divide the rows. Kept: backward does no head matmul at all (counted)."""
    from machinery.fast import HeadLogps
    from model import token_logps
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 1000, bias=bias)
    h = torch.randn(300, 16, requires_grad=True)
    labels = torch.randint(0, 1000, (300,))
    w = torch.randn(300)
    params = [h, head.weight] + ([head.bias] if bias else [])
    keep_bytes = 300 * 1000 * 4 if keep else 300 * 1000 * 4 - 1  # exactly enough, or one byte short
    a = HeadLogps.apply(h, head.weight, head.bias, labels, 64, keep_bytes)
    b = token_logps(head(h), labels)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-6)
    calls = []
    linear = F.linear
    monkeypatch.setattr(fast.F, "linear", lambda *args: calls.append(1) or linear(*args))
    grads = torch.autograd.grad((a * w).sum(), params)
    monkeypatch.undo()
    assert len(calls) == (0 if keep else 5)  # 300 rows in chunks of 64: 5 recomputed chunks
    for x, y in zip(grads, torch.autograd.grad((b * w).sum(), params)):
        torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast: the bf16 head, float32 log-softmax
        c = HeadLogps.apply(h, head.weight, head.bias, labels, 64, keep_bytes)
        d = token_logps(head(h), labels)
    torch.testing.assert_close(c, d, atol=0.05, rtol=0.01)
    gc = torch.autograd.grad((c * w).sum(), params)
    gb = torch.autograd.grad((token_logps(head(h), labels) * w).sum(), params)
    for x, y in zip(gc, gb):  # bf16 matmuls: close to float32
        assert (x - y).abs().max() < 0.05 * y.abs().max() + 1e-3


def test_head_chunk_rows_follow_head_chunk_bytes(monkeypatch):
    """head_logps's default chunk: 256 rows on the CPU (counted as head matmuls over 600 rows); elsewhere
    HEAD_CHUNK_BYTES of float32 logits per chunk, at least 256 rows."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 1000)
    h, labels = torch.randn(600, 16), torch.randint(0, 1000, (600,))
    calls = []
    linear = F.linear
    monkeypatch.setattr(fast.F, "linear", lambda *args: calls.append(1) or linear(*args))
    fast.head_logps(h, head, labels)
    assert len(calls) == 3  # 256 + 256 + 88 rows
    assert fast.head_chunk_rows("cuda", 50257) == 1335  # 256 MiB / (4 bytes x 50,257) = 1,335.3 rows
    assert fast.head_chunk_rows("cuda:1", 10 ** 7) == 256  # the floor
    monkeypatch.setattr(fast, "HEAD_CHUNK_BYTES", 300 * 1000 * 4)
    assert fast.head_chunk_rows("mps", 1000) == 300 and fast.head_chunk_rows("cpu", 1000) == 256
