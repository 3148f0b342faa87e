import pytest
import torch

pytest.importorskip("numba")

from flashmoe.formats.packed import RecordLayout
from flashmoe.kernels import cpu_expert_server as mailbox
from flashmoe.kernels.cpu_expert_server import ExpertServer
from flashmoe.kernels.host_handoff import HostHandoff, _join_kernel, counts_for_share, host_share_reference

from .test_cpu_experts import random_pool, reference, rel, tolerance

CAPACITY, HOST0 = 6, 40  # GPU slots 0 .. 5; host record j at slot 40 + j (slot numbers as the tier's)


def table(experts: int, host_records: int, g: torch.Generator) -> torch.Tensor:
    """Each expert's slot: a third on the GPU, the rest in distinct host records."""
    host = (HOST0 + torch.randperm(host_records, generator=g)).tolist()
    return torch.tensor([e % CAPACITY if e % 3 == 0 else host.pop() for e in range(experts)], dtype=torch.int64)


@pytest.mark.parametrize("k,max_cpu,counts", [(10, 3, counts_for_share(0.4, 10)), (4, 1, counts_for_share(0.4, 4)),
                                              (8, 16, counts_for_share(1.0, 8)), (6, 2, [0] * 7),
                                              (10, 4, [0, 1, 0, 2, 1])])  # a short table: its last entry past it
def test_publish_splits_as_the_reference_and_join_adds_the_cpu_sum(device, k, max_cpu, counts):
    layout = RecordLayout.build(128, 64, 4, 64)
    pool = random_pool(layout, 24, seed=k)
    server = ExpertServer(layout, pool, 2)
    server.start()
    g = torch.Generator().manual_seed(k)
    slots_of = table(24, 24, g).to(device)
    uses = torch.zeros(24, dtype=torch.int64, device=device)
    handoff = HostHandoff(server.mail, CAPACITY, HOST0, 1, max_cpu, counts, device)
    want_uses, handed = torch.zeros(24, dtype=torch.int64), 0
    try:
        for step in range(4):
            ids = torch.randperm(24, generator=g)[:k]
            weights = torch.rand(k, generator=g).to(torch.bfloat16)
            x = torch.randn(128, generator=g).to(torch.bfloat16)
            seq = int(handoff.state[0])
            slots, gpu_weights = handoff.publish(slots_of, uses, ids[None].to(device), weights[None].to(device), x[None].to(device))
            routed = slots_of.cpu()[ids].tolist()
            on_cpu = host_share_reference(routed, CAPACITY, max_cpu, counts)
            assert slots[0].tolist() == [1 if j in on_cpu else s for j, s in enumerate(routed)]
            assert gpu_weights[0].tolist() == [0.0 if j in on_cpu else float(w) for j, w in enumerate(weights)]
            want_uses[ids] += 1
            handed += len(on_cpu)
            assert torch.equal(uses.cpu(), want_uses) and int(handoff.computed) == handed
            assert handoff.state.tolist() == [seq + bool(on_cpu), len(on_cpu)]  # a request only when the CPU has work
            out = torch.randn(1, 128, generator=g).to(device)
            before = out.clone()
            handoff.join(out)
            if on_cpu:
                cpu_sum = reference(layout, pool, [routed[j] - HOST0 for j in on_cpu], [float(weights[j]) for j in on_cpu], x)
                assert rel((out[0] - before[0]).cpu(), cpu_sum) < tolerance(layout)
            else:
                assert torch.equal(out, before)
        assert handoff.failed() == 0
    finally:
        server.stop()


def test_join_gives_up_and_says_so_when_the_cpu_never_answers(device):
    layout = RecordLayout.build(128, 64, 4, 64)
    server = ExpertServer(layout, random_pool(layout, 2, seed=0), 1)  # never started
    handoff = HostHandoff(server.mail, CAPACITY, HOST0, 0, 2, counts_for_share(1.0, 3), device)
    table_row = torch.tensor([0, HOST0, HOST0 + 1], dtype=torch.int64, device=device)
    ids = torch.tensor([[0, 1, 2]], device=device)
    x = torch.randn(1, 128, device=device)
    handoff.publish(table_row, torch.zeros(3, dtype=torch.int64, device=device), ids, torch.ones(1, 3, device=device), x)
    out = torch.zeros(1, 128, device=device)
    _join_kernel[(1,)](handoff.state, handoff.mail, handoff.mailf, out, H=128, HP=128, SPINS=50)
    if out.is_cuda:
        torch.cuda.synchronize()  # failed() reads the mailbox as the GPU has left it so far
    assert handoff.failed() == 1 and torch.equal(out, torch.zeros_like(out))


def test_handoff_refuses_what_it_cannot_do():
    mail = torch.zeros(mailbox.mailbox_words(128), dtype=torch.int32)
    with pytest.raises(ValueError, match="1 to 16 experts"):
        HostHandoff(mail, CAPACITY, HOST0, 0, 17, [0], "cpu")
    with pytest.raises(ValueError, match="at least one expert in a GPU slot"):
        HostHandoff(mail, 0, HOST0, 0, 2, [0], "cpu")
    with pytest.raises(ValueError, match=r"counts\[n\] must lie in 0 \.\. n"):
        HostHandoff(mail, CAPACITY, HOST0, 0, 2, [0, 2], "cpu")
    with pytest.raises(ValueError, match=r"counts\[n\] must lie in 0 \.\. n"):
        HostHandoff(mail, CAPACITY, HOST0, 0, 2, [], "cpu")
