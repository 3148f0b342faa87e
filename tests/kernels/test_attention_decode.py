import pytest
import torch

from flashmoe.kernels.attention_decode import attention_decode, attention_decode_batch, kv_offsets
from flashmoe.layers.attention import attend, window_mask

from .conftest import rel

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def case(heads: int, kv_heads: int, d: int, n: int, capacity: int, dtype, seed: int):
    """q [heads, d], gate [heads, d] (a strided view, as inside q_proj's output), keys and values
    [capacity, kv_heads, d] of which positions >= n are NaN: reading one would show."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(heads, d, generator=g) * 2).to(dtype)
    gate = (torch.randn(heads, 2 * d, generator=g) * 2).to(dtype)[:, d:]
    keys, values = (torch.randn(capacity, kv_heads, d, generator=g).to(dtype) for _ in range(2))
    keys[n:] = values[n:] = float("nan")
    return q, gate, keys, values


def reference(q, gate, keys, values, n: int) -> torch.Tensor:
    """Attention's eager lines for one token, on the CPU: [1, heads * d] (gated if there is a gate)."""
    out = attend(q[None], keys[:n], values[:n], None).reshape(1, -1)
    return out if gate is None else out * torch.sigmoid(gate.reshape(1, -1))


def decode(q, gate, keys, values, n: int, in_graph: bool, block_n: int | None = None, splits: int = 64, sinks=None,
           window=None) -> torch.Tensor:
    """The last of n positions' attention: eagerly (`attention_decode`), or as a decode graph runs
    it (`attention_decode_batch` of one sequence, its position on the device and its buffer
    reserved past n, the new key and value the cache's own at n - 1)."""
    if not in_graph:
        return attention_decode(q, gate, keys, values, n - 1, block_n, splits, sinks, window)
    last = torch.tensor([n - 1], device=q.device)
    return attention_decode_batch(q[None], None if gate is None else gate[None], keys[n - 1 : n].clone(),
                                  values[n - 1 : n].clone(), keys, values, kv_offsets([keys], [values]), last, sinks,
                                  window, block_n, splits)


# n = 37 and 100 are not multiples of the block; splits = 3 gives several blocks per split,
# 8 splits of n = 37 leave 5 with nothing to do; (32, 2) is the 397B's head layout (G = 16).
SHAPES = [
    # heads, kv_heads, d, n, block_n, splits
    (4, 2, 16, 1, 16, 64),
    (4, 2, 64, 37, 16, 8),
    (4, 2, 32, 100, 16, 3),
    (8, 1, 16, 50, 32, 4),
    (32, 2, 16, 70, 16, 64),
]


