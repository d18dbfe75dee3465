"""The platform's reusable Pulumi components, composed by `__main__.py` in this order."""
from components.cluster_addons import ClusterAddons, ClusterAddonsArgs
from components.gpu_pool import GpuPool, GpuPoolArgs
from components.guardrails import Guardrails, GuardrailsArgs
from components.inference_gateway import InferenceGateway, InferenceGatewayArgs
from components.llm_serving import LLMServing, LLMServingArgs
from components.model_storage import ModelStorage, ModelStorageArgs
from components.observability import Observability, ObservabilityArgs

__all__ = ["ClusterAddons", "ClusterAddonsArgs", "GpuPool", "GpuPoolArgs", "Guardrails", "GuardrailsArgs",
           "InferenceGateway", "InferenceGatewayArgs",
           "LLMServing", "LLMServingArgs", "ModelStorage", "ModelStorageArgs", "Observability", "ObservabilityArgs"]
