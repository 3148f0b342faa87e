"""Instruction counts of the gathered-experts kernels, compiled for Hopper (sm_90) without a GPU:
Triton ships ptxas and cuobjdump. For each kernel: registers and spills, then per loop body (and
the straight-line rest) the SASS instructions by kind, the global loads by vector width, shared
memory traffic and barriers, and instructions per weight at the 397B shape. With --dense, the
dense part's kernels instead (int8 GEMV plain and with the shared expert's fused epilogue, the
SwiGLU input layout, the shared expert's elementwise kernels, the resident slot lookup, the CPU
share's publish and join; per weight for the GEMV, per value for the rest): that they compile for
the GPU, and their size.

    python scripts/sass_count.py [--bits 4 2 8 16] [--block-n N --warps W ...] [--dump DIR]
    python scripts/sass_count.py --dense
"""

from __future__ import annotations

import argparse
import re
import subprocess
from collections import Counter
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from flashmoe.formats.packed import RecordLayout
from flashmoe.kernels import moe_gemv as m

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
POINTERS = {  # element type of each pointer argument, by name
    "x_ptr": "*bf16", "codes_ptr": "*i32", "halves_ptr": "*bf16", "slots_ptr": "*i32", "h_ptr": "*fp32",
    "weights_ptr": "*fp32", "residual_ptr": "*bf16", "y_ptr": "*fp32", "xp_ptr": "*fp32", "xsum_ptr": "*fp32",
    "hp_ptr": "*fp32", "hsum_ptr": "*fp32", "scale_ptr": "*fp32", "xq_ptr": "*i32", "sx_ptr": "*fp32",
    "hq_ptr": "*i32", "sh_ptr": "*fp32",
}
KINDS = {  # opcode -> kind; the rest count as "other"
    "FFMA": "ffma", "FMUL": "fp", "FADD": "fp", "FMNMX": "fp", "FSEL": "fp",
    "LOP3": "alu", "SHF": "alu", "IDP": "idp", "PRMT": "alu", "IADD3": "alu", "LEA": "alu", "SEL": "alu", "ISETP": "alu",
    "IMAD": "imad", "I2F": "cvt", "F2F": "cvt", "F2I": "cvt", "I2FP": "cvt", "F2FP": "cvt",
    "LDG": "ldg", "STG": "stg", "LDS": "lds", "STS": "sts", "BAR": "bar", "SHFL": "shfl", "MOV": "mov",
}


def compile_kernel(fn, constexprs: dict, num_warps: int, pointers: dict | None = None) -> dict:
    """The kernel compiled for sm_90 as the runtime would (16-byte aligned pointers, ints divisible
    by 16); `pointers` overrides POINTERS' element types by argument name."""
    types = {**POINTERS, **(pointers or {})}
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        sig[name] = types.get(name, "i32")
        attrs[(i,)] = [["tt.divisibility", 16]]
    k = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=num_warps))
    return k.asm


def sass_lines(cubin: bytes, tmp: Path) -> list[tuple[int, str]]:
    tmp.write_bytes(cubin)
    out = subprocess.run([BIN / "cuobjdump", "-sass", tmp], capture_output=True, text=True, check=True).stdout
    lines = []
    for line in out.splitlines():
        mt = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if mt:
            lines.append((int(mt.group(1), 16), mt.group(2).strip()))
    return lines


