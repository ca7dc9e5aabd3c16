"""The OpenAI-compatible server (`python -m moe_infinity serve`), run as a
subprocess on 127.0.0.1 with the built-in model on the CPU, driven by the
real `openai` client: greedy answers equal `model.generate` alone, batched
or not; streaming, stop strings, cancellation, bad requests, a burst past
the queue bound, metrics, a soak, and SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import moe_infinity as mi
from moe_infinity.serving.server import DEFAULT_CHAT_TEMPLATE, load_model
from moe_infinity.serving.text import Detokenizer, StopStrings

try:  # the HTTP client the openai package is built on (httpx2 from openai 3)
    import httpx2 as httpx
except ImportError:
    import httpx

PROMPTS = ["The cat sat on the", "Once upon a time there was", "In 1900,", "She said that", "The river", "A good", "Tomorrow we will", "Hello"]
#: Seconds the soak runs (CI: about a minute; MOE_INFINITY_SOAK_S for longer).
SOAK_S = float(os.environ.get("MOE_INFINITY_SOAK_S", "60"))


# -- the server process ----------------------------------------------------------


class Server:
    """`python -m moe_infinity serve` in a subprocess."""

    def __init__(self, tmp: Path, *args: str):
        self.log = tmp / "server.err"
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "moe_infinity", "serve", "--device", "cpu", "--device-memory", "6MiB", "--port", "0", "--threads", "1", *args]
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        deadline = time.monotonic() + 180
        self.url = ""
        while time.monotonic() < deadline and self.proc.poll() is None:
            for line in self.stderr().splitlines():
                if line.startswith("moe-infinity: serving builtin on "):
                    self.url = line.split(" on ", 1)[1].split()[0]
            if self.url:
                break
            time.sleep(0.1)
        assert self.url, f"the server did not start:\n{self.stderr()}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=120)

    def aclient(self) -> openai.AsyncOpenAI:
        """An async client (one per event loop: its connections belong to it)."""
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=300)

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", timeout=30).text
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                key = s.name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items())) + "}" if s.labels else "")
                out[key] = s.value
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server")
    s = Server(tmp, "--max-batch", "16", "--max-queue", "16", "--trace", str(tmp / "trace.bin"), "--shutdown-timeout", "60")
    s.trace = tmp / "trace.bin"
    yield s
    s.stop()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Two places in the batch, two in the queue, a short shutdown timeout;
    batching in threads (the module's other server stacks its steps, the
    default for the built-in model)."""
    tmp = tmp_path_factory.mktemp("small")
    s = Server(tmp, "--max-batch", "2", "--max-queue", "2", "--shutdown-timeout", "3", "--batching", "threads")
    yield s
    s.stop()


# -- the reference: generate alone in this process ---------------------------------


@pytest.fixture(scope="module")
def ref():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tok = load_model(None, device="cpu", device_memory="6MiB")

    def alone(ids: list[int], n: int) -> list[int]:
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=n, do_sample=False)
        toks = out[0, len(ids) :].tolist()
        eos = model.generation_config.eos_token_id
        return toks[: toks.index(eos) + 1] if eos in toks else toks

    def chat_ids(messages: list[dict]) -> list[int]:
        text = tok.apply_chat_template(messages, chat_template=DEFAULT_CHAT_TEMPLATE, add_generation_prompt=True, tokenize=False)
        return tok(text, add_special_tokens=False)["input_ids"]

    yield type("Ref", (), {"tok": tok, "alone": staticmethod(alone), "chat_ids": staticmethod(chat_ids), "eos": model.generation_config.eos_token_id})
    model.close()
    torch.set_num_threads(threads)


def _text(ref, ids: list[int]) -> str:
    return ref.tok.decode(ids, skip_special_tokens=True)


def _finish(ref, ids: list[int]) -> str:
    return "stop" if ids and ids[-1] == ref.eos else "length"


# -- text: detokenizing and stop strings (no server) --------------------------------


def test_detokenizer_never_splits_a_character_and_matches_decode(ref):
    text = "héllo 日本語 🎉 naïve x"
    ids = ref.tok(text)["input_ids"]
    d = Detokenizer(ref.tok)
    parts = [d.add(t) for t in ids] + [d.flush()]
    assert "".join(parts) == ref.tok.decode(ids)
    assert all("\ufffd" not in p for p in parts), parts
    assert sum(1 for p in parts if p == "") > 0, "multi-byte characters span tokens and are held back"


