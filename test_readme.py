"""The README's commands cannot drift from the code: every `python dpo.py|sft.py|eval.py|bench.py ...` and
`torchrun ... dpo.py ...` in README.md (its ```sh blocks and its inline `code`) is parsed by that script's own
parser, and the tiny offline run and the memory estimate are run as written.

    python -m pytest -q test_readme.py

What is checked, for each command:
  * every --flag written is an exact option of the script's parser. argparse would also accept an abbreviation,
    so a README flag that became the prefix of a renamed one (--max-length -> --max-length-tokens) would still
    parse: this catches it.
  * the command parses, through the script's own entry: dpo.py through dpo.main itself (so `--task imdb` goes to
    ImdbConfig exactly as main dispatches it), with train()/imdb.run() replaced by the flag checks they run first
    (dpo.check_config; ImdbConfig.resolved and imdb.check_size); sft.parse_args, eval.parse_args; bench.py through
    bench.main's own argparse, stopped after parsing, and its workload names against the ones main dispatches.
Placeholders: a bare `...` stands for flags not written (only the written ones are checked), `... ` after a flag
is its value, `a|b|c` is tried for each alternative, `[--flag]` is written.
Also: inline `--flag` mentions name real flags, named files exist, the reading table's `name` (line N) references
point at `def name`/`class name`, `pytest -k` selections collect the tests the README says, and the --estimate-memory
table in the README equals what the command prints.
"""
import argparse
import contextlib
import inspect
import io
import itertools
import os
import re
import shlex
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "shared")
os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(SHARED, "tiktoken"))

import bench  # noqa: E402
import dpo  # noqa: E402
import eval as ev  # noqa: E402
import sft  # noqa: E402

README = os.path.join(HERE, "README.md")
SCRIPTS = ("dpo.py", "sft.py", "eval.py", "bench.py")


# ---- reading the README


def readme_lines():
    with open(README, encoding="utf-8") as f:
        return f.read().split("\n")


def sh_commands(lines):
    """(line number, command) for every command of every ```sh block: backslash-continued lines joined, comment
    lines skipped (trailing comments are dropped later by shlex)."""
    out, in_sh, pending, start = [], False, "", 0
    for n, line in enumerate(lines, 1):
        if line.startswith("```"):
            in_sh = not in_sh and line.strip() in ("```sh", "```bash")
            continue
        if not in_sh or (not pending and (not line.strip() or line.lstrip().startswith("#"))):
            continue
        start = start if pending else n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, (pending + line).strip()))
        pending = ""
    return out


def inline_spans(lines):
    """(line number, text) of every inline `code` span outside fenced blocks (a span may continue on the next line)."""
    text, fenced, kept = "", False, []
    for line in lines:
        if line.startswith("```"):
            fenced = not fenced
            kept.append("")
            continue
        kept.append("" if fenced else line)
    text = "\n".join(kept)
    return [(text.count("\n", 0, m.start()) + 1, " ".join(m.group(1).split())) for m in re.finditer(r"`([^`]+)`", text)]


def split_command(cmd):
    """(env, script or tool, argv, extra) of one command: VAR=value prefixes, then `python X.py`, `torchrun ... X.py`,
    `python -m MODULE` or another tool. extra: torchrun's processes."""
    words = shlex.split(cmd, comments=True)
    env = {}
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        k, v = words.pop(0).split("=", 1)
        env[k] = v
    if not words:
        return env, None, [], {}
    if words[0] == "torchrun":
        i = next(i for i, w in enumerate(words) if w.endswith(".py"))
        opts = " ".join(words[1:i])
        m = re.search(r"--nproc[_-]per[_-]node[= ](\d+)", opts)
        return env, words[i], words[i + 1:], {"world": int(m.group(1)) if m else 1}
    if words[0] in ("python", "python3") and len(words) > 1:
        if words[1] == "-m":
            return env, "-m " + words[2], words[3:], {}
        return env, words[1], words[2:], {}
    return env, words[0], words[1:], {}


def script_commands():
    """Every README command that runs one of our scripts: (line, command text, script, argv, torchrun world)."""
    lines = readme_lines()
    found = sh_commands(lines) + [(n, s) for n, s in inline_spans(lines) if re.search(r"(python|torchrun)\b.*\.py", s)]
    out = []
    for n, cmd in found:
        _, script, argv, extra = split_command(cmd)
        if script in SCRIPTS:
            out.append((n, cmd, script, argv, extra.get("world", 1)))
    return out


# ---- the scripts' own parsers


class Stop(Exception):
    """Raised by a stand-in for what would run after parsing: carries what was parsed."""

    def __init__(self, value):
        super().__init__("stopped after parsing")
        self.value = value


