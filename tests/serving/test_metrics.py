"""The request counter's labels: the article's `status` values, the HTTP code in its own `code` label."""
from __future__ import annotations

from serving.metrics import ServerMetrics


def test_requests_keep_the_article_status_values_with_the_http_code_in_its_own_label():
    metrics = ServerMetrics("tiny", lambda: None)
    for code in (200, 200, 400, 499, 503):
        metrics.count_request(code)
    counted = {(sample.labels["status"], sample.labels["code"]): sample.value
               for family in metrics.registry.collect() if family.name == "llm_requests"
               for sample in family.samples if sample.name == "llm_requests_total"}
    assert counted == {("success", "200"): 2, ("error", "400"): 1, ("error", "499"): 1, ("error", "503"): 1}
    family = next(family for family in metrics.registry.collect() if family.name == "llm_requests")
    assert {tuple(sorted(sample.labels)) for sample in family.samples} == {("code", "model", "status")}
