"""Real uvicorn servers (issue 5): reload under load with two workers, tampered bundles refused while serving, a store that
comes up after the server, 100 reloads and memory, and schemathesis against /openapi.json. All traffic is to 127.0.0.1."""
import asyncio, json, os, shutil, subprocess, sys, time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest

from fraud_mlops.data import FEATURES, TARGET
from fraud_mlops.modelling import make_model
from fraud_mlops.registry import read_champion, save_version, set_champion
from fraud_mlops.store import open_store
from fraud_mlops.runtime import EXAMPLE_FEATURES, TOLERANCE, fast_predictor

TOKEN = 'reload-test-token'
ADMIN = {'Authorization': f'Bearer {TOKEN}'}
BIN = Path(sys.executable).parent


@pytest.fixture(scope='module')
def data(ci_df):
    return ci_df[FEATURES].to_numpy(), ci_df[TARGET].to_numpy()


@pytest.fixture(scope='module')
def models(data):
    "Two small LightGBM models of the default kind whose probabilities differ, so a response shows which one scored it."
    X, y = data
    return [make_model('lgbm', n_estimators=n, random_state=s).fit(X, y) for n, s in ((30, 1), (45, 2))]


@pytest.fixture(scope='module')
def rows(data):
    "20 real rows: 10 frauds and 10 legitimate ones."
    X, y = data
    return X[np.r_[np.flatnonzero(y == 1)[:10], np.flatnonzero(y == 0)[:10]]]


def save(store, model, data, threshold=0.5):
    X, y = data
    return save_version(store, model, {'threshold': threshold, 'metrics': {'test': {'f1': 0.5}}}, X[:50], y[:50])['version']


@pytest.fixture
def server(api_server):
    """`server(env, workers=1, wait_ready=True)`: conftest's `api_server` with the admin token, as a context manager that
    stops it on exit (its log is complete then); yields (url, process, log path)."""
    @contextmanager
    def serve(env, workers=1, wait_ready=True):
        s = api_server({'FRAUD_MLOPS_ADMIN_TOKEN': TOKEN, 'WEB_CONCURRENCY': str(workers), **env},
                       wait='/health/ready' if wait_ready else '/health/live')
        try: yield s.url, s.proc, s.log
        finally: s.stop()
    return serve


def wait_for(check, seconds, what):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check(): return
        time.sleep(0.1)
    raise AssertionError(f'{what} within {seconds} s')


async def load(url, rows, seconds, connections=8, during=None, fresh=False):
    """Closed-loop load on /predict (and every 5th request a 3-row batch) for `seconds`; runs `during()` in a thread meanwhile.
    `fresh`: a new connection per request, so that the kernel spreads them over all workers."""
    results, stop = [], time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=url, timeout=10, limits=httpx.Limits(max_connections=connections),
                                 headers={'Connection': 'close'} if fresh else None) as c:
        async def worker(k):
            i = k
            while time.monotonic() < stop:
                i += 1
                idx = [i % len(rows)] if i % 5 else [i % len(rows), (i + 7) % len(rows), (i + 13) % len(rows)]
                path, body = ('/predict', {'features': rows[idx[0]].tolist()}) if len(idx) == 1 else \
                             ('/predict/batch', {'instances': rows[idx].tolist()})
                try: r = await c.post(path, json=body); results.append((time.monotonic(), idx, r.status_code, r.json()))
                except httpx.HTTPError as e: results.append((time.monotonic(), idx, None, repr(e)))
        side = asyncio.create_task(asyncio.to_thread(during)) if during else None
        await asyncio.gather(*(worker(k) for k in range(connections)))
        if side: await side
    return results


def check_consistent(results, expected):
    "Every response is a 200 whose probabilities all come from the one version it names; returns [(time, version)]."
    seen = []
    for t, idx, status, body in results:
        assert status == 200, (status, body)
        if 'predictions' in body:
            version, probs = body['model_version'], [p['fraud_probability'] for p in body['predictions']]
        else: version, probs = body['model_version'], [body['fraud_probability']]
        assert version in expected, body
        assert np.abs(np.array(probs) - expected[version][idx]).max() <= TOLERANCE, (version, idx, probs)  # not a mixed answer
        seen.append((t, version))
    return seen


