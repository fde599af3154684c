"""judge.py, offline: a local HTTP server in a thread plays the OpenAI-compatible chat server.

    TIKTOKEN_CACHE_DIR=../shared/tiktoken python -m pytest -q test_judge.py

The expected prompts are written out here by hand, character by character, from Appendix C.2 of arXiv:2305.18290
(not taken from judge.py's constants). The server answers from what it reads in the prompt, so the A/B order,
its record and the mapping back to response/baseline are checked from the outside.
"""
import http.server
import json
import math
import os
import random
import socket
import threading
import time

import pytest

os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared",
                                                         "tiktoken"))

import eval as ev  # noqa: E402
import judge  # noqa: E402
from data import InputError  # noqa: E402

KEY = "sk-test-SECRET-0123456789"

EXPECTED_DIALOGUE = (
    "For the following query to a chatbot, which response is more helpful?\n"
    "Query: How do I boil an egg?\n"
    "Response A:\n"
    "Put it in boiling water for 8 minutes.\n"
    "Response B:\n"
    "I don't know.\n"
    "FIRST provide a one-sentence comparison of the two responses and explain which you feel is more helpful. "
    "SECOND, on a new line, state only \"A\" or \"B\" to indicate which response is more helpful. "
    "Your response should use the format:\n"
    "Comparison: <one-sentence comparison and explanation>\n"
    "More helpful: <\"A\" or \"B\">")

EXPECTED_SUMMARIZATION = (
    "Which of the following summaries does a better job of summarizing the most important points in the given "
    "forum post, without including unimportant or irrelevant details? A good summary is both precise and concise.\n"
    "Post:\n"
    "My cat {a} knocks cups off the table.\n"
    "Summary A:\n"
    "Cat breaks cups.\n"
    "Summary B:\n"
    "A post about {b} a cat.\n"
    "FIRST provide a one-sentence comparison of the two summaries, explaining which you prefer and why. "
    "SECOND, on a new line, state only \"A\" or \"B\" to indicate your choice. Your response should use the format:\n"
    "Comparison: <one-sentence comparison and explanation>\n"
    "Preferred: <\"A\" or \"B\">")

EXPECTED_NEWS = (
    "Which of the following summaries does a better job of summarizing the most important points in the given "
    "news article, without including unimportant or irrelevant details? A good summary is both precise and concise.\n"
    "Article:\n"
    "Rain fell in Paris on Monday.\n"
    "Summary A:\n"
    "Paris had rain.\n"
    "Summary B:\n"
    "Weather.\n"
    "FIRST provide a one-sentence comparison of the two summaries, explaining which you prefer and why. "
    "SECOND, on a new line, state only \"A\" or \"B\" to indicate your choice. Your response should use the format:\n"
    "Comparison: <one-sentence comparison and explanation>\n"
    "Preferred: <\"A\" or \"B\">")


# ---- a fake OpenAI-compatible server

class FakeServer:
    """Records every request (path, headers, JSON body); answers with answer(prompt, n) -> (status, text), where
    n counts requests from 1. The default answer picks the side holding a text that starts with "GOOD"."""

    def __init__(self, answer=None):
        self.requests, self.lock = [], threading.Lock()
        self.answer = answer or self.prefer_good
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    n = len(outer.requests)
                status, text = outer.answer(body["messages"][0]["content"], n)
                payload = (json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]})
                           if status == 200 else json.dumps({"error": {"message": text}})).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True).start()

    @staticmethod
    def sides(prompt):
        """The two responses as the judge sees them (dialogue prompt): (text after "Response A:", after "B:")."""
        a = prompt.split("\nResponse A:\n")[1].split("\nResponse B:\n")[0]
        b = prompt.split("\nResponse B:\n")[1].split("\nFIRST provide")[0]
        return a, b

    @staticmethod
    def prefer_good(prompt, n):
        a, b = FakeServer.sides(prompt) if "\nResponse A:\n" in prompt else ("", "")
        side = "A" if a.startswith("GOOD") else "B" if b.startswith("GOOD") else "?"
        return 200, f"Comparison: one is better.\nMore helpful: {side}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server():
    s = FakeServer()
    yield s
    s.close()


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


