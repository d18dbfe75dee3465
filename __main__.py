"""The llm-platform Pulumi program: reads the stack config once and composes the four components.

GpuPool -> Guardrails -> LLMServing (one per model) -> Observability. Bad config stops here, at preview,
with one message naming the stack, the key and what is allowed.
"""
import pulumi

import stack_config
from components import (
    GpuPool, GpuPoolArgs, Guardrails, GuardrailsArgs, LLMServing, LLMServingArgs, Observability, ObservabilityArgs,
)
from components.observability import scrape_annotations

cfg = stack_config.load()

gpu_pool = GpuPool("gpu-pool", GpuPoolArgs(pool=cfg.gpu_pool))

extra_callers = []
if cfg.ingress.enabled:
    extra_callers.append(cfg.ingress.controller_namespace)
if cfg.observability.prometheus_operator:
    extra_callers.append(cfg.observability.prometheus_namespace)

guardrails = Guardrails("guardrails", GuardrailsArgs(
    namespace=cfg.namespace,
    guardrails=cfg.guardrails,
    model_names=[m.name for m in cfg.models],
    extra_ingress_namespaces=extra_callers,
))

servings = {}
for model in cfg.models:
    servings[model.name] = LLMServing(model.name, LLMServingArgs(
        namespace=guardrails.namespace_name,
        model=model,
        ingress=cfg.ingress,
        host=stack_config.model_host(cfg, model) if cfg.ingress.enabled else None,
        tls_secret_name=cfg.ingress.tls_secret_name if len(cfg.models) == 1 else f"{model.name}-tls",
        service_account=guardrails.service_account_name,
        api_key_secret=guardrails.api_key_secret_name,
        scheduling=gpu_pool.scheduling,
        gpu_resource=gpu_pool.gpu_resource,
        pod_annotations=scrape_annotations(cfg.observability),
    ), opts=pulumi.ResourceOptions(depends_on=[guardrails]))

Observability("observability", ObservabilityArgs(
    namespace=guardrails.namespace_name,
    observability=cfg.observability,
    model_names=[m.name for m in cfg.models],
), opts=pulumi.ResourceOptions(depends_on=list(servings.values())))

pulumi.export("namespace", guardrails.namespace_name)
pulumi.export("endpoints", {name: s.endpoint for name, s in servings.items()})
pulumi.export("gpusAtMaxReplicas", cfg.total_gpus_at_max)
pulumi.export("apiKey", guardrails.api_key)
pulumi.export("capacityPlan", {plan.name: {**plan.as_output(), "summary": plan.lines()} for plan in cfg.plans})
for plan in cfg.plans:
    pulumi.log.info("\n".join(plan.lines()))
