"""Hostile files and arguments (issue #17, the loader and argument items): each gives a clear
glm2rs error instead of a crash, an abort, a silent load or a bare Python conversion error."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import zipfile

import pytest

import glm2rs


def model_dir_with_pickle(tmp_path, fx, pkl: bytes):
    """A copy of the fixture's config and tokenizer with one `pytorch_model.bin` holding `pkl`."""
    d = tmp_path / "m"
    d.mkdir()
    for f in ("config.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(fx / "model" / f, d / f)
    with zipfile.ZipFile(d / "pytorch_model.bin", "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/version", "3\n")
    return d


def load_in_child(path, memory_limit: int | None = None) -> subprocess.CompletedProcess:
    """Load in a fresh interpreter, so that a crash (SIGSEGV, abort) fails the test instead of
    killing the test run; prints the error class and message. `memory_limit`: the child's
    address-space limit in bytes (an operator's container limit)."""

    def limit():
        if memory_limit:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))

    code = ("import glm2rs, sys\n"
            "try:\n"
            f"    glm2rs.Model.from_pretrained({str(path)!r}, dtype='float32', progress=False)\n"
            "    print('LOADED')\n"
            "except glm2rs.Glm2Error as e:\n"
            "    print(type(e).__name__, e)\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          preexec_fn=limit)


def test_deeply_nested_pickle_is_refused_not_a_stack_overflow(tmp_path, fx):
    n = 200_000  # ~400 KB: EMPTY_LIST n times, then APPEND n-1 times nests them n deep
    pkl = b"\x80\x02" + b"]" * n + b"a" * (n - 1) + b"."
    r = load_in_child(model_dir_with_pickle(tmp_path, fx, pkl))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("CheckpointError") and "nested deeper" in r.stdout, r.stdout


def test_huge_string_length_is_refused_not_allocated(tmp_path, fx):
    pkl = b"\x80\x02X" + struct.pack("<I", 0xFFFFFFF0) + b"abc."  # a 4 GiB string claimed
    r = load_in_child(model_dir_with_pickle(tmp_path, fx, pkl), memory_limit=3 << 30)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("CheckpointError") and "runs past the pickle" in r.stdout, r.stdout


def test_shard_with_a_foreign_global_is_refused(tmp_path, fx):
    """A real shard with one more entry whose value is `os.system("true")`: never executed, and
    now refused (only the tensor rebuild functions, storages and OrderedDict are legitimate)."""
    src = fx / "ptuning-checkpoint" / "pytorch_model.bin"
    with zipfile.ZipFile(src) as z:
        names = z.namelist()
        pkl_name = next(n for n in names if n.endswith("data.pkl"))
        pkl = z.read(pkl_name)
        files = {n: z.read(n) for n in names}
    assert pkl.endswith(b".")

    def uni(s: bytes) -> bytes:
        return b"X" + struct.pack("<I", len(s)) + s

    evil = uni(b"evil") + b"cposix\nsystem\n" + uni(b"true") + b"\x85R" + b"s"
    files[pkl_name] = pkl[:-1] + evil + b"."
    d = tmp_path / "p"
    d.mkdir()
    (d / "config.json").write_text((fx / "ptuning-checkpoint" / "config.json").read_text())
    with zipfile.ZipFile(d / "pytorch_model.bin", "w", zipfile.ZIP_STORED) as z:
        for n, b in files.items():
            z.writestr(n, b)
    with pytest.raises(glm2rs.CheckpointError, match=r"posix\.system"):
        glm2rs.Model.from_pretrained(str(fx / "model"), dtype="float32", prefix_checkpoint=str(d))
    # the untouched shard still loads
    glm2rs.Model.from_pretrained(str(fx / "model"), dtype="float32", prefix_checkpoint=str(fx / "ptuning-checkpoint"))


def test_index_cannot_point_outside_the_model_directory(tmp_path, fx):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(fx / "model-safetensors" / "model.safetensors", outside / "model.safetensors")
    d = tmp_path / "m"
    d.mkdir()
    for f in ("config.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(fx / "model" / f, d / f)
    from safetensors.numpy import load_file

    names = list(load_file(str(outside / "model.safetensors")))
    for target in ("../outside/model.safetensors", str(outside / "model.safetensors")):
        (d / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": {n: target for n in names}}))
        with pytest.raises(glm2rs.CheckpointError, match="files of the model directory"):
            glm2rs.Model.from_pretrained(str(d), dtype="float32")


@pytest.mark.parametrize("value", [10**12, 10**8])
def test_absurd_context_is_a_config_error_not_an_allocation(tmp_path, fx, value):
    d = tmp_path / "m"
    shutil.copytree(fx / "model-safetensors", d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, seq_length=value)))
    r = load_in_child(d)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("ConfigError") and "seq_length" in r.stdout, r.stdout


def test_ids_beyond_any_integer_type_name_the_argument(model):
    tok = model.tokenizer
    for call, arg in [(lambda: model.logits([2**64]), "input_ids"),
                      (lambda: model.generate_ids([64790, 2**70], max_new_tokens=1), "input_ids"),
                      (lambda: model.generate_batch_ids([[1], [-1]], max_new_tokens=1), "input_ids"),
                      (lambda: tok.decode([2**64]), "ids"),
                      (lambda: model.generate_ids([1], max_new_tokens=1, stop_token_ids=[2**65]), "stop_token_ids")]:
        with pytest.raises(glm2rs.InvalidArgumentError, match=arg):
            call()
    with pytest.raises(glm2rs.InvalidArgumentError, match="input_ids"):
        model.logits("你好")  # a str is not a list of ids


def test_lone_surrogates_name_the_argument(model):
    bad = "hi \ud800 there"
    tok = model.tokenizer
    for call, arg in [(lambda: tok.encode(bad), "text"),
                      (lambda: model.stream(bad), "prompt"),
                      (lambda: model.generate(bad, max_new_tokens=1), "prompt"),
                      (lambda: model.generate_batch(["ok", bad], max_new_tokens=1), "prompts"),
                      (lambda: model.chat(bad, max_new_tokens=1), "query"),
                      (lambda: model.start_chat().chat(bad, max_new_tokens=1), "query"),
                      (lambda: tok.build_prompt(bad), "query")]:
        with pytest.raises(glm2rs.InvalidArgumentError, match=arg):
            call()
    with pytest.raises(TypeError, match="prompt must be a str"):
        model.stream(42)


@pytest.mark.parametrize("port", [70000, -1])
def test_server_port_out_of_range_names_it(model, port):
    with pytest.raises(glm2rs.InvalidArgumentError, match="port"):
        glm2rs.Server(model, port=port)


# --- the HTTP server -------------------------------------------------------------------------

def request(srv, method, path, body=None, headers=None):
    import http.client

    c = http.client.HTTPConnection(srv.host, srv.port, timeout=60)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body)
    c.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    r = c.getresponse()
    out = r.status, r.getheader("Content-Type") or "", r.read()
    c.close()
    return out


