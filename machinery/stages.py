"""Stage records and resumable checkpoints: what lets a run of hours survive a rerun, a changed flag or a lost
machine. The experiments (imdb.py, generation.py) reach it by three names; a reader of the paper need not open it.

    Stages(out)          one experiment's stages in one --out folder. Each is planned with .add(name, settings,
                         inputs, paths) BEFORE the first stage runs; its key is a digest of its settings and of its
                         inputs' keys, so a changed flag changes the key of the stage it feeds and of everything
                         downstream. .explain() prints, per stage, reuse / resume / compute / recompute and why, and
                         removes every output that no longer matches (out never holds a mix of settings).
                         .begin(name) records the stage as running, .finish(name) as done with the digests of its
                         files, .run(name, compute) does both around compute(); out/records/NAME.json holds the
                         record.
    keyed_json(path, ...)  a small result (an evaluation, say) stored with the key it was computed from
    Checkpoints(folder)  a resumable trainer's folder/step-N checkpoints: the model in the HF layout, trainer_state.pt
                         (optimiser, random generators, position, history) and digest.json, every `every` steps and at
                         the last; .resume(...) restores the newest, verified, so a kill costs at most one interval.

Tests: test_stages.py (every setting of the IMDb experiment changed between two runs recomputes its stage and
what depends on it and nothing else; SIGKILL inside each resumable stage resumes there and results.csv equals an
uninterrupted run's; flipped checkpoint bytes are refused in one line).
"""
import dataclasses
import hashlib
import json
import os
import shutil

import torch

from data import InputError
from machinery.hf import from_pretrained, save_pretrained
from machinery.integrity import drop_file, kill_point, save_torch, sha256, verify_digest, write_digest, write_json


