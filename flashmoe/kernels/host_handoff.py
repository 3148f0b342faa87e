"""The GPU's side of the CPU's share of resident experts (kernels/cpu_expert_server.py has the
mailbox and the CPU's side). Two one-program launches per decode layer, both capturable:

  publish: the layer's slots looked up on the device and counted (slot_lookup.lookup_counted); of the
           routed experts whose records lie in host memory, the last counts[n] in routing order
           go to the CPU: their slots and weights, and the input x, are written to the mailbox and
           the request is released; in the GPU's own list they become a GPU-resident slot with
           weight zero (the gathered kernels apply the weight to each expert's finite activation,
           so they add exactly nothing for them, for the cost of one HBM read).
  join:    if the layer asked the CPU, spin (bounded) until the mailbox says done, then
           out += the CPU's sum.

How many the CPU takes from n host-resident experts: `counts[n]` (a device table, so a new split
needs no new graph), at most `max_cpu` (and at most cpu_expert_server.MAX_EXPERTS). The engine
builds the table from the CPU's and the link's rates measured at start (experts/cpu_share.py
split_counts) so that both finish together; `counts_for_share` is the fixed-fraction table the
first version used (round(n * 0.4): the H200's 31 GB/s of CPU beside 52 GB/s of PCIe, entry 39).
`host_share_reference` is the plain PyTorch definition of publish's choice.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from . import cpu_expert_server as mailbox
from .cpu_expert_server import MAX_EXPERTS
from .slot_lookup import lookup_counted

# the mailbox's words, as constants the kernels can read
COUNT, DONE, ERROR, REQUEST = (tl.constexpr(v) for v in (mailbox.COUNT, mailbox.DONE, mailbox.ERROR, mailbox.REQUEST))
SLOTS, WEIGHTS, X = (tl.constexpr(v) for v in (mailbox.SLOTS, mailbox.WEIGHTS, mailbox.X))
JOIN_SPINS = 1 << 22  # polls of the mailbox before join gives up (each a PCIe read of ~1 us): seconds


@triton.jit
def _publish_kernel(
    ids_ptr, weights_ptr, x_ptr, table_ptr, uses_ptr, slots_ptr, gpu_weights_ptr, state_ptr, computed_ptr,
    mail_ptr, mailf_ptr, counts_ptr, capacity, host_slot0, idle_slot, max_cpu, last_count,
    K: tl.constexpr, KP: tl.constexpr, H: tl.constexpr, HP: tl.constexpr,
):
    j = tl.arange(0, KP)
    live = j < K
    slot = lookup_counted(table_ptr, uses_ptr, tl.load(ids_ptr + j, mask=live, other=0), live)
    w = tl.load(weights_ptr + j, mask=live, other=0.0).to(tl.float32)
    host = live & ((slot < 0) | (slot >= capacity))
    n_host = tl.sum(host.to(tl.int32), axis=0)
    c = tl.minimum(tl.load(counts_ptr + tl.minimum(n_host, last_count)), max_cpu)
    # host-resident experts at or after position j: the CPU takes the last c (ranks 1 .. c)
    rank = n_host - tl.cumsum(host.to(tl.int32), axis=0) + host.to(tl.int32)
    to_cpu = host & (rank <= c)
    tl.store(slots_ptr + j, tl.where(to_cpu, idle_slot, slot), mask=live)
    tl.store(gpu_weights_ptr + j, tl.where(to_cpu, 0.0, w), mask=live)
    tl.store(mail_ptr + SLOTS + c - rank, (slot - host_slot0).to(tl.int32), mask=to_cpu)
    tl.store(mailf_ptr + WEIGHTS + c - rank, w, mask=to_cpu)
    seq = tl.load(state_ptr)
    if c > 0:
        h = tl.arange(0, HP)
        tl.store(mailf_ptr + X + h, tl.load(x_ptr + h, mask=h < H).to(tl.float32), mask=h < H)
        tl.store(mail_ptr + COUNT, c)
        seq += 1
        tl.debug_barrier()  # every thread's stores above, then the release (ordered for the CPU)
        tl.atomic_xchg(mail_ptr + REQUEST, seq, sem="release", scope="sys")
    tl.store(state_ptr, seq)
    tl.store(state_ptr + 1, c)
    tl.store(computed_ptr, tl.load(computed_ptr) + c)


@triton.jit
def _join_kernel(state_ptr, mail_ptr, mailf_ptr, out_ptr, H: tl.constexpr, HP: tl.constexpr, SPINS: tl.constexpr):
    c = tl.load(state_ptr + 1)
    if c > 0:
        seq = tl.load(state_ptr)
        done = tl.load(mail_ptr + DONE, volatile=True)
        spins = 0
        while (done != seq) & (spins < SPINS):
            done = tl.load(mail_ptr + DONE, volatile=True)
            spins += 1
        if done == seq:
            h = tl.arange(0, HP)
            r = tl.load(mailf_ptr + X + H + h, mask=h < H, volatile=True)
            y = tl.load(out_ptr + h, mask=h < H).to(tl.float32) + r
            tl.store(out_ptr + h, y.to(out_ptr.dtype.element_ty), mask=h < H)
        else:  # the CPU never answered: say so where the host looks, and do not hang the GPU
            tl.store(mail_ptr + ERROR, seq)


class HostHandoff:
    """The launches of one engine's CPU share over a server's mailbox (pinned, addressed in place).
    Slots below `capacity` are on the GPU, `idle_slot` among them; host record j is slot
    host_slot0 + j. On the device: [seq, experts asked by the last publish], and the experts
    handed to the CPU so far (`computed`)."""

    def __init__(self, mail: torch.Tensor, capacity: int, host_slot0: int, idle_slot: int, max_cpu: int,
                 counts: Sequence[int], device):
        if not 0 < max_cpu <= MAX_EXPERTS:
            raise ValueError(f"the CPU takes 1 to {MAX_EXPERTS} experts per layer, not {max_cpu}")
        if not 0 <= idle_slot < capacity:
            raise ValueError("the CPU's share needs at least one expert in a GPU slot")
        self.mail, self.mailf = mail, mail.view(torch.float32)
        self.capacity, self.host_slot0, self.idle_slot, self.max_cpu = capacity, host_slot0, idle_slot, max_cpu
        self.counts = torch.zeros(MAX_EXPERTS + 1, dtype=torch.int32, device=device)
        self.set_counts(counts)
        self.state = torch.zeros(2, dtype=torch.int32, device=device)
        self.computed = torch.zeros(1, dtype=torch.int64, device=device)

    def set_counts(self, counts: Sequence[int]) -> None:
        """counts[n]: how many of n host-resident experts the CPU takes (n past the table: its last
        entry). Written in place: graphs captured before see the new split."""
        check_counts(counts)
        self.last_count = len(counts) - 1
        self.counts[: len(counts)] = torch.tensor(counts, dtype=torch.int32)

    def publish(self, table_row: torch.Tensor, uses_row: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token's ids [1, k], weights [1, k], expert input x [1, H] -> (the GPU's slots [1, k],
        its weights [1, k] fp32); the CPU's share is asked through the mailbox."""
        k, H = ids.shape[1], x.shape[1]
        slots = torch.empty(1, k, dtype=table_row.dtype, device=ids.device)
        gpu_weights = torch.empty(1, k, dtype=torch.float32, device=ids.device)
        _publish_kernel[(1,)](
            ids, weights, x, table_row, uses_row, slots, gpu_weights, self.state, self.computed, self.mail, self.mailf,
            self.counts, self.capacity, self.host_slot0, self.idle_slot, self.max_cpu, self.last_count,
            K=k, KP=triton.next_power_of_2(k), H=H, HP=triton.next_power_of_2(H),
        )
        return slots, gpu_weights

    def join(self, out: torch.Tensor) -> None:
        """out [1, H] += the CPU's sum for the last publish, if it asked for one."""
        H = out.shape[1]
        _join_kernel[(1,)](self.state, self.mail, self.mailf, out, H=H, HP=triton.next_power_of_2(H), SPINS=JOIN_SPINS)

    def failed(self) -> int:
        """The seq of a request the GPU gave up waiting for, or 0 (as far as the GPU has got: no sync)."""
        return int(self.mail[mailbox.ERROR])


def check_counts(counts: Sequence[int]) -> None:
    if not counts or counts[0] != 0 or any(not 0 <= c <= n for n, c in enumerate(counts)) or len(counts) > MAX_EXPERTS + 1:
        raise ValueError(f"counts[n] must lie in 0 .. n for n = 0 .. at most {MAX_EXPERTS}, got {list(counts)}")


def counts_for_share(share: float, k: int) -> list[int]:
    """The table that hands the CPU round(n * share) of n host-resident experts, n = 0 .. k."""
    return [min(n, int(n * share + 0.5)) for n in range(min(k, MAX_EXPERTS) + 1)]


def host_share_reference(slots: list[int], capacity: int, max_cpu: int, counts: Sequence[int]) -> list[int]:
    """Positions (in routing order) of the routed experts publish hands to the CPU, given their slots."""
    host = [j for j, s in enumerate(slots) if not 0 <= s < capacity]
    c = min(counts[min(len(host), len(counts) - 1)], max_cpu)
    return host[len(host) - c :] if c else []
