"""`fraud-mlops score` as users run it: the API's answers for the same rows, every model kind, bad rows and bad files,
S3 input and output against a moto server, and the Dask engine (2 worker processes on loopback) giving the local
engine's output, on the CI subset and on the full data."""
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from fraud_mlops.data import FEATURES
from fraud_mlops.store import s3_client
from fraud_mlops.scoring import score_file, sidecar
from fraud_mlops.scoring_files import OUTPUT_COLUMNS


@pytest.fixture(autouse=True)
def runtime_cache(tmp_path_factory, monkeypatch):
    "Each test's own runtime cache (05c_runtime_cache), inherited by the commands it runs: never the user's."
    monkeypatch.setenv('FRAUD_MLOPS_CACHE_DIR', str(tmp_path_factory.mktemp('runtime-cache')))


@pytest.fixture(scope='module')
def inputs(ci_df, tmp_path_factory):
    "The CI subset with an id column, as CSV and as Parquet (small row groups, so Dask makes several partitions)."
    d = tmp_path_factory.mktemp('inputs')
    df = ci_df.copy(); df.insert(0, 'id', np.arange(len(df)) + 1_000_000)
    df.to_csv(d/'ci.csv', index=False); df.to_parquet(d/'ci.parquet', index=False, row_group_size=2_500)
    return df, d


def read(path):
    "An output file as a frame; CSV numbers parsed exactly (pandas' default float parser may be 1 ulp off)."
    return pd.read_csv(path, float_precision='round_trip') if str(path).endswith('.csv') else pd.read_parquet(path)


@pytest.mark.parametrize('kind,params', [('lgbm', {'n_estimators': 20}), ('hgb', {'max_iter': 20}), ('seed_rf', {'n_estimators': 10})])
def test_scores_are_the_apis_answers_for_the_same_rows(kind, params, cli, store, save_as_champion, inputs, tmp_path, monkeypatch):
    "Every model kind: the file's probabilities and verdicts are exactly what /predict/batch and /predict answer."
    from fastapi.testclient import TestClient
    from fraud_mlops.modelling import make_model
    from fraud_mlops.serving import app
    df, d = inputs
    X, y = df[FEATURES].to_numpy(), df.Class.to_numpy()
    v = save_as_champion(store, make_model(kind, **params).fit(X[:6_000], y[:6_000]), X, y)
    r = cli('score', d/'ci.csv', tmp_path/'out.csv', '--store', store.root, '--chunk-rows', '3000')
    assert r.returncode == 0 and r.stdout.startswith(f'scored 10,000 of 10,000 rows with model {v} (local'), r.stderr
    out = read(tmp_path/'out.csv')
    assert list(out.columns) == ['id', *OUTPUT_COLUMNS] and out.id.tolist() == df.id.tolist()
    assert set(out.model_version) == {v}
    monkeypatch.setenv('FRAUD_MLOPS_STORE', str(store.root))
    with TestClient(app) as c:
        api = c.post('/predict/batch', json={'instances': df[FEATURES].to_numpy().tolist()}).json()
        singles = [c.post('/predict', json={'features': df[FEATURES].iloc[i].tolist()}).json() for i in (0, 4_999, 9_999)]
    assert api['model_version'] == v
    assert out.fraud_probability.tolist() == [p['fraud_probability'] for p in api['predictions']]   # exactly, not nearly
    assert out.prediction.tolist() == [p['prediction'] for p in api['predictions']]
    assert [out.fraud_probability[i] for i in (0, 4_999, 9_999)] == [s['fraud_probability'] for s in singles]
    assert 0 < (out.prediction == 'fraud').sum() < len(out)                    # both verdicts occur: the threshold matters


