"""GPU utilization for /metrics (`llm_gpu_utilization{gpu_id}`, percent), read from NVML at scrape time.

Without a GPU or an NVIDIA driver (CPU runs, CI) the metric is declared (HELP/TYPE) with no series, and
the reason is logged once: an absent series is honest, a zero would read as an idle GPU. Only the GPUs
this container can see are listed (the device plugin exposes the assigned ones), indexed as NVML numbers
them inside the container.
"""
from __future__ import annotations

import logging
import threading
from types import ModuleType
from typing import Iterator, Literal

from prometheus_client.core import GaugeMetricFamily, Metric

logger = logging.getLogger(__name__)


class GpuUtilizationCollector:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        # The pynvml module once initialised; False once known to be unavailable.
        self._nvml: ModuleType | Literal[False] | None = None

    def _init(self) -> ModuleType | Literal[False] | None:
        with self._lock:
            if self._nvml is None:
                try:
                    import pynvml  # from nvidia-ml-py

                    pynvml.nvmlInit()
                    self._nvml = pynvml
                    logger.info("NVML initialised", extra={"gpus": pynvml.nvmlDeviceGetCount()})
                except Exception as exc:  # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded, ImportError...
                    self._nvml = False
                    logger.info("No GPU utilization metrics: NVML unavailable", extra={"reason": str(exc)})
            return self._nvml

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("llm_gpu_utilization", "GPU busy time over the last sample period, percent.",
                                   labels=["gpu_id"])
        nvml = self._init()
        if not nvml:
            yield family
            return
        try:
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                family.add_metric([str(index)], float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu))
        except nvml.NVMLError as exc:
            # A scrape must not fail because one NVML call did (e.g. GPU fell off the bus); say why and go on.
            logger.warning("NVML read failed", extra={"reason": str(exc)})
        yield family

    def close(self) -> None:
        with self._lock:
            if self._nvml:
                try:
                    self._nvml.nvmlShutdown()
                except Exception:  # noqa: BLE001 - shutting down anyway; nothing useful to do with the error
                    pass
            self._nvml = None
