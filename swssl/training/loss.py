"""The SWSSL loss, as the official train_network_dbt.py computes it.

Twin term (Barlow-Twins style) on the two views' projector outputs, standardised per feature
over the batch (unbiased std, as torch.std does):
    c = z1_std^T z2_std / B            (D x D)
    twin = sum_i (c_ii - 1)^2 + w * sum_{i != j} c_ij^2       (w = 1e-6 in the official code)
Pair and neighbour terms on the L2-normalised raw projector outputs:
    pair = sum_b |sigmoid(cos(z1_b, z2_b)) - 1|
    neighbour = sum_b |sigmoid(cos(z1_b, zn_b)) - target_b|
sigmoid(cos) lies in [0.269, 0.731]: the pair term never falls below 0.269 per window and
neighbour targets above 0.731 cannot be met (the targets of the four nearest neighbours are 0.75).
That is the method as published, and the default (`similarity="sigmoid"`). The named remedy,
`similarity="rescaled"` (`train.similarity`), maps cos to (1 + cos) / 2 instead, which spans
[0, 1]: identical views cost nothing and every target can be met. Off in every preset; README
"A demo that detects" reports what it changes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossTerms:
    total: torch.Tensor
    twin: torch.Tensor
    pair: torch.Tensor
    neighbour: torch.Tensor


SIMILARITIES = {
    "sigmoid": torch.sigmoid,  # the paper's: in [0.269, 0.731]
    "rescaled": lambda cos: (1 + cos) / 2,  # in [0, 1]
}


def swssl_loss(z1: torch.Tensor, z2: torch.Tensor, zn: torch.Tensor, target: torch.Tensor,
               offdiag_weight: float = 1e-6, similarity: str = "sigmoid") -> LossTerms:
    """Loss of one batch: z1, z2 the two views' projections (B x D), zn the neighbours', target (B,);
    `similarity` maps the cosines of the pair and neighbour terms (SIMILARITIES)."""
    z1, z2, zn, target = z1.float(), z2.float(), zn.float(), target.float()
    batch = z1.shape[0]
    s1 = (z1 - z1.mean(0)) / z1.std(0)
    s2 = (z2 - z2.mean(0)) / z2.std(0)
    c = s1.T @ s2 / batch
    diagonal = torch.diagonal(c)
    off = (c - torch.diag_embed(diagonal)).pow(2).sum()
    twin = (diagonal - 1).pow(2).sum() + offdiag_weight * off
    similar = SIMILARITIES[similarity]
    pair = (similar(F.cosine_similarity(z1, z2, dim=1, eps=1e-12)) - 1).abs().sum()
    neighbour = (similar(F.cosine_similarity(z1, zn, dim=1, eps=1e-12)) - target).abs().sum()
    return LossTerms(twin + pair + neighbour, twin, pair, neighbour)
