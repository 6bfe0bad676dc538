"""The inference image without a Docker engine: Dockerfile-inference's build stage is replayed into a fresh
virtualenv (its COPY lines, then pip with the same requirements file), and its exact CMD and HEALTHCHECK are run
against a store holding a real promoted model. A serving dependency missing from requirements-inference.txt fails here."""
import configparser, json, os, re, shlex, shutil, signal, subprocess, sys
from pathlib import Path

import httpx
import pytest

from test_end_to_end import free_port, wait_ready

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = 'requirements-inference.txt'
EXAMPLE = json.loads((ROOT/'data'/'example_request.json').read_text())
# The training and notebook stack: none of it belongs in the serving image.
NOT_SERVING = {'papermill', 'ipykernel', 'jupyterlab', 'jupyter-client', 'nbformat', 'matplotlib', 'optuna', 'tqdm',
               'nbdev', 'moto', 'pytest'}


def dockerfile_stages(path):
    "Instructions of Dockerfile `path` by stage: a list of [(INSTRUCTION, arguments)] lists, continuations joined."
    stages, line = [], ''
    for raw in Path(path).read_text().splitlines():
        if not line and (not raw.strip() or raw.lstrip().startswith('#')): continue
        if raw.endswith('\\'): line += raw[:-1] + ' '; continue
        line += raw
        word, _, rest = line.strip().partition(' ')
        if word.upper() == 'FROM': stages.append([])
        stages[-1].append((word.upper(), rest.strip()))
        line = ''
    return stages


def exec_form(args):
    "The argument list of an exec-form (JSON array) CMD, ENTRYPOINT or HEALTHCHECK CMD; shell form is refused."
    assert args.startswith('['), f'not exec form (signals would not reach the process): {args}'
    return json.loads(args)


def image_env(stage):
    "The ENV settings of `stage`, as a dict."
    env = {}
    for word, args in stage:
        if word == 'ENV': env.update(kv.split('=', 1) for kv in shlex.split(args))
    return env


def instruction(stage, word):
    "Arguments of the last `word` instruction of `stage`."
    found = [args for w, args in stage if w == word]
    assert found, f'no {word} in the stage'
    return found[-1]


def healthcheck_cmd(stage):
    "The HEALTHCHECK's command (exec form), without its options."
    return exec_form(instruction(stage, 'HEALTHCHECK').split(' CMD ', 1)[1].strip())


def requirement_lines(path):
    return [l.strip() for l in Path(path).read_text().splitlines() if l.strip() and not l.lstrip().startswith('#')]


def test_inference_requirements_are_a_subset_of_settings_ini():
    cfg = configparser.ConfigParser(delimiters=['=']); cfg.read(ROOT/'settings.ini')
    runtime = cfg['DEFAULT']['requirements'].split()
    ours = requirement_lines(ROOT/REQUIREMENTS)
    assert ours and [r for r in ours if r not in runtime] == [], 'every line must be a settings.ini requirement, verbatim'
    names = {re.match(r'[A-Za-z0-9_.-]+', r).group().lower() for r in ours}
    assert names.isdisjoint(NOT_SERVING)


def test_the_image_installs_that_list_and_nothing_more():
    build, final = dockerfile_stages(ROOT/'Dockerfile-inference')
    runs = [args for w, args in build if w == 'RUN']
    assert f'pip install --no-cache-dir -r {REQUIREMENTS}' in runs and 'pip install --no-cache-dir --no-deps .' in runs
    assert [args for w, args in final if w == 'COPY'] == ['--from=build /opt/venv /opt/venv']
    assert instruction(final, 'USER').split(':')[0] not in ('', '0', 'root')
    assert '/health/ready' in ' '.join(healthcheck_cmd(final))


@pytest.fixture(scope='module')
def inference_venv(tmp_path_factory):
    "A fresh virtualenv built the way the image's build stage builds /opt/venv (pip's cache allowed)."
    tmp = tmp_path_factory.mktemp('image')
    build, venv = tmp/'build', tmp/'venv'
    build.mkdir()
    for word, args in dockerfile_stages(ROOT/'Dockerfile-inference')[0]:
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


def test_fresh_venv_holds_only_the_serving_stack(inference_venv):
    out = subprocess.run([inference_venv/'bin'/'python', '-m', 'pip', 'list', '--format', 'json'],
                         capture_output=True, text=True, check=True).stdout
    installed = {p['name'].lower().replace('_', '-') for p in json.loads(out)}
    assert 'fraud-mlops' in installed and 'lightgbm' in installed
    assert installed.isdisjoint(NOT_SERVING), installed & NOT_SERVING


def run_image(venv, stage, store, workdir, **env):
    "Start `stage`'s CMD from `venv` with the image's ENV, the store and a loopback port; return (process, url)."
    port = free_port()
    image = {k: v for k, v in image_env(stage).items() if k != 'PATH'}
    env = {**image, 'PATH': f"{venv/'bin'}:{os.environ['PATH']}", 'FRAUD_MLOPS_STORE': str(store),
           'UVICORN_HOST': '127.0.0.1', 'UVICORN_PORT': str(port), **env}
    proc = subprocess.Popen(exec_form(instruction(stage, 'CMD')), env=env, cwd=workdir,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return proc, f'http://127.0.0.1:{port}', env


def workers(pid):
    "Worker processes started by uvicorn `pid` (Linux): its children running multiprocessing's spawn_main."
    kids = Path(f'/proc/{pid}/task/{pid}/children').read_text().split()
    return [k for k in kids if b'spawn_main' in Path(f'/proc/{k}/cmdline').read_bytes()]


def test_image_cmd_serves_a_prediction_answers_its_healthcheck_and_stops_on_sigterm(inference_venv, store, add_candidate,
                                                                                      tmp_path):
    from fraud_mlops.promotion import promote
    version = add_candidate(store)
    assert promote(store, notify=False)['decision'] == 'promoted'
    final = dockerfile_stages(ROOT/'Dockerfile-inference')[-1]
    check = healthcheck_cmd(final)
    assert check[0] == 'python'
    python = str(inference_venv/'bin'/'python')
    proc, url, env = run_image(inference_venv, final, store.root, tmp_path, WEB_CONCURRENCY='2')
    try:
        try: wait_ready(url, proc)
        except AssertionError as e:                        # say why: a missing requirement shows in the log
            proc.kill(); raise AssertionError(f'{e}; the server said:\n{proc.communicate()[1][-4000:]}') from None
        assert len(workers(proc.pid)) == 2           # WEB_CONCURRENCY sets the worker processes
        answer = httpx.post(f'{url}/predict', json=EXAMPLE, timeout=10).json()
        assert answer['prediction'] == 'legit' and answer['model_version'] == version
        assert subprocess.run([python, *check[1:]], env=env, timeout=30).returncode == 0
        closed = {**env, 'UVICORN_PORT': str(free_port())}
        assert subprocess.run([python, *check[1:]], env=closed, capture_output=True, timeout=30).returncode != 0
        proc.send_signal(signal.SIGTERM)                   # what `docker stop` / ECS send first
        assert proc.wait(30) == 0
        assert 'Finished server process' in proc.stderr.read()
    finally:
        if proc.poll() is None: proc.kill(); proc.wait(10)
