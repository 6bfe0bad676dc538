"""Shared test scaffolding, one place each: the real CI subset, temporary stores, small candidates and champions trained on
real rows, the `fraud-mlops` command, free loopback ports, real API servers, the AWS/moto environment, the Dockerfiles.
Helpers that tests call are fixtures returning the callable; test files never import each other (or this file)."""
import io, json, os, shlex, socket, subprocess, sys, time
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest

from fraud_mlops.data import CI_SUBSET, FEATURES, load_transactions, resolve_path
from fraud_mlops.drift import training_reference
from fraud_mlops.registry import read_champion, save_version, set_champion
from fraud_mlops.store import open_store
from fraud_mlops.train import build_manifest, train_candidate

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture(scope='session', autouse=True)
def runtime_cache_folder(tmp_path_factory):
    "Every test (and every process it starts) caches prepared runtimes in a folder of this run, never in the user's cache."
    folder = tmp_path_factory.mktemp('runtime-cache')
    mp = pytest.MonkeyPatch(); mp.setenv('FRAUD_MLOPS_CACHE_DIR', str(folder))
    yield folder
    mp.undo()


@pytest.fixture(scope='session', autouse=True)
def key_folder(tmp_path_factory):
    """Every test (and every process it starts) signs with, and trusts, the key pair of a folder of this run, made on first use:
    never the user's keys, and no key configured in the developer's shell leaks in."""
    folder = tmp_path_factory.mktemp('keys') / 'keys'
    mp = pytest.MonkeyPatch(); mp.setenv('FRAUD_MLOPS_KEY_DIR', str(folder))
    for k in ('FRAUD_MLOPS_SIGNING_KEY', 'FRAUD_MLOPS_PUBLIC_KEYS', 'FRAUD_MLOPS_INSECURE_ALLOW_UNSIGNED'): mp.delenv(k, raising=False)
    yield folder
    mp.undo()


@pytest.fixture(scope='session')
def ci_df():
    return load_transactions(resolve_path(CI_SUBSET))


@pytest.fixture(scope='session')
def example_request():
    "data/example_request.json, the request the README posts (a legitimate transaction)."
    return json.loads((ROOT/'data'/'example_request.json').read_text())


@pytest.fixture(scope='session')
def fetched(tmp_path_factory):
    "The full dataset fetched into a fresh folder, exactly as `fraud-mlops fetch-data` does (needs the package index); one download per run."
    from fraud_mlops.data import fetch_dataset
    return fetch_dataset(tmp_path_factory.mktemp('data')/'creditcard.csv', progress=False)


@pytest.fixture(scope='session')
def full_xy(fetched):
    "(X, y) of all 284,807 rows of the fetched dataset."
    from fraud_mlops.modelling import features_and_labels
    return features_and_labels(load_transactions(fetched))


@pytest.fixture
def store(tmp_path):
    return open_store(tmp_path/'registry', create=True)


@pytest.fixture
def add_candidate(ci_df):
    "`add_candidate(store, **params)`: train a small candidate on the CI subset into `store`; return its version."
    def add(store, **params):
        params = {'model': 'lgbm', 'n_estimators': 20, 'n_jobs': 1, **params}   # mechanics, not quality: the small, fast model
        r = train_candidate(ci_df, **params)
        m = build_manifest(r, CI_SUBSET, 'ci', len(ci_df), int(ci_df.Class.sum()), params)
        reference = training_reference(ci_df[FEATURES].to_numpy(), r.evidence['p'])  # as the training job saves it
        return save_version(store, r.model, m, r.evidence['X'], r.evidence['y'], r.evidence['p'], reference=reference)['version']
    return add


@pytest.fixture
def add_champion(add_candidate):
    "`add_champion(store, **params)`: `add_candidate`, then promoted through the real gate (`fraud_mlops.promotion.promote`); its version."
    from fraud_mlops.promotion import promote
    def add(store, **params):
        v = add_candidate(store, **params)
        d = promote(store, v, notify=False)
        assert d['decision'] == 'promoted', d
        return v
    return add


@pytest.fixture
def champion(store, add_champion):
    "`store` with a promoted champion (a small candidate of the CI subset); returns its version."
    return add_champion(store)


@pytest.fixture(scope='session')
def save_as_champion():
    """`save_as_champion(store, model, X, y, threshold=0.5)`: save fitted `model` (evidence: the first 100 rows) as a new version
    and point the champion at it directly, without the promotion gate; returns the version."""
    def save(store, model, X, y, threshold=0.5):
        v = save_version(store, model, {'threshold': threshold, 'metrics': {'test': {'f1': 0.5}}}, X[:100], y[:100])['version']
        set_champion(store, v, read_champion(store)[1])
        return v
    return save


