"The `fraud-mlops` command as a user types it."
import json, subprocess
from pathlib import Path

import pytest

from fraud_mlops.data import CI_SUBSET, resolve_path


@pytest.mark.slow
def test_promote_models_rollback_round_trip(cli, store, add_candidate):
    a = add_candidate(store, n_estimators=3, max_depth=1)
    b = add_candidate(store, n_estimators=30)
    r = cli('promote', '--store', store.root, '--version', a, '--no-notify')
    assert r.returncode == 0 and r.stdout.startswith(f'promoted: {a}')
    r = cli('promote', '--dry-run', '--no-notify', env={'FRAUD_MLOPS_STORE': str(store.root)})  # env instead of --store
    assert r.returncode == 0 and 'dry run: nothing changed' in r.stdout and f'promoted: {b}' in r.stdout
    rows = json.loads(cli('models', '--store', store.root, '--json').stdout)
    assert {x['version']: x['status'] for x in rows} == {a: 'champion', b: 'candidate'}
    assert cli('promote', '--store', store.root, '--no-notify').returncode == 0
    table = cli('models', '--store', store.root).stdout
    assert f'{b}  champion' in table and f'{a}  retired' in table
    r = cli('rollback', '--store', store.root, '--no-notify')
    assert r.returncode == 0 and f'rollback: {a}' in r.stdout
    r = cli('rollback', '--store', store.root, '--to', '20200101T000000.000Z-abcdef', '--no-notify')
    assert r.returncode == 4 and 'version 20200101T000000.000Z-abcdef not found' in r.stderr   # the store's failure: 4
    r = cli('rollback', '--store', store.root, '--to', 'nope', '--no-notify')
    assert r.returncode == 2 and "'nope' is not a version id" in r.stderr   # not a version name at all: bad input, 2


def test_store_typo_and_corrupt_manifest_are_clear_errors(cli, store, add_candidate):
    r = cli('models', '--store', store.root.parent/'registyr')
    assert r.returncode == 4 and 'does not exist' in r.stderr and 'Traceback' not in r.stderr
    v = add_candidate(store)
    (store.root/'versions'/v/'manifest.json').write_text('{truncated')
    r = cli('promote', '--store', store.root, '--no-notify')
    assert r.returncode == 4 and 'not valid JSON' in r.stderr


def test_notify_failure_is_reported_and_the_promotion_stands(cli, store, add_candidate):
    v = add_candidate(store)
    r = cli('promote', '--store', store.root, env={'API_URL': 'http://127.0.0.1:9', 'FRAUD_MLOPS_ADMIN_TOKEN': 't'})
    assert r.returncode == 0 and 'notified http://127.0.0.1:9' in r.stdout and 'error' not in r.stderr
    assert json.loads((store.root/'champion.json').read_text())['version'] == v


@pytest.mark.slow
def test_history_floor_and_pruning_from_the_command_line(cli, store, add_candidate):
    weak = add_candidate(store, n_estimators=3, max_depth=1)
    r = cli('promote', '--store', store.root, '--min-f1', '0.999', '--no-notify', '--prune-rejected')
    assert r.returncode == 0 and r.stdout.startswith(f'rejected: {weak}') and f'pruned 1 rejected version(s): {weak}' in r.stdout
    good = add_candidate(store, n_estimators=30)
    assert cli('promote', '--store', store.root, '--no-notify').returncode == 0
    hist = cli('models', '--store', store.root, '--history').stdout.splitlines()
    assert hist[0].split()[:4] == ['time', 'decision', 'candidate', 'champion']
    assert [line.split()[1:3] for line in hist[1:]] == [['rejected', weak], ['promoted', good]]
    log = json.loads(cli('models', '--store', store.root, '--history', '--json').stdout)
    assert log[0]['reason'].endswith('is below the floor 0.999') and log[1]['by']


def test_bad_input_is_2_and_a_bad_setting_names_its_variable(cli, tmp_path):
    r = cli('train', '--data', tmp_path/'missing.csv', '--store', tmp_path)
    assert (r.returncode, r.stderr) == (2, f"error: {tmp_path/'missing.csv'}: no such file (run `fraud-mlops fetch-data` for the full dataset)\n")
    r = cli('score', tmp_path/'in.csv', tmp_path/'out.csv', '--store', tmp_path, env={'FRAUD_MLOPS_CHUNK_ROWS': 'lots'})
    assert (r.returncode, r.stderr) == (2, "error: FRAUD_MLOPS_CHUNK_ROWS='lots': expected a whole number, 1 or more\n")
    r = cli('train', '--data', resolve_path(CI_SUBSET), '--store', tmp_path, env={'FRAUD_MLOPS_TRAIN_NOTEBOOK': str(tmp_path/'nope.ipynb')})
    assert r.returncode == 2 and 'set FRAUD_MLOPS_TRAIN_NOTEBOOK' in r.stderr


FAILING_JOB = {'DataError': ('from fraud_mlops.data import DataError; raise DataError("x.csv: no rows")', 2,
                             'error: training failed: DataError: x.csv: no rows (see {out})'),
               'ConflictError': ('from fraud_mlops.store import ConflictError; raise ConflictError("champion moved")', 3,
                                 'error: training failed: ConflictError: champion moved (see {out})'),
               'IntegrityError': ('from fraud_mlops.store import IntegrityError; raise IntegrityError("manifest corrupt")', 4,
                                  'error: training failed: IntegrityError: manifest corrupt (see {out})'),
               'KeyError': ('{}["fold"]', 1, "error: training job failed: KeyError: 'fold'; the executed notebook is {out}")}


@pytest.mark.slow
@pytest.mark.parametrize('ename', FAILING_JOB)
def test_a_failed_training_job_exits_by_the_kind_of_its_error(cli, tmp_path, ename):
    "The notebook's own exception decides: bad input 2, conflict 3, store 4; anything else is the job's failure (1), never bad input."
    import nbformat
    from fraud_mlops.data import CI_SUBSET, resolve_path
    code, exit_code, message = FAILING_JOB[ename]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell('data_path = store = result_path = None', metadata={'tags': ['parameters']}),
                                         nbformat.v4.new_code_cell(code)])
    nb.metadata['kernelspec'] = {'name': 'python3', 'display_name': 'python3', 'language': 'python'}
    nbformat.write(nb, tmp_path/'job.ipynb')
    out = tmp_path/'runs'/'t.ipynb'
    r = cli('train', '--data', resolve_path(CI_SUBSET), '--store', tmp_path/'s', '--output', out, env={'FRAUD_MLOPS_TRAIN_NOTEBOOK': str(tmp_path/'job.ipynb')})
    assert (r.returncode, r.stderr.strip().splitlines()[-1]) == (exit_code, message.format(out=out)), r.stderr


def test_make_help_lists_every_documented_target():
    "`make help` prints each target that carries a `## ` description, with that description."
    import re
    root = Path(__file__).resolve().parent.parent
    documented = re.findall(r'^([a-z-]+):.*## (.*)$', (root/'Makefile').read_text(), re.M)
    out = subprocess.run(['make', '-s', 'help'], cwd=root, capture_output=True, text=True, check=True).stdout
    assert [line.split()[0] for line in out.splitlines()] == [t for t, _ in documented]
    assert {'help', 'install', 'run', 'test', 'test-fast', 'bench', 'bench-quality'} <= {t for t, _ in documented}
