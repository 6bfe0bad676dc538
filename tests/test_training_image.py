"""The training image's job without a Docker engine: Dockerfile-training's exact ENTRYPOINT and CMD, with its ENV,
run from the project's virtualenv in a folder laid out like the image's /app (the committed CI subset under data/)."""
import json, os, shutil, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture
def run_job(dockerfile):
    "`run_job(app, store, *args, **env)`: the image's ENTRYPOINT + CMD + `args` in folder `app` with its ENV, `store` and `env` on top."
    final = dockerfile('Dockerfile-training')[-1]
    image = {k: v for k, v in final.env.items() if k != 'PATH'}
    assert image['FETCH_DATA'] == '0' and image['DATA_PATH'] == 'data/creditcard_ci.csv'
    def run(app, store, *args, **env):
        env = {**os.environ, **image, 'PATH': f"{BIN}:{os.environ['PATH']}", 'FRAUD_MLOPS_STORE': str(store),
               'FRAUD_MLOPS_TRAIN_NOTEBOOK': str(ROOT/'nbs'/'03_train.ipynb'), **env}
        cmd = final.command('ENTRYPOINT') + final.command('CMD') + list(args)
        return subprocess.run(cmd, env=env, cwd=app, capture_output=True, text=True)
    return run


def image_app(tmp_path):
    "A working folder holding what the image copies to /app/data."
    app = tmp_path/'app'
    (app/'data').mkdir(parents=True)
    shutil.copy(ROOT/'data'/'creditcard_ci.csv', app/'data'/'creditcard_ci.csv')
    return app


@pytest.mark.slow
def test_the_job_trains_on_the_default_data_then_promotes(run_job, tmp_path):
    store = tmp_path/'registry'
    r = run_job(image_app(tmp_path), store, '--no-notify')
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'promoted:' in r.stdout
    assert json.loads((store/'champion.json').read_text())['version'] in r.stdout


def test_a_failed_training_stops_the_job_before_promotion(run_job, tmp_path):
    store = tmp_path/'registry'
    r = run_job(image_app(tmp_path), store, '--no-notify', DATA_PATH='data/missing.csv')
    assert r.returncode == 2 and 'data/missing.csv: no such file' in r.stderr
    assert 'promote' not in r.stdout and not (store/'champion.json').exists()
