"""Deep mutual learning (online distillation): two or more peers trained together."""
from __future__ import annotations

from torch import Tensor, nn

from stpm.distill import losses
from stpm.distill.trainer import Objective


class MutualObjective(Objective):
    """sum_k CE(peer_k, y) + T^2 KL(mean of other peers || peer_k). `student` is peers[0]."""

    def __init__(self, peers: list[nn.Module], temperature: float) -> None:
        super().__init__()
        if len(peers) < 2:
            raise ValueError("mutual learning needs at least two peers")
        self.peers = nn.ModuleList(peers)
        self.student = peers[0]
        self.temperature = temperature

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return losses.mutual_loss([p(x) for p in self.peers], y, self.temperature)
