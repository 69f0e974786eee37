"""Node samples: CPU, memory and every GPU of this node, one row per GPU per sample."""

from __future__ import annotations

import datetime
import logging
import threading
from typing import Any, Callable, Optional

logger = logging.getLogger(__name__)

_NO_GPU = dict.fromkeys(
    ["gpu_index", "gpu_util_percent", "gpu_mem_used_bytes", "gpu_mem_total_bytes", "gpu_power_w", "gpu_temp_c"]
)


class NodeSampler:
    """A daemon thread that emits node rows every `interval_s` and once more on stop().

    Rows go to `emit` (a TableWriter's append). Samples are taken at the end of each
    period, so cpu_percent is the average over the period rather than a meaningless
    instant. Without a GPU driver (or without pynvml) rows carry CPU columns only.
    """

    def __init__(self, host: str, interval_s: float, emit: Callable[[dict], Any]):
        if not interval_s > 0:
            raise ValueError(f"telemetry.node_sample_every_s={interval_s} must be > 0; set e.g. 5")
        self.host = host
        self.interval_s = interval_s
        self._emit = emit
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._process = None
        self._nvml = None
        self._gpus: list = []

    def start(self) -> None:
        import psutil

        if self._thread is not None:
            return
        self._process = psutil.Process()
        psutil.cpu_percent(interval=None)  # starts the averaging window of the first sample
        self._nvml, self._gpus = _open_gpus()
        self._thread = threading.Thread(target=self._run, name="telemetry-nodes", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread after one last sample; releases NVML."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError:
                pass
            self._nvml, self._gpus = None, []

    def sample(self) -> list[dict]:
        """One sample now: one row per GPU, or one CPU-only row."""
        import psutil

        if self._process is None:
            self._process = psutil.Process()
        memory = psutil.virtual_memory()
        base = {
            "time": datetime.datetime.now(datetime.timezone.utc),
            "host": self.host,
            "cpu_percent": psutil.cpu_percent(interval=None),
            "mem_used_bytes": memory.total - memory.available,
            "mem_total_bytes": memory.total,
            "proc_rss_bytes": self._process.memory_info().rss,
        }
        if not self._gpus:
            return [{**base, **_NO_GPU}]
        nv = self._nvml
        rows = []
        for index, handle in enumerate(self._gpus):
            mem = _query(nv, nv.nvmlDeviceGetMemoryInfo, handle)
            util = _query(nv, nv.nvmlDeviceGetUtilizationRates, handle)
            power_mw = _query(nv, nv.nvmlDeviceGetPowerUsage, handle)
            rows.append(
                {
                    **base,
                    "gpu_index": index,
                    "gpu_util_percent": None if util is None else util.gpu,
                    "gpu_mem_used_bytes": None if mem is None else mem.used,
                    "gpu_mem_total_bytes": None if mem is None else mem.total,
                    "gpu_power_w": None if power_mw is None else power_mw / 1000.0,
                    "gpu_temp_c": _query(nv, nv.nvmlDeviceGetTemperature, handle, nv.NVML_TEMPERATURE_GPU),
                }
            )
        return rows

    def _run(self) -> None:
        while True:
            stopping = self._stop.wait(self.interval_s)
            try:
                for row in self.sample():
                    self._emit(row)
            except Exception:  # a sampler must never take the training process down
                logger.warning("node sample failed on %s", self.host, exc_info=True)
            if stopping:
                return


def _open_gpus() -> tuple[Any, list]:
    """(pynvml module, device handles), or (None, []) when there is no usable driver."""
    try:
        import pynvml
    except ImportError as e:
        logger.debug("pynvml is not importable (%s); node samples hold CPU columns only", e)
        return None, []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        logger.debug("NVML unavailable (%s); node samples hold CPU columns only", e)
        return None, []
    try:
        count = pynvml.nvmlDeviceGetCount()
        return pynvml, [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
    except pynvml.NVMLError as e:
        logger.debug("NVML could not list GPUs (%s); node samples hold CPU columns only", e)
        pynvml.nvmlShutdown()
        return None, []


def _query(nv: Any, fn: Callable, *args: Any) -> Any:
    # One unsupported query (power on some boards) nulls one column, not the row.
    try:
        return fn(*args)
    except nv.NVMLError:
        return None