@pytest.mark.parametrize("heads,kv_heads,d,n,block_n,splits", SHAPES)
@pytest.mark.parametrize("in_graph", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_decode_attention_matches_the_eager_attention(device, poison, heads, kv_heads, d, n, block_n, splits, in_graph, dtype, tol):
    """Eager: the cache holds exactly n positions and n is an int. In a graph: a reserved buffer
    longer than n, and the last position read on the device."""
    capacity = n + 29 if in_graph else n
    q, gate, keys, values = case(heads, kv_heads, d, n, capacity, dtype, seed=heads * 1000 + d + n)
    out = decode(q.to(device), gate.to(device), keys.to(device), values.to(device), n, in_graph, block_n, splits)
    assert out.shape == (1, heads * d) and out.dtype == dtype
    assert rel(out, reference(q, gate, keys, values, n)) < tol


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_attention_without_an_output_gate(device, poison, dtype, tol):
    """The families whose attention has no gate (Qwen3-MoE, MiniMax, GLM): softmax(q k^T) v alone."""
    q, _, keys, values = case(8, 2, 32, 45, 45, dtype, seed=17)
    out = attention_decode(q.to(device), None, keys.to(device), values.to(device), 44, 16, 4)
    assert rel(out, reference(q, None, keys, values, 45)) < tol


@pytest.mark.parametrize("window", [None, 7, 40, 200])
@pytest.mark.parametrize("in_graph", [False, True])
def test_sinks_and_sliding_windows(device, poison, window, in_graph):
    """gpt-oss's attention: a sink logit per head in each softmax's denominator, and a window of
    the last `window` positions (7: inside one split's first block; 40: across splits; 200:
    longer than the sequence), against `attend` under `window_mask`."""
    n, capacity = 70, 70 + (29 if in_graph else 0)
    q, _, keys, values = case(8, 2, 16, n, capacity, torch.float32, seed=23)
    sinks = torch.randn(8, generator=torch.Generator().manual_seed(24)) * 3
    mask = None if window is None else window_mask(1, n, window, "cpu")
    want = attend(q[None], keys[:n], values[:n], mask, sinks).reshape(1, -1)
    out = decode(q.to(device), None, keys.to(device), values.to(device), n, in_graph, 16, 4, sinks.to(device), window)
    assert rel(out, want) < 1e-5


def batch_case(lengths: list[int], heads: int, kv_heads: int, d: int, dtype, seed: int):
    """A batch's decode step: each sequence's own cache buffers (capacities differ, as a pool's
    slots grow alone; NaN past its length), its new key and value, q and a strided gate."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    caches = []
    for i, n in enumerate(lengths):
        k, v = (torch.randn(n + 3 + 17 * i, kv_heads, d, generator=g).to(dtype) for _ in range(2))
        k[n:] = v[n:] = float("nan")
        caches.append((k, v))
    q = (torch.randn(B, heads, d, generator=g) * 2).to(dtype)
    gate = (torch.randn(B, heads, 2 * d, generator=g) * 2).to(dtype)[:, :, d:]
    k_new = torch.randn(B, kv_heads, d, generator=g).to(dtype)  # contiguous, as the rotary's output
    v_new = torch.randn(B, kv_heads, 2 * d, generator=g).to(dtype)[:, :, d:]  # a strided view, as in in_proj's
    return caches, q, gate, k_new, v_new


@pytest.mark.parametrize("gated,sinks,window", [(True, False, None), (False, True, 9), (False, False, None)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_a_batch_of_sequences_in_one_launch(device, poison, gated, sinks, window, dtype, tol):
    """Sequences of different lengths, each in its own buffers: the batch's new keys and values
    land at each one's position and each row is its sequence's attention over positions 0..n
    (the eager `attend`, with the gate, or with sinks and a window)."""
    lengths, heads, kv_heads, d = [5, 40, 1, 77], 8, 2, 32
    caches, q, gate, k_new, v_new = batch_case(lengths, heads, kv_heads, d, dtype, seed=5)
    head_sinks = torch.randn(heads, generator=torch.Generator().manual_seed(6)) * 3 if sinks else None
    on = [(k.to(device), v.to(device)) for k, v in caches]
    offsets = kv_offsets([k for k, _ in on], [v for _, v in on])
    last = torch.tensor(lengths, device=device)  # each one's new token's position
    out = attention_decode_batch(q.to(device), gate.to(device) if gated else None, k_new.to(device), v_new.to(device),
                                 on[0][0], on[0][1], offsets, last, None if head_sinks is None else head_sinks.to(device),
                                 window, block_n=16, splits=4)
    assert out.shape == (len(lengths), heads * d)
    for b, ((k, v), n) in enumerate(zip(caches, lengths)):
        k[n], v[n] = k_new[b], v_new[b]
        assert torch.equal(on[b][0][: n + 1].cpu(), k[: n + 1]) and torch.equal(on[b][1][: n + 1].cpu(), v[: n + 1])
        mask = None if window is None else window_mask(1, n + 1, window, "cpu")
        want = attend(q[b][None], k[: n + 1], v[: n + 1], mask, head_sinks).reshape(1, -1)
        if gated:
            want = want * torch.sigmoid(gate[b].reshape(1, -1))
        assert rel(out[b : b + 1], want) < tol, b


def test_kv_offsets_refuse_caches_of_another_layout():
    k, v = torch.zeros(8, 2, 16), torch.zeros(8, 2, 16)
    with pytest.raises(ValueError, match="differ in dtype, device or layout"):
        kv_offsets([k, torch.zeros(8, 4, 8)], [v, v.clone()])
    with pytest.raises(ValueError, match="differ in dtype, device or layout"):
        kv_offsets([k, k.half()], [v, v.clone()])


def test_shapes_it_cannot_take_are_refused(device):
    q, gate, keys, values = case(4, 2, 16, 4, 4, torch.float32, seed=0)
    with pytest.raises(ValueError, match="unsupported shapes"):
        attention_decode(q.to(device)[:3], gate.to(device), keys.to(device), values.to(device), 3)  # 3 heads on 2 KV heads
    with pytest.raises(ValueError, match="unsupported shapes"):
        attention_decode(q.to(device)[:, :12], gate.to(device), keys.to(device), values.to(device), 3)  # d = 12


@cuda
def test_a_captured_batch_follows_each_sequences_position():
    """The batch's launches in one capture, replayed as the sequences grow, each at its own length
    (the 397B's head layout: 32 query heads on 2 KV heads of 256)."""
    caches, q, gate, k_new, v_new = batch_case([100, 1000, 3], 32, 2, 256, torch.bfloat16, seed=2)
    caches = [(k.nan_to_num(0.0).cuda(), v.nan_to_num(0.0).cuda()) for k, v in caches]
    q, gate, k_new, v_new = (t.cuda() for t in (q, gate, k_new, v_new))
    offsets = kv_offsets([k for k, _ in caches], [v for _, v in caches])
    last = torch.zeros(3, dtype=torch.long, device="cuda")
    run = lambda: attention_decode_batch(q, gate, k_new, v_new, caches[0][0], caches[0][1], offsets, last)  # noqa: E731
    run()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for lengths in ([0, 0, 0], [50, 999, 2], [99, 10, 1]):
        last.copy_(torch.tensor(lengths))
        graph.replay()
        for b, ((k, v), n) in enumerate(zip(caches, lengths)):
            assert torch.equal(k[n], k_new[b]) and torch.equal(v[n], v_new[b])
            want = reference(q[b].cpu(), gate[b].cpu(), k.cpu(), v.cpu(), n + 1)
            assert rel(out[b : b + 1], want) < 2e-2, (lengths, b)
