"""python -m tinygrad_llm.serve as a real subprocess on a free loopback port, talked to with http.client:
Hugging Face's greedy continuation, streaming, stop strings, concurrent clients answered as if alone,
HTTP 400 for bad requests while serving on, and a clean stop on SIGTERM."""
import concurrent.futures
import http.client
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tiny_models import hf_greedy, make_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 60   # seconds for any one HTTP exchange or process start


class Server:
    """The server in a subprocess on a port the OS picks (--port 0); the port is read from its stderr."""

    def __init__(self, model, *args, kernels=True):
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "TINYGRAD_LLM_KERNELS": "1" if kernels else "0"}
        self.proc = subprocess.Popen([sys.executable, "-m", "tinygrad_llm.serve", "--model", str(model), "--port", "0",
                                      *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
        self.lines, self.stderr = queue.Queue(), []
        threading.Thread(target=self._drain, daemon=True).start()   # a full pipe would block the server
        deadline = time.monotonic() + TIMEOUT
        while True:
            line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            if line is None:
                raise RuntimeError("the server exited before serving:\n" + "".join(self.stderr))
            found = re.search(r"serving .* on http://([\d.]+):(\d+)", line)
            if found:
                self.host, self.port = found.group(1), int(found.group(2))
                return

    def _drain(self):
        for line in self.proc.stderr:
            self.stderr.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def request(self, method, path, body=None, raw=None):
        """(status, parsed JSON body)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT)
        try:
            data = raw if raw is not None else None if body is None else json.dumps(body).encode()
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()

    def complete(self, **body):
        status, payload = self.request("POST", "/v1/completions", body)
        assert status == 200, payload
        return payload

    def stream(self, **body):
        """The JSON payloads of a streamed completion's events; asserts that it ends with `data: [DONE]`."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT)
        try:
            conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}).encode())
            response = conn.getresponse()
            assert response.status == 200
            assert response.getheader("Content-Type") == "text/event-stream"
            events = [line[len("data: "):] for line in response.read().decode("utf-8").split("\n\n") if line]
        finally:
            conn.close()
        assert events[-1] == "[DONE]"
        return [json.loads(e) for e in events[:-1]]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=TIMEOUT)


def streamed_text(events):
    return "".join(e["choices"][0]["text"] for e in events)


@pytest.fixture(scope="module")
def hf_server(hf_gpt2):
    folder, model, tokenizer = hf_gpt2
    server = Server(folder)
    yield server, model, tokenizer
    server.stop()


def test_health_models_and_unknown_routes(hf_server):
    server = hf_server[0]
    assert server.request("GET", "/health") == (200, {"status": "ok"})
    status, models = server.request("GET", "/v1/models")
    assert status == 200 and models["object"] == "list" and models["data"][0]["id"].startswith("hf_gpt2")
    status, error = server.request("GET", "/v1/engines")
    assert status == 404 and "no route" in error["error"]["message"]


def test_greedy_completion_equals_transformers_streamed_or_not(hf_server):
    server, model, tokenizer = hf_server
    for prompt in ("The quick brown", "Ünïcödé 😀"):
        expected = hf_greedy(model, tokenizer, prompt, 20)
        reply = server.complete(prompt=prompt, max_tokens=20, temperature=0)
        assert reply["object"] == "text_completion"
        assert reply["choices"][0]["text"] == expected
        assert reply["usage"]["prompt_tokens"] == len(tokenizer.encode(prompt).ids)
        events = server.stream(prompt=prompt, max_tokens=20, temperature=0)
        assert streamed_text(events) == expected
        assert events[-1]["choices"][0]["finish_reason"] == reply["choices"][0]["finish_reason"]
        assert all(e["choices"][0]["finish_reason"] is None for e in events[:-1])
    echoed = server.complete(prompt="The quick brown", max_tokens=5, temperature=0, echo=True)
    assert echoed["choices"][0]["text"] == "The quick brown" + hf_greedy(model, tokenizer, "The quick brown", 5)


