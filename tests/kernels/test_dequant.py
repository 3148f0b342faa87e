import pytest
import torch

from flashmoe.formats.packed import RecordLayout
from flashmoe.kernels.dequant import Dequantizer

from .test_moe_gemv import random_pool


@pytest.mark.parametrize("bits,group", [(4, 32), (2, 32), (8, 64)])
def test_dequantized_record_equals_the_reference(device, bits, group):
    layout = RecordLayout.build(128, 64, bits, group)
    pool = random_pool(layout, 3, seed=bits + group)
    deq = Dequantizer(layout, torch.float32, device, block_n=16, words=8)
    deq.gate_up.fill_(float("nan"))  # poisoned: every element must be written
    deq.down.fill_(float("nan"))
    for slot in (1, 2):  # slot 1: Triton specializes integer arguments equal to 1
        gate_up, down = deq(pool.to(device), slot)
        ref_gu, ref_down = layout.weights(pool[slot], torch.float32)
        # equal up to fused multiply-add rounding
        assert torch.allclose(gate_up.cpu(), ref_gu, rtol=1e-6, atol=1e-7)
        assert torch.allclose(down.cpu(), ref_down, rtol=1e-6, atol=1e-7)
