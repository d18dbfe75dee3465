"""A `PlannedModel` from a `ModelConfig` written out in a test, for the builders and components that take one."""
from __future__ import annotations

from llm_platform.config import ModelConfig, ProbeConfig, RolloutConfig
from llm_platform.plan import PlannedModel, PlannedProbes


def planned(config: ModelConfig) -> PlannedModel:
    """The model as written, with what the plan would compute taken from the config: its rollout (unset: maxSurge 1 /
    maxUnavailable 0), the startup probe's failureThreshold (unset: the article's 30), its image, modelPath, shm size
    and engine limits; checksums required only when `fill.requireChecksums` says so."""
    startup = config.probes.startup
    return PlannedModel(
        config=config, image=config.image or "", model_path=config.model_path or "", storage=config.storage,
        rollout=config.rollout or RolloutConfig(1, 0),
        probes=PlannedProbes(liveness=config.probes.liveness, readiness=config.probes.readiness,
                             startup=ProbeConfig(startup.initial_delay_seconds, startup.period_seconds,
                                                 startup.timeout_seconds, startup.failure_threshold or 30)),
        shm_size=config.shm_size, max_model_len=config.max_model_len, max_num_seqs=config.max_num_seqs,
        require_checksums=bool(config.fill.require_checksums))
