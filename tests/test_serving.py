"Tests of the HTTP API (fraud_mlops.serving): contract, bad input, readiness, reload, and one real uvicorn server."
import json, logging, re
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi import Depends, HTTPException
from fastapi.testclient import TestClient
from starlette.middleware.gzip import GZipMiddleware
from sklearn.ensemble import RandomForestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from fraud_mlops.config import ConfigError
from fraud_mlops.data import FEATURES, TARGET
from fraud_mlops.registry import set_champion
from fraud_mlops.runtime import EXAMPLE_FEATURES
from fraud_mlops.serving import FastPathError, app, create_app

TOKEN = 'test-admin-token'
ADMIN = {'Authorization': f'Bearer {TOKEN}'}
ROOT = Path(__file__).resolve().parent.parent
ROW_MSG = 'must hold exactly 30 numbers (Time, V1..V28, Amount), got'


@pytest.fixture(scope='session')
def data(ci_df):
    "(X, y) of the real CI subset as numpy arrays."
    return ci_df[FEATURES].to_numpy(), ci_df[TARGET].to_numpy()


@pytest.fixture(scope='session')
def model(data):
    "A small forest on the real rows; n_jobs=2 so that serving's switch to 1 shows."
    X, y = data
    return make_pipeline(StandardScaler(), RandomForestClassifier(n_estimators=20, class_weight='balanced',
                                                                  random_state=0, n_jobs=2)).fit(X, y)


@pytest.fixture
def served_champion(store, monkeypatch, model, data, save_as_champion):
    "`store` (from conftest) with `model` as champion and the API's environment pointing at it; returns the version."
    v = save_as_champion(store, model, *data)
    monkeypatch.setenv('FRAUD_MLOPS_STORE', store.uri)
    monkeypatch.setenv('FRAUD_MLOPS_ADMIN_TOKEN', TOKEN)
    monkeypatch.delenv('FRAUD_MLOPS_MAX_BATCH', raising=False)
    return v


@pytest.fixture
def client(served_champion):
    with TestClient(app) as c: yield c


def post_raw(c, path, text):
    return c.post(path, content=text, headers={'content-type': 'application/json'})


# ---------------------------------------------------------------- the happy path

def test_status_and_health(client, store, served_champion):
    v = served_champion
    assert client.get('/').json() == {'service': 'fraud-mlops', 'status': 'ready', 'model_version': v,
                                      'store': store.uri, 'reason': None, 'shadow_version': None}
    assert client.get('/health/live').status_code == 200
    r = client.get('/health/ready')
    assert (r.status_code, r.json()) == (200, {'status': 'ready', 'model_version': v, 'reload_failure': None})
    m = client.get('/model').json()
    assert (m['version'], m['threshold']) == (v, 0.5)


def test_example_is_legit(client, served_champion):
    r = client.post('/predict', json={'features': EXAMPLE_FEATURES})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {'prediction', 'fraud_probability', 'model_version'}
    assert (body['prediction'], body['model_version']) == ('legit', served_champion)
    assert 0 <= body['fraud_probability'] < 0.5


def test_probabilities_are_the_pipelines(client, model, data):
    X, y = data
    rows = np.r_[np.flatnonzero(y == 1)[:5], np.flatnonzero(y == 0)[:5]]
    expected = model.predict_proba(X[rows])[:, 1]
    got = [client.post('/predict', json={'features': X[i].tolist()}).json() for i in rows]
    assert [g['fraud_probability'] for g in got] == expected.tolist()
    assert [g['prediction'] for g in got] == ['fraud' if p >= 0.5 else 'legit' for p in expected]
    assert {g['prediction'] for g in got} == {'fraud', 'legit'}  # both verdicts exercised


def test_batch_equals_singles(client, data, served_champion):
    X, y = data
    rows = np.r_[np.flatnonzero(y == 1)[:40], np.arange(60)]  # 100 rows: over INLINE_ROWS, so the thread path too
    batch = client.post('/predict/batch', json={'instances': X[rows].tolist()}).json()
    assert batch['model_version'] == served_champion
    singles = [client.post('/predict', json={'features': X[i].tolist()}).json() for i in rows]
    assert batch['predictions'] == [{'prediction': s['prediction'], 'fraud_probability': s['fraud_probability']} for s in singles]
    small = client.post('/predict/batch', json={'instances': X[rows[:3]].tolist()}).json()
    assert small['predictions'] == batch['predictions'][:3]


