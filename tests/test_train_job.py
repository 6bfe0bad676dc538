"The training job run the way users run it: papermill on nbs/03_train.ipynb, and the `fraud-mlops train` command."
import json

import numpy as np
import pytest

from fraud_mlops.data import CI_SUBSET, file_sha256, resolve_path, FEATURES
from fraud_mlops.registry import list_versions, load_manifest
from fraud_mlops.store import sha256_hex
from fraud_mlops.train import train_candidate


@pytest.mark.slow
def test_papermill_run_writes_a_complete_candidate(papermill_train, tmp_path):
    store = tmp_path/'s'
    out = tmp_path/'out.ipynb'
    papermill_train(out, store, n_estimators=30)
    from fraud_mlops.store import open_store
    s = open_store(store)
    version, = list_versions(s)
    m = load_manifest(s, version)
    assert m['data']['sha256'] == file_sha256(resolve_path(CI_SUBSET))
    assert (m['data']['rows'], m['data']['frauds']) == (10_000, 492)
    assert m['params']['n_estimators'] == 30          # the papermill parameter reached the job
    assert m['features'] == FEATURES
    assert m['protocol']['name'] == 'rolling' and m['protocol']['threshold_policy'] == 'f1' and m['decision_rule']['policy'] == 'f1'
    assert m['model_kind'] == 'lgbm_rf' and m['model_params']['n_estimators'] == 30
    for k in ('precision', 'recall', 'f1', 'auprc'):
        lo, hi = m['intervals']['test'][k]
        assert lo <= m['metrics']['test'][k] <= hi
    assert [r['model'] for r in m['comparison']] == ['lgbm_rf (candidate)', "seed_rf (seed's recipe)", 'lgbm']
    assert all(isinstance(r['auprc'], float) and isinstance(r['f1'], float) for r in m['comparison'])   # numbers, not display text
    assert m['money']['alerts'] == m['metrics']['test']['tp'] + m['metrics']['test']['fp']
    folds = m['rolling']['folds']
    assert [f['fold'] for f in folds] == [1, 2, 3, 4] and m['rolling']['evidence_fold'] == 4
    assert all(f['time_to'] < g['time_from'] for f, g in zip(folds, folds[1:]))          # windows follow each other in time
    assert all(f['hindsight_f1'] >= f['f1'] for f in folds) and set(m['rolling']['rule_loss']) == {'f1', 'f1_max', 'holdout'}
    assert abs(m['rolling']['mean']['f1'] - np.mean([f['f1'] for f in folds])) < 1e-12
    assert m['split']['fit (served model)']['rows'] == 10_000                           # the served model fitted every row
    for key in ('precision', 'recall', 'f1', 'auprc', 'tp', 'fp', 'fn', 'tn'): assert key in m['metrics']['test']
    assert set(m['libraries']) >= {'python', 'scikit-learn', 'numpy', 'pandas', 'joblib'}
    assert m['model']['sha256'] == sha256_hex((store/'versions'/version/'model.joblib').read_bytes())
    from fraud_mlops.registry import load_evidence
    ev = load_evidence(s, m)
    assert len(ev['y']) == folds[-1]['rows'] == m['metrics']['test']['rows']
    tp = int(((ev['p'] >= m['evidence_threshold']) & (ev['y'] == 1)).sum())
    assert tp == m['metrics']['test']['tp']            # the stored numbers are reproducible from the stored rows
    nb = json.loads(out.read_text())
    outputs = json.dumps([c.get('outputs', []) for c in nb['cells']])
    assert 'image/png' in outputs                     # the report carries the precision-recall plot
    assert f'candidate {version} written to' in outputs


def test_bad_data_fails_the_job_clearly_and_writes_nothing(cli, tmp_path):
    bad = tmp_path/'bad.csv'
    lines = resolve_path(CI_SUBSET).read_text().splitlines()[:200]
    fields = lines[50].split(','); fields[3] = 'oops'; lines[50] = ','.join(fields)   # V3 on line 51 of the file
    bad.write_text('\n'.join(lines) + '\n')
    store = tmp_path/'s'
    r = cli('train', '--data', bad, '--store', store, '--output', tmp_path/'o.ipynb')
    assert r.returncode == 2
    assert 'training failed: DataError' in r.stderr and 'column V3 is not numeric (line 51' in r.stderr
    assert not (store/'versions').exists() and not (tmp_path/'o.json').exists()


