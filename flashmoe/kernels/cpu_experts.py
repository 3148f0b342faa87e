"""Routed experts on the CPU, read straight from packed records: one decode token through a few
experts of a layer (gate_up, SwiGLU, down, weighted sum), for the host-resident misses the CPU
computes while PCIe copies the others to the GPU (docs/EXPERIMENTS.md entry 22).

A numba kernel reads each record where it lies, with no dequantized copy:
  - codes as the record's 32-bit words, at unit stride: word w of a row holds the codes of inputs
    per_word * w + p (p = 0 .. per_word - 1, at bit offset bits * p; per_word = 32 / bits). Each
    code is masked in place, not shifted down: (word & mask << bits p) is the code times
    2^(bits p), exactly, so the input is permuted once per token into per_word planes that line up
    with the words, plane p divided by 2^(bits p) (`_permute`); a code then costs an AND, an
    int -> float conversion and an FMA, 8 words per 256-bit vector;
  - the scales expanded to one per word, so the loop over a row's words is one sum that LLVM
    vectorizes, with one horizontal sum per row (not per group);
  - the bias term per group as bias * (sum of the group's inputs):
    sum_i (q_i s + b) x_i = s * sum_i q_i x_i + b * sum_i x_i;
  - bf16 scales and biases turned into fp32 by a shift (bf16 is the high half of an fp32);
  - the codes prefetched PREFETCH_BYTES ahead (without, the hardware prefetchers leave the loop
    waiting on DRAM: gate_up on one thread read 2.6 GB/s, against 8-9 with);
  - parallel over (expert, block of rows), so several experts fill the threads.
Its definition, which the tests hold it to: `layout.weights` + `swiglu_expert` in fp32.

On hosts with AVX2, 4-bit records whose groups hold whole 64-input chunks run another kind of
row (INT8_DOTS, EXPERIMENTS 118): the input quantized per group in two int8 steps (to 1/64516 of
the group's largest magnitude, `_quantize_input`), each 32-byte chunk of codes multiplied with it
by integer dot products (`_int8_row_dot`: pmaddubsw, pmaddwd), the bias term on the exact group
sums. Its definition: the same, with each projection's input quantized that way.

numba is optional (pip install 'flashmoe[cpu-experts]'); this module imports without it.
"""

from __future__ import annotations

import functools
import os
import threading
from pathlib import Path
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from ..formats.packed import RecordLayout
from ..layers.mlp import SILU, Swiglu
from ..quant import MXFP4_GROUP

try:
    import numba
    from numba import prange

    # The workqueue threading layer: its threads sleep between calls where OpenMP's spin (on a
    # 2-core CPU the spinning took PyTorch's cores: EXPERIMENTS entry 27). Read once, at the first
    # parallel launch.
    numba.config.THREADING_LAYER = "workqueue"
except ImportError:
    numba = None

ROWS_PER_BLOCK = 32  # rows one parallel task computes
PARALLEL_MIN_BYTES = 1 << 20  # records read by a call below which its loops run on one thread (entry 73)
PREFETCH_BYTES = 1024  # how far ahead of the row being read its codes are prefetched (512-2048 measured alike)
SUPPORTED_BITS = (8, 4, 2)

# How a kernel lays out a projection's input and computes its rows, a constant of each compiled
# kernel (`_variant` picks it from the record format and the host):
FP32_PLANES = 0  # affine codes against the fp32 input in planes (`_permute`, `_rows`)
INT8_DOTS = 1  # 4-bit affine codes against the input quantized to int8, AVX2 integer dot products (`_quantize_input`, `_int8_rows`)
MXFP4 = 2  # MXFP4 codes against the fp32 input, even elements then odd (`_even_odd`, `_mxfp4_rows`)
INT8_CHUNK = 64  # inputs (32 code bytes) an integer dot product covers: INT8_DOTS needs groups of a multiple


def cpu_experts_available() -> bool:
    """Whether numba is installed, which CpuExperts needs."""
    return numba is not None


def _int8_dots_on_host() -> bool:
    """Whether numba compiles for this host's CPU and it has AVX2 (what `_int8_row_dot` emits)."""
    if numba is None or numba.config.CPU_NAME not in (None, "host"):
        return False
    import llvmlite.binding

    return "+avx2" in llvmlite.binding.get_host_cpu_features().flatten().split(",")


INT8_DOTS_ON_HOST = _int8_dots_on_host()


def drop_stale_caches(kernels_dir: Path) -> int:
    """Delete numba's cache files in kernels_dir/__pycache__ older than the newest source file there
    -> how many. numba keys a cached kernel by its own file's timestamp, but kernels here inline
    helpers and intrinsics from their neighbours (cpu_moe's `moe_step` inlines this file's): after
    a neighbour changes, a kernel whose own file did not would load stale machine code (EXPERIMENTS
    118). Only the files numba wrote for these kernels go; it compiles them again."""
    sources = [p.stat().st_mtime for p in kernels_dir.glob("*.py")]
    dropped = 0
    for cached in (kernels_dir / "__pycache__").glob("*.nb[ic]") if sources else ():
        try:
            if cached.stat().st_mtime < max(sources):
                cached.unlink()
                dropped += 1
        except OSError:  # another process dropped or rewrote it first; or a read-only install
            pass
    return dropped


if numba is not None:
    drop_stale_caches(Path(__file__).parent)