def test_threshold_decides(store, monkeypatch, model, data, save_as_champion):
    "Fraud iff probability >= the manifest's threshold, for single and batch predictions alike."
    X, y = data
    p = model.predict_proba(X)[:, 1]
    at = int(np.flatnonzero((p > 0.2) & (p < 0.8))[0])  # a row scored strictly between 0 and 1
    below, above = int(np.flatnonzero(p < p[at])[0]), int(np.flatnonzero(p > p[at])[0])
    save_as_champion(store, model, *data, threshold=float(p[at]))  # the threshold is exactly that row's probability
    monkeypatch.setenv('FRAUD_MLOPS_STORE', store.uri)
    with TestClient(app) as c:
        rows = [below, at, above]
        singles = [c.post('/predict', json={'features': X[i].tolist()}).json()['prediction'] for i in rows]
        batch = c.post('/predict/batch', json={'instances': X[rows].tolist()}).json()['predictions']
        assert singles == [b['prediction'] for b in batch] == ['legit', 'fraud', 'fraud']


def test_served_model_is_single_threaded(client):
    assert client.app.state.worker.served.model.get_params()['randomforestclassifier__n_jobs'] == 1


def test_metrics(client, served_champion):
    client.post('/predict', json={'features': EXAMPLE_FEATURES})
    client.post('/predict/batch', json={'instances': [EXAMPLE_FEATURES] * 2})
    client.post('/predict', json={'features': [1]})
    r = client.get('/metrics')
    assert r.headers['content-type'].startswith('text/plain; version=0.0.4')
    lines = set(r.text.splitlines())
    for line in ['fraud_mlops_requests_total{route="/predict",status="200"} 1.0',
                 'fraud_mlops_requests_total{route="/predict/batch",status="200"} 1.0',
                 'fraud_mlops_requests_total{route="/predict",status="422"} 1.0',  # the invalid one
                 'fraud_mlops_request_seconds_count{route="/predict",status="200"} 1.0',
                 'fraud_mlops_predictions_total{prediction="legit"} 3.0', 'fraud_mlops_predictions_total{prediction="fraud"} 0.0',
                 'fraud_mlops_fraud_probability_count 3.0',
                 f'fraud_mlops_model_info{{runtime="sklearn-pipeline",version="{served_champion}"}} 1.0',
                 'fraud_mlops_ready 1.0', 'fraud_mlops_reload_failing 0.0', '# TYPE fraud_mlops_reloads_total counter',
                 '# TYPE fraud_mlops_request_seconds histogram']:
        assert line in lines, line
    assert not any(l.startswith('fraud_mlops_requests_total{route="/metrics"') for l in lines)  # counted when answered, after rendering


def test_openapi_has_the_example():
    spec = app.openapi()
    assert spec['components']['schemas']['Transaction']['examples'] == [{'features': EXAMPLE_FEATURES, 'transaction_id': 'tx-000001'}]
    assert json.loads((ROOT / 'data' / 'example_request.json').read_text()) == {'features': EXAMPLE_FEATURES}  # what README's curl sends
    refs = set(re.findall(r'"#/components/schemas/(\w+)"', json.dumps(spec)))
    assert refs and refs <= set(spec['components']['schemas']), refs - set(spec['components']['schemas'])  # /docs resolves every model
    example = json.loads((ROOT / 'data' / 'example_batch.json').read_text())
    assert len(example['ids']) == len(example['instances']) == 3  # what README's second curl sends


# ---------------------------------------------------------------- bad input

BAD_SINGLE = [
    (json.dumps({'features': EXAMPLE_FEATURES[:29]}), f'features {ROW_MSG} 29'),
    (json.dumps({'features': EXAMPLE_FEATURES + [1.0]}), f'features {ROW_MSG} 31'),
    (json.dumps({'features': []}), f'features {ROW_MSG} 0'),
    (json.dumps({'features': EXAMPLE_FEATURES[:29] + ['149.62']}), 'features[29] (Amount) must be a number, got "149.62"'),
    (json.dumps({'features': [True] + EXAMPLE_FEATURES[1:]}), 'features[0] (Time) must be a number, got true'),
    (json.dumps({'features': EXAMPLE_FEATURES[:3] + [None] + EXAMPLE_FEATURES[4:]}), 'features[3] (V3) must be a number, got null'),
    ('{"features": [NaN' + ', 1' * 29 + ']}', 'features[0] (Time) must be a finite number, got NaN'),
    ('{"features": [1, Infinity' + ', 1' * 28 + ']}', 'features[1] (V1) must be a finite number, got Infinity'),
    ('{"features": [1, -Infinity' + ', 1' * 28 + ']}', 'features[1] (V1) must be a finite number, got -Infinity'),
    ('{"features": [1e999' + ', 1' * 29 + ']}', 'features[0] (Time) must be a finite number, got Infinity'),
    (json.dumps({'features': 'all of them'}), 'features must be a list of exactly 30 numbers'),
    (json.dumps({'feature': EXAMPLE_FEATURES}), "request body has no 'features' key"),
    (json.dumps(EXAMPLE_FEATURES), 'request body must be a JSON object'),
    ('{"features": [1, 2,', 'request body is not valid JSON'),
    ('', 'request body is empty'),
]


