"""The API's side of the loop: every answer of /predict and /predict/batch lands in the prediction log with its ids, SIGTERM under
load loses no answered row, two workers never overwrite each other, a failing store never blocks or fails a request (rows are
kept within the bound, the rest dropped and counted in /metrics), and POST /labels writes labels or says why it did not."""
import sys, threading, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from fraud_mlops.data import FEATURES
from fraud_mlops.predlog import log_files, read_log
from fraud_mlops.store import open_store

BIN = Path(sys.executable).parent
FAST = {'FRAUD_MLOPS_POLL_SECONDS': '0', 'FRAUD_MLOPS_ACCESS_LOG': '0'}


@pytest.fixture(scope='module')
def rows(ci_df):
    return ci_df[FEATURES].to_numpy()


def metric(url, name):
    "The value of Prometheus sample `name` (with its labels, as exposed) at `url`/metrics."
    for line in httpx.get(f'{url}/metrics').text.splitlines():
        if line.startswith(name + ' '): return float(line.split()[-1])
    raise AssertionError(f'{name} not in /metrics')


def logged(store):
    "The whole prediction log of `store` as one DataFrame (small, in tests)."
    import pyarrow as pa
    tables = list(read_log(open_store(store)))
    return pa.concat_tables(tables).to_pandas() if tables else None


def test_every_answer_is_logged_with_its_ids_and_sigterm_under_load_loses_none(api_server, store, champion, rows):
    server = api_server({'FRAUD_MLOPS_STORE': str(store.root), 'FRAUD_MLOPS_LOG_FLUSH_SECONDS': '60', **FAST})  # only SIGTERM writes
    answered, lock, stop = {}, threading.Lock(), threading.Event()
    def client(k):
        with httpx.Client(base_url=server.url, timeout=10) as c:
            i = 0
            while not stop.is_set():
                i += 1; tid = f'c{k}-{i}'
                try:
                    if i % 3: r = c.post('/predict', json={'features': rows[i % len(rows)].tolist(), 'transaction_id': tid})
                    else: r = c.post('/predict/batch', json={'instances': rows[:4].tolist(), 'ids': [f'{tid}-{j}' for j in range(4)]})
                except httpx.TransportError: return  # the server has stopped listening
                if r.status_code == 200:
                    with lock: answered[tid] = (r.headers['x-request-id'], r.json())
    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads: t.start()
    time.sleep(1.5)
    server.proc.terminate()            # SIGTERM while the clients keep sending
    assert server.proc.wait(30) in (0, -15)  # uvicorn re-raises SIGTERM after its graceful shutdown
    stop.set()
    for t in threads: t.join(10)
    df = logged(store.root)
    assert len(answered) > 100, len(answered)
    expected = {tid for tid, (_, a) in answered.items() if 'prediction' in a} | {
        f'{tid}-{j}' for tid, (_, a) in answered.items() if 'predictions' in a for j in range(4)}
    assert set(df.transaction_id) == expected and len(df) == len(expected)  # every answered row, once; nothing else
    one = df.set_index('transaction_id').loc[next(t for t, (_, a) in answered.items() if 'prediction' in a)]
    rid, answer = answered[one.name]
    assert (one.request_id, one.model_version, one.fraud_probability, one.source) == (rid, champion, answer['fraud_probability'], 'predict')
    i = int(one.name.split('-')[1])
    assert np.array_equal(one[FEATURES].to_numpy(float), rows[i % len(rows)])
    assert set(df.source) == {'predict', 'batch'} and df.model_version.unique().tolist() == [champion]
    assert 'not written' not in server.log.read_text()


def test_the_seeds_requests_are_logged_without_ids(api_server, store, champion, example_request):
    server = api_server({'FRAUD_MLOPS_STORE': str(store.root), **FAST})
    assert httpx.post(f'{server.url}/predict', json=example_request).status_code == 200
    assert httpx.post(f'{server.url}/predict/batch', json={'instances': [example_request['features']] * 2}).status_code == 200
    server.stop()
    df = logged(store.root)
    assert len(df) == 3 and df.transaction_id.isna().all() and df.request_id.nunique() == 2


