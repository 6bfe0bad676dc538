"""Reasons per transaction (`fraud_mlops.reasons`): additivity on real rows for every model kind with a method, the scores the
models' own, exact Shapley values against a brute force on a tiny forest, LightGBM's own pred_contrib, hgb refused, K checked,
and `score_file(explain=K)` writing the reason columns (or nothing at all when it refuses)."""
import math
from itertools import combinations

import numpy as np
import pandas as pd
import pytest
from sklearn.ensemble import RandomForestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from fraud_mlops.data import FEATURES, DataError
from fraud_mlops.modelling import fit_model, fraud_probability, make_model
from fraud_mlops.features import FEATURE_SOURCES
from fraud_mlops.reasons import (MAX_REASONS, ForestShap, LightGBMShap, NoExplanation, check_explain, explainer, grouping,
                                 reason_columns, sklearn_tree)
from fraud_mlops.scoring import score_file
from fraud_mlops.scoring_files import OUTPUT_COLUMNS


@pytest.fixture(scope='module')
def xy(ci_df):
    return ci_df[FEATURES].to_numpy(), ci_df.Class.to_numpy()


@pytest.fixture(scope='module')
def models(xy):
    "Small models of every kind, fitted on the real CI subset."
    X, y = xy
    return {'lgbm': make_model('lgbm', n_estimators=30).fit(X, y),
            'lgbm_rf': fit_model(make_model('lgbm_rf', n_estimators=30, forest_trees=15), X, y, 0.25),
            'seed_rf': make_model('seed_rf', n_estimators=15).fit(X, y),
            'hgb': make_model('hgb', max_iter=10).fit(X, y)}


@pytest.mark.parametrize('kind,unit,exact', [('lgbm', 'log-odds', True), ('lgbm_rf', 'probability', False), ('seed_rf', 'probability', True)])
def test_contributions_add_up_to_the_models_own_score_on_real_rows(kind, unit, exact, models, xy):
    X, _ = xy
    model = models[kind]
    ex = explainer(model, {'version': 'v1', 'model_kind': kind})
    assert (ex.unit, ex.exact) == (unit, exact)
    C, base, score = ex.contributions(X)
    assert C.shape == (len(X), 30) and C.dtype == base.dtype == score.dtype == np.float64
    own = model[-1].booster_.predict(model[0].transform(X), raw_score=True) if kind == 'lgbm' else fraud_probability(model, X)
    assert np.array_equal(score, own)                                   # the model's own score, bit for bit
    assert np.abs(base + C.sum(1) - score).max() < 1e-12                # additive on every row
    assert np.abs(C).max() > 1e-3                                       # and not trivially
    one = ex.contributions(X[123:124])
    assert np.abs(one[0] - C[123:124]).max() < 1e-15 and one[2][0] == score[123]   # a single row as in a batch


def path_value(tree, x, S):
    left, right, feature, threshold, cover, value = tree
    def go(n):
        if left[n] == -1: return value[n]
        if feature[n] in S: return go(left[n] if x[feature[n]] <= threshold[n] else right[n])
        return (cover[left[n]] * go(left[n]) + cover[right[n]] * go(right[n])) / cover[n]
    return go(0)


def test_forest_contributions_are_the_exact_path_dependent_shapley_values(xy):
    "A tiny scaled forest on all 30 inputs: every coalition of the inputs it uses enumerated (the rest get exactly 0)."
    X, y = xy
    model = make_pipeline(StandardScaler(), RandomForestClassifier(3, max_depth=3, class_weight='balanced', random_state=1)).fit(X, y)
    trees, rows = [sklearn_tree(e) for e in model[-1].estimators_], X[np.r_[np.flatnonzero(y)[:3], 10, 20]]
    used = sorted({int(f) for t in trees for f in t[2][t[0] != -1]})
    assert 3 <= len(used) <= 12
    C, base, score = explainer(model, {'version': 'v1'}).contributions(rows)
    for r, x in enumerate(model[0].transform(rows).astype(np.float32)):   # scikit-learn compares float32 values
        f = lambda S: sum(path_value(t, x, set(S)) for t in trees) / len(trees)
        phi, m = np.zeros(30), len(used)
        for i in used:
            others = [j for j in used if j != i]
            for k in range(m):
                w = math.factorial(k) * math.factorial(m - k - 1) / math.factorial(m)
                phi[i] += sum(w * (f(S + (i,)) - f(S)) for S in combinations(others, k))
        assert np.abs(C[r] - phi).max() < 1e-13, (r, C[r] - phi)
        assert abs(f(()) - base[r]) < 1e-13 and f(tuple(used)) == pytest.approx(score[r], abs=1e-15)


