"""The request path against hostile clients (issue 14, items 4 and 5): bodies far over the limits, bodies that never finish,
too many large batches at once, slow or huge headers, JSON that no parser likes, and schemathesis, on a real uvicorn server
started as the image starts it (`--http fraud_mlops.api:GuardedHTTP`). Memory is the server process's own: VmHWM from
/proc/PID/status, reset through /proc/PID/clear_refs before each case. All traffic is to 127.0.0.1."""
import json, re, socket, sys, threading, time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from fraud_mlops.runtime import EXAMPLE_FEATURES
from fraud_mlops.serving import app

BIN = Path(sys.executable).parent
GUARDED = [BIN / 'uvicorn', 'fraud_mlops.serving:app', '--http', 'fraud_mlops.api:GuardedHTTP', '--no-access-log']
ROW = ', '.join(map(str, EXAMPLE_FEATURES[1:]))


def status_mb(pid, field):
    for line in Path(f'/proc/{pid}/status').read_text().splitlines():
        if line.startswith(field + ':'): return int(line.split()[1]) / 1024


def exchange(url, head, body=b'', chunked=False, piece=1 << 20, read_timeout=30):
    "(status or None, seconds to the status line, the raw answer) of `head` and `body` written by a thread on a raw socket."
    host, port = url.split('//')[1].split(':')
    s = socket.create_connection((host, int(port)), timeout=read_timeout)
    def send():
        try:
            s.sendall(head)
            for i in range(0, len(body), piece):
                b = body[i:i + piece]
                s.sendall(b'%x\r\n%s\r\n' % (len(b), b) if chunked else b)
            if chunked: s.sendall(b'0\r\n\r\n')
        except OSError: pass   # the server answered and closed first
    start = time.monotonic(); sender = threading.Thread(target=send, daemon=True); sender.start()
    answer = b''
    try:
        while b'\r\n\r\n' not in answer or len(answer.split(b'\r\n\r\n', 1)[1]) < int(
                (re.search(rb'content-length: (\d+)', answer.lower()) or [0, b'0'])[1]):
            got = s.recv(65536)
            if not got: break
            answer += got
    except OSError: pass
    seconds = time.monotonic() - start
    s.close(); sender.join(10)
    m = re.match(rb'HTTP/1.1 (\d+)', answer)
    return (int(m.group(1)) if m else None), seconds, answer


def post_head(path, length=None):
    return (f'POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n'
            + ('Transfer-Encoding: chunked\r\n\r\n' if length is None else f'Content-Length: {length}\r\n\r\n')).encode()


@pytest.fixture
def guarded(api_server, champion, store):
    "`guarded(**env)`: a real server on `store`'s champion, run as the image runs it; returns conftest's Server."
    return lambda **env: api_server({'FRAUD_MLOPS_STORE': store.uri, 'FRAUD_MLOPS_ACCESS_LOG': '0', **env}, cmd=GUARDED)


