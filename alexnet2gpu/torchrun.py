"""What torchrun told this process: rank, local rank and world size from the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["TorchrunEnv"]


@dataclass(frozen=True)
class TorchrunEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_environ(cls) -> "TorchrunEnv":
        return cls(
            rank=int(os.environ.get("RANK", "0")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
        )

    @property
    def launched(self) -> bool:
        """True under torchrun (or any launcher that sets WORLD_SIZE)."""
        return "WORLD_SIZE" in os.environ

    @property
    def is_rank0(self) -> bool:
        """Only rank 0 prints and writes."""
        return self.rank == 0
