"The walking skeleton as a user runs it: papermill trains, `fraud-mlops promote` promotes, uvicorn answers."
import json, os, socket, subprocess, sys, time
from pathlib import Path

import httpx

from fraud_mlops.data import CI_SUBSET, resolve_path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
EXAMPLE = json.loads((ROOT/'data'/'example_request.json').read_text())


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def wait_ready(url, proc, seconds=60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, f'server exited with {proc.returncode}'
        try:
            if httpx.get(f'{url}/health/ready', timeout=1).status_code == 200: return
        except httpx.TransportError: pass
        time.sleep(0.2)
    raise AssertionError(f'{url} not ready within {seconds} s')


def test_train_promote_serve_answers_the_example_with_legit(tmp_path):
    store = tmp_path/'s'
    subprocess.run([BIN/'papermill', ROOT/'nbs'/'03_train.ipynb', tmp_path/'out.ipynb', '-p', 'data_path',
                    resolve_path(CI_SUBSET), '-p', 'store', store], check=True, capture_output=True, cwd=tmp_path)
    r = subprocess.run([BIN/'fraud-mlops', 'promote', '--store', store, '--no-notify'], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith('promoted:'), r.stderr
    version = json.loads((store/'champion.json').read_text())['version']
    port = free_port(); url = f'http://127.0.0.1:{port}'
    proc = subprocess.Popen([BIN/'uvicorn', 'fraud_mlops.serving:app', '--host', '127.0.0.1', '--port', str(port)],
                            env={**os.environ, 'FRAUD_MLOPS_STORE': str(store)}, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_ready(url, proc)
        answer = httpx.post(f'{url}/predict', json=EXAMPLE, timeout=5).json()
        assert answer['prediction'] == 'legit' and answer['model_version'] == version
        assert 0 <= answer['fraud_probability'] < 0.5
        bad = httpx.post(f'{url}/predict', json={'features': EXAMPLE['features'][:29]}, timeout=5)
        assert bad.status_code == 422
    finally:
        proc.terminate(); proc.wait(10)
