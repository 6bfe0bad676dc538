"""monitor on real logs: the prediction log written through `PredictionLog`, labels through `add_labels`, versions through the
registry; its numbers against a direct pandas/scikit-learn computation on the same rows, drift flagged only where a feature was
shifted, the latest label winning, `--fail-on` conditions, Dask giving the same summary, and memory flat in the log's size; champion
against a shadow per day and the reasons behind alerts (logged or computed, a kind without a method noted)."""
import tracemalloc

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, f1_score, precision_score, recall_score

from fraud_mlops.data import FEATURES, TARGET, DataError
from fraud_mlops.drift import PSI_ALERT, training_reference
from fraud_mlops.labels import add_labels
from fraud_mlops.monitor import QUALITY, check_conditions, format_monitor, monitor
from fraud_mlops.predlog import PredictionLog, log_files
from fraud_mlops.promotion import paired_bootstrap
from fraud_mlops.reasons import explainer
from fraud_mlops.registry import load_model, save_version
from fraud_mlops.runtime import prepare_model
from fraud_mlops.store import open_store

START = pd.Timestamp('2026-03-01', tz='UTC')
THRESHOLD = 0.5


@pytest.fixture(scope='module')
def fitted(ci_df):
    "(X, y, p, reference, model): a small LightGBM on a random half of the CI subset, its scores of every row, its reference."
    from fraud_mlops.modelling import make_model
    X, y = ci_df[FEATURES].to_numpy(), ci_df[TARGET].to_numpy()
    train = np.random.default_rng(0).random(len(X)) < 0.5
    model = make_model('lgbm', n_estimators=30).fit(X[train], y[train])
    p = model.predict_proba(X)[:, 1]
    return X, y, p, training_reference(X[train], p[train]), model, train


def new_version(store, fitted, reference=True):
    X, y, p, ref, model, _ = fitted
    return save_version(store, model, {'threshold': THRESHOLD}, X[:50], y[:50], reference=ref if reference else None)['version']


