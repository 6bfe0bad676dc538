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
    assert r.returncode == 3 and r.stdout.startswith(f'rejected: {weak}') and f'pruned 1 rejected version(s): {weak}' in r.stdout
    good = add_candidate(store, n_estimators=30)
    assert cli('promote', '--store', store.root, '--no-notify').returncode == 0
    hist = cli('models', '--store', store.root, '--history').stdout.splitlines()
    assert hist[0].split()[:4] == ['time', 'decision', 'candidate', 'champion']
    assert [line.split()[1:3] for line in hist[1:]] == [['rejected', weak], ['promoted', good]]
    log = json.loads(cli('models', '--store', store.root, '--history', '--json').stdout)
    assert log[0]['reason'].endswith('is below the floor 0.999') and log[1]['by']


def test_bad_input_is_2_and_a_bad_setting_names_its_variable(cli, tmp_path):
    r = cli('train', '--data', tmp_path/'missing.csv', '--store', tmp_path)
    assert (r.returncode, r.stderr) == (2, f"store: {tmp_path}\nerror: {tmp_path/'missing.csv'}: no such file (run `fraud-mlops fetch-data` for the full dataset)\n")
    r = cli('score', tmp_path/'in.csv', tmp_path/'out.csv', '--store', tmp_path, env={'FRAUD_MLOPS_CHUNK_ROWS': 'lots'})
    assert (r.returncode, r.stderr) == (2, f"store: {tmp_path}\nerror: FRAUD_MLOPS_CHUNK_ROWS='lots': expected a whole number, 1 or more\n")
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


def test_monitor_without_a_log_says_so_and_no_condition_holds(cli, store):
    r = cli('monitor', '--store', store.root, '--fail-on', 'recall<0.99,psi>0')
    assert (r.returncode, r.stdout, r.stderr) == (0, f'no predictions logged in {store.root} yet\n', f'store: {store.root}\n')
    r = cli('monitor', '--store', store.root, '--json', '--since', '2026-12-01')
    assert r.returncode == 0 and json.loads(r.stdout)['rows'] == 0
    assert r.stderr == f'store: {store.root}\nno predictions logged in {store.root} yet (since 2026-12-01T00:00:00+00:00)\n'
    r = cli('monitor', '--store', store.root, '--fail-on', 'recall<<0.5')
    assert r.returncode == 2 and "bad operator '<<'" in r.stderr
    r = cli('monitor', '--store', store.root, '--until', '2026-12-01T25:00')
    assert r.returncode == 2 and "'2026-12-01T25:00' is not an ISO date or time" in r.stderr


def test_labels_monitor_and_export_as_a_user_runs_them(cli, store, ci_df, tmp_path):
    "A log written by PredictionLog; then the commands: labels (text and --json), monitor (--json, --fail-on 3 and 0), export (--append-to)."
    import numpy as np
    import pandas as pd
    from fraud_mlops.data import FEATURES, load_transactions
    from fraud_mlops.predlog import PredictionLog
    rows = ci_df.iloc[:1000]
    p = np.linspace(0, 1, 1000)                          # placeholder scores (the model is not the point): quality is whatever it is
    plog = PredictionLog(store)
    plog.record_many(1764590400.0, 'req', [f'tx-{i}' for i in range(1000)], 'v1', p, p >= 0.5, rows[FEATURES].to_numpy())  # 2025-12-01T12:00Z
    plog.close()
    pd.DataFrame({'transaction_id': [f'tx-{i}' for i in range(400)] + ['never-1'], 'label': [*rows.Class[:400], 1]}).to_csv(tmp_path/'l.csv', index=False)
    r = cli('labels', 'add', tmp_path/'l.csv', '--store', store.root, '--json')
    added = json.loads(r.stdout)
    assert (r.returncode, added['written'], added['matched'], added['unmatched_examples']) == (0, 401, 400, ['never-1'])
    s = json.loads(cli('monitor', '--store', store.root, '--json').stdout)
    assert (s['rows'], s['labels'], s['versions'][0]['labelled']) == (1000, {'total': 401, 'matched': 400, 'unmatched': 1}, 400)
    r = cli('monitor', '--store', store.root, '--fail-on', 'coverage<0.5')
    assert r.returncode == 3 and r.stderr == f'store: {store.root}\nerror: --fail-on held: coverage<0.5 (coverage 0.4, version v1)\n'
    assert r.stdout.startswith(f'{store.root}: 1,000 logged predictions')
    held = json.loads(cli('monitor', '--store', store.root, '--json', '--fail-on', 'coverage<0.5').stdout)['held']
    assert held == [{'condition': 'coverage<0.5', 'metric': 'coverage', 'value': 0.4, 'version': 'v1', 'feature': None, 'count': 1}]
    assert cli('monitor', '--store', store.root, '--fail-on', 'coverage<0.3', '--since', '2025-12-01', '--until', '2025-12-02').returncode == 0
    ci_df.iloc[5000:5100].to_csv(tmp_path/'original.csv', index=False)
    r = cli('export-training-data', tmp_path/'out.csv', '--store', store.root, '--append-to', tmp_path/'original.csv')
    assert r.stdout == f"exported 400 labelled transaction(s) ({rows.Class[:400].sum()} fraud) to {tmp_path/'out.csv'}, after 100 rows of the original data\n"
    assert len(load_transactions(tmp_path/'out.csv')) == 500
    r = cli('export-training-data', tmp_path/'none.csv', '--store', store.root, '--since', '2025-12-02')
    assert r.returncode == 2 and 'no predictions logged' in r.stderr and not (tmp_path/'none.csv').exists()



