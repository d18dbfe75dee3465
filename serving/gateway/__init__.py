"""The model-aware gateway (`python -m serving.gateway`): one OpenAI endpoint in front of every model of a stack.

A request's body names its `model`; the gateway sends it to one of that model's ready pods, chosen by the
requests it has outstanding there and by the prompt's leading block (so requests that share a system prompt
meet the pod whose prefix cache holds it). It holds requests while a model scales up from zero, queues them
when every pod is full, checks API keys with per-key limits, and retries once on another pod when one fails
before answering. It keeps no state another replica needs: any replica can take any request.

Modules, one concern each: `config` (flags, environment, routes file), `discovery` (which pods are ready),
`balancer` (pure: least load plus consistent hashing with bounded load), `pool` (a model's pods, slots and
waiting requests), `limits` (pure: per-key rate limits), `proxy` (the upstream call, streamed through),
`upstream` (the HTTP/1.1 client and per-pod keep-alive connections it uses), `app` (the ASGI front), `errors`
(the gateway's own OpenAI-shaped errors), `metrics`, `__main__` (the process and its SIGTERM drain).
"""
