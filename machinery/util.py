"""Small helpers every script shares: a progress line, the command-line builder
(one flag per dataclass field) and the device/dtype choice. Standard library and torch only."""
import argparse
import contextlib
import dataclasses
import sys
import time

import torch


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


def field(default, help):
    """A dataclass field with its command-line help: the configs of dpo.py, sft.py and eval.py are such dataclasses."""
    return dataclasses.field(default=default, metadata={"help": help})


def parse_args(cls, argv=None, description=None):
    """An instance of the dataclass `cls` from the command line (argv=None reads sys.argv): one flag per field,
    --some-name for some_name, its help from the field; booleans get --flag/--no-flag."""
    parser = argparse.ArgumentParser(description=description)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        else:
            typ = {int: int, float: float}.get(f.type, str)
            parser.add_argument(flag, type=typ, default=f.default, help=f"{f.metadata['help']} (default: {f.default})")
    return cls(**vars(parser.parse_args(argv)))


def pick_device(name="auto"):
    """cuda, then mps, then cpu, unless a device is named."""
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else "cpu"


def autocast(device, dtype):
    """bf16/fp16 autocast on a GPU; plain float32 elsewhere (one code path, the dtype is an argument)."""
    if dtype == "float32" or device == "cpu":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype))