@pytest.mark.slow
def test_the_weekly_loop_score_log_labels_monitor_export_train(cli, store, champion, ci_df, tmp_path):
    "score --log with ids, labels add, monitor --fail-on (3), export-training-data --append-to, then train on the export: the weekly schedule's steps."
    import pandas as pd
    from fraud_mlops.data import load_transactions
    day = ci_df.iloc[:3000].copy()
    day.insert(0, 'id', [f'tx-{i}' for i in range(3000)])
    day.drop(columns='Class').to_csv(tmp_path/'day.csv', index=False)
    r = cli('score', tmp_path/'day.csv', tmp_path/'answers.csv', '--log', '--store', store.root)
    assert r.returncode == 0 and 'scored 3,000 of 3,000 rows' in r.stdout and r.stdout.endswith(f'; 3,000 answers logged in {store.root}\n'), r.stderr
    s = json.loads(cli('monitor', '--store', store.root, '--json').stdout)
    assert (s['rows'], s['versions'][0]['version'], s['versions'][0]['labelled']) == (3000, champion, 0)
    day[['id', 'Class']].iloc[:1500].set_axis(['transaction_id', 'label'], axis=1).to_csv(tmp_path/'labels.csv', index=False)
    r = cli('labels', 'add', tmp_path/'labels.csv', '--store', store.root)
    assert r.returncode == 0 and '1,500 match logged predictions, 0 do not (yet)' in r.stdout
    r = cli('monitor', '--store', store.root, '--fail-on', 'coverage<0.9')
    assert r.returncode == 3 and r.stderr.endswith(f'\nerror: --fail-on held: coverage<0.9 (coverage 0.5, version {champion})\n')
    ci_df.iloc[3000:].to_csv(tmp_path/'original.csv', index=False)
    r = cli('export-training-data', tmp_path/'train.csv', '--store', store.root, '--append-to', tmp_path/'original.csv')
    assert r.returncode == 0, r.stderr
    exported = load_transactions(tmp_path/'train.csv')
    pd.testing.assert_frame_equal(exported, pd.concat([ci_df.iloc[3000:], ci_df.iloc[:1500]], ignore_index=True), check_exact=False, rtol=1e-15)
    r = cli('train', '--data', tmp_path/'train.csv', '--store', store.root, '--output', tmp_path/'t.ipynb', '-p', 'n_estimators', '20',
            '-p', 'compare_with', '', '-p', 'random_split_report', 'False', '-p', 'n_boot', '100', '-p', 'folds', '2')
    assert r.returncode == 0 and r.stdout.splitlines()[-2].startswith('candidate '), r.stderr[-3000:]


def test_version_and_no_command_print_what_there_is(cli):
    from fraud_mlops import __version__
    r = cli('--version')
    assert (r.returncode, r.stdout) == (0, f'fraud-mlops {__version__}\n')
    r = cli()
    assert r.returncode == 2 and r.stdout.startswith('usage: fraud-mlops') and 'error' not in r.stderr
    assert all(c in r.stdout for c in ('train', 'promote', 'models', 'report', 'score', 'serve'))


@pytest.mark.parametrize('command', ['fetch-data', 'train', 'promote', 'rollback', 'shadow', 'models', 'report', 'keys', 'deploy',
                                     'score', 'labels add', 'monitor', 'export-training-data', 'serve'])
def test_every_commands_help_has_a_description_defaults_and_an_example(cli, command):
    r = cli(*command.split(), '--help')
    assert r.returncode == 0, r.stderr
    usage, description = r.stdout.split('\n\n')[:2]
    assert usage.startswith(f'usage: fraud-mlops {command}') and description[0].isupper() and description.rstrip().endswith('.')
    assert '\nexample' in r.stdout and f'  fraud-mlops {command}' in r.stdout.split('\nexample', 1)[1]
    options = r.stdout.split('options:', 1)[1].split('\nexample', 1)[0]
    for entry in options.split('\n  -')[1:]:            # each option taking a value states its default
        flag = entry.split()[0].strip(',')
        if any(f in entry.split('\n')[0] for f in ('-h', '--help')) or entry.split('\n')[0].strip() == flag or ' ' not in entry.split('  ')[0].strip():
            continue                                     # on/off flags and --help take no value
        assert 'default' in ' '.join(entry.split()), (command, entry)
    if command == 'promote':
        assert all(s in ' '.join(r.stdout.split()) for s in ('0 promoted', '3 not promoted', '2 bad input', '4 the store'))


