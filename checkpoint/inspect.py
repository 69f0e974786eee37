"""Text for `tierzero ckpt list / inspect / verify` (formatting only)."""

from __future__ import annotations

from typing import List, Sequence

from tierzero.checkpoint.manifest import Manifest


def list_lines(root: str, steps: Sequence[tuple], sizes: dict) -> List[str]:
    """steps: (step, committed); sizes: step -> bytes on disk."""
    if not steps:
        return [f"no checkpoints under {root}"]
    newest = max((s for s, ok in steps if ok), default=None)
    lines = [f"# {root}", f"{'step':>10}  {'state':<11}{'size MB':>10}"]
    for step, ok in steps:
        state = "committed" if ok else "torn"
        mark = "  <- latest" if step == newest else ""
        lines.append(f"{step:>10}  {state:<11}{sizes.get(step, 0) / 1e6:>10.2f}{mark}")
    return lines


def inspect_lines(path: str, m: Manifest) -> List[str]:
    st = m.state
    lines = [f"# {path}", f"step {m.step} | next sample {st.get('next_sample')} | saved by {st.get('world_size')} ranks",
             f"plan {st.get('plan', '?')}", f"topology {st.get('topology', '?')}",
             f"versions tierzero {st.get('tierzero_version', '?')}, torch {st.get('versions', {}).get('torch', '?')}"]
    files = sorted({p.file for t in m.tensors.values() for p in t.pieces})
    total = sum(t.nbytes for t in m.tensors.values())
    lines.append(f"{len(m.tensors)} tensors, {total / 1e6:.2f} MB in {len(files)} shard files")
    width = max(len(n) for n in m.tensors) if m.tensors else 10
    lines.append(f"{'tensor':<{width}}  {'shape':<18}{'dtype':<9}{'bytes':>12}  layout (file: elements)")
    for name in sorted(m.tensors):
        t = m.tensors[name]
        layout = ", ".join(f"{p.file.removeprefix('shard-').removesuffix('.bin')}:{p.start}..{p.stop}"
                           for p in t.pieces[:4])
        if len(t.pieces) > 4:
            layout += f", ... ({len(t.pieces)} pieces)"
        lines.append(f"{name:<{width}}  {str(list(t.shape)):<18}{t.dtype:<9}{t.nbytes:>12}  {layout}")
    return lines