@contextlib.contextmanager
def recording_parsers(stop=False):
    """Records every ArgumentParser that parses (so the exact option strings are known); stop=True raises Stop
    with (parser, namespace) right after parsing (bench.main would run its workloads next)."""
    seen, real = [], argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        seen.append(self)
        ns = real(self, args, namespace)
        if stop:
            raise Stop((self, ns))
        return ns

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(argparse.ArgumentParser, "parse_args", parse_args)
        yield seen


@contextlib.contextmanager
def quiet():
    """stdout and stderr into one buffer (argparse's errors, --help, dpo.main's config line)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        yield buf


def parsers_of(script):
    """The argparse parsers a script uses (dpo.py: TrainConfig's and, for --task imdb, ImdbConfig's), built by the
    script's own entry point and stopped right after parsing."""
    calls = {"dpo.py": [lambda: dpo.main([]), lambda: dpo.main(["--task", "imdb"]), lambda: dpo.main(["--task", "hh"])],
             "sft.py": [lambda: sft.parse_args([])], "eval.py": [lambda: ev.parse_args([])],
             "bench.py": [lambda: bench.main([])]}[script]
    parsers = []
    for call in calls:
        with recording_parsers(stop=True), quiet(), pytest.MonkeyPatch.context() as mp:
            mp.setattr(dpo, "keep_freed_memory", lambda: None, raising=False)  # a process-wide malloc setting
            try:
                call()
            except Stop as s:
                parsers.append(s.value[0])
    assert parsers, f"{script}: no argparse parser found"
    return parsers


def options(parser):
    """{option string: takes a value}"""
    return {s: a.nargs != 0 for s, a in parser._option_string_actions.items()}


def bench_workloads():
    """The workload names bench.main dispatches (`w == "name"`)."""
    return set(re.findall(r'\bw == "(\w+)"', inspect.getsource(bench.main)))


# ---- one command


def variants(argv, takes_value):
    """The argvs a README command stands for: `...` dropped (or, after a flag that takes a value, a dummy value),
    [brackets] removed, `a|b|c` expanded. Returns (list of argvs, partial: whether flags were left out)."""
    words, partial = [], False
    for i, w in enumerate(argv):
        if w == "...":
            if i and takes_value.get(argv[i - 1].strip("[]").split("=")[0]):
                words.append(["placeholder"])
            else:
                partial = True
            continue
        w = w.strip("[]")
        words.append(w.split("|") if "|" in w and not w.startswith("|") else [w])
    return [list(v) for v in itertools.product(*words)], partial


def check_command(line, cmd, script, argv, world=1):
    """Raises AssertionError, naming the README line, if the command does not parse or its flags are wrong."""
    where = f"README.md:{line}: `{cmd}`"
    parsers = parsers_of(script)
    known = {}
    for p in parsers:
        known.update(options(p))
    for argv_v in variants(argv, known)[0]:
        for w in argv_v:
            flag = w.split("=")[0]
            if flag.startswith("--") and flag not in known:
                raise AssertionError(f"{where}: {flag} is not a flag of {script} (renamed or removed?); "
                                     f"see python {script} --help")
        if script == "dpo.py":
            check_dpo(where, argv_v, world)
        elif script == "bench.py":
            with recording_parsers(stop=True), quiet() as out:
                try:
                    bench.main(argv_v)
                except SystemExit as e:
                    if e.code or "--help" not in argv_v:
                        raise AssertionError(f"{where}: bench.py's parser refused it:\n{out.getvalue()}") from None
                    continue
                except Stop as s:
                    args = s.value[1]
            unknown = set(args.workloads) - bench_workloads()
            assert not unknown, f"{where}: bench.py has no workload {sorted(unknown)}; it has {sorted(bench_workloads())}"
        else:
            parse = {"sft.py": sft.parse_args, "eval.py": ev.parse_args}[script]
            with quiet() as out:
                try:
                    parse(argv_v)
                except SystemExit as e:
                    if e.code or "--help" not in argv_v:
                        raise AssertionError(f"{where}: {script}'s parser refused it:\n{out.getvalue()}") from None


