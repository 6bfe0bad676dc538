"""The registry on S3: unit tests under moto's `mock_aws`, integration tests against a moto server over HTTP
(papermill training, promotion, rollback, two promoters racing, tampered bundles, the API serving from S3)."""
import io, json, os, socket, subprocess, sys, threading, time

import httpx
import joblib
import pytest
from sklearn.dummy import DummyClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from fraud_mlops.data import time_split
from fraud_mlops.modelling import features_and_labels
from fraud_mlops.promotion import promote, rollback
from fraud_mlops.registry import (decided_versions, list_decisions, list_versions, load_champion, load_manifest, model_statuses,
                                  read_champion, save_version)
from fraud_mlops.signing import new_key_pair, public_text, signed, signing_key
from fraud_mlops.store import IntegrityError, S3Store, StoreError, open_store, request_log

TOKEN = 'test-admin-token'


@pytest.fixture(scope='module')
def parts(ci_df):
    "(X_train, y_train, X_test, y_test) of the CI subset, split by time."
    (Xtr, ytr), _, (Xte, yte) = (features_and_labels(p) for p in time_split(ci_df, 0.2, 0.2))
    return Xtr, ytr, Xte, yte


@pytest.fixture(scope='module')
def weak(parts):
    "Never says fraud: F1 0 at threshold 0.5, so any real model beats it."
    return DummyClassifier(strategy='prior').fit(parts[0], parts[1])


@pytest.fixture(scope='module')
def good(parts):
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(parts[0], parts[1])


def bundle(store, model, parts, threshold=0.5):
    "Save `model` with the CI test rows as a new version; return its id."
    return save_version(store, model, {'threshold': threshold, 'metrics': {'test': {}}}, parts[2], parts[3])['version']


# ---------------------------------------------------------------- unit tests: moto's mock_aws, no network

def test_s3_store_lists_past_a_page_and_keeps_keys_under_its_prefix(mock_s3_uri):
    s = open_store(mock_s3_uri, create=True)
    for i in range(1005): s.client.put_object(Bucket=s.bucket, Key=f'registry/decisions/{i:05d}.json', Body=b'{}')
    s.client.put_object(Bucket=s.bucket, Key='registry-other/x', Body=b'')       # a sibling prefix is not ours
    keys = s.keys('decisions')
    assert len(keys) == 1005 and keys[0] == 'decisions/00000.json' and keys == sorted(keys)
    assert s.keys() == keys


def test_large_objects_are_uploaded_in_parts_and_read_back_whole(mock_s3_uri):
    from boto3.s3.transfer import TransferConfig
    s = open_store(mock_s3_uri, create=True)
    s.transfer_config = TransferConfig(multipart_threshold=5 * 2**20, multipart_chunksize=5 * 2**20, use_threads=False)
    log = request_log(s)
    data = os.urandom(11 * 2**20)
    s.put('versions/v/model.joblib', data)
    ops = [op for op, *_ in log]
    assert ops == ['CreateMultipartUpload', 'UploadPart', 'UploadPart', 'UploadPart', 'CompleteMultipartUpload']
    assert s.get('versions/v/model.joblib') == data


def test_a_version_is_invisible_until_its_manifest_is_written(mock_s3_uri, parts, good, monkeypatch):
    s = open_store(mock_s3_uri, create=True)
    def crash(self, key, data): raise StoreError('simulated crash before the manifest')
    monkeypatch.setattr(S3Store, 'put_new', crash)
    with pytest.raises(StoreError, match='simulated crash'): bundle(s, good, parts)
    assert len(s.keys('versions')) == 2 and list_versions(s) == []
    with pytest.raises(StoreError, match='no undecided candidate'): promote(s, notify=False)


