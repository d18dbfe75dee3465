"""The OpenAI-compatible API end to end: the real server and engine in a subprocess, the tiny model, real HTTP.

One server serves this module (API keys on, 8 slots, a 2048-token window). Outputs are compared with
`transformers` on the same weights; lengths are forced with `ignore_eos` where a test needs exact counts.
"""
from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from serving.settings import default_max_body_bytes
from tests.serving.server import MODEL_NAME, ServerProcess, sample, scrape, sse_events
from tests.serving.tiny_model import build_tiny_model

FILE_KEYS = ("key-from-file-1", "key-from-file-2")
ENV_KEY = "key-from-env"
KEY = FILE_KEYS[0]
WINDOW = 2048
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # A longer window than the shared fixture's, so a generation can outlast a client that walks away.
    return build_tiny_model(tmp_path_factory.mktemp("tiny-2k"), max_position_embeddings=WINDOW)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("api-server")
    keys_file = directory / "keys.txt"
    keys_file.write_text(f"# API keys\n{FILE_KEYS[0]}\n\n  {FILE_KEYS[1]}  \n# retired-key\n")
    proc = ServerProcess(model_dir, directory / "server.log",
                         env={"API_KEYS_FILE": str(keys_file), "API_KEY": ENV_KEY, "MAX_NUM_SEQS": "8",
                              "MAX_QUEUE": "64", "MAX_MODEL_LEN": str(WINDOW)})
    try:
        proc.wait_started()
        yield proc
    finally:
        assert proc.terminate() == 0, proc.log_text()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def hf_model(model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def post(server, path: str, body, *, headers=None, timeout: float = 60) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(f"{server.url}{path}", content=content, headers={**AUTH, **(headers or {})}, timeout=timeout)


def decode(tokenizer, ids) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


# ---- the official client ------------------------------------------------------------------------------------


def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_NAME]
    assert models[0].model_extra["max_model_len"] == WINDOW


def test_completion_with_openai_client(client, tokenizer):
    prompt = "Hello world! How are you"
    result = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert result.object == "text_completion"
    assert result.id.startswith("cmpl-")
    assert result.choices[0].finish_reason == "length"
    assert result.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert result.usage.completion_tokens == 12
    assert result.usage.total_tokens == result.usage.prompt_tokens + 12
    assert result.choices[0].text


def test_streaming_completion_matches_non_streaming(client):
    kwargs = dict(model=MODEL_NAME, prompt="The quick brown fox", max_tokens=20, temperature=0,
                  extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_with_openai_client(client, tokenizer):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello world!"}]
    result = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_completion_tokens=9,
                                            temperature=0, extra_body={"ignore_eos": True})
    expected_prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert result.object == "chat.completion"
    assert result.choices[0].message.role == "assistant"
    assert result.choices[0].finish_reason == "length"
    assert result.usage.prompt_tokens == len(expected_prompt)
    assert result.usage.completion_tokens == 9

    stream = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=9, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == result.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 9 and chunks[-1].usage.prompt_tokens == len(expected_prompt)


# ---- correctness against transformers ----------------------------------------------------------------------


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_greedy_output_equals_transformers_generate(client, tokenizer, hf_model, ignore_eos):
    import torch

    prompts = [[5 + (i * 37) % 370 for i in range(length)] for length in (3, 17, 64)]
    max_tokens = 40

    def reference(prompt):
        extra = {"min_new_tokens": max_tokens} if ignore_eos else {}
        with torch.no_grad():
            output = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones_like(torch.tensor([prompt])),
                                       do_sample=False, max_new_tokens=max_tokens, **extra)
        expected = output[0, len(prompt):].tolist()
        eos_hit = expected[-1] == tokenizer.eos_token_id and not ignore_eos
        # The server does not count the EOS token as output.
        return (expected[:-1] if eos_hit else expected), eos_hit

    for prompt in prompts:
        expected, eos_hit = reference(prompt)
        result = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           extra_body={"ignore_eos": ignore_eos})
        choice = result.choices[0]
        if choice.text != decode(tokenizer, expected):
            # Once, in a full run, transformers' own generate (in this process) gave one token differently, at a
            # top-2 logit margin of 0.035, while the server gave its usual text: the reference is taken again before
            # the server is judged (a wrong server stays wrong).
            expected, eos_hit = reference(prompt)
        assert choice.text == decode(tokenizer, expected), f"prompt {prompt[:5]}..."
        assert result.usage.completion_tokens == len(expected)
        assert choice.finish_reason == ("stop" if eos_hit else "length")