def test_stop_strings_are_never_sent_even_in_part():
    rng = random.Random(0)
    text = "one two three, four five; six"
    for stops, want in ((["three"], "one two "), ([";", "four"], "one two three, "), (["zzz"], text), (["e"], "on")):
        for _ in range(20):
            cuts = sorted(rng.sample(range(1, len(text)), 6))
            pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
            s = StopStrings(stops)
            out = ""
            for p in pieces:
                out += s.push(p)
                assert not any(x in out for x in stops)
                if s.stopped:
                    break
            out += s.flush()
            assert out == want and s.stopped == (want != text)


# -- the OpenAI client ------------------------------------------------------------------


def test_openai_client_sync_and_async_get_the_greedy_tokens(server, ref):
    c = server.client
    assert [m.id for m in c.models.list().data] == ["builtin"]
    for prompt in PROMPTS[:3]:
        ids = ref.tok(prompt)["input_ids"]
        want = ref.alone(ids, 24)
        # Sync, not streaming.
        r = c.completions.create(model="builtin", prompt=prompt, max_tokens=24, temperature=0, extra_body={"return_token_ids": True})
        ch = r.choices[0]
        assert ch.model_extra["token_ids"] == want
        assert r.model_extra["prompt_token_ids"] == ids
        assert ch.text == _text(ref, want) and ch.finish_reason == _finish(ref, want)
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), len(want), len(ids) + len(want))
        # Sync, streaming: the chunks' text and token ids add up to the same.
        got_ids, got_text, reasons = [], "", []
        for chunk in c.completions.create(model="builtin", prompt=prompt, max_tokens=24, temperature=0, stream=True, extra_body={"return_token_ids": True}):
            for ch in chunk.choices:
                got_ids += ch.model_extra["token_ids"]
                got_text += ch.text
                reasons.append(ch.finish_reason)
        assert got_ids == want and got_text == _text(ref, want)
        assert reasons[-1] == _finish(ref, want) and set(reasons[:-1]) == {None}

    client = None

    async def chat(messages: list[dict], stream: bool) -> tuple[list[int], str, str, object]:
        a = client
        if not stream:
            r = await a.chat.completions.create(model="builtin", messages=messages, max_tokens=20, temperature=0, extra_body={"return_token_ids": True})
            return r.choices[0].model_extra["token_ids"], r.choices[0].message.content, r.choices[0].finish_reason, r.usage
        ids, text, reason, usage, roles = [], "", None, None, []
        s = await a.chat.completions.create(
            model="builtin", messages=messages, max_tokens=20, temperature=0, stream=True, stream_options={"include_usage": True}, extra_body={"return_token_ids": True}
        )
        async for chunk in s:
            if chunk.usage is not None:
                usage = chunk.usage
            for ch in chunk.choices:
                ids += ch.model_extra.get("token_ids") or []
                text += ch.delta.content or ""
                roles.append(ch.delta.role)
                reason = ch.finish_reason or reason
        assert roles[0] == "assistant"
        return ids, text, reason, usage

    async def both() -> None:
        nonlocal client
        client = server.aclient()
        for q in ("Hello", "What is a river?"):
            messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": q}]
            pids = ref.chat_ids(messages)
            want = ref.alone(pids, 20)
            for stream in (False, True):
                ids, text, reason, usage = await chat(messages, stream)
                assert ids == want and text == _text(ref, want) and reason == _finish(ref, want), (q, stream)
                assert (usage.prompt_tokens, usage.completion_tokens) == (len(pids), len(want))

    asyncio.run(both())