def test_lightgbm_contributions_are_lightgbms_own_pred_contrib_and_the_fallback_gives_the_same(models, xy, monkeypatch):
    X, _ = xy
    booster, F = models['lgbm'][-1].booster_, models['lgbm'][0].transform(X[:2_000])
    theirs = booster.predict(F, pred_contrib=True)
    fast = LightGBMShap(booster)
    assert fast.shap is not None
    phi, base, raw, p = fast(F)
    assert np.abs(phi - theirs[:, :-1]).max() < 1e-10 and np.abs(base - theirs[:, -1]).max() < 1e-12
    monkeypatch.setattr(LightGBMShap, 'agrees', lambda self, rows=64: False)    # a kernel that disagreed would not be used
    slow = LightGBMShap(booster)
    assert slow.shap is None
    assert np.array_equal(slow(F)[0], theirs[:, :-1]) and np.array_equal(slow(F)[2], raw) and np.array_equal(slow(F)[3], p)


def test_lgbm_rf_is_the_mean_of_the_forests_exact_values_and_lightgbms_mapped_by_the_secant(models, xy):
    X = xy[0][:300]
    model = models['lgbm_rf']
    lgbm, forest = model[-1].estimators_
    F, G = model[0].transform(X), grouping(FEATURE_SOURCES)
    ex = explainer(model, {})
    C, base, score = ex.contributions(X)
    phi, f0, f = explainer(make_pipeline(model[0], lgbm), {}).contributions(X)      # LightGBM alone: exact, in log-odds
    psi, e, q = ForestShap(forest)(F)                                               # the forest alone: exact, in probability
    s = lambda t: 1 / (1 + np.exp(-t))
    slope = (lgbm.predict_proba(F)[:, 1] - s(f0)) / (f - f0)
    assert np.abs(C - (phi * slope[:, None] + psi @ G) / 2).max() < 1e-15
    assert np.abs(base - (s(f0) + e) / 2).max() < 1e-15 and np.array_equal(score, (lgbm.predict_proba(F)[:, 1] + q) / 2)
    assert not ex.exact and 'not exact' in ex.method


def test_hgb_and_other_models_are_refused_naming_version_and_kind(models):
    with pytest.raises(NoExplanation, match=r'model v9 \(hgb\) has no exact explanation method'):
        explainer(models['hgb'], {'version': 'v9', 'model_kind': 'hgb'})
    with pytest.raises(NoExplanation, match=r'model v3 \(HistGradientBoostingClassifier\)'):
        explainer(models['hgb'], {'version': 'v3'})
    assert issubclass(NoExplanation, DataError)


@pytest.mark.parametrize('k,n', [(1, 1), ('7', 7), (' 30 ', 30), (np.int32(2), 2)])
def test_check_explain_takes_whole_numbers_from_1_to_30(k, n):
    assert check_explain(k) == n and MAX_REASONS == 30


@pytest.mark.parametrize('k', [0, -1, 31, '0', '2.0', 2.5, '', ' ', 'x', True, False, None, '1e1', '+3'])
def test_check_explain_refuses_anything_else_in_one_sentence(k):
    with pytest.raises(DataError) as e: check_explain(k)
    assert str(e.value) == f"explain must be a whole number from 1 to 30, not {k!r}"


def test_reasons_are_sorted_strongest_towards_fraud_first_with_raw_values(models, xy):
    X, y = xy
    rows = X[np.r_[np.flatnonzero(y)[:4], :4]]
    ex = explainer(models['lgbm_rf'], {})
    C = ex.contributions(rows)[0]
    why = ex.reasons(rows, 5)
    assert [len(r) for r in why] == [5] * 8
    for r, reasons in enumerate(why):
        assert [x['contribution'] for x in reasons] == sorted(C[r], reverse=True)[:5]
        assert [x['value'] for x in reasons] == [rows[r][FEATURES.index(x['feature'])] for x in reasons]
        assert all(type(x['value']) is float and type(x['contribution']) is float for x in reasons)


