"""Run under `torchrun --nproc_per_node 2` by test_engine.py: the guarded collectives against
what one process computes on the whole batch. Prints one "ok <check>" line per check passed."""

from __future__ import annotations

import torch
import torch.distributed as dist

from pemae.engine import distributed
from pemae.models.losses import sinkhorn_knopp, update_center


def main() -> None:
    procs, _ = distributed.start("cpu")
    rank, world = procs.rank, procs.world_size
    assert world == 2, world
    logits = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))  # [8, K], the same on both
    mine = logits.chunk(world)[rank]  # [4, K]: this rank's half of the batch

    values = distributed.mean_over_processes({"x": torch.tensor(float(rank)), "y": torch.tensor(2.0)})
    assert values == {"x": 0.5, "y": 2.0}, values
    print("ok mean_over_processes")

    assert distributed.any_true(torch.tensor(rank == 1)) and not distributed.any_true(torch.tensor(False))
    print("ok any_true")

    center, whole = torch.zeros(1, 16), torch.zeros(1, 16)
    update_center(center, mine, 0.9)
    whole.mul_(0.9).add_(logits.mean(0), alpha=0.1)  # one process, the whole batch
    assert torch.allclose(center, whole, atol=1e-6), (center - whole).abs().max()
    print("ok update_center")

    q = sinkhorn_knopp(mine, 0.5, 3)  # [4, K], balanced over both ranks' rows
    gathered = [torch.empty_like(q) for _ in range(world)]
    dist.all_gather(gathered, q)
    reference = whole_batch_sinkhorn(logits, 0.5, 3)  # [8, K]
    assert torch.allclose(torch.cat(gathered), reference, atol=1e-6), (torch.cat(gathered) - reference).abs().max()
    print("ok sinkhorn_knopp")

    model = torch.nn.Linear(4, 4)
    torch.nn.init.constant_(model.weight, 1.0)
    torch.nn.init.zeros_(model.bias)
    distributed.check_replicas_agree(model)  # identical copies: silent
    if rank == 1:
        with torch.no_grad():
            model.bias.add_(1.0)
    try:
        distributed.check_replicas_agree(model)
    except RuntimeError as err:
        assert "bias" in str(err) and "weight" not in str(err), err
        print("ok check_replicas_agree")
    distributed.stop(procs)


def whole_batch_sinkhorn(logits: torch.Tensor, temp: float, iterations: int) -> torch.Tensor:
    """SwAV's Sinkhorn-Knopp on the whole batch in one process, written out: [S, K] -> [S, K]."""
    q = torch.exp((logits - logits.max()) / temp).T  # [K, S]
    q /= q.sum()
    k, s = q.shape
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True) * k  # each prototype 1/K of the mass
        q /= q.sum(dim=0, keepdim=True) * s  # each sample 1/S
    return (q * s).T  # rows sum to 1


if __name__ == "__main__":
    main()