def test_two_workers_write_their_own_files_and_lose_nothing(api_server, store, champion, rows):
    server = api_server({'FRAUD_MLOPS_STORE': str(store.root), 'FRAUD_MLOPS_LOG_FLUSH_SECONDS': '0.2', **FAST},
                        cmd=[BIN / 'fraud-mlops', 'serve', '--port', '{port}', '--workers', '2'])
    def send(i):
        with httpx.Client(timeout=10) as c:  # a new connection each time, so both workers get some
            return c.post(f'{server.url}/predict', json={'features': rows[i].tolist(), 'transaction_id': f't{i}'}).status_code
    with ThreadPoolExecutor(8) as pool: statuses = list(pool.map(send, range(400)))
    assert statuses == [200] * 400
    server.stop()
    df = logged(store.root)
    assert sorted(df.transaction_id) == sorted(f't{i}' for i in range(400))
    writers = {key.rsplit('/', 1)[1].split('-', 1)[1].rsplit('-', 1)[0] for _, _, key in log_files(open_store(store.root))}
    assert len(writers) == 2, writers  # two writer names, each file written once (put_new): none overwrote another


def test_a_failing_store_never_fails_a_request_keeps_rows_within_the_bound_then_catches_up(api_server, store, champion, rows):
    (store.root / 'predictions').write_text('not a folder: every write of the log fails until this file goes')
    server = api_server({'FRAUD_MLOPS_STORE': str(store.root), 'FRAUD_MLOPS_LOG_FLUSH_SECONDS': '0.1',
                         'FRAUD_MLOPS_LOG_BUFFER_ROWS': '100', **FAST})
    with httpx.Client(base_url=server.url, timeout=10) as c:
        statuses = [c.post('/predict', json={'features': rows[i].tolist(), 'transaction_id': f'f{i}'}).status_code for i in range(250)]
    assert statuses == [200] * 250                                     # served while the log cannot write
    deadline = time.monotonic() + 10
    while metric(server.url, 'fraud_mlops_prediction_log_failed_writes_total') == 0: assert time.monotonic() < deadline; time.sleep(0.1)
    assert metric(server.url, 'fraud_mlops_prediction_log_pending') == 100       # the bound, kept
    assert metric(server.url, 'fraud_mlops_prediction_log_rows_total{state="dropped"}') == 150  # the rest, counted
    assert metric(server.url, 'fraud_mlops_prediction_log_rows_total{state="written"}') == 0
    (store.root / 'predictions').unlink()                                  # the store is back
    while metric(server.url, 'fraud_mlops_prediction_log_pending') > 0: assert time.monotonic() < deadline + 10; time.sleep(0.1)
    assert metric(server.url, 'fraud_mlops_prediction_log_rows_total{state="written"}') == 100
    server.stop()
    assert sorted(logged(store.root).transaction_id) == sorted(f'f{i}' for i in range(100))  # the first 100, in full
    assert server.log.read_text().count('cannot write to') == 1           # one warning, not one per retry


def test_the_log_can_be_turned_off(api_server, store, champion, example_request):
    server = api_server({'FRAUD_MLOPS_STORE': str(store.root), 'FRAUD_MLOPS_PREDICTION_LOG': '0', **FAST})
    assert httpx.post(f'{server.url}/predict', json=example_request).status_code == 200
    assert metric(server.url, 'fraud_mlops_prediction_log_enabled') == 0
    server.stop()
    assert log_files(open_store(store.root)) == []


def test_metrics_show_the_live_window(api_server, store, champion, rows):
    server = api_server({'FRAUD_MLOPS_STORE': str(store.root), 'FRAUD_MLOPS_LOG_FLUSH_SECONDS': '0.1', **FAST})
    sample = rows[np.random.default_rng(0).choice(len(rows), 2000, replace=False)]  # like the training rows, in any order
    assert httpx.post(f'{server.url}/predict/batch', json={'instances': sample.tolist()}).status_code == 200
    deadline = time.monotonic() + 10
    while metric(server.url, 'fraud_mlops_window_rows') < 2000: assert time.monotonic() < deadline; time.sleep(0.1)
    assert 0 <= metric(server.url, 'fraud_mlops_window_alert_rate') <= 1
    psi = {line.split('"')[1]: float(line.split()[-1]) for line in httpx.get(f'{server.url}/metrics').text.splitlines()
           if line.startswith('fraud_mlops_window_feature_psi{')}
    assert sorted(psi) == sorted(FEATURES) and max(psi.values()) < 0.2  # the training rows themselves: nothing has moved
    assert 0 <= metric(server.url, 'fraud_mlops_window_score_psi') < 10


