"""Promotion on live evidence on an S3 store (moto's in-process mock): a champion and a challenger trained on the real CI subset, the
challenger set as shadow, a replayed day of real rows (the full data's second day: all its frauds and a seeded eighth of the rest)
answered by the champion through `PredictionLog` with the shadow scored by the log's writer, labels added with `add_labels`.
`promote_live` promotes a better shadow (pointer flipped, shadow stopped, the record naming its live evidence), refuses thin evidence
and a store without a shadow (ConflictError, nothing written), and rejects a worse shadow (champion unchanged, shadow still running).
The models saw every fraud of the dataset (the CI subset holds them all): these tests check the mechanics and the numbers, not how
well a model generalises."""
import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score

from fraud_mlops.data import DAY, FEATURES, TARGET, load_transactions
from fraud_mlops.features import is_fraud
from fraud_mlops.labels import add_labels
from fraud_mlops.live import promote_live
from fraud_mlops.monitor import monitor
from fraud_mlops.predlog import PredictionLog
from fraud_mlops.registry import list_decisions, load_model, read_champion, read_shadow, set_shadow, stop_shadow
from fraud_mlops.runtime import prepare_model
from fraud_mlops.store import ConflictError, open_store

STRONG = {}                                        # conftest's small LightGBM: 20 trees of 15 leaves
WEAK = {'n_estimators': 5, 'num_leaves': 2}        # five stumps: clearly worse on the replayed day (F1 ~0.79 against ~0.85)


@pytest.fixture(scope='module')
def later_day(fetched):
    "(frame, ids) of the replayed day: every fraud and a seeded eighth of the legitimate rows of the full data's second day, in time order."
    full = load_transactions(fetched)     # the full data, fetched as `fraud-mlops fetch-data` does (a clean clone has no copy)
    day = full[full.Time >= DAY]
    day = day[(day[TARGET] == 1) | (np.random.default_rng(0).random(len(day)) < 1 / 8)].sort_values('Time', kind='stable').reset_index(drop=True)
    return day, np.array([f'live-{i:06d}' for i in range(len(day))], dtype=object)


def served(store, pointer):
    return prepare_model(*load_model(store, pointer[0]['version']))


