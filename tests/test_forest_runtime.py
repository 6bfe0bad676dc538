"The LightGBM + random forest runtime against scikit-learn on all 284,807 real rows, bit for bit."
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from fraud_mlops.modelling import FraudFeatures, features_and_labels, fit_model, make_model
from fraud_mlops.runtime import EnsembleRuntime, ForestRuntime, prepare_model


@pytest.fixture(scope='module')
def lgbm_rf(full_xy):
    "The `lgbm_rf` kind with its default parameters, fitted as training fits it (all frauds, a quarter of the rest)."
    X, y = full_xy
    return fit_model(make_model('lgbm_rf'), X, y, 0.25)


@pytest.mark.slow
@pytest.mark.network
def test_forest_same_bits_as_scikit_learn_on_the_full_data(full_xy, lgbm_rf):
    "The forest member alone: every probability equals its own predict_proba exactly, on 1 and 2 threads and row by row."
    X, _ = full_xy
    forest = lgbm_rf.steps[1][1].estimators_[1]
    F = FraudFeatures().transform(X)
    want = forest.predict_proba(F)[:, 1]
    rt = ForestRuntime(forest)
    assert rt(F).tobytes() == want.tobytes()
    assert rt(F, threads=2).tobytes() == want.tobytes()
    assert np.array([rt.one(f) for f in F[:50_000]]).tobytes() == want[:50_000].tobytes()


@pytest.mark.slow
@pytest.mark.network
def test_same_bits_as_predict_proba_on_the_full_data(full_xy, lgbm_rf):
    "(LightGBM + forest) / 2 equals the pipeline's predict_proba exactly: batches on 1 and 2 threads, every row alone, and served."
    X, _ = full_xy
    want = lgbm_rf.predict_proba(X)[:, 1]
    one_thread = EnsembleRuntime(lgbm_rf, threads=1)
    assert one_thread(X).tobytes() == want.tobytes()
    assert EnsembleRuntime(lgbm_rf, threads=2)(X).tobytes() == want.tobytes()
    assert np.array([one_thread.one(x) for x in X]).tobytes() == want.tobytes()
    served = prepare_model(lgbm_rf, {'version': 'v', 'threshold': 0.5})
    assert served.runtime == 'lightgbm-quickscorer+forest'
    assert served.predict(X).tobytes() == want.tobytes()
    assert all(served.predict(X[i:i + 1]).tobytes() == want[i:i + 1].tobytes() for i in range(0, len(X), 997))


@pytest.mark.slow
@pytest.mark.network
def test_concurrent_callers_get_their_own_answers(full_xy, lgbm_rf):
    "Threads scoring different slices at once (as Dask worker threads and the API's batch threads do) each get exactly their rows' probabilities."
    X, _ = full_xy
    served = prepare_model(lgbm_rf, {'version': 'v', 'threshold': 0.5})
    forest = ForestRuntime(lgbm_rf.steps[1][1].estimators_[1])
    parts = np.array_split(X[:120_000], 6)
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(served.predict, parts))
        got_forest = list(pool.map(lambda rows: forest(FraudFeatures().transform(rows), threads=2), parts))
    for rows, p, q in zip(parts, got, got_forest):
        assert p.tobytes() == lgbm_rf.predict_proba(rows)[:, 1].tobytes()
        assert q.tobytes() == lgbm_rf.steps[1][1].estimators_[1].predict_proba(FraudFeatures().transform(rows))[:, 1].tobytes()


def test_the_training_jobs_candidate_is_served_by_it(ci_df):
    "The ensemble the training job assembles from its fitted members (`AverageEnsemble.use_fitted`) gets this runtime, with the same bits."
    from fraud_mlops.train import train_candidate
    X, _ = features_and_labels(ci_df)
    model = train_candidate(ci_df, model='lgbm_rf', n_estimators=20, forest_trees=25, n_jobs=2, n_boot=0).model
    want = model.predict_proba(X)[:, 1]
    served = prepare_model(model, {'version': 'v', 'threshold': 0.5})
    assert served.runtime == 'lightgbm-quickscorer+forest'
    assert served.predict(X).tobytes() == want.tobytes()
    assert np.array([served.predict(X[i:i + 1])[0] for i in range(len(X))]).tobytes() == want.tobytes()
