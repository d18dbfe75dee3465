"""The llm-platform Pulumi program: reads the stack config once and composes the components.

ClusterAddons (optional Helm releases) -> GpuPool -> Guardrails -> ModelStorage and LLMServing (one each per model)
-> Observability.
Bad config stops here, at preview, with one message naming the stack, the key and what is allowed; the capacity
plan is logged and exported.
"""
import pulumi

import stack_config
from components import (
    ClusterAddons, ClusterAddonsArgs, GpuPool, GpuPoolArgs, Guardrails, GuardrailsArgs, LLMServing, LLMServingArgs,
    ModelStorage, ModelStorageArgs, Observability, ObservabilityArgs,
)
from components.observability import ObservedModel, adapter_rules, scrape_annotations

cfg = stack_config.load()
observed = [ObservedModel(model, plan.queries) for model, plan in zip(cfg.models, cfg.plans)]

addons = ClusterAddons("cluster-addons", ClusterAddonsArgs(
    addons=cfg.addons, observability=cfg.observability, gpu_pool=cfg.gpu_pool, adapter_rules=adapter_rules(observed),
    backups=cfg.backups,
))
after_addons = pulumi.ResourceOptions(depends_on=list(addons.releases.values()))

gpu_pool = GpuPool("gpu-pool", GpuPoolArgs(pool=cfg.gpu_pool), opts=after_addons)

extra_callers = []
if cfg.ingress.enabled:
    extra_callers.append(cfg.ingress.controller_namespace)
if cfg.observability.prometheus_operator or cfg.addons.kube_prometheus_stack.enabled:
    extra_callers.append(cfg.observability.prometheus_namespace)

guardrails = Guardrails("guardrails", GuardrailsArgs(
    namespace=cfg.namespace,
    guardrails=cfg.guardrails,
    model_names=[m.name for m in cfg.models],
    extra_ingress_namespaces=extra_callers,
    group_sizes={m.name: m.nodes_per_replica for m in cfg.models if m.workload == "leaderworkerset"},
), opts=after_addons)

servings = {}
for model, plan in zip(cfg.models, cfg.plans):
    storage = ModelStorage(f"{model.name}-storage", ModelStorageArgs(
        namespace=guardrails.namespace_name,
        model=model,
        service_account=guardrails.service_account_name,
        network_policies=cfg.guardrails.network_policies,
        backups=cfg.backups,
    ), opts=pulumi.ResourceOptions(depends_on=[guardrails, *addons.releases.values()]))
    servings[model.name] = LLMServing(model.name, LLMServingArgs(
        namespace=guardrails.namespace_name,
        model=model,
        ingress=cfg.ingress,
        host=stack_config.model_host(cfg, model) if cfg.ingress.enabled else None,
        tls_secret_name=stack_config.tls_secret_name(cfg, model) or cfg.ingress.tls_secret_name,
        service_account=guardrails.service_account_name,
        api_key_secret=guardrails.api_key_secret_name,
        scheduling=gpu_pool.scheduling,
        gpu_resource=gpu_pool.gpu_resource,
        pod_annotations=scrape_annotations(cfg.observability),
        target_load_per_replica=plan.target_load_per_replica,
        load_query=plan.queries.load_total,
        prometheus_url=cfg.observability.prometheus_url,
        storage_ready=storage.ready,
    ), opts=pulumi.ResourceOptions(depends_on=[guardrails, *addons.releases.values()]))

Observability("observability", ObservabilityArgs(
    namespace=guardrails.namespace_name,
    observability=cfg.observability,
    models=observed,
), opts=pulumi.ResourceOptions(depends_on=list(servings.values())))

pulumi.export("namespace", guardrails.namespace_name)
pulumi.export("endpoints", {name: s.endpoint for name, s in servings.items()})
pulumi.export("gpusAtMaxReplicas", cfg.total_gpus_at_max)
pulumi.export("apiKey", guardrails.api_key)
pulumi.export("capacityPlan", {plan.name: {**plan.as_output(), "summary": plan.lines()} for plan in cfg.plans})
for plan in cfg.plans:
    pulumi.log.info("\n".join(plan.lines()))