def opcode(instr: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", instr).split()[0]


def kind(op: str) -> str:
    base = op.split(".")[0]
    if base == "LDG":
        width = next((w for w in ("128", "64") if f".{w}" in op), "32")
        return f"ldg{width}"
    return KINDS.get(base, "other")


def loops(lines) -> list[tuple[int, int]]:
    """(start, end) addresses of loop bodies: a branch back to an earlier address."""
    out = []
    for addr, instr in lines:
        mt = re.search(r"\bBRA\s+(?:`\()?0x([0-9a-f]+)", instr)
        if mt and int(mt.group(1), 16) <= addr:
            out.append((int(mt.group(1), 16), addr))
    return out


def count(lines, lo: int, hi: int, exclude=()) -> Counter:
    c = Counter()
    for addr, instr in lines:
        if lo <= addr <= hi and not any(a <= addr <= b for a, b in exclude):
            op = opcode(instr)
            if op in ("NOP",):
                continue
            c[kind(op)] += 1
            c["total"] += 1
    return c


def ptxas_usage(ptx: str, tmp: Path) -> str:
    tmp.write_text(ptx)
    res = subprocess.run([BIN / "ptxas", "-arch=sm_90a", "-v", tmp, "-o", "/dev/null"], capture_output=True, text=True)
    used = re.search(r"Used (\d+) registers", res.stderr)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", res.stderr)
    return f"{used.group(1) if used else '?'} registers, spills {spill.group(1)}/{spill.group(2)} B" if spill else res.stderr


COLUMNS = ("total", "ffma", "fp", "alu", "idp", "imad", "cvt", "mov", "ldg128", "ldg64", "ldg32", "lds", "sts", "bar", "shfl", "other")


def report(name: str, asm: dict, weights_per_thread: float, trips: list[int], tmp: Path) -> None:
    """Counts per loop body and for the straight-line rest; per weight: executed instructions per
    weight a thread computes, with the loops (outermost first, as `trips` lists them) run that often."""
    stem = re.sub(r"\W+", "-", name)
    lines = sass_lines(asm["cubin"], tmp / f"{stem}.cubin")
    print(f"\n{name}: {ptxas_usage(asm['ptx'], tmp / f'{stem}.ptx')}, {len(lines)} instructions")
    print("  " + " ".join(f"{c:>9}" for c in ("part",) + COLUMNS))
    body = sorted(b for b in loops(lines) if b[1] > b[0])  # not the trailing branch-to-self
    parts = [(f"loop@{lo:x}", count(lines, lo, hi)) for lo, hi in body]
    parts.append(("rest", count(lines, 0, 1 << 40, exclude=body)))
    executed = Counter(parts[-1][1])
    for i, (lo, hi) in enumerate(body):  # nested loops: a body's count includes the inner loop's once
        times = 1
        for j, (lo2, hi2) in enumerate(body):
            if lo2 <= lo and hi <= hi2:
                times *= trips[j]
        inner = [b for b in body if lo < b[0] and b[1] <= hi]
        own = count(lines, lo, hi, exclude=inner)
        for key, v in own.items():
            executed[key] += v * times
    for label, c in parts:
        print("  " + " ".join(f"{v:>9}" for v in [label] + [c[k] for k in COLUMNS]))
    print("  " + " ".join(f"{v:>9}" for v in ["/weight"] + [f"{executed[k] / weights_per_thread:.3f}" for k in COLUMNS]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, nargs="+", default=[4])
    ap.add_argument("--block-n", type=int, help="default: MoeGemv's")
    ap.add_argument("--block-k", type=int, default=1024, help="16-bit records only")
    ap.add_argument("--warps", type=int, default=2)
    ap.add_argument("--down-block-n", type=int, help="quantized records only")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--dump", type=Path, default=Path("/tmp/sass_count"))
    ap.add_argument("--dense", action="store_true", help="the dense part's kernels instead")
    args = ap.parse_args()
    args.dump.mkdir(parents=True, exist_ok=True)
    if args.dense:
        for name, fn, consts, warps, values, pointers in dense_kernels():
            report(name, compile_kernel(fn, consts, warps, pointers), values / (32 * warps), [], args.dump)
        return
    for bits in args.bits:
        layout = RecordLayout.build(4096, 1024, bits, 64)
        gemv = m.MoeGemv(layout, args.block_n, args.block_k, args.warps, down_block_n=args.down_block_n)
        for name, fn, consts, warps, weights, trips in kernels(gemv, args.k):
            asm = compile_kernel(fn, consts, warps)
            for suffix in ("ptx", "ttgir"):
                (args.dump / f"{bits}-{name}.{suffix}").write_text(asm[suffix])
            label = f"{bits}-bit {name}: block_n {consts['BLOCK_N']}, BLOCK_K {consts['BLOCK_K']}, {warps} warps"
            report(label, asm, weights / (32 * warps), trips, args.dump)


def kernels(gemv: m.MoeGemv, k: int):
    """(name, kernel, constexprs, warps, weights per program, trip counts of its loops) as MoeGemv launches them."""
    L = gemv.layout
    H, I, bn = L.hidden_size, L.intermediate_size, gemv.block_n
    if gemv.quantized:  # K loops unrolled: straight-line code
        meta = dict(K_ROUTED=k, BITS=L.bits, GROUP=gemv.group, BLOCK_N=bn)
        (gu_k, gu_w), (d_k, d_w, d_e) = gemv.tile_blocks(k)
        meta.update(H=H, I=I, PDL=gemv.pdl, ASM=True)
        dn = gemv.down_block_n
        down = dict(meta, BLOCK_N=dn, BLOCK_K=d_k, EXPERTS=d_e, HAS_RESIDUAL=False)
        return [("gate_up", m._gate_up_v4_kernel, dict(meta, BLOCK_K=gu_k), gu_w, 2 * bn * H, []),
                ("down", m._down_v4_kernel, down, d_w, k * dn * I, [])]
    meta = dict(K_ROUTED=k, BLOCK_N=bn, BLOCK_K=gemv.block_k)  # 16-bit records
    w = gemv.num_warps
    return [("gate_up", m._gate_up_swiglu_kernel, meta, w, 2 * bn * H, [H // gemv.block_k] * 2),
            ("down", m._down_sum_kernel, dict(meta, HAS_RESIDUAL=False), w, k * bn * I, [k, I // gemv.block_k])]


def dense_kernels():
    """(name, kernel, constexprs, warps, weights or values per program, pointer types) of the
    dense part's kernels as decode launches them at the 397B's shapes (hidden 4096, shared expert
    1024, k 10; bf16 activations)."""
    from flashmoe.kernels import codes, host_handoff, int8_gemv, shared_expert, slot_lookup

    bf = "*bf16"
    gemv = dict(xp_ptr="*fp32", codes_ptr="*i32", scale_ptr="*fp32", shared_gate_ptr=bf, residual_ptr=bf, y_ptr=bf)
    i64 = dict(ids_ptr="*i64", table_ptr="*i64", uses_ptr="*i64", slots_ptr="*i64")
    return [
        ("int8_gemv K=4096", int8_gemv._int8_gemv_kernel, dict(K=4096, BLOCK_N=8, BLOCK_W=256, GATED=False, PDL=True),
         2, 8 * 4096, gemv),
        ("int8_gemv K=1024, gated residual", int8_gemv._int8_gemv_kernel,
         dict(K=1024, BLOCK_N=8, BLOCK_W=256, GATED=True, PDL=True), 2, 8 * 1024, gemv),
        ("layout_x 8-bit, SwiGLU", codes._layout_x_kernel, dict(H=1024, BITS=8, BLOCK=1024, SWIGLU=True, PDL=True), 4,
         1024, dict(x_ptr=bf, up_ptr=bf, xp_ptr="*fp32")),
        ("swiglu", shared_expert._swiglu_kernel, dict(BLOCK=1024), 4, 1024, dict(gate_ptr=bf, up_ptr=bf, h_ptr=bf)),
        ("gated_residual", shared_expert._gated_residual_kernel, dict(BLOCK=1024), 4, 1024,
         dict(x_ptr=bf, gate_ptr=bf, y_ptr=bf, out_ptr=bf)),
        ("slot_lookup k=10", slot_lookup._lookup_kernel, dict(BLOCK=16), 1, 16, i64),
        ("CPU share: publish k=10", host_handoff._publish_kernel, dict(K=10, KP=16, H=4096, HP=4096), 4, 4096,
         dict(i64, weights_ptr=bf, x_ptr=bf, gpu_weights_ptr="*fp32", state_ptr="*i32", computed_ptr="*i64",
              mail_ptr="*i32", mailf_ptr="*fp32", share="fp32")),
        ("CPU share: join", host_handoff._join_kernel, dict(H=4096, HP=4096, SPINS=host_handoff.JOIN_SPINS), 4, 4096,
         dict(state_ptr="*i32", mail_ptr="*i32", mailf_ptr="*fp32", out_ptr=bf)),
    ]


if __name__ == "__main__":
    main()
