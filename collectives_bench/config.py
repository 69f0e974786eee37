"""Config section owned by the collective benchmark: `bench.*` (docs/bench.md)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import List, Mapping

from tierzero.collectives_bench.ops import COLLECTIVES, Collective

OPS = tuple(COLLECTIVES)
"""Every collective's name, in nccl-tests' order (the records of ops.py)."""
DTYPES = ("float32", "bfloat16", "float16")
BACKENDS = ("torch", "mpi")
_SCOPE = re.compile(r"^(global|auto|(level|cross):[A-Za-z0-9_.-]+)\Z")


@dataclass
class BenchConfig:
    ops: List[str] = field(default_factory=lambda: list(OPS))
    """Collectives to time, by name; default: all of them, in nccl-tests' order (an unknown name lists them)."""
    sizes: str = "auto"
    """Message sizes MIN:MAX (doubling; MIN:MAX:F multiplies by F) or a list 1M,8M; auto = 1K:16M on CPU, 1K:1G on GPU (capped to 1/8 of its memory)."""
    dtypes: List[str] = field(default_factory=lambda: ["float32"])
    """Element types: float32, bfloat16, float16."""
    scopes: List[str] = field(default_factory=lambda: ["auto"])
    """global; level:<name> (every group inside that level at once); cross:<name> (one rank per <name> unit, all such groups at once); auto = global + every level and cross scope the topology has."""
    backend: str = "torch"
    """torch = the job's torch.distributed backend (gloo/nccl); mpi = mpi4py on host buffers (needs mpirun)."""
    warmup: int = 5
    """Untimed iterations per size, run over the whole size range before timing."""
    iters: int = 20
    """Timed iterations per size; the time per op is their mean."""
    check: bool = True
    """Check every size's result against the expected values and count #wrong elements."""
    slow_fraction: float = 0.75
    """A group whose busbw is below this fraction of its peers' median is flagged (slow link or bad node)."""

    def errors(self, collectives: Mapping[str, Collective] = COLLECTIVES) -> List[str]:
        """Every problem of this section, each naming its key; `collectives` is the registry the ops must be in."""
        from tierzero.collectives_bench.sizes import SizeError, parse_size, parse_sizes

        errs = []
        bad_ops = [o for o in self.ops if o not in collectives]
        if bad_ops or not self.ops:
            errs.append(f"bench.ops={list(self.ops)}: {bad_ops or 'empty'} not known; "
                        f"choose from {list(collectives)}")
        bad_types = [d for d in self.dtypes if d not in DTYPES]
        if bad_types or not self.dtypes:
            errs.append(f"bench.dtypes={list(self.dtypes)}: {bad_types or 'empty'} not known; choose from {list(DTYPES)}")
        bad_scopes = [s for s in self.scopes if not _SCOPE.match(str(s))]
        if bad_scopes or not self.scopes:
            errs.append(
                f"bench.scopes={list(self.scopes)}: {bad_scopes or 'empty'} not understood; use global, auto, "
                "level:<level name> or cross:<level name>, e.g. bench.scopes=[global,level:node,cross:node]"
            )
        if self.backend not in BACKENDS:
            errs.append(f"bench.backend={self.backend!r} is not one of {list(BACKENDS)}")
        if self.backend == "mpi" and any(d != "float32" for d in self.dtypes):
            errs.append(
                f"bench.backend=mpi with bench.dtypes={list(self.dtypes)}: MPI has no standard bfloat16 or "
                "float16 type; use bench.dtypes=[float32] with the mpi backend"
            )
        if self.sizes != "auto":
            text = str(self.sizes)
            try:
                parts = text.strip().split(":")
                # a range multiplies up from MIN: from 0 it never reaches MAX (parse_sizes would loop forever)
                if "," not in text and len(parts) in (2, 3) and parse_size(parts[0]) < 1:
                    raise SizeError(f"bench.sizes={text[:60]!r} starts at 0 bytes; a range MIN:MAX doubles from MIN, "
                                    "so start at 1 or more, e.g. 1K:16M")
                if max(parse_sizes(text)) > 1 << 40:
                    raise SizeError(f"bench.sizes={text[:60]!r} names a message larger than 1 TiB, more than any "
                                    "device holds; e.g. 1K:1G")
            except SizeError as e:
                errs.append(str(e))
            except ValueError:  # int() of a number with thousands of digits
                errs.append(f"bench.sizes={text[:40]!r}... holds a number too long to be a size; e.g. 1K:16M")
        if self.warmup < 0:
            errs.append(f"bench.warmup={self.warmup} must be >= 0, e.g. bench.warmup=5")
        if self.iters < 1:
            errs.append(f"bench.iters={self.iters} must be >= 1, e.g. bench.iters=20")
        if not 0 < self.slow_fraction < 1:
            errs.append(f"bench.slow_fraction={self.slow_fraction} must be between 0 and 1, e.g. 0.75")
        return errs