def replay(store, day, ids):
    """Answer `day` with the champion, the running shadow scored beside it by the log's writer, an hour of rows a call at its offset into
    the day after the shadow started; the times answered."""
    champion, shadow = served(store, read_champion(store)), served(store, read_shadow(store))
    X, hour = day[FEATURES].to_numpy(), ((day.Time.to_numpy() - DAY) // 3600).astype(int)
    answered = pd.Timestamp(read_shadow(store)[0]['started_at']) + pd.to_timedelta(hour * 3600, unit='s')
    p, plog = champion.predict(X), PredictionLog(store, flush_rows=10**9, flush_seconds=10**9)
    for h in np.unique(hour):
        r = hour == h
        plog.record_many(answered[np.flatnonzero(r)[0]].timestamp(), f'hour-{h}', list(ids[r]), champion.version, p[r],
                         is_fraud(p[r], champion.threshold), X[r], shadow=shadow)
        plog.flush()
    assert plog.close() == 0 and (plog.written, plog.shadow_scored, plog.shadow_failed) == (len(day), len(day), 0)
    return answered


def label(store, day, ids, answered, rows=None):
    "Add the labels of `rows` (default all) of the replayed day, 30 hours after each was answered."
    rows = np.ones(len(day), bool) if rows is None else rows
    added = add_labels(store, pd.DataFrame({'transaction_id': ids[rows], 'label': day[TARGET].to_numpy()[rows].astype('int8'),
                                            'label_time': (answered[rows] + pd.Timedelta(hours=30)).as_unit('us')}), 'test')
    assert added['matched'] == int(rows.sum())


@pytest.fixture
def live_store(mock_s3_uri, add_champion, add_candidate, later_day):
    "`live_store(champion_params, shadow_params, labelled=None)`: the S3 store with that champion, that shadow, the replayed day and its labels."
    def make(champion_params, shadow_params, labelled=None):
        store = open_store(mock_s3_uri, create=True)
        champion = add_champion(store, **champion_params)
        shadow = add_candidate(store, **shadow_params)
        set_shadow(store, shadow, 'the challenger')
        day, ids = later_day
        answered = replay(store, day, ids)
        label(store, day, ids, answered, labelled)
        return store, champion, shadow
    return make


def snapshot(store):
    "Every key of `store` and its bytes."
    return {k: store.get(k) for k in store.keys()}


def test_a_better_shadow_is_promoted_on_live_evidence(live_store, later_day):
    store, champion, shadow = live_store(WEAK, STRONG)
    started = read_shadow(store)[0]['started_at']
    day, _ = later_day
    y = day[TARGET].to_numpy()
    d = promote_live(store, notify=False)
    assert (d['decision'], d['candidate'], d['champion']) == ('promoted', shadow, champion), d['reason']
    assert read_champion(store)[0]['version'] == shadow and read_champion(store)[0]['previous'] == champion
    assert read_shadow(store)[0]['version'] is None                                     # stopped: it is the champion now
    assert json.loads(store.get(d['shadow_stop']['log']))['reason'] == 'promoted to champion'
    ev = d['evidence']
    assert {k: ev[k] for k in ('kind', 'champion', 'shadow', 'rows', 'frauds', 'until')} == {
        'kind': 'live', 'champion': champion, 'shadow': shadow, 'rows': len(day), 'frauds': int(y.sum()), 'until': None}
    assert pd.Timestamp(ev['since']) == pd.Timestamp(started)
    lo, hi = ev['f1_difference_ci95']
    assert 0 < lo <= ev['f1_difference'] <= hi                                           # clearly better, not by luck
    X = day[FEATURES].to_numpy()
    for who, version in (('candidate', shadow), ('champion', champion)):             # the gate's F1: the verdicts as served, recomputed
        model, manifest = load_model(store, version)
        want = f1_score(y, is_fraud(model.predict_proba(X)[:, 1], manifest['threshold']))
        assert d[f'{who}_metrics']['f1'] == pytest.approx(want, abs=1e-9)
    assert ev['f1_difference'] == pytest.approx(d['candidate_metrics']['f1'] - d['champion_metrics']['f1'], abs=1e-12)
    record = json.loads(store.get(d['log']))
    assert record['evidence'] == ev and record['decision'] == 'promoted' and read_champion(store)[0]['decision']['evidence'] == ev
    assert [x['decision'] for x in list_decisions(store)][-3:] == ['shadow', 'promoted', 'shadow-stop']


def test_thin_evidence_and_no_shadow_are_refused_and_change_nothing(live_store, later_day):
    day, _ = later_day
    first = np.cumsum(day[TARGET].to_numpy()) <= 20                                   # labels so far: the first 20 frauds' worth
    store, champion, shadow = live_store(WEAK, STRONG, labelled=first)
    before = snapshot(store)
    with pytest.raises(ConflictError) as e: promote_live(store, notify=False)
    message = str(e.value)
    assert message.startswith(f'live evidence too thin: {int(first.sum()):,} labelled transaction(s) answered by champion {champion} '
                              f'and scored by shadow {shadow} since ')
    assert ', 20 of them fraud; at least 30 labelled frauds' in message and message.endswith('nothing changed')
    with pytest.raises(ConflictError, match='too thin'): promote_live(store, notify=False, min_frauds=21)
    assert promote_live(store, notify=False, min_frauds=20, dry_run=True)['evidence']['frauds'] == 20   # enough when fewer are asked for
    assert snapshot(store) == before
    stop_shadow(store, 'the test')
    before = snapshot(store)
    with pytest.raises(ConflictError, match='^no shadow is running: start one with fraud-mlops shadow VERSION$'): promote_live(store)
    assert snapshot(store) == before and read_champion(store)[0]['version'] == champion


def test_a_worse_shadow_is_rejected_and_keeps_running(live_store, later_day):
    store, champion, shadow = live_store(STRONG, WEAK)
    pointers = (read_champion(store)[0], read_shadow(store)[0])
    d = promote_live(store, notify=False)
    assert (d['decision'], d['candidate'], d['champion']) == ('rejected', shadow, champion)
    assert d['evidence']['f1_difference'] < 0 and d['reason'].startswith('live evidence: candidate F1')
    assert (read_champion(store)[0], read_shadow(store)[0]) == pointers                 # nothing moved
    record = json.loads(store.get(d['log']))
    assert (record['decision'], record['evidence']['kind'], record['evidence']['rows']) == ('rejected', 'live', len(later_day[0]))


def test_the_monitor_shows_the_comparison_and_the_reasons_of_the_replayed_day(live_store, later_day):
    store, champion, shadow = live_store(WEAK, STRONG)
    day, _ = later_day
    s = monitor(store, n_boot=100)
    evidence = promote_live(store, notify=False, dry_run=True)['evidence']
    assert s['rows'] == len(day) and {(d['champion'], d['shadow']) for d in s['shadow']} == {(champion, shadow)}
    assert (sum(d['rows'] for d in s['shadow']), sum(d['frauds'] for d in s['shadow'])) == (evidence['rows'], evidence['frauds'])
    for d in s['shadow']:
        assert d['f1_difference'] == pytest.approx(d['shadow_metrics']['f1'] - d['champion_metrics']['f1'], abs=1e-12)
        assert d['f1_difference_ci95'][0] <= d['f1_difference'] <= d['f1_difference_ci95'][1]
    assert sum(r['alerts'] for r in s['reasons']) == sum(d['alerts'] for d in s['days'])
    assert all(r['computed'] == r['alerts'] and r['features'] for r in s['reasons'])   # nothing logged with reasons: all computed