def samples(n, good_response=True):
    """n samples whose response (or baseline) starts with GOOD, so the fake server prefers it."""
    return [{"prompt": f"\n\nHuman: question {i}?\n\nAssistant:",
             "response": f"{'GOOD' if good_response else 'bad'} response {i}",
             "baseline": f"{'bad' if good_response else 'GOOD'} baseline {i}"} for i in range(n)]


def api(server, **kw):
    return judge.ApiJudge(server.url, "judge-model", "dialogue", **{"workers": 4, "backoff": 0.01, **kw})


def quiet(*_):
    pass


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


# ---- the prompts

@pytest.mark.parametrize("kind, query, a, b, expected", [
    ("dialogue", "\n\nHuman: How do I boil an egg?\n\nAssistant:", " Put it in boiling water for 8 minutes.",
     " I don't know.", EXPECTED_DIALOGUE),
    ("summarization", "My cat {a} knocks cups off the table.\nTL;DR:", "Cat breaks cups.", "A post about {b} a cat.",
     EXPECTED_SUMMARIZATION),
    ("news", "Rain fell in Paris on Monday.", "Paris had rain.", "Weather.", EXPECTED_NEWS),
])
def test_prompts_are_the_papers_verbatim(server, kind, query, a, b, expected):
    """The exact text the server receives; the request's path, model, temperature and key header. Braces and slot
    names inside the texts ({a}, {b}) stay as they are."""
    verdicts = judge.ApiJudge(server.url, "judge-model", kind, backoff=0.01).compare([(query, a, b)])
    (request,) = server.requests
    assert request["body"]["messages"] == [{"role": "user", "content": expected}]
    assert request["path"] == "/v1/chat/completions"
    assert request["body"]["model"] == "judge-model" and request["body"]["temperature"] == 0
    assert request["headers"]["Authorization"] == f"Bearer {KEY}"
    assert verdicts == [{"winner": None, "reply": "Comparison: one is better.\nMore helpful: ?"}]


def test_multi_turn_dialogue_shows_the_transcript():
    prompt = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: what is 2+2?\n\nAssistant:"
    assert judge.shown_query("dialogue", prompt) == "Human: hi\n\nAssistant: hello\n\nHuman: what is 2+2?"
    assert judge.shown_query("dialogue", "What is 2+2?") == "What is 2+2?"


@pytest.mark.parametrize("reply, label, expected", [
    ("Comparison: A is clearer.\nMore helpful: A", "More helpful", "A"),
    ("Comparison: B wins.\nMore helpful: \"B\"", "More helpful", "B"),
    ("Comparison: x\n**More helpful:** B", "More helpful", "B"),
    ("Comparison: x\n**More helpful**: A", "More helpful", "A"),
    ("comparison: x\n  more HELPFUL:   'a'.  ", "More helpful", "A"),
    ("More helpful: A\nOn reflection:\nMore helpful: B", "More helpful", "B"),   # the last such line counts
    ("More helpful: A\nMore helpful: neither", "More helpful", None),              # ... even when it is invalid
    ("Comparison: x\nPreferred: B", "Preferred", "B"),
    ("Comparison: x\nMore helpful: B", "Preferred", None),                          # the other prompt's label
    ("Comparison: x\nMore helpful: A or B", "More helpful", None),
    ("Comparison: x\nMore helpful: Response A", "More helpful", None),
    ("Comparison: x\nMore helpful:", "More helpful", None),
    ("Both are fine. A", "More helpful", None),
    ("More helpfulness: A", "More helpful", None),
    ("", "More helpful", None),
    (None, "More helpful", None),
])
def test_parse_verdict(reply, label, expected):
    assert judge.parse_verdict(reply, label) == expected


