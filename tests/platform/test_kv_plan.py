"""The capacity plan in paged-KV blocks: what the memory left after the weights holds, at full context and at a
typical length, and the builtin engine's block and prefix-cache settings."""
from __future__ import annotations

import json

import pytest

from llm_platform import capacity
from llm_platform.config import ConfigError
from llm_platform.stack import parse_stack_config
from tests.conftest import render_values, stack_values


def test_prod_plans_its_kv_blocks(rendered):
    prod = rendered("prod")
    kv = prod.outputs["capacityPlan"]["llm-service"]["kv_cache"]
    # Llama-3.1-8B: 128 KiB of K and V per token; 72 GiB usable - 14.96 weights - 2.75 overhead = 54.29 GiB.
    assert kv == {"blocks": 27799, "blockSize": 16, "fullContextSequences": 54, "typicalTokens": 2048,
                  "typicalSequences": 217}
    assert ("  paged KV cache: 27799 blocks of 16 tokens per GPU hold 54 sequences at full context, 217 at a typical "
            "2048 tokens (the engine runs at most maxNumSeqs at once)") in \
        prod.outputs["capacityPlan"]["llm-service"]["summary"]
    env = {e["name"]: e["value"] for e in prod.one("Deployment", "llm-service")["spec"]["template"]["spec"]
           ["containers"][0]["env"]}
    assert (env["BLOCK_SIZE"], env["ENABLE_PREFIX_CACHING"]) == ("16", "on")


def test_a_typical_length_and_a_block_size_of_ones_own():
    values = stack_values("prod")
    model = values["models"][0]
    model["sizing"]["typicalContextTokens"] = 500
    model.update(kvBlockSize=32, prefixCaching=False)
    result = render_values("prod", values)
    kv = result.outputs["capacityPlan"]["llm-service"]["kv_cache"]
    assert kv["blockSize"] == 32 and kv["blocks"] == 27799 // 2
    assert kv["typicalSequences"] == kv["blocks"] // 16          # 500 tokens take 16 blocks of 32
    env = {e["name"]: e["value"] for e in result.one("Deployment", "llm-service")["spec"]["template"]["spec"]
           ["containers"][0]["env"]}
    assert (env["BLOCK_SIZE"], env["ENABLE_PREFIX_CACHING"]) == ("32", "off")


def test_blocks_are_whole_per_sequence():
    assert capacity.sequences_in_blocks(100, 16, 16) == 100
    assert capacity.sequences_in_blocks(100, 17, 16) == 50     # 17 tokens take two blocks
    assert capacity.sequences_in_blocks(1, 17, 16) == 0


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(kvBlockSize=24),
     "models[0].kvBlockSize: 24 is not a block size the builtin engine takes; use one of 1, 2, 4, 8, 16, 32, 64, 128"),
    (lambda m: m["sizing"].update(typicalContextTokens=9000),
     "models[0].sizing.typicalContextTokens: 9000 is above maxContextTokens 8192"),
    (lambda m: m["env"].update(BLOCK_SIZE="32") if "env" in m else m.update(env={"BLOCK_SIZE": "32"}),
     "models[0].env.BLOCK_SIZE: is set by the platform from kvBlockSize; set that instead"),
    (lambda m: m.update(runtime="vllm", kvBlockSize=32, fill={"secretName": "hf-token", "image": m["image"]}),
     "models[0].kvBlockSize: 32: is the builtin engine's setting"),
    (lambda m: m.update(runtime="vllm", prefixCaching=False, fill={"secretName": "hf-token", "image": m["image"]}),
     "models[0].prefixCaching: is the builtin engine's setting; for vLLM set vllm.enablePrefixCaching: false"),
])
def test_bad_kv_settings_are_one_clear_error(change, message):
    values = stack_values("prod")
    change(values["models"][0])
    with pytest.raises(ConfigError) as err:
        parse_stack_config("prod", values)
    assert str(err.value).startswith(f"stack 'prod': llm-platform:{message}")


def test_the_dashboard_shows_the_prefix_cache_hit_ratio(rendered):
    panels = json.loads(rendered("prod").one("ConfigMap", "llm-service-dashboard")["data"]["llm-service.json"])["panels"]
    (panel,) = [p for p in panels if p["title"] == "Prefix cache hit ratio (prompt tokens)"]
    assert panel["targets"][0]["expr"] == (
        'sum(rate(llm_prefix_cache_hit_tokens_total{model="llama-3.1-8b",namespace="ai-production"}[5m])) / '
        'sum(rate(llm_prefix_cache_queried_tokens_total{model="llama-3.1-8b",namespace="ai-production"}[5m]))')


def test_the_block_sizes_the_plan_allows_are_the_engines():
    from llm_platform.config import KV_BLOCK_SIZES
    from serving.engine.block_manager import BLOCK_SIZES

    assert KV_BLOCK_SIZES == BLOCK_SIZES
