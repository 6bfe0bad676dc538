"""A shadow beside the champion, and reasons with the answers, through a real uvicorn worker.

The shadow changes no answer and fails no request under load, while it is set, stopped, replaced by a corrupt bundle and set
again; its scores land in the prediction log beside the champion's, equal to what its model says of the logged features;
/model and /metrics name it. `?explain=K` adds the K strongest reasons to each answer (and to the log), and anything but a
whole number from 1 to 30, or a model kind without a method, is a 422 with one sentence."""
import json, threading, time

import httpx
import numpy as np
import pyarrow as pa
import pytest

from fraud_mlops.data import FEATURES
from fraud_mlops.modelling import fraud_probability, make_model
from fraud_mlops.predlog import read_log
from fraud_mlops.reasons import explainer
from fraud_mlops.registry import _move_shadow, load_model, read_champion, read_shadow, set_shadow, stop_shadow

FAST = {'FRAUD_MLOPS_POLL_SECONDS': '0.2', 'FRAUD_MLOPS_ACCESS_LOG': '0', 'FRAUD_MLOPS_LOG_FLUSH_SECONDS': '0.3'}


@pytest.fixture(scope='module')
def rows(ci_df):
    return ci_df[FEATURES].to_numpy()


def logged(store):
    "The whole prediction log of `store` as one DataFrame (small, in tests)."
    tables = list(read_log(store))
    return pa.concat_tables(tables).to_pandas() if tables else None


def shadow_served(url):
    "The shadow version worker `url` scores (None: none), from GET /model."
    return (httpx.get(f'{url}/model').json()['serving']['shadow'] or {}).get('version')


def wait_for(what, seconds=20):
    "Poll `what()` until it is truthy; its value (AssertionError after `seconds`)."
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if v := what(): return v
        time.sleep(0.05)
    raise AssertionError(f'{what} did not become true within {seconds} s')


def test_a_shadow_under_load_changes_no_answer_fails_no_request_and_is_logged_beside_the_champion(
        api_server, store, add_champion, add_candidate, rows):
    champion = add_champion(store)
    challenger = add_candidate(store, n_estimators=40, learning_rate=0.3, num_leaves=7)   # another model, another opinion
    corrupt = add_candidate(store, n_estimators=10)
    champ_model, _ = load_model(store, champion)
    expected = fraud_probability(champ_model, rows)
    server = api_server({'FRAUD_MLOPS_STORE': str(store.root), **FAST})
    failures, answers, stop = [], [], threading.Event()

    def client(k):
        with httpx.Client(base_url=server.url, timeout=10) as c:
            i = k
            while not stop.is_set():
                i += 7
                try:
                    if i % 5:
                        r = c.post('/predict', json={'features': rows[i % len(rows)].tolist(), 'transaction_id': f'c{k}-{i}'})
                        ok = r.status_code == 200 and r.json()['model_version'] == champion
                        if ok: answers.append((i % len(rows), r.json()['fraud_probability']))
                    else:
                        at = np.arange(i, i + 20) % len(rows)
                        r = c.post('/predict/batch', json={'instances': rows[at].tolist()})
                        ok = r.status_code == 200
                        if ok: answers.extend(zip(at, [p['fraud_probability'] for p in r.json()['predictions']]))
                except httpx.HTTPError as e: ok, r = False, e
                if not ok: failures.append(repr(r))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads: t.start()
    try:
        time.sleep(0.5)
        set_shadow(store, challenger)
        wait_for(lambda: shadow_served(server.url) == challenger)
        time.sleep(1.0)
        stop_shadow(store)
        wait_for(lambda: shadow_served(server.url) is None)
        f = store.root/'versions'/corrupt/'model.joblib'; f.write_bytes(f.read_bytes()[:-10])   # a bundle gone bad after training
        pointer, tag = read_shadow(store)
        _move_shadow(store, corrupt, pointer, tag, 'shadow', 'planted without the check set_shadow makes', champion)
        failing = wait_for(lambda: httpx.get(f'{server.url}/model').json()['serving']['shadow_failure'])
        assert "does not match its manifest's SHA-256" in failing['error']
        assert 'fraud_mlops_shadow_failing 1.0' in httpx.get(f'{server.url}/metrics').text
        time.sleep(0.5)
        set_shadow(store, challenger)
        wait_for(lambda: shadow_served(server.url) == challenger)
        metrics = httpx.get(f'{server.url}/metrics').text
        assert f'fraud_mlops_shadow_info{{runtime="' in metrics and f'version="{challenger}"' in metrics
        assert httpx.get(f'{server.url}/').json()['shadow_version'] == challenger
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads: t.join(10)
    assert failures == []
    assert len(answers) > 500
    at, p = np.array(answers).T
    np.testing.assert_allclose(p, expected[at.astype(int)], rtol=0, atol=1e-9)   # the shadow changed no answer
    server.stop()                                                             # SIGTERM: the log writes all it holds
    df = logged(store)
    assert len(df) == len(answers)
    shadowed = df[df.shadow_version.notna()]
    assert set(shadowed.shadow_version) == {challenger}                        # the corrupt one never scored a row
    assert 0 < len(shadowed) < len(df) and shadowed.shadow_probability.notna().all()
    model, manifest = load_model(store, challenger)
    want = fraud_probability(model, shadowed[FEATURES].to_numpy())
    np.testing.assert_allclose(shadowed.shadow_probability, want, rtol=0, atol=1e-9)
    assert (shadowed.shadow_fraud == (want >= manifest['threshold'])).all()
    assert (df.model_version == champion).all() and df[df.shadow_version.isna()].shadow_probability.isna().all()


