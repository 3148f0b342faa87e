import pytest
import torch

from flashmoe.kernels.codes import layout_xq


def unpack(xq: torch.Tensor, sx: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """layout_xq's inverse, written from its docstring: the int16 pairs back at their inputs' places,
    times their group's scale."""
    T, half = xq.shape
    H, PW, P = 2 * half, 32 // bits, 8 // bits
    regs = xq.view(T, 2 * P, H // PW)  # [T, register j, word w]
    out = torch.empty(T, H // PW, PW)
    for j in range(2 * P):
        lo = j % 2 * 2 * P + j // 2
        out[:, :, lo] = (regs[:, j] << 16 >> 16).float()  # low half, sign-extended
        out[:, :, lo + P] = (regs[:, j] >> 16).float()
    return out.view(T, H) * sx.repeat_interleave(group, dim=1)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("H", [2048, 1536])  # two programs of 1024 inputs; three of 512
def test_layout_xq_rounds_each_group_to_16_bits(device, bits, group, H):
    g = torch.Generator().manual_seed(bits * group)
    x = torch.randn(3, H, generator=g) * torch.logspace(-6, 6, 3)[:, None]  # scales far apart per token
    x[1, group:2 * group] = 0  # an all-zero group: scale 0, no division by it
    x[2, 5 * group + 3] = -1e9  # one outlier sets its group's scale alone
    xq, sx, sums = layout_xq(x.to(device), bits, group, pdl=False)
    xq, sx, sums = xq.cpu(), sx.cpu(), sums.cpu()
    top = x.abs().view(3, -1, group).amax(-1)
    torch.testing.assert_close(sx, top / 32767, rtol=1e-6, atol=0)
    assert torch.equal(sx[1, 1], torch.tensor(0.0))
    steps = sx.repeat_interleave(group, dim=1)
    err = (unpack(xq, sx, bits, group) - x).abs()
    # half a step, and the fp32 rounding of x * 32767 / max|x| (up to ~32767 ulps of 1: 0.002 steps)
    assert bool((err <= steps * 0.51).all()), "an input is off by more than half its group's step"
    torch.testing.assert_close(sums, x.view(3, -1, group).sum(-1), rtol=1e-5, atol=1e-5 * float(top.max()))
