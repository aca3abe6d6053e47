"""A completion server speaking a subset of OpenAI's HTTP API, on the standard library's ThreadingHTTPServer.

    python -m tinygrad_llm.serve --model gpt2-folder                # http://127.0.0.1:8000
    curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"prompt": "Hello", "max_tokens": 20, "temperature": 0}'

Routes: GET /health, GET /v1/models, POST /v1/completions with prompt (a string), max_tokens (default 16),
temperature (default 1; 0 is greedy), top_p, top_k, stop (a string or up to 4), seed, echo, and stream
(server-sent events, one per piece of text, then `data: [DONE]`). One model serves every connection:
requests wait their turn for it (a lock), so each is answered exactly as if it were alone and the same
seed gives the same text whatever else is running. A bad request gets HTTP 400 and an OpenAI-style
{"error": {...}} body; the server goes on serving. SIGTERM or Ctrl-C stops it.
"""
import contextlib
import json
import math
import signal
import sys
import threading
import time
import traceback
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .backend import check_device
from .cli import bounded, new_parser, parse_config_args, parse_int, run_cli
from .generate import SettingError, TextModel, check_sampling

MAX_BODY_BYTES = 1 << 20
MAX_STOPS = 4
DEFAULT_MAX_TOKENS = 16


class RequestError(ValueError):
    """A client's mistake: answered with `status` and an OpenAI-style error naming `param`."""

    def __init__(self, message, param=None, status=HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.param, self.status = param, status


class CompletionServer(ThreadingHTTPServer):
    """Serves one TextModel; `model_lock` lets one request at a time use it (the others queue on it)."""

    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address, text_model, verbose=True):
        self.text_model, self.verbose = text_model, verbose
        self.model_lock = threading.Lock()
        self.created = int(time.time())
        super().__init__(address, CompletionHandler)


def _number(body, name, default, integer=False):
    value = body.get(name, default)
    if value is None:
        return None
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
        raise RequestError(f"'{name}' must be {'an integer' if integer else 'a number'}, got {json.dumps(value)}", name)
    return value


