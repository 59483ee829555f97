"""Evaluation where the encoder runs: features kept on its device, the probes fitted there in
bounded memory, under the pretraining's mixed precision, and run once (on the main process) with
the scores shared; on synthetic features and two gloo processes, no data set needed."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pemae.config.schema import EvalConfig
from pemae.engine import distributed
from pemae.eval.probes import (KNN_BUDGET_BYTES, extract_features, fit_on_cached, knn_accuracy,
                               knn_chunk, knn_correct, readout_scores, share_scores)

torch.set_num_threads(1)


def clusters(n: int, dim: int = 8, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` points [n, D] around `classes` centres, and their classes [n]."""
    gen = torch.Generator().manual_seed(0)
    centres = 2.0 * torch.randn(classes, dim, generator=gen)  # [C, D]
    y = torch.randint(classes, (n,), generator=gen)  # [n]
    return centres[y] + torch.randn(n, dim, generator=gen), y  # [n, D], [n]


# --------------------------------------------------------------------------------------------
# k-NN in bounded memory
# --------------------------------------------------------------------------------------------
def test_knn_chunks_keep_the_similarities_under_the_budget():
    assert knn_chunk(54_000) == 1024  # the default preset's train bank: today's chunk
    imagenet = 1_281_167
    rows = knn_chunk(imagenet)
    assert 1 <= rows < 1024 and 4 * rows * imagenet <= KNN_BUDGET_BYTES
    assert knn_chunk(10**12) == 1  # one row at least


def test_knn_votes_do_not_depend_on_the_chunk():
    x, y = clusters(277)
    train_x, train_y, test_x, test_y = x[:200], y[:200], x[200:], y[200:]
    counts = {chunk: knn_correct(train_x, train_y, test_x, test_y, 5, 0.07, chunk, 3)
              for chunk in (1, 7, 1024)}
    assert len(set(counts.values())) == 1 and counts[1] > 0.6 * 77
    assert knn_accuracy(train_x, train_y, test_x, test_y, 5) == 100.0 * counts[1024] / 77


# --------------------------------------------------------------------------------------------
# Mixed precision and devices
# --------------------------------------------------------------------------------------------
def test_features_follow_the_pretraining_precision_and_auto_changes_nothing_on_the_cpu():
    torch.manual_seed(0)
    linear = nn.Linear(16, 8)
    batches = [(torch.randn(5, 16), torch.arange(5)), (torch.randn(3, 16), torch.arange(3))]
    featurise = lambda imgs: {"x": linear(imgs)}  # noqa: E731
    cpu = torch.device("cpu")
    with torch.no_grad():
        plain = torch.cat([linear(imgs) for imgs, _ in batches])  # [8, 8]
    auto, labels = extract_features(featurise, batches, cpu, False, amp="auto")
    off, _ = extract_features(featurise, batches, cpu, False, amp="off")
    bf16, _ = extract_features(featurise, batches, cpu, False, amp="bf16")
    assert torch.equal(auto["x"], plain) and torch.equal(off["x"], plain)
    assert torch.equal(labels, torch.tensor([0, 1, 2, 3, 4, 0, 1, 2]))
    assert bf16["x"].dtype == torch.float32 and not torch.equal(bf16["x"], plain)
    assert torch.allclose(bf16["x"], plain, atol=0.1)


def test_probe_indices_are_drawn_on_the_cpu_and_read_on_the_probe_device():
    """A probe on `meta` (standing in for a GPU): the order comes from the CPU generator, as on
    the CPU, and the loss gets its indices on the probe's device."""
    probe = nn.Linear(4, 3, device="meta")
    features = torch.empty(10, 4, device="meta")  # [N, D]
    seen = []

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        seen.append(idx)
        return probe(features[idx]).sum()  # []

    opt = torch.optim.SGD(probe.parameters(), lr=0.1)
    fit_on_cached(probe, opt, 10, 5, 1, torch.Generator().manual_seed(3), lambda step: 0.1, loss_of)
    assert [idx.device.type for idx in seen] == ["meta", "meta"]
    cpu_order = torch.randperm(10, generator=torch.Generator().manual_seed(3))  # [10]
    probe_cpu, drawn = nn.Linear(4, 3), []
    fit_on_cached(probe_cpu, torch.optim.SGD(probe_cpu.parameters(), lr=0.1), 10, 5, 1,
                  torch.Generator().manual_seed(3), lambda step: 0.1,
                  lambda idx: drawn.append(idx) or probe_cpu(torch.ones(len(idx), 4)).sum())
    assert torch.equal(torch.cat(drawn), cpu_order)


def test_readout_scores_are_shared_as_they_are_in_one_process():
    x, y = clusters(136)
    train_x, train_y, val_x, val_y = x[:96], y[:96], x[96:], y[96:]
    features = {"train": ({"a": train_x, "b": train_x[:, :4]}, train_y),
                "val": ({"a": val_x, "b": val_x[:, :4]}, val_y)}
    cfg = EvalConfig(linear_epochs=3, linear_batch_size=32, knn_k=5)
    scores = readout_scores(features, cfg)
    assert list(scores) == ["val"] and list(scores["val"]) == ["a", "b"]
    assert set(scores["val"]["a"]) == {"knn_top1", "linear_top1"}
    assert share_scores(scores, ["val"], ["a", "b"], distributed.Processes()) is scores


# --------------------------------------------------------------------------------------------
# Two processes: gathered onto the main one, scores broadcast
# --------------------------------------------------------------------------------------------
def two_process_worker(rank: int, store: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        procs = distributed.Processes(rank, 2)
        lengths = (3, 0)  # rank 1 holds no rows (more processes than batches)
        rows = torch.arange(lengths[rank] * 2).view(-1, 2) + 100 * rank  # [n_r, 2]
        mine = distributed.gather_rows_to_main(rows, procs)
        if rank == 0:
            assert torch.equal(mine, torch.arange(6).view(3, 2)), mine
        else:
            assert mine.shape == (0, 2), mine.shape
        values = [1.0 / 3.0, 87.45, 12.5] if rank == 0 else [0.0, 0.0, 0.0]
        assert distributed.broadcast_from_main(values, procs) == [1.0 / 3.0, 87.45, 12.5]
        scores = {"test": {"cls": {"knn_top1": 41.02, "linear_top1": 55.5}}} if rank == 0 else None
        assert share_scores(scores, ["test"], ["cls"], procs) == \
            {"test": {"cls": {"knn_top1": 41.02, "linear_top1": 55.5}}}
        everyone = distributed.gather_rows(rows, procs)
        assert torch.equal(everyone, torch.arange(6).view(3, 2)), everyone
    finally:
        dist.destroy_process_group()


def test_rows_gather_onto_the_main_process_and_its_scores_reach_every_process(tmp_path):
    mp.spawn(two_process_worker, args=(str(tmp_path / "store"),), nprocs=2, join=True)


def test_one_process_gathers_and_broadcasts_nothing():
    one = distributed.Processes()
    rows = torch.randn(4, 3)
    assert distributed.gather_rows_to_main(rows, one) is rows
    assert distributed.broadcast_from_main([1.5], one) == [1.5]