def test_same_seed_same_text_and_stop_strings(hf_server):
    server = hf_server[0]
    body = dict(prompt="Où est la", max_tokens=24, temperature=1.0, top_k=40, top_p=0.9, seed=11)
    text = server.complete(**body)["choices"][0]["text"]
    assert server.complete(**body)["choices"][0]["text"] == text
    assert streamed_text(server.stream(**body)) == text
    assert server.complete(**{**body, "seed": 12})["choices"][0]["text"] != text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    expected = text[:text.find(stop)]
    stopped = server.complete(**body, stop=[stop, "never appears"])
    assert stopped["choices"][0]["text"] == expected
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert streamed_text(server.stream(**body, stop=stop)) == expected


def test_concurrent_clients_are_each_answered_as_if_alone(hf_server):
    server = hf_server[0]
    bodies = [dict(prompt=prompt, max_tokens=12 + i, temperature=0.8, seed=i, stream=i % 2 == 1)
              for i, prompt in enumerate(["The", "Où", "日本", "quick", "lazy dog", "emoji"])]

    def ask(body):
        body = dict(body)
        if body.pop("stream"):
            return streamed_text(server.stream(**body))
        return server.complete(**body)["choices"][0]["text"]

    alone = [ask(body) for body in bodies]
    with concurrent.futures.ThreadPoolExecutor(len(bodies) * 2) as pool:
        together = list(pool.map(ask, bodies * 2, timeout=4 * TIMEOUT))
    assert together == alone * 2


@pytest.mark.parametrize("raw, param, message", [
    (b'{"prompt": "The", "max_tokens": ', None, "not valid JSON"),
    (b'["The"]', None, "JSON object"),
    (b'{"max_tokens": 5}', "prompt", "'prompt' is required"),
    (b'{"prompt": ["The", "Ou"]}', "prompt", "must be a string"),
    (b'{"prompt": ""}', "prompt", "the prompt is empty"),
    (json.dumps({"prompt": "the " * 100}).encode(), "prompt", "longer than the model's context of 64"),
    (b'{"prompt": "The", "max_tokens": 0}', "max_tokens", "at least 1"),
    (b'{"prompt": "The", "max_tokens": -3}', "max_tokens", "at least 1"),
    (b'{"prompt": "The", "max_tokens": 2.5}', "max_tokens", "must be an integer"),
    (b'{"prompt": "The", "temperature": -1}', "temperature", ">= 0"),
    (b'{"prompt": "The", "top_p": 0}', "top_p", "(0, 1]"),
    (b'{"prompt": "The", "top_k": 0}', "top_k", "at least 1"),
    (b'{"prompt": "The", "seed": "x"}', "seed", "must be an integer"),
    (b'{"prompt": "The", "stop": ["a", ""]}', "stop", "'stop' must be"),
    (b'{"prompt": "The", "stream": "yes"}', "stream", "true or false"),
    (b'{"prompt": "The", "n": 2}', "n", "'n': 1"),
])
def test_bad_requests_get_400_with_an_openai_error_and_serving_goes_on(hf_server, raw, param, message):
    server = hf_server[0]
    status, payload = server.request("POST", "/v1/completions", raw=raw)
    assert status == 400
    assert payload["error"]["type"] == "invalid_request_error"
    assert payload["error"]["param"] == param
    assert message in payload["error"]["message"]
    assert server.complete(prompt="The", max_tokens=2)["usage"]["completion_tokens"] >= 1


def test_a_client_leaving_mid_stream_does_not_stop_the_server(hf_server):
    server = hf_server[0]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "The", "max_tokens": 60, "stream": True}))
    response = conn.getresponse()
    assert response.readline().startswith(b"data: ")
    conn.close()
    assert server.request("GET", "/health") == (200, {"status": "ok"})
    assert server.complete(prompt="The", max_tokens=3, temperature=0)["choices"][0]["text"]


def test_checkpoint_server_binds_loopback_and_stops_on_sigterm(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    make_checkpoint(path, "char")
    server = Server(path, "--quiet", kernels=False)
    try:
        assert server.host == "127.0.0.1"
        reply = server.complete(prompt="The quick", max_tokens=8, temperature=0)
        assert len(reply["choices"][0]["text"]) == 8           # one character per token, no end-of-text token
        assert reply["model"] == "ckpt"
    finally:
        assert server.stop() == 0
    assert "stopping" in "".join(server.stderr)
    assert "Traceback" not in "".join(server.stderr)