def test_promote_exit_codes_are_distinct(cli, store, add_candidate):
    a = add_candidate(store)
    r = cli('promote', '--store', store.root, '--no-notify', '--min-f1', '0.999')
    assert (r.returncode, r.stdout.split(':')[0]) == (3, 'rejected')                       # rejected: 3, the champion stays
    r = cli('promote', '--store', store.root, '--no-notify', '--version', a, '--dry-run')
    assert (r.returncode, r.stdout.split(':')[0]) == (0, 'promoted')                       # a dry run exits with its decision
    r = cli('promote', '--store', store.root, '--no-notify', '--version', a)
    assert (r.returncode, r.stdout.split(':')[0]) == (0, 'promoted')                       # promoted: 0
    r = cli('promote', '--store', store.root, '--evidence', 'live', '--min-f1', '0.5')
    assert r.returncode == 2 and 'go with --evidence offline' in r.stderr                   # bad input: 2
    r = cli('promote', '--store', store.root, '--no-notify')
    assert r.returncode == 4 and 'no undecided candidate' in r.stderr                       # the store: 4


def test_rollback_to_a_version_never_champion_needs_force(cli, store, add_candidate):
    a, b, never = add_candidate(store), add_candidate(store), add_candidate(store)
    for v in (a, b): assert cli('promote', '--store', store.root, '--version', v, '--no-notify', '--min-gain', '-1').returncode == 0
    before = (store.root/'champion.json').read_bytes()
    r = cli('rollback', '--to', never, '--store', store.root, '--no-notify')
    assert r.returncode == 2 and f'error: version {never} was never champion' in r.stderr and 'pass --force' in r.stderr
    assert (store.root/'champion.json').read_bytes() == before
    r = cli('rollback', '--to', never, '--force', '--store', store.root, '--no-notify')
    assert r.returncode == 0 and '(forced: never champion before)' in r.stdout
    assert cli('rollback', '--to', a, '--store', store.root, '--no-notify').returncode == 0   # a served before: no --force


def test_models_fits_100_columns_with_kind_and_report_and_wide_shows_everything(cli, store, add_candidate, tmp_path):
    import nbformat
    from fraud_mlops.reports import save_report
    lgbm, forest = add_candidate(store), add_candidate(store, model='lgbm_rf')
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell('# card')]), tmp_path/'run.ipynb')
    where = save_report(store, lgbm, tmp_path/'run.ipynb')
    out = cli('models', '--store', store.root).stdout
    assert max(len(line) for line in out.splitlines()) <= 100, out
    header, *rows = out.splitlines()
    assert header.split()[:4] == ['version', 'status', 'kind', 'f1'] and 'report' in header.split()
    assert rows[0].split()[:3] == [lgbm, 'candidate', 'lgbm'] and 'report.html' in rows[0]
    assert rows[1].split()[:3] == [forest, 'candidate', 'lgbm_rf'] and 'report.html' not in rows[1]
    wide = cli('models', '--store', store.root, '--wide').stdout
    assert where in wide and all(c in wide.splitlines()[0] for c in ('created_at', 'train_rows', 'threshold', 'auprc', 'signature'))


def test_score_without_an_id_column_keeps_1_based_row_numbers(cli, store, champion, ci_df, tmp_path):
    import pandas as pd
    rows = ci_df.iloc[:50].drop(columns='Class').astype({'V3': object})
    rows.loc[4, 'V3'] = 'oops'                           # data row 5 is bad and skipped
    rows.to_csv(tmp_path/'in.csv', index=False)
    r = cli('score', tmp_path/'in.csv', tmp_path/'out.csv', '--store', store.root)
    assert r.returncode == 0, r.stderr
    out = pd.read_csv(tmp_path/'out.csv')
    assert list(out.columns)[:2] == ['row', 'fraud_probability'] and out.row.tolist() == [i for i in range(1, 51) if i != 5]
    assert pd.read_csv(tmp_path/'out.csv.bad_rows.csv').row.tolist() == [5]   # the same numbering as the bad-rows file


def test_every_command_using_a_store_says_its_absolute_store(cli, store, tmp_path):
    "One line on stderr, first, even when the command then fails; a relative store is shown resolved (as `store_uri` resolves it)."
    from fraud_mlops.store import store_uri
    for args in (('models',), ('models', '--history'), ('shadow',), ('monitor',), ('promote', '--no-notify'), ('rollback', '--no-notify'),
                 ('report', '20200101T000000.000Z-abcdef'), ('export-training-data', 'x.csv'), ('score', 'in.csv', 'out.csv'),
                 ('labels', 'add', 'l.csv'), ('train', '--data', 'missing.csv')):
        r = cli(*args, '--store', store.root, cwd=tmp_path)
        assert r.stderr.splitlines()[0] == f'store: {store.root}', (args, r.stderr)
    r = cli('models', cwd=tmp_path, env={'FRAUD_MLOPS_STORE': str(store.root)})
    assert r.stderr == f'store: {store.root}\n'
    r = cli('models', '--store', 'not-here/registry', cwd=tmp_path)
    shown = r.stderr.splitlines()[0].removeprefix('store: ')
    assert Path(shown).is_absolute() and shown == store_uri('not-here/registry') and r.returncode == 4
    assert 'store:' not in cli('keys').stderr             # no store, no line