def check_dpo(where, argv, world):
    """dpo.main itself on argv, with train() and imdb.run() replaced by the flag checks they start with."""

    def fake_train(cfg, *a, **k):
        dpo.check_config(cfg)
        raise Stop(cfg)

    def fake_imdb_run(cfg, train, TrainConfig, log=print, train_rankings=None, online_dpo=None):
        dpo.imdb.check_flags(cfg.resolved(), TrainConfig)  # every flag, as the real run checks them first
        raise Stop(cfg)

    def fake_generation_run(cfg, train, TrainConfig, log=print):
        cfg = cfg.resolved()
        if cfg.judge == "api":
            cfg.judge_url = "http://localhost/v1"  # the flags only: no key or server needed to parse
        dpo.generation.check(cfg)
        raise Stop(cfg)

    with pytest.MonkeyPatch.context() as mp, quiet() as out:
        mp.setattr(dpo, "keep_freed_memory", lambda: None, raising=False)  # a process-wide malloc setting
        mp.setattr(dpo, "train", fake_train)
        mp.setattr(dpo.generation, "run", fake_generation_run)
        mp.setattr(dpo.imdb, "run", fake_imdb_run)
        mp.setattr(dpo.memory, "memory_report", lambda cfg: "")
        mp.setenv("WORLD_SIZE", str(world))
        mp.setenv("RANK", "0")
        try:
            rc = dpo.main(argv)
        except SystemExit as e:
            if e.code or "--help" not in argv:
                raise AssertionError(f"{where}: dpo.py's parser refused it:\n{out.getvalue()}") from None
            return
        except Stop:
            return
    assert rc == 0, f"{where}: dpo.main returned {rc}:\n{out.getvalue()}"


COMMANDS = script_commands()


def test_the_readme_has_commands_of_every_script():
    scripts = {c[2] for c in COMMANDS}
    assert {"dpo.py", "bench.py"} <= scripts, scripts
    assert any(c[4] > 1 for c in COMMANDS), "no torchrun command found"


@pytest.mark.parametrize("line,cmd,script,argv,world", COMMANDS, ids=[f"L{c[0]}-{c[2]}" for c in COMMANDS])
def test_readme_command_parses(line, cmd, script, argv, world):
    check_command(line, cmd, script, argv, world)


@pytest.mark.parametrize("cmd", [
    "python dpo.py --task hh --max-len 256",          # an abbreviation argparse would accept
    "python dpo.py --task hh --steps-total 20",       # a flag the code does not have
    "python dpo.py --task hh --loss-type ipo|nope",   # one alternative the loss does not know
    "python dpo.py --task imdb --betas 0.1 --lr-sft 1",
    "python bench.py hh sweeps",                       # a workload bench.py does not dispatch
    "python bench.py --trl-pyton ...",
    "python sft.py --token 1000",
    "torchrun --nproc_per_node=3 dpo.py --task hh --fsdp",  # 64 pairs do not split over 3 processes
])
def test_the_checker_catches_drift(cmd):
    """What the README check would say if a flag were renamed in the code but not in the README."""
    _, script, argv, extra = split_command(cmd)
    with pytest.raises(AssertionError):
        check_command(0, cmd, script, argv, extra.get("world", 1))


def test_inline_flags_files_and_test_selections_exist():
    """`--flag` mentions are flags of some script; `x.py` and `machinery/x.py` mentions exist; requirement files exist."""
    known = {}
    for script in SCRIPTS:
        for p in parsers_of(script):
            known.update(options(p))
    lines = readme_lines()
    for n, span in inline_spans(lines):
        first = span.split()[0]
        if first.startswith("--"):
            assert first.split("=")[0] in known, f"README.md:{n}: `{span}`: no script has the flag {first}"
        for name in re.findall(r"^((?:machinery/)?\w+\.py)$", span):
            assert any(os.path.exists(os.path.join(HERE, d, name)) for d in ("", "machinery")), \
                f"README.md:{n}: `{span}`: no such file"
    for n, cmd in sh_commands(lines):
        _, tool, argv, _ = split_command(cmd)
        for i, w in enumerate(argv):
            if tool == "pip" and argv[i - 1:i] == ["-r"]:
                assert os.path.exists(os.path.join(HERE, w)), f"README.md:{n}: {w} does not exist"


def defined_at(src, name):
    """Line numbers (1-based) where `name` (or `Class.method`) is defined in the source lines src."""
    *outer, short = name.split(".")
    lines = [i for i, s in enumerate(src, 1) if re.match(rf"\s*(def|class) {short}\b", s)]
    if outer:  # the method inside that class: after `class Outer`, before the next top-level statement
        start = next((i for i, s in enumerate(src, 1) if re.match(rf"class {outer[-1]}\b", s)), None)
        end = next((i for i, s in enumerate(src, 1) if start and i > start and re.match(r"[^\s#]", s)), len(src) + 1)
        lines = [i for i in lines if start and start < i < end]
    return lines


