"""Routed experts computed by the CPU for a GPU that never waits on the host: resident decode runs
each token as one CUDA graph (runtime/graphs.py), so the CPU's share of a layer's host-resident
experts cannot go through a host sync and a worker hand-off (docs/EXPERIMENTS.md entry 26: the
Python hand-off alone cost more than the expert). Instead the two sides meet in a mailbox of
pinned host memory, which the GPU reads and writes in place (it is mapped into its address space):

  GPU (kernels/host_handoff.py `publish`)     CPU (ExpertServer's threads, spinning)
  x, the CPU's experts and weights -> mail
  mail[REQUEST] = seq (release)          ->   see seq; gate_up + SwiGLU, a share of rows each
  the GPU's experts (host-resident ones       barrier; down + weighted sum, a share of rows each
  read over PCIe meanwhile)                   the last thread out: mail[DONE] = seq (release)
  `join`: spin until mail[DONE] == seq   <-
  out += mail[RESULT]

The threads are persistent numba functions (GIL released) that split every request statically
into equal row ranges and meet at counters that only grow (a request's barrier is reached at
threads x requests served): no thread pool, no allocation, no Python between the GPU's signal and
the CPU's answer. They spin while requests come, which takes their cores (all but one by default),
and after IDLE_CYCLES without one go back to Python and sleep, polling every IDLE_POLL_S: the
first request after a pause waits that long, the next ones not at all.

The arithmetic is kernels/cpu_experts.py's (`_lay_out`, `_project`, `_swiglu`: affine and MXFP4
records, expert biases, gpt-oss's clamped SwiGLU), so the definition it is tested against is the
same: `layout.weights` (+ `layout.biases`) and `swiglu_expert` in fp32.
"""

from __future__ import annotations

import functools
import os
import platform
import threading
import time

import numpy as np
import torch

from ..formats.packed import RecordLayout
from ..layers.mlp import SILU, Swiglu
from .cpu_experts import (FP32_PLANES, INT8_DOTS, ROWS_PER_BLOCK, SUPPORTED_BITS, CpuExperts, numba_jit, _bf16, _half_pow2, _input_at, _lay_out,
                          _offsets, _project, _sums, _swiglu, _variant, numba)

# Mailbox words (int32; fp32 where noted). The flags the two sides spin on sit on lines of their own.
REQUEST = 0  # seq of the newest request, written by the GPU after the fields below
DONE = 16  # seq of the newest answered request, written by the CPU after RESULT
STOP = 32  # nonzero: the threads return
ERROR = 48  # seq of a request the GPU stopped waiting for (join's bound on spinning)
COUNT = 64  # experts in the request
SLOTS = 80  # their host-tier slots
WEIGHTS = 96  # their routing weights (fp32)
MAX_EXPERTS = 16
X = 128  # the experts' input, fp32 [H]; RESULT follows it: fp32 [H]
IDLE_CYCLES = 1 << 27  # time-stamp counter ticks (~50 ms) of spinning without a request before sleeping
IDLE_POLL_S = 2e-4
PHASES = ("gate_up + SwiGLU", "barrier", "down + sum")  # of each request, timed per thread


def mailbox_words(hidden: int) -> int:
    return X + 2 * hidden


