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


@pytest.fixture
def store(tmp_path):
    return open_store(tmp_path/'registry', create=True)


@pytest.fixture
def add_candidate(ci_df):
    "Train a small candidate on the CI subset into a store; return its version."
    def add(store, **params):
        params = {'n_estimators': 20, 'n_jobs': 1, **params}
        r = train_candidate(ci_df, **params)
        m = build_manifest(r, CI_SUBSET, 'ci', len(ci_df), int(ci_df.Class.sum()), params)
        return save_version(store, r.model, m, r.eval_X, r.eval_y)['version']
    return add
