"""Backend ops, ggml-style: every backend's expert FFN (moe_layer_ffn, and
the layer executor's kernel and mapped paths) against the reference. The
CPU backend is checked against a float64 torch computation; the CUDA
backend against the CPU backend on the same random inputs, at several token
counts, top-k and shapes.

Tolerance: outputs are bfloat16/float16 computed with float32 accumulation,
so each is within a few units in the last place of the exact value; we allow
1.5e-2 relative to the output's scale (two bf16 ulps) plus 1e-3 absolute.
"""

from __future__ import annotations

import pytest
import torch

import moe_infinity as mi
from moe_infinity import _native

RTOL = 1.5e-2


def _experts(E: int, H: int, I: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    gate_up = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(dtype)
    down = (torch.randn(E, H, I, generator=g) / I**0.5).to(dtype)
    return gate_up, down


def _engine(backend: str, gate_up: torch.Tensor, down: torch.Tensor, executor: bool = False) -> mi.Engine:
    """An engine over one layer of experts. ``executor``: its layer executor
    may run the kernel paths (SwiGLU experts; on the CPU backend its
    reference FFN and mapped mode stand in for the CUDA ones)."""
    opts = {"reference_kernels": True} if executor and backend == "cpu" else {}
    eng = mi.Engine(budget_bytes=1 << 34, backend=backend, prefetch=False, **opts)
    eng.add_host_tensor("model.layers.0.mlp.experts.gate_up_proj", gate_up)
    eng.add_host_tensor("model.layers.0.mlp.experts.down_proj", down)
    dt = str(gate_up.dtype).removeprefix("torch.")
    eng.configure(
        {"regions": [{"name": "gate_up_proj", "parts": ["gate_up_proj"], "dtype": dt}, {"name": "down_proj", "parts": ["down_proj"], "dtype": dt}]},
        ffn="swiglu" if executor else None,
    )
    return eng


def _routing(T: int, K: int, E: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.softmax(torch.randn(T, K, generator=g), dim=-1)
    return idx, w


def _run(eng: mi.Engine, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, stream: int = 0) -> torch.Tensor:
    T, K = idx.shape
    needed = torch.unique(idx).tolist()
    dev = x.device
    topk = idx.to(torch.int64).contiguous().to(dev)
    weights = w.to(torch.float32).contiguous().to(dev)
    _, inter, code = eng.ffn_shape()
    out = torch.empty_like(x)
    scratch = torch.empty((T * K, inter), dtype=torch.float32, device=dev)
    eng.layer_ffn(
        0, needed, stream=stream, x=x.data_ptr(), out=out.data_ptr(), scratch=scratch.data_ptr(),
        topk=topk.data_ptr(), weights=weights.data_ptr(), tokens=T, k=K, dtype=code,
    )
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return out


def _reference(x, idx, w, gate_up, down):
    """float64 ground truth."""
    I = down.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        xt = x[t].double()
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            gu = gate_up[e].double() @ xt
            h = torch.nn.functional.silu(gu[:I]) * gu[I:]
            out[t] += float(w[t, j]) * (down[e].double() @ h)
    return out


def _close(got: torch.Tensor, want: torch.Tensor):
    got, want = got.double().cpu(), want.double().cpu()
    scale = want.abs().max().item()
    err = (got - want).abs().max().item()
    assert err <= RTOL * scale + 1e-3, f"max abs error {err:.3g} for output scale {scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("T,K,E,H,I", [(1, 2, 8, 64, 32), (3, 2, 8, 72, 40), (8, 4, 16, 100, 48), (16, 1, 4, 64, 64)])
def test_cpu_ffn_matches_float64_reference(dtype, T, K, E, H, I):
    gate_up, down = _experts(E, H, I, dtype, seed=T * 100 + K)
    idx, w = _routing(T, K, E, seed=T)
    x = (torch.randn(T, H, generator=torch.Generator().manual_seed(5))).to(dtype)
    with _engine("cpu", gate_up, down) as eng:
        got = _run(eng, x, idx, w)
    _close(got, _reference(x, idx, w, gate_up, down))


def test_ffn_rejects_layouts_it_cannot_compute():
    gate_up, down = _experts(2, 16, 8, torch.float32, seed=0)
    with _engine("cpu", gate_up, down) as eng, pytest.raises(mi.UnsupportedError, match="bfloat16 or float16"):
        eng.ffn_shape()


needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or not _native.cuda_usable(),
    reason="needs a CUDA GPU (runs on the H100 machine through scripts/gpu_check.sh)",
)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize(
    "T,K,E,H,I",
    [
        (1, 2, 8, 512, 256), (1, 8, 64, 2048, 768), (2, 2, 8, 4096, 1024), (4, 8, 128, 1024, 384), (8, 2, 8, 100, 72),
        (16, 4, 32, 1536, 512), (1, 1, 1, 256, 128), (32, 8, 128, 512, 256), (64, 8, 128, 256, 128), (64, 2, 4, 128, 64),
    ],
)
def test_cuda_ffn_matches_cpu_reference(dtype, T, K, E, H, I):
    assert _native.variant() == "cuda", f"the CUDA build must be loaded, got {_native.library_path()}"
    gate_up, down = _experts(E, H, I, dtype, seed=T * 7 + K)
    idx, w = _routing(T, K, E, seed=T + 1)
    x = (torch.randn(T, H, generator=torch.Generator().manual_seed(6))).to(dtype)
    with _engine("cpu", gate_up, down) as cpu:
        want = _run(cpu, x, idx, w)
    with _engine("cuda", gate_up, down) as gpu:
        got = _run(gpu, x.cuda(), idx, w, stream=torch.cuda.current_stream().cuda_stream)
    _close(got, want)
    if T == 1 and H <= 512:
        _close(got, _reference(x, idx, w, gate_up, down))


_WCODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _run_layer(eng: mi.Engine, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, reqs: list[int], *, flags: int, host_routing: bool, stream: int = 0) -> tuple[torch.Tensor, int]:
    """One call of the engine's layer executor (moe_layer); returns the
    output and the path the engine took. ``host_routing``: the routing is
    handed over in host memory too (without it only the kernels' copy, on
    the device for CUDA, is passed: the mapped path or MOE_PATH_NEED_ROUTING)."""
    import ctypes

    T, K = idx.shape
    dev = x.device
    topk = idx.to(torch.int64).contiguous().to(dev)
    topk_host = idx.to(torch.int64).contiguous()
    weights = w.contiguous().to(dev)
    _, inter, code = eng.ffn_shape()
    out = torch.empty_like(x)
    scratch = torch.empty((T * K, inter), dtype=torch.float32, device=dev)
    ids = (ctypes.c_uint64 * max(1, len(reqs)))(*reqs)
    experts = (ctypes.c_int32 * eng.plan["num_experts"])()
    a = _native.LayerArgs(
        layer=0, nreq=len(reqs), reqs=ctypes.cast(ids, ctypes.POINTER(ctypes.c_uint64)), stream=stream,
        x=x.data_ptr(), out=out.data_ptr(), scratch=scratch.data_ptr(), topk=topk.data_ptr(), weights=weights.data_ptr(),
        tokens=T, k=K, dtype=code, weights_dtype=_WCODES[weights.dtype], flags=flags,
        experts_cap=len(experts), experts=ctypes.cast(experts, ctypes.POINTER(ctypes.c_int32)),
    )
    if host_routing:
        a.topk_host = ctypes.cast(ctypes.c_void_p(topk_host.data_ptr()), ctypes.POINTER(ctypes.c_int64))
    path = eng.layer(a)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return out, path


def test_executor_kernel_path_traces_and_computes_like_layer_ffn():
    """The executor's kernel path (host routing, mapped mode off): the
    routing of both requests is traced and the output is moe_layer_ffn's."""
    dtype, T, K, E, H, I = torch.bfloat16, 4, 2, 8, 64, 32
    gate_up, down = _experts(E, H, I, dtype, seed=3)
    idx, w = _routing(T, K, E, seed=9)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(1)).to(dtype)
    with _engine("cpu", gate_up, down, executor=True) as eng:
        want = _run(eng, x, idx, w)
        reqs = [eng.begin_request(), eng.begin_request()]
        out, path = _run_layer(eng, x, idx, w.to(torch.float32), reqs, flags=_native.LAYER_NO_MAPPED, host_routing=True)
        assert path == _native.PATH_KERNELS
        assert torch.equal(out, want)
        for r in reqs:
            eng.end_request(r)
        st = eng.stats()
        assert st["eamc_size"] == 2, "both requests' routing was traced"
        assert st["paths"]["kernels"] == 1
        bad = torch.full((T, K), E, dtype=torch.int64)
        with pytest.raises(mi.InvalidArgumentError, match="routes to expert 8, out of range"):
            _run_layer(eng, x, bad, w.to(torch.float32), [], flags=_native.LAYER_NO_MAPPED, host_routing=True)