# ---- order, win rate, invalid replies

def test_order_is_seeded_recorded_and_mapped_back(server, tmp_path):
    """The server always prefers the GOOD text, wherever it stands: every recorded order must match the side the
    server saw the response on, and the winner maps back to the GOOD one for either order. The orders repeat
    for the same seed (with 1 or 4 workers) and differ for another."""
    runs = {}
    for name, seed, workers, good_response in [("a", 0, 4, True), ("b", 0, 1, False), ("c", 1, 4, True)]:
        server.requests.clear()
        out = tmp_path / name
        result = judge.win_rate(samples(40, good_response), api(server, workers=workers), str(out), seed=seed, log=quiet)
        lines = read_jsonl(out / "judgments.jsonl")
        seen = {}  # sample index -> the response was shown as A
        for r in server.requests:
            a, b = FakeServer.sides(r["body"]["messages"][0]["content"])
            i = int(a.split()[-1])
            seen[i] = a.split()[1] == "response"
        assert [x["index"] for x in lines] == list(range(40))
        assert [x["response_first"] for x in lines] == [seen[i] for i in range(40)]
        assert {x["winner"] for x in lines} == {"response" if good_response else "baseline"}
        assert result["win_rate"] == (1.0 if good_response else 0.0) and result["n"] == 40
        runs[name] = [x["response_first"] for x in lines]
    assert 5 < sum(runs["a"]) < 35  # both orders occur
    assert runs["a"] == runs["b"] and runs["a"] != runs["c"]


def test_win_rate_counts_by_hand(tmp_path, capsys):
    """3 wins, 1 loss, 2 invalid replies: p = 3/4 = 0.75 over n = 4, se = sqrt(0.75 * 0.25 / 4) = 0.2165; the
    invalid replies are counted, left out, and shown."""
    plan = {0: "win", 1: "win", 2: "win", 3: "lose", 4: "junk", 5: "junk"}

    def answer(prompt, n):
        a, b = FakeServer.sides(prompt)
        i = int(a.split()[-1])
        response_side = "A" if a.startswith("GOOD") else "B"
        if plan[i] == "junk":
            return 200, f"Comparison: hard to say.\nMore helpful: both {i}"
        side = response_side if plan[i] == "win" else {"A": "B", "B": "A"}[response_side]
        return 200, f"Comparison: fine.\nMore helpful: {side}"
    s = FakeServer(answer)
    try:
        result = judge.win_rate(samples(6), api(s), str(tmp_path), seed=3)
    finally:
        s.close()
    assert (result["n"], result["invalid"], result["wins"]) == (4, 2, 3)
    assert result["win_rate"] == 0.75 and result["se"] == pytest.approx(math.sqrt(0.75 * 0.25 / 4))
    out = capsys.readouterr().out
    assert "win rate 0.750 ± 0.217 (n 4, invalid 2)" in out.splitlines()
    assert "both 4" in out and "both 5" in out
    saved = json.loads((tmp_path / "win_rate.json").read_text())
    assert saved["win_rate"] == 0.75 and saved["n"] == 4 and saved["invalid"] == 2 and saved["seed"] == 3
    assert saved["prompt_kind"] == "dialogue" and "judge-model" in saved["judge"]
    assert [x["winner"] for x in read_jsonl(tmp_path / "judgments.jsonl")] == \
        ["response", "response", "response", "baseline", None, None]


def test_agreement_with_human_labels(server, tmp_path):
    pairs = [{"prompt": f"q {i}", "chosen": f"GOOD chosen {i}", "rejected": f"bad rejected {i}"} for i in range(6)]
    pairs[5] = {"prompt": "q 5", "chosen": "bad chosen 5", "rejected": "GOOD rejected 5"}
    result = judge.agreement(pairs, api(server), str(tmp_path), seed=0, log=quiet)
    assert (result["agreement"], result["n"]) == (5 / 6, 6)
    assert (tmp_path / "agreement.json").exists() and len(read_jsonl(tmp_path / "agreement.jsonl")) == 6


