"""The inference image without a Docker engine: Dockerfile-inference's build stage is replayed into a fresh
virtualenv (its COPY lines, then pip with the same requirements file), and its exact CMD and HEALTHCHECK are run
against a store holding a real promoted model. A serving dependency missing from requirements-inference.txt fails here."""
import configparser, json, os, re, shlex, shutil, signal, subprocess, sys
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = 'requirements-inference.txt'
# The training and notebook stack: none of it belongs in the serving image.
NOT_SERVING = {'papermill', 'ipykernel', 'jupyterlab', 'jupyter-client', 'nbformat', 'matplotlib', 'optuna', 'tqdm',
               'nbdev', 'moto', 'pytest'}


def requirement_lines(path):
    return [l.strip() for l in Path(path).read_text().splitlines() if l.strip() and not l.lstrip().startswith('#')]


def test_inference_requirements_are_a_subset_of_settings_ini():
    cfg = configparser.ConfigParser(delimiters=['=']); cfg.read(ROOT/'settings.ini')
    runtime = cfg['DEFAULT']['requirements'].split()
    ours = requirement_lines(ROOT/REQUIREMENTS)
    assert ours and [r for r in ours if r not in runtime] == [], 'every line must be a settings.ini requirement, verbatim'
    names = {re.match(r'[A-Za-z0-9_.-]+', r).group().lower() for r in ours}
    assert names.isdisjoint(NOT_SERVING)


def test_the_image_installs_that_list_and_nothing_more(dockerfile):
    build, final = dockerfile('Dockerfile-inference')
    runs = [args for w, args in build if w == 'RUN']
    assert f'pip install --no-cache-dir -r {REQUIREMENTS}' in runs and 'pip install --no-cache-dir --no-deps .' in runs
    assert [args for w, args in final if w == 'COPY'] == ['--from=build /opt/venv /opt/venv']
    assert final.last('USER').split(':')[0] not in ('', '0', 'root')
    assert '/health/ready' in ' '.join(final.command('HEALTHCHECK'))


@pytest.fixture(scope='module')
def inference_venv(tmp_path_factory, dockerfile):
    "A fresh virtualenv built the way the image's build stage builds /opt/venv (pip's cache allowed)."
    tmp = tmp_path_factory.mktemp('image')
    build, venv = tmp/'build', tmp/'venv'
    build.mkdir()
    for word, args in dockerfile('Dockerfile-inference')[0]:
        if word != 'COPY': continue
        *sources, dest = shlex.split(args)
        for s in sources:
            target = build/dest/Path(s).name if dest.endswith('/') and not s.endswith('/') else build/dest
            if (ROOT/s).is_dir(): shutil.copytree(ROOT/s, target, ignore=shutil.ignore_patterns('__pycache__'))
            else: target.parent.mkdir(parents=True, exist_ok=True); shutil.copy(ROOT/s, target)
    subprocess.run([sys.executable, '-m', 'venv', venv], check=True)
    pip = [venv/'bin'/'python', '-m', 'pip', 'install', '--quiet', '--disable-pip-version-check']
    subprocess.run(pip + ['-r', REQUIREMENTS], cwd=build, check=True)
    subprocess.run(pip + ['--no-deps', '.'], cwd=build, check=True)
    return venv


@pytest.mark.slow
@pytest.mark.network
def test_fresh_venv_holds_only_the_serving_stack(inference_venv):
    out = subprocess.run([inference_venv/'bin'/'python', '-m', 'pip', 'list', '--format', 'json'],
                         capture_output=True, text=True, check=True).stdout
    installed = {p['name'].lower().replace('_', '-') for p in json.loads(out)}
    assert 'fraud-mlops' in installed and 'lightgbm' in installed
    assert installed.isdisjoint(NOT_SERVING), installed & NOT_SERVING


def workers(pid):
    "Worker processes started by uvicorn `pid` (Linux): its children running multiprocessing's spawn_main."
    kids = Path(f'/proc/{pid}/task/{pid}/children').read_text().split()
    return [k for k in kids if b'spawn_main' in Path(f'/proc/{k}/cmdline').read_bytes()]


@pytest.mark.slow
@pytest.mark.network
def test_image_cmd_serves_a_prediction_answers_its_healthcheck_and_stops_on_sigterm(inference_venv, dockerfile, champion,
                                                                                      api_server, example_request, free_port, store):
    "The final stage's CMD with its ENV (PATH to the fresh venv, a loopback port) serves `store`'s champion."
    final = dockerfile('Dockerfile-inference')[-1]
    check = final.command('HEALTHCHECK')
    assert check[0] == 'python'
    python = str(inference_venv/'bin'/'python')
    image = {k: v for k, v in final.env.items() if k != 'PATH'}
    from fraud_mlops.signing import public_text, signing_key
    server = api_server({**image, 'PATH': f"{inference_venv/'bin'}:{os.environ['PATH']}", 'FRAUD_MLOPS_STORE': str(store.root),
                         'FRAUD_MLOPS_PUBLIC_KEYS': public_text(signing_key()),   # as a task gets it: the public key only
                         'WEB_CONCURRENCY': '2'}, cmd=final.command('CMD'), clean_env=True)   # a missing requirement shows in its log
    assert len(workers(server.proc.pid)) == 2           # WEB_CONCURRENCY sets the worker processes
    answer = httpx.post(f'{server.url}/predict', json=example_request, timeout=10).json()
    assert answer['prediction'] == 'legit' and answer['model_version'] == champion
    assert subprocess.run([python, *check[1:]], env=server.env, timeout=30).returncode == 0
    closed = {**server.env, 'UVICORN_PORT': str(free_port())}
    assert subprocess.run([python, *check[1:]], env=closed, capture_output=True, timeout=30).returncode != 0
    server.proc.send_signal(signal.SIGTERM)                   # what `docker stop` / ECS send first
    assert server.proc.wait(30) == 0
    assert 'Finished server process' in server.log.read_text()