def test_bad_rows_are_skipped_and_listed_or_fail_the_job_with_nothing_written(cli, champion, store, inputs, tmp_path):
    "Skip: the good rows are scored, the bad ones named on stderr and in the sidecar. Fail: exit 2, the row numbers, no file."
    df, _ = inputs
    bad = df.astype({'V9': object}); bad.loc[0, 'Time'] = np.nan; bad.loc[6_001, 'V9'] = 'n/a'; bad.loc[7_000, 'Amount'] = -np.inf
    bad.to_csv(tmp_path/'bad.csv', index=False)
    r = cli('score', tmp_path/'bad.csv', tmp_path/'out.parquet', '--store', store.root, '--chunk-rows', '2000')
    assert r.returncode == 0 and 'scored 9,997 of 10,000 rows' in r.stdout
    assert "3 bad row(s) skipped (row 1: Time is missing or not finite; row 6002: V9 is not a number ('n/a'); row 7001: Amount" in r.stderr
    assert pd.read_csv(sidecar(tmp_path/'out.parquet')).row.tolist() == [1, 6_002, 7_001]
    assert read(tmp_path/'out.parquet').id.tolist() == [i for k, i in enumerate(df.id) if k not in (0, 6_001, 7_000)]
    r = cli('score', tmp_path/'bad.csv', tmp_path/'fail.csv', '--store', store.root, '--on-error', 'fail')
    assert r.returncode == 2 and 'bad row(s), nothing written: row 1: Time is missing or not finite' in r.stderr
    assert 'Traceback' not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ['bad.csv', 'out.parquet', 'out.parquet.bad_rows.csv', 'registry']   # no fail.csv, no temp file


@pytest.mark.slow
def test_bad_files_and_a_missing_model_are_clear_errors(cli, store, add_champion, inputs, tmp_path):
    "Each refusal exits with one line saying what is wrong (2 for the input, 4 for the store), and leaves no output behind."
    _, d = inputs
    r = cli('score', d/'ci.csv', tmp_path/'o.csv', '--store', store.root)
    assert r.returncode == 4 and 'has no champion yet' in r.stderr          # the store's failure, not the input's
    add_champion(store)
    (tmp_path/'cols.csv').write_text('Time,V1,Amount\n1,2,3\n')
    (tmp_path/'ragged.csv').write_text(','.join(FEATURES) + '\n' + ','.join(['1'] * 30) + '\n' + ','.join(['1'] * 29) + '\n')
    (tmp_path/'text.parquet').write_text('PAR1 but not really')
    for src, message in [(tmp_path/'cols.csv', "wrong columns (missing: ['V2'"),
                         (tmp_path/'ragged.csv', 'not a readable CSV (line 3: 29 fields, the header has 30)'),
                         (tmp_path/'text.parquet', 'not a readable Parquet file'),
                         (tmp_path/'missing.csv', 'missing.csv: no such file'),
                         (tmp_path/'x.json', 'cannot tell the format')]:
        r = cli('score', src, tmp_path/'o.csv', '--store', store.root)
        assert r.returncode == 2 and message in r.stderr and 'Traceback' not in r.stderr, (src, r.stderr)
    r = cli('score', d/'ci.csv', tmp_path/'o.csv', '--store', store.root, '--version', '20200101T000000.000Z-000000')
    assert r.returncode == 4 and 'version 20200101T000000.000Z-000000 not found' in r.stderr
    assert not (tmp_path/'o.csv').exists() and not [p for p in tmp_path.iterdir() if p.name.startswith('.')]


@pytest.fixture
def s3_champion(s3_uri, add_champion):
    "(the store on the moto server, its champion's version)."
    from fraud_mlops.store import open_store
    store = open_store(s3_uri, create=True)
    return store, add_champion(store)