def test_bucket_missing_prefix_typo_and_bad_names_are_clear_errors(mock_s3_uri, parts, good):
    for create in (False, True):
        with pytest.raises(StoreError, match=r'bucket missing-bucket does not exist \(store s3://missing-bucket/registry\)'):
            open_store('s3://missing-bucket/registry', create=create)
    bundle(open_store(mock_s3_uri, create=True), good, parts)
    assert open_store(mock_s3_uri).uri == mock_s3_uri
    with pytest.raises(StoreError, match='store s3://fraud-models/registyr does not exist: nothing is stored under it'):
        open_store('s3://fraud-models/registyr')
    with pytest.raises(StoreError, match="'fraud_models' is not a valid S3 bucket name"):
        open_store('s3://fraud_models/registry')


def test_a_pointer_to_a_missing_version_is_reported_and_rollback_repairs_it(mock_s3_uri, parts, weak, good):
    from fraud_mlops.serving import next_model
    s = open_store(mock_s3_uri, create=True)
    old = bundle(s, weak, parts); promote(s, notify=False)
    ghost = '20200101T000000.000Z-abcdef'
    s.put('champion.json', json.dumps(signed({'version': ghost, 'previous': old, 'sequence': 2})).encode())
    for load in (lambda: load_champion(s), lambda: next_model(mock_s3_uri)):
        with pytest.raises(StoreError, match=f'champion.json in store s3://fraud-models/registry names version {ghost}, which is not in the store'):
            load()
    bundle(s, good, parts)
    with pytest.raises(StoreError, match=f'version {ghost} not found'): promote(s, notify=False)
    assert read_champion(s)[0]['version'] == ghost and len(list_decisions(s)) == 1
    assert rollback(s, notify=False)['candidate'] == old
    assert load_champion(s)[1]['version'] == old


