"""The llm-platform Pulumi program: reads the stack config once and composes the components.

ClusterAddons (optional Helm releases) -> GpuPool -> Guardrails -> ModelStorage and LLMServing (one each per model)
-> InferenceGateway (when on: the stack's one endpoint) -> Observability.
Bad config stops here, at preview, with one message naming the stack, the key and what is allowed; the capacity
plan is logged and exported.
"""
import pulumi

from components import (
    ClusterAddons,
    ClusterAddonsArgs,
    GpuPool,
    GpuPoolArgs,
    Guardrails,
    GuardrailsArgs,
    InferenceGateway,
    InferenceGatewayArgs,
    LLMServing,
    LLMServingArgs,
    ModelStorage,
    ModelStorageArgs,
    Observability,
    ObservabilityArgs,
)
from components.inference_gateway import GatewayRoute, endpoints_service_name, gateway_pods_selector
from components.observability import ObservedModel, adapter_rules, scrape_annotations
from llm_platform import stack
from llm_platform.config import gateway_image, model_host, tls_secret_name

planned = stack.load()
cfg = planned.config
observed = [ObservedModel(model.config, plan.queries)
            for model, plan in zip(planned.models, planned.plans, strict=True)]

addons = ClusterAddons("cluster-addons", ClusterAddonsArgs(
    addons=cfg.addons, observability=cfg.observability, gpu_pool=cfg.gpu_pool, adapter_rules=adapter_rules(observed),
    backups=cfg.backups,
))
after_addons = pulumi.ResourceOptions(depends_on=list(addons.releases.values()))

gpu_pool = GpuPool("gpu-pool", GpuPoolArgs(pool=cfg.gpu_pool), opts=after_addons)

gateway_on = cfg.gateway.enabled
scraped = cfg.observability.prometheus_operator or cfg.addons.kube_prometheus_stack.enabled
prometheus_namespace = cfg.observability.prometheus_namespace if scraped else None

guardrails = Guardrails("guardrails", GuardrailsArgs(
    namespace=cfg.namespace,
    guardrails=cfg.guardrails,
    model_names=[m.name for m in cfg.models],
    ingress_controller_namespace=cfg.ingress.controller_namespace if cfg.ingress.enabled and not gateway_on else None,
    prometheus_namespace=prometheus_namespace,
    gateway_pods=gateway_pods_selector() if gateway_on else None,
    group_sizes={m.name: m.nodes_per_replica for m in cfg.models if m.workload == "leaderworkerset"},
), opts=after_addons)

servings = {}
for model, plan in zip(planned.models, planned.plans, strict=True):
    storage = ModelStorage(f"{model.name}-storage", ModelStorageArgs(
        namespace=guardrails.namespace_name,
        model=model,
        service_account=guardrails.service_account_name,
        network_policies=cfg.guardrails.network_policies,
        backups=cfg.backups,
        scheduling=gpu_pool.scheduling,
    ), opts=pulumi.ResourceOptions(depends_on=[guardrails, *addons.releases.values()]))
    servings[model.name] = LLMServing(model.name, LLMServingArgs(
        namespace=guardrails.namespace_name,
        model=model,
        ingress=cfg.ingress,
        # Behind the gateway a model has no Ingress of its own: the gateway's is the stack's one endpoint.
        host=model_host(cfg, model.config) if cfg.ingress.enabled and not gateway_on else None,
        tls_secret_name=tls_secret_name(cfg, model.config) or cfg.ingress.tls_secret_name,
        service_account=guardrails.service_account_name,
        api_key_secret=guardrails.api_key_secret_name,
        scheduling=gpu_pool.scheduling,
        gpu_resource=gpu_pool.gpu_resource,
        pod_annotations=scrape_annotations(cfg.observability),
        target_load_per_replica=plan.target_load_per_replica,
        load_query=plan.queries.load_total,
        prometheus_url=cfg.observability.prometheus_url,
        storage_ready=storage.ready,
        gateway_endpoints=gateway_on,
        progress_deadline_seconds=plan.progress_deadline_seconds,
    ), opts=pulumi.ResourceOptions(depends_on=[guardrails, *addons.releases.values()]))

gateway = None
if gateway_on:
    gateway = InferenceGateway("gateway", InferenceGatewayArgs(
        namespace=guardrails.namespace_name,
        namespace_name=cfg.namespace,
        gateway=cfg.gateway,
        image=gateway_image(cfg) or "",  # validation requires an image with the gateway on
        routes=[GatewayRoute(served_model_name=model.config.served_model_name,
                             service=endpoints_service_name(model.name),
                             # Set by the plan whenever the gateway is on.
                             cold_start_timeout_seconds=plan.cold_start_timeout_seconds or 0,
                             max_inflight_per_pod=plan.gateway_max_inflight_per_pod or 0,
                             max_queue=cfg.gateway.max_queue_per_model)
                for model, plan in zip(planned.models, planned.plans, strict=True)],
        ingress=cfg.ingress,
        allow_from=cfg.guardrails.allow_from,
        service_account=guardrails.service_account_name,
        api_key_secret=guardrails.api_key_secret_name,
        network_policies=cfg.guardrails.network_policies,
        prometheus_namespace=prometheus_namespace,
        tls_secret_name=cfg.ingress.tls_secret_name if cfg.ingress.tls else None,
        pod_annotations=scrape_annotations(cfg.observability),
        priority_class_name=cfg.gpu_pool.priority_class.name if cfg.gpu_pool.priority_class else None,
    ), opts=pulumi.ResourceOptions(depends_on=[guardrails, *servings.values()]))

Observability("observability", ObservabilityArgs(
    namespace=guardrails.namespace_name,
    observability=cfg.observability,
    models=observed,
    gateway=gateway_on,
), opts=pulumi.ResourceOptions(depends_on=[*servings.values(), *([gateway] if gateway else [])]))

pulumi.export("namespace", guardrails.namespace_name)
pulumi.export("endpoints", {name: gateway.endpoint if gateway else s.endpoint for name, s in servings.items()})
pulumi.export("gpusAtMaxReplicas", cfg.total_gpus_at_max)
pulumi.export("apiKey", guardrails.api_key)
pulumi.export("capacityPlan", {plan.name: {**plan.as_output(), "summary": plan.lines()} for plan in planned.plans})
for plan in planned.plans:
    pulumi.log.info("\n".join(plan.lines()))
