"""Slurm hostlist expressions, e.g. `n[1-3,5],gpu-[01-04]` -> n1 n2 n3 n5 gpu-01 ... gpu-04.

Follows Slurm's hostlist syntax (slurm/src/common/hostlist.c): comma-separated items, each
a prefix followed by an optional bracketed list of numbers and ranges; zero padding of a
range's first bound is kept; brackets may repeat (`rack[1-2]-n[1-2]`).
"""

from __future__ import annotations

import re
from typing import List


def _split_top_level(text: str) -> List[str]:
    items, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in Slurm nodelist {text!r}")
        if ch == "," and depth == 0:
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise ValueError(f"unbalanced '[' in Slurm nodelist {text!r}")
    items.append("".join(cur))
    return [i for i in (s.strip() for s in items) if i]


def _expand_ranges(body: str, text: str) -> List[str]:
    out = []
    for part in body.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if not m:
            raise ValueError(f"bad range {part!r} in Slurm nodelist {text!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"descending range {part!r} in Slurm nodelist {text!r}")
        width = len(lo) if lo.startswith("0") else 0
        out += [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    return out


def _expand_item(item: str, text: str) -> List[str]:
    m = re.search(r"\[([^\]]*)\]", item)
    if not m:
        return [item]
    head, tail = item[: m.start()], item[m.end():]
    return [head + num + rest for num in _expand_ranges(m.group(1), text) for rest in _expand_item(tail, text)]


def expand_nodelist(text: str) -> List[str]:
    """All host names of a Slurm hostlist expression, in order."""
    return [host for item in _split_top_level(text) for host in _expand_item(item, text)]


def expand_tasks_per_node(text: str) -> List[int]:
    """SLURM_TASKS_PER_NODE, e.g. `2(x3),1` -> [2, 2, 2, 1]."""
    out = []
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not m:
            raise ValueError(f"bad SLURM_TASKS_PER_NODE item {item!r} in {text!r}")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out