def test_labels_over_http(api_server, store, champion, rows):
    env = {'FRAUD_MLOPS_STORE': str(store.root), **FAST}
    closed = api_server(env)
    body = {'labels': [{'transaction_id': 'a1', 'label': 1}]}
    r = httpx.post(f'{closed.url}/labels', json=body)
    assert (r.status_code, r.json()['detail']) == (403, 'admin routes (/reload, /labels) are disabled: set FRAUD_MLOPS_ADMIN_TOKEN')
    closed.stop()
    server = api_server({**env, 'FRAUD_MLOPS_ADMIN_TOKEN': 's3cret', 'FRAUD_MLOPS_MAX_BODY_BYTES': '100000'})
    ok = {'Authorization': 'Bearer s3cret'}
    assert httpx.post(f'{server.url}/labels', json=body, headers={'Authorization': 'Bearer wrong'}).status_code == 401
    for bad, says in [({'labels': [{'transaction_id': 'a1', 'label': 2}]}, 'labels[0].label'),
                      ({'labels': [{'transaction_id': 'a1', 'label': True}]}, 'labels[0].label'),
                      ({'labels': [{'transaction_id': '', 'label': 1}]}, 'labels[0].transaction_id'),
                      ({'labels': []}, 'labels'), ({'label': 1}, "no 'labels' key")]:
        r = httpx.post(f'{server.url}/labels', json=bad, headers=ok)
        assert r.status_code == 422 and says in r.json()['detail'], (bad, r.text)
    big = {'labels': [{'transaction_id': f'x{i}', 'label': 0} for i in range(5000)]}
    assert httpx.post(f'{server.url}/labels', json=big, headers=ok).status_code == 413
    assert not (store.root / 'labels').exists()                         # nothing written by any refusal
    httpx.post(f'{server.url}/predict', json={'features': rows[0].tolist(), 'transaction_id': 'a1'})
    time.sleep(0.1)
    r = httpx.post(f'{server.url}/labels', headers=ok, json={'labels': [{'transaction_id': 'a1', 'label': 1, 'label_time': '2026-12-02T10:00:00Z'},
                                                                        {'transaction_id': 'never-seen', 'label': 0}]})
    assert r.status_code == 200, r.text
    assert (r.json()['written'], r.json()['file'].startswith('labels/')) == (2, True)
    assert 'never-seen' in r.json()['unmatched_examples']
    (store.root / 'labels').rename(store.root / 'labels-aside'); (store.root / 'labels').write_text('a file where the folder was')
    r = httpx.post(f'{server.url}/labels', headers=ok, json=body)
    assert r.status_code == 503 and r.json()['detail'].startswith('labels not written'), r.text


def test_the_log_and_labels_on_s3(api_server, s3_uri, add_champion, rows, aws_env, moto_server):
    version = add_champion(open_store(s3_uri, create=True))
    server = api_server({'FRAUD_MLOPS_STORE': s3_uri, 'FRAUD_MLOPS_ADMIN_TOKEN': 't', **FAST})
    ids = [f's{i}' for i in range(20)]
    assert httpx.post(f'{server.url}/predict/batch', json={'instances': rows[:20].tolist(), 'ids': ids}).status_code == 200
    r = httpx.post(f'{server.url}/labels', headers={'Authorization': 'Bearer t'},
                   json={'labels': [{'transaction_id': i, 'label': 0} for i in ids[:5]]})
    assert r.status_code == 200 and r.json()['written'] == 5
    server.stop()
    df = logged(s3_uri)
    assert sorted(df.transaction_id) == sorted(ids) and set(df.model_version) == {version}
    assert len(open_store(s3_uri).keys('labels')) == 1