if numba is not None:
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    def _element_pointer(context, builder, aryty, ary, idx):
        return cgutils.get_item_pointer(context, builder, aryty, context.make_array(aryty)(context, builder, ary), [idx])

    # numba has no atomics on the CPU; these emit LLVM's. Plain loads would not do for spinning:
    # LLVM may hoist a load the loop never writes out of the loop.
    @intrinsic
    def atomic_load(typingctx, arr, idx):
        """arr[idx], an acquire load."""

        def codegen(context, builder, sig, args):
            ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1])
            return builder.load_atomic(ptr, "acquire", sig.args[0].dtype.bitwidth // 8)

        return arr.dtype(arr, types.intp), codegen

    @intrinsic
    def atomic_store(typingctx, arr, idx, value):
        """arr[idx] = value, a release store."""

        def codegen(context, builder, sig, args):
            ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1])
            builder.store_atomic(args[2], ptr, "release", sig.args[0].dtype.bitwidth // 8)
            return context.get_dummy_value()

        return types.void(arr, types.intp, arr.dtype), codegen

    @intrinsic
    def atomic_add(typingctx, arr, idx, value):
        """arr[idx] += value atomically -> the old value."""

        def codegen(context, builder, sig, args):
            ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1])
            return builder.atomic_rmw("add", ptr, args[2], "acq_rel")

        return arr.dtype(arr, types.intp, arr.dtype), codegen

    @intrinsic
    def cycles(typingctx):
        """The time-stamp counter (llvm.readcyclecounter)."""

        def codegen(context, builder, sig, args):
            fnty = ir.FunctionType(ir.IntType(64), [])
            return builder.call(cgutils.get_or_insert_function(builder.module, fnty, "llvm.readcyclecounter"), [])

        return types.int64(), codegen

    @intrinsic
    def spin_pause(typingctx):
        """A spin-wait hint (x86 PAUSE; nothing elsewhere): the spinning core draws less power, which
        leaves more turbo to the thread that drives the GPU, and leaves the loop gently when the
        flag changes."""

        def codegen(context, builder, sig, args):
            if platform.machine().lower() in ("x86_64", "amd64"):
                fnty = ir.FunctionType(ir.VoidType(), [])
                builder.call(cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.sse2.pause"), [])
            return context.get_dummy_value()

        return types.void(), codegen


@numba_jit()
def _ticks() -> int:
    return cycles()


@functools.cache
def tsc_hz() -> float:
    """Time-stamp counter ticks per second, over 50 ms of the wall clock."""
    t0, c0 = time.perf_counter(), _ticks()
    time.sleep(0.05)
    return (_ticks() - c0) / (time.perf_counter() - t0)


@numba_jit(inline="always")
def _share(total, part, parts):
    """Rows [lo, hi) of `total` for thread `part` of `parts`: equal shares."""
    return total * part // parts, total * (part + 1) // parts


@numba_jit(inline="always")
def _wait_for(counts, idx, target):
    """Arrive at the barrier counts[idx] and spin until every thread has (it counts arrivals over
    all requests, so it needs no reset)."""
    atomic_add(counts, idx, np.int64(1))
    while atomic_load(counts, idx) < target:
        spin_pause()


@functools.cache
def _server(bits: int, group: int, kind: int, with_bias: bool, limit: float, alpha: float):
    """The threads' loop for one record format and activation (constants of the closure, as in
    cpu_experts._kernel, whose arguments these are)."""

    @numba_jit()
    def serve(part, parts, served, last, mail, mailf, counts, p8, p16, offs, hidden, inter, act, half_pow2, phases):
        """Thread `part` of `parts`, which has answered `served` requests, the last one `last`:
        answer the ones that follow until STOP or IDLE_CYCLES without one -> (served, last). act
        [MAX_EXPERTS, inter] is shared: each expert's SwiGLU activation, laid out for down by `_lay_out`.
        phases[part, :4] += this thread's time-stamp ticks per phase of each request (PHASES), and 1."""
        xp, xs = np.empty(hidden, np.float32), np.empty(2 * (hidden // group), np.float32)
        h, y = np.empty(2 * inter, np.float32), np.empty(hidden, np.float32)
        # down's inputs: act itself, or (INT8_DOTS) each thread's quantized copy of it
        act_in, act_sums = np.empty((MAX_EXPERTS, inter), np.float32), np.empty((MAX_EXPERTS, 2 * (inter // group)), np.float32)
        bf16_buf = np.empty(1, np.uint32)
        since = cycles()
        while True:
            seq = atomic_load(mail, REQUEST)
            if seq == last:
                if atomic_load(mail, STOP) != 0 or cycles() - since > IDLE_CYCLES:
                    return served, last
                spin_pause()
                continue
            last, served = seq, served + 1
            t0 = cycles()
            n = mail[COUNT]
            _lay_out(mailf[X : X + hidden], bits, group, kind, xp, xs)
            # gate_up and SwiGLU: this thread's share of the n x inter activations
            lo, hi = _share(n * inter, part, parts)
            for j in range(lo // inter, (hi + inter - 1) // inter):
                rec8, rec16 = p8[mail[SLOTS + j]], p16[mail[SLOTS + j]]
                i0, i1 = max(lo - j * inter, 0), min(hi - j * inter, inter)
                for r0 in range(i0, i1, ROWS_PER_BLOCK):
                    r1 = min(r0 + ROWS_PER_BLOCK, i1)
                    _project(rec8, rec16, offs[0:3], hidden, bits, group, kind, r0, r1, xp, xs, half_pow2, h)  # gate
                    _project(rec8, rec16, offs[0:3], hidden, bits, group, kind, inter + r0, inter + r1, xp, xs, half_pow2, h)  # up
                for i in range(i0, i1):
                    c, f = _input_at(i, inter, bits, kind)
                    act[j, c] = _swiglu(h, i, inter, rec16, offs[4], with_bias, limit, alpha, bf16_buf) * f
            t1 = cycles()
            _wait_for(counts, 0, parts * served)
            t2 = cycles()
            # down and the weighted sum: this thread's share of the output rows, experts in order
            if kind == FP32_PLANES:  # the affine bias term's group sums (module cpu_experts' docstring)
                for j in range(n):
                    _sums(act[j], bits, group, act_sums[j])
            elif kind == INT8_DOTS:
                for j in range(n):
                    _lay_out(act[j], bits, group, kind, act_in[j], act_sums[j])
            lo, hi = _share(hidden, part, parts)
            result = mailf[X + hidden : X + 2 * hidden]
            for j in range(n):
                rec8, rec16, w = p8[mail[SLOTS + j]], p16[mail[SLOTS + j]], mailf[WEIGHTS + j]
                for r0 in range(lo, hi, ROWS_PER_BLOCK):
                    r1 = min(r0 + ROWS_PER_BLOCK, hi)
                    _project(rec8, rec16, offs[5:8], inter, bits, group, kind, r0, r1, act_in[j] if kind == INT8_DOTS else act[j],
                             act_sums[j], half_pow2, y)
                    for r in range(r0, r1):
                        if with_bias:
                            y[r] += _bf16(rec16[offs[9] + r], bf16_buf)
                        result[r] = w * y[r] if j == 0 else result[r] + w * y[r]
            since = cycles()
            phases[part, 0] += t1 - t0
            phases[part, 1] += t2 - t1
            phases[part, 2] += since - t2
            phases[part, 3] += 1
            if atomic_add(counts, 8, np.int64(1)) == parts * served - 1:  # the last thread out answers
                atomic_store(mail, DONE, seq)

    return serve


class ExpertServer:
    """Threads that compute the experts a mailbox asks for, from the host tier's records in place.

    `mail` is the pinned int32 mailbox (module docstring) the GPU kernels address; `request` asks
    from the host instead (tests, timing the CPU alone). The pool's records must not change while
    the server runs."""

    def __init__(self, layout: RecordLayout, pool: torch.Tensor, threads: int | None = None, act: Swiglu = SILU):
        if numba is None:
            raise RuntimeError("the CPU's share of resident experts needs numba: pip install 'flashmoe[cpu-experts]'")
        if not CpuExperts.supports(layout):
            raise ValueError(f"the CPU's share computes MXFP4 and {'/'.join(map(str, SUPPORTED_BITS))}-bit records in "
                             f"groups of whole 32-bit words, not {layout.bits}-bit records in groups of {layout.group_size}")
        if pool.device.type != "cpu" or pool.dtype != torch.uint8 or pool.dim() != 2 or pool.shape[1] != layout.record_size:
            raise ValueError(f"pool must be the host tier's uint8 [slots, {layout.record_size}] tensor")
        self.layout, self.pool = layout, pool
        self.threads = max(1, threads or (os.cpu_count() or 2) - 1)  # a core left for the thread that drives the GPU
        H, I = layout.hidden_size, layout.intermediate_size
        self.mail = torch.zeros(mailbox_words(H), dtype=torch.int32, pin_memory=torch.cuda.is_available())
        self._mail = self.mail.numpy()
        self._barriers = np.zeros(16, np.int64)  # two counters, a cache line apart
        self._phases = np.zeros((self.threads, 8), np.int64)  # a cache line per thread
        p8 = pool.numpy()
        self._args = (self._mail, self._mail.view(np.float32), self._barriers, p8, p8.view(np.uint16),
                      _offsets(layout), H, I, np.zeros((MAX_EXPERTS, I), np.float32), _half_pow2(), self._phases)
        self._serve = _server(*_variant(layout, act))
        self._running: list[threading.Thread] = []

    def start(self) -> None:
        """Compile the loop (once per machine: cached on disk) and start the threads."""
        mail = self._mail
        mail[STOP] = 1
        last = int(mail[REQUEST])  # the threads answer what comes after, however late they start
        self._serve(0, 1, 0, last, *self._args)  # returns at once: compiles
        mail[STOP] = 0
        self._barriers[:] = 0  # they count from zero again (each thread's `served` does)
        self._phases[:] = 0
        self._running = [threading.Thread(target=self._run, args=(p, last), daemon=True, name=f"cpu-expert-server-{p}")
                         for p in range(self.threads)]
        for t in self._running:
            t.start()

    def _run(self, part: int, last: int) -> None:
        mail, served = self._mail, 0
        while not mail[STOP]:
            served, last = self._serve(part, self.threads, served, last, *self._args)  # spins, GIL released
            while mail[REQUEST] == last and not mail[STOP]:
                time.sleep(IDLE_POLL_S)

    def stop(self) -> None:
        self._mail[STOP] = 1
        for t in self._running:
            t.join()
        self._running = []

    def phase_counters(self) -> np.ndarray:
        """[threads, len(PHASES) + 1]: each thread's time-stamp ticks in each phase summed over the
        requests since start, and their number (`phase_seconds` turns two readings into times)."""
        return self._phases[:, : len(PHASES) + 1].copy()

    @staticmethod
    def phase_seconds(before: np.ndarray, after: np.ndarray) -> np.ndarray:
        """[threads, len(PHASES)]: mean seconds per request in each phase between two phase_counters."""
        d = after - before
        return d[:, :-1] / np.maximum(d[:, -1:], 1) / tsc_hz()

    @property
    def running(self) -> bool:
        return bool(self._running)

    def request(self, slots: list[int], weights: list[float], x: torch.Tensor) -> torch.Tensor:
        """Ask from the host, as the GPU's `publish` would, and wait -> [H] fp32 weighted sum."""
        if not self.running:
            raise RuntimeError("the server is not running: start() it first")
        if not 0 < len(slots) <= MAX_EXPERTS or len(weights) != len(slots):
            raise ValueError(f"1 to {MAX_EXPERTS} experts with one weight each, got {len(slots)} and {len(weights)}")
        H, mail = self.layout.hidden_size, self._mail
        mailf = mail.view(np.float32)
        mail[COUNT] = len(slots)
        mail[SLOTS : SLOTS + len(slots)] = slots
        mailf[WEIGHTS : WEIGHTS + len(slots)] = weights
        mailf[X : X + H] = x.float().numpy()
        seq = int(mail[REQUEST]) + 1
        mail[REQUEST] = seq  # a numpy store; x86 keeps it after the stores above
        while mail[DONE] != seq:  # numpy re-reads memory on every access
            pass
        return torch.from_numpy(mailf[X + H : X + 2 * H].copy())