def test_explain_adds_the_strongest_reasons_to_answers_and_to_the_log(api_server, store, champion, rows):
    server = api_server({'FRAUD_MLOPS_STORE': str(store.root), **FAST})
    model, manifest = load_model(store, champion)
    exp = explainer(model, manifest)
    with httpx.Client(base_url=server.url, timeout=10) as c:
        plain = c.post('/predict', json={'features': rows[3].tolist()}).json()
        assert 'reasons' not in plain
        r = c.post('/predict?explain=3', json={'features': rows[3].tolist(), 'transaction_id': 'explained'})
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer['fraud_probability'] == plain['fraud_probability']
        reasons = answer['reasons']
        assert reasons == exp.reasons(rows[3:4], 3)[0]
        assert [x['contribution'] for x in reasons] == sorted([x['contribution'] for x in reasons], reverse=True)
        assert all(x['value'] == rows[3][FEATURES.index(x['feature'])] for x in reasons)
        C, base, score = exp.contributions(rows[3:4])
        assert max(x['contribution'] for x in reasons) == pytest.approx(C.max(), abs=1e-12)
        b = c.post('/predict/batch?explain=2', json={'instances': rows[:5].tolist()}).json()
        assert [len(p['reasons']) for p in b['predictions']] == [2] * 5
        assert [p['reasons'] for p in b['predictions']] == exp.reasons(rows[:5], 2)
        assert 'reasons' not in c.post('/predict/batch', json={'instances': rows[:5].tolist()}).json()['predictions'][0]
        for query in ('explain=0', 'explain=31', 'explain=-2', 'explain=abc', 'explain=1.5', 'explain=', 'explain=1&explain=2'):
            for path, body in (('/predict', {'features': rows[0].tolist()}), ('/predict/batch', {'instances': rows[:2].tolist()})):
                bad = c.post(f'{path}?{query}', json=body)
                assert bad.status_code == 422, (query, bad.text)
                detail = bad.json()['detail']
                assert isinstance(detail, str) and 'explain' in detail and '\n' not in detail, detail
    server.stop()
    df = logged(store)
    assert len(df) == 1 + 1 + 5 + 5               # refused requests are not logged
    one = df[df.transaction_id == 'explained'].iloc[0]
    assert json.loads(one.reasons) == reasons
    assert df.reasons.notna().sum() == 1 + 5


def test_explain_on_a_model_kind_without_a_method_is_a_422_that_says_so(api_server, store, save_as_champion, ci_df, rows):
    X, y = rows, ci_df.Class.to_numpy()
    hgb = make_model('hgb', max_iter=20).fit(X, y)
    version = save_as_champion(store, hgb, X, y)
    server = api_server({'FRAUD_MLOPS_STORE': str(store.root), **FAST})
    assert httpx.post(f'{server.url}/predict', json={'features': rows[0].tolist()}).status_code == 200   # it serves
    r = httpx.post(f'{server.url}/predict?explain=2', json={'features': rows[0].tolist()})
    assert r.status_code == 422
    assert version in r.json()['detail'] and '\n' not in r.json()['detail']
    assert httpx.get(f'{server.url}/model').json()['serving']['explain'] is None
    assert read_champion(store)[0]['version'] == version
