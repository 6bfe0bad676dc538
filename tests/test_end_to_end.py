"The walking skeleton as a user runs it: papermill trains, `fraud-mlops promote` promotes, uvicorn answers."
import json

import httpx
import pytest


@pytest.mark.slow
def test_train_promote_serve_answers_the_example_with_legit(papermill_train, cli, api_server, example_request, tmp_path):
    store = tmp_path/'s'
    papermill_train(tmp_path/'out.ipynb', store)
    r = cli('promote', '--store', store, '--no-notify')
    assert r.returncode == 0 and r.stdout.startswith('promoted:'), r.stderr
    version = json.loads((store/'champion.json').read_text())['version']
    url = api_server({'FRAUD_MLOPS_STORE': str(store)}).url   # `uvicorn fraud_mlops.serving:app`
    answer = httpx.post(f'{url}/predict', json=example_request, timeout=5).json()
    assert answer['prediction'] == 'legit' and answer['model_version'] == version
    assert 0 <= answer['fraud_probability'] < 0.5
    bad = httpx.post(f'{url}/predict', json={'features': example_request['features'][:29]}, timeout=5)
    assert bad.status_code == 422