def test_a_truncated_or_corrupt_model_object_is_refused_and_changes_nothing(mock_s3_uri, parts, weak, good):
    s = open_store(mock_s3_uri, create=True)
    champ = bundle(s, weak, parts); promote(s, notify=False)
    cand = bundle(s, good, parts)
    key = f'versions/{cand}/model.joblib'; whole = s.get(key)
    for damaged in (whole[:len(whole) // 2], whole[:-1] + bytes([whole[-1] ^ 1])):
        s.put(key, damaged)
        with pytest.raises(IntegrityError, match=f"model.joblib of version {cand} does not match its manifest's SHA-256"):
            promote(s, notify=False)
    assert read_champion(s)[0]['version'] == champ and decided_versions(s) == {champ}
    s.put(key, whole); assert promote(s, notify=False)['decision'] == 'promoted'


def test_a_manifest_that_is_not_json_is_an_integrity_error(mock_s3_uri, parts, good):
    s = open_store(mock_s3_uri, create=True)
    v = bundle(s, good, parts)
    s.put(f'versions/{v}/manifest.json', b'{"version": "')
    for f in (lambda: load_manifest(s, v), lambda: promote(s, notify=False), lambda: model_statuses(s)):
        with pytest.raises(IntegrityError, match=f'manifest of version {v} is not valid JSON'): f()


def test_bundles_are_signed_by_default_and_unsigned_tampered_or_foreign_ones_never_unpickled(mock_s3_uri, parts, weak, good,
                                                                                          monkeypatch, tmp_path, plant_payload):
    s = open_store(mock_s3_uri, create=True)
    v = bundle(s, good, parts)
    assert load_manifest(s, v)['signature']['algorithm'] == 'Ed25519'          # no setting needed: signing is on by default
    u = bundle(s, weak, parts)                                                   # someone without the key writes a bundle
    m = json.loads(s.get(f'versions/{u}/manifest.json')); del m['signature']
    s.put(f'versions/{u}/manifest.json', json.dumps(m).encode())
    with pytest.raises(IntegrityError, match=f'manifest of version {u} is not signed: refusing it'): promote(s, u, notify=False)
    assert promote(s, v, notify=False)['decision'] == 'promoted'
    marker = tmp_path/'payload-ran'
    evil = plant_payload(s, v, marker)                                                  # the model swapped for a crafted pickle
    joblib.load(io.BytesIO(evil)); assert marker.exists(); marker.unlink()        # the payload is real: loading it runs it
    with pytest.raises(IntegrityError, match=f'manifest of version {v} does not match its signature by key'): load_champion(s)
    assert not marker.exists()                                                    # refused before anything was unpickled
    pem, pub = new_key_pair()
    monkeypatch.setenv('FRAUD_MLOPS_SIGNING_KEY', pem)                            # another environment's key
    foreign = bundle(s, good, parts)
    monkeypatch.delenv('FRAUD_MLOPS_SIGNING_KEY')                               # back on this machine, which does not trust that key
    with pytest.raises(IntegrityError, match='which is not trusted here'): load_manifest(s, foreign)
    assert {r['version']: r['signature'] for r in model_statuses(s)} == {v: 'invalid', u: 'unsigned', foreign: 'untrusted'}
    monkeypatch.setenv('FRAUD_MLOPS_PUBLIC_KEYS', f'{public_text(signing_key())},{pub}')   # a rotation: both keys trusted
    assert load_manifest(s, foreign)['version'] == foreign
    monkeypatch.setenv('FRAUD_MLOPS_INSECURE_ALLOW_UNSIGNED', '1')               # the loudly named opt-out loads anything
    assert load_manifest(s, u)['version'] == u


def test_no_credentials_is_a_clear_error(aws_env, free_port, tmp_path):
    aws_env(AWS_ENDPOINT_URL=f'http://127.0.0.1:{free_port()}', AWS_CONFIG_FILE=str(tmp_path/'none'),
            AWS_SHARED_CREDENTIALS_FILE=str(tmp_path/'none'))
    start = time.monotonic()
    with pytest.raises(StoreError, match='no AWS credentials for store s3://fraud-models/registry: set AWS_ACCESS_KEY_ID'):
        open_store('s3://fraud-models/registry')
    assert time.monotonic() - start < 5


def test_an_unreachable_endpoint_fails_fast_after_bounded_retries(aws_env, free_port):
    port = free_port()
    aws_env(AWS_ENDPOINT_URL=f'http://127.0.0.1:{port}', AWS_ACCESS_KEY_ID='x', AWS_SECRET_ACCESS_KEY='y', AWS_MAX_ATTEMPTS='3')
    start = time.monotonic()
    with pytest.raises(StoreError, match=rf'cannot reach S3 at http://127.0.0.1:{port} for store s3://fraud-models/registry '
                                         r'\(EndpointConnectionError, 3 attempts\): check AWS_ENDPOINT_URL'):
        open_store('s3://fraud-models/registry')
    assert time.monotonic() - start < 10


def test_a_silent_endpoint_times_out_after_the_configured_attempts(aws_env):
    "A server that accepts connections and never answers: each attempt waits the read timeout, then gives up."
    listener = socket.socket(); listener.bind(('127.0.0.1', 0)); listener.listen(8)
    held = []
    def accept():
        while True:
            try: held.append(listener.accept()[0])
            except OSError: return
    threading.Thread(target=accept, daemon=True).start()
    aws_env(AWS_ENDPOINT_URL=f'http://127.0.0.1:{listener.getsockname()[1]}', AWS_ACCESS_KEY_ID='x', AWS_SECRET_ACCESS_KEY='y',
            AWS_MAX_ATTEMPTS='2', FRAUD_MLOPS_S3_READ_TIMEOUT='0.3')
    start = time.monotonic()
    try:
        with pytest.raises(StoreError, match=r'cannot reach S3 .* \(ReadTimeoutError, 2 attempts\)'):
            open_store('s3://fraud-models/registry')
        assert time.monotonic() - start < 6 and len(held) == 2
    finally:
        listener.close()
        for c in held: c.close()


# ---------------------------------------------------------------- integration: a moto server over HTTP (its command-line flows are slow)

@pytest.mark.slow
def test_promote_and_rollback_through_the_cli_with_pruning(cli, s3_uri, parts, weak, good):
    store = open_store(s3_uri, create=True)
    a = bundle(store, weak, parts)
    r = cli('promote', '--store', s3_uri, '--no-notify'); assert r.returncode == 0 and r.stdout.startswith(f'promoted: {a}'), r.stderr
    b = bundle(store, good, parts)
    r = cli('promote', '--no-notify', '--dry-run', env={'FRAUD_MLOPS_STORE': s3_uri})
    assert r.returncode == 0 and f'promoted: {b}' in r.stdout and 'dry run: nothing changed' in r.stdout
    r = cli('promote', '--store', s3_uri, '--no-notify')
    assert r.returncode == 0 and 'P(candidate better) 1.000' in r.stdout, r.stdout
    c = bundle(store, weak, parts)
    r = cli('promote', '--store', s3_uri, '--no-notify', '--prune-rejected')
    assert r.returncode == 3 and r.stdout.startswith(f'rejected: {c}') and f'pruned 1 rejected version(s): {c}' in r.stdout
    assert store.keys(f'versions/{c}') == [] and c in decided_versions(store)
    rows = json.loads(cli('models', '--store', s3_uri, '--json').stdout)
    assert {x['version']: x['status'] for x in rows} == {a: 'retired', b: 'champion'}
    r = cli('rollback', '--store', s3_uri, '--no-notify'); assert r.returncode == 0 and f'rollback: {a}' in r.stdout
    assert read_champion(store)[0] == {**read_champion(store)[0], 'version': a, 'previous': b}
    hist = json.loads(cli('models', '--history', '--json', '--store', s3_uri).stdout)
    assert [(d['decision'], d['candidate']) for d in hist] == [('promoted', a), ('promoted', b), ('rejected', c), ('rollback', a)]
    assert all(d['by'] and d['time'] for d in hist)


@pytest.mark.slow
def test_bad_cases_on_the_command_line_over_http(cli, free_port, s3_uri, parts, good):
    "Each is the store's (or its infrastructure's) failure: exit 4 with one line naming it."
    r = cli('models', '--store', 's3://missing-bucket/registry')
    assert r.returncode == 4 and 'bucket missing-bucket does not exist' in r.stderr and 'Traceback' not in r.stderr
    store = open_store(s3_uri, create=True); v = bundle(store, good, parts)
    r = cli('models', '--store', s3_uri + 'x')
    assert r.returncode == 4 and 'nothing is stored under it' in r.stderr
    r = cli('rollback', '--store', s3_uri, '--to', v)
    assert r.returncode == 4 and 'has no champion to roll back' in r.stderr
    r = cli('models', '--store', s3_uri, env={'AWS_ACCESS_KEY_ID': None, 'AWS_SECRET_ACCESS_KEY': None,
                                              'AWS_SHARED_CREDENTIALS_FILE': '/nonexistent', 'AWS_CONFIG_FILE': '/nonexistent'})
    assert r.returncode == 4 and 'no AWS credentials' in r.stderr
    r = cli('models', '--store', s3_uri, env={'AWS_ENDPOINT_URL': f'http://127.0.0.1:{free_port()}'})
    assert r.returncode == 4 and 'cannot reach S3' in r.stderr
    store.put(f'versions/{v}/model.joblib', store.get(f'versions/{v}/model.joblib')[:100])
    r = cli('promote', '--store', s3_uri, '--no-notify')
    assert r.returncode == 4 and "does not match its manifest's SHA-256" in r.stderr
    store.put(f'versions/{v}/manifest.json', b'{"trunc')
    r = cli('promote', '--store', s3_uri, '--no-notify')
    assert r.returncode == 4 and 'not valid JSON' in r.stderr


RACER = r'''
import os, sys, time
import fraud_mlops.store as store
real = store.S3Store.put_if
def put_if(self, key, data, tag):
    "Wait until every racer has read the pointer and decided, then write at once."
    race = os.environ['RACE_DIR']
    open(os.path.join(race, str(os.getpid())), 'w').close()
    deadline = time.monotonic() + 60
    while len(os.listdir(race)) < int(os.environ['RACERS']) and time.monotonic() < deadline: time.sleep(0.001)
    return real(self, key, data, tag)
store.S3Store.put_if = put_if
from fraud_mlops.cli import main
main(sys.argv[1:])
'''


@pytest.mark.slow
def test_two_concurrent_promoters_exactly_one_wins_and_the_other_changes_nothing(cli, s3_uri, parts, weak, good, tmp_path):
    store = open_store(s3_uri, create=True)
    champ = bundle(store, weak, parts); promote(store, notify=False)
    a = bundle(store, good, parts)
    b = bundle(store, make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=1000)).fit(parts[0], parts[1]), parts)
    race = tmp_path/'race'; race.mkdir()
    procs = {v: subprocess.Popen([sys.executable, '-c', RACER, 'promote', '--store', s3_uri, '--version', v, '--no-notify'],
                                 env={**os.environ, 'RACE_DIR': str(race), 'RACERS': '2'},
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for v in (a, b)}
    out = {v: (p.communicate(timeout=120), p.returncode) for v, p in procs.items()}
    assert len(os.listdir(race)) == 2                                  # both read the same pointer and reached the write
    assert sorted(code for _, code in out.values()) == [0, 3], out
    winner = next(v for v, (_, code) in out.items() if code == 0)
    loser = b if winner == a else a
    (stdout, stderr), _ = out[loser]
    assert stderr.strip() == (f'store: {s3_uri}\nerror: champion.json in store {s3_uri} changed since it was read '
                              '(another promotion won); nothing was changed'), stderr
    assert out[winner][0][0].startswith(f'promoted: {winner}')
    pointer, _ = read_champion(store)
    assert (pointer['version'], pointer['previous']) == (winner, champ)
    assert [(d['decision'], d['candidate']) for d in list_decisions(store)] == [('promoted', champ), ('promoted', winner)]
    assert {r['version']: r['status'] for r in model_statuses(store)}[loser] == 'candidate'   # free to try again
    r = cli('promote', '--store', s3_uri, '--version', loser, '--no-notify')
    assert (r.returncode, r.stdout.split(':')[0]) in ((0, 'promoted'), (3, 'rejected'))


@pytest.mark.slow
def test_tampered_bundles_are_refused_by_promotion_and_by_the_api(cli, example_request, s3_uri, parts, weak, good, monkeypatch,
                                                                  tmp_path, plant_payload):
    from fastapi.testclient import TestClient
    from fraud_mlops.serving import app
    monkeypatch.setenv('FRAUD_MLOPS_STORE', s3_uri); monkeypatch.setenv('FRAUD_MLOPS_ADMIN_TOKEN', TOKEN)
    store = open_store(s3_uri, create=True)
    v = bundle(store, good, parts); assert cli('promote', '--no-notify').returncode == 0
    with TestClient(app) as c:
        assert c.post('/predict', json=example_request).json()['model_version'] == v
        assert c.get('/model').json()['signature']['algorithm'] == 'Ed25519'
    marker = tmp_path/'payload-ran'
    plant_payload(store, v, marker)         # an attacker swaps in a crafted pickle and fixes the SHA-256; the signature cannot follow
    with TestClient(app) as c:
        r = c.get('/health/ready')
        assert r.status_code == 503 and 'changed after signing' in r.json()['detail']
    bundle(store, good, parts)
    r = cli('promote', '--no-notify')
    assert r.returncode == 4 and f'manifest of version {v} does not match its signature' in r.stderr
    assert 'invalid' in cli('models').stdout
    assert not marker.exists()


def test_one_promotion_makes_fourteen_requests(s3_uri, parts, weak, good):
    store = open_store(s3_uri, create=True)
    champ = bundle(store, weak, parts); promote(store, notify=False)
    cand = bundle(store, good, parts)
    pointer, tag = read_champion(store)
    log = request_log(store)
    start = time.perf_counter(); d = promote(store, notify=False); seconds = time.perf_counter() - start
    assert d['decision'] == 'promoted'
    c, k = f'versions/{cand}/', f'versions/{champ}/'
    assert log == [('GetObject', 'champion.json', {}), ('ListObjectsV2', 'decisions/', {}), ('ListObjectsV2', 'versions/', {}),
                   ('GetObject', c + 'manifest.json', {}), ('GetObject', c + 'model.joblib', {}), ('GetObject', c + 'eval.npz', {}),
                   ('GetObject', k + 'manifest.json', {}), ('GetObject', k + 'model.joblib', {}), ('GetObject', k + 'eval.npz', {}),
                   ('GetObject', c + 'manifest.json', {}), ('HeadObject', pointer['decision_log'], {}),
                   ('PutObject', 'champion.json', {'IfMatch': tag}), ('PutObject', d['log'], {'IfNoneMatch': '*'}),
                   ('GetObject', 'shadow.json', {})]            # a promoted version running in shadow would end its shadow run
    print(f'one promotion against the moto server: {len(log)} requests, {seconds * 1000:.0f} ms')


def test_an_unchanged_pointer_costs_a_bodiless_304_and_a_moved_one_is_read(s3_uri, parts, weak, good):
    "What a serving worker's poll asks S3: a conditional GET; unchanged gives no body, a promotion gives the new pointer."
    from fraud_mlops.serving import next_model
    store = open_store(s3_uri, create=True)
    first = bundle(store, weak, parts); promote(store, notify=False)
    served, tag = next_model(s3_uri)
    assert served.version == first
    log = request_log(store)
    assert read_champion(store, unless=tag) == (None, tag)                      # unchanged: the 304, no pointer
    assert log == [('GetObject', 'champion.json', {'IfNoneMatch': tag})]
    assert next_model(s3_uri, first, tag) == (None, tag)
    bundle(store, good, parts); promote(store, notify=False)
    pointer, new_tag = read_champion(store, unless=tag)
    assert new_tag != tag and pointer['previous'] == first                      # moved: read in the same request
    served, seen = next_model(s3_uri, first, tag)
    assert served.version == pointer['version'] and seen == new_tag


@pytest.mark.slow
def test_train_with_papermill_into_s3_then_promote_serve_reload_and_roll_back(papermill_train, cli, api_server, example_request,
                                                                              s3_uri, parts, weak, tmp_path):
    store = open_store(s3_uri, create=True)
    first = bundle(store, weak, parts)
    assert cli('promote', '--store', s3_uri, '--no-notify').returncode == 0
    url = api_server({'FRAUD_MLOPS_STORE': s3_uri, 'FRAUD_MLOPS_ADMIN_TOKEN': TOKEN}).url
    assert httpx.post(f'{url}/predict', json=example_request, timeout=5).json()['model_version'] == first
    papermill_train(tmp_path/'out.ipynb', s3_uri, n_estimators=30, compare_with='')
    trained, = set(list_versions(store)) - {first}
    assert store.keys(f'versions/{trained}') == [f'versions/{trained}/{f}' for f in ('eval.npz', 'manifest.json', 'model.joblib', 'reference.json')]
    assert load_manifest(store, trained)['data']['rows'] == 10_000
    notify = {'API_URL': url, 'FRAUD_MLOPS_ADMIN_TOKEN': TOKEN}
    r = cli('promote', '--store', s3_uri, env=notify)
    assert r.returncode == 0 and r.stdout.startswith(f'promoted: {trained}') and f'notified {url}: 200' in r.stdout, r.stdout + r.stderr
    answer = httpx.post(f'{url}/predict', json=example_request, timeout=5).json()
    assert answer['model_version'] == trained and answer['prediction'] == 'legit'
    r = cli('rollback', '--store', s3_uri, env=notify)
    assert r.returncode == 0 and f'rollback: {first}' in r.stdout and f'notified {url}: 200' in r.stdout
    assert httpx.post(f'{url}/predict', json=example_request, timeout=5).json()['model_version'] == first
    assert [d['decision'] for d in list_decisions(store)] == ['promoted', 'promoted', 'rollback']
