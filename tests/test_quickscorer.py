"QuickScorer against LightGBM on all 284,807 real rows: the default model, and a wider, deeper one, bit for bit."
import numpy as np
import pytest

from fraud_mlops.features import FEATURE_SOURCES, derived_features
from fraud_mlops.modelling import fit_model, make_model
from fraud_mlops.quickscorer import QuickScorer, forest_tables
from fraud_mlops.runtime import prepare_model

pytestmark = [pytest.mark.slow, pytest.mark.network]   # all 284,807 rows of the fetched dataset


@pytest.mark.parametrize('params', [{}, {'num_leaves': 31, 'n_estimators': 300, 'learning_rate': 0.05}], ids=['default', 'wide'])
def test_same_bits_as_lightgbm_on_the_full_data(full_xy, params):
    "Every probability equals LightGBM's own predict_proba exactly, on 1 and 2 threads, and through the served runtime."
    X, y = full_xy
    model = fit_model(make_model('lgbm', **params), X, y, 0.25)
    want = model.predict_proba(X)[:, 1]
    quick = QuickScorer(forest_tables(model.steps[1][1].booster_), FEATURE_SOURCES, derived_features)
    assert quick(X).tobytes() == want.tobytes()
    assert quick(X, threads=2).tobytes() == want.tobytes()
    served = prepare_model(model, {'version': 'v', 'threshold': 0.5})
    assert served.runtime == 'lightgbm-quickscorer'
    assert served.predict(X).tobytes() == want.tobytes()


def test_concurrent_callers_get_their_own_answers(full_xy):
    "Threads scoring different slices at once (as Dask worker threads do) each get exactly their rows' probabilities."
    from concurrent.futures import ThreadPoolExecutor
    X, y = full_xy
    model = fit_model(make_model('lgbm', n_estimators=60), X[:100_000], y[:100_000], 0.25)
    quick = QuickScorer(forest_tables(model.steps[1][1].booster_), FEATURE_SOURCES, derived_features)
    parts = np.array_split(X[:120_000], 6)
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda rows: quick(rows, threads=2), parts))
    for rows, p in zip(parts, got): assert p.tobytes() == model.predict_proba(rows)[:, 1].tobytes()

