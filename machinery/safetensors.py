"""The safetensors format read and written by hand (no `safetensors` package): an 8-byte little-endian header
length N, N bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then
raw little-endian tensor bytes (offsets are relative to the end of the header). test_model.py checks that the
`safetensors` library reads what we write, and that truncated or corrupt files give one-line errors."""
import json
import math
import mmap
import os
import struct

import torch

from data import InputError

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def load_safetensors(path):
    """Returns {name: tensor} for a .safetensors file, without reading it into memory: every tensor is a
    view on a copy-on-write memory map, so pages are read only when copied into the model."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 2 <= n <= size - 8:
            raise InputError(f"{path}: not a safetensors file, or truncated (header length {n}, file "
                             f"{size} bytes); download it again")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{path}: corrupt safetensors header ({e}); download it again") from None
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + n else b""
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise InputError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        if 8 + n + end > size or end - begin != math.prod(info["shape"]) * dtype.itemsize:
            raise InputError(f"{path}: tensor {name} lies past the end of the file ({size} bytes): "
                             f"the file is truncated; download it again")
        if end == begin:
            tensors[name] = torch.empty(info["shape"], dtype=dtype)
            continue
        raw = torch.frombuffer(buf, dtype=torch.uint8, count=end - begin, offset=8 + n + begin)
        tensors[name] = raw.view(dtype).reshape(info["shape"])
    return tensors


def save_safetensors(tensors, path, metadata=None):
    """Writes {name: tensor} as a .safetensors file, atomically (temporary name, then rename)."""
    header, offset = {}, 0
    tensors = {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # pad so the data starts 8-byte aligned
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors.values():
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
