"The walking skeleton as a user runs it: papermill trains, `fraud-mlops promote` promotes, uvicorn answers."
import json, socket, subprocess, sys
from pathlib import Path

import httpx

from fraud_mlops.data import CI_SUBSET, resolve_path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port():   # still imported by test_serving*.py until they take conftest's `free_port` fixture
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def test_train_promote_serve_answers_the_example_with_legit(cli, api_server, example_request, tmp_path):
    store = tmp_path/'s'
    subprocess.run([BIN/'papermill', ROOT/'nbs'/'03_train.ipynb', tmp_path/'out.ipynb', '-p', 'data_path',
                    resolve_path(CI_SUBSET), '-p', 'store', store], check=True, capture_output=True, cwd=tmp_path)
    r = cli('promote', '--store', store, '--no-notify')
    assert r.returncode == 0 and r.stdout.startswith('promoted:'), r.stderr
    version = json.loads((store/'champion.json').read_text())['version']
    url = api_server({'FRAUD_MLOPS_STORE': str(store)}).url   # `uvicorn fraud_mlops.serving:app`
    answer = httpx.post(f'{url}/predict', json=example_request, timeout=5).json()
    assert answer['prediction'] == 'legit' and answer['model_version'] == version
    assert 0 <= answer['fraud_probability'] < 0.5
    bad = httpx.post(f'{url}/predict', json={'features': example_request['features'][:29]}, timeout=5)
    assert bad.status_code == 422
