"""The multi-rank tests' spawner: benchmarks.local_ranks under the names the tests use.

    from support.dist import run_distributed

    def _body(rank: int, world_size: int, scale: float) -> torch.Tensor:   # module level: picklable
        return distributed.all_reduce_sum(torch.tensor([rank * scale]))

    def test_sum():
        results = run_distributed(_body, world_size=2, args=(2.0,))       # [rank 0's, rank 1's]
        assert all(float(r) == 2.0 for r in results)

One intra-op thread per rank; an exception in any rank is re-raised in the test with that rank's
traceback, and a rank that dies or a run past ``timeout_s`` fails the test instead of hanging it.
"""

from __future__ import annotations

from benchmarks.local_ranks import TORCH_EXTENSIONS_DIR
from benchmarks.local_ranks import LocalRanksError as DistributedTestError
from benchmarks.local_ranks import run_local_ranks as run_distributed

__all__ = ["DistributedTestError", "TORCH_EXTENSIONS_DIR", "run_distributed"]