def test_sixteen_concurrent_streams_finish_with_requested_lengths(server):
    lengths = [8 + 3 * i for i in range(16)]

    def stream(max_tokens: int) -> tuple[int, str, int]:
        body = {"model": MODEL_NAME, "prompt": [10 + max_tokens, 20, 30], "max_tokens": max_tokens,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=120) as response:
            assert response.status_code == 200
            events = sse_events(response)
        assert events[-1] == "[DONE]"
        finish = [e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"]][-1]
        return max_tokens, finish, events[-2]["usage"]["completion_tokens"]

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(stream, lengths))
    assert results == [(n, "length", n) for n in lengths]


def test_stop_string_cuts_text_and_ends_with_stop(client):
    kwargs = dict(model=MODEL_NAME, prompt="Kubernetes schedules pods", temperature=0)
    full = client.completions.create(max_tokens=60, extra_body={"ignore_eos": True}, **kwargs).choices[0].text
    # A printable two-character stop string from the middle of the greedy output.
    start = next(i for i in range(10, len(full) - 2) if full[i:i + 2].isascii() and full[i:i + 2].isprintable())
    stop = full[start:start + 2]
    expected = full[:full.index(stop)]

    result = client.completions.create(max_tokens=60, stop=[stop, "never-there"], extra_body={"ignore_eos": True},
                                       **kwargs)
    assert result.choices[0].text == expected
    assert result.choices[0].finish_reason == "stop"
    assert result.usage.completion_tokens < 60

    chunks = list(client.completions.create(max_tokens=60, stop=stop, stream=True, extra_body={"ignore_eos": True},
                                            **kwargs))
    streamed = "".join(c.choices[0].text for c in chunks)
    assert streamed == expected
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(stop not in c.choices[0].text for c in chunks)


def test_seed_makes_sampling_reproducible(client):
    def sampled(seed: int) -> str:
        return client.completions.create(model=MODEL_NAME, prompt="Large language models", max_tokens=24,
                                         temperature=2.0, seed=seed, extra_body={"ignore_eos": True}).choices[0].text

    assert sampled(1234) == sampled(1234)
    assert len({sampled(seed) for seed in range(4)}) > 1


# ---- errors -------------------------------------------------------------------------------------------------