def key_of(settings, inputs):
    """16 hex digits of SHA-256 over the settings and the inputs' keys (canonical JSON)."""
    blob = json.dumps({"settings": settings, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def flag(name):
    return "--" + name.replace("_", "-")


@dataclasses.dataclass
class Stage:
    name: str
    settings: dict
    inputs: dict           # upstream stage name -> its key
    paths: list            # files and folders under out that the stage writes (removed when it is recomputed)
    key: str
    status: str = "compute"  # reuse, resume, compute or recompute
    reason: str = ""


class Stages:
    def __init__(self, out, log=print):
        self.out, self.log, self.plan = out, log, {}
        self.records = os.path.join(out, "records")

    def add(self, name, settings, inputs=(), paths=()):
        """Plans a stage. settings: {field: value} of what it computes from; inputs: names of planned stages."""
        inputs = {i: self.plan[i].key for i in inputs}
        self.plan[name] = Stage(name, dict(settings), inputs, [os.path.join(self.out, p) for p in paths],
                                key_of(settings, inputs))
        return self.plan[name]

    def key(self, name):
        return self.plan[name].key

    def done(self, name):
        return self.plan[name].status == "reuse"

    def resuming(self, name):
        return self.plan[name].status == "resume"

    def _read(self, name):
        try:
            with open(os.path.join(self.records, name + ".json")) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def _why(self, stage, record):
        """Why a stage's record no longer matches: the settings that changed, or the inputs recomputed."""
        old = record.get("settings", {})
        changed = [f"{flag(k)} {old.get(k)!r} -> {stage.settings.get(k)!r}" for k in sorted({*old, *stage.settings})
                   if old.get(k) != stage.settings.get(k)]
        changed += [f"{i} changed" for i in sorted(stage.inputs) if record.get("inputs", {}).get(i) != stage.inputs[i]]
        return ", ".join(changed) or "computed by another version of this stage"

    def _status(self, stage):
        record = self._read(stage.name)
        if record is None:
            if any(os.path.exists(p) for p in stage.paths):
                return "recompute", "its files have no record of what they were computed from"
            return "compute", "not computed yet"
        if record["key"] != stage.key:
            return "recompute", self._why(stage, record)
        if record["status"] != "done":
            return "resume", "interrupted"
        for rel in record.get("present", []):  # paths relative to out: a copied or moved out folder still works
            if not os.path.exists(os.path.join(self.out, rel)):
                return "recompute", f"{os.path.join(self.out, rel)} is missing"
        for rel, digest in record.get("files", {}).items():
            path = os.path.join(self.out, rel)
            if not os.path.exists(path) or sha256(path) != digest:
                return "recompute", f"{path} changed since it was written"
        return "reuse", "same settings and inputs"

    def explain(self, final=()):
        """Before the first stage: each stage's status and why, printed; the files of every stage to be (re)computed
        removed, and those of a stage outside this run's plan whose inputs have changed; `final` (the run's
        report files) removed so that no report of other settings outlives a rerun."""
        self.log(f"stages in {self.out}:")
        for stage in self.plan.values():
            stage.status, stage.reason = self._status(stage)
            if stage.status in ("compute", "recompute"):
                self._remove(stage.name, stage.paths)
            self.log(f"  {stage.name:<24} {stage.status:<10} {stage.reason}")
        if os.path.isdir(self.records):
            for file in sorted(os.listdir(self.records)):
                name, record = file[:-len(".json")], self._read(file[:-len(".json")])
                if name in self.plan or not file.endswith(".json"):
                    continue
                stale = record is None or any(i not in self.plan or self.plan[i].key != k
                                              for i, k in record.get("inputs", {}).items())
                if stale:
                    self._remove(name, [os.path.join(self.out, p) for p in (record or {}).get("paths", [])])
                self.log(f"  {name:<24} {'removed' if stale else 'kept':<10} not in this run"
                         f"{': computed from other inputs' if stale else ''}")
        for path in final:
            self._rm(os.path.join(self.out, path))

    def _rm(self, path):
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)

    def _remove(self, name, paths):
        for path in paths:
            self._rm(path)
        self._rm(os.path.join(self.records, name + ".json"))

    def _write(self, stage, status, files=None, present=()):
        os.makedirs(self.records, exist_ok=True)
        rel = lambda p: os.path.relpath(p, self.out)  # noqa: E731
        write_json(os.path.join(self.records, stage.name + ".json"),
                   {"name": stage.name, "key": stage.key, "status": status, "settings": stage.settings,
                    "inputs": stage.inputs, "paths": [rel(p) for p in stage.paths],
                    "present": [rel(p) for p in present],
                    "files": {rel(p): d for p, d in (files or {}).items()}})

    def begin(self, name):
        """The stage starts (or resumes): recorded as running, with its key."""
        self._write(self.plan[name], "running")

    def run(self, name, compute):
        """compute() unless the stage is reused, recorded as running before and as done after; its result, or None
        when reused."""
        if self.done(name):
            return None
        self.begin(name)
        result = compute()
        self.finish(name)
        return result

    def finish(self, name):
        """The stage is complete: recorded as done, with the SHA-256 of each of its files (folders carry their own
        digest.json, checked when loaded)."""
        stage = self.plan[name]
        self._write(stage, "done", {p: sha256(p) for p in stage.paths if os.path.isfile(p)},
                    [p for p in stage.paths if os.path.exists(p)])
        stage.status = "reuse"


def keyed_json(path, settings, inputs, compute, what, log=print):
    """compute() stored at path as JSON with the key of (settings, inputs), or read back when the key matches."""
    key = key_of(settings, inputs)
    try:
        with open(path) as f:
            stored = json.load(f)
        if isinstance(stored, dict) and stored.get("key") == key:
            log(f"{what}: reused {path}")
            return stored["result"]
    except (OSError, ValueError):
        pass
    result = compute()
    write_json(path, {"key": key, "settings": settings, "inputs": inputs, "result": result})
    return result


def rng_state(generators):
    """The random state a trainer needs to continue exactly: torch's global generator (and CUDA's) and its own."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return {"torch": torch.get_rng_state(), "cuda": cuda,
            "generators": [g.get_state() for g in generators]}


def set_rng_state(state, generators):
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for g, s in zip(generators, state["generators"]):
        g.set_state(s)


class Checkpoints:
    """folder/step-N for a resumable trainer: the model (save_pretrained), trainer_state.pt and digest.json, saved
    every `every` steps and at step `total`, atomically (step-N.writing, then one rename). keep=True keeps every
    step-N (the experiments evaluate them) but only the newest keeps trainer_state.pt; keep=False keeps only the
    newest folder."""

    def __init__(self, folder, every, total, keep=True, log=print):
        self.folder, self.every, self.total, self.keep, self.log = folder, max(1, every), total, keep, log

    def steps(self):
        if not os.path.isdir(self.folder):
            return []
        return sorted(int(d[5:]) for d in os.listdir(self.folder) if d[:5] == "step-" and d[5:].isdigit())

    def path(self, step):
        return os.path.join(self.folder, f"step-{step}")

    def resume(self, model, optimizer, generators=()):
        """(start step, the extra state saved with it) from the newest checkpoint holding a trainer state, with the
        model's weights, the optimiser and the random generators restored; (0, {}) when there is none."""
        saved = [s for s in self.steps() if os.path.exists(os.path.join(self.path(s), "trainer_state.pt"))]
        if not saved:
            return 0, {}
        path = self.path(saved[-1])
        fix = f"delete {path} to resume from the checkpoint before it, or delete {self.folder} to start the stage again"
        loaded = from_pretrained(path, device=str(next(model.parameters()).device), fix=fix)  # digest checked
        with torch.no_grad():
            model.load_state_dict(loaded.state_dict())
        try:
            state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)
        except Exception as e:  # a damaged pickle raises one of several errors
            first = str(e).splitlines()[0][:80]
            raise InputError(f"{path}/trainer_state.pt: cannot read it ({first}); {fix}") from None
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"], generators)
        self.log(f"{os.path.basename(self.folder)}: resumed at step {state['step']} of {self.total}")
        return state["step"], state["extra"]

    def maybe_save(self, step, model, optimizer, generators=(), **extra):
        """Saves at every `every`-th step and at the last; `extra` is whatever else the trainer needs to continue."""
        if step % self.every and step != self.total:
            return
        path = self.path(step)
        tmp = path + ".writing"
        save_pretrained(model, tmp)
        save_torch(os.path.join(tmp, "trainer_state.pt"), {"step": step, "optimizer": optimizer.state_dict(),
                                                            "rng": rng_state(generators), "extra": extra})
        write_digest(tmp)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
        for older in self.steps():
            if older < step and not self.keep:
                shutil.rmtree(self.path(older))
            elif older < step and os.path.exists(os.path.join(self.path(older), "trainer_state.pt")):
                drop_file(self.path(older), "trainer_state.pt")  # only the newest resumes
        kill_point(self.folder, step)
