import time

import numpy as np
import pytest
import torch

pytest.importorskip("numba")

from flashmoe import quant
from flashmoe.formats.packed import RecordLayout
from flashmoe.kernels import cpu_experts
from flashmoe.kernels.cpu_experts import CpuExperts
from flashmoe.layers.mlp import SILU, Swiglu, swiglu_expert

from ..conftest import FAMILY_CONFIGS


def random_pool(layout: RecordLayout, slots: int, seed: int) -> torch.Tensor:
    """Random codes, and scales and biases that differ from group to group (reading another
    group's fails), sized so that outputs are O(1)."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.randint(0, 256, (slots, layout.record_size), dtype=torch.uint8, generator=g)
    levels = (1 << layout.bits) - 1
    for s in layout.segments:
        if s.name.endswith((".scales", ".biases")):
            k = s.shape[1] * layout.group_size  # the projection's input size
            v = torch.rand(slots, *s.shape, generator=g)
            v = (0.5 + v) / levels if s.name.endswith(".scales") else v - 0.5
            pool[:, s.offset : s.offset + s.nbytes] = (v / k**0.5).to(torch.bfloat16).view(slots, -1).view(torch.uint8)
    return pool


def reference(layout: RecordLayout, pool: torch.Tensor, slots: list[int], weights: list[float], x: torch.Tensor,
              act: Swiglu = SILU):
    """The definition the kernels are held to: each record dequantized, its biases if it has them, in
    fp32; where the kernels compute the layout by integer dot products, each projection's input as
    they quantize it (`int8_projection`)."""
    x = x.float()[None]
    if cpu_experts._kind(layout) != cpu_experts.INT8_DOTS:
        return sum(w * swiglu_expert(x, *layout.weights(pool[s], torch.float32), act, layout.biases(pool[s], torch.float32))[0]
                   for s, w in zip(slots, weights))
    out = 0
    for s, w in zip(slots, weights):
        biases = layout.biases(pool[s], torch.float32) or (0, 0)
        gate, up = (int8_projection(layout, pool[s], "gate_up_proj", x[0]) + biases[0]).chunk(2)
        out = out + w * (int8_projection(layout, pool[s], "down_proj", act(gate, up)) + biases[1])
    return out


def tolerance(layout: RecordLayout) -> float:
    """How close the kernels come to `reference` (relative error of a result): fp32 rounding of the
    sums (measured 1e-7 .. 5e-7); with integer dot products, an activation's fp32 rounding may also
    cross a rounding boundary of its quantization, one fine step of 1/32258 of its group's largest
    magnitude (measured up to 4e-5 on these random records, whose outputs cancel)."""
    return 1e-4 if cpu_experts._kind(layout) == cpu_experts.INT8_DOTS else 1e-5


def int8_input(x: torch.Tensor, group: int) -> torch.Tensor:
    """x as INT8_DOTS kernels quantize it (cpu_experts._quantize_input): per group, t = x / s with
    s = its largest magnitude / 127, rounded to an int8, and the remainder times 254 rounded to a
    second one: x ~ s (coarse + fine / 254), to 1/64516 of the group's largest magnitude."""
    g = x.float().reshape(-1, group)
    top = g.abs().amax(1, keepdim=True)
    t = g * torch.where(top > 0, 127.0 / top, torch.zeros_like(top))
    coarse = t.round()
    return ((coarse + ((t - coarse) * 254).round() / 254) * (top / 127)).reshape(x.shape)


def int8_projection(layout: RecordLayout, record: torch.Tensor, proj: str, x: torch.Tensor) -> torch.Tensor:
    """One affine projection of a record as INT8_DOTS kernels compute it: the codes times their
    scales against the quantized input, the group biases against the exact input's group sums."""
    v = layout.views(record)
    codes = v[f"{proj}.weight"]
    scaled = quant.dequantize(codes, v[f"{proj}.scales"], torch.zeros_like(v[f"{proj}.biases"]), layout.bits, layout.group_size,
                              torch.float32)
    biases = v[f"{proj}.biases"].float().repeat_interleave(layout.group_size, dim=1)
    return scaled @ int8_input(x, layout.group_size) + biases @ x.float()


def rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).norm() / ref.norm())


@pytest.fixture(scope="module")
def experts():
    """CpuExperts(layout, threads), one per pair for the whole module (compiled once each)."""
    made = {}

    def get(layout: RecordLayout, threads: int = 2) -> CpuExperts:
        key = (layout, threads)
        if key not in made:
            made[key] = CpuExperts(layout, threads)
        return made[key]

    return get


# Each bit width; groups of 64, 32 and 16; H = 112: a last block of 16 rows.
@pytest.mark.parametrize(
    "hidden,inter,bits,group",
    [(128, 64, 4, 64), (256, 128, 4, 64), (256, 96, 4, 32), (112, 48, 8, 16), (256, 64, 2, 64)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_the_reference_on_fresh_records(experts, hidden, inter, bits, group, dtype):
    layout = RecordLayout.build(hidden, inter, bits, group)
    pool = random_pool(layout, 6, seed=hidden + inter + bits + group)
    x = torch.randn(hidden, generator=torch.Generator().manual_seed(bits)).to(dtype)
    slots, weights = [4, 0, 5, 2], [0.45, 0.3, -0.15, 0.1]  # distinct weights, one negative
    y = experts(layout)(pool, slots, weights, x)
    assert y.shape == (hidden,) and y.dtype == torch.float32
    assert rel(y, reference(layout, pool, slots, weights, x)) < tolerance(layout)


@pytest.mark.parametrize("hidden,inter,bits,group", [(256, 128, 4, 64), (112, 48, 8, 16)])
def test_the_parallel_loops_give_the_one_thread_result(experts, monkeypatch, hidden, inter, bits, group):
    """A call reading less than PARALLEL_MIN_BYTES runs the loops on its thread, a larger one in
    parallel: the same sums, for one token and for several (up to fp32 rounding: the two are
    compiled apart, and LLVM may vectorize a row's sum differently in each)."""
    layout = RecordLayout.build(hidden, inter, bits, group)
    pool = random_pool(layout, 6, seed=7)
    x = torch.randn(3, hidden, generator=torch.Generator().manual_seed(8))
    slots, weights, tokens = [4, 0, 5, 2, 0, 1], [0.45, 0.3, -0.15, 0.1, 0.2, 0.7], [0, 0, 1, 1, 2, 2]
    ex = experts(layout)
    results = []
    for threshold in (1 << 40, 0):  # on the calling thread, then in parallel
        monkeypatch.setattr(cpu_experts, "PARALLEL_MIN_BYTES", threshold)
        results.append((ex(pool, slots[:2], weights[:2], x[0]), ex(pool, slots, weights, x, tokens)))
    assert all(rel(a, b) < 1e-6 for a, b in zip(*results))
    assert rel(results[0][0], reference(layout, pool, slots[:2], weights[:2], x[0])) < tolerance(layout)


@pytest.mark.parametrize("bits,group", [(4, 64), (4, 32), (8, 16), (2, 64), (2, 16)])
def test_rows_read_codes_in_place_on_any_range_of_rows(bits, group):
    """`_rows` alone, on an odd range of rows (the server's shares are any size), for random codes
    and for codes at their largest (a word's top code then holds its sign bit), against the
    dequantized weights; `_permute`'s group sums against x's."""
    layout = RecordLayout.build(128, 64, bits, group)
    pool = random_pool(layout, 2, seed=bits + group)
    codes = layout.segments[0]  # gate_up's
    pool[1, codes.offset : codes.offset + codes.nbytes] = 255
    x = torch.randn(128, generator=torch.Generator().manual_seed(group))
    xp, xs = np.empty(128, np.float32), np.empty(128 // group, np.float32)
    cpu_experts._permute(x.numpy(), bits, group, xp, xs)
    assert np.allclose(xs, x.view(-1, group).sum(1).numpy(), rtol=1e-5, atol=1e-5)
    offs = cpu_experts._offsets(layout)
    for record in pool:
        out = np.zeros(2 * 64, np.float32)
        p8 = record.numpy()
        cpu_experts._rows(p8, p8.view(np.uint16), offs[0:3], 128, bits, group, 3, 10, xp, xs, out)
        want = layout.weights(record, torch.float32)[0][3:10] @ x
        assert rel(torch.from_numpy(out[3:10]), want) < 1e-5
        assert not out[:3].any() and not out[10:].any()  # no row outside the range written


@pytest.mark.skipif(not cpu_experts.INT8_DOTS_ON_HOST, reason="integer dot products need an x86 CPU with AVX2")
@pytest.mark.parametrize("inputs", ["random", "outlier and a zero group"])
def test_int8_rows_read_codes_in_place_on_any_range_of_rows(inputs):
    """`_int8_rows` alone, on an odd range of rows, for random codes and for codes at their largest
    (the most a 16-bit lane adds up), against the quantized input's definition (`int8_projection`),
    and near the exact one: the two-step quantization keeps an input to 1/64516 of its group's
    largest magnitude, even beside an outlier 100 times the rest (measured 0.8-1.6e-4 of the result
    here; on the demo model, KL 6e-9 nats a token against the fp32 planes, EXPERIMENTS 118)."""
    layout = RecordLayout.build(256, 64, 4, 64)
    pool = random_pool(layout, 2, seed=5)
    codes = layout.segments[0]  # gate_up's
    pool[1, codes.offset : codes.offset + codes.nbytes] = 255
    x = torch.randn(256, generator=torch.Generator().manual_seed(6))
    if inputs != "random":
        x[70], x[128:192] = 100.0, 0.0
    xp, xs = np.zeros(256, np.float32), np.zeros(2 * 256 // 64, np.float32)
    cpu_experts._quantize_input(x.numpy(), 64, xp, xs)
    assert np.allclose(xs[:4], x.view(-1, 64).sum(1).numpy(), rtol=1e-5, atol=1e-5)  # the exact group sums
    assert np.allclose(xs[4:], (x.view(-1, 64).abs().amax(1) / (127 * 254)).numpy(), rtol=1e-6, atol=0)  # a fine step
    offs = cpu_experts._offsets(layout)
    for record in pool:
        out = np.zeros(2 * 64, np.float32)
        p8 = record.numpy()
        cpu_experts._int8_rows(p8, p8.view(np.uint16), offs[0:3], 256, 64, 3, 10, xp, xs, out)
        assert rel(torch.from_numpy(out[3:10]), int8_projection(layout, record, "gate_up_proj", x)[3:10]) < 1e-5
        assert rel(torch.from_numpy(out[3:10]), layout.weights(record, torch.float32)[0][3:10] @ x) < 5e-4
        assert not out[:3].any() and not out[10:].any()  # no row outside the range written


def test_the_kind_follows_the_format_and_the_host(monkeypatch):
    """Integer dot products for 4-bit affine records whose groups hold whole 64-input chunks, on a
    host that has them; the fp32 planes for the other affine records, and everywhere without AVX2."""
    kind = cpu_experts._kind
    for on_host in (True, False):
        monkeypatch.setattr(cpu_experts, "INT8_DOTS_ON_HOST", on_host)
        assert kind(RecordLayout.build(128, 64, 4, 64)) == (cpu_experts.INT8_DOTS if on_host else cpu_experts.FP32_PLANES)
        assert kind(RecordLayout.build(256, 128, 4, 128)) == (cpu_experts.INT8_DOTS if on_host else cpu_experts.FP32_PLANES)
        for bits, group in ((4, 32), (8, 64), (2, 64)):
            assert kind(RecordLayout.build(128, 64, bits, group)) == cpu_experts.FP32_PLANES
        assert kind(RecordLayout.build(128, 64, 4, 32, scheme="mxfp4")) == cpu_experts.MXFP4


def test_submit_queues_calls_on_the_worker(experts):
    layout = RecordLayout.build(128, 64, 4, 64)
    pool = random_pool(layout, 4, seed=1)
    xs = torch.randn(3, 128, generator=torch.Generator().manual_seed(2))
    ex = experts(layout)
    futures = [ex.submit(pool, [i, 3], torch.tensor([0.6, 0.4]), x) for i, x in enumerate(xs)]
    for i, (f, x) in enumerate(zip(futures, xs)):
        assert torch.equal(f.result(), ex(pool, [i, 3], [0.6, 0.4], x))
        assert rel(f.result(), reference(layout, pool, [i, 3], [0.6, 0.4], x)) < tolerance(layout)
    assert torch.equal(ex(pool, [], [], xs[0]), torch.zeros(128))  # no experts: a zero vector


def test_releases_the_gil(experts):
    """While the worker computes, the main thread keeps running Python: the longest pause it sees
    is a small part of the call (a kernel holding the GIL would stall it for the whole call).
    numba's parallel loops release the GIL by themselves; that the serial parts between them do
    too (nogil) stalls a thread for a few ms at most, too little to tell from scheduling noise
    here, hence the flag check."""
    layout = RecordLayout.build(1024, 512, 4, 64)
    pool = random_pool(layout, 1, seed=3)
    x = torch.randn(1024, generator=torch.Generator().manual_seed(4))
    ex = experts(layout, threads=1)
    assert all(kernel.targetoptions["nogil"] for kernel in ex._kernels)
    ex(pool, [0] * 20, [1.0] * 20, x)  # loaded or compiled: not part of the timing below
    t0 = time.perf_counter()
    ex(pool, [0] * 20, [1.0] * 20, x)
    n = max(20, int(20 * 0.3 / (time.perf_counter() - t0)))  # experts in ~0.3 s
    future = ex.submit(pool, [0] * n, [1.0] * n, x)
    stamps = [time.perf_counter()]
    while not future.done():
        stamps.append(time.perf_counter())
    future.result()
    duration = stamps[-1] - stamps[0]
    longest = max(b - a for a, b in zip(stamps, stamps[1:]))
    assert duration > 0.1, duration  # long enough to tell
    # Held, the GIL would stall this thread for the whole call. Measured: 0.1-3 ms of ~300 ms, and
    # once 90 ms of 330 (a 2-core VM: this loop, the worker and numba's thread take turns).
    assert longest < duration / 2, (longest, duration)


def test_several_tokens_read_each_expert_once_and_match_the_reference(experts):
    """Three tokens sharing some experts (a batch's decode step): each token's weighted sum as the
    reference computes it; a token's pairs summed in the order given."""
    layout = RecordLayout.build(128, 64, 4, 32)
    pool = random_pool(layout, 6, seed=21)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(22))
    slots, tokens = [4, 0, 5, 0, 2, 4, 1], [0, 0, 1, 1, 1, 2, 2]
    weights = [0.6, 0.4, 0.5, 0.3, 0.2, 0.7, 0.3]
    y = experts(layout)(pool, slots, weights, x, tokens)
    assert y.shape == (3, 128)
    for t in range(3):
        mine = [j for j, tok in enumerate(tokens) if tok == t]
        ref = reference(layout, pool, [slots[j] for j in mine], [weights[j] for j in mine], x[t])
        assert rel(y[t], ref) < tolerance(layout)
        assert torch.equal(y[t], experts(layout)(pool, [slots[j] for j in mine], [weights[j] for j in mine], x[t]))
    with pytest.raises(ValueError, match="tokens must name one of x's 3 rows for each of the 7 slots"):
        experts(layout)(pool, slots, weights, x, [0] * 6 + [3])


def biased_pool(layout: RecordLayout, slots: int, seed: int) -> torch.Tensor:
    """`random_pool`'s records (MXFP4: random codes, scale bytes 2^-8 .. 2^-4) with small random expert biases."""
    g = torch.Generator().manual_seed(seed)
    if layout.scheme == "mxfp4":
        pool = torch.randint(0, 256, (slots, layout.record_size), dtype=torch.uint8, generator=g)
    else:
        pool = random_pool(layout, slots, seed)
    for s in layout.segments:
        if layout.scheme == "mxfp4" and s.name.endswith(".scales"):
            pool[:, s.offset : s.offset + s.nbytes] = torch.randint(119, 124, (slots, s.nbytes), dtype=torch.uint8, generator=g)
        if s.name.endswith(".bias"):
            v = (torch.rand(slots, *s.shape, generator=g) - 0.5).to(torch.bfloat16)
            pool[:, s.offset : s.offset + s.nbytes] = v.view(slots, -1).view(torch.uint8)
    return pool


# gpt-oss's experts: MXFP4 as released, or converted to affine codes; biases; the clamped SwiGLU at
# a limit the random activations cross (tests/conftest.py's, so the engine tests reuse the compiled kernels).
@pytest.mark.parametrize("scheme,bits,group", [("mxfp4", 4, 32), ("affine", 4, 32)])
def test_mxfp4_and_biased_experts_match_the_reference(scheme, bits, group):
    act = Swiglu(1.702, FAMILY_CONFIGS["gpt_oss"]["swiglu_limit"])
    layout = RecordLayout.build(192, 128, bits, group, with_bias=True, scheme=scheme)
    pool = biased_pool(layout, 5, seed=bits + group)
    x = torch.randn(192, generator=torch.Generator().manual_seed(7))
    slots, weights = [3, 0, 4], [0.5, 0.3, 0.2]
    assert rel(CpuExperts(layout, 2, act)(pool, slots, weights, x), reference(layout, pool, slots, weights, x, act)) < tolerance(layout)


def test_refuses_what_it_does_not_compute(experts, monkeypatch):
    layout16 = RecordLayout.build(128, 64, 16, 64)
    assert not CpuExperts.supports(layout16)
    assert not CpuExperts.supports(RecordLayout.build(128, 64, 4, 4))  # groups of 16 bits, not words
    with pytest.raises(ValueError, match="bits=16"):
        CpuExperts(layout16)
    layout = RecordLayout.build(128, 64, 4, 64)
    ex = experts(layout)
    pool = torch.zeros(2, layout.record_size, dtype=torch.uint8)
    x = torch.zeros(128)
    with pytest.raises(ValueError, match="records of this layout"):
        ex(pool[:, :-1].contiguous(), [0], [1.0], x)
    with pytest.raises(IndexError, match="outside"):
        ex(pool, [2], [1.0], x)
    with pytest.raises(ValueError, match="weights"):
        ex(pool, [0, 1], [1.0], x)
    monkeypatch.setattr(cpu_experts, "numba", None)
    assert not cpu_experts.cpu_experts_available()
    with pytest.raises(RuntimeError, match=r"flashmoe\[cpu-experts\]"):
        CpuExperts(layout)


def test_a_nan_record_gives_nan_not_an_exception():
    """A record of NaN bytes (a corrupt or unwritten slot; a NaN activation alike) propagates NaN as
    PyTorch would: numba's default error model raised ZeroDivisionError there under fastmath."""
    layout = RecordLayout.build(64, 32, 4, 32)
    pool = torch.full((2, layout.record_size), 0xFF, dtype=torch.uint8)
    out = CpuExperts(layout)(pool, [0, 1], [0.5, 0.5], torch.ones(64))
    assert out.shape == (64,) and torch.isnan(out).all()


def test_cache_files_older_than_a_kernel_source_are_dropped(tmp_path):
    """numba keys a cached kernel by its own file's timestamp only, while the kernels inline their
    neighbours' helpers: cache files older than the newest source go, newer ones and other files stay."""
    import os

    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "a.py").write_text("")
    os.utime(tmp_path / "a.py", (1000, 1000))
    for name, stamp in (("k-1.py312.nbi", 999), ("k-1.py312.1.nbc", 999), ("k-2.py312.nbi", 1001), ("a.cpython-312.pyc", 999)):
        (tmp_path / "__pycache__" / name).write_bytes(b"")
        os.utime(tmp_path / "__pycache__" / name, (stamp, stamp))
    assert cpu_experts.drop_stale_caches(tmp_path) == 2
    assert sorted(p.name for p in (tmp_path / "__pycache__").iterdir()) == ["a.cpython-312.pyc", "k-2.py312.nbi"]
    assert cpu_experts.drop_stale_caches(tmp_path / "missing") == 0  # no sources, nothing to compare
