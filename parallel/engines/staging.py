"""Host staging for a GPU engine's checkpoints: one host buffer of exactly the bytes a rank saves,
every saved slice a view into it, allocated and page-locked once, off the training thread.

Why: a save copies the optimizer state (fp32 masters and both AdamW moments, 12 bytes per
parameter) to host memory before writing it. With one `torch.empty(pin_memory=True)` per slice
at the first save, the caching host allocator rounds each up to a power of two and takes
cudaHostAlloc under the driver's lock on the training thread: the first asynchronous save of a
~1B model stalled the loop ~11 s (docs/benchmarks.md, "GPU validation"; issue 25, item 5). Here a
plain allocation of the exact size is registered with cudaHostRegister (what
torch.distributed.checkpoint's own stager does) on a background thread, started after the first
optimizer step; a save then only issues its device-to-host copies into the views.

The pieces are device-free so they are tested on CPU (tests/test_checkpoint_staging.py):
`staging_layout` (pure), `HostStaging` (allocation and the injected pin step on a thread, the
readiness it hands over) and `stage_copies` (a save's copies issued at once when the staging is
ready, else by the saver's thread once it is, with the `Handoff` the engine's next optimizer step
waits on). The CUDA calls are `pin_host` and the `issue` function the engine passes in.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

log = logging.getLogger(__name__)

CUDA_HOST_REGISTER_PORTABLE = 1
"""cudaHostRegisterPortable: pinned for every CUDA context, whichever device the registering
thread had current (torch.cuda._pin_memory_utils uses the same flag)."""


class StagingError(RuntimeError):
    """The host staging buffer could not be allocated: the save that needed it fails, training goes on."""


@dataclass(frozen=True)
class StagingLayout:
    """Where each saved slice lives in the one buffer: elements [offsets[i], offsets[i] + numels[i])."""
    numels: Tuple[int, ...]
    offsets: Tuple[int, ...]

    @property
    def total(self) -> int:
        """Elements in the buffer: exactly the slices', back to back (no rounding, no padding)."""
        return (self.offsets[-1] + self.numels[-1]) if self.numels else 0


def staging_layout(numels: Sequence[int]) -> StagingLayout:
    """The slices back to back, in save order (the order they are written to the shard)."""
    offsets, at = [], 0
    for n in numels:
        n = int(n)
        if n < 0:
            raise ValueError(f"a slice of {n} elements")
        offsets.append(at)
        at += n
    return StagingLayout(tuple(int(n) for n in numels), tuple(offsets))


class Handoff:
    """Set once a save's copies have been issued (or could not be): the engine's next optimizer
    step waits on it before it changes the state the copies read. `waited_s` is what that wait
    cost the training loop (part of the save's stall)."""

    def __init__(self):
        self._done = threading.Event()
        self.waited_s = 0.0

    def set(self) -> None:
        self._done.set()

    def is_set(self) -> bool:
        return self._done.is_set()

    def wait(self) -> None:
        if not self._done.is_set():
            t0 = time.perf_counter()
            self._done.wait()
            self.waited_s += time.perf_counter() - t0


class HostStaging:
    """One float32 host buffer for every slice a rank saves; `start()` allocates it and runs `pin`
    on it on a background thread. `pin(buffer)` page-locks it and returns what undoes that (run
    when this object is collected); None skips pinning (CPU tests). A failed pin leaves the buffer
    pageable (copies into it are then synchronous, still correct) with a warning; a failed
    allocation is kept and raised by `wait()`, as StagingError."""

    def __init__(self, numels: Sequence[int], *, pin: Optional[Callable[[torch.Tensor], Callable[[], None]]] = None,
                 allocate: Callable[[int], torch.Tensor] = lambda n: torch.empty(n, dtype=torch.float32)):
        self.layout = staging_layout(numels)
        self._pin, self._allocate = pin, allocate
        self._ready = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self.buffer: Optional[torch.Tensor] = None
        self.pinned = False
        self.error: Optional[BaseException] = None
        self.build_s = 0.0
        """Seconds the background thread took to allocate and pin (telemetry, benchmarks)."""

    def fits(self, numels: Sequence[int]) -> bool:
        return self.layout.numels == tuple(int(n) for n in numels)

    def start(self) -> "HostStaging":
        """Begin allocating and pinning in the background (once; later calls do nothing)."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._build, daemon=True, name="checkpoint-staging")
                self._thread.start()
        return self

    @property
    def ready(self) -> bool:
        """The buffer exists (pinned, or pageable after a failed pin): copies may be issued into it."""
        return self._ready.is_set() and self.error is None

    def _build(self) -> None:
        t0 = time.perf_counter()
        try:
            buffer = self._allocate(self.layout.total)
            if buffer.numel() != self.layout.total or buffer.dtype != torch.float32:
                raise StagingError(f"allocated {buffer.numel()} {buffer.dtype} elements, not "
                                   f"{self.layout.total} float32")
            if self._pin is not None and self.layout.total:
                try:
                    unpin = self._pin(buffer)
                except Exception as e:  # still a buffer: the copies only lose their asynchrony
                    log.warning("checkpoint staging: %d bytes could not be page-locked (%s); saves copy into "
                                "pageable memory", 4 * self.layout.total, e)
                else:
                    self.pinned = True
                    # unregistered when this staging goes, before its buffer is freed (finalize
                    # holds it); not at interpreter exit, when CUDA may already be torn down
                    weakref.finalize(self, _undo, unpin, buffer).atexit = False
            self.buffer = buffer
        except BaseException as e:  # raised by wait(), in the save that needs the buffer
            self.error = e
        finally:
            self.build_s = time.perf_counter() - t0
            self._ready.set()

    def wait(self) -> List[torch.Tensor]:
        """The slices' views into the buffer, once it exists (starting it if nobody did)."""
        self.start()._ready.wait()
        if self.error is not None:
            raise StagingError(f"the checkpoint staging buffer ({4 * self.layout.total} bytes) could not be "
                               f"allocated: {type(self.error).__name__}: {self.error}") from self.error
        return [self.buffer[o:o + n] for o, n in zip(self.layout.offsets, self.layout.numels)]