@pytest.fixture(scope="module")
def srv(model):
    with glm2rs.Server(model, port=0, model_name="tiny") as s:
        yield s


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.mark.parametrize("field, value", [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("tool_choice", "auto"),  # without tools
    ("functions", [{"name": "f", "parameters": {}}]),
    ("response_format", {"type": "json_object"}),
    ("top_logprobs", 2),  # without logprobs: true
    ("top_logprobs", 21),
])
def test_unsupported_chat_fields_are_refused_by_name(srv, field, value):
    status, _, body = request(srv, "POST", "/v1/chat/completions", dict(CHAT, **{field: value}))
    assert status == 400, body
    assert json.loads(body)["error"]["param"] == field


@pytest.mark.parametrize("field, value", [("best_of", 2), ("suffix", "end"), ("logprobs", 6)])
def test_unsupported_completion_fields_are_refused_by_name(srv, field, value):
    status, _, body = request(srv, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2, field: value})
    assert status == 400, body
    assert json.loads(body)["error"]["param"] == field


def test_off_values_of_those_fields_still_pass(srv):
    status, _, body = request(srv, "POST", "/v1/chat/completions",
                              dict(CHAT, tools=[], logprobs=False, tool_choice="none", response_format={"type": "text"}))
    assert status == 200, body


def test_stop_lists_are_bounded(srv):
    status, _, body = request(srv, "POST", "/v1/chat/completions", dict(CHAT, stop=[f"s{i}" for i in range(17)]))
    assert status == 400 and json.loads(body)["error"]["param"] == "stop"
    status, _, body = request(srv, "POST", "/v1/chat/completions", dict(CHAT, stop=["x" * 2000]))
    assert status == 400 and json.loads(body)["error"]["param"] == "stop"


def test_max_length_zero_has_a_short_message(srv):
    status, _, body = request(srv, "POST", "/", {"prompt": "hi", "max_length": 0})
    err = json.loads(body)["error"]
    assert status == 400 and err["param"] == "max_length" and len(err["message"]) < 100, err