class Payload:
    "A pickle that runs code when it is loaded: it creates the file `marker` (what an attacker's shell command would do)."
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (Path.touch, (Path(self.marker),))


@pytest.fixture(scope='session')
def plant_payload():
    """`plant_payload(store, version, marker)`: replace `version`'s model by a pickle that creates `marker` when loaded, and fix the
    SHA-256 in its manifest: all that write access to a store allows (the signature cannot follow). Returns the pickle's bytes."""
    def plant(store, version, marker):
        import joblib
        from fraud_mlops.store import sha256_hex
        evil = io.BytesIO(); joblib.dump(Payload(marker), evil); evil = evil.getvalue()
        m = json.loads(store.get(f'versions/{version}/manifest.json'))
        store.put(f'versions/{version}/model.joblib', evil)
        store.put(f'versions/{version}/manifest.json', json.dumps({**m, 'model': {**m['model'], 'sha256': sha256_hex(evil)}}).encode())
        return evil
    return plant


# --- processes: the command line, loopback ports, real API servers

@pytest.fixture(scope='session')
def cli():
    "`cli(*args, env=None, cwd=None)`: run `fraud-mlops ARGS` as a user would, `env` on top of ours (None unsets); the finished process."
    def run(*args, env=None, cwd=None):
        env = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
        return subprocess.run([BIN/'fraud-mlops', *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd)
    return run


@pytest.fixture(scope='session')
def papermill_train():
    """`papermill_train(out, store, data=None, **params)`: `papermill nbs/03_train.ipynb OUT -p data_path DATA -p store STORE
    [-p NAME VALUE]...` in out's folder, as users run the training job (DATA: the CI subset unless given); fails the test with
    the job's output unless it succeeds."""
    def run(out, store, data=None, **params):
        args = [BIN/'papermill', ROOT/'nbs'/'03_train.ipynb', out, '-p', 'data_path', data or resolve_path(CI_SUBSET), '-p', 'store', store]
        for name, value in params.items(): args += ['-p', name, value]
        r = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=Path(out).parent)
        assert r.returncode == 0, f'the training job failed:\n{r.stderr[-4000:]}'
        return r
    return run


@pytest.fixture(scope='session')
def free_port():
    "`free_port()`: a loopback TCP port nothing listens on (bound and released: until someone takes it, connections are refused)."
    def port():
        with socket.socket() as s:
            s.bind(('127.0.0.1', 0)); return s.getsockname()[1]
    return port


class Server(NamedTuple):
    url: str                  # http://127.0.0.1:PORT
    proc: subprocess.Popen
    log: Path                 # its stdout and stderr
    env: dict                 # the whole environment it runs with

    def stop(self):
        "SIGTERM (SIGKILL after 15 s) unless it has exited; its log is complete afterwards."
        if self.proc.poll() is None:
            self.proc.terminate()
            try: self.proc.wait(15)
            except subprocess.TimeoutExpired: self.proc.kill(); self.proc.wait()


@pytest.fixture
def api_server(tmp_path, free_port):
    """`api_server(env=None, cmd=None, wait='/health/ready', seconds=60, clean_env=False)`: start the API as a subprocess in
    `tmp_path` on a free loopback port (UVICORN_HOST and UVICORN_PORT set last, `{port}` in `cmd` replaced), with `env` on top of
    ours (of nothing with `clean_env`, as in a container); return a Server once GET `wait` answers 200. `cmd` defaults to
    `uvicorn fraud_mlops.serving:app`; e.g. `['fraud-mlops', 'serve', '--port', '{port}']` or an image's CMD.
    At teardown each server is stopped (`Server.stop` does it sooner) and the end of its log printed, which pytest shows when
    the test failed."""
    started = []
    def start(env=None, cmd=None, wait='/health/ready', seconds=60, clean_env=False):
        port = free_port()
        env = {**({} if clean_env else os.environ), **(env or {}), 'UVICORN_HOST': '127.0.0.1', 'UVICORN_PORT': str(port)}
        cmd = [str(a).replace('{port}', str(port)) for a in cmd or [BIN/'uvicorn', 'fraud_mlops.serving:app']]
        log = tmp_path/f'server-{len(started)}.log'
        with open(log, 'wb') as out:
            proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
        server = Server(f'http://127.0.0.1:{port}', proc, log, env)
        started.append((server, cmd))
        deadline = time.monotonic() + seconds
        while True:
            assert proc.poll() is None, f'{cmd} exited with {proc.returncode}:\n{log.read_text(errors="replace")[-4000:]}'
            try:
                if httpx.get(server.url + wait, timeout=2).status_code == 200: return server
            except httpx.TransportError: pass
            assert time.monotonic() < deadline, f'{server.url}{wait} not 200 within {seconds} s:\n{log.read_text(errors="replace")[-4000:]}'
            time.sleep(0.1)
    yield start
    for server, cmd in started:
        server.stop()
        print(f'--- {shlex.join(cmd)} on {server.url} (exit {server.proc.returncode}), end of its log:\n'
              f'{server.log.read_text(errors="replace")[-4000:]}')