@pytest.mark.parametrize('body, message', BAD_SINGLE)
def test_bad_single_input(client, body, message):
    r = post_raw(client, '/predict', body)
    assert r.status_code == 422
    assert set(r.json()) == {'detail'} and message in r.json()['detail'], r.json()


def test_exact_length_message(client):
    r = client.post('/predict', json={'features': EXAMPLE_FEATURES[:29]})
    assert r.json() == {'detail': 'features must hold exactly 30 numbers (Time, V1..V28, Amount), got 29'}


def test_not_json_content_type(client):
    r = client.post('/predict', content=json.dumps({'features': EXAMPLE_FEATURES}), headers={'content-type': 'text/plain'})
    assert r.status_code == 422 and 'Content-Type: application/json' in r.json()['detail']


def test_many_errors_are_summarised(client):
    r = client.post('/predict', json={'features': ['x'] * 30})
    assert r.status_code == 422 and r.json()['detail'].endswith('and 27 more problems')


BAD_BATCH = [
    ({'instances': []}, 'instances must hold at least one row'),
    ({'instances': [EXAMPLE_FEATURES, EXAMPLE_FEATURES[:-1]]}, f'instances[1] {ROW_MSG} 29'),
    ({'instances': [EXAMPLE_FEATURES, EXAMPLE_FEATURES[:-1] + ['x']]}, 'instances[1][29] (Amount) must be a number, got "x"'),
    ({'instances': EXAMPLE_FEATURES}, 'instances[0] must be a list of exactly 30 numbers'),
    ({'instances': 'rows'}, 'instances must be a list of rows'),
    ({'features': EXAMPLE_FEATURES}, "request body has no 'instances' key"),
]


@pytest.mark.parametrize('body, message', BAD_BATCH)
def test_bad_batch_input(client, body, message):
    r = client.post('/predict/batch', json=body)
    assert r.status_code == 422
    assert message in r.json()['detail'], r.json()


def test_batch_nan(client):
    row = '[' + ', '.join(['1'] * 29) + ', NaN]'
    r = post_raw(client, '/predict/batch', '{"instances": [' + row + ']}')
    assert (r.status_code, r.json()['detail']) == (422, 'instances[0][29] (Amount) must be a finite number, got NaN')


def test_batch_limit(served_champion, monkeypatch):
    monkeypatch.setenv('FRAUD_MLOPS_MAX_BATCH', '3')
    with TestClient(app) as c:
        assert c.post('/predict/batch', json={'instances': [EXAMPLE_FEATURES] * 3}).status_code == 200
        r = c.post('/predict/batch', json={'instances': [EXAMPLE_FEATURES] * 4})
        assert r.status_code == 413
        assert r.json()['detail'] == 'batch of 4 rows is over the limit of 3 (FRAUD_MLOPS_MAX_BATCH); split it'


def test_bad_batch_limit_setting_stops_start(served_champion, monkeypatch):
    monkeypatch.setenv('FRAUD_MLOPS_MAX_BATCH', 'many')
    with pytest.raises(ConfigError, match="FRAUD_MLOPS_MAX_BATCH='many': expected a whole number"):
        with TestClient(app): pass


# ---------------------------------------------------------------- not ready

def assert_not_ready(c, reason):
    st = c.get('/').json()
    assert (st['status'], st['model_version']) == ('not ready', None) and reason in st['reason'], st
    assert c.get('/health/live').status_code == 200
    for r in (c.get('/health/ready'), c.get('/model'), c.post('/predict', json={'features': EXAMPLE_FEATURES}),
              c.post('/predict/batch', json={'instances': [EXAMPLE_FEATURES]})):
        assert r.status_code == 503 and r.json()['detail'].startswith('no model loaded: ') and reason in r.json()['detail'], r.json()
    assert 'fraud_mlops_ready 0.0' in c.get('/metrics').text.splitlines()


def test_no_store(tmp_path, monkeypatch):
    monkeypatch.setenv('FRAUD_MLOPS_STORE', str(tmp_path / 'nowhere'))
    with TestClient(app) as c: assert_not_ready(c, 'does not exist')