@pytest.mark.parametrize("method, path, body, status", [
    ("POST", "/v1/chat/completions", b"x" * (3 << 20), 413),
    ("GET", "/v1/chat/completions", None, 405),
    ("DELETE", "/v1/models", None, 405),
])
def test_framework_errors_come_in_openai_shape(srv, method, path, body, status):
    got, ctype, raw = request(srv, method, path, body)
    assert got == status
    assert ctype.startswith("application/json"), (ctype, raw[:200])
    assert set(json.loads(raw)["error"]) >= {"message", "type", "param", "code"}
    assert request(srv, "GET", "/health")[0] == 200  # and the server goes on


def test_api_key_rules(model):
    with pytest.raises(glm2rs.InvalidArgumentError, match="api_key"):
        glm2rs.Server(model, port=0, api_key="")
    with glm2rs.Server(model, port=0, api_key="s3cret") as s:
        for scheme in ("Bearer", "bearer", "BEARER"):
            assert request(s, "GET", "/v1/models", headers={"Authorization": f"{scheme} s3cret"})[0] == 200
        for value in ("Bearer s3cre", "Bearer s3cret2", "Basic s3cret", "s3cret"):
            assert request(s, "GET", "/v1/models", headers={"Authorization": value})[0] == 401


def test_a_foreign_web_page_cannot_drive_a_keyless_server(srv):
    port = srv.port
    # a simple cross-origin POST a page may send without asking: text/plain
    status, _, body = request(srv, "POST", "/v1/chat/completions", CHAT,
                              headers={"Content-Type": "text/plain", "Origin": "http://evil.example"})
    assert status == 415, body
    # JSON from another origin
    status, _, body = request(srv, "POST", "/v1/chat/completions", CHAT, headers={"Origin": "http://evil.example"})
    assert status == 403 and json.loads(body)["error"]["code"] == "origin_not_allowed"
    # DNS rebinding: the page's own name resolved to 127.0.0.1, so Host and Origin agree
    status, _, body = request(srv, "GET", "/v1/models",
                              headers={"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"})
    assert status == 403 and json.loads(body)["error"]["code"] == "host_not_allowed"
    # the server's own page, and clients that are not browsers, still get through
    for origin in (f"http://127.0.0.1:{port}", f"http://localhost:{port}", None):
        h = {"Host": f"{origin.split('//')[1]}"} if origin else {}
        if origin:
            h["Origin"] = origin
        assert request(srv, "POST", "/v1/chat/completions", CHAT, headers=h)[0] == 200


def test_allowed_origins_and_keyed_servers(model):
    with glm2rs.Server(model, port=0, allow_origins=["http://app.example:3000/"]) as s:
        h = {"Origin": "http://app.example:3000"}
        assert request(s, "POST", "/v1/chat/completions", CHAT, headers=h)[0] == 200
        assert request(s, "POST", "/v1/chat/completions", CHAT, headers={"Origin": "http://app.example:3001"})[0] == 403
    with glm2rs.Server(model, port=0, api_key="k") as s:  # a key: any origin that has it
        h = {"Origin": "http://elsewhere.example", "Authorization": "Bearer k"}
        assert request(s, "POST", "/v1/chat/completions", CHAT, headers=h)[0] == 200


def test_long_prompts_are_tokenized_off_the_async_workers(srv):
    """Four ~1.9 MB prompts (each about a second of tokenizing, then refused as too long for the
    context) in flight: /health still answers before any of them, since tokenizing runs on the
    blocking pool, not on the two async workers."""
    import threading
    import time

    prompt = "hello world 1234 " * 110000  # ~1.9 MB
    ends, errs = [], []

    def big():
        status, _, _ = request(srv, "POST", "/v1/completions", {"prompt": prompt, "max_tokens": 1})
        ends.append(time.perf_counter())
        errs.append(status)

    threads = [threading.Thread(target=big) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.3)  # the bodies are sent and being tokenized
    status = request(srv, "GET", "/health")[0]
    health_end = time.perf_counter()
    for t in threads:
        t.join()
    assert status == 200 and errs == [400] * 4
    assert health_end < min(ends), (health_end, ends)


def test_slow_and_idle_connections_are_closed_and_capped(model):
    """A client that never finishes its headers (slowloris) and an idle keep-alive connection are
    closed after the header timeout; connections beyond the cap are closed at once; normal
    requests go on being answered throughout."""
    import socket
    import time

    with glm2rs.Server(model, port=0, header_timeout=1.0, max_connections=4) as s:
        slow = socket.create_connection((s.host, s.port))
        slow.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        idle = socket.create_connection((s.host, s.port))
        idle.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert b"200 OK" in idle.recv(4096)
        t0 = time.perf_counter()
        for sk in (slow, idle):
            sk.settimeout(10)
            while sk.recv(4096):  # read until the server closes it
                pass
        assert time.perf_counter() - t0 < 5
        # the cap: 4 silent connections hold every place; a 5th gets the place of the oldest
        # (a connection with no request in flight is closed to make room, as nginx does)
        held = [socket.create_connection((s.host, s.port)) for _ in range(4)]
        time.sleep(0.2)
        extra = socket.create_connection((s.host, s.port))
        extra.settimeout(5)
        extra.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert b"200 OK" in extra.recv(4096)
        held[0].settimeout(5)
        try:
            assert held[0].recv(4096) == b""  # closed by the server
        except ConnectionResetError:
            pass
        for sk in held + [extra, slow, idle]:
            sk.close()
        time.sleep(0.3)  # their places come back
        assert request(s, "GET", "/health")[0] == 200


