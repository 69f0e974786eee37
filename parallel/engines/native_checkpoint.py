"""The native engine's side of checkpoints: the slices of the global tensors this rank saves
(host copies staged on a GPU), what a resume reads back, and the whole tensors for tests."""

from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import torch
import torch.distributed as dist

from tierzero.parallel.engines.base import CheckpointSlice
from tierzero.parallel.engines.flat import FlatUnit
from tierzero.parallel.engines.units import STATE_KEYS, persistent_buffers


class NativeCheckpoints:
    """Checkpoint methods of NativeEngine (a mixin: it reads the engine's units, plan and groups)."""

    def _owned(self, u: FlatUnit):
        """(entry, first element in the O-shard, elements, global shape, first element of the
        flattened global tensor) for every parameter piece in this rank's optimizer shard."""
        a = u.domain.idx_o * u.c_o
        expert = u.domain is self.experts
        for ent in u.params:
            lo, hi = max(a, ent.offset), min(a + u.c_o, ent.offset + ent.numel)
            if lo >= hi:
                continue
            shape, base = tuple(ent.shape), 0
            if expert:  # local experts [E_local, ...] are rows ep_index*E_local.. of [E, ...]
                shape = (ent.shape[0] * self.ep,) + tuple(ent.shape[1:])
                base = (self.rank % self.ep) * ent.numel
            yield ent, lo - a, hi - lo, shape, base + lo - ent.offset

    def checkpoint_slices(self) -> List[CheckpointSlice]:
        """What this rank saves: its optimizer shard's master weights and AdamW moments (one
        replica saves), and on rank 0 the persistent buffers (MoE selection biases).

        On CPU the slices are views (the saver copies them while the next step computes). On a
        GPU their data goes to one page-locked host buffer of exactly their size, allocated once
        off the training thread (parallel/engines/staging.py), by copies issued on a side
        stream: the loop only issues them; `checkpoint_copy` (for the saver's thread) waits for
        them and returns the data, and the next optimizer step waits for them on the device.
        A first save that comes before that buffer is ready has the saver's thread issue the
        copies once it is; the next optimizer step waits until then (`snapshot_guard`), forward
        and backward run meanwhile."""
        owned = [(f"{prefix}/{ent.name}", shape, start, getattr(u, key)[at:at + n].detach())
                 for u in self.units if u.domain.groups["replicas"].index(self.rank) == 0
                 for ent, at, n, shape, start in self._owned(u) for key, prefix in STATE_KEYS]
        self.checkpoint_copy = land = None
        if self.device.startswith("cuda"):
            land = self._copy_to_staging([src for *_, src in owned])
            out = [CheckpointSlice(name, shape, "float32", start, None) for name, shape, start, _ in owned]
        else:  # views: the saver copies them
            out = [CheckpointSlice(name, shape, "float32", start, src.numpy()) for name, shape, start, src in owned]
        if self.rank == 0:
            for name, buf in persistent_buffers(self.model):
                out.append(CheckpointSlice(f"buffer/{name}", tuple(buf.shape), "float32", 0,
                                           buf.detach().float().cpu().numpy().reshape(-1).copy()))
        if land is not None:
            buffers = [s.data for s in out[len(owned):]]
            self.checkpoint_copy = lambda: [view.numpy() for view in land()] + buffers
        return out

    def stage_checkpoints(self) -> None:
        """Start allocating and page-locking the host buffer a GPU save copies into, on a
        background thread (checkpoint.saver calls this after the first optimizer step; the first
        save does if nothing did). Nothing on CPU, where a save reads the shards in place."""
        if self.device.startswith("cuda"):
            self._staging_for([n for u in self.units if u.domain.groups["replicas"].index(self.rank) == 0
                               for _ent, _at, n, _shape, _start in self._owned(u) for _ in STATE_KEYS])

    def checkpoint_layout(self) -> Dict[str, Tuple[Tuple[int, ...], str]]:
        """{name: (global shape, dtype)} of what checkpoint_slices saves from this rank, without
        copying a byte (a resume checks a manifest against it before reading)."""
        out = {}
        for u in self.units:
            if u.domain.groups["replicas"].index(self.rank) != 0:
                continue
            for ent, _at, _n, shape, _start in self._owned(u):
                for _key, prefix in STATE_KEYS:
                    out[f"{prefix}/{ent.name}"] = (tuple(shape), "float32")
        if self.rank == 0:
            for name, buf in persistent_buffers(self.model):
                out[f"buffer/{name}"] = (tuple(buf.shape), "float32")
        return out

    def _staging_for(self, numels: List[int]):
        """This rank's host staging (one buffer for every saved slice), started if new; a new one
        only when the slices' sizes change, or to try again after its allocation failed."""
        from tierzero.parallel.engines.staging import HostStaging, pin_host

        if self._staging is None or self._staging.error is not None or not self._staging.fits(numels):
            self._staging = HostStaging(numels, pin=lambda buf: pin_host(buf, self.device)).start()
        return self._staging

    def _copy_to_staging(self, srcs: List[torch.Tensor]) -> Callable[[], List[torch.Tensor]]:
        """The device-to-host copies of `srcs` into the staging views, on the side stream, of the
        state as of now: issued here when the staging is ready, else by the saver's thread
        (stage_copies). Returns land(): waits for them, returns the views."""
        from tierzero.parallel.engines.staging import stage_copies

        staging = self._staging_for([src.numel() for src in srcs])
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(device=self.device)
        saved_at = torch.cuda.Event()
        saved_at.record(torch.cuda.current_stream(self.device))

        def issue(views: List[torch.Tensor]) -> Callable[[], None]:
            with torch.cuda.device(self.device):  # on the saver's thread too
                self._copy_stream.wait_event(saved_at)
                with torch.cuda.stream(self._copy_stream):
                    for view, src in zip(views, srcs):
                        view.copy_(src, non_blocking=True)
                done = torch.cuda.Event()
                done.record(self._copy_stream)
            self._copy_event = done  # step() has the update wait for it, on the device
            return done.synchronize

        handoff, land = stage_copies(staging, issue)
        if handoff is not None:  # issued later, by the saver's thread: step() waits for that first
            self.snapshot_guard = handoff
        return land

    def load_checkpoint(self, read: Callable[[str, int, int], "object"], step_count: int) -> None:
        """Fill this rank's shards from global tensors (`read(name, start, numel)` returns a
        numpy array), whatever layout saved them. Local only (no collectives), so a rank that
        fails to read cannot leave the others waiting; `after_load` then rebuilds the
        parameters from the masters, on every rank together."""
        for u in self.units:
            for key, _ in STATE_KEYS:
                getattr(u, key).zero_()
            for ent, at, n, _, start in self._owned(u):
                for key, prefix in STATE_KEYS:
                    getattr(u, key)[at:at + n].copy_(torch.from_numpy(read(f"{prefix}/{ent.name}", start, n)))
        with torch.no_grad():
            for name, buf in persistent_buffers(self.model):
                buf.copy_(torch.from_numpy(read(f"buffer/{name}", 0, buf.numel())).view(buf.shape))
        self.step_count = step_count

    def after_load(self) -> None:
        self._params_down()

    # ---- global tensors (checkpoints, tests) -----------------------------------------------
    def global_tensors(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """name -> {'param', 'exp_avg', 'exp_avg_sq'} as full fp32 tensors, on every rank.
        Expert weights come back with all experts (global shape [E, ...])."""
        out: Dict[str, Dict[str, torch.Tensor]] = {}
        for u in self.units:
            d = u.domain
            group = d.groups["optim"]
            fulls = {}
            for key in ("master", "exp_avg", "exp_avg_sq"):
                shard = getattr(u, key)
                full = torch.empty(u.N, dtype=torch.float32, device=self.device)
                outs = [full[j * u.c_o:(j + 1) * u.c_o] for j in d.positions(group, self.plan.optim_level)]
                if group.size > 1:
                    dist.all_gather(outs, shard, group=group.pg)
                else:
                    outs[0].copy_(shard)
                fulls[key] = full
            for ent in u.params:
                tensors = {("param" if k == "master" else k): v[ent.offset: ent.offset + ent.numel].view(ent.shape).clone()
                           for k, v in fulls.items()}
                if d is self.experts and self.ep_group.size > 1:  # concatenate the EP ranks' experts
                    for k, t in tensors.items():
                        parts = [torch.empty_like(t) for _ in range(self.ep_group.size)]
                        dist.all_gather(parts, t, group=self.ep_group.pg)
                        tensors[k] = torch.cat(parts, 0)
                out[ent.name] = tensors
        return out
