"The training job with `engine='dask'` (papermill, LightGBM's Dask interface on 2 worker processes): an ordinary candidate."
import json

import numpy as np
import pytest

from fraud_mlops.registry import list_versions, load_evaluation, load_manifest, load_model
from fraud_mlops.store import open_store

pytestmark = pytest.mark.slow   # a training job and LocalClusters of worker processes


@pytest.fixture(scope='module')
def dask_run(tmp_path_factory, papermill_train):
    "Run the training notebook with engine dask on the CI subset; return (store, executed notebook)."
    tmp = tmp_path_factory.mktemp('dask-train')
    papermill_train(tmp/'out.ipynb', tmp/'store', model='lgbm', engine='dask', partition_rows=1500, compare_with='',
                    random_split_report=False, n_boot=300, folds=2, cv_folds=2)
    return open_store(tmp/'store'), tmp/'out.ipynb'


def test_the_dask_fit_is_an_ordinary_candidate_served_by_the_fast_path(dask_run):
    "One complete version; its pipeline is FraudFeatures + a plain LGBMClassifier, which serving scores with LightGBM's C path."
    from fraud_mlops.runtime import prepare_model
    store, _ = dask_run
    v, = list_versions(store)
    model, manifest = load_model(store, v)
    assert manifest['params']['engine'] == 'dask' and manifest['model_kind'] == 'lgbm'
    assert [type(s).__name__ for _, s in model.steps] == ['FraudFeatures', 'LGBMClassifier']
    served = prepare_model(model, manifest)
    assert served.runtime == 'lightgbm-quickscorer'
    X, y = load_evaluation(store, manifest)
    assert np.abs(served.predict(X) - model.predict_proba(X)[:, 1]).max() <= 1e-9


def test_quality_is_reported_beside_the_in_process_fit_and_within_its_noise(dask_run):
    "The manifest's comparison holds the in-process model on the same split; the Dask fit's AUPRC lies in its 95% interval."
    store, notebook = dask_run
    m = load_manifest(store, list_versions(store)[0])
    rows = {r['model']: r for r in m['comparison']}
    assert list(rows) == ['lgbm (candidate)', 'lgbm in-process']
    lo, hi = rows['lgbm in-process']['evidence_auprc_ci95']
    assert lo <= m['metrics']['test']['auprc'] <= hi
    text = ''.join(''.join(o.get('text', '')) for c in json.loads(notebook.read_text())['cells'] for o in c.get('outputs', []))
    assert 'Dask: 2 workers at tcp://127.0.0.1:' in text


def test_the_dask_candidate_is_promoted_like_any_other(dask_run, cli):
    store, _ = dask_run
    r = cli('promote', '--store', store.root, '--no-notify')
    assert r.returncode == 0 and r.stdout.startswith(f'promoted: {list_versions(store)[0]}'), r.stderr


def test_partitions_on_s3_through_a_moto_server(s3_uri, ci_df, monkeypatch):
    "With an s3:// partitions prefix the rows to fit are written to S3, the workers read them from there, and the fit removes them."
    from distributed import Client, LocalCluster
    import fraud_mlops.train as train
    from fraud_mlops.modelling import features_and_labels, make_model
    from fraud_mlops.store import parse_s3_uri, s3_client
    from fraud_mlops.cluster import arrow_filesystem
    bucket, _ = parse_s3_uri(s3_uri)
    parquet = lambda: [o['Key'] for o in s3_client().list_objects_v2(Bucket=bucket, Prefix='partitions/').get('Contents', [])
                       if o['Key'].endswith('.parquet')]
    written, remove = [], train.remove_partitions
    monkeypatch.setattr(train, 'remove_partitions', lambda *a, **k: written.extend(parquet()) or remove(*a, **k))   # what the fit read
    X, y = features_and_labels(ci_df)
    fs, folder = arrow_filesystem(f's3://{bucket}/partitions')
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address='127.0.0.1:0') as c, Client(c) as client:
        model = train.fit_model_dask(make_model('lgbm', n_estimators=20), X, y, 0.5, client=client, folder=folder, partition_rows=2_500,
                                     filesystem=fs)
    assert len(written) == 4 and all(k.startswith('partitions/fit-') for k in written), written
    assert parquet() == []                                  # removed once the fit is done
    p = model.predict_proba(X)[:, 1]
    assert p[y == 1].mean() > 0.5 > p[y == 0].mean()        # it learnt from the rows it read back from S3