@pytest.mark.slow
def test_s3_input_and_output_through_a_moto_server(cli, s3_uri, s3_champion, inputs, tmp_path):
    "s3:// in and out (and the store on S3 too): the same answers as local files; a failed job uploads nothing."
    store, v = s3_champion
    df, d = inputs
    bucket = store.bucket
    s3 = s3_client()
    s3.upload_file(str(d/'ci.csv'), bucket, 'in/ci.csv')
    bad = df.copy(); bad.loc[42, 'V3'] = np.nan; bad.to_parquet(tmp_path/'bad.parquet', index=False)
    s3.upload_file(str(tmp_path/'bad.parquet'), bucket, 'in/bad.parquet')
    r = cli('score', f's3://{bucket}/in/ci.csv', f's3://{bucket}/out/ci.parquet', '--store', s3_uri)
    assert r.returncode == 0 and f'with model {v}' in r.stdout, r.stderr
    s3.download_file(bucket, 'out/ci.parquet', str(tmp_path/'s3.parquet'))
    assert score_file(d/'ci.csv', tmp_path/'local.parquet', s3_uri, progress=False)['model_version'] == v
    pd.testing.assert_frame_equal(read(tmp_path/'s3.parquet'), read(tmp_path/'local.parquet'))
    r = cli('score', f's3://{bucket}/in/bad.parquet', f's3://{bucket}/out/bad.csv', '--store', s3_uri)
    assert r.returncode == 0 and '1 bad row(s) skipped (row 43: V3 is missing or not finite)' in r.stderr
    listed = s3.get_object(Bucket=bucket, Key='out/bad.csv.bad_rows.csv')['Body'].read().decode()
    assert listed.splitlines()[1:] == ['43,"V3 is missing or not finite"']
    r = cli('score', f's3://{bucket}/in/bad.parquet', f's3://{bucket}/out/never.csv', '--store', s3_uri, '--on-error', 'fail')
    assert r.returncode == 2 and 'row 43' in r.stderr
    r = cli('score', f's3://{bucket}/in/nope.csv', f's3://{bucket}/out/nope.csv', '--store', s3_uri)
    assert r.returncode == 2 and f's3://{bucket}/in/nope.csv: no such object' in r.stderr
    keys = [o['Key'] for o in s3.list_objects_v2(Bucket=bucket, Prefix='out/')['Contents']]
    assert keys == ['out/bad.csv', 'out/bad.csv.bad_rows.csv', 'out/ci.parquet']
    r = cli('score', f's3://{bucket}/in/ci.csv', f's3://{bucket}/out/bad.csv', '--store', s3_uri)   # clean now: the old list goes
    assert r.returncode == 0 and [o['Key'] for o in s3.list_objects_v2(Bucket=bucket, Prefix='out/')['Contents']] == ['out/bad.csv', 'out/ci.parquet']


def test_log_records_every_scored_row_in_the_s3_stores_prediction_log(cli, s3_uri, s3_champion, inputs, tmp_path):
    "`score --log` with the store on S3: each good row logged once, its id as text, the output's probability, source score."
    from fraud_mlops.predlog import read_log
    store, v = s3_champion
    df, d = inputs
    bad = df.copy(); bad.loc[7, 'V3'] = np.nan; bad.to_csv(tmp_path/'bad.csv', index=False)
    r = cli('score', tmp_path/'bad.csv', tmp_path/'out.parquet', '--store', s3_uri, '--log', '--chunk-rows', '3000')
    assert r.returncode == 0 and 'scored 9,999 of 10,000 rows' in r.stdout, r.stderr
    logged = pd.concat([t.to_pandas() for t in read_log(store)]).sort_values('transaction_id', key=lambda s: s.astype(int))
    out = read(tmp_path/'out.parquet')
    assert logged.transaction_id.tolist() == [str(i) for i in out.id] and len(logged) == 9_999       # the bad row got no answer
    assert logged.fraud_probability.tolist() == out.fraud_probability.tolist()
    assert np.array_equal(logged[FEATURES].to_numpy(), bad.drop(index=7)[FEATURES].to_numpy())
    assert set(logged.source) == {'score'} and set(logged.model_version) == {v} and logged.request_id.nunique() == 4


def test_a_log_store_that_refuses_writes_does_not_fail_the_scoring_but_says_so(champion, store, inputs, tmp_path, monkeypatch, capsys):
    from fraud_mlops import scoring
    from fraud_mlops.store import LocalStore
    put_new = LocalStore.put_new
    def refuse(self, key, data):
        if key.startswith('predictions/'): raise OSError(28, 'No space left on device')
        return put_new(self, key, data)
    monkeypatch.setattr(LocalStore, 'put_new', refuse)
    monkeypatch.setattr(scoring, 'LOG_CLOSE_SECONDS', 0.3)
    s = score_file(inputs[1]/'ci.csv', tmp_path/'out.csv', store.root, rows=3_000, progress=False, log=True)
    assert s['scored'] == 10_000 and s['logged'] == 0 and (tmp_path/'out.csv').exists()
    assert 'prediction log: 10,000 of 10,000 scored rows not logged' in capsys.readouterr().err
    assert not store.keys('predictions')


# ---------------------------------------------------------------- the Dask engine: 2 worker processes on 127.0.0.1

