import pytest
import torch

from flashmoe.kernels.attention_decode import attention_decode
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
    last = torch.tensor([n - 1], device=device) if in_graph else n - 1
    out = attention_decode(q.to(device), gate.to(device), keys.to(device), values.to(device), last, block_n, splits)
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
    mask = None if window is None else window_mask(1, n, window, None, "cpu")
    want = attend(q[None], keys[:n], values[:n], mask, sinks).reshape(1, -1)
    last = torch.tensor([n - 1], device=device) if in_graph else n - 1
    out = attention_decode(q.to(device), None, keys.to(device), values.to(device), last, 16, 4, sinks.to(device), window)
    assert rel(out, want) < 1e-5


def test_shapes_it_cannot_take_are_refused(device):
    q, gate, keys, values = case(4, 2, 16, 4, 4, torch.float32, seed=0)
    with pytest.raises(ValueError, match="unsupported shapes"):
        attention_decode(q.to(device)[:3], gate.to(device), keys.to(device), values.to(device), 3)  # 3 heads on 2 KV heads
    with pytest.raises(ValueError, match="unsupported shapes"):
        attention_decode(q.to(device)[:, :12], gate.to(device), keys.to(device), values.to(device), 3)  # d = 12


@cuda
def test_a_captured_graph_follows_the_device_position():
    """One capture, replayed as the sequence grows: each replay attends positions 0..last as
    they are then, over a buffer of the real model's head layout."""
    q, gate, keys, values = case(32, 2, 256, 3000, 4096, torch.bfloat16, seed=1)
    keys[3000:] = values[3000:] = 0.0  # written later, as the sequence grows
    q, gate, keys, values = (t.cuda() for t in (q, gate, keys, values))
    last = torch.zeros(1, dtype=torch.long, device="cuda")
    attention_decode(q, gate, keys, values, last)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attention_decode(q, gate, keys, values, last)
    for n in (1, 65, 1000, 3000):
        last.fill_(n - 1)
        graph.replay()
        assert rel(out, reference(q.cpu(), gate.cpu(), keys.cpu(), values.cpu(), n)) < 2e-2, n
