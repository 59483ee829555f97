"""The collapse monitors of PEMAE's pseudo labels and token targets (perplexity, information,
effective rank, spread), logged every logged step, and the thresholds that flag a collapsed run
(`collapse_report`)."""

from __future__ import annotations

import math

import torch

from pemae.models.losses import entropy


# ---------------------------------------------------------------------------- target monitors
MAX_RANK_ROWS = 2048  # rows of the target matrix kept for its SVD (evenly spaced, deterministic)


def effective_rank(x: torch.Tensor) -> torch.Tensor:
    """Effective rank of a matrix [S, D] (Roy & Vetterli 2007): exp of the Shannon entropy of its
    singular values normalised to sum to 1. 1: one direction; min(S, D): all directions alike.
    A zero matrix counts as 1 (no spread at all); a non-finite one gives NaN, not an SVD error,
    so a diverged run reaches the loop's finite-loss check (no host sync here)."""
    x = x.float()
    finite = torch.isfinite(x).all()  # []
    s = torch.linalg.svdvals(torch.where(finite, x, torch.zeros_like(x)))  # [min(S, D)]
    rank = entropy(s / s.sum().clamp_min(1e-12)).exp()  # []
    return torch.where(finite, rank, torch.full_like(rank, math.nan))


@torch.no_grad()
def target_monitors(targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Collapse monitors of the token targets t [B, M, D] (all detached scalars).

    target_std: per-channel std over all B·M targets, averaged over channels. The targets are
    LayerNorm-ed (unit RMS per token), so it lies in [0, 1]; its square is at most the MSE of always
    predicting the batch-mean target (→ 0: every target is the same pattern).
    target_rank: effective rank of the centred [B·M, D] targets (→ 1: they vary along one line).
    """
    t = targets.detach().float().reshape(-1, targets.shape[-1])  # [S, D], S = B*M
    keep = min(len(t), MAX_RANK_ROWS)
    rows = torch.arange(keep, device=t.device) * len(t) // keep  # [keep], spread over all images
    sample = t[rows]  # [keep, D]
    return {
        "target_std": t.std(dim=0, correction=0).mean(),
        "target_rank": effective_rank(sample - sample.mean(0)),
    }


COLLAPSED_PERPLEXITY = 2.0  # fewer clusters than this in use: everything in one cluster
UNIFORM_ENTROPY_FRACTION = 0.95  # per-sample entropy above this fraction of log K: uniform
# Token targets (LayerNorm-ed, unit RMS per token). Rank < 2: all targets vary along one line, the
# same one-cluster bar as COLLAPSED_PERPLEXITY. std < 0.05: targets differ from token to token by
# ~5% of their own size, i.e. one constant pattern plus a residue; the rank alone would miss this
# case, since that small centred residue can be noise of high rank. (The tiny preset at
# initialisation: std 0.72, rank 36 of 64.)
COLLAPSED_TARGET_RANK = 2.0
COLLAPSED_TARGET_STD = 0.05


def collapse_report(terms: dict[str, float], num_prototypes: int) -> dict:
    """Flags from the last logged monitors: a collapsed run is named, never silent.

    Collapse to one cluster: batch perplexity < 2. Uniform collapse: every pseudo label close to
    uniform (mean entropy > 95% of log K). Collapsed token targets: effective rank < 2 or mean
    per-channel std < 0.05 (runs with token targets only).
    """
    report = {}
    for kind in ("cls", "tok"):
        if f"{kind}_perplexity" not in terms:
            continue
        perplexity, ent = terms[f"{kind}_perplexity"], terms[f"{kind}_entropy"]
        report[f"{kind}_perplexity"] = round(perplexity, 2)
        report[f"{kind}_collapsed"] = bool(
            perplexity < COLLAPSED_PERPLEXITY
            or ent > UNIFORM_ENTROPY_FRACTION * math.log(num_prototypes))
    if "target_rank" in terms:
        std, rank = terms["target_std"], terms["target_rank"]
        report["target_std"], report["target_rank"] = round(std, 3), round(rank, 2)
        report["targets_collapsed"] = bool(rank < COLLAPSED_TARGET_RANK or std < COLLAPSED_TARGET_STD)
    if report:
        report["collapsed"] = any(v for k, v in report.items() if k.endswith("_collapsed"))
    return report


def collapse_thresholds(num_prototypes: int) -> dict[str, tuple[float, str]]:
    """Reference lines for the collapse monitors (`pemae.report.curves.curves`): perplexity 2 (one
    cluster in use) and entropy log K (uniform pseudo labels), for both the CLS and the token head, and the
    token targets' collapse thresholds (effective rank, per-channel std)."""
    lines = {"target_rank": (COLLAPSED_TARGET_RANK, "collapsed"),
             "target_std": (COLLAPSED_TARGET_STD, "collapsed")}
    for kind in ("cls", "tok"):
        lines[f"{kind}_perplexity"] = (COLLAPSED_PERPLEXITY, "one cluster")
        lines[f"{kind}_entropy"] = (math.log(num_prototypes), "uniform (log K)")
    return lines