def test_reading_table_line_numbers():
    """The reading table's `name` (line N) references: line N of that file defines name."""
    rows = [line for line in readme_lines() if re.match(r"^\| `[\w/]+\.py` \|", line)]
    refs = 0
    for row in rows:
        path = re.match(r"^\| `([\w/]+\.py)`", row).group(1)
        for name, n in re.findall(r"`([\w.]+)` \(line (\d+)\)", row):
            with open(os.path.join(HERE, path), encoding="utf-8") as f:
                src = f.read().split("\n")
            actual = defined_at(src, name)
            assert int(n) in actual, f"README.md reading table: `{name}` is at line {actual} of {path}, not {n}"
            refs += 1
    assert refs >= 5, "the reading table lost its line references"


def test_pytest_selections_collect_what_the_readme_says():
    """`python -m pytest ... FILE -k EXPR` in the README selects tests (and as many as it says: `(6 tests`)."""
    text = "\n".join(readme_lines())
    found = 0
    for m in re.finditer(r"`python -m pytest -q (test_\w+\.py) -k (\"[^\"]+\"|\w+)`(?: \((\d+) tests)?", text):
        file, expr, count = m.group(1), m.group(2).strip('"'), m.group(3)
        r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", file, "-k", expr],
                           cwd=HERE, capture_output=True, text=True, timeout=120)
        got = re.search(r"(\d+)(?:/\d+)? tests? collected", r.stdout)
        assert r.returncode == 0 and got, f"`pytest {file} -k {expr}` collected nothing:\n{r.stdout[-2000:]}"
        if count:
            assert int(got.group(1)) == int(count), f"README says `-k {expr}` runs {count} tests; it collects {got.group(1)}"
        found += 1
    assert found >= 2, "the exercises' pytest commands were not found"


# ---- running what runs offline


def offline_runs():
    """README dpo.py commands that need no download: a random model (`--model random:...`) and a local --data."""
    return [c for c in COMMANDS if c[2] == "dpo.py" and "..." not in c[3]
            and any(w.startswith("random:") for w in c[3]) and "--data" in c[3]]


def test_the_readme_has_an_offline_run():
    assert offline_runs(), "the README lost its tiny offline run"


@pytest.mark.parametrize("line,cmd,script,argv,world", offline_runs(), ids=[f"L{c[0]}" for c in offline_runs()])
def test_tiny_offline_run_as_written(line, cmd, script, argv, world, tmp_path):
    """The command as written (only --out moved into tmp_path), in its own process: exit 0 and the files it promises."""
    data = argv[argv.index("--data") + 1]
    if not os.path.exists(os.path.join(HERE, data)):
        pytest.skip(f"{data} not found (the shared data folder is absent)")
    if not os.path.isdir(os.environ["TIKTOKEN_CACHE_DIR"]):
        pytest.skip(f"no GPT-2 BPE files at TIKTOKEN_CACHE_DIR={os.environ['TIKTOKEN_CACHE_DIR']} (offline)")
    argv = list(argv)
    if "--out" in argv:
        argv[argv.index("--out") + 1] = str(tmp_path / "run")
    else:
        argv += ["--out", str(tmp_path / "run")]
    r = subprocess.run([sys.executable, "dpo.py", *argv], cwd=HERE, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"README.md:{line}: `{cmd}` exited {r.returncode}:\n{r.stderr[-3000:]}"
    assert "done: loss" in r.stdout
    for f in ("metrics.jsonl", "curves.png", "checkpoint"):
        assert os.path.exists(tmp_path / "run" / f), f"the run wrote no {f}"


def test_estimate_memory_runs_and_matches_the_readme_table(monkeypatch):
    """`python dpo.py --estimate-memory --model ...` as written (arithmetic, no download), and every row of the
    README's memory table equals the printed one."""
    line, cmd, _, argv, _ = next(c for c in COMMANDS if "--estimate-memory" in c[3])
    monkeypatch.setattr(dpo, "keep_freed_memory", lambda: None, raising=False)
    with quiet() as out:
        rc = dpo.main(argv)
    printed = out.getvalue()
    assert rc == 0, f"README.md:{line}: `{cmd}` returned {rc}:\n{printed}"
    rows = {}
    for row in printed.split("\n"):
        cells = [c.strip() for c in row.strip("|").split("|")]
        if len(cells) == 7:
            rows[(cells[0].split("/")[-1], cells[2])] = cells[3:]
    model, checked = None, 0
    for row in readme_lines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if len(cells) != 6 or not re.match(r"^[\d.]+$", cells[2]) or "--" not in cells[1] and "weights" not in cells[1]:
            continue
        model = cells[0].split(" (")[0] or model
        key = (model, cells[1])
        assert key in rows, f"README memory table: {key} is not printed by `{cmd}`"
        assert cells[2:] == rows[key], f"README memory table {key}: {cells[2:]}; `{cmd}` prints {rows[key]}"
        checked += 1
    assert checked >= 8, "the README's memory table was not found"