@pytest.fixture(scope='module')
def cluster():
    "A LocalCluster of 2 single-threaded worker processes on loopback, shared by the Dask tests; yields its address."
    from distributed import LocalCluster
    with LocalCluster(n_workers=2, threads_per_worker=1, host='127.0.0.1', dashboard_address='127.0.0.1:0', processes=True) as c:
        yield c.scheduler_address


def same_output(a, b):
    "Both output files (and bad-row sidecars, if any) hold the same rows, values and columns."
    pd.testing.assert_frame_equal(read(a), read(b))
    assert Path(sidecar(a)).exists() == Path(sidecar(b)).exists()
    if Path(sidecar(a)).exists(): pd.testing.assert_frame_equal(pd.read_csv(sidecar(a)), pd.read_csv(sidecar(b)))


@pytest.mark.slow
def test_dask_engine_gives_the_local_engines_output(cli, cluster, champion, store, inputs, tmp_path):
    "CSV and Parquet, good and bad rows, on two workers: identical files, identical bad rows, the same refusal."
    df, d = inputs
    bad = df.astype({'V2': object}); bad.loc[3, 'V2'] = 'x'; bad.loc[9_000, 'V1'] = np.nan; bad.to_csv(tmp_path/'bad.csv', index=False)
    for src in (d/'ci.csv', d/'ci.parquet', tmp_path/'bad.csv'):
        for fmt in ('csv', 'parquet'):
            local = score_file(src, tmp_path/f'local.{fmt}', store.root, rows=2_000, progress=False, quiet=True)
            dist = score_file(src, tmp_path/f'dask.{fmt}', store.root, rows=2_000, engine='dask', scheduler=cluster,
                              progress=False, quiet=True)
            assert (dist['rows'], dist['bad_rows']) == (local['rows'], local['bad_rows']) == (10_000, 2 if src.name == 'bad.csv' else 0)
            same_output(tmp_path/f'dask.{fmt}', tmp_path/f'local.{fmt}')
    r = cli('score', tmp_path/'bad.csv', tmp_path/'none.csv', '--store', store.root, '--scheduler', cluster, '--on-error', 'fail')
    assert r.returncode == 2 and "row 4: V2 is not a number ('x')" in r.stderr and not (tmp_path/'none.csv').exists()


@pytest.mark.slow
def test_dask_engine_starts_its_own_cluster_and_reads_s3_parquet(cli, s3_uri, s3_champion, inputs, tmp_path):
    "`--engine dask` without an address starts a local cluster; its workers read s3:// Parquet from the moto server."
    store, v = s3_champion
    df, d = inputs
    s3_client().upload_file(str(d/'ci.parquet'), store.bucket, 'in/ci.parquet')
    r = cli('score', f's3://{store.bucket}/in/ci.parquet', tmp_path/'dask.parquet', '--store', s3_uri, '--engine', 'dask', '--chunk-rows', '2500')
    assert r.returncode == 0 and f'scored 10,000 of 10,000 rows with model {v} (dask' in r.stdout, r.stderr
    score_file(d/'ci.parquet', tmp_path/'local.parquet', s3_uri, progress=False)
    same_output(tmp_path/'dask.parquet', tmp_path/'local.parquet')


@pytest.mark.slow
@pytest.mark.network
def test_full_data_on_two_workers_equals_in_process(cluster, fetched, store, add_champion, tmp_path):
    "All 284,807 real rows, from Parquet in 12 row groups and from the CSV itself: the Dask engine's files are the local engine's."
    import pyarrow.csv as pcsv
    add_champion(store, n_estimators=60)
    pq.write_table(pcsv.read_csv(fetched), tmp_path/'full.parquet', row_group_size=25_000)
    for src in (tmp_path/'full.parquet', fetched):
        local = score_file(src, tmp_path/'local.parquet', store.root, rows=50_000, progress=False)
        dist = score_file(src, tmp_path/'dask.parquet', store.root, rows=50_000, engine='dask', scheduler=cluster, progress=False)
        assert local['rows'] == dist['rows'] == 284_807 and local['bad_rows'] == dist['bad_rows'] == 0
        same_output(tmp_path/'dask.parquet', tmp_path/'local.parquet')
