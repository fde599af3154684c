"""Downloads by hand (urllib): a resumable, atomic download with a progress line; a hub model name resolved to a
local folder of checkpoint files; the datasets' files found locally ($DPO_IMDB, $DPO_HH, $DPO_TLDR) or downloaded from
their real addresses (data.IMDB_URL, data.HH_URL, corpora.TLDR_URL, corpora.TLDR_COMPARISONS_URL). data.py and
machinery/corpora.py read the local files.

    python -c "from machinery.hub import resolve_checkpoint; print(resolve_checkpoint('gpt2'))"
"""
import json
import os
import re
import urllib.error
import urllib.request

from data import HH_SUBSETS, HH_URL, IMDB_URL, InputError
from machinery.corpora import TLDR_COMPARISON_BATCHES, TLDR_COMPARISONS_URL, TLDR_SPLITS, TLDR_URL
from machinery.util import Progress


def cache_dir():
    """Where downloads go: $DPO_CACHE, else ~/.cache/dpo."""
    return os.environ.get("DPO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dpo")


def download(url, dest, what=None):
    """Fetch `url` to `dest` with a progress line. Resumable and atomic: bytes go to `dest + '.part'`
    (continued with an HTTP Range request after an interruption) and are renamed to `dest` only when
    complete, so `dest` is never half-written. Returns `dest`. Raises FileNotFoundError on HTTP 404 (and 401,
    which the Hugging Face hub answers for a repository that does not exist, or is private or gated) and
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
        if e.code in (401, 404):  # one line, like InputError, for callers that pass it on
            raise FileNotFoundError(f"cannot download {url}: HTTP {e.code} {e.reason}; "
                                    f"check the address, or download it by hand to {dest}") from None
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

HUB_URL = "https://huggingface.co/{name}/resolve/main/{file}"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def hub_folder(name):
    """Where a hub model's files are downloaded: $DPO_CACHE/hub/<owner>--<name>."""
    return os.path.join(cache_dir(), "hub", name.replace("/", "--"))


def resolve_checkpoint(name_or_dir):
    """A local folder as is; otherwise a hub name, downloaded into $DPO_CACHE/hub/<name> once."""
    if os.path.isdir(name_or_dir):
        return name_or_dir
    if os.path.sep in name_or_dir.strip("/") and name_or_dir.count("/") != 1 or name_or_dir.startswith((".", "/", "~")):
        raise InputError(f"{name_or_dir}: no such folder; pass a folder with config.json and model.safetensors, "
                         f"or a hub name such as gpt2 or openai-community/gpt2-large")
    folder = hub_folder(name_or_dir)
    try:
        try:
            download(HUB_URL.format(name=name_or_dir, file="config.json"), os.path.join(folder, "config.json"), name_or_dir)
        except FileNotFoundError:
            raise InputError(f"{name_or_dir}: no such model on the Hugging Face hub (config.json not found; or "
                             f"the model is private or gated); "
                             f"check the name, e.g. gpt2, gpt2-large, openai-community/gpt2-xl") from None
        for weights in WEIGHT_FILES:
            try:
                path = download(HUB_URL.format(name=name_or_dir, file=weights), os.path.join(folder, weights), name_or_dir)
            except FileNotFoundError:
                continue
            if weights.endswith(".index.json"):
                for shard in sorted(set(read_json(path)["weight_map"].values())):
                    download(HUB_URL.format(name=name_or_dir, file=shard), os.path.join(folder, shard), name_or_dir)
            return folder
    except InputError as e:
        if "offline" not in str(e):
            raise
        raise InputError(f"cannot download {name_or_dir} (offline?): put config.json and model.safetensors "
                         f"from https://huggingface.co/{name_or_dir} into {folder}, or pass a local folder") from None
    raise InputError(f"{name_or_dir}: the hub has none of {', '.join(WEIGHT_FILES)}")


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: cannot read JSON ({e}); download it again") from None


# ----------------------------------------------------------------------------------------------
# The datasets' files: a local path as is, else the environment's folder, else the download cache

def imdb_path(path=None):
    """Where the IMDb data is: `path`, else $DPO_IMDB, else <cache_dir()>/aclImdb_v1.tar.gz (downloaded if absent).
    Either the .tar.gz archive or the extracted folder (`aclImdb/` itself or its parent) will do."""
    path = path or os.environ.get("DPO_IMDB")
    if path:
        return path
    dest = os.path.join(cache_dir(), "aclImdb_v1.tar.gz")
    try:
        return download(IMDB_URL, dest, what="IMDb")
    except (InputError, FileNotFoundError) as e:  # offline or HTTP 404: keep download's reason, add the alternative
        raise InputError(f"{e}, or set DPO_IMDB to the archive or its extracted aclImdb/ folder") from None


