"The training job run the way users run it: papermill on nbs/03_train.ipynb, and the `fraud-mlops train` command."
import json, subprocess, sys
from pathlib import Path

import numpy as np

from fraud_mlops.data import CI_SUBSET, file_sha256, resolve_path, FEATURES
from fraud_mlops.registry import list_versions, load_evaluation, load_manifest, load_model, sha256_hex
from fraud_mlops.train import train_candidate

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def test_papermill_run_writes_a_complete_candidate(tmp_path):
    store = tmp_path/'s'
    out = tmp_path/'out.ipynb'
    subprocess.run([BIN/'papermill', ROOT/'nbs'/'03_train.ipynb', out, '-p', 'data_path', resolve_path(CI_SUBSET),
                    '-p', 'store', store, '-p', 'n_estimators', '30'], check=True, capture_output=True, cwd=tmp_path)
    from fraud_mlops.registry import open_store
    s = open_store(store)
    version, = list_versions(s)
    m = load_manifest(s, version)
    assert m['data']['sha256'] == file_sha256(resolve_path(CI_SUBSET))
    assert (m['data']['rows'], m['data']['frauds']) == (10_000, 492)
    assert m['params']['n_estimators'] == 30          # the papermill parameter reached the job
    assert m['features'] == FEATURES
    assert m['protocol']['threshold_policy'] == 'f1' and m['protocol']['threshold_chosen_on'] == 'validation'
    assert m['model_kind'] == 'lgbm' and m['model_params']['n_estimators'] == 30
    for k in ('precision', 'recall', 'f1', 'auprc'):
        lo, hi = m['intervals']['test'][k]
        assert lo <= m['metrics']['test'][k] <= hi
    assert [r['model'] for r in m['comparison']] == ['lgbm (candidate)', 'seed_rf (seed reference)', 'hgb']
    assert m['money']['alerts'] == m['metrics']['test']['tp'] + m['metrics']['test']['fp']
    split = m['split']
    assert split['train']['time_to'] < split['validation']['time_from'] <= split['validation']['time_to'] < split['test']['time_from']
    assert sum(p['rows'] for p in split.values()) == 10_000
    for key in ('precision', 'recall', 'f1', 'auprc', 'tp', 'fp', 'fn', 'tn'): assert key in m['metrics']['test']
    assert set(m['libraries']) >= {'python', 'scikit-learn', 'numpy', 'pandas', 'joblib'}
    assert m['model']['sha256'] == sha256_hex((store/'versions'/version/'model.joblib').read_bytes())
    model, _ = load_model(s, version)
    X, y = load_evaluation(s, m)
    assert len(y) == split['test']['rows'] == m['metrics']['test']['rows']
    p = model.predict_proba(X)[:, 1]
    tp = int(((p >= m['threshold']) & (y == 1)).sum())
    assert tp == m['metrics']['test']['tp']            # the stored numbers are reproducible from the stored rows
    nb = json.loads(out.read_text())
    outputs = json.dumps([c.get('outputs', []) for c in nb['cells']])
    assert 'image/png' in outputs                     # the report carries the precision-recall plot
    assert f'candidate {version} written to' in outputs


def test_bad_data_fails_the_job_clearly_and_writes_nothing(tmp_path):
    bad = tmp_path/'bad.csv'
    lines = resolve_path(CI_SUBSET).read_text().splitlines()[:200]
    fields = lines[50].split(','); fields[3] = 'oops'; lines[50] = ','.join(fields)   # V3 on line 51 of the file
    bad.write_text('\n'.join(lines) + '\n')
    store = tmp_path/'s'
    r = subprocess.run([BIN/'fraud-mlops', 'train', '--data', bad, '--store', store, '--output', tmp_path/'o.ipynb'],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert 'training failed: DataError' in r.stderr and 'column V3 is not numeric (line 51' in r.stderr
    assert not (store/'versions').exists()


def test_same_seed_same_metrics(ci_df):
    a = train_candidate(ci_df, n_estimators=20, n_jobs=2)
    b = train_candidate(ci_df, n_estimators=20, n_jobs=2)
    assert a.metrics == b.metrics and a.threshold == b.threshold
    np.testing.assert_array_equal(a.test_probability, b.test_probability)


def test_threshold_is_chosen_on_validation_not_test(ci_df, monkeypatch):
    import fraud_mlops.train as train
    seen = []
    real = train.choose_threshold
    monkeypatch.setattr(train, 'choose_threshold', lambda y, p, *a: seen.append(len(y)) or real(y, p, *a))
    r = train_candidate(ci_df, n_estimators=10, n_jobs=1)
    assert seen == [r.split['validation']['rows']]


def test_threshold_policies_shape_the_alerts(ci_df):
    f1 = train_candidate(ci_df, n_estimators=30, n_boot=0)
    strict = train_candidate(ci_df, n_estimators=30, n_boot=0, policy='precision', target_precision=0.99)
    assert strict.metrics['validation']['precision'] >= 0.99
    assert strict.threshold >= f1.threshold
    cheap = train_candidate(ci_df, n_estimators=30, n_boot=0, policy='cost', review_cost=0.01)
    dear = train_candidate(ci_df, n_estimators=30, n_boot=0, policy='cost', review_cost=500.0)
    assert cheap.money['alerts'] > dear.money['alerts']     # expensive reviews: fewer alerts


def test_refit_uses_train_and_validation_rows(ci_df, monkeypatch):
    import fraud_mlops.train as train
    sizes, real = [], train.make_model
    def recording(*a, **k):
        m = real(*a, **k); fit = m.fit
        m.fit = lambda X, y: sizes.append(len(y)) or fit(X, y)
        return m
    monkeypatch.setattr(train, 'make_model', recording)
    r = train_candidate(ci_df, n_estimators=10, n_boot=0)
    assert sizes == [r.split['train']['rows'], r.split['train']['rows'] + r.split['validation']['rows']]
    sizes.clear()
    no = train_candidate(ci_df, n_estimators=10, n_boot=0, refit=False)
    assert sizes == [r.split['train']['rows']]
    assert r.threshold == no.threshold                      # the threshold comes from the train-only fit
    assert not np.array_equal(r.test_probability, no.test_probability)