def test_no_champion(store, monkeypatch):
    monkeypatch.setenv('FRAUD_MLOPS_STORE', store.uri)
    with TestClient(app) as c: assert_not_ready(c, 'has no champion yet')


def test_corrupt_champion(store, served_champion):
    f = store.root / 'versions' / served_champion / 'model.joblib'
    f.write_bytes(f.read_bytes()[:-50])
    with TestClient(app) as c: assert_not_ready(c, "does not match its manifest's SHA-256")


def test_reload_after_a_late_champion(store, monkeypatch, model, data, save_as_champion):
    "A worker that started before the first promotion serves it after a reload."
    monkeypatch.setenv('FRAUD_MLOPS_STORE', store.uri)
    monkeypatch.setenv('FRAUD_MLOPS_ADMIN_TOKEN', TOKEN)
    with TestClient(app) as c:
        r = c.post('/reload', headers=ADMIN)
        assert r.status_code == 503 and 'has no champion yet' in r.json()['detail']
        (store.root / 'champion.json').write_text('{broken')
        r = c.post('/reload', headers=ADMIN)
        assert r.status_code == 503 and r.json()['detail'].startswith('no model loaded: ') and 'not valid JSON' in r.json()['detail']
        assert 'not valid JSON' in c.get('/').json()['reason']  # the latest reason is shown
        (store.root / 'champion.json').unlink()
        v = save_as_champion(store, model, *data)
        assert c.post('/reload', headers=ADMIN).json() == {'reloaded': True, 'model_version': v, 'previous_version': None}
        assert c.get('/').json()['reason'] is None
        assert c.post('/predict', json={'features': EXAMPLE_FEATURES}).json()['model_version'] == v


# ---------------------------------------------------------------- reload

def test_reload_disabled_without_token(served_champion, monkeypatch):
    monkeypatch.delenv('FRAUD_MLOPS_ADMIN_TOKEN')  # read with the other settings when the worker starts
    with TestClient(app) as c:
        r = c.post('/reload', headers=ADMIN)
    assert (r.status_code, r.json()) == (403, {'detail': 'admin routes (/reload, /labels) are disabled: set FRAUD_MLOPS_ADMIN_TOKEN'})


@pytest.mark.parametrize('headers', [{}, {'Authorization': 'Bearer wrong'}, {'Authorization': f'Basic {TOKEN}'},
                                     {'Authorization': TOKEN}, {'Authorization': f'Bearer {TOKEN}x'}])
def test_reload_needs_the_token(client, headers):
    r = client.post('/reload', headers=headers)
    assert r.status_code == 401 and 'admin token' in r.json()['detail']
    assert r.headers['www-authenticate'] == 'Bearer'


def test_reload_unchanged(client, served_champion):
    v = served_champion
    r = client.post('/reload', headers=ADMIN)
    assert (r.status_code, r.json()) == (200, {'reloaded': False, 'model_version': v, 'previous_version': v})
    assert 'fraud_mlops_reloads_total{result="unchanged"} 1.0' in client.get('/metrics').text.splitlines()


def test_reload_picks_up_a_promotion(client, store, served_champion, model, data, save_as_champion):
    v1 = served_champion
    v2 = save_as_champion(store, model, *data, threshold=0.0)
    assert client.post('/predict', json={'features': EXAMPLE_FEATURES}).json()['model_version'] == v1  # not until reloaded
    r = client.post('/reload', headers=ADMIN)
    assert (r.status_code, r.json()) == (200, {'reloaded': True, 'model_version': v2, 'previous_version': v1})
    # the new model comes with its own threshold: at 0.0 everything is fraud
    assert client.post('/predict', json={'features': EXAMPLE_FEATURES}).json() == {
        'prediction': 'fraud', 'fraud_probability': model.predict_proba(np.array([EXAMPLE_FEATURES]))[0, 1], 'model_version': v2}
    assert client.get('/').json()['model_version'] == v2
    assert client.get('/model').json()['threshold'] == 0.0
    assert f'fraud_mlops_model_info{{runtime="sklearn-pipeline",version="{v2}"}} 1.0' in client.get('/metrics').text.splitlines()


