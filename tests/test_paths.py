"""Paths that mean the same everywhere: a relative store or data path is the project root's, whether the process runs at the
root, in nbs/ (a JupyterLab kernel, a papermill job), elsewhere, or from a copy of the package with no project around it;
and `make lab` starts as root."""
import json, os, shutil, subprocess, sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PROBE = ("import json; from fraud_mlops.config import settings; from fraud_mlops.data import resolve_path, CI_SUBSET; "
         "from fraud_mlops.store import store_uri; import fraud_mlops; "
         "print(json.dumps({'store': settings().store, 'data': str(resolve_path(CI_SUBSET)), 'explicit': store_uri('models/x'), "
         "'package': fraud_mlops.__file__}))")


def probe(cwd, store=None, pythonpath=None):
    "What a process started in `cwd` takes the store, the CI subset and `models/x` to be."
    env = {k: v for k, v in os.environ.items() if k not in ('FRAUD_MLOPS_STORE', 'PYTHONPATH')}
    if store is not None: env['FRAUD_MLOPS_STORE'] = store
    if pythonpath: env['PYTHONPATH'] = str(pythonpath)
    r = subprocess.run([sys.executable, '-c', PROBE], cwd=cwd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize('where', ['root', 'nbs', 'elsewhere'])
@pytest.mark.parametrize('store', [None, 'registry', './registry'])
def test_a_relative_store_and_data_path_are_the_project_roots_wherever_the_process_runs(where, store, tmp_path):
    cwd = {'root': ROOT, 'nbs': ROOT/'nbs', 'elsewhere': tmp_path}[where]
    p = probe(cwd, store)
    assert p['store'] == str(ROOT/'registry')                       # never nbs/registry, never tmp_path/registry
    assert p['data'] == str(ROOT/'data'/'creditcard_ci.csv') and Path(p['data']).exists()
    assert p['explicit'] == str(ROOT/'models'/'x')                   # `--store models/x`, `-p store models/x` alike


def test_absolute_and_s3_stores_are_kept(tmp_path):
    assert probe(ROOT/'nbs', str(tmp_path/'reg'))['store'] == str(tmp_path/'reg')
    assert probe(ROOT/'nbs', 's3://bucket/prefix')['store'] == 's3://bucket/prefix'


def test_an_installed_copy_uses_the_clone_it_runs_in_else_the_working_folder(tmp_path):
    "A copy of the package in site-packages (no settings.ini above it): a clone's root from its nbs/, else the working folder."
    site = tmp_path/'site-packages'
    shutil.copytree(ROOT/'fraud_mlops', site/'fraud_mlops', ignore=shutil.ignore_patterns('__pycache__'))
    clone, work = tmp_path/'clone', tmp_path/'work'
    (clone/'nbs').mkdir(parents=True); work.mkdir()
    shutil.copy(ROOT/'settings.ini', clone/'settings.ini')
    p = probe(clone/'nbs', pythonpath=site)
    assert Path(p['package']).parent == site/'fraud_mlops'           # the copy, not the editable install
    assert (p['store'], p['data']) == (str(clone/'registry'), str(clone/'data'/'creditcard_ci.csv'))
    p = probe(work, 'models', pythonpath=site)
    assert (p['store'], p['explicit']) == (str(work/'models'), str(work/'models'/'x'))


def test_a_papermill_job_with_its_kernel_in_nbs_uses_the_roots_store(tmp_path):
    "The notebook's view, as in `make lab` (kernels start in nbs/) and `papermill --cwd nbs`."
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(PROBE.replace('print(', 'result = (') + '\nprint(result)')])
    nb.metadata['kernelspec'] = {'name': 'python3', 'display_name': 'python3', 'language': 'python'}
    nbformat.write(nb, tmp_path/'probe.ipynb')
    env = {k: v for k, v in os.environ.items() if k != 'FRAUD_MLOPS_STORE'}
    r = subprocess.run([BIN/'papermill', tmp_path/'probe.ipynb', tmp_path/'out.ipynb', '--cwd', ROOT/'nbs', '--no-progress-bar'],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(nbformat.read(tmp_path/'out.ipynb', 4).cells[0].outputs[0]['text'])
    assert (out['store'], out['data']) == (str(ROOT/'registry'), str(ROOT/'data'/'creditcard_ci.csv'))


def test_the_cli_in_nbs_names_the_roots_store(cli):
    r = cli('models', '--store', 'no-such-store-here', cwd=ROOT/'nbs')
    assert r.returncode == 4 and f"store {ROOT/'no-such-store-here'} does not exist" in r.stderr, r.stderr
    assert not (ROOT/'nbs'/'no-such-store-here').exists() and not (ROOT/'no-such-store-here').exists()


@pytest.mark.parametrize('uid', ['0', '1000'])
def test_make_lab_allows_root_only_as_root(tmp_path, uid):
    "`jupyter lab` refuses to start as root without --allow-root (containers); a user's run keeps the default."
    fake = tmp_path/'bin'; fake.mkdir()
    (fake/'id').write_text(f'#!/bin/sh\necho {uid}\n'); (fake/'id').chmod(0o755)
    r = subprocess.run(['make', '-n', '-o', 'install', 'lab'], cwd=ROOT, capture_output=True, text=True, check=True,
                       env={**os.environ, 'PATH': f"{fake}:{os.environ['PATH']}"})
    line, = [l for l in r.stdout.splitlines() if 'jupyter lab' in l]
    assert line.split()[1:] == ['lab', '--notebook-dir=nbs', *(['--allow-root'] if uid == '0' else [])]