def numba_jit(**options):
    """numba.njit for these kernels. cache=True compiles once per machine, into __pycache__ or,
    where the package is read-only, numba's user cache directory; where neither is writable, once
    per process. Without numba the functions stay plain Python (CpuExperts refuses to start).
    numpy's error model: a division by zero gives inf or NaN, as PyTorch's would, instead of raising
    (under fastmath numba's check also fired on NaN divisors: a NaN activation raised
    ZeroDivisionError in the middle of a decode step), and the divisions lose their branch."""

    def decorate(f):
        if numba is None:
            return f
        flags = dict(fastmath=True, nogil=True, error_model="numpy", **options)
        try:
            return numba.njit(cache=True, **flags)(f)
        except RuntimeError:  # numba: "cannot cache function ...: no locator available"
            return numba.njit(**flags)(f)

    return decorate


if numba is not None:
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    @intrinsic
    def _prefetch(typingctx, arr, idx):
        """Load the cache line of arr[idx] ahead of use (llvm.prefetch: a read, kept in every cache
        level). idx may lie past the array's end: a prefetch never faults."""

        def codegen(context, builder, sig, args):
            data = context.make_array(sig.args[0])(context, builder, args[0]).data
            i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
            fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
            fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
            builder.call(fn, [builder.bitcast(builder.gep(data, [args[1]]), i8p), i32(0), i32(3), i32(1)])
            return context.get_dummy_value()

        return types.void(arr, types.intp), codegen

    def _horizontal_sum(builder, vector):
        """The sum of an fp32 vector's 8 lanes: halved until one is left."""
        for width in (4, 2, 1):
            lo, hi = (builder.shuffle_vector(vector, vector, ir.Constant(ir.VectorType(ir.IntType(32), width), list(range(o, o + width))))
                      for o in (0, width))
            vector = builder.fadd(lo, hi)
        return builder.extract_element(vector, ir.IntType(32)(0))

    @intrinsic
    def _bf16_dot(typingctx, w16, w_at, xp, k):
        """sum_i w[w_at + i] x[i] for i < k: w16 bfloat16 bits (uint16), xp the fp32 x as
        `_bf16_lanes` lays it out, both C-contiguous. 16 weights a load, each half widened to fp32
        by interleaving zeros below them (a bf16 is the high half of an fp32: vpunpcklwd and
        vpunpckhwd, which work within 128-bit lanes, hence x's order), multiplied into four
        independent sums (FMA latency), 32 a round; one at a time for the last k % 16."""
        if not (isinstance(w16, types.Array) and isinstance(xp, types.Array) and w16.layout == xp.layout == "C"):
            raise TypeError("_bf16_dot takes C-contiguous arrays")

        def codegen(context, builder, sig, args):
            intp, f32, i32 = context.get_value_type(types.intp), ir.FloatType(), ir.IntType(32)
            f32x8, i16x16 = ir.VectorType(f32, 8), ir.VectorType(ir.IntType(16), 16)
            w_p = builder.gep(context.make_array(sig.args[0])(context, builder, args[0]).data,
                              [context.cast(builder, args[1], sig.args[1], types.intp)])
            x_p = context.make_array(sig.args[2])(context, builder, args[2]).data
            k = context.cast(builder, args[3], sig.args[3], types.intp)
            fmuladd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f32x8, [f32x8] * 3), "llvm.fmuladd.v8f32")
            zeros = ir.Constant(i16x16, [0] * 16)
            # fp32 lane j of a half: zero in its low 16 bits, a weight in its high ones
            halves = [ir.Constant(ir.VectorType(i32, 16), [i for j in lanes for i in (16, j)])
                      for lanes in ((0, 1, 2, 3, 8, 9, 10, 11), (4, 5, 6, 7, 12, 13, 14, 15))]

            def block(at, sums):  # sums[h] += half h of w[at : at + 16] times xp's
                w = builder.load(builder.bitcast(builder.gep(w_p, [at]), i16x16.as_pointer()), align=2)
                for h, acc in enumerate(sums):
                    wf = builder.bitcast(builder.shuffle_vector(w, zeros, halves[h]), f32x8)
                    xv = builder.load(builder.bitcast(builder.gep(x_p, [builder.add(at, intp(8 * h))]), f32x8.as_pointer()), align=4)
                    builder.store(builder.call(fmuladd, [wf, xv, builder.load(acc)]), acc)

            sums = [cgutils.alloca_once_value(builder, ir.Constant(f32x8, [0.0] * 8)) for _ in range(4)]
            rounds = builder.udiv(k, intp(32))
            with cgutils.for_range(builder, rounds) as loop:
                at = builder.mul(loop.index, intp(32))
                block(at, sums[:2])
                block(builder.add(at, intp(16)), sums[2:])
            blocks = builder.mul(builder.udiv(k, intp(16)), intp(16))
            with cgutils.for_range(builder, builder.sub(builder.udiv(k, intp(16)), builder.mul(rounds, intp(2)))) as loop:
                block(builder.add(builder.mul(rounds, intp(32)), builder.mul(loop.index, intp(16))), sums[:2])
            total = builder.fadd(builder.fadd(builder.load(sums[0]), builder.load(sums[1])),
                                 builder.fadd(builder.load(sums[2]), builder.load(sums[3])))
            result = cgutils.alloca_once_value(builder, _horizontal_sum(builder, total))
            with cgutils.for_range(builder, builder.sub(k, blocks)) as loop:
                at = builder.add(blocks, loop.index)
                w = builder.zext(builder.load(builder.gep(w_p, [at])), i32)
                product = builder.fmul(builder.bitcast(builder.shl(w, i32(16)), f32), builder.load(builder.gep(x_p, [at])))
                builder.store(builder.fadd(builder.load(result), product), result)
            return builder.load(result)

        return types.float32(w16, w_at, xp, k), codegen

    _I8X32, _I16X16, _I32X8 = ir.VectorType(ir.IntType(8), 32), ir.VectorType(ir.IntType(16), 16), ir.VectorType(ir.IntType(32), 8)
    _F32, _F32X8 = ir.FloatType(), ir.VectorType(ir.FloatType(), 8)

    @intrinsic
    def _int8_row_dot(typingctx, codes, at, halves, scales_at, biases_at, xq, vs, groups, group_chunks):
        """One 4-bit affine row against an input in two int8 steps: the sum over its groups g of
        scale_g * vs[groups + g] * (codes . (254 coarse + fine))_g + bias_g * vs[g]. The row's codes
        start at byte `at` of `codes`, its bf16 scales and biases at halfwords `scales_at` and
        `biases_at` of `halves`; xq and vs are the input as `_quantize_input` lays it out,
        group_chunks 32-byte chunks (64 codes) a group. Per chunk: the low and the high nibbles (the
        even and the odd inputs) times their 32 coarse and 32 fine input bytes, summed in pairs into
        16-bit lanes (AVX2 pmaddubsw: unsigned code times signed input; 2 x 2 x 15 x 127 cannot
        saturate), those into 32-bit lanes (pmaddwd: the coarse ones times 254); per group the lanes
        in fp32 times the weights' scale and the input's fine step; one horizontal sum a row."""

        def codegen(context, builder, sig, args):
            if not INT8_DOTS_ON_HOST:  # never run there (`_variant`); x86 intrinsics would not compile
                return ir.Constant(_F32, 0.0)
            intp = context.get_value_type(types.intp)
            codes_p, halves_p, xq_p, vs_p = (context.make_array(sig.args[i])(context, builder, args[i]).data for i in (0, 2, 5, 6))
            at, scales_at, biases_at, groups, group_chunks = (
                context.cast(builder, args[i], sig.args[i], types.intp) for i in (1, 3, 4, 7, 8))
            maddubs = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(_I16X16, [_I8X32, _I8X32]), "llvm.x86.avx2.pmadd.ub.sw")
            maddwd = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(_I32X8, [_I16X16, _I16X16]), "llvm.x86.avx2.pmadd.wd")

            def vector(ptr, offset):
                return builder.load(builder.bitcast(builder.gep(ptr, [offset]), _I8X32.as_pointer()), align=1)

            def bf16(offset):  # the high half of an fp32
                half = builder.zext(builder.load(builder.gep(halves_p, [offset])), ir.IntType(32))
                return builder.bitcast(builder.shl(half, ir.IntType(32)(16)), _F32)

            acc = cgutils.alloca_once_value(builder, ir.Constant(_F32X8, [0.0] * 8))
            bias_acc = cgutils.alloca_once_value(builder, ir.Constant(_F32, 0.0))
            with cgutils.for_range(builder, groups) as g:
                lanes = cgutils.alloca_once_value(builder, ir.Constant(_I32X8, [0] * 8))
                with cgutils.for_range(builder, group_chunks) as c:
                    chunk = builder.mul(builder.add(builder.mul(g.index, group_chunks), c.index), intp(32))
                    v = vector(codes_p, builder.add(at, chunk))
                    low = builder.and_(v, ir.Constant(_I8X32, [15] * 32))
                    high = builder.lshr(v, ir.Constant(_I8X32, [4] * 32))
                    inputs = builder.mul(chunk, intp(4))
                    coarse, fine = (builder.add(builder.call(maddubs, [low, vector(xq_p, builder.add(inputs, intp(part)))]),
                                                builder.call(maddubs, [high, vector(xq_p, builder.add(inputs, intp(part + 32)))]))
                                    for part in (0, 64))
                    dots = builder.add(builder.call(maddwd, [coarse, ir.Constant(_I16X16, [254] * 16)]),
                                       builder.call(maddwd, [fine, ir.Constant(_I16X16, [1] * 16)]))
                    builder.store(builder.add(builder.load(lanes), dots), lanes)
                step = builder.load(builder.gep(vs_p, [builder.add(groups, g.index)]))  # one fine step of the input
                scale = builder.fmul(bf16(builder.add(scales_at, g.index)), step)
                splat = builder.shuffle_vector(builder.insert_element(ir.Constant(_F32X8, ir.Undefined), scale, ir.IntType(32)(0)),
                                               ir.Constant(_F32X8, ir.Undefined), ir.Constant(_I32X8, [0] * 8))
                builder.store(builder.fadd(builder.load(acc), builder.fmul(builder.sitofp(builder.load(lanes), _F32X8), splat)), acc)
                bias = builder.fmul(bf16(builder.add(biases_at, g.index)), builder.load(builder.gep(vs_p, [g.index])))
                builder.store(builder.fadd(builder.load(bias_acc), bias), bias_acc)
            return builder.fadd(_horizontal_sum(builder, builder.load(acc)), builder.load(bias_acc))

        return types.float32(codes, at, halves, scales_at, biases_at, xq, vs, groups, group_chunks), codegen