def env_file(var, *names):
    """The first of $var/name for names that exists; none: one line naming both places and the variable."""
    tries = [os.path.join(os.environ[var], n) for n in names]
    found = [p for p in tries if os.path.isfile(p)]
    if not found:
        raise InputError(f"{var}={os.environ[var]}: holds neither {' nor '.join(tries)}; put the file there or "
                         f"unset {var}")
    return found[0]


def hh_path(source):
    """A local file as is; a name "subset/split" via $DPO_HH or the download cache."""
    if os.path.exists(source):
        return source
    m = re.fullmatch(r"([\w-]+)/(train|test)", source)
    if not m:
        raise InputError(f"{source}: no such file, and not a name like harmless-base/test; pass a .jsonl(.gz) "
                         f"file or one of {', '.join(HH_SUBSETS)} followed by /train or /test")
    subset, split = m.groups()
    if subset not in HH_SUBSETS:
        raise InputError(f"{source}: unknown HH subset {subset!r}; use one of {', '.join(HH_SUBSETS)}")
    if os.environ.get("DPO_HH"):
        return env_file("DPO_HH", os.path.join(subset, f"{split}.jsonl.gz"), f"{subset}-{split}.jsonl.gz")
    dest = os.path.join(cache_dir(), "hh-rlhf", subset, f"{split}.jsonl.gz")
    url = HH_URL.format(subset=subset, split=split)
    try:
        return download(url, dest, what=f"hh-rlhf {source}")
    except (InputError, FileNotFoundError) as e:
        raise InputError(f"{e}, or set DPO_HH to a folder holding {subset}/{split}.jsonl.gz") from None


def tldr_path(split, override=None):
    """The TL;DR posts of `split` (train, valid, test): `override` (the .jsonl file, or a folder holding
    <split>.jsonl), else $DPO_TLDR/tldr_3_filtered/<split>.jsonl (the blob's layout) or $DPO_TLDR/<split>.jsonl,
    else <cache_dir()>/summarize-from-feedback/tldr_3_filtered/<split>.jsonl, downloaded from corpora.TLDR_URL."""
    if split not in TLDR_SPLITS:
        raise InputError(f"unknown TL;DR split {split!r}; use one of {', '.join(TLDR_SPLITS)}")
    if override:
        path = os.path.join(override, f"{split}.jsonl") if os.path.isdir(override) else override
        if not os.path.isfile(path):
            raise InputError(f"{path}: no such file; pass the tldr_3_filtered {split}.jsonl file or its folder")
        return path
    if os.environ.get("DPO_TLDR"):
        return env_file("DPO_TLDR", os.path.join("tldr_3_filtered", f"{split}.jsonl"), f"{split}.jsonl")
    dest = os.path.join(cache_dir(), "summarize-from-feedback", "tldr_3_filtered", f"{split}.jsonl")
    try:
        return download(TLDR_URL.format(split=split), dest, what=f"TL;DR {split}")
    except (InputError, FileNotFoundError) as e:
        raise InputError(f"{e}, or set DPO_TLDR to a folder holding tldr_3_filtered/{split}.jsonl") from None


def tldr_comparisons_paths(override=None):
    """The human comparison batch files: `override` (one file, or a folder: its *.json files), else
    $DPO_TLDR/comparisons/*.json, else corpora.TLDR_COMPARISON_BATCHES (the TL;DR batches) downloaded into
    <cache_dir()>/summarize-from-feedback/comparisons/. corpora.read_tldr_comparisons reads them."""
    folder = override or (os.path.join(os.environ["DPO_TLDR"], "comparisons") if os.environ.get("DPO_TLDR") else None)
    if folder:
        if os.path.isfile(folder):
            return [folder]
        paths = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".json")) \
            if os.path.isdir(folder) else []
        if not paths:
            where = "" if override else " (from DPO_TLDR)"
            raise InputError(f"{folder}{where}: no comparison files (*.json) there; put the batch files there, "
                             f"e.g. {TLDR_COMPARISON_BATCHES[0]}, or pass one file")
        return paths
    folder = os.path.join(cache_dir(), "summarize-from-feedback", "comparisons")
    try:
        return [download(TLDR_COMPARISONS_URL.format(batch=b), os.path.join(folder, b), what=f"comparisons {b}")
                for b in TLDR_COMPARISON_BATCHES]
    except (InputError, FileNotFoundError) as e:
        raise InputError(f"{e}, or set DPO_TLDR to a folder holding comparisons/batch*.json") from None