def test_failed_reload_keeps_serving(client, store, served_champion, model, data, save_as_champion):
    v1 = served_champion
    v2 = save_as_champion(store, model, *data)
    f = store.root / 'versions' / v2 / 'model.joblib'
    f.write_bytes(b'not a model')
    r = client.post('/reload', headers=ADMIN)
    assert r.status_code == 503
    detail = r.json()['detail']
    assert detail.startswith(f'reload failed, still serving version {v1}: ') and "does not match its manifest's SHA-256" in detail
    assert client.post('/predict', json={'features': EXAMPLE_FEATURES}).json()['model_version'] == v1
    r = client.get('/health/ready')  # still ready (an older model serves), carrying the failure
    assert r.status_code == 200 and r.json()['model_version'] == v1 and r.json()['reload_failure'] == client.get('/model').json()['serving']['reload_failure']
    assert client.get('/').json()['status'] == 'ready'
    lines = client.get('/metrics').text.splitlines()
    assert 'fraud_mlops_reloads_total{result="failed"} 1.0' in lines and 'fraud_mlops_reload_failing 1.0' in lines
    failure = client.get('/model').json()['serving']['reload_failure']
    assert failure['serving'] == v1 and "does not match its manifest's SHA-256" in failure['error']
    (store.root / 'champion.json').unlink()  # the pointer itself gone: still serving
    assert client.post('/reload', headers=ADMIN).status_code == 503
    assert client.post('/predict', json={'features': EXAMPLE_FEATURES}).status_code == 200


# ---------------------------------------------------------------- a real server

def test_real_uvicorn_server(store, served_champion, api_server):
    v = served_champion
    url = api_server({'FRAUD_MLOPS_STORE': store.uri}).url   # up once /health/ready answers 200
    r = httpx.post(f'{url}/predict', json={'features': EXAMPLE_FEATURES}, timeout=5)
    assert r.status_code == 200 and r.json()['prediction'] == 'legit' and r.json()['model_version'] == v, r.text


# ---------------------------------------------------------------- request path: access log, limits, fast parser

def test_one_json_log_line_per_request(client, served_champion, monkeypatch):
    import io
    from fraud_mlops.observability import AccessLog
    out, telemetry = io.BytesIO(), client.app.state.worker.telemetry
    telemetry.access_log = AccessLog(out, lines=1)
    client.post('/predict', json={'features': EXAMPLE_FEATURES}, headers={'X-Request-ID': 'trace-7'})
    r = client.post('/predict', json={'features': [1]})
    client.get('/nowhere')
    lines = [json.loads(l) for l in out.getvalue().splitlines()]
    assert [(l['route'], l['status'], l['model_version']) for l in lines] == [('/predict', 200, served_champion), ('/predict', 422, None),
                                                                              ('other', 404, None)]
    assert lines[0]['id'] == 'trace-7' and lines[1]['id'] == r.headers['x-request-id'] != 'trace-7'
    assert {'time', 'method', 'ms', 'pid'} <= set(lines[0]) and 'features' not in lines[0]  # no raw features by default
    for l in lines:   # ISO 8601 in UTC to the microsecond, fixed width, and now
        assert re.fullmatch(r'\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z', l['time']), l['time']
        assert abs(datetime.fromisoformat(l['time']) - datetime.now(timezone.utc)).total_seconds() < 60
    telemetry.log_features = True  # what FRAUD_MLOPS_LOG_FEATURES=1 sets at start-up
    client.post('/predict', json={'features': EXAMPLE_FEATURES})
    assert json.loads(out.getvalue().splitlines()[-1])['features'] == EXAMPLE_FEATURES


def test_body_size_limits(served_champion, monkeypatch):
    monkeypatch.setenv('FRAUD_MLOPS_MAX_BODY_BYTES', '5000')
    with TestClient(app) as c:
        r = post_raw(c, '/predict/batch', json.dumps({'instances': [EXAMPLE_FEATURES] * 10}))
        assert r.status_code == 413 and r.json()['detail'].startswith('request body of ') and 'limit of 5000 bytes' in r.json()['detail']
        assert c.post('/predict', json={'features': EXAMPLE_FEATURES}).status_code == 200
        r = post_raw(c, '/predict', json.dumps({'features': EXAMPLE_FEATURES, 'pad': 'x' * 6000}))
        assert r.status_code == 413  # /predict never takes more than min(limit, 64 KiB)


@pytest.mark.parametrize('body', [{'features': list(range(30))}, {'features': EXAMPLE_FEATURES, 'extra': [1, 2]},
                                  {'features': [int(1e18)] + EXAMPLE_FEATURES[1:]}])
def test_fast_parser_accepts_what_pydantic_accepts(client, model, body):
    r = client.post('/predict', json=body)
    assert r.status_code == 200
    assert r.json()['fraud_probability'] == model.predict_proba(np.array([body['features']], dtype=float))[0, 1]