def test_hostile_bodies_get_413_fast_in_bounded_memory(guarded):
    "64 MiB of `[],` (declared, or chunked with no length) and `[],` up to the body limit: 413 within a second, RSS +100 MB at most."
    server = guarded()
    pid, url = server.proc.pid, server.url
    hostile = b'{"instances":[' + b'[],' * ((64 << 20) // 3 - 6) + b'[]]}'
    at_limit = b'{"instances":[' + b'[],' * ((16 << 20) // 3 - 6) + b'[]]}'  # FRAUD_MLOPS_MAX_BODY_BYTES, the default
    slowest, done = [0.0], threading.Event()
    def ping():
        with httpx.Client(timeout=30) as c:
            while not done.is_set():
                t = time.monotonic(); assert c.get(f'{url}/health/live').status_code == 200
                slowest[0] = max(slowest[0], time.monotonic() - t); time.sleep(0.01)
    pinger = threading.Thread(target=ping, daemon=True); pinger.start()
    try:
        for body, chunked in ((hostile, False), (hostile, True), (at_limit, False)):
            Path(f'/proc/{pid}/clear_refs').write_text('5')
            before = status_mb(pid, 'VmRSS')
            status, seconds, answer = exchange(url, post_head('/predict/batch', None if chunked else len(body)), body, chunked)
            grown = status_mb(pid, 'VmHWM') - before
            assert status == 413 and (b'connection: close' in answer.lower()) == (body is hostile), answer[:300]  # unread rest: dropped
            assert seconds < 2 and grown < 100, (len(body), chunked, seconds, grown)
    finally: done.set(); pinger.join(30)
    assert slowest[0] < 1, slowest[0]
    r = httpx.post(f'{url}/predict/batch', json={'instances': [EXAMPLE_FEATURES] * 3}, timeout=10)
    assert r.status_code == 200 and len(r.json()['predictions']) == 3


def read_to_close(s):
    "Everything socket `s` receives until the server closes it (an answer may come in several segments)."
    answer = b''
    while chunk := s.recv(4096): answer += chunk
    return answer


def test_unfinished_bodies_are_dropped_and_large_batches_capped(guarded):
    server = guarded(FRAUD_MLOPS_BODY_TIMEOUT='1', FRAUD_MLOPS_LARGE_BATCHES='1')
    host, port = server.url.split('//')[1].split(':')
    small = socket.create_connection((host, int(port)), timeout=10)   # a small body that stops half-way
    small.sendall(post_head('/predict', 1000) + b'{"features": [')
    large = socket.create_connection((host, int(port)), timeout=10)   # a large one that holds the one slot meanwhile
    large.sendall(post_head('/predict/batch', 4 << 20) + b'[' * (1 << 20))
    time.sleep(0.3)
    status, seconds, answer = exchange(server.url, post_head('/predict/batch', 2 << 20), b'[' * (2 << 20))
    assert status == 503 and b'retry-after: 1' in answer.lower() and seconds < 1, answer[:400]
    assert b'FRAUD_MLOPS_LARGE_BATCHES' in answer
    assert httpx.post(f'{server.url}/predict', json={'features': EXAMPLE_FEATURES}).status_code == 200  # small requests go on
    start = time.monotonic()
    for s in (small, large):
        answer = read_to_close(s)   # the whole answer, and the connection closed
        assert answer.startswith(b'HTTP/1.1 408') and b'FRAUD_MLOPS_BODY_TIMEOUT' in answer, answer
        s.close()
    assert time.monotonic() - start < 3
    status, _, _ = exchange(server.url, post_head('/predict/batch', 2 << 20), b'[' * (2 << 20))
    assert status == 413   # the slot is free again: this one is read, and refused for what it is


def test_slow_and_oversized_headers(guarded):
    server = guarded(FRAUD_MLOPS_HEADER_TIMEOUT='1')
    host, port = server.url.split('//')[1].split(':')
    idle, slow = (socket.create_connection((host, int(port)), timeout=10) for _ in range(2))
    slow.sendall(b'POST /predict HTTP/1.1\r\nHost: x\r\n')   # and the rest never comes
    start = time.monotonic()
    for s in (idle, slow):
        answer = read_to_close(s)
        assert answer.startswith(b'HTTP/1.1 408') and b'FRAUD_MLOPS_HEADER_TIMEOUT' in answer, answer
        s.close()
    assert time.monotonic() - start < 3
    status, _, answer = exchange(server.url, b'GET /health/live HTTP/1.1\r\nHost: x\r\nX-Big: ' + b'a' * (64 << 10) + b'\r\n\r\n')
    assert status == 431, answer
    r = httpx.get(f'{server.url}/health/live', headers={'X-Fine': 'a' * 8000})
    assert r.status_code == 200


@pytest.fixture
def client(champion, store, monkeypatch):
    monkeypatch.setenv('FRAUD_MLOPS_STORE', store.uri)
    with TestClient(app) as c: yield c


DEEP = '[' * 5000 + ']' * 5000
WIDE = ['1' + '0' * 25, str(2 ** 64), str(-2 ** 63 - 1), '-1' + '0' * 400, '9' * 5000]


HOSTILE_JSON = [
    ('/predict', DEEP), ('/predict/batch', DEEP), ('/predict', '{"features": ' + DEEP + '}'), ('/predict/batch', '{"instances": [' + DEEP + ']}'),
    ('/predict/batch', '{"instances": [[' + '{"a": ' * 1200 + '1' + '}' * 1200 + ']]}'),
    *[('/predict', '{"features": [%s, %s]}' % (w, ROW)) for w in WIDE],
    *[('/predict/batch', '{"instances": [[%s, %s]]}' % (w, ROW)) for w in WIDE],
    ('/predict/batch', '{"instances": [[1, 2], ' + '"x", ' * 5000 + '3]}'),
    ('/predict', '{"features": "\\ud800"}'), ('/predict/batch', b'{"instances": [[\xff]]}'), ('/predict', '\x00'),
    ('/predict/batch', '{"instances": [[1e999999999999999999999, %s]]}' % ROW), ('/predict', '{"features": [-0.0e-99999, %s]}' % ROW),
]


def test_no_json_gets_a_server_error(client):
    "Deep nesting, integers wider than 64 bits and parser errors: 200 when the numbers are fine, else 422 with one sentence."
    for path, body in HOSTILE_JSON:
        r = client.post(path, content=body if isinstance(body, bytes) else body.encode(), headers={'content-type': 'application/json'})
        assert r.status_code in (200, 422), (path, body[:80], r.status_code, r.text[:300])
        if r.status_code == 422:
            detail = r.json()['detail']
            assert set(r.json()) == {'detail'} and 0 < len(detail) < 400 and '\n' not in detail, (path, body[:80], detail)


def test_schemathesis_finds_no_server_error(client):
    "Bodies generated from the app's own OpenAPI (valid and not) for every operation, in process: never a 5xx."
    schemathesis = pytest.importorskip('schemathesis')
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    schema = schemathesis.openapi.from_dict(app.openapi())
    modes = [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]
    for op in schema.get_all_operations():
        op = op.ok()
        for mode in modes:
            @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def check(case):
                kw = case.as_transport_kwargs(base_url='http://testserver')
                content = kw.pop('data', None)
                if 'json' in kw: content = json.dumps(kw.pop('json')).encode()
                r = client.request(kw['method'], kw['url'], headers=kw.get('headers'), params=kw.get('params'), content=content)
                assert r.status_code < 500 or (op.path == '/reload' and r.status_code == 503), (case.as_curl_command(), r.text[:300])
            try: check()
            except Unsatisfiable: assert mode == schemathesis.GenerationMode.NEGATIVE, op.path  # nothing to get wrong (no body, no parameters)
