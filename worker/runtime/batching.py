"""The fixed global batch: world size changes the gradient accumulation, not the optimisation."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class BatchPlan:
    """How one optimizer step's global batch is split over ranks and micro-steps."""

    global_batch_size: int
    """Samples per optimizer step, whatever the world size."""
    micro_batch_size: int
    """Samples per forward/backward on one rank."""
    world_size: int
    """Ranks in the current generation."""

    @property
    def per_rank(self) -> int:
        return self.global_batch_size // self.world_size

    @property
    def accumulation_steps(self) -> int:
        return self.per_rank // self.micro_batch_size

    @staticmethod
    def valid_world_sizes(global_batch_size: int, micro_batch_size: int) -> list[int]:
        """World sizes that split the global batch into whole micro-batches."""
        if micro_batch_size <= 0 or global_batch_size % micro_batch_size:
            return []
        micro_batches = global_batch_size // micro_batch_size
        return [w for w in range(1, micro_batches + 1) if micro_batches % w == 0]

    @classmethod
    def make(cls, *, global_batch_size: int, micro_batch_size: int, world_size: int) -> BatchPlan:
        """Check the sizes; raises ValueError naming the world sizes that would work."""
        if global_batch_size <= 0:
            raise ValueError(f"global batch size must be positive, got {global_batch_size}")
        if micro_batch_size <= 0:
            raise ValueError(f"micro-batch size must be positive, got {micro_batch_size}")
        if world_size <= 0:
            raise ValueError(f"world size must be positive, got {world_size}")
        if global_batch_size % micro_batch_size:
            raise ValueError(
                f"global batch {global_batch_size} is not a multiple of micro-batch "
                f"{micro_batch_size}"
            )
        if global_batch_size % (micro_batch_size * world_size):
            sizes = ", ".join(map(str, cls.valid_world_sizes(global_batch_size, micro_batch_size)))
            raise ValueError(
                f"global batch {global_batch_size} cannot be split over {world_size} ranks with "
                f"micro-batch {micro_batch_size} (needs micro-batch x accumulation x world = "
                f"global batch); world sizes that work: {sizes}"
            )
        return cls(
            global_batch_size=global_batch_size,
            micro_batch_size=micro_batch_size,
            world_size=world_size,
        )