def test_default_model_runtime_matches_pipeline(store, monkeypatch, ci_df, add_candidate):
    "The shipped default (a real trained LightGBM candidate) is served by QuickScorer (batches) and the C API (single rows) with predict_proba's probabilities."
    from fraud_mlops import runtime
    from fraud_mlops.registry import load_model
    v = add_candidate(store, n_estimators=60)
    set_champion(store, v, None)
    monkeypatch.setenv('FRAUD_MLOPS_STORE', store.uri)
    X = ci_df[FEATURES].to_numpy()
    pipeline = load_model(store, v)[0]
    with TestClient(app) as c:
        served = c.app.state.worker.served
        assert served.runtime == 'lightgbm-quickscorer'
        want = pipeline.predict_proba(X[:200])[:, 1]
        batch = c.post('/predict/batch', json={'instances': X[:200].tolist()}).json()['predictions']
        singles = [c.post('/predict', json={'features': x.tolist()}).json()['fraud_probability'] for x in X[:50]]
        big = X[np.arange(runtime.PARALLEL_ROWS) % len(X)]  # scored on BATCH_THREADS threads
        r = c.post('/predict/batch', json={'instances': big.tolist()})
        assert r.status_code == 200
        p_big = np.array([p['fraud_probability'] for p in r.json()['predictions']])
        p_one = served.predict.booster.predict(pipeline.steps[0][1].transform(big), num_threads=1)
    assert p_big.tobytes() == p_one.tobytes()  # more threads, the very same probabilities
    assert np.abs(p_big - pipeline.predict_proba(big)[:, 1]).max() <= runtime.TOLERANCE
    assert np.abs(np.array([p['fraud_probability'] for p in batch]) - want).max() <= runtime.TOLERANCE
    assert np.abs(np.array(singles) - want[:50]).max() <= runtime.TOLERANCE


# ---------------------------------------------------------------- the fast path around FastAPI

def test_fast_paths_come_from_the_route_table():
    from fraud_mlops.serving import fast_paths, score_batch, score_one
    assert fast_paths(app) == {'/predict': score_one, '/predict/batch': score_batch}
    t = create_app()
    t.router.routes.remove(next(r for r in t.router.routes if getattr(r, 'path', None) == '/predict/batch'))
    assert fast_paths(t) == {'/predict': score_one}  # a route no longer declared is no longer answered around FastAPI


def test_scoring_goes_around_fastapi_and_the_rest_through_it(client):
    async def refuse(scope, receive, send): raise AssertionError(f"{scope['path']} went through FastAPI")
    stack, client.app.middleware_stack = client.app.middleware_stack, refuse
    try:
        assert client.post('/predict', json={'features': EXAMPLE_FEATURES}).status_code == 200
        assert client.post('/predict/batch', json={'instances': [EXAMPLE_FEATURES]}).status_code == 200
        with pytest.raises(AssertionError, match='/health/ready went through FastAPI'): client.get('/health/ready')
    finally: client.app.middleware_stack = stack


def test_the_fast_path_answers_what_fastapi_would(client, data):
    "The same requests sent straight into FastAPI's stack (past the fast path) get the same status, body and content type."
    from fastapi import FastAPI
    async def through_fastapi(scope, receive, send): await FastAPI.__call__(client.app, scope, receive, send)
    plain = TestClient(through_fastapi)  # no lifespan of its own: it uses the worker `client` started
    X, _ = data
    requests = [('/predict', json.dumps({'features': X[0].tolist()})), ('/predict/batch', json.dumps({'instances': X[:100].tolist()})),
                *(('/predict', body) for body, _ in BAD_SINGLE), *(('/predict/batch', json.dumps(body)) for body, _ in BAD_BATCH),
                ('/predict', json.dumps({'features': EXAMPLE_FEATURES, 'pad': 'x' * 70_000}))]
    def same():
        for path, body in requests:
            a, b = post_raw(client, path, body), post_raw(plain, path, body)
            assert (a.status_code, a.content, a.headers['content-type']) == (b.status_code, b.content, b.headers['content-type']), body[:80]
    same()
    client.app.state.worker.served = None  # and while no model is served: the same 503
    same()


async def audit(): pass


def add_again(t, path, **changes):
    "Declare `path` of app `t` again, last, as someone editing its route might: same endpoint, with `changes`."
    r = next(r for r in t.router.routes if getattr(r, 'path', None) == path)
    t.router.routes.remove(r)
    t.add_api_route(path, changes.pop('endpoint', r.endpoint), **{'methods': ['POST'], **changes})


def with_parameter(t, path):
    from fastapi import Request
    from fraud_mlops.serving import worker
    scorer = next(r for r in t.router.routes if getattr(r, 'path', None) == path).endpoint.scorer
    async def endpoint(request: Request, explain: int = 0):  # a new query parameter the scorer would never see
        return await scorer(request.scope, request.receive, await worker(request))
    endpoint.scorer = scorer
    add_again(t, path, endpoint=endpoint)