else:  # the kernels' intrinsics, named for their importers; nothing compiles them without numba
    _prefetch = _bf16_dot = _int8_row_dot = None


@numba_jit(inline="always")
def _bf16_lanes(x, xp):
    """xp [K]: x [K] in the order `_bf16_dot` multiplies a row's weights in: in each block of 16,
    elements 0-3, 8-11, 4-7, 12-15; the last K % 16 as they are."""
    k = x.shape[0]
    for b in range(0, k - k % 16, 16):
        for j in range(4):
            xp[b + j], xp[b + 4 + j], xp[b + 8 + j], xp[b + 12 + j] = x[b + j], x[b + 8 + j], x[b + 4 + j], x[b + 12 + j]
    for i in range(k - k % 16, k):
        xp[i] = x[i]


@numba_jit(inline="always")
def _plane(c, bits, k):
    """Where input c of k lies in `_permute`'s layout, and the factor it is stored times there."""
    per_word = 32 // bits
    p = c % per_word
    return p * (k // per_word) + c // per_word, np.float32(1.0) / np.float32(1 << (bits * p))


@numba_jit(inline="always")
def _sums(vp, bits, group, vs):
    """vs [K / group] = the group sums of the input that vp [K] holds in `_permute`'s layout."""
    k = vp.shape[0]
    for g in range(k // group):
        acc = np.float32(0.0)
        for c in range(g * group, (g + 1) * group):
            i, f = _plane(c, bits, k)
            acc += vp[i] / f
        vs[g] = acc


@numba_jit()
def _permute(v, bits, group, vp, vs):
    """v [K] -> vp [K]: v as the planes `_rows` reads (module docstring); vs [K / group]: its group sums."""
    for c in range(v.shape[0]):
        i, f = _plane(c, bits, v.shape[0])
        vp[i] = v[c] * f
    _sums(vp, bits, group, vs)


@numba_jit(inline="always")
def _rows(rec8, rec16, offs, k, bits, group, r0, r1, xp, xs, out):
    """out[r] = sum_j w[r, j] x[j] for rows r0 .. r1 (up to ROWS_PER_BLOCK) of one projection of one
    record, read as bytes (rec8) and as halfwords (rec16). offs: the codes' byte offset, the
    scales' and biases' halfword offsets. xp, xs: the input as `_permute` lays it out."""
    per_word = 32 // bits
    mask = (1 << bits) - 1
    words, groups = k // per_word, k // group
    group_words = group // per_word
    codes = rec8.view(np.uint32)
    planes = xp.reshape(per_word, words)
    # bf16 -> fp32: the bits shifted into the high half of a uint32 viewed as float32 (numba cannot
    # bit-cast a scalar, hence buffers): a row's scales, one per word, and its biases.
    scale_bits, bias_bits = np.empty(words, np.uint32), np.empty(groups, np.uint32)
    scale, bias = scale_bits.view(np.float32), bias_bits.view(np.float32)
    w0 = offs[0] // 4
    for r in range(r0, r1):
        for c in range(0, words, 16):  # 16 words: a cache line
            _prefetch(codes, w0 + r * words + PREFETCH_BYTES // 4 + c)
        # Slice the rows first: indexing them with loop counters lets LLVM see non-negative,
        # contiguous indices (an offset it cannot prove >= 0 makes numba's wraparound turn the
        # loads into per-element gathers, 6x slower).
        row = codes[w0 + r * words : w0 + (r + 1) * words]
        s16 = rec16[offs[1] + r * groups : offs[1] + (r + 1) * groups]
        b16 = rec16[offs[2] + r * groups : offs[2] + (r + 1) * groups]
        for g in range(groups):
            s32 = np.uint32(s16[g]) << 16
            for i in range(group_words):
                scale_bits[g * group_words + i] = s32
            bias_bits[g] = np.uint32(b16[g]) << 16
        acc = np.float32(0.0)
        for g in range(groups):
            acc += bias[g] * xs[g]
        for w in range(words):
            v = row[w]
            # The uint32 casts keep 32-bit lanes (numba widens integer ops to 64 bits: without them,
            # int64 lanes and int64 -> float conversions, 1.5x slower).
            t = np.float32(0.0)
            for p in range(per_word):
                t += np.float32(np.uint32(v & np.uint32(mask << (bits * p)))) * planes[p, w]
            acc += scale[w] * t
        out[r] = acc


@numba_jit(inline="always")
def _quantize_input(v, group, vp, vs):
    """v [K] as `_int8_rows` reads it, in two int8 steps per input: t = v / s rounded to the nearest
    (s = the group's largest magnitude / 127), then the remainder times 254 rounded again, so
    v ~ s (coarse + fine / 254). vp's first 2 K bytes hold them INT8_CHUNK inputs at a time: the
    chunk's 32 even inputs, its 32 odd ones (a code byte's low and high nibble), both coarse, then
    both fine; vs [2 K / group]: the group sums of v, then each group's s / 254, the value of one
    fine step (coarse steps are 254 of them)."""
    groups = v.shape[0] // group
    xq = vp.view(np.int8)
    for g in range(groups):
        top, total = np.float32(0.0), np.float32(0.0)
        for c in range(g * group, (g + 1) * group):
            top, total = max(top, abs(v[c])), total + v[c]
        vs[g], vs[groups + g] = total, top / np.float32(127.0 * 254.0)
        inverse = np.float32(127.0) / top if top > 0 else np.float32(0.0)
        for c in range(g * group, (g + 1) * group):
            within = c % INT8_CHUNK
            at = 2 * (c - within) + within % 2 * (INT8_CHUNK // 2) + within // 2
            coarse = np.rint(v[c] * inverse)
            xq[at] = np.int8(coarse)
            xq[at + INT8_CHUNK] = np.int8(np.rint((v[c] * inverse - coarse) * np.float32(254.0)))


@numba_jit(inline="always")
def _int8_rows(rec8, rec16, offs, k, group, r0, r1, vp, vs, out):
    """out[r] = sum_j w[r, j] x[j] for rows r0 .. r1 of one 4-bit projection of one record, x as
    `_quantize_input` lays it out (vp, vs): `_int8_row_dot` a row, its codes prefetched as in `_rows`."""
    groups, row_bytes = k // group, k // 2
    xq = vp.view(np.int8)
    for r in range(r0, r1):
        at = offs[0] + r * row_bytes
        for c in range(0, row_bytes, 64):
            _prefetch(rec8, at + PREFETCH_BYTES + c)
        out[r] = _int8_row_dot(rec8, at, rec16, offs[1] + r * groups, offs[2] + r * groups, xq, vs, groups,
                               group // INT8_CHUNK)


@numba_jit(inline="always")
def _fp4(c):
    """2x the E2M1 value of code c (bits s e1 e0 m), by integer arithmetic that vectorizes (a table
    lookup per code measured 2.5x slower): magnitude (2 [e != 0] + m) << (e - [e != 0]), i.e. 0, 1,
    2, 3, 4, 6, 8, 12; the halving is in the scale."""
    e, m = (c >> np.uint32(1)) & np.uint32(3), c & np.uint32(1)
    normal = np.uint32(e != 0)
    magnitude = np.float32(np.int32(((normal << np.uint32(1)) | m) << (e - normal)))
    return magnitude * (np.float32(1.0) - np.float32(2.0) * np.float32(c >> np.uint32(3)))


@numba_jit(inline="always")
def _mxfp4_rows(rec8, offs, k, r0, r1, x, half_pow2, out):
    """out[r] = sum_j w[r, j] x[j] for rows r0 .. r1 of one MXFP4 projection of one record: offs
    holds the blocks' and the scales' byte offsets; x [2, K/2]: the even inputs, then the odd ones
    (a byte's low and high code); half_pow2 [256]: 2^(s - 128) of each scale byte."""
    half, groups = k // 2, k // MXFP4_GROUP
    per_group = MXFP4_GROUP // 2  # bytes
    even, odd = x[0], x[1]
    for r in range(r0, r1):
        for c in range(0, half, 64):  # a cache line at a time
            _prefetch(rec8, offs[0] + r * half + PREFETCH_BYTES + c)
        row = rec8[offs[0] + r * half : offs[0] + (r + 1) * half]
        scales = rec8[offs[1] + r * groups : offs[1] + (r + 1) * groups]
        acc = np.float32(0.0)
        for g in range(groups):
            # sliced first, indexed by loop counters: see `_rows`
            codes, xe, xo = row[g * per_group : (g + 1) * per_group], even[g * per_group :], odd[g * per_group :]
            t = np.float32(0.0)
            for i in range(per_group):
                b = np.uint32(codes[i])
                t += _fp4(b & np.uint32(15)) * xe[i] + _fp4(b >> np.uint32(4)) * xo[i]
            acc += half_pow2[scales[g]] * t
        out[r] = acc


@numba_jit(inline="always")
def _even_odd_at(c, k):
    """Where input c of k lies in `_even_odd`'s layout."""
    return c % 2 * (k // 2) + c // 2


@numba_jit(inline="always")
def _even_odd(v, out):
    """out [K] = v's even elements, then its odd ones (the inputs of a byte's low and high codes)."""
    for c in range(v.shape[0]):
        out[_even_odd_at(c, v.shape[0])] = v[c]


# The record format (affine bits and group, or MXFP4) and the kind (FP32_PLANES, ...) are constants
# of the kernels that call the helpers below: inlined, each branch on them folds away.
@numba_jit(inline="always")
def _lay_out(v, bits, group, kind, vp, vs):
    """vp [K], vs [2 K / group]: v [K] as `_project` reads a projection's input in this kind
    (MXFP4: `_even_odd`; FP32_PLANES: `_permute`, with vs's first half v's group sums;
    INT8_DOTS: `_quantize_input`)."""
    if kind == MXFP4:
        _even_odd(v, vp)
    elif kind == INT8_DOTS:
        _quantize_input(v, group, vp, vs)
    else:
        _permute(v, bits, group, vp, vs)


@numba_jit(inline="always")
def _input_at(c, k, bits, kind):
    """Where input c of k lies in the layout `_lay_out` starts from (INT8_DOTS: v itself, which it
    quantizes), and the factor it is stored times there."""
    if kind == MXFP4:
        return _even_odd_at(c, k), np.float32(1.0)
    if kind == INT8_DOTS:
        return c, np.float32(1.0)
    return _plane(c, bits, k)


@numba_jit(inline="always")
def _project(rec8, rec16, offs, k, bits, group, kind, r0, r1, xp, xs, half_pow2, out):
    """out[r] = sum_j w[r, j] x[j] for rows r0 .. r1 of one projection of one record in any kind:
    x as `_lay_out` gives it (xp, xs), offs the projection's three of `_offsets`."""
    if kind == MXFP4:
        _mxfp4_rows(rec8, offs, k, r0, r1, xp.reshape(2, k // 2), half_pow2, out)
    elif kind == INT8_DOTS:
        _int8_rows(rec8, rec16, offs, k, group, r0, r1, xp, xs, out)
    else:
        _rows(rec8, rec16, offs, k, bits, group, r0, r1, xp, xs, out)


@numba_jit(inline="always")
def _bf16(half, buf):
    """The bf16 whose bits are `half`, as fp32: shifted into the high half of buf, a uint32 [1]
    (numba cannot bit-cast a scalar)."""
    buf[0] = np.uint32(half) << 16
    return buf.view(np.float32)[0]


@numba_jit(inline="always")
def _swiglu(h, c, inter, rec16, bias_at, with_bias, limit, alpha, buf):
    """Activation c of an expert from h [2 * inter], its gate_up output (gate rows, then up rows):
    with_bias, the expert's gate_up biases added first (halfwords from bias_at of rec16, through buf
    as in `_bf16`); limit > 0, gpt-oss's clamped SwiGLU (layers/mlp.py `Swiglu`), else silu(gate) * up."""
    gate, up = h[c], h[inter + c]
    if with_bias:
        gate += _bf16(rec16[bias_at + c], buf)
        up += _bf16(rec16[bias_at + inter + c], buf)
    if limit > 0:
        gate, up = min(gate, np.float32(limit)), max(min(up, np.float32(limit)), np.float32(-limit))
        return gate / (np.float32(1.0) + np.exp(-np.float32(alpha) * gate)) * (up + np.float32(1.0))
    return gate / (np.float32(1.0) + np.exp(-gate)) * up


@numba_jit(inline="always")
def _activation(h, inter, rec16, offs, bits, group, kind, with_bias, limit, alpha, act, ap, asum, buf):
    """An expert's SwiGLU activation act [inter] from h [2 * inter], its gate_up output (`_swiglu`;
    offs: `_offsets`), then laid out as down's input (ap, asum: `_lay_out`)."""
    for c in range(inter):
        act[c] = _swiglu(h, c, inter, rec16, offs[4], with_bias, limit, alpha, buf)
    _lay_out(act, bits, group, kind, ap, asum)


@numba_jit(inline="always")
def _add_weighted(out, weight, y, rec16, offs, with_bias, buf):
    """out [H] += weight * (y + the expert's down bias, where it has one): y [H] its down output."""
    for r in range(out.shape[0]):
        term = y[r]
        if with_bias:
            term += _bf16(rec16[offs[9] + r], buf)
        out[r] += weight * term


@functools.cache
def _kernel(bits: int, group: int, kind: int, with_bias: bool, limit: float, alpha: float, parallel: bool):
    """`experts` for one record format and activation, compiled on first use. The format and the
    activation are constants of its closure and `_rows` is inlined into it (numba IR), so LLVM sees
    constant masks and plane-loop trip counts (given as arguments, the kernel is ~1.5x slower) and
    drops the branches a format does not take. limit > 0: gpt-oss's clamped SwiGLU (layers/mlp.py).
    parallel=False: the same loops on the calling thread. The loop function is a constant of the
    closure because numba keys its disk cache by code and closure: with `prange` in both, the two
    kernels shared one cache entry, and whichever compiled first was loaded for both (the parallel
    one then ran on one thread)."""
    loop = prange if parallel else range

    @numba_jit(parallel=parallel)
    def experts(p8, p16, slots, weights, tokens, by_expert, starts, offs, inter, x, out, half_pow2):
        """out [T, H] = for each token t, the sum over its pairs p (tokens[p] == t, in pair order) of
        weights[p] * expert(record slots[p], x[t]). by_expert lists the pairs expert after expert,
        expert u's from starts[u] to starts[u + 1]: one task reads a block of an expert's rows once
        for all of its tokens (the rows stay in cache between them). p8 and p16: the pool as bytes
        and as halfwords; offs: `_offsets(layout)`."""
        T, hidden = x.shape
        pairs, experts_n = slots.shape[0], starts.shape[0] - 1
        # Projection inputs as `_lay_out` gives them: each token's x for gate_up, each pair's
        # activation for down.
        xp, xs = np.empty((T, hidden), np.float32), np.empty((T, 2 * (hidden // group)), np.float32)
        for t in range(T):
            _lay_out(x[t], bits, group, kind, xp[t], xs[t])
        ap, asum = np.empty((pairs, inter), np.float32), np.empty((pairs, 2 * (inter // group)), np.float32)
        h, y = np.empty((pairs, 2 * inter), np.float32), np.empty((pairs, hidden), np.float32)
        act = np.empty(inter, np.float32)
        bf16_buf = np.empty(1, np.uint32)
        for proj in range(2):  # gate_up, then down, through one parallel loop: compiled once
            if proj == 1:
                for p in range(pairs):
                    _activation(h[p], inter, p16[slots[p]], offs, bits, group, kind, with_bias, limit, alpha, act, ap[p],
                                asum[p], bf16_buf)
            dst, k = (h, hidden) if proj == 0 else (y, inter)
            blocks = (dst.shape[1] + ROWS_PER_BLOCK - 1) // ROWS_PER_BLOCK
            for task in loop(experts_n * blocks):
                u = task // blocks
                offs_p = offs[5 * proj : 5 * proj + 3]
                r0 = task % blocks * ROWS_PER_BLOCK
                r1 = min(r0 + ROWS_PER_BLOCK, dst.shape[1])
                for q in range(starts[u], starts[u + 1]):
                    p = by_expert[q]
                    rec = slots[p]
                    # input: the pair's token's x for gate_up, the pair's own activation for down
                    src, src_sums = (xp[tokens[p]], xs[tokens[p]]) if proj == 0 else (ap[p], asum[p])
                    _project(p8[rec], p16[rec], offs_p, k, bits, group, kind, r0, r1, src, src_sums, half_pow2, dst[p])
        out[:, :] = 0.0
        for p in range(pairs):
            _add_weighted(out[tokens[p]], weights[p], y[p], p16[slots[p]], offs, with_bias, bf16_buf)

    return experts


def _kind(layout: RecordLayout) -> int:
    """How the kernels compute this layout's rows: MXFP4 records as MXFP4; 4-bit affine ones by
    integer dot products where the host has them and the groups hold whole chunks; FP32_PLANES else."""
    if layout.scheme == "mxfp4":
        return MXFP4
    if INT8_DOTS_ON_HOST and layout.bits == 4 and layout.group_size % INT8_CHUNK == 0:
        return INT8_DOTS
    return FP32_PLANES


def _variant(layout: RecordLayout, act: Swiglu) -> tuple:
    """What a kernel is compiled for (`_kernel`'s first arguments): the record format and the kind
    its rows are computed in, whether the experts have biases, and the activation (limit 0: plain SwiGLU)."""
    return layout.bits, layout.group_size, _kind(layout), layout.with_bias, act.limit or 0.0, act.alpha


def _offsets(layout: RecordLayout) -> np.ndarray:
    """Per projection (gate_up, then down), from the record start: the codes (bytes), the scales
    (halfwords; MXFP4: bytes), the affine biases (halfwords), 0, the expert's bias (halfwords; -1 without)."""
    seg = {s.name: s for s in layout.segments}
    offs = []
    for proj in ("gate_up_proj", "down_proj"):
        if layout.scheme == "mxfp4":
            offs += [seg[f"{proj}.blocks"].offset, seg[f"{proj}.scales"].offset, 0]
        else:
            offs.append(seg[f"{proj}.weight"].offset)
            offs += [seg[f"{proj}.{t}"].offset // 2 for t in ("scales", "biases")]
        offs += [0, seg[f"{proj}.bias"].offset // 2 if layout.with_bias else -1]
    return np.array(offs, np.int64)


@numba_jit()
def _group_pairs(slots, rows, tokens, T):
    """The pairs listed expert after expert (a stable order) and where each expert's start, after
    checking every slot and token index: (by_expert, starts, 0), or 1 / 2 for a slot / a token
    out of range."""
    n = slots.shape[0]
    for p in range(n):
        if not (0 <= slots[p] < rows):
            return np.empty(0, np.int64), np.empty(0, np.int64), 1
        if not (0 <= tokens[p] < T):
            return np.empty(0, np.int64), np.empty(0, np.int64), 2
    by_expert = np.argsort(slots, kind="mergesort")
    starts = np.empty(n + 1, np.int64)
    count = 0
    for q in range(n):
        if q == 0 or slots[by_expert[q]] != slots[by_expert[q - 1]]:
            starts[count] = q
            count += 1
    starts[count] = n
    return by_expert, starts[: count + 1].copy(), 0


def _half_pow2() -> np.ndarray:
    """2^(s - 128) for each E8M0 byte s (the E2M1 values' factor 1/2 folded in; 255, NaN, as inf)."""
    with np.errstate(over="ignore"):
        return np.ldexp(np.float32(1.0), np.arange(256) - 128).astype(np.float32)


# numba's workqueue layer aborts on parallel loops launched from two threads at once: every call
# holds this lock.
_RUNNING = threading.Lock()


@functools.cache
def _worker() -> ThreadPoolExecutor:
    """The thread `submit` runs calls on."""
    return ThreadPoolExecutor(1, "cpu-experts")


class CpuExperts:
    """Routed experts of one record layout, computed on the CPU on the module's worker thread.

    experts(pool, slots, weights, x) -> [H] fp32 = sum_j weights[j] * expert(pool[slots[j]], x),
    for one token, on the calling thread (a hand-off to another thread costs more than a small
    model's experts); `submit` runs it on a worker thread and returns a Future. Both use `threads`
    numba threads, and the kernel releases the GIL. The pool's rows must not change until the
    result is ready."""

    @staticmethod
    def supports(layout: RecordLayout) -> bool:
        """MXFP4 records, and affine quantized records whose groups are whole 32-bit words (not 16-bit ones)."""
        return layout.scheme == "mxfp4" or (layout.bits in SUPPORTED_BITS and layout.group_size * layout.bits % 32 == 0)

    def __init__(self, layout: RecordLayout, threads: int | None = None, act: Swiglu = SILU):
        if numba is None:
            raise RuntimeError("CpuExperts needs numba: pip install 'flashmoe[cpu-experts]'")
        if not self.supports(layout):
            raise ValueError(
                f"CpuExperts computes MXFP4 and {'/'.join(map(str, SUPPORTED_BITS))}-bit records with groups of whole "
                f"32-bit words, not bits={layout.bits} with group size {layout.group_size}"
            )
        self.layout = layout
        default = max(1, (os.cpu_count() or 1) - 1)  # a core left for the thread that drives the GPU
        self.threads = max(1, min(threads or default, numba.config.NUMBA_NUM_THREADS))
        self._offsets = _offsets(layout)
        variant = _variant(layout, act)
        self._kernels = _kernel(*variant, parallel=False), _kernel(*variant, parallel=True)
        self._half_pow2 = _half_pow2()

    def __call__(self, pool: torch.Tensor, slots: Sequence[int], weights: Sequence[float] | torch.Tensor, x: torch.Tensor,
                 tokens: Sequence[int] | None = None) -> torch.Tensor:
        """x [H] -> [H]: sum_j weights[j] * expert(pool[slots[j]], x). x [T, H] (several tokens): pair j
        is token tokens[j]'s -> [T, H]; an expert several tokens use is read once for all of them."""
        return self._run(*self._arguments(pool, slots, weights, x, tokens))

    def submit(self, pool: torch.Tensor, slots: Sequence[int], weights: Sequence[float] | torch.Tensor, x: torch.Tensor,
               tokens: Sequence[int] | None = None) -> Future:
        """Queue the call on the worker thread; the Future's result is what the call returns."""
        return _worker().submit(self._run, *self._arguments(pool, slots, weights, x, tokens))

    def warmup(self) -> None:
        """Compile the kernel (seconds; cached on disk after the first time) and start numba's
        threads, on one zero record."""
        pool = torch.zeros(1, self.layout.record_size, dtype=torch.uint8)
        self(pool, [0], [1.0], torch.zeros(self.layout.hidden_size))

    def _arguments(self, pool, slots, weights, x, tokens) -> tuple:
        """Checked numpy arrays of the arguments: a view of the pool, copies of the small ones (the
        caller may reuse its buffers once submit returns); the pairs grouped by expert. A decode
        step makes this call once per layer: it is kept to a few numpy calls (entry 73)."""
        lay = self.layout
        if pool.device.type != "cpu" or pool.dtype != torch.uint8 or pool.dim() != 2 or not pool.is_contiguous():
            raise ValueError(
                f"pool must be a contiguous CPU uint8 tensor [slots, record_size], got {pool.dtype} "
                f"{list(pool.shape)} on {pool.device}"
            )
        if pool.shape[1] != lay.record_size:
            raise ValueError(f"pool rows are {pool.shape[1]} bytes, records of this layout {lay.record_size}")
        slots = np.array(slots, np.int64).reshape(-1)
        if isinstance(weights, torch.Tensor):
            weights = weights.detach().to("cpu", torch.float32, copy=True).reshape(-1).numpy()
        else:
            weights = np.array(weights, np.float32).reshape(-1)
        if slots.shape != weights.shape:
            raise ValueError(f"{slots.size} slots but {weights.size} weights")
        one = x.dim() == 1
        if x.shape[-1] != lay.hidden_size or x.dim() not in (1, 2):
            raise ValueError(f"x must be [{lay.hidden_size}] or [tokens, {lay.hidden_size}], got {list(x.shape)}")
        xs = x.detach().to("cpu", torch.float32, copy=True).reshape(-1, lay.hidden_size).numpy()
        tokens = np.zeros(slots.size, np.int64) if tokens is None else np.array(tokens, np.int64).reshape(-1)
        if tokens.shape != slots.shape:
            raise ValueError(f"tokens must name one of x's {xs.shape[0]} rows for each of the {slots.size} slots")
        # the kernel does not check bounds: every index is checked here
        by_expert, starts, bad = _group_pairs(slots, pool.shape[0], tokens, xs.shape[0])
        if bad == 1:
            raise IndexError(f"slots {slots.tolist()} outside the pool's {pool.shape[0]} rows")
        if bad == 2:
            raise ValueError(f"tokens must name one of x's {xs.shape[0]} rows for each of the {slots.size} slots")
        p8 = pool.numpy()
        return p8, p8.view(np.uint16), slots, weights, tokens, by_expert, starts, xs, one

    def _run(self, p8, p16, slots, weights, tokens, by_expert, starts, x, one) -> torch.Tensor:
        out = np.empty_like(x)
        # A parallel launch costs ~100 us per loop on a 2-core VM (entry 73): a call reading little
        # runs on the calling thread, where 8 of the demo's experts take 55 us instead of 260.
        parallel = self.threads > 1 and (starts.shape[0] - 1) * self.layout.record_size >= PARALLEL_MIN_BYTES
        with _RUNNING:
            numba.set_num_threads(self.threads)  # numba keeps the count per calling thread
            self._kernels[parallel](p8, p16, slots, weights, tokens, by_expert, starts, self._offsets,
                                    self.layout.intermediate_size, x, out, self._half_pow2)
        return torch.from_numpy(out[0] if one else out)