def parse_completion_request(body, text_model):
    """The request's settings, checked: dict(ids, prompt, max_tokens, temperature, top_k, top_p, stop, seed,
    echo, stream). Raises RequestError naming the first bad field."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    prompt = body.get("prompt")
    if prompt is None:
        raise RequestError("'prompt' is required", "prompt")
    if not isinstance(prompt, str):
        raise RequestError("'prompt' must be a string (lists of prompts or of token ids are not supported)", "prompt")
    if body.get("n", 1) != 1:
        raise RequestError("only 'n': 1 is supported", "n")
    request = dict(prompt=prompt, max_tokens=_number(body, "max_tokens", DEFAULT_MAX_TOKENS, integer=True),
                   temperature=_number(body, "temperature", 1.0), top_p=_number(body, "top_p", None),
                   top_k=_number(body, "top_k", None, integer=True), seed=_number(body, "seed", None, integer=True))
    if request["max_tokens"] is None:
        request["max_tokens"] = DEFAULT_MAX_TOKENS
    if request["temperature"] is None:
        request["temperature"] = 1.0
    for name in ("stream", "echo"):
        request[name] = body.get(name, False)
        if not isinstance(request[name], bool):
            raise RequestError(f"'{name}' must be true or false, got {json.dumps(request[name])}", name)
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not (isinstance(stop, list) and len(stop) <= MAX_STOPS and all(isinstance(s, str) and s for s in stop)):
        raise RequestError(f"'stop' must be a non-empty string or a list of at most {MAX_STOPS} of them", "stop")
    request["stop"] = stop
    try:
        check_sampling(request["max_tokens"], request["temperature"], request["top_k"], request["top_p"],
                       length_name="max_tokens")
    except SettingError as e:
        raise RequestError(str(e), e.name) from None
    try:
        request["ids"] = text_model.encode(prompt)
    except ValueError as e:
        raise RequestError(str(e), "prompt") from None
    return request


def completion_pieces(text_model, request):
    """Yields the completion's text piece by piece, then ("", finish_reason, n_tokens) as the last item.

    Text that might begin a stop string is held back until it is known not to; the stop string and what
    follows are never sent. finish_reason: "stop" (a stop string or the end-of-text token) or "length"."""
    stops, pending, n_tokens, finish = request["stop"], "", 0, "length"
    steps = text_model.stream(request["ids"], request["max_tokens"], request["temperature"], request["top_k"],
                              request["top_p"], request["seed"])
    try:
        for text, token in steps:
            n_tokens += token is not None
            if token in text_model.end_ids:
                finish = "stop"
            pending += text
            cut = min((i for i in (pending.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                pending, finish = pending[:cut], "stop"
                break
            # hold back the longest end of `pending` that a stop string starts with
            held = max((k for s in stops for k in range(1, len(s)) if pending.endswith(s[:k])), default=0)
            if len(pending) > held:
                yield pending[:len(pending) - held]
                pending = pending[len(pending) - held:]
    finally:
        steps.close()
    if pending:
        yield pending
    yield "", finish, n_tokens


class CompletionHandler(BaseHTTPRequestHandler):
    server_version = "tinygrad_llm"
    stream_started = False
    timeout = 120  # seconds a client may stall reading or writing before its connection is dropped

    def log_message(self, format, *args):
        if self.server.verbose:
            super().log_message(format, *args)

    # ---- responses ----

    def _send_json(self, status, payload):
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, status, message, param=None, kind="invalid_request_error"):
        self._send_json(status, {"error": {"message": message, "type": kind, "param": param, "code": None}})

    # ---- routes ----

    def do_GET(self):
        if self.path == "/health":
            self._send_json(HTTPStatus.OK, {"status": "ok"})
        elif self.path == "/v1/models":
            model = {"id": self.server.text_model.name, "object": "model", "created": self.server.created,
                     "owned_by": "tinygrad_llm"}
            self._send_json(HTTPStatus.OK, {"object": "list", "data": [model]})
        else:
            self._send_error(HTTPStatus.NOT_FOUND, f"no route GET {self.path}")

    def do_POST(self):
        if self.path != "/v1/completions":
            self._send_error(HTTPStatus.NOT_FOUND, f"no route POST {self.path}")
            return
        try:
            request = parse_completion_request(self._read_json(), self.server.text_model)
        except RequestError as e:
            self._send_error(e.status, str(e), e.param)
            return
        try:
            with self.server.model_lock:
                if request["stream"]:
                    self._stream_completion(request)
                else:
                    self._send_completion(request)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass                                        # the client went away: its generation stops here
        except Exception as e:                          # a bug of ours: report it, keep serving
            traceback.print_exc()
            if not self.stream_started:
                self._send_error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(e).__name__}: {e}", kind="server_error")

    def _read_json(self):
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise RequestError("the request needs a Content-Length header with the body's size in bytes",
                               status=HTTPStatus.LENGTH_REQUIRED)
        if int(length) > MAX_BODY_BYTES:
            raise RequestError(f"the request body is {length} bytes; at most {MAX_BODY_BYTES} are accepted",
                               status=HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        raw = self.rfile.read(int(length))
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RequestError(f"the request body is not valid JSON: {e}") from None

    def _header(self):
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.server.text_model.name}

    def _send_completion(self, request):
        pieces = list(completion_pieces(self.server.text_model, request))
        _, finish, n_tokens = pieces.pop()
        text = (request["prompt"] if request["echo"] else "") + "".join(pieces)
        n_prompt = len(request["ids"])
        self._send_json(HTTPStatus.OK, {
            **self._header(),
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_tokens, "total_tokens": n_prompt + n_tokens}})

    def _stream_completion(self, request):
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.stream_started = True
        header = self._header()

        def event(text, finish=None):
            choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
            self.wfile.write(f"data: {json.dumps({**header, 'choices': [choice]})}\n\n".encode("utf-8"))
            self.wfile.flush()

        if request["echo"]:
            event(request["prompt"])
        # closing(): a client that leaves mid-stream ends the generation here, before the lock is released
        with contextlib.closing(completion_pieces(self.server.text_model, request)) as pieces:
            for piece in pieces:
                if isinstance(piece, tuple):
                    event("", piece[1])
                elif piece:
                    event(piece)
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


def argument_parser():
    p = new_parser(__doc__.splitlines()[0], prog="python -m tinygrad_llm.serve")
    p.add_argument("--model", required=True, help="a Hugging Face folder, a training checkpoint (.safetensors) or its "
                   "out_dir (required)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 is every interface (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=bounded(parse_int, lambda n: 0 <= n <= 65535, "in 0..65535"), default=8000,
                   help="port to listen on; 0 takes a free one (default: 8000)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the model runs; cuda needs CuPy (default: cpu)")
    p.add_argument("--quiet", action="store_true", help="do not log each request on stderr (default: log)")
    return p


def main(argv=None):
    """`python -m tinygrad_llm.serve --model PATH ...`; --help lists the options."""
    run_cli(_main, argv)


def _main(argv):
    args = parse_config_args(argument_parser(), argv)
    check_device(args["device"])
    text_model = TextModel.load(args["model"], device=args["device"])
    server = CompletionServer((args["host"], args["port"]), text_model, verbose=not args["quiet"])

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    host, port = server.server_address[:2]
    print(f"serving {text_model.name} on http://{host}:{port}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr)
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