def test_runtime_matches_the_pipeline_on_the_ci_subset(models, data):
    "The fast runtime gives the pipeline's predict_proba within TOLERANCE on every CI row, single rows and batch, and flips no decision."
    X, _ = data
    for m in models:
        name, fast = fast_predictor(m)
        assert name == 'lightgbm-quickscorer'
        want = m.predict_proba(X)[:, 1]
        for got in (fast(X), np.array([fast(X[i:i + 1])[0] for i in range(len(X))])):
            assert np.abs(got - want).max() <= TOLERANCE
            for t in (0.05, 0.5, float(np.median(want))): assert ((got >= t) == (want >= t)).all()


@pytest.mark.slow
def test_reload_under_load_two_workers(server, save_as_champion, store, models, data, rows):
    "Both workers move to the new champion by polling, with no failed and no mixed-version answer on the way."
    poll = 1.0
    v1 = save_as_champion(store, models[0], *data)
    expected = {}
    with server({'FRAUD_MLOPS_STORE': store.uri, 'FRAUD_MLOPS_POLL_SECONDS': str(poll)}, workers=2) as (url, proc, log):
        flipped = {}
        def flip():
            time.sleep(1.5)
            flipped['v2'] = save_as_champion(store, models[1], *data)
            flipped['at'] = time.monotonic()
        results = asyncio.run(load(url, rows, seconds=1.5 + poll + 8, during=flip, fresh=True))
        v2 = flipped['v2']
        expected = {v1: models[0].predict_proba(rows)[:, 1], v2: models[1].predict_proba(rows)[:, 1]}
        seen = check_consistent(results, expected)
        assert {v for _, v in seen} == {v1, v2}
        last_old = max(t for t, v in seen if v == v1)
        converged = last_old - flipped['at']
        print(f'\n{len(seen)} answers, 0 failed; all on the new version {converged:.2f} s after the pointer flipped (poll {poll} s)')
        after = [v for t, v in seen if t > last_old]
        assert after and set(after) == {v2} and len(after) > 50
        assert converged < poll + 20, converged  # a bound on "converges", not a speed target
        time.sleep(0.3)  # let the access logs flush
    lines = [json.loads(l) for l in log.read_text().splitlines() if l.startswith('{')]
    pids = {v: {l['pid'] for l in lines if l.get('model_version') == v} for v in (v1, v2)}
    assert len(pids[v1]) == len(pids[v2]) == 2, pids  # both workers served the old version, then the new one