def test_sixteen_concurrent_streams_each_get_their_alone_tokens(server, ref):
    prompts = [f"{p} {w}" for p in PROMPTS for w in ("and", "but")]
    assert len(prompts) == 16
    before = server.metrics()

    async def one(c: openai.AsyncOpenAI, prompt: str) -> tuple[list[int], str]:
        ids, text = [], ""
        s = await c.completions.create(model="builtin", prompt=prompt, max_tokens=24, temperature=0, stream=True, extra_body={"return_token_ids": True})
        async for chunk in s:
            for ch in chunk.choices:
                ids += ch.model_extra["token_ids"]
                text += ch.text
        return ids, text

    async def run() -> list[tuple[list[int], str]]:
        c = server.aclient()
        return await asyncio.gather(*(one(c, p) for p in prompts))

    got = asyncio.run(run())
    for p, (ids, text) in zip(prompts, got):
        want = ref.alone(ref.tok(p)["input_ids"], 24)
        assert ids == want and text == _text(ref, want), p
    after = server.metrics()
    assert after["moe_infinity_batch_size_max"] >= 2, "the streams decoded together"
    assert after["moe_infinity_batch_steps_total"] - before["moe_infinity_batch_steps_total"] < sum(len(i) for i, _ in got)
    assert after["moe_infinity_generation_tokens_total"] - before["moe_infinity_generation_tokens_total"] == sum(len(i) for i, _ in got)


def test_stop_strings_end_the_request_before_the_stop_text(server, ref):
    prompt = PROMPTS[0]
    want = ref.alone(ref.tok(prompt)["input_ids"], 24)
    full = _text(ref, want)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), full
    expect = full[: full.index(stop)]
    r = server.client.completions.create(model="builtin", prompt=prompt, max_tokens=24, temperature=0, stop=[stop, "\u2603"])
    assert r.choices[0].text == expect and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < len(want)
    text, reasons = "", []
    for chunk in server.client.completions.create(model="builtin", prompt=prompt, max_tokens=24, temperature=0, stop=stop, stream=True):
        text += chunk.choices[0].text
        reasons.append(chunk.choices[0].finish_reason)
    assert text == expect and reasons[-1] == "stop"


def test_seeded_sampling_repeats(server):
    kw = dict(model="builtin", prompt="Once upon a time", max_tokens=12, temperature=0.9, top_p=0.9, seed=7)
    a = server.client.completions.create(**kw).choices[0].text
    b = server.client.completions.create(**kw).choices[0].text
    assert a == b and a


