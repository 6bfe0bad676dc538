"""Drift against the training reference, beyond the chapter's examples: counts add up over files (what the monitor relies
on), a reference saved with a real candidate on (mocked) S3 comes back verified and matches its own scores, and on the full
data set, when present, day 2 against day 1: which inputs move between the two days, and a deliberate shift flagged."""
import numpy as np
import pandas as pd
import pytest

from fraud_mlops.data import DAY, FEATURES, FULL_DATA, load_transactions, resolve_path
from fraud_mlops.drift import (BINS, PSI_ALERT, bin_counts, drift_rows, score_bin_counts, training_reference,
                               window_drift)
from fraud_mlops.registry import load_manifest, load_reference, save_version
from fraud_mlops.store import mock_bucket, open_store
from fraud_mlops.train import build_manifest, train_candidate


def test_counts_of_files_add_up_to_the_counts_of_the_whole(ci_df):
    X = ci_df[FEATURES].to_numpy(); ref = training_reference(X[ci_df.Time < DAY], np.linspace(0, 1, 500))
    day2 = X[ci_df.Time >= DAY]; files = np.array_split(day2, [7, 1500, 1501])    # uneven, one of a single row
    summed = sum(bin_counts(ref, f) for f in files)
    assert np.array_equal(summed, bin_counts(ref, day2)) and summed.shape == (30, BINS)
    p = np.random.default_rng(0).random(len(day2))
    scores = sum(score_bin_counts(ref, q) for q in np.array_split(p, 3))
    assert drift_rows(ref, summed, scores) == window_drift(ref, day2, p)


def test_a_candidates_reference_round_trips_through_s3_and_matches_its_own_scores(ci_df):
    r = train_candidate(ci_df, 'lgbm', n_estimators=20, n_jobs=1, n_boot=0)
    reference = training_reference(ci_df[FEATURES].to_numpy(), r.evidence['p'])
    m = build_manifest(r, 'data/creditcard_ci.csv', 'ci', len(ci_df), int(ci_df.Class.sum()), {'model': 'lgbm'})
    with mock_bucket() as bucket:
        store = open_store(f's3://{bucket}/models', create=True)
        v = save_version(store, r.model, m, r.evidence['X'], r.evidence['y'], r.evidence['p'], reference=reference)['version']
        loaded = load_reference(store, load_manifest(store, v))
    assert loaded == reference and loaded['rows'] == len(ci_df) and loaded['score']['rows'] == len(r.evidence['p'])
    rows = window_drift(loaded, ci_df[FEATURES].to_numpy(), None)
    assert {row['psi'] for row in rows} == {0.0} and len(rows) == 30          # the training rows against themselves
    score, = [row for row in window_drift(loaded, r.evidence['X'], r.evidence['p']) if row['feature'] == 'score']
    assert score == {'feature': 'score', 'psi': 0.0, 'ks': 0.0, 'ks_pvalue': 1.0, 'rows': len(r.evidence['p'])}


# measured on the full data: the inputs whose distribution steps at midnight between the two days (see 01e_drift)
FULL_DAY_STEP = ['V1', 'V3', 'V28', 'V25', 'V15', 'V5', 'V22', 'V11', 'V23', 'V24', 'V26']


@pytest.fixture(scope='module')
def full_days():
    path = resolve_path(FULL_DATA)
    if not path.exists(): pytest.skip(f'{FULL_DATA} is not here (`fraud-mlops fetch-data` fetches it)')
    X = load_transactions(path)[FEATURES].to_numpy()
    return X[X[:, 0] < DAY], X[X[:, 0] >= DAY]


def psi_by_feature(ref, X): return pd.Series({r['feature']: r['psi'] for r in window_drift(ref, X)})


def test_full_data_day_two_against_day_one(full_days):
    day1, day2 = full_days
    assert (len(day1), len(day2)) == (144_786, 140_021)
    half = np.random.default_rng(0).permutation(len(day1)) < len(day1) // 2
    assert psi_by_feature(training_reference(day1[half], None), day1[~half]).max() < 0.01      # same day: nothing moves
    ref = training_reference(day1, None)
    day2_psi = psi_by_feature(ref, day2)
    assert day2_psi.index[day2_psi > PSI_ALERT].tolist() == FULL_DAY_STEP                     # largest first
    assert (day2_psi[['Time', 'Amount', 'V14', 'V17', 'V12', 'V10']] < 0.1).all()
    shifted = day2.copy(); shifted[:, 14] += 2 * day1[:, 14].std()
    tripled = day2.copy(); tripled[:, 29] *= 3
    assert psi_by_feature(ref, shifted)['V14'] > 10 * PSI_ALERT and psi_by_feature(ref, tripled)['Amount'] > PSI_ALERT