def record(store, version, X, p, ids, hours, rows_per_file=None, shadow=None, reasons=None):
    """Log rows `X` (answered `p`, ids `ids`) through a PredictionLog, each at START + `hours` (rounded to the hour), a file per hour or per
    `rows_per_file`; `shadow` (a ServedModel) scored beside them by the log's writer, and `reasons(X)` logged with them, when given."""
    log = PredictionLog(store, flush_rows=10**9, flush_seconds=10**9)
    hours = np.asarray(hours, dtype='int64')
    for h in np.unique(hours):
        at = np.flatnonzero(hours == h)
        for part in np.array_split(at, max(1, len(at) // rows_per_file) if rows_per_file else 1):
            log.record_many((START + pd.Timedelta(hours=int(h))).timestamp(), f'r{h}', [str(i) for i in ids[part]], version,
                            p[part], p[part] >= THRESHOLD, X[part], shadow=shadow, reasons=reasons and reasons(X[part]))
            log.flush()
    log.close()
    assert log.written == len(X) and not log.dropped


def labels(ids, y, hours, after_hours=30.0):
    return pd.DataFrame({'transaction_id': [str(i) for i in ids], 'label': np.asarray(y, dtype='int8'),
                         'label_time': (START + pd.to_timedelta(np.asarray(hours) + after_hours, unit='h')).as_unit('us')})


@pytest.fixture(scope='module')
def served(tmp_path_factory, fitted):
    """A store with two versions answering the held-out half of the CI subset over three days (version b on days 2-3 only),
    three quarters of the rows labelled (delays 30 h and 70 h); returns (store, frame of what was logged and labelled, a, b)."""
    X, y, p, _, _, train = fitted
    store = open_store(tmp_path_factory.mktemp('monitor')/'registry', create=True)
    a, b = new_version(store, fitted), new_version(store, fitted)
    rng = np.random.default_rng(1)
    rows = np.flatnonzero(~train)
    hours = rng.integers(0, 72, len(rows))
    version = np.where((hours >= 24) & (rng.random(len(rows)) < 0.5), b, a)
    ids = np.array([f'tx-{i}' for i in rows], dtype=object)
    for v in (a, b):
        m = version == v
        record(store, v, X[rows[m]], p[rows[m]], ids[m], hours[m])
    labelled = rng.random(len(rows)) < 0.75
    delay = np.where(rng.random(len(rows)) < 0.5, 30.0, 70.0)
    for d in (30.0, 70.0):
        m = labelled & (delay == d)
        add_labels(store, labels(ids[m], y[rows[m]], hours[m], d), 'test')
    frame = pd.DataFrame({'version': version, 'date': (START + pd.to_timedelta(hours, unit='h')).strftime('%Y-%m-%d'), 'p': p[rows],
                          'fraud': p[rows] >= THRESHOLD, 'y': y[rows], 'labelled': labelled, 'delay': delay})
    return store, frame, a, b


def expected(g):
    "The numbers of rows `g` computed directly."
    k = g[g.labelled]
    return {'rows': len(g), 'alerts': int(g.fraud.sum()), 'labelled': len(k), 'coverage': len(k) / len(g),
            'precision': precision_score(k.y, k.fraud), 'recall': recall_score(k.y, k.fraud), 'f1': f1_score(k.y, k.fraud),
            'auprc': average_precision_score(k.y, k.p)}


def check(row, g):
    want = expected(g)
    assert {k: row[k] for k in ('rows', 'alerts', 'labelled')} == {k: want[k] for k in ('rows', 'alerts', 'labelled')}
    for k in ('coverage', 'precision', 'recall', 'f1'): assert row[k] == pytest.approx(want[k], abs=1e-12), k
    assert row['auprc'] == pytest.approx(want['auprc'], abs=2e-3)                # exact up to ties within a 1e-4 cell
    for k in QUALITY: assert row['intervals'][k][0] <= row[k] <= row['intervals'][k][1], (k, row[k], row['intervals'][k])


def test_monitor_matches_a_direct_computation_per_version_and_per_day(served):
    store, frame, a, b = served
    s = monitor(store)
    assert s['rows'] == len(frame) and [v['version'] for v in s['versions']] == sorted([a, b])
    assert s['labels'] == {'total': int(frame.labelled.sum()), 'matched': int(frame.labelled.sum()), 'unmatched': 0}
    for v in s['versions']: check(v, frame[frame.version == v['version']])
    assert [(d['date'], d['version']) for d in s['days']] == sorted(set(zip(frame.date, frame.version)))
    for d in s['days']:
        g = frame[(frame.date == d['date']) & (frame.version == d['version'])]
        check(d, g)
        # the median label delay is read from ~6% wide cells: approximate
        assert d['median_label_delay_hours'] == pytest.approx(np.median(g.delay[g.labelled] + 0.0), rel=0.25)
    assert s['notes'] == []


def test_an_approximate_median_delay_is_within_its_cell(served):
    store, frame, a, _ = served
    d = [d for d in monitor(store, n_boot=0)['days'] if d['version'] == a][0]
    g = frame[(frame.version == a) & (frame.date == d['date']) & frame.labelled]
    true = float(np.median(g.delay))   # hours from the hour answered; every delay is 30 or 70 hours
    assert d['median_label_delay_hours'] == pytest.approx(true, rel=0.07)


def test_a_window_keeps_only_its_rows_and_dates(served):
    store, frame, a, b = served
    s = monitor(store, since='2026-03-02', until='2026-03-03', n_boot=0)
    assert s['since'].startswith('2026-03-02T00:00:00') and s['rows'] == int((frame.date == '2026-03-02').sum())
    assert {d['date'] for d in s['days']} == {'2026-03-02'}
    with pytest.raises(DataError, match="since 'monday' is not an ISO date or time"): monitor(store, since='monday')


def test_a_shifted_feature_is_flagged_and_an_unshifted_one_is_not(tmp_path, fitted):
    X, y, p, _, _, train = fitted
    store = open_store(tmp_path/'registry', create=True)
    plain, shifted = new_version(store, fitted), new_version(store, fitted)
    rows = np.flatnonzero(~train)
    moved = X[rows].copy(); moved[:, FEATURES.index('V14')] += 2 * X[:, FEATURES.index('V14')].std()
    ids = np.arange(len(rows))
    record(store, plain, X[rows], p[rows], ids, np.zeros(len(rows)))
    record(store, shifted, moved, p[rows], ids + 10**6, np.zeros(len(rows)))
    s = monitor(store, n_boot=0)
    drift = {v['version']: {r['feature']: r['psi'] for r in v['drift']} for v in s['versions']}
    assert drift[shifted]['V14'] > PSI_ALERT and drift[plain]['V14'] < 0.1
    assert max(drift[plain].values()) < 0.1                                           # a random half against the other
    assert s['top_drifting'] == ['V14'] and s['features'][0] == {**s['features'][0], 'feature': 'V14', 'version': shifted}
    assert check_conditions(s, 'psi>0.2') == [{'condition': 'psi>0.2', 'metric': 'psi', 'value': drift[shifted]['V14'],
                                               'version': shifted, 'feature': 'V14', 'count': 1}]
    assert s['labels'] == {'total': 0, 'matched': 0, 'unmatched': 0}
    assert all(v['precision'] is None and v['coverage'] == 0 for v in s['versions'])  # nothing labelled: no quality, no crash


def test_the_latest_label_wins_and_unmatched_labels_are_counted(tmp_path, fitted):
    X, y, p, _, _, _ = fitted
    store = open_store(tmp_path/'registry', create=True)
    v = new_version(store, fitted)
    n = 2000
    ids = np.arange(n)
    record(store, v, X[:n], p[:n], ids, np.zeros(n))
    add_labels(store, labels(ids, y[:n], np.zeros(n)), 'first')
    flipped = 1 - y[:500]
    add_labels(store, labels(ids[:500], flipped, np.zeros(500), after_hours=40), 'relabel')       # later label_time: wins
    add_labels(store, labels(ids[500:600], 1 - y[500:600], np.zeros(100), after_hours=20), 'late')   # earlier label_time: loses
    add_labels(store, labels(np.arange(10**6, 10**6 + 7), np.zeros(7), np.zeros(7)), 'never served')
    s = monitor(store, n_boot=20)
    truth = np.r_[flipped, y[500:n]]
    row = s['versions'][0]
    assert row['recall'] == pytest.approx(recall_score(truth, p[:n] >= THRESHOLD), abs=1e-12)
    assert row['precision'] == pytest.approx(precision_score(truth, p[:n] >= THRESHOLD), abs=1e-12)
    assert s['labels'] == {'total': n + 7, 'matched': n, 'unmatched': 7} and row['labelled'] == n


def test_drift_is_null_with_a_note_for_a_version_without_reference_or_not_in_the_store(tmp_path, fitted):
    X, y, p, _, _, _ = fitted
    store = open_store(tmp_path/'registry', create=True)
    old = new_version(store, fitted, reference=False)
    record(store, old, X[:300], p[:300], np.arange(300), np.zeros(300))
    record(store, '20250101T000000.000Z-000000', X[:300], p[:300], np.arange(300, 600), np.zeros(300))
    s = monitor(store, n_boot=0)
    assert [v['drift'] for v in s['versions']] == [None, None] and s['features'] == [] and s['top_drifting'] == []
    assert any('saved without a training reference' in n for n in s['notes'])
    assert any('20250101T000000.000Z-000000' in n and 'not found' in n for n in s['notes'])
    assert check_conditions(s, 'psi>0,score_psi>0') == []


def test_an_unreadable_log_file_is_skipped_with_a_note(tmp_path, fitted):
    X, y, p, _, _, _ = fitted
    store = open_store(tmp_path/'registry', create=True)
    v = new_version(store, fitted)
    record(store, v, X[:300], p[:300], np.arange(300), np.zeros(300))
    key = log_files(store)[0][2].replace('-000000.parquet', '-000099.parquet')
    store.put_new(key, b'not parquet')
    s = monitor(store, n_boot=0)
    assert s['rows'] == 300 and any(n.startswith(key) for n in s['notes'])


def test_no_log_yet(tmp_path):
    store = open_store(tmp_path/'empty', create=True)
    s = monitor(store)
    assert (s['rows'], s['versions'], s['days'], s['labels']) == (0, [], [], {'total': 0, 'matched': 0, 'unmatched': 0})
    assert format_monitor(s) == f'no predictions logged in {store.uri} yet'
    assert check_conditions(s, 'recall<1,psi>0,coverage<=1,alert_rate>=0') == []


def test_format_monitor_shows_versions_days_features_and_intervals(served):
    store, frame, a, b = served
    text = format_monitor(monitor(store, n_boot=50))
    assert f'{len(frame):,} logged predictions' in text and a in text and b in text and '2026-03-03' in text
    assert 'precision' in text and '[' in text and 'ks_pvalue' in text and f'drifting (PSI > {PSI_ALERT})' in text


@pytest.mark.parametrize('expr, message', [
    ('psi>0.2,recal<0.6', "condition 'recal<0.6': unknown metric 'recal'"),
    ('psi=0.2', "condition 'psi=0.2': bad operator '='"),
    ('psi==0.2', "bad operator '=='"),
    ('psi!=0.2', "bad operator '!='"),
    ('recall<high', "condition 'recall<high': 'high' is not a number"),
    ('recall<inf', "'inf' is not a number"),
    ('recall<', "'' is not a number"),
    ('recall', "condition 'recall': expected METRIC OP NUMBER"),
    ('<0.5', "condition '<0.5': expected METRIC OP NUMBER"),
    ('', "condition '': expected METRIC OP NUMBER"),
])
def test_malformed_conditions_are_refused_naming_the_bad_part(expr, message):
    summary = {'versions': [{'version': 'v', 'recall': 0.5, 'drift': [{'feature': 'V1', 'psi': 0.3, 'ks': 0.1}]}]}
    with pytest.raises(DataError, match=message.replace('[', r'\[')): check_conditions(summary, expr)


def test_conditions_hold_at_their_worst_version(served):
    store, frame, a, b = served
    s = monitor(store, n_boot=0)
    by = {v['version']: v for v in s['versions']}
    low = min(by.values(), key=lambda v: v['recall'])
    held = check_conditions(s, f"recall<1, alert_rate >= 0, f1>1, coverage<=0.5")
    assert [h['condition'] for h in held] == ['recall<1', 'alert_rate>=0']
    assert (held[0]['version'], held[0]['value'], held[0]['count']) == (low['version'], low['recall'], 2)
    assert held[1]['value'] == max(v['alert_rate'] for v in by.values()) and held[1]['feature'] is None


def test_dask_gives_the_same_summary_as_this_process(served, shadowed):
    from distributed import LocalCluster
    store = served[0]
    assert len(log_files(store)) > 100
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host='127.0.0.1', dashboard_address='127.0.0.1:0') as cluster:
        assert monitor(store, scheduler=cluster.scheduler_address) == monitor(store)
        window = dict(since='2026-03-02T06:00', until='2026-03-03')
        assert monitor(store, scheduler=cluster.scheduler_address, **window) == monitor(store, **window)
        here = monitor(shadowed[0])                                  # shadow rows and reasons gathered by the tasks, explained here
        assert here['shadow'] and here['reasons'] and monitor(shadowed[0], scheduler=cluster.scheduler_address) == here


def test_monitor_reads_an_s3_store(mock_s3_uri, fitted):
    X, y, p, _, _, _ = fitted
    store = open_store(mock_s3_uri, create=True)
    v = new_version(store, fitted)
    record(store, v, X[:600], p[:600], np.arange(600), np.arange(600) % 30)
    add_labels(store, labels(np.arange(200), y[:200], np.zeros(200)), 'test')
    s = monitor(mock_s3_uri, n_boot=0)
    assert (s['store'], s['rows'], s['versions'][0]['labelled'], len(s['days'])) == (mock_s3_uri, 600, 200, 2)
    assert s['versions'][0]['drift'] is not None  # 600 rows: over MIN_DRIFT_ROWS


def test_too_few_rows_for_drift_report_none_and_say_so(tmp_path, fitted):
    X, y, p, _, _, _ = fitted
    store = open_store(tmp_path / 'few', create=True)
    v = new_version(store, fitted)
    record(store, v, X[:40], p[:40], np.arange(40), np.zeros(40, int))
    s = monitor(store, n_boot=0)
    assert (s['rows'], s['versions'][0]['drift'], s['versions'][0]['score_psi'], s['features'], s['top_drifting']) == (40, None, None, [], [])
    assert any('too few for drift' in n for n in s['notes'])
    assert check_conditions(s, 'psi>0.2') == []  # noise never trips --fail-on


def peak_bytes(store):
    tracemalloc.start()
    try:
        s = monitor(store, n_boot=0)
        return s['rows'], tracemalloc.get_traced_memory()[1]
    finally: tracemalloc.stop()


def test_memory_is_flat_in_the_number_of_logged_rows(tmp_path, fitted):
    "Ten times more log files (same days and versions, the same labels) raise the peak by no more than a file's worth."
    X, y, p, _, _, _ = fitted
    peaks = {}
    for files in (4, 40):
        store = open_store(tmp_path/f'log-{files}', create=True)
        v = new_version(store, fitted)
        rows = np.resize(np.arange(len(X)), files * 2000)
        record(store, v, X[rows], p[rows], np.arange(len(rows)), np.zeros(len(rows)), rows_per_file=2000)
        add_labels(store, labels(np.arange(2000), y[:2000], np.zeros(2000)), 'test')
        assert len(log_files(store)) == files
        peaks[files] = peak_bytes(store)
    (n4, small), (n40, large) = peaks[4], peaks[40]
    assert (n4, n40) == (8000, 80_000)
    print(f'peak traced memory: {small / 1e6:.1f} MB for 8,000 logged rows, {large / 1e6:.1f} MB for 80,000')
    assert large < 1.3 * small + 2e6


@pytest.fixture(scope='module')
def shadowed(tmp_path_factory, fitted):
    """A store whose champion (the fitted model) answers the held-out half over two days with a shadow of 20 stumps scored beside it
    (from hour 6 on), reasons logged with the first day's answers (`?explain=3`), every row labelled; (store, frame, champion, shadow)."""
    from fraud_mlops.modelling import make_model
    X, y, p, ref, model, train = fitted
    store = open_store(tmp_path_factory.mktemp('shadowed')/'registry', create=True)
    champion = new_version(store, fitted)
    stumps = make_model('lgbm', n_estimators=20, num_leaves=2).fit(X[train], y[train])
    shadow = save_version(store, stumps, {'threshold': THRESHOLD}, X[:50], y[:50])['version']
    rows = np.flatnonzero(~train)
    hours = np.random.default_rng(2).integers(0, 48, len(rows))
    ids = np.array([f'sh-{i}' for i in rows], dtype=object)
    explain = explainer(*load_model(store, champion))
    for first, part in ((True, hours < 6), (False, (hours >= 6) & (hours < 24)), (False, hours >= 24)):
        record(store, champion, X[rows[part]], p[rows[part]], ids[part], hours[part],
               shadow=None if first else prepare_model(*load_model(store, shadow)), reasons=(lambda Z: explain.reasons(Z, 3)) if hours[part].max() < 24 else None)
    add_labels(store, labels(ids, y[rows], hours), 'test')
    frame = pd.DataFrame({'date': (START + pd.to_timedelta(hours, unit='h')).strftime('%Y-%m-%d'), 'hour': hours, 'y': y[rows], 'p': p[rows],
                          'q': stumps.predict_proba(X[rows])[:, 1], 'row': rows, 'id': ids})
    return store, frame, champion, shadow


def test_champion_against_shadow_per_day_matches_a_direct_computation(shadowed):
    store, frame, champion, shadow = shadowed
    s = monitor(store, n_boot=200)
    assert [(d['date'], d['champion'], d['shadow']) for d in s['shadow']] == [('2026-03-01', champion, shadow), ('2026-03-02', champion, shadow)]
    for d in s['shadow']:
        g = frame[(frame.date == d['date']) & (frame.hour >= 6)].sort_values(['hour', 'id'])   # the shadow started at hour 6; the monitor's order
        a, b = g.p.to_numpy() >= THRESHOLD, g.q.to_numpy() >= THRESHOLD
        assert (d['rows'], d['frauds'], d['champion_metrics']['alerts'], d['shadow_metrics']['alerts']) == (len(g), int(g.y.sum()), int(a.sum()), int(b.sum()))
        assert d['champion_metrics']['f1'] == pytest.approx(f1_score(g.y, a), abs=1e-12)
        assert d['shadow_metrics']['f1'] == pytest.approx(f1_score(g.y, b), abs=1e-9)
        assert d['champion_metrics']['auprc'] == pytest.approx(average_precision_score(g.y, g.p), abs=2e-3)
        paired = paired_bootstrap(g.y.to_numpy(), b, a, 200, 0)
        assert d['f1_difference'] == pytest.approx(paired['f1_difference'], abs=1e-9)
        assert (d['f1_difference_ci95'], d['p_shadow_better']) == (paired['f1_difference_ci95'], paired['p_candidate_better'])
        for m in ('champion_metrics', 'shadow_metrics'):
            for k in QUALITY: assert d[m]['intervals'][k][0] <= d[m][k] <= d[m]['intervals'][k][1], (m, k)
    assert monitor(store, since='2026-03-02', n_boot=0)['shadow'][0]['f1_difference_ci95'] is None
    text = format_monitor(s)
    assert 'champion against shadow on the same labelled transactions' in text and f"{s['shadow'][0]['f1_difference']:.3f} [" in text


def test_reasons_behind_alerts_logged_or_computed_count_the_same(shadowed, fitted):
    store, frame, champion, _ = shadowed
    X, *_ = fitted
    explain = explainer(*load_model(store, champion))
    s = monitor(store, n_boot=0)
    by_date = {r['date']: r for r in s['reasons']}
    assert [(r['date'], r['version']) for r in s['reasons']] == [('2026-03-01', champion), ('2026-03-02', champion)]
    for date, logged in (('2026-03-01', True), ('2026-03-02', False)):
        alerts = frame[(frame.date == date) & (frame.p >= THRESHOLD)]
        r = by_date[date]
        assert (r['alerts'], r['logged'], r['computed'], r['unexplained']) == (len(alerts), len(alerts) if logged else 0, 0 if logged else len(alerts), 0)
        direct = pd.Series([x['feature'] for reasons in explain.reasons(X[alerts.row.to_numpy()], 3) for x in reasons]).value_counts()
        assert {f['feature']: f['count'] for f in r['features']} == direct.to_dict()
        assert [f['count'] for f in r['features']] == sorted(direct.to_list(), reverse=True)
        assert sum(f['share'] for f in r['features']) == pytest.approx(3)
    text = format_monitor(s)
    top = s['reasons'][0]['features'][0]
    assert 'reasons behind alerts' in text and f"{top['feature']} {top['share']:.0%}" in text


def test_alerts_of_a_kind_without_explanation_are_counted_and_noted(tmp_path, fitted):
    from fraud_mlops.modelling import make_model
    X, y, p, _, _, train = fitted
    store = open_store(tmp_path/'registry', create=True)
    hgb = make_model('hgb', max_iter=20).fit(X[train], y[train])
    v = save_version(store, hgb, {'threshold': THRESHOLD}, X[:50], y[:50])['version']
    q = hgb.predict_proba(X)[:, 1]
    record(store, v, X, q, np.arange(len(X)), np.zeros(len(X)))
    s = monitor(store, n_boot=0)
    (r,) = s['reasons']
    assert (r['alerts'], r['logged'], r['computed'], r['unexplained'], r['features']) == (int((q >= THRESHOLD).sum()), 0, 0, int((q >= THRESHOLD).sum()), [])
    assert any(n.startswith(f'version {v}: reasons of {r["alerts"]:,} alert(s) not computed (') for n in s['notes']), s['notes']
    assert s['shadow'] == [] and 'champion against shadow' not in format_monitor(s)