@pytest.mark.slow
@pytest.mark.parametrize('tamper', ['model bytes', 'signed manifest', 'unsigned manifest'])
def test_tampered_bundle_refused_while_serving(server, save_as_champion, store, models, data, rows, tamper, monkeypatch):
    "A bad or unsigned bundle under a validly signed pointer: never served, one warning, and the alarm in /model and /metrics."
    from fraud_mlops.registry import sequence
    from fraud_mlops.signing import signed
    v1 = save_as_champion(store, models[0], *data)
    env = {'FRAUD_MLOPS_STORE': store.uri, 'FRAUD_MLOPS_POLL_SECONDS': '0.3'}
    with server(env) as (url, proc, log):
        def bad_promotion():
            time.sleep(0.5)
            v = save(store, models[1], data)
            d = store.root / 'versions' / v
            if tamper == 'model bytes': (d / 'model.joblib').write_bytes((d / 'model.joblib').read_bytes()[:-20])
            else:
                m = json.loads((d / 'manifest.json').read_text()); m['threshold'] = 0.01
                if tamper == 'unsigned manifest': del m['signature']
                (d / 'manifest.json').write_text(json.dumps(m))
            pointer = signed({'version': v, 'sequence': sequence(read_champion(store)[0]) + 1, 'previous': v1})
            store.put('champion.json', json.dumps(pointer).encode())  # a valid pointer names it
            wait_for(lambda: httpx.get(f'{url}/model').json()['serving']['reload_failure'] is not None, 20, 'failure not visible')
        results = asyncio.run(load(url, rows, seconds=3, connections=4, during=bad_promotion))
        seen = check_consistent(results, {v1: models[0].predict_proba(rows)[:, 1]})
        assert {v for _, v in seen} == {v1}
        failure = httpx.get(f'{url}/model').json()['serving']['reload_failure']
        assert failure['serving'] == v1
        assert {'model bytes': "does not match its manifest's SHA-256", 'signed manifest': 'it was changed after signing',
                'unsigned manifest': 'is not signed: refusing it'}[tamper] in failure['error']
        assert httpx.get(f'{url}/health/ready').json()['reload_failure'] == failure
        assert log.read_text().count('fraud-mlops refuses version ') == 1 and f', still serving version {v1}: ' in log.read_text()  # one line
        metrics = httpx.get(f'{url}/metrics').text.splitlines()
        assert 'fraud_mlops_reload_failing 1.0' in metrics and 'fraud_mlops_reloads_total{result="failed"} 1.0' in metrics  # fetched once
        r = httpx.post(f'{url}/reload', headers=ADMIN)  # an explicit reload tries again, and is refused again
        assert r.status_code == 503 and r.json()['detail'].startswith(f'reload failed, still serving version {v1}: ')
        v3 = save_as_champion(store, models[1], *data)  # a good promotion afterwards is picked up and clears the failure
        wait_for(lambda: httpx.get(f'{url}/health/ready').json()['model_version'] == v3, 20, 'good version not served')
        assert httpx.get(f'{url}/model').json()['serving']['reload_failure'] is None


def test_store_down_at_startup_then_up(server, save_as_champion, tmp_path, models, data):
    "A worker whose store does not exist yet starts, is live but not ready, and serves once the store has a champion."
    uri = str(tmp_path / 'later')
    with server({'FRAUD_MLOPS_STORE': uri, 'FRAUD_MLOPS_POLL_SECONDS': '5'}, wait_ready=False) as (url, proc, log):
        r = httpx.get(f'{url}/health/ready')
        assert r.status_code == 503 and 'does not exist' in r.json()['detail']
        assert httpx.post(f'{url}/predict', json={'features': EXAMPLE_FEATURES}).status_code == 503
        v = save_as_champion(open_store(uri, create=True), models[0], *data)
        wait_for(lambda: httpx.get(f'{url}/health/ready').status_code == 200, 20, 'not ready after the store came up')
        r = httpx.post(f'{url}/predict', json={'features': EXAMPLE_FEATURES})
        assert r.status_code == 200 and r.json()['model_version'] == v


def test_s3_store_unreachable_at_startup_then_up(server, save_as_champion, aws_env, free_port, models, data):
    "Same with an S3 store whose endpoint is not listening at startup: retries with backoff, then serves."
    moto_server = pytest.importorskip('moto.server')
    port = free_port()
    env = aws_env(f'http://127.0.0.1:{port}', AWS_MAX_ATTEMPTS='1', FRAUD_MLOPS_S3_CONNECT_TIMEOUT='1', FRAUD_MLOPS_S3_READ_TIMEOUT='5')
    uri = 's3://fraud-later/registry'
    with server({**env, 'FRAUD_MLOPS_STORE': uri, 'FRAUD_MLOPS_POLL_SECONDS': '5'}, wait_ready=False) as (url, proc, log):
        r = httpx.get(f'{url}/health/ready')
        assert r.status_code == 503 and 'cannot reach S3' in r.json()['detail'], r.json()
        s3 = moto_server.ThreadedMotoServer(ip_address='127.0.0.1', port=port, verbose=False)
        s3.start()
        try:
            from fraud_mlops.store import s3_client
            s3_client().create_bucket(Bucket='fraud-later')
            v = save_as_champion(open_store(uri, create=True), models[0], *data)
            wait_for(lambda: httpx.get(f'{url}/health/ready').status_code == 200, 30, 'not ready after S3 came up')
            assert httpx.post(f'{url}/predict', json={'features': EXAMPLE_FEATURES}).json()['model_version'] == v
        finally: s3.stop()