@pytest.mark.slow
def test_fraud_mlops_train_reads_the_jobs_result_file_not_its_printout(cli, tmp_path):
    "The command learns the version from the JSON result the job writes beside its report, and says where both are."
    store, out = tmp_path/'s', tmp_path/'runs'/'o.ipynb'
    r = cli('train', '--data', resolve_path(CI_SUBSET), '--store', store, '--output', out, '-p', 'n_estimators', '20',
            '-p', 'compare_with', '', '-p', 'random_split_report', 'False', '-p', 'n_boot', '100', '-p', 'folds', '2')
    assert r.returncode == 0, r.stderr
    from fraud_mlops.store import open_store
    version, = list_versions(open_store(store))
    result = json.loads(out.with_suffix('.json').read_text())
    assert result == {'version': version, 'store': str(store), 'manifest': f'versions/{version}/manifest.json'}
    assert r.stdout.splitlines()[-2:] == [f'candidate {version} (executed notebook {out})',     # its last lines: the version
                                          f'report {store}/versions/{version}/report.html']    # and its report


@pytest.mark.slow
def test_same_seed_same_metrics(ci_df):
    a = train_candidate(ci_df, n_estimators=20, n_jobs=2)
    b = train_candidate(ci_df, n_estimators=20, n_jobs=2)
    assert a.metrics == b.metrics and a.threshold == b.threshold
    np.testing.assert_array_equal(a.evidence['p'], b.evidence['p'])


def test_threshold_is_chosen_on_validation_not_test(ci_df, monkeypatch):
    import fraud_mlops.train as train
    seen = []
    real = train.choose_threshold
    monkeypatch.setattr(train, 'choose_threshold', lambda y, p, *a, **k: seen.append(len(y)) or real(y, p, *a, **k))
    r = train_candidate(ci_df, n_estimators=10, n_jobs=1, protocol='holdout')
    assert seen == [r.split['validation']['rows']]


def test_rolling_threshold_is_chosen_on_out_of_fold_predictions_of_all_rows(ci_df, monkeypatch):
    "Under the default protocol the served threshold comes from predictions of every row by models that did not fit it."
    import fraud_mlops.train as train
    seen = []
    real = train.choose_threshold
    monkeypatch.setattr(train, 'choose_threshold', lambda y, p, *a, **k: seen.append(len(y)) or real(y, p, *a, **k))
    r = train_candidate(ci_df, n_estimators=10, folds=2, cv_folds=3, n_boot=0, compare_rules=False)
    assert seen[-1] == len(ci_df) and r.threshold == real(r.choice['y'], r.choice['p'], 'f1')
    assert all(n < len(ci_df) for n in seen[:-1])                  # the folds chose on their own training rows only


@pytest.mark.slow
def test_threshold_policies_shape_the_alerts(ci_df):
    quick = dict(n_estimators=30, n_boot=0, folds=2, cv_folds=3, compare_rules=False)
    f1 = train_candidate(ci_df, **quick)
    strict = train_candidate(ci_df, **quick, policy='precision', target_precision=0.99)
    assert strict.threshold >= f1.threshold
    p = strict.choice['p'] >= strict.threshold
    assert (p & (strict.choice['y'] == 1)).sum() / p.sum() >= 0.99     # reached on the rows it was chosen on
    cheap = train_candidate(ci_df, **quick, policy='cost', review_cost=0.01)
    dear = train_candidate(ci_df, **quick, policy='cost', review_cost=500.0)
    assert cheap.money['alerts'] > dear.money['alerts']     # expensive reviews: fewer alerts
    budget = train_candidate(ci_df, **quick, policy='budget', alerts_per_day=200)
    days = np.ptp(ci_df.Time) / 86_400
    assert (budget.choice['p'] >= budget.threshold).sum() <= round(200 * days)   # the budget is never overspent where it was set


def test_refit_uses_train_and_validation_rows(ci_df, monkeypatch):
    import fraud_mlops.train as train
    sizes, real = [], train.make_model
    def recording(*a, **k):
        m = real(*a, **k); fit = m.fit
        m.fit = lambda X, y: sizes.append(len(y)) or fit(X, y)
        return m
    monkeypatch.setattr(train, 'make_model', recording)
    r = train_candidate(ci_df, n_estimators=10, n_boot=0, protocol='holdout', legit_fraction=1.0)
    assert sizes == [r.split['train']['rows'], r.split['train']['rows'] + r.split['validation']['rows']]
    sizes.clear()
    no = train_candidate(ci_df, n_estimators=10, n_boot=0, refit=False, protocol='holdout', legit_fraction=1.0)
    assert sizes == [r.split['train']['rows']]
    assert r.threshold == no.threshold                      # the threshold comes from the train-only fit
    assert not np.array_equal(r.evidence['p'], no.evidence['p'])