def _run_mapped(eng: mi.Engine, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, reqs: list[int], stream: int = 0) -> torch.Tensor:
    """One executor call that the engine runs mapped (no host
    synchronisation inside: the routing is not handed over on the host)."""
    out, path = _run_layer(eng, x, idx, w, reqs, flags=0, host_routing=False, stream=stream)
    assert path == _native.PATH_MAPPED, f"the executor took path {path}, not mapped"
    return out


def _backends():
    gpu = pytest.param("cuda", marks=[pytest.mark.gpu, needs_gpu])
    return ["cpu", gpu]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("T,K,E,H,I", [(1, 2, 8, 256, 128), (4, 8, 64, 512, 192), (16, 2, 8, 128, 64)])
def test_mapped_mode_matches_layer_ffn_cold_and_warm(backend, T, K, E, H, I):
    """Mapped mode reads missing experts from host memory in place and
    resident ones from their slots: both give exactly the slot path's
    output; bfloat16 routing weights are read as they are."""
    dtype = torch.bfloat16
    gate_up, down = _experts(E, H, I, dtype, seed=11)
    idx, w = _routing(T, K, E, seed=12)
    w = w.to(torch.bfloat16)  # the router's dtype; exact in float32 too
    dev = torch.device("cuda" if backend == "cuda" else "cpu")
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(13)).to(dtype).to(dev)
    stream = torch.cuda.current_stream().cuda_stream if backend == "cuda" else 0
    with _engine(backend, gate_up, down) as ref:
        want = _run(ref, x, idx, w.float(), stream=stream)
    with _engine(backend, gate_up, down, executor=True) as eng:
        req = eng.begin_request()
        cold = _run_mapped(eng, x, idx, w, [req], stream=stream)
        assert torch.equal(cold, want), "experts read from host memory"
        st = eng.stats()  # waits for the tracer
        distinct = len(torch.unique(idx))
        assert (st["hits"], st["misses"]) == (0, distinct)
        for _ in range(200):  # admissions copy the missed experts in
            if eng.stats()["resident"] == distinct:
                break
            import time

            time.sleep(0.01)
        warm = _run_mapped(eng, x, idx, w, [req], stream=stream)
        assert torch.equal(warm, want), "experts read from their slots"
        assert eng.stats()["hits"] == distinct
        eng.end_request(req)
        assert eng.stats()["eamc_size"] == 1, "the request's routing was traced"


def test_mapped_mode_reports_bad_routing():
    gate_up, down = _experts(4, 64, 32, torch.bfloat16, seed=1)
    x = torch.randn(1, 64).to(torch.bfloat16)
    with _engine("cpu", gate_up, down, executor=True) as eng:
        bad = torch.tensor([[1, 7]])
        req = eng.begin_request()
        out = _run_mapped(eng, x, bad, torch.full((1, 2), 0.5), [req])  # expert 7 skipped, as on a GPU
        with pytest.raises(mi.InvalidArgumentError, match="routes to expert 7, out of range"):
            eng.end_request(req)
        ok = _run_mapped(eng, x, torch.tensor([[1]]), torch.full((1, 1), 0.5), [])
        assert torch.equal(out, ok), "the bad call computed its valid pair alone"