@pytest.fixture
def scored_file(ci_df, tmp_path):
    df = ci_df.head(3_000).copy(); df.insert(0, 'id', np.arange(len(df)))
    df.to_csv(tmp_path/'in.csv', index=False)
    return df, tmp_path/'in.csv'


def test_score_file_explain_writes_k_reason_columns(store, save_as_champion, models, xy, scored_file, tmp_path):
    X, y = xy
    v = save_as_champion(store, models['lgbm_rf'], X, y)
    df, path = scored_file
    plain = score_file(path, tmp_path/'plain.parquet', store.root, rows=1_000, progress=False)
    s = score_file(path, tmp_path/'why.parquet', store.root, rows=1_000, progress=False, explain=4)
    assert 'explain' not in plain and (s['explain'], s['explain_unit'], s['model_version']) == (4, 'probability', v)
    out, before = pd.read_parquet(tmp_path/'why.parquet'), pd.read_parquet(tmp_path/'plain.parquet')
    assert list(before.columns) == ['id', *OUTPUT_COLUMNS]                           # without explain: nothing changes
    assert list(out.columns) == ['id', *OUTPUT_COLUMNS, *reason_columns(4)] and len(reason_columns(4)) == 12
    pd.testing.assert_frame_equal(out[before.columns], before)
    index, value, contribution = explainer(models['lgbm_rf'], {}).top(df[FEATURES].to_numpy(), 4)
    assert (out[[f'reason_{i}_feature' for i in range(1, 5)]].astype(str).to_numpy() == np.take(FEATURES, index)).all()
    assert np.array_equal(out[[f'reason_{i}_value' for i in range(1, 5)]].to_numpy(), value)
    assert np.array_equal(out[[f'reason_{i}_contribution' for i in range(1, 5)]].to_numpy(), contribution)


def test_score_file_explain_refuses_bad_k_first_and_a_model_without_a_method_before_writing(store, save_as_champion, models, xy,
                                                                                           scored_file, tmp_path):
    X, y = xy
    save_as_champion(store, models['hgb'], X, y)
    _, path = scored_file
    (tmp_path/'out.csv').write_text('an earlier output\n')
    with pytest.raises(DataError, match='explain must be a whole number from 1 to 30'):
        score_file(tmp_path/'missing.csv', tmp_path/'out.csv', store.root, explain=0)    # K first, before the input is looked at
    with pytest.raises(NoExplanation, match=r'HistGradientBoostingClassifier\) has no exact explanation method'):
        score_file(path, tmp_path/'out.csv', store.root, progress=False, explain=2, log=True)
    assert (tmp_path/'out.csv').read_text() == 'an earlier output\n'                    # nothing written
    assert not [p for p in tmp_path.iterdir() if p.name.startswith('.') or 'bad_rows' in p.name]
    assert not store.keys('predictions')


def test_score_file_log_keeps_the_reasons_it_wrote(store, save_as_champion, models, xy, scored_file, tmp_path):
    "`score --log --explain K`: each logged row carries, as JSON, exactly the K reasons its output row has."
    import json
    from fraud_mlops.predlog import read_log
    X, y = xy
    save_as_champion(store, models['lgbm_rf'], X, y)
    df, path = scored_file
    score_file(path, tmp_path/'why.parquet', store.root, rows=1_000, progress=False, explain=2, log=True)
    out = pd.read_parquet(tmp_path/'why.parquet')
    logged = pd.concat([t.to_pandas() for t in read_log(store, columns=['transaction_id', 'reasons'])])
    assert len(logged) == len(out) and logged.reasons.notna().all()
    by_id = dict(zip(logged.transaction_id, logged.reasons))
    for _, row in out.sample(50, random_state=0).iterrows():
        want = [{'feature': str(row[f'reason_{i}_feature']), 'value': row[f'reason_{i}_value'],
                 'contribution': row[f'reason_{i}_contribution']} for i in (1, 2)]
        assert json.loads(by_id[str(row['id'])]) == want