# ---- retries

def test_retries_on_429_and_500(tmp_path):
    """Fails with 429, 429, 500, then answers: one verdict after four requests."""
    def answer(prompt, n):
        return {1: (429, "slow down"), 2: (429, "slow down"), 3: (500, "oops")}.get(n, FakeServer.prefer_good(prompt, n))
    s = FakeServer(answer)
    try:
        result = judge.win_rate(samples(1), api(s), str(tmp_path), log=quiet)
        assert len(s.requests) == 4 and result["win_rate"] == 1.0
    finally:
        s.close()


def test_retries_run_out_with_one_line(tmp_path, capsys):
    s = FakeServer(lambda prompt, n: (503, f"overloaded, your key {KEY}"))
    try:
        with pytest.raises(judge.JudgeError) as e:
            judge.win_rate(samples(2), api(s, retries=2), str(tmp_path), log=quiet)
        assert len(s.requests) == 3
    finally:
        s.close()
    assert "failed 3 times" in str(e.value) and "\n" not in str(e.value) and KEY not in str(e.value)


# ---- the cache

def test_cache_second_run_asks_nothing(server, tmp_path):
    first = judge.win_rate(samples(8), api(server), str(tmp_path), log=quiet)
    assert len(server.requests) == 8
    lines = read_jsonl(tmp_path / "judgments.jsonl")
    second = judge.win_rate(samples(8), api(server), str(tmp_path), log=quiet)
    assert len(server.requests) == 8 and first == second and read_jsonl(tmp_path / "judgments.jsonl") == lines


def test_cache_resumes_an_interrupted_run(tmp_path):
    """The server fails for good (400) after 3 answers: the run stops with one line, the 3 stay cached, and the
    next run asks only the other 5. A truncated last cache line (a kill mid-write) is tolerated: that one
    judgment is asked again and the file stays readable."""
    healthy = [True]

    def answer(prompt, n):
        return FakeServer.prefer_good(prompt, n) if healthy[0] or n <= 3 else (400, "bad request")
    s = FakeServer(answer)
    try:
        healthy[0] = False
        with pytest.raises(judge.JudgeError):
            judge.win_rate(samples(8), api(s, workers=1), str(tmp_path), log=quiet)
        assert len(s.requests) in (4, 5)  # the 4th fails; with 1 worker the 5th may already be in flight
        assert len(read_jsonl(tmp_path / judge.CACHE_FILE)) == 3
        healthy[0] = True
        s.requests.clear()
        judge.win_rate(samples(8), api(s), str(tmp_path), log=quiet)
        assert len(s.requests) == 5
        cache = tmp_path / judge.CACHE_FILE
        text = cache.read_text()
        cache.write_text(text[:-20])  # the last judgment cut mid-line
        s.requests.clear()
        result = judge.win_rate(samples(8), api(s), str(tmp_path), log=quiet)
        assert len(s.requests) == 1 and result["n"] == 8
        lines = cache.read_text().splitlines()  # the cut line stays; the new entry has a line of its own
        assert len(lines) == 9 and set(json.loads(lines[-1])) == {"key", "winner", "reply"}
        assert len(judge.read_cache(str(cache))) == 8
    finally:
        s.close()


def test_cache_survives_an_interrupt(server, tmp_path, monkeypatch):
    """Ctrl-C after 3 judgments: those 3 are on disk, nothing more is asked but the calls in flight (2 workers),
    and the next run asks only the other 37."""
    real = judge.ApiJudge.compare

    def interrupted(self, items, on_verdict=None):
        delivered = []

        def deliver(i, verdict):
            on_verdict(i, verdict)
            delivered.append(i)
            if len(delivered) == 3:
                raise KeyboardInterrupt
        return real(self, items, deliver)
    monkeypatch.setattr(judge.ApiJudge, "compare", interrupted)
    with pytest.raises(KeyboardInterrupt):
        judge.win_rate(samples(40), api(server, workers=2), str(tmp_path), log=quiet)
    assert len(read_jsonl(tmp_path / judge.CACHE_FILE)) == 3 and len(server.requests) <= 6
    assert not (tmp_path / "judgments.jsonl").exists()
    monkeypatch.undo()
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    server.requests.clear()
    assert judge.win_rate(samples(40), api(server), str(tmp_path), log=quiet)["n"] == 40
    assert len(server.requests) == 37


