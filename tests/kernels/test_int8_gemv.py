import pytest
import torch

from flashmoe import quant
from flashmoe.kernels.int8_gemv import int8_gemv, int8_linear_reference
from flashmoe.layers import int8_linear
from flashmoe.layers.int8_linear import Int8Linear

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def random_weights(n: int, k: int, seed: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q, scale = quant.quantize_int8_rows(torch.randn(n, k, generator=g) / k**0.5)
    return q.to(device), scale.to(device)


def rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float().cpu() - ref.cpu()).norm() / ref.cpu().norm())


# N = 37 is not a multiple of the 8-row block (clamped rows); K = 100 and 1296 are not multiples of
# the 128-word step of one warp (masked tail), and 1296 takes three steps (the next block's loads
# issued before the current one's arithmetic).
@pytest.mark.parametrize("n,k", [(40, 64), (37, 100), (64, 1296)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_gemv_matches_the_reference_on_fresh_inputs(device, n, k, dtype, tol):
    q, scale = random_weights(n, k, seed=n + k)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(k)).to(dtype)
    y = int8_gemv(x.to(device), q.to(device), scale.to(device), block_n=8, num_warps=1)
    assert y.shape == (1, n) and y.dtype == dtype
    assert rel(y, int8_linear_reference(x, q, scale)) < tol  # fp32 accumulation; bf16 output rounding


def test_gemv_reads_every_code_value_at_every_byte_position(device):
    """All 256 codes (-128 included, which quantize_int8_rows never writes) at each of a word's four
    byte positions, with integer inputs: every product and sum is exact in fp32, so the sign flip and
    the masks must give the reference's values exactly."""
    codes = torch.arange(-128, 128, dtype=torch.int8)
    q = torch.stack([codes.roll(r) for r in range(8)])  # [8, 256]: each code at every position
    x = torch.randint(-8, 9, (1, 256), generator=torch.Generator().manual_seed(0)).float()
    scale = torch.ones(8)
    y = int8_gemv(x.to(device), q.to(device), scale.to(device), block_n=8, num_warps=1)
    assert torch.equal(y.cpu(), int8_linear_reference(x, q, scale))


def test_gemv_refuses_what_it_does_not_support(device):
    q, scale = random_weights(16, 64, seed=1, device=device)
    x = torch.randn(2, 64, device=device)
    with pytest.raises(ValueError, match=r"shape \[1, K\]"):
        int8_gemv(x, q, scale)
    with pytest.raises(ValueError, match="contiguous int8"):
        int8_gemv(x[:1], q.float(), scale)
    with pytest.raises(ValueError, match="contiguous int8"):
        int8_gemv(x[:1, :32], q[:, :32], scale)  # a strided view
    with pytest.raises(ValueError, match="multiple of 4"):
        int8_gemv(x[:1, :62], q[:, :62].contiguous(), scale)
    with pytest.raises(ValueError, match="scale must be fp32"):
        int8_gemv(x[:1], q, scale[:8])


@pytest.mark.parametrize("m", [1, 40])
def test_layer_matches_the_reference_across_conversion_blocks(monkeypatch, m):
    """The CPU / many-row path converts the codes a block of rows at a time: 37 rows in blocks of 16."""
    monkeypatch.setattr(int8_linear, "DEQUANT_ROWS", 16)
    q, scale = random_weights(37, 96, seed=m)
    layer = Int8Linear(96, 37)
    layer.weight.copy_(q)
    layer.scale.copy_(scale)
    x = torch.randn(m, 96, generator=torch.Generator().manual_seed(5))
    assert rel(layer(x), int8_linear_reference(x, q, scale)) < 1e-5
    assert layer(x.view(m, 1, 96)).shape == (m, 1, 37)  # leading dimensions are kept


@cuda
@pytest.mark.parametrize("n,k", [(4096, 1024), (1024, 4096), (12288, 4096), (4096, 12288)])
@pytest.mark.parametrize("m", [1, 3, 40])
def test_real_shapes_on_the_gpu(n, k, m):
    """Through the layer: the Triton GEMV for one row, converted codes + cuBLAS beyond."""
    q, scale = random_weights(n, k, seed=n + k, device="cuda")
    layer = Int8Linear(k, n).cuda()
    layer.weight.copy_(q)
    layer.scale.copy_(scale)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    assert rel(layer(x), int8_linear_reference(x, q, scale)) < 1e-2


@cuda
def test_lm_head_shape_on_the_gpu():
    q = torch.randint(-127, 128, (248320, 4096), dtype=torch.int8, device="cuda")
    scale = torch.rand(248320, device="cuda") / 127
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    ref = int8_linear_reference(x, q, scale)
    y = int8_gemv(x, q, scale)
    assert rel(y, ref) < 1e-2
    assert float((y[0, -8:].float() - ref[0, -8:]).abs().max()) < 1e-2 * float(ref.abs().max())  # the last rows too


@cuda
def test_gemv_replays_from_a_cuda_graph():
    q, scale = random_weights(4096, 1024, seed=3, device="cuda")
    layer = Int8Linear(1024, 4096).cuda()
    layer.weight.copy_(q)
    layer.scale.copy_(scale)
    x = torch.randn(1, 1024, device="cuda", dtype=torch.bfloat16)
    layer(x)  # compile outside the capture, as GraphedDecoder's warm-up does
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer(x)
    for seed in range(3):  # new inputs in the captured buffer, new outputs in the captured one
        x.copy_(torch.randn(1, 1024, generator=torch.Generator().manual_seed(seed)))
        graph.replay()
        assert rel(y, int8_linear_reference(x, q, scale)) < 1e-2