def _wait(cond, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_closing_a_stream_cancels_the_request(server):
    before = server.metrics().get('moe_infinity_requests_finished_total{finish_reason="cancelled"}', 0)
    s = server.client.completions.create(model="builtin", prompt="Hello", max_tokens=900, temperature=0, stream=True, extra_body={"ignore_eos": True})
    it = iter(s)
    for _ in range(3):
        next(it)
    assert server.metrics()["moe_infinity_requests_running"] == 1
    s.close()
    assert _wait(lambda: server.metrics()["moe_infinity_requests_running"] == 0), "the batch place was freed"
    m = server.metrics()
    assert m['moe_infinity_requests_finished_total{finish_reason="cancelled"}'] == before + 1
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert server.client.completions.create(model="builtin", prompt="Hello", max_tokens=2, temperature=0).usage.completion_tokens == 2


def _error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def test_bad_requests_get_openai_errors(server):
    post = lambda path, **kw: httpx.post(server.url + path, timeout=30, **kw)  # noqa: E731
    e = _error(post("/v1/completions", content=b'{"model": "builtin", "prompt": ', headers={"content-type": "application/json"}), 400)
    assert "not valid JSON" in e["message"] and e["type"] == "invalid_request_error"
    _error(post("/v1/completions", content=b"[1, 2]", headers={"content-type": "application/json"}), 400)
    e = _error(post("/v1/completions", json={"model": "builtin", "prompt": "x", "best_of": 3}), 400)
    assert e["param"] == "best_of" and "unknown field" in e["message"]
    e = _error(post("/v1/chat/completions", json={"model": "builtin", "messages": [{"role": "user", "content": "x", "extra": 1}]}), 400)
    assert e["param"] == "messages.0.extra"
    e = _error(post("/v1/chat/completions", json={"model": "builtin"}), 400)
    assert e["param"] == "messages" and "missing" in e["message"]
    assert _error(post("/v1/completions", json={"model": "builtin", "prompt": "x", "n": 2}), 400)["param"] == "n"
    assert _error(post("/v1/completions", json={"model": "builtin", "prompt": "x", "temperature": 3}), 400)["param"] == "temperature"
    assert _error(post("/v1/completions", json={"model": "builtin", "prompt": [1, 99999]}), 400)["param"] == "prompt"
    assert _error(post("/v1/completions", json={"model": "gpt-4", "prompt": "x"}), 404)["code"] == "model_not_found"
    _error(httpx.get(server.url + "/v1/nothing"), 404)
    # A prompt past the context: 400, saying by how much.
    long = " ".join(["word"] * 1100)
    e = _error(post("/v1/completions", json={"model": "builtin", "prompt": long, "max_tokens": 10}), 400)
    assert "context is 1024 tokens" in e["message"] and "too many" in e["message"] and e["param"] == "prompt", e
    with pytest.raises(openai.BadRequestError, match="too many"):
        server.client.chat.completions.create(model="builtin", messages=[{"role": "user", "content": long}])
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_metrics_are_prometheus_text(server):
    m = server.metrics()
    for name in (
        "moe_infinity_requests_total",
        "moe_infinity_requests_running",
        "moe_infinity_requests_waiting",
        "moe_infinity_generation_tokens_total",
        "moe_infinity_batch_size_mean",
        "moe_infinity_expert_cache_hit_rate",
        "moe_infinity_expert_bytes_moved_total",
        "moe_infinity_expert_stall_seconds_total",
        "moe_infinity_time_to_first_token_seconds_count",
    ):
        assert name in m, name
    assert 0 <= m["moe_infinity_expert_cache_hit_rate"] <= 1 and m["moe_infinity_expert_bytes_moved_total"] > 0
    assert m['moe_infinity_http_responses_total{code="200",path="/v1/completions"}'] >= 1


def test_each_server_says_how_it_batches(server, small):
    assert "max batch 16 stacked, queue 16)" in server.stderr()
    assert "max batch 2 threads, queue 2)" in small.stderr()


def test_burst_past_the_queue_bound_gets_429s_and_answers(small):
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=small.url, timeout=300, limits=httpx.Limits(max_connections=64)) as c:
            body = lambda i: {"model": "builtin", "prompt": PROMPTS[i % 8], "max_tokens": 16, "temperature": 0}  # noqa: E731
            tasks = [c.post("/v1/completions", json=body(i)) for i in range(24)]
            health = [c.get("/health") for _ in range(3)]
            return await asyncio.gather(*tasks, *health)

    out = asyncio.run(burst())
    answers, health = out[:24], out[24:]
    codes = [r.status_code for r in answers]
    assert set(codes) <= {200, 429} and codes.count(429) > 0 and codes.count(200) >= 4, codes
    for r in answers:
        if r.status_code == 200:
            assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
        else:
            e = _error(r, 429)
            assert e["type"] == "rate_limit_error" and "max_queue=2" in e["message"]
    assert all(h.status_code == 200 for h in health)
    assert httpx.get(small.url + "/health").json() == {"status": "ok", "running": 0, "queued": 0}
    assert small.metrics()["moe_infinity_requests_rejected_total"] == codes.count(429)


