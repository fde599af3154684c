"""A GPT in one file: GPT-2 from Hugging Face checkpoints, KV-cache sampling, per-token log-probs.

    python -c "from model import GPT; m = GPT.from_pretrained('gpt2'); print(m.config)"

Only the standard library and torch are imported here. (Filled in below.)
"""
import json
import math
import os
import sys
import time
import urllib.error
import urllib.request

import torch
import torch.nn as nn
import torch.nn.functional as F


class InputError(ValueError):
    """Bad input from the user: the message is one line naming the file (and line) and what to do.

    Every command-line entry point catches it, prints `error: <message>` and exits with status 2."""


# ----------------------------------------------------------------------------------------------
# Small utilities shared by every script: a progress line with ETA, and an atomic, resumable download.

class Progress:
    """One self-overwriting progress line with rate and ETA: `label 120/500 24% | 3.1 it/s | eta 2m03s`."""

    def __init__(self, total, label="", unit="it", stream=None, every=0.5):
        self.total, self.label, self.unit = total, label, unit
        self.stream = stream or sys.stderr
        self.every, self.n, self.t0, self.last = every, 0, time.time(), 0.0

    def update(self, n=1, extra=""):
        self.n += n
        now = time.time()
        if now - self.last >= self.every or (self.total and self.n >= self.total):
            self.last = now
            self.stream.write("\r" + self.line(extra) + "\033[K")
            self.stream.flush()

    def line(self, extra=""):
        dt = max(time.time() - self.t0, 1e-9)
        rate = self.n / dt
        parts = [f"{self.label} {_human(self.n)}" + (f"/{_human(self.total)} {100 * self.n / self.total:.0f}%" if self.total else "")]
        parts.append(f"{_human(rate)} {self.unit}/s")
        if self.total and rate > 0:
            parts.append(f"eta {_duration((self.total - self.n) / rate)}")
        if extra:
            parts.append(extra)
        return " | ".join(parts)

    def close(self):
        self.stream.write("\r" + self.line() + f" | {_duration(time.time() - self.t0)}\033[K\n")
        self.stream.flush()


def _human(x):
    for unit in ("", "k", "M", "G"):
        if abs(x) < 1000:
            return f"{x:.0f}{unit}" if unit == "" or x >= 100 else f"{x:.1f}{unit}"
        x /= 1000
    return f"{x:.1f}T"


def _duration(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def cache_dir():
    """Where downloads go: $DPO_CACHE, else ~/.cache/dpo."""
    return os.environ.get("DPO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dpo")


def download(url, dest, what=None):
    """Fetch `url` to `dest` with a progress line. Resumable and atomic: bytes go to `dest + '.part'`
    (continued with an HTTP Range request after an interruption) and are renamed to `dest` only when
    complete, so `dest` is never half-written. Returns `dest`. Raises FileNotFoundError on HTTP 404 and
    InputError, naming the URL and where to put the file by hand, when the network is unreachable."""
    if os.path.exists(dest):
        return dest
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    part = dest + ".part"
    have = os.path.getsize(part) if os.path.exists(part) else 0
    req = urllib.request.Request(url, headers={"User-Agent": "dpo/0.1"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=30)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise FileNotFoundError(url) from None
        if e.code == 416 and have:  # the .part file is already complete
            os.replace(part, dest)
            return dest
        raise InputError(f"cannot download {url}: HTTP {e.code} {e.reason}; "
                         f"download it by hand to {dest}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise InputError(f"cannot download {url} ({reason}); you seem to be offline: "
                         f"download it by hand to {dest}") from None
    with resp:
        if have and resp.status != 206:  # server ignored the Range request: start over
            have = 0
        total = resp.headers.get("Content-Length")
        total = int(total) + have if total is not None else None
        bar = Progress(total, label=f"download {what or os.path.basename(dest)}", unit="B")
        bar.n = have
        with open(part, "ab" if have else "wb") as f:
            while chunk := resp.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
        bar.close()
    if total is not None and os.path.getsize(part) != total:
        raise InputError(f"download of {url} stopped at {os.path.getsize(part)} of {total} bytes; "
                         f"run again to resume")
    os.replace(part, dest)
    return dest


# ----------------------------------------------------------------------------------------------
# Per-token log-probabilities: the one place logits become log pi(y_t | x, y_<t). Used by dpo.py
# (sequence log-probs) and eval.py (KL to the reference), so it lives at the bottom of the imports.

def token_logps(logits, labels):
    """log softmax(logits)[labels] in float32, without shifting.

    Args:
        logits: (N, T, V) any float dtype; row t is the distribution over labels[:, t].
        labels: (N, T) int64 token ids.
    Returns:
        (N, T) float32. The log-softmax runs in float32 even for bf16/fp16 logits: in half
        precision the logsumexp over 50k entries loses the small probabilities and gives NaN/-inf.
    """
    logits = logits.float()
    return torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
