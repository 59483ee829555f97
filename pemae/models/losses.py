"""PEMAE's losses: token reconstruction and pseudo-label cross-entropy (centering or Sinkhorn)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pemae.engine.distributed import global_max, global_sum, all_reduce_mean


def token_reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Mean over masked tokens of ||y - t||^2 (summed over channels, as MSE per element) or 1 - cos.

    pred, target: [B, M, D].
    """
    if kind == "mse":
        return F.mse_loss(pred.float(), target.float())
    if kind == "cosine":
        return (1 - F.cosine_similarity(pred.float(), target.float(), dim=-1)).mean()
    raise ValueError(f"method.recon_loss = {kind!r}: expected 'mse' or 'cosine'")


def pseudo_label_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor,
                      student_temp: float) -> torch.Tensor:
    """CE(q, softmax(s / τ_s)) averaged over samples: [..., K], [..., K] -> scalar."""
    log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)  # [..., K]
    return -(teacher_probs * log_p).sum(dim=-1).mean()


def centered_probs(teacher_logits: torch.Tensor, center: torch.Tensor, temp: float | torch.Tensor) -> torch.Tensor:
    """DINO: softmax((t - c) / τ_t) over the K prototypes. [..., K] -> [..., K]."""
    return F.softmax((teacher_logits.float() - center) / temp, dim=-1)


@torch.no_grad()
def update_center(center: torch.Tensor, teacher_logits: torch.Tensor, momentum: float) -> None:
    """c <- m·c + (1 - m)·mean of the batch's teacher logits (all processes), in place."""
    batch_mean = all_reduce_mean(teacher_logits.float().reshape(-1, center.shape[-1]).mean(0))  # [K]
    center.mul_(momentum).add_(batch_mean, alpha=1 - momentum)


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, temp: float | torch.Tensor, iterations: int = 3) -> torch.Tensor:
    """Balanced soft assignments (SwAV / DINOv2): equal mass per prototype over the batch.

    [..., K] -> [..., K], each row a distribution; across all processes the column sums match.
    """
    shape = teacher_logits.shape
    logits = teacher_logits.float().reshape(-1, shape[-1]) / temp  # [S, K]
    q = torch.exp(logits - global_max(logits.max())).T  # [K, S], the same shift on every process
    samples = q.new_full((), q.shape[1])  # [] on q's device: no host-to-device copy
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(samples)
    num_prototypes = q.shape[0]
    q /= global_sum(q.sum())
    for _ in range(iterations):
        q /= global_sum(q.sum(dim=1, keepdim=True)) * num_prototypes  # rows: 1/K each
        q /= q.sum(dim=0, keepdim=True) * samples  # columns: 1/S each
    q *= samples  # columns sum to 1
    return q.T.reshape(shape)  # [..., K]


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) along the last dimension."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1)