# --- AWS: moto's in-process mock for unit tests, a real moto server over HTTP for integration tests ---

MOTO = {'AWS_ACCESS_KEY_ID': 'testing', 'AWS_SECRET_ACCESS_KEY': 'testing', 'AWS_MAX_ATTEMPTS': '2',
        'FRAUD_MLOPS_S3_CONNECT_TIMEOUT': '2', 'FRAUD_MLOPS_S3_READ_TIMEOUT': '20'}


@pytest.fixture
def aws_env(monkeypatch):
    """`aws_env(endpoint=None, **values)`: clear every AWS_* setting of the developer's shell (tests never touch a real account)
    and the signing key; set a region, no instance metadata, with `endpoint` a moto server's URL, fake credentials, bounded
    retries and timeouts, then `values`. Returns the settings made, for a subprocess's environment."""
    def set_env(endpoint=None, **values):
        for k in list(os.environ):
            if k.startswith('AWS_') and k != 'AWS_CA_BUNDLE': monkeypatch.delenv(k)
        monkeypatch.delenv('FRAUD_MLOPS_SIGNING_KEY', raising=False)
        made = {'AWS_DEFAULT_REGION': 'us-east-1', 'AWS_EC2_METADATA_DISABLED': 'true',
                **({'AWS_ENDPOINT_URL': endpoint, **MOTO} if endpoint else {}), **values}
        for k, v in made.items(): monkeypatch.setenv(k, v)
        return made
    return set_env


@pytest.fixture(scope='session')
def moto_server():
    "A moto server on a free loopback port for the whole session; yields its endpoint URL."
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address='127.0.0.1', port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f'http://{host}:{port}'
    server.stop()


@pytest.fixture
def s3_uri(moto_server, aws_env):
    "The environment pointing at the moto server (`aws_env`) and a fresh bucket there; returns s3://bucket/registry."
    import uuid
    from fraud_mlops.store import s3_client
    aws_env(moto_server)
    bucket = f'fraud-{uuid.uuid4().hex[:12]}'
    s3_client().create_bucket(Bucket=bucket)
    return f's3://{bucket}/registry'


@pytest.fixture
def mock_s3_uri(aws_env):
    "A bucket in moto's in-process mock (`mock_aws`, no network); returns s3://fraud-models/registry."
    from moto import mock_aws
    from fraud_mlops.store import s3_client
    aws_env()
    with mock_aws():
        s3_client().create_bucket(Bucket='fraud-models')
        yield 's3://fraud-models/registry'


# --- the Dockerfiles, read the way Docker reads them

class Stage(list):
    "One stage of a Dockerfile: its (INSTRUCTION, arguments) pairs in order."
    def last(self, word):
        "Arguments of the stage's last `word` instruction."
        found = [args for w, args in self if w == word]
        assert found, f'no {word} in the stage'
        return found[-1]

    def command(self, word):
        "The argument list of CMD, ENTRYPOINT or HEALTHCHECK (its CMD, options left out); shell form is refused."
        args = self.last(word).split(' CMD ', 1)[1].strip() if word == 'HEALTHCHECK' else self.last(word)
        assert args.startswith('['), f'not exec form (signals would not reach the process): {args}'
        return json.loads(args)

    @property
    def env(self):
        "The ENV settings, as a dict."
        return dict(kv.split('=', 1) for w, args in self if w == 'ENV' for kv in shlex.split(args))


@pytest.fixture(scope='session')
def dockerfile():
    "`dockerfile(name)`: the stages of the project's Dockerfile `name`, each a Stage; comments skipped, continuations joined."
    def stages(name):
        found, line = [], ''
        for raw in (ROOT/name).read_text().splitlines():
            if not line and (not raw.strip() or raw.lstrip().startswith('#')): continue
            if raw.endswith('\\'): line += raw[:-1] + ' '; continue
            line += raw
            word, _, rest = line.strip().partition(' ')
            if word.upper() == 'FROM': found.append(Stage())
            found[-1].append((word.upper(), rest.strip()))
            line = ''
        return found
    return stages