def _undo(unpin: Callable[[], None], buffer: torch.Tensor) -> None:
    try:
        unpin()
    except Exception as e:  # at teardown: nothing left to save, only to say
        log.warning("checkpoint staging: unregistering the host buffer failed: %s", e)


def stage_copies(staging: HostStaging, issue: Callable[[List[torch.Tensor]], Callable[[], None]],
                 ) -> Tuple[Optional[Handoff], Callable[[], List[torch.Tensor]]]:
    """A save's copies into the staging views. `issue(views)` issues them (on the device: queued
    on a side stream, returning at once) and returns what waits until they have landed.

    Staging ready: issued here, on the caller's (training) thread, which does nothing else; the
    handoff is None. Not ready yet (the first save came before the background allocation ended):
    nothing waits here; `land`, run by the saver's thread, waits for the staging and issues them,
    and the returned handoff is set once it has (or failed): the engine's next optimizer step
    waits on it, so forward and backward overlap the wait and only the update can stall.

    Returns (handoff, land): land() waits for the copies and returns the views, full."""
    if staging.ready:
        views = staging.wait()
        landed = issue(views)

        def land() -> List[torch.Tensor]:
            landed()
            return views
        return None, land

    handoff = Handoff()

    def land_later() -> List[torch.Tensor]:
        try:
            views = staging.wait()
            landed = issue(views)
        finally:
            handoff.set()  # issued, or never will be: the optimizer step must not wait forever
        landed()
        return views
    return handoff, land_later


# ---- CUDA: page-locking a plain allocation ---------------------------------------------------------

def _loaded_cudart():
    """(cudaHostRegister, cudaHostUnregister) of the libcudart this process already loaded (torch's),
    through ctypes, which releases the GIL for the call: registering gigabytes takes seconds, and
    the training thread must not wait for the GIL meanwhile. None when it cannot be found."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libcudart.so" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)  # already loaded: dlopen hands back the same library
            register, unregister = lib.cudaHostRegister, lib.cudaHostUnregister
        except (OSError, AttributeError):
            continue
        register.argtypes, register.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint], ctypes.c_int
        unregister.argtypes, unregister.restype = [ctypes.c_void_p], ctypes.c_int
        return register, unregister
    return None


def pin_host(buffer: torch.Tensor, device: str) -> Callable[[], None]:
    """Page-lock `buffer` for DMA with cudaHostRegister (portable); returns what unregisters it.
    Run on the staging thread: `device` is made current there first, so the CUDA runtime does not
    create a context on device 0 for a thread that never chose one."""
    index = torch.device(device).index
    if index is not None:
        torch.cuda.set_device(index)
    ptr, nbytes = buffer.data_ptr(), buffer.numel() * buffer.element_size()
    calls = _loaded_cudart()
    if calls is None:  # torch's binding: holds the GIL for the call
        cudart = torch.cuda.cudart()
        register = lambda p, n, flags: int(cudart.cudaHostRegister(p, n, flags))  # noqa: E731
        unregister = lambda p: int(cudart.cudaHostUnregister(p))  # noqa: E731
    else:
        register, unregister = calls
    err = int(register(ptr, nbytes, CUDA_HOST_REGISTER_PORTABLE))
    if err != 0:
        raise StagingError(f"cudaHostRegister of {nbytes} bytes failed with cudaError {err}")

    def unpin() -> None:
        err = int(unregister(ptr))
        if err != 0:
            raise StagingError(f"cudaHostUnregister failed with cudaError {err}")
    return unpin