def declared_before(t, path):
    "Another POST `path` route, declared before the scoring one: FastAPI would route the request to it."
    from fraud_mlops.serving import live
    t.post(path)(live)
    t.router.routes.insert(0, t.router.routes.pop())


CHANGES = {  # what someone might add (to the route at `path`, or to the whole app), and what the fast path would then skip
    'dependency': (lambda t, path: add_again(t, path, dependencies=[Depends(audit)]), 'dependency audit'),
    'query parameter': (with_parameter, 'parameter explain'),
    'other method': (lambda t, path: add_again(t, path, methods=['POST', 'PUT']), "methods ['POST', 'PUT']"),
    'earlier route': (declared_before, 'earlier route'),
    'middleware': (lambda t, path: t.add_middleware(GZipMiddleware), 'middleware GZipMiddleware'),
    'http middleware': (lambda t, path: t.middleware('http')(lambda request, call_next: call_next(request)), 'middleware BaseHTTPMiddleware'),
    'exception handler': (lambda t, path: t.add_exception_handler(Exception, lambda request, exc: None), 'exception handler for Exception'),
    'HTTPException handler': (lambda t, path: t.add_exception_handler(HTTPException, lambda request, exc: None), 'exception handler for HTTPException'),
    'status handler': (lambda t, path: t.add_exception_handler(503, lambda request, exc: None), 'exception handler for 503'),
}
APP_WIDE = {'middleware', 'http middleware', 'exception handler', 'HTTPException handler', 'status handler'}  # /predict comes first


@pytest.mark.parametrize('path', ['/predict', '/predict/batch'])
@pytest.mark.parametrize('change', CHANGES)
def test_a_worker_refuses_to_start_when_the_fast_path_would_skip_something(change, path, tmp_path, monkeypatch):
    monkeypatch.setenv('FRAUD_MLOPS_STORE', str(tmp_path / 'none'))  # no model: starts at once, unready
    monkeypatch.setenv('FRAUD_MLOPS_POLL_SECONDS', '0')
    with TestClient(create_app()) as c: assert c.get('/health/live').status_code == 200  # unchanged, it starts
    t = create_app()
    make, skipped = CHANGES[change]
    make(t, path)
    named = '/predict' if change in APP_WIDE else path
    with pytest.raises(FastPathError, match=re.escape(f'POST {named} is answered around FastAPI, which would skip its ') + '.*' + re.escape(skipped)):
        with TestClient(t): pass


# ---------------------------------------------------------------- the reload alarm and a stuck store

def test_reload_failure_alarm_clears_when_the_pointer_is_good_again(client, store, served_champion, monkeypatch, caplog):
    "A pointer changed by hand (its signature fails) sets the alarm with one warning however often it is polled; put back, it clears."
    import asyncio, logging
    from fraud_mlops.serving import refresh
    w, v = client.app.state.worker, served_champion
    pointer = store.root / 'champion.json'
    good = pointer.read_bytes()
    pointer.write_text(json.dumps({**json.loads(good), 'reason': 'edited by hand'}))
    with caplog.at_level(logging.WARNING, logger='fraud_mlops.serving'):
        with pytest.raises(Exception, match='signature'): client.portal.call(refresh, w)
        for _ in range(4):   # four more polls of the same bad pointer: its tag is known refused, it is not even read again
            assert client.portal.call(refresh, w) == (False, v)
    assert [r.levelname for r in caplog.records if r.name == 'fraud_mlops.serving'] == ['WARNING'], caplog.text
    r = client.get('/health/ready')
    assert r.status_code == 200 and r.json()['model_version'] == v and 'signature' in r.json()['reload_failure']['error']
    assert 'fraud_mlops_reload_failing 1.0' in client.get('/metrics').text.splitlines()
    pointer.write_bytes(good)   # the pointer back as it was: the tag of the version that serves
    assert client.portal.call(refresh, w) == (False, v)
    assert client.get('/health/ready').json() == {'status': 'ready', 'model_version': v, 'reload_failure': None}
    assert client.get('/model').json()['serving']['reload_failure'] is None
    assert 'fraud_mlops_reload_failing 0.0' in client.get('/metrics').text.splitlines()


