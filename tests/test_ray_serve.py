"""Ray Serve replicas (moe_infinity.serving.ray): a local Ray instance,
two CPU replicas of the built-in model behind Ray's HTTP proxy on
127.0.0.1, requests through the proxy with the openai client, and a clean
shutdown that saves both replicas' traces into one file."""

from __future__ import annotations

import asyncio
import os
import socket
import time

import openai
import pytest
import torch

import moe_infinity as mi
from moe_infinity.serving.server import load_model

PROMPTS = ["The cat sat on the", "Once upon a time there was", "In 1900,", "She said that", "The river", "A good"]


def _free_port() -> int:
    """A free port for Ray's HTTP proxy, outside the ranges Ray's own
    processes take ports from after it is chosen: the kernel's ephemeral
    range (from 32768; bind(0) would pick there, and a Ray worker did take
    such a port first once) and Ray's worker ports (10002-19999)."""
    import random

    for port in random.Random().sample(range(20000, 32768), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32767")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Serve's own pydantic v1-style fields
def test_two_replicas_behind_rays_proxy_answer_and_shut_down_cleanly(tmp_path, monkeypatch):
    import ray  # in the test extra: a missing Ray fails here rather than skipping
    from ray import serve

    from moe_infinity.serving.ray import deployment

    # Replicas inherit the driver's environment: this checkout and its engine.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    trace = tmp_path / "trace.bin"
    # The reference: generate alone, here, with the same settings.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tok = load_model(None, device="cpu", device_memory="6MiB")
    want = {}
    try:
        for p in PROMPTS:
            ids = tok(p)["input_ids"]
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=16, do_sample=False)
            toks = out[0, len(ids) :].tolist()
            eos = model.generation_config.eos_token_id
            want[p] = toks[: toks.index(eos) + 1] if eos in toks else toks
    finally:
        model.close()
        torch.set_num_threads(threads)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k in ("PYTHONPATH", "MOE_INFINITY_LIB")}})
    try:
        port = _free_port()  # chosen once Ray's processes hold theirs
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = deployment(num_replicas=2, num_cpus=0.5, device="cpu", device_memory="6MiB", trace_path=str(trace), torch_threads=1, max_batch=4, max_queue=8)
        serve.run(app, name="moe", route_prefix="/")
        st = serve.status().applications["moe"]
        assert st.status == "RUNNING"
        (dep,) = st.deployments.values()
        assert dep.replica_states == {"RUNNING": 2}

        url = f"http://127.0.0.1:{port}"

        async def ask() -> list[tuple[str, list[int], str]]:
            c = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)

            async def one(p: str, stream: bool) -> tuple[str, list[int], str]:
                if not stream:
                    r = await c.completions.create(model="builtin", prompt=p, max_tokens=16, temperature=0, extra_body={"return_token_ids": True})
                    return p, r.choices[0].model_extra["token_ids"], r.choices[0].text
                ids, text = [], ""
                async for chunk in await c.completions.create(model="builtin", prompt=p, max_tokens=16, temperature=0, stream=True, extra_body={"return_token_ids": True}):
                    for ch in chunk.choices:
                        ids += ch.model_extra["token_ids"]
                        text += ch.text
                return p, ids, text

            return await asyncio.gather(*(one(p, i % 2 == 1) for i, p in enumerate(PROMPTS * 2)))

        got = asyncio.run(ask())
        for p, ids, text in got:
            assert ids == want[p], p
            assert text == tok.decode(want[p], skip_special_tokens=True)
        models = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0).models.list()
        assert [m.id for m in models.data] == ["builtin"]
        with pytest.raises(openai.BadRequestError, match="unknown field"):
            openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0).completions.create(model="builtin", prompt="x", extra_body={"nope": 1})
        start = time.monotonic()
        serve.shutdown()
        print(f"\nray serve: 2 replicas answered {len(got)} requests; shutdown took {time.monotonic() - start:.1f} s")
    finally:
        ray.shutdown()
    # Each replica's shutdown closed its model, which merged its activation
    # matrices into the shared trace file.
    assert trace.exists()
    m = mi.from_pretrained(mi.builtin_model_path(), device="cpu", device_memory="6MiB", trace_path=trace)
    try:
        assert m.moe_stats()["eamc_size"] > 0
    finally:
        m.close()


def test_a_bad_batching_mode_is_refused_before_ray_starts():
    from moe_infinity.serving.ray import deployment

    with pytest.raises(mi.InvalidArgumentError, match=r"batching must be 'auto', 'stacked' or 'threads' \(got 'stack'\)"):
        deployment(batching="stack")