def test_sigterm_cancels_what_outlasts_the_timeout_and_exits_0(small):
    got: list[str] = []

    async def long() -> None:
        async with httpx.AsyncClient(base_url=small.url, timeout=120) as c:
            async with c.stream("POST", "/v1/completions", json={"model": "builtin", "prompt": "Hello", "max_tokens": 1000, "ignore_eos": True, "stream": True}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        got.append(line[6:])
                        if len(got) == 3:
                            small.proc.send_signal(signal.SIGTERM)

    start = time.monotonic()
    asyncio.run(long())
    assert small.proc.wait(30) == 0, small.stderr()
    took = time.monotonic() - start
    assert got[-1] == "[DONE]"
    err = json.loads(got[-2])["error"]
    assert err["type"] == "service_unavailable" and "cancelled" in err["message"], err
    assert took < 3 + 15, took
    assert "1 cancelled" in small.stderr() and "Traceback" not in small.stderr(), small.stderr()


def test_soak_mixed_requests_at_a_fixed_rate(server, ref):
    """Mixed requests (completions and chat, streaming or not, greedy or
    sampled, some with stop strings) at a fixed arrival rate; every one
    answers; latency percentiles are printed."""
    rate = 3.0  # requests per second
    n = max(1, int(SOAK_S * rate))
    rng = random.Random(1)
    lat: list[float] = []
    ttft: list[float] = []
    failures: list[str] = []

    async def one(c: openai.AsyncOpenAI, i: int) -> None:
        await asyncio.sleep(i / rate)
        kind = rng.choice(["completion", "chat"])
        stream = rng.random() < 0.5
        kw: dict = {"model": "builtin", "max_tokens": rng.randint(4, 32)}
        if rng.random() < 0.5:
            kw["temperature"] = 0
        else:
            kw.update(temperature=0.8, top_p=0.95, seed=i)
        if rng.random() < 0.2:
            kw["stop"] = ["\n"]
        p = rng.choice(PROMPTS)
        t0 = time.monotonic()
        try:
            if kind == "completion":
                r = await c.completions.create(prompt=p, stream=stream, **kw)
            else:
                r = await c.chat.completions.create(messages=[{"role": "user", "content": p}], stream=stream, **kw)
            if stream:
                first = None
                reason = None
                async for chunk in r:
                    first = first or time.monotonic()
                    for ch in chunk.choices:
                        reason = ch.finish_reason or reason
                ttft.append((first or time.monotonic()) - t0)
            else:
                reason = r.choices[0].finish_reason
            if reason not in ("stop", "length"):
                failures.append(f"request {i}: finish_reason {reason}")
        except Exception as e:  # noqa: BLE001 — every failure is reported
            failures.append(f"request {i}: {type(e).__name__}: {e}")
        lat.append(time.monotonic() - t0)

    async def run() -> None:
        c = server.aclient()
        await asyncio.gather(*(one(c, i) for i in range(n)))

    start = time.monotonic()
    asyncio.run(run())
    took = time.monotonic() - start
    q = lambda xs, p: statistics.quantiles(xs, n=100)[p - 1] if len(xs) >= 2 else (xs[0] if xs else 0.0)  # noqa: E731
    m = server.metrics()
    print(
        f"\nsoak: {n} requests at {rate}/s in {took:.1f} s; latency p50 {q(lat, 50):.3f} s, p90 {q(lat, 90):.3f} s, p99 {q(lat, 99):.3f} s; "
        f"time to first token (streams) p50 {q(ttft, 50):.3f} s, p99 {q(ttft, 99):.3f} s; mean batch {m['moe_infinity_batch_size_mean']:.2f}, "
        f"hit rate {m['moe_infinity_expert_cache_hit_rate']:.1%}"
    )
    assert not failures, failures[:5]
    assert len(lat) == n


def test_sigterm_after_load_finishes_running_requests_saves_the_trace_and_exits_0(server):
    m = server.metrics()
    # After all the load: nothing left running, queued or traced.
    assert m["moe_infinity_requests_running"] == 0 and m["moe_infinity_requests_waiting"] == 0
    assert m["moe_infinity_engine_active_requests"] == 0
    served = m["moe_infinity_requests_total"]
    lines: list[str] = []
    refused: list[int] = []

    async def run() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            async with c.stream("POST", "/v1/completions", json={"model": "builtin", "prompt": "Hello", "max_tokens": 120, "ignore_eos": True, "stream": True}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        lines.append(line[6:])
                        if len(lines) == 2:
                            server.proc.send_signal(signal.SIGTERM)
                            await asyncio.sleep(0.3)
                            refused.append((await c.post("/v1/completions", json={"model": "builtin", "prompt": "x"})).status_code)
                            refused.append((await c.get("/health")).status_code)

    start = time.monotonic()
    asyncio.run(run())
    assert server.proc.wait(60) == 0, server.stderr()
    assert time.monotonic() - start < 60
    assert refused == [503, 503], "draining: new requests and health get 503"
    assert lines[-1] == "[DONE]" and json.loads(lines[-2])["choices"][0]["finish_reason"] == "length", lines[-3:]
    assert "shut down:" in server.stderr() and "trace saved" in server.stderr()
    assert "Traceback" not in server.stderr(), "a client that went away is no server error"
    # The trace file loads back, with the requests' activation matrices.
    model = mi.from_pretrained(mi.builtin_model_path(), device="cpu", device_memory="6MiB", trace_path=server.trace)
    try:
        eams = model.moe_stats()["eamc_size"]
    finally:
        model.close()
    assert 0 < eams <= served + 1