def test_reload_answers_within_its_timeout_while_a_poll_is_stuck(served_champion, store, monkeypatch, model, data, save_as_champion):
    "A champion check hung on the store holds the reload lock; POST /reload still answers (503) within FRAUD_MLOPS_RELOAD_TIMEOUT."
    import threading, time
    import fraud_mlops.serving as serving
    monkeypatch.setenv('FRAUD_MLOPS_POLL_SECONDS', '0.1')
    monkeypatch.setenv('FRAUD_MLOPS_RELOAD_TIMEOUT', '0.5')
    gate, real, calls = threading.Event(), serving.next_model, []
    def hung(*args):
        calls.append(args); gate.wait(30); return real(*args)
    with TestClient(app) as c:
        monkeypatch.setattr(serving, 'next_model', hung)
        try:
            while not calls: time.sleep(0.02)   # a poll is now stuck on the store
            v2 = save_as_champion(store, model, *data)
            start = time.monotonic()
            r = c.post('/reload', headers=ADMIN)
            assert time.monotonic() - start < 2
            assert r.status_code == 503 and r.json()['detail'].startswith('reload not finished within 0.5 s (FRAUD_MLOPS_RELOAD_TIMEOUT)')
            assert f'still serving version {served_champion}' in r.json()['detail']
            assert c.post('/predict', json={'features': EXAMPLE_FEATURES}).json()['model_version'] == served_champion
        finally: gate.set()
        deadline = time.monotonic() + 20
        while c.get('/health/ready').json()['model_version'] != v2 and time.monotonic() < deadline: time.sleep(0.05)
        assert c.get('/health/ready').json()['model_version'] == v2   # the checks went on, and serve the new champion


# ---------------------------------------------------------------- what a worker says in its log

def test_one_line_when_a_worker_serves_swaps_or_refuses(store, monkeypatch, model, data, save_as_champion, caplog):
    "No champion: one warning, again only after a minute (polls in between say nothing); then one line to serve, one to swap, one to refuse."
    from fraud_mlops.observability import Repeats
    from fraud_mlops.serving import refresh
    from fraud_mlops.store import NoChampion
    monkeypatch.setenv('FRAUD_MLOPS_STORE', store.uri)
    monkeypatch.setenv('FRAUD_MLOPS_POLL_SECONDS', '0')
    with caplog.at_level(logging.INFO, logger='fraud_mlops'), TestClient(app) as c:
        w, now = c.app.state.worker, [0.0]
        w.repeats = Repeats(clock=lambda: now[0])
        w.failure = None   # the start's check counted as the first: start over with the fake clock
        for now[0] in (0, 10, 20, 30, 40, 50, 60, 70, 80):   # nine polls, ten seconds apart
            with pytest.raises(NoChampion): c.portal.call(refresh, w)
        v1 = save_as_champion(store, model, *data); c.portal.call(refresh, w); c.portal.call(refresh, w)
        v2 = save_as_champion(store, model, *data); c.portal.call(refresh, w)
        v3 = save_as_champion(store, model, *data)
        f = store.root / 'versions' / v3 / 'model.joblib'; f.write_bytes(f.read_bytes()[:-50])
        with pytest.raises(Exception, match='SHA-256'): c.portal.call(refresh, w)
        for _ in range(3): assert c.portal.call(refresh, w) == (False, v2)   # refused once: its pointer is not fetched again
    said = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == 'fraud_mlops.serving']
    none_yet = f'fraud-mlops is not ready: store {store.uri} has no champion yet: train a model and promote it'
    assert said[0] == ('WARNING', none_yet)   # the start's own check
    assert said[1:3] == [('WARNING', none_yet), ('WARNING', none_yet + ' (still so after 1 min; seen 7 times)')], said
    assert [level for level, _ in said[3:]] == ['INFO', 'INFO', 'WARNING'], said
    assert said[3][1] == f'fraud-mlops serves version {v1} (sklearn-pipeline runtime) from {store.uri}'
    assert said[4][1] == f'fraud-mlops swaps to version {v2} (sklearn-pipeline runtime) from version {v1}'
    assert said[5][1].startswith(f'fraud-mlops refuses version {v3}, still serving version {v2}: ') and 'SHA-256' in said[5][1]


def test_a_worker_started_on_a_champion_says_so_once(client, served_champion, store, caplog):
    "Starting on a champion: one line naming the version and store; a poll that finds nothing new says nothing."
    from fraud_mlops.serving import refresh
    with caplog.at_level(logging.INFO, logger='fraud_mlops'), TestClient(app) as c:
        c.portal.call(refresh, c.app.state.worker)
    said = [r.getMessage() for r in caplog.records if r.name == 'fraud_mlops.serving']
    assert said == [f'fraud-mlops serves version {served_champion} (sklearn-pipeline runtime) from {store.uri}'], said
