"""Error of int8 schemes for the resident dense weights (`--dense-bits 8`) on synthetic weight
distributions: the chosen symmetric per-output-channel scales (quant.quantize_int8_rows) against
symmetric per-group scales along the input dimension (bf16 scale per 64 or 128 weights), and the
experts' affine 8-bit groups of 64 for reference. Reports ||W - W'|| / ||W|| and the error of the
output, ||(W - W') x|| / ||W x||, for Gaussian x. CPU, a few seconds: docs/EXPERIMENTS.md entry 18."""

import torch

from flashmoe import quant


def distributions(n: int, k: int, g: torch.Generator):
    """Weights shaped like a [n, k] projection; LLM weights are near-Gaussian with heavier tails."""
    yield "gaussian", torch.randn(n, k, generator=g)
    yield "student-t df=4 (heavy tails)", torch.distributions.StudentT(4.0).sample((n, k))
    yield "gaussian, lognormal column scales (s=0.5)", torch.randn(n, k, generator=g) * (torch.randn(k, generator=g) * 0.5).exp()
    w = torch.randn(n, k, generator=g)
    w[torch.rand(n, k, generator=g) < 1e-4] *= 20
    yield "gaussian + 0.01% outliers x20", w


def per_group_symmetric(w: torch.Tensor, group: int) -> torch.Tensor:
    n, k = w.shape
    groups = w.view(n, k // group, group)
    s = (groups.abs().amax(-1, keepdim=True) / 127).to(torch.bfloat16).float().clamp_min(1e-30)
    return ((groups / s).round().clamp(-127, 127) * s).view(n, k)


def main() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    n, k = 1024, 4096
    x = torch.randn(k, 64, generator=g)
    schemes = {
        "per-channel": lambda w: quant.dequantize_int8_rows(*quant.quantize_int8_rows(w)),
        "group 128": lambda w: per_group_symmetric(w, 128),
        "group 64": lambda w: per_group_symmetric(w, 64),
        "affine g64 (experts)": lambda w: quant.dequantize(*quant.quantize(w, 8, 64), 8, 64),
    }
    print(f"[{n}, {k}] weights in bf16; each cell: weight error / output error")
    print(f"{'distribution':<44}" + "".join(f"{name:>22}" for name in schemes))
    for label, w in distributions(n, k, g):
        w = w.to(torch.bfloat16).float()
        cells = []
        for fn in schemes.values():
            approx = fn(w)
            cells.append(f"{quant.relative_error(w, approx):.4f} / {quant.relative_error(w @ x, approx @ x):.4f}")
        print(f"{label:<44}" + "".join(f"{c:>22}" for c in cells))


if __name__ == "__main__":
    main()