def test_max_calls_refuses_before_asking(server, tmp_path):
    with pytest.raises(InputError, match="8 judge calls needed, more than --max-judge-calls 5"):
        judge.win_rate(samples(8), api(server), str(tmp_path), max_calls=5, log=quiet)
    assert server.requests == []
    judge.win_rate(samples(4), api(server), str(tmp_path), max_calls=5, log=quiet)
    judge.win_rate(samples(8), api(server), str(tmp_path), max_calls=4, log=quiet)  # 4 cached: 4 to ask
    assert len(server.requests) == 8


# ---- the key

def test_key_is_sent_but_never_written_or_printed(tmp_path, capsys):
    """The key goes in the Authorization header only; a server that echoes it back has it masked."""
    s = FakeServer(lambda prompt, n: (200, f"Comparison: your key is {KEY}.\nMore helpful: A"))
    try:
        judge.win_rate(samples(3), api(s), str(tmp_path))
        ev.main(["--win-rate", str(write_samples(tmp_path / "s.jsonl", samples(2))), "--judge-url", s.url,
                 "--judge-model", "judge-model", "--out", str(tmp_path / "cli")])
        assert {r["headers"]["Authorization"] for r in s.requests} == {f"Bearer {KEY}"}
    finally:
        s.close()
    captured = capsys.readouterr()
    assert KEY not in captured.out + captured.err
    assert read_jsonl(tmp_path / "judgments.jsonl")[0]["reply"] == "Comparison: your key is ***.\nMore helpful: A"
    for root, _, files in os.walk(tmp_path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                assert KEY.encode() not in f.read(), name
    assert KEY not in repr(api(s)) and KEY not in api(s).description


def test_key_missing_is_one_line(monkeypatch, tmp_path):
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(InputError, match="OPENAI_API_KEY is not set") as e:
        judge.ApiJudge("https://api.example.invalid/v1", "judge-model")
    assert "\n" not in str(e.value)
    s = FakeServer()  # a server on localhost needs no key: no Authorization header
    try:
        judge.win_rate(samples(2), api(s), str(tmp_path), log=quiet)
        assert all("Authorization" not in r["headers"] for r in s.requests) and len(s.requests) == 2
    finally:
        s.close()


# ---- bad input and failing servers: one line, before or at the first call, the cache intact

def write_samples(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bad_input_samples_name_file_and_line(server, tmp_path):
    rows = samples(3)
    del rows[1]["baseline"]
    path = write_samples(tmp_path / "s.jsonl", rows)
    with pytest.raises(InputError, match=f'{path}:2: missing "baseline"'):
        judge.read_samples(str(path))
    path.write_text('{"prompt": "p", "response": "r", "baseline": "b"}\n{"prompt": 3}\n')
    with pytest.raises(InputError, match=f'{path}:2: "prompt" is a number'):
        judge.read_samples(str(path))
    path.write_text('{"prompt": "p", "response": "r", "baseline": "b"}\nnot json\n')
    with pytest.raises(InputError, match=f"{path}:2: invalid JSON"):
        judge.main(judge.JudgeConfig(str(path), str(tmp_path / "out"), model="judge-model", url=server.url))
    assert server.requests == []


def test_bad_input_through_the_cli_exits_2_with_one_line(server, tmp_path, capsys):
    rows = samples(3)
    del rows[2]["response"]
    path = write_samples(tmp_path / "s.jsonl", rows)
    argv = ["--win-rate", str(path), "--judge-url", server.url, "--judge-model", "judge-model", "--out", str(tmp_path / "o")]
    assert ev.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and f"{path}:3" in err[0]
    assert ev.main(argv[:-2]) == 2 and "--out DIR" in capsys.readouterr().err
    assert ev.main(argv + ["--judge-prompt", "poetry"]) == 2 and "--judge-prompt poetry" in capsys.readouterr().err
    assert server.requests == []
    write_samples(path, samples(3))
    assert ev.main(argv) == 0 and len(server.requests) == 3
    assert "win rate 1.000 ± 0.000 (n 3, invalid 0)" in capsys.readouterr().out.splitlines()


def closed_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_or_refused_stops_at_the_first_call(tmp_path, server):
    """A closed port and a 401 each stop the run at the first call with one line (no retries), and the cache
    of an earlier run is kept as it was."""
    judge.win_rate(samples(2), api(server), str(tmp_path), log=quiet)
    cache = (tmp_path / judge.CACHE_FILE).read_text()
    t0 = time.time()
    with pytest.raises(judge.JudgeError, match="cannot reach") as e:
        judge.win_rate(samples(6), judge.ApiJudge(f"http://127.0.0.1:{closed_port()}/v1", "m", backoff=1.0),
                       str(tmp_path), log=quiet)
    assert time.time() - t0 < 5 and "\n" not in str(e.value)
    s = FakeServer(lambda prompt, n: (401, f"Incorrect API key provided: {KEY}"))
    try:
        with pytest.raises(judge.JudgeError, match="HTTP 401") as e:
            judge.win_rate(samples(6), api(s), str(tmp_path), log=quiet)
        assert len(s.requests) == 1 and "\n" not in str(e.value) and KEY not in str(e.value)
    finally:
        s.close()
    assert (tmp_path / judge.CACHE_FILE).read_text() == cache


# ---- the reward-model judge

def test_rm_judge_trains_saves_and_compares_by_its_scores(tmp_path):
    """A tiny reward model (random:1,2,32) fitted in seconds on pairs whose chosen says "great"; it is saved with
    its held-out accuracy and reloaded; its verdict is A exactly when it scores a above b (ties: None)."""
    rng = random.Random(0)
    words = ["the film", "a movie", "this one", "the plot", "my evening"]
    pairs = [{"prompt": rng.choice(words), "chosen": " was great great great", "rejected": " was awful"}
             for _ in range(20)]
    acc = judge.train_rm_judge(pairs, str(tmp_path / "rm"), base_model="random:1,2,32", epochs=20, lr=3e-2,
                               batch_size=8, log=quiet)
    saved = json.loads((tmp_path / "rm" / "accuracy.json").read_text())
    assert saved == acc and acc["n"] == 2 and acc["heldout_accuracy"] == 1.0
    rm = judge.RewardModelJudge(str(tmp_path / "rm"))
    items = [("the film", " was great great great", " was awful"), ("the film", " was awful", " was great great great"),
             ("a movie", " ok", " ok")]
    scores_a = rm.score([q for q, _, _ in items], [a for _, a, _ in items])
    scores_b = rm.score([q for q, _, _ in items], [b for _, _, b in items])
    verdicts = rm.compare(items)
    assert [v["winner"] for v in verdicts] == ["A" if sa > sb else "B" if sb > sa else None
                                               for sa, sb in zip(scores_a.tolist(), scores_b.tolist())]
    assert [v["winner"] for v in verdicts] == ["A", "B", None]
    rows = [{"prompt": "the film", "response": " was great great great", "baseline": " was awful"}] * 3
    result = judge.win_rate(rows, rm, str(tmp_path / "wr"), log=quiet)
    assert result["win_rate"] == 1.0 and "reward model" in result["judge"]


def test_rm_judge_folder_errors_are_one_line(tmp_path):
    with pytest.raises(InputError, match="no head.pt"):
        judge.RewardModelJudge(str(tmp_path))
