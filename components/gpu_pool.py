"""GpuPool: how serving pods reach GPUs, and the GPU capacity that checks use.

It owns the scheduling fragment every GPU pod gets (node selector, tolerations, RuntimeClass, PriorityClass)
and, when configured, creates the PriorityClass. It never sets NVIDIA_VISIBLE_DEVICES: the NVIDIA device
plugin assigns GPUs from the `nvidia.com/gpu` request, and `all` would expose every GPU on the node.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_kubernetes as k8s

from llm_platform.builders import gpu_scheduling
from llm_platform.config import GPU_RESOURCE, GpuPoolConfig


@dataclass(frozen=True)
class GpuPoolArgs:
    pool: GpuPoolConfig
    """GPU type, memory, node selector, tolerations, RuntimeClass and PriorityClass settings."""


class GpuPool(pulumi.ComponentResource):
    scheduling: dict[str, Any]
    """Pod-spec fields for GPU pods: nodeSelector, tolerations, runtimeClassName, priorityClassName."""
    gpu_resource: str
    gpu_memory_gib: int

    def __init__(self, name: str, args: GpuPoolArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("llm-platform:index:GpuPool", name, None, opts)
        pool = args.pool
        self.gpu_resource = GPU_RESOURCE
        self.gpu_memory_gib = pool.gpu_memory_gib
        self.priority_class: k8s.scheduling.v1.PriorityClass | None = None
        if pool.priority_class is not None:
            pc = pool.priority_class
            self.priority_class = k8s.scheduling.v1.PriorityClass(
                f"{name}-priority",
                metadata={"name": pc.name, "labels": {"app.kubernetes.io/part-of": "llm-platform"}},
                value=pc.value,
                global_default=False,
                preemption_policy=pc.preemption_policy,
                description="LLM serving pods: keep GPU inference running when lower-priority work competes",
                opts=pulumi.ResourceOptions(parent=self),
            )
        self.scheduling = gpu_scheduling(pool, pool.priority_class.name if pool.priority_class else None)
        self.register_outputs({
            "gpuType": pool.gpu_type,
            "gpuMemoryGiB": pool.gpu_memory_gib,
            "scheduling": self.scheduling,
        })