def assert_error(response: httpx.Response, status: int, *fragments: str, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for fragment in fragments:
        assert fragment in error["message"], error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def test_malformed_json_is_400(server):
    assert_error(post(server, "/v1/completions", b'{"model": "tiny", "prompt": '), 400, "not valid JSON")
    assert_error(post(server, "/v1/completions", b'["a list"]'), 400, "must be a JSON object")


@pytest.mark.parametrize("field, value, path", [
    ("max_tokens", "ten", "/v1/completions"),
    ("temperature", "hot", "/v1/completions"),
    ("stream", "yes", "/v1/chat/completions"),
    ("messages", "hello", "/v1/chat/completions"),
    ("prompt", {"text": "hi"}, "/v1/completions"),
    ("top_p", 1.5, "/v1/completions"),
])
def test_wrong_types_are_400_naming_the_field(server, field, value, path):
    body = {"model": MODEL_NAME, "max_tokens": 4}
    body.update({"prompt": "hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]})
    body[field] = value
    assert_error(post(server, path, body), 400, field, param=field)


def test_missing_required_field_is_400(server):
    assert_error(post(server, "/v1/chat/completions", {"model": MODEL_NAME}), 400, "messages", param="messages")


def test_context_overflow_is_400_with_the_numbers(server, tokenizer):
    prompt = "Hello world! How are you today?"
    prompt_tokens = len(tokenizer.encode(prompt))
    error = assert_error(post(server, "/v1/completions", {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 5000}),
                         400, f"maximum context length is {WINDOW}", f"{prompt_tokens} in the prompt",
                         "5000 for max_tokens", param="max_tokens")
    assert error["code"] == "context_length_exceeded"
    long_prompt = list(range(5, 5 + WINDOW))
    assert_error(post(server, "/v1/completions", {"model": MODEL_NAME, "prompt": long_prompt}), 400,
                 f"{WINDOW} in the prompt", param="prompt")


def raw_http(server, request: bytes, body_chunks: list[bytes] = ()) -> tuple[int, dict, bytes]:
    """Send bytes on a fresh socket and read one response (used where httpx would fix up the request)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(request)
        for chunk in body_chunks:
            sock.sendall(chunk)
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        while len(rest) < int(headers.get("content-length", 0)):
            rest += sock.recv(65536)
    return int(lines[0].split()[1]), headers, rest


def test_body_over_limit_is_413_by_content_length_and_by_actual_size(server):
    limit = default_max_body_bytes(WINDOW)  # no MAX_BODY_BYTES: derived from the context window
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\n")
    # A huge declared length is answered at once, before any body byte, and the connection closes.
    status, headers, body = raw_http(server, f"{head}Content-Length: {1024 ** 3}\r\n\r\n".encode())
    assert status == 413 and f"limit of {limit} bytes" in json.loads(body)["error"]["message"]
    assert headers["connection"] == "close"
    # Just over the limit, sent whole: the client still reads the 413 (the body is read and dropped).
    assert_error(post(server, "/v1/completions", b"x" * (limit + 1)), 413, "limit of")
    # Chunked, so no declared length: the bytes actually received count.
    piece = b"x" * 65536
    chunks = [b"%x\r\n%s\r\n" % (len(piece), piece)] * (limit // len(piece) + 1) + [b"0\r\n\r\n"]
    status, _, body = raw_http(server, f"{head}Transfer-Encoding: chunked\r\n\r\n".encode(), chunks)
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"
    # Just under the limit is parsed (and is then a JSON error, not a size error).
    assert_error(post(server, "/v1/completions", b"x" * (limit - 1)), 400, "not valid JSON")
    assert post(server, "/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 1}).status_code == 200


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    assert "'gpt-4' does not exist" in caught.value.body["message"]
    assert caught.value.body["code"] == "model_not_found"


@pytest.mark.parametrize("path, extra, fragments, param", [
    ("/v1/completions", {"n": 2}, ("n=2", "n=1"), "n"),
    ("/v1/completions", {"logprobs": 3}, ("Unsupported parameter", "logprobs"), "logprobs"),
    ("/v1/completions", {"echo": True, "best_of": 3}, ("echo", "best_of"), "echo"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, ("tools",), "tools"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, ("response_format",), "response_format"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 2}, ("logprobs", "top_logprobs"), "logprobs"),
    ("/v1/completions", {"prompt": ["one", "two"]}, ("list of 2 prompts",), "prompt"),
    ("/v1/completions", {"min_tokens": 9}, ("min_tokens (9)", "max_tokens (4)"), "min_tokens"),
    ("/v1/completions", {"prompt": [1, 2, 99999]}, ("99999", "vocabulary"), "prompt"),
    ("/v1/completions", {"prompt": [3, -1, 4]}, ("-1", "vocabulary"), "prompt"),
    ("/v1/completions", {"prompt": [1, True, 2]}, ("list of token ids",), "prompt"),
    ("/v1/completions", {"prompt": [1, 2.5]}, ("list of token ids",), "prompt"),
    ("/v1/completions", {"stop": ["a", "b", "c", "d", "e"]}, ("5 stop strings", "at most 4"), "stop"),
    ("/v1/chat/completions", {"stop": ["ok", "x" * 257]}, ("stop string 1 is 257 characters", "at most 256"), "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     ("image_url",), "messages"),
])
def test_unsupported_or_invalid_requests_are_400(server, path, extra, fragments, param):
    body = {"model": MODEL_NAME, "max_tokens": 4}
    body.update({"prompt": "hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]})
    body.update(extra)
    assert_error(post(server, path, body), 400, *fragments, param=param)


@pytest.mark.parametrize("path, raw, fragment, param", [
    # 60,000 levels (100,000 would be over this server's body limit; anything past about 1,000 raised RecursionError).
    ("/v1/completions", b"[" * 60_000 + b"]" * 60_000, "nests arrays or objects too deeply", None),
    ("/v1/completions", b'{"model": "tiny", "prompt": "hi", "max_tokens": 2, "ignored": ' + b"7" * 4301 + b"}",
     "longer than 4300 digits", None),
    ("/v1/completions", b'{"model": "tiny", "prompt": "hi \\ud800 there", "max_tokens": 2}', "lone UTF-16 surrogate",
     "prompt"),
    ("/v1/chat/completions", b'{"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "\\udc00"}]}',
     "messages[0].content holds a lone UTF-16 surrogate", "messages"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "caf\xed\xa0\x80", "max_tokens": 2}', "not valid UTF-8", None),
])
def test_hostile_bodies_are_400_not_500(server, path, raw, fragment, param):
    error = assert_error(post(server, path, raw), 400, fragment, param=param)
    assert error["code"] == "invalid_json"


def test_an_escaped_surrogate_pair_is_text(server):
    body = b'{"model": "tiny", "prompt": "smile \\ud83d\\ude00", "max_tokens": 2}'
    assert post(server, "/v1/completions", body).status_code == 200


def test_a_trailing_slash_is_not_redirected_to_the_host_header(server):
    for path in ("/v1/completions/", "/v1/models/"):
        response = httpx.request("POST" if "completions" in path else "GET", f"{server.url}{path}",
                                 headers={**AUTH, "Host": "attacker.example"}, json={"model": MODEL_NAME})
        assert "location" not in response.headers
        assert_error(response, 404, "Unknown path")
    # Before the key is checked, too: an unauthenticated caller gets 401, never a redirect.
    response = httpx.post(f"{server.url}/v1/completions/", headers={"Host": "attacker.example"})
    assert response.status_code in (401, 404) and "location" not in response.headers


def test_unknown_fields_are_ignored(server):
    body = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2, "some_future_field": {"x": 1}, "n": 1}
    assert post(server, "/v1/completions", body).status_code == 200


def test_api_keys_are_required_and_checked(server):
    body = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2}
    url = f"{server.url}/v1/completions"
    assert_error(httpx.post(url, json=body), 401, "Missing API key")
    assert_error(httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"}), 401, "Incorrect API key")
    assert_error(httpx.post(url, json=body, headers={"Authorization": f"Basic {KEY}"}), 401, "Bearer")
    assert_error(httpx.get(f"{server.url}/v1/models"), 401)
    # Auth comes before parsing: an unauthenticated caller learns nothing about the body.
    assert_error(httpx.post(url, content=b"{not json"), 401)
    for key in (*FILE_KEYS, ENV_KEY):
        assert httpx.post(url, json=body, headers={"Authorization": f"Bearer {key}"}).status_code == 200
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_health_and_metrics_are_open_without_a_key(server):
    for path in ("/health/startup", "/health/live", "/health/ready"):
        response = httpx.get(f"{server.url}{path}")
        assert response.status_code == 200 and response.json()["status"] in ("started", "alive", "ready")
    response = httpx.get(f"{server.url}/metrics")
    assert response.status_code == 200 and "llm_requests_total" in response.text


def test_unknown_path_is_openai_shaped_404(server):
    assert_error(httpx.get(f"{server.url}/v2/nothing"), 404, "/v1/completions")


# ---- metrics, disconnects, logs -----------------------------------------------------------------------------


def test_metrics_move_with_requests_and_probes_are_not_counted(server):
    before = scrape(server.url)
    ok = post(server, "/v1/completions", {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 7,
                                          "ignore_eos": True})
    assert ok.status_code == 200
    assert post(server, "/v1/completions", {"model": MODEL_NAME}).status_code == 400
    for path in ("/health/live", "/health/ready", "/health/startup", "/metrics"):
        assert httpx.get(f"{server.url}{path}").status_code == 200
    after = scrape(server.url)

    def delta(name, **labels):
        return sample(after, name, **labels) - sample(before, name, **labels)

    model = {"model": MODEL_NAME}
    # The article's status values (success/error), with the HTTP code in its own label.
    assert delta("llm_requests_total", model=MODEL_NAME, status="success", code="200") == 1
    assert delta("llm_requests_total", model=MODEL_NAME, status="error", code="400") == 1
    total = lambda samples: sum(v for (n, _), v in samples.items() if n == "llm_requests_total")  # noqa: E731
    assert total(after) - total(before) == 2  # probes and scrapes are not requests
    assert delta("llm_request_duration_seconds_count", **model) == 2
    assert delta("llm_request_duration_seconds_bucket", le="120.0", **model) == 2
    assert delta("llm_time_to_first_token_seconds_count", **model) == 1
    assert delta("llm_inter_token_latency_seconds_count", **model) == 6  # every token after the first
    usage = ok.json()["usage"]
    assert delta("llm_prompt_tokens_total", **model) == usage["prompt_tokens"]
    assert delta("llm_generation_tokens_total", **model) == usage["completion_tokens"] == 7
    for name in ("llm_active_requests", "llm_requests_running", "llm_requests_waiting"):
        assert sample(after, name, **model) == 0
    assert 0 <= sample(after, "llm_kv_cache_usage_ratio", **model) <= 1
    # The prefix cache was asked about the prompt's tokens (a hit or not); nothing was preempted.
    assert delta("llm_prefix_cache_queried_tokens_total", **model) == usage["prompt_tokens"]
    assert delta("llm_prefix_cache_hit_tokens_total", **model) >= 0
    assert sample(after, "llm_preemptions_total", **model) == 0
    for name in ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:gpu_cache_usage_perc",
                 "vllm:kv_cache_usage_perc", "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
                 "vllm:num_preemptions_total"):
        assert (name, (("model_name", MODEL_NAME),)) in after
    assert (sample(after, "vllm:prefix_cache_queries_total", model_name=MODEL_NAME)
            == sample(after, "llm_prefix_cache_queried_tokens_total", **model))
    assert not any(n == "llm_gpu_utilization" for n, _ in after)  # no GPU here: no series, not a fake zero
    assert "# TYPE llm_gpu_utilization gauge" in httpx.get(f"{server.url}/metrics").text  # but declared


def wait_for_metric(server, name: str, value: float, timeout: float = 10.0) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = sample(scrape(server.url), name, model=MODEL_NAME)
        if current == value:
            return current
        time.sleep(0.05)
    return current


def test_client_disconnect_mid_stream_frees_the_slot(server):
    before = sample(scrape(server.url), "llm_generation_tokens_total", model=MODEL_NAME)
    body = {"model": MODEL_NAME, "prompt": [11, 12, 13], "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=60) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        during = scrape(server.url)
        assert sample(during, "llm_requests_running", model=MODEL_NAME) == 1
        assert sample(during, "llm_active_requests", model=MODEL_NAME) == 1
    # Leaving the `with` closed the connection mid-stream.
    assert wait_for_metric(server, "llm_requests_running", 0) == 0
    assert wait_for_metric(server, "llm_active_requests", 0) == 0
    generated = sample(scrape(server.url), "llm_generation_tokens_total", model=MODEL_NAME) - before
    assert 0 < generated < 2000  # aborted, not run to the end


def test_client_disconnect_during_non_streaming_request_frees_the_slot(server):
    before = sample(scrape(server.url), "llm_generation_tokens_total", model=MODEL_NAME)
    body = {"model": MODEL_NAME, "prompt": [11, 12, 13], "max_tokens": 2000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        post(server, "/v1/completions", body, timeout=0.5)
    assert wait_for_metric(server, "llm_requests_running", 0) == 0
    generated = sample(scrape(server.url), "llm_generation_tokens_total", model=MODEL_NAME) - before
    assert 0 < generated < 2000
    after = scrape(server.url)
    assert sample(after, "llm_requests_total", model=MODEL_NAME, status="error", code="499") >= 1


def test_json_log_lines_carry_the_request_id(server):
    response = post(server, "/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2},
                    headers={"X-Request-ID": "trace-abc-123"})
    assert response.headers["x-request-id"] == "trace-abc-123"
    generated = post(server, "/v1/completions", {"model": MODEL_NAME}).headers["x-request-id"]
    assert len(generated) == 32 and int(generated, 16) >= 0
    assert httpx.get(f"{server.url}/health/live").headers["x-request-id"]

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = server.log_lines()  # every line must be JSON
        access = {line.get("request_id"): line for line in lines if line["logger"] == "serving.access"}
        if "trace-abc-123" in access and generated in access:
            break
        time.sleep(0.1)
    line = access["trace-abc-123"]
    assert {"ts", "level", "logger", "message"} <= set(line)
    assert (line["method"], line["path"], line["status"]) == ("POST", "/v1/completions", 200)
    assert line["duration_ms"] > 0
    assert access[generated]["status"] == 400
    assert not any(line.get("path", "").startswith(("/health", "/metrics")) for line in access.values())


@pytest.mark.parametrize("model", [MODEL_NAME, "\u0000delta\u0000"])
@pytest.mark.parametrize("include_usage", [False, True])
def test_streamed_delta_chunks_are_the_bytes_of_encoding_the_whole_chunk(model, include_usage):
    from types import SimpleNamespace

    from serving.api.openai import _Chunks

    generation = SimpleNamespace(request_id="cmpl-1", finish_reason="length", usage=lambda: None)
    body = SimpleNamespace(include_usage=include_usage)
    chunks = _Chunks(generation, body, model, "chat.completion.chunk", lambda text: {"delta": {"content": text}},
                     last={"delta": {}})
    # The second model name is the splice placeholder itself: those chunks are then encoded whole.
    assert (chunks._around_delta is None) == (model != MODEL_NAME)
    for text in ["plain", ' "quoted" \\ back', "line\nbreak\ttab", "caf\u00e9 \u2603 \U0001f600", "\u0000", ""]:
        expected = json.dumps(chunks.choice({"delta": {"content": text}}, None), ensure_ascii=False)
        assert chunks.delta(text) == expected
        assert chunks.event(text) == f"data: {expected}\n\n"
        assert json.loads(chunks.delta(text))["choices"][0]["delta"]["content"] == text