def test_idle_sockets_under_a_low_file_limit_do_not_lock_out_clients(fx):
    """A server under a 256-descriptor limit with 300 idle connections opened to it neither
    runs out of descriptors nor keeps a normal client waiting: the connection cap is fitted to
    the file limit and idle connections give their place to new ones."""
    import http.client
    import socket
    import time

    code = (
        "import glm2rs, sys\n"
        f"m = glm2rs.Model.from_pretrained({str(fx / 'model')!r}, dtype='float32', progress=False)\n"
        "with glm2rs.Server(m, port=0) as s:\n"
        "    print(s.port, flush=True)\n"
        "    sys.stdin.read()\n"
    )

    def limit():
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=limit)
    idle = []
    try:
        port = int(child.stdout.readline())
        for _ in range(300):
            try:
                idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            except OSError:
                pass
        time.sleep(0.5)
        t0 = time.perf_counter()
        for _ in range(5):
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", "/health")
            assert c.getresponse().status == 200
            c.close()
        assert time.perf_counter() - t0 < 3.0  # not a wait for the 10 s header timeout
    finally:
        for sk in idle:
            sk.close()
        _, err = child.communicate("", timeout=60)
    assert child.returncode == 0, err[-2000:]
    assert "at most" in err and "file limit is 256" in err, err[-2000:]  # the fitted cap is logged


@pytest.mark.parametrize("raw, status, code", [
    (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 600_000 + b"\r\n\r\n", 431, "headers_too_large"),
    (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(150)) + b"\r\n",
     431, "headers_too_large"),
    (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 414, "uri_too_long"),
    (b"NOT HTTP AT ALL\r\n\r\n", 400, "malformed_request"),
    (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
     b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n", 400, None),
])
def test_requests_hyper_refuses_still_get_the_openai_error_shape(srv, raw, status, code):
    """Headers too large or too many (431), a URI too long (414), a malformed request line and
    a malformed chunked body (400) answer with OpenAI's error object like every other refusal,
    and the server answers normally after."""
    import socket

    sk = socket.create_connection((srv.host, srv.port))
    sk.settimeout(10)
    sk.sendall(raw)
    out = b""
    try:
        while b := sk.recv(65536):
            out += b
            if b"\r\n\r\n" in out:
                head, _, body = out.partition(b"\r\n\r\n")
                n = [int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")]
                if n and len(body) >= n[0]:
                    break
    except ConnectionResetError:
        pass
    sk.close()
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), head
    assert b"content-type: application/json" in head.lower(), head
    err = json.loads(body)["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    if code:
        assert err["code"] == code
    assert request(srv, "GET", "/health")[0] == 200


def test_connection_settings_are_checked(model):
    with pytest.raises(glm2rs.InvalidArgumentError, match="header_timeout"):
        glm2rs.Server(model, port=0, header_timeout=0)
    with pytest.raises(glm2rs.InvalidArgumentError, match="max_connections"):
        glm2rs.Server(model, port=0, max_connections=0)


def test_streams_cut_at_shutdown_end_with_an_error_event(model):
    """A stream still running when a stopping server's grace period ends gets an error event
    (`server_shutdown`) and `[DONE]`, not a bare end of stream."""
    import http.client
    import threading

    s = glm2rs.Server(model, port=0)
    try:
        c = http.client.HTTPConnection(s.host, s.port, timeout=60)
        body = {"prompt": "hello", "max_tokens": 4000, "temperature": 0, "stream": True}
        c.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        r = c.getresponse()
        assert r.status == 200
        first = r.readline()
        assert first.startswith(b"data: ")
        stopper = threading.Thread(target=s.stop)
        stopper.start()
        rest = r.read()
        stopper.join(timeout=30)
    finally:
        s.stop()
    events = [l for l in (first + rest).decode().splitlines() if l.startswith("data: ")]
    assert events[-1] == "data: [DONE]", events[-3:]
    err = json.loads(events[-2][len("data: "):])["error"]
    assert err["code"] == "server_shutdown" and err["type"] == "server_error"