def rss_kb(pid):
    for line in Path(f'/proc/{pid}/status').read_text().splitlines():
        if line.startswith('VmRSS:'): return int(line.split()[1])


@pytest.mark.slow
def test_100_reloads_keep_memory_flat(server, save_as_champion, store, models, data):
    "Alternating the champion and reloading 100 times leaves the worker's RSS within 20% of after the first reload."
    va, vb = save_as_champion(store, models[0], *data), save(store, models[1], data)
    with server({'FRAUD_MLOPS_STORE': store.uri, 'FRAUD_MLOPS_POLL_SECONDS': '0'}) as (url, proc, log):
        assert httpx.post(f'{url}/reload').status_code == 401  # auth on the real server too
        with httpx.Client(base_url=url, timeout=30) as c:
            rss = []
            for i in range(100):
                target = vb if i % 2 == 0 else va
                set_champion(store, target, read_champion(store)[1])
                r = c.post('/reload', headers=ADMIN)
                assert r.status_code == 200 and r.json()['reloaded'] and r.json()['model_version'] == target, r.text
                assert c.post('/predict', json={'features': EXAMPLE_FEATURES}).json()['model_version'] == target
                rss.append(rss_kb(proc.pid))
        print(f'\nRSS after reload 1: {rss[0] / 1024:.1f} MB, after 100: {rss[-1] / 1024:.1f} MB (max {max(rss) / 1024:.1f} MB)')
        assert rss[-1] <= 1.2 * rss[0], (rss[0], rss[-1])


def test_limits_on_the_real_server(server, save_as_champion, store, models, data):
    save_as_champion(store, models[0], *data)
    with server({'FRAUD_MLOPS_STORE': store.uri, 'FRAUD_MLOPS_MAX_BATCH': '5', 'FRAUD_MLOPS_MAX_BODY_BYTES': '20000'}) as (url, _, _):
        r = httpx.post(f'{url}/predict/batch', json={'instances': [EXAMPLE_FEATURES] * 6})
        assert (r.status_code, r.json()['detail']) == (413, 'batch of 6 rows is over the limit of 5 (FRAUD_MLOPS_MAX_BATCH); split it')
        r = httpx.post(f'{url}/predict/batch', content=b'{"instances": [' + b' ' * 30_000 + b']}', headers={'content-type': 'application/json'})
        assert r.status_code == 413 and 'over the limit of 20000 bytes' in r.json()['detail']
        assert httpx.post(f'{url}/predict', json={'features': EXAMPLE_FEATURES}, headers={'X-Request-ID': 'req-42'}).headers['x-request-id'] == 'req-42'


@pytest.mark.slow
@pytest.mark.skipif(shutil.which('schemathesis', path=str(BIN)) is None, reason='schemathesis is a dev requirement')
def test_schemathesis_finds_no_server_error(server, save_as_champion, tmp_path, store, models, data):
    "Property-based requests generated from /openapi.json (valid and invalid bodies) never get a 5xx."
    save_as_champion(store, models[0], *data)
    with server({'FRAUD_MLOPS_STORE': store.uri, 'FRAUD_MLOPS_ACCESS_LOG': '0'}) as (url, _, _):
        r = subprocess.run([BIN / 'schemathesis', 'run', f'{url}/openapi.json', '--checks', 'not_a_server_error',
                            '--max-examples', '40', '--seed', '5', '--request-timeout', '10', '--continue-on-failure'],
                           capture_output=True, text=True, timeout=300, env={**os.environ, 'NO_COLOR': '1'}, cwd=tmp_path)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
