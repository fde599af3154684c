"""Files a long run can trust: every write atomic, and every checkpoint folder carrying a digest of its files that
is checked whenever it is loaded. Standard library and torch only (hf.py and runtime.py sit above it).

    atomic_write(path, write)   write(f) into path + ".tmp", then one rename: a kill leaves the old file or the new
    write_json, save_torch      atomic_write for JSON and torch.save
    write_digest(folder)        digest.json: the SHA-256 of every other file of the folder, written last
    drop_file(folder, name)     one file removed from a checkpoint and from its digest
    verify_digest(folder, fix)  every file against digest.json; a mismatch is one line naming the file and `fix`
    check_finite(named, where)  a non-finite weight found at load is reported as corruption, not as a learning rate
    kill_point(folder, step)    for the kill tests only: DPO_TEST_KILL=name:step SIGKILLs this process right after
                                the checkpoint of that step of the stage whose folder is `name` was written

Tests: test_stages.py (flipped bytes refused on --resume and on a stage's reload, a NaN weight reported as
corruption, a kill inside each resumable stage resumes there).
"""
import hashlib
import json
import os
import signal

import torch

from data import InputError

DIGEST = "digest.json"


def atomic_write(path, write, mode="w"):
    """write(f) into path.tmp, then os.replace: readers see the old file or the complete new one, never a part."""
    tmp = path + ".tmp"
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path, obj):
    atomic_write(path, lambda f: json.dump(obj, f, indent=1))


def save_torch(path, obj):
    atomic_write(path, lambda f: torch.save(obj, f), mode="wb")


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_digest(folder):
    """digest.json: {file name: SHA-256} of every file in the folder (its sub-folders are not checkpoint files)."""
    names = sorted(n for n in os.listdir(folder) if n != DIGEST and not n.endswith(".tmp")
                   and os.path.isfile(os.path.join(folder, n)))
    write_json(os.path.join(folder, DIGEST), {n: sha256(os.path.join(folder, n)) for n in names})


def drop_file(folder, name):
    """Removes one file of a checkpoint and its line of digest.json (the other lines stay as written)."""
    path = os.path.join(folder, DIGEST)
    with open(path) as f:
        digest = json.load(f)
    digest.pop(name, None)
    write_json(path, digest)
    os.remove(os.path.join(folder, name))


def verify_digest(folder, fix="start the stage again (delete the folder)"):
    """Checks every file of digest.json; returns False when the folder has none (written before digests existed)."""
    path = os.path.join(folder, DIGEST)
    if not os.path.exists(path):
        return False
    try:
        with open(path) as f:
            digest = json.load(f)
    except (OSError, ValueError):
        raise InputError(f"{path}: unreadable (damaged); {fix}") from None
    for name, expected in digest.items():
        file = os.path.join(folder, name)
        if not os.path.exists(file):
            raise InputError(f"{file}: missing from a checkpoint whose digest lists it; {fix}")
        if sha256(file) != expected:
            raise InputError(f"{file}: its contents differ from the digest written with it (the file is corrupt); "
                             f"{fix}")
    return True


def check_finite(named_tensors, where, fix="restore it from a good copy or compute it again"):
    """Raises InputError naming the first non-finite tensor: at load, NaN or inf weights mean a damaged file
    (checkpoints are never saved with them: runtime.Run.maybe_save refuses), not a learning-rate problem."""
    for name, t in named_tensors:
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise InputError(f"{where}: non-finite values in {name}: the checkpoint is corrupt; {fix}")


def kill_point(folder, step):
    """DPO_TEST_KILL=name:step (tests only): SIGKILL right after the stage folder `name` saved step `step`."""
    target = os.environ.get("DPO_TEST_KILL")
    if target and target == f"{os.path.basename(os.path.normpath(folder))}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
