"""Host-to-device copies that never make the engine thread wait for the device.

The engine launches a step while the one before still runs (`serving.engine.engine`, overlap), so every input it
copies to the device must go without a synchronisation: CUDA may stage a copy from pageable memory only after the
work queued on the stream is done, which would stall the host for a whole step. A copy from pinned memory is
queued like a kernel instead.
"""
from __future__ import annotations

import torch


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`host` on `device`, copied without making the host wait for the device: on CUDA from pinned memory (a copy
    from pageable memory may wait for the work already queued on the stream), and asynchronously."""
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)
