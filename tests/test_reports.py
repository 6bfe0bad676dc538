"Reports in the registry: `fraud-mlops train` stores the executed notebook and its HTML with the version, `fraud-mlops report` finds them."
import json, sys

import nbformat
import pytest

from fraud_mlops.data import CI_SUBSET, resolve_path
from fraud_mlops.registry import REPORT, list_versions, load_manifest
from fraud_mlops.reports import save_report
from fraud_mlops.signing import signature_status, trusted_keys
from fraud_mlops.store import open_store, sha256_hex


def executed_notebook(path):
    "A small executed notebook at `path`: a heading, a code cell (SECRET_CODE) and its printed output."
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell('# Model card'),
                                         nbformat.v4.new_code_cell('SECRET_CODE = 1; print("F1 0.85")',
                                                                   outputs=[nbformat.v4.new_output('stream', text='F1 0.85\n')])])
    nbformat.write(nb, path)
    return path


@pytest.mark.slow
def test_train_stores_its_report_with_the_version_and_names_the_run_after_it(cli, tmp_path):
    store = tmp_path/'registry'
    r = cli('train', '--data', resolve_path(CI_SUBSET), '--store', store, '-p', 'n_estimators', '20', '-p', 'compare_with', '',
            '-p', 'random_split_report', 'False', '-p', 'n_boot', '100', '-p', 'folds', '2', cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    version, = list_versions(open_store(store))
    run = tmp_path/'runs'/f'train-{version}.ipynb'
    assert run.exists() and (tmp_path/'runs'/f'train-{version}.json').exists()
    html = store/'versions'/version/'report.html'
    assert r.stdout.splitlines()[-2:] == [f'candidate {version} (executed notebook {run.relative_to(tmp_path)})', f'report {html}']
    assert r.stderr.splitlines()[0] == f'store: {store}'
    manifest = load_manifest(open_store(store), version)
    assert {k: manifest['report'][k] for k in REPORT} == REPORT                  # the manifest names the report files
    record = json.loads((store/'versions'/version/'report.json').read_text())
    assert signature_status(record, trusted_keys()) == 'valid'
    assert (store/'versions'/version/'report.ipynb').read_bytes() == run.read_bytes()
    assert record['html']['sha256'] == sha256_hex(html.read_bytes()) and record['notebook']['sha256'] == sha256_hex(run.read_bytes())
    page = html.read_text()
    assert version in page and 'import ' not in page.split('<body', 1)[1]           # outputs and prose, no code
    r = cli('report', version, '--store', store)
    assert (r.returncode, r.stdout) == (0, f'{html}\n')
    row, = json.loads(cli('models', '--store', store, '--json').stdout)
    assert (row['report'], row['kind']) == (str(html), manifest['model_kind'])


def test_report_command_prints_the_checked_path_opens_it_and_refuses_a_missing_one(cli, store, add_candidate, tmp_path):
    with_report, without = add_candidate(store), add_candidate(store)
    where = save_report(store, with_report, executed_notebook(tmp_path/'run.ipynb'))
    r = cli('report', with_report, '--store', store.root)
    assert (r.returncode, r.stdout, r.stderr) == (0, f'{where}\n', f'store: {store.root}\n')
    page = (store.root/'versions'/with_report/'report.html').read_text()
    assert 'F1 0.85' in page and 'SECRET_CODE' not in page
    marker = tmp_path/'opened'
    browser = f'{sys.executable} -c "import sys, pathlib; pathlib.Path(sys.argv[1]).write_text(sys.argv[2])" {marker} %s'
    r = cli('report', with_report, '--open', '--store', store.root, env={'BROWSER': browser})
    assert r.returncode == 0 and marker.read_text() == f'file://{where}', r.stderr
    r = cli('report', without, '--store', store.root)
    assert r.returncode == 2 and r.stdout == ''
    assert r.stderr.splitlines()[1:] == [f'error: version {without} has no report in store {store.root} (trained without '
                                         '`fraud-mlops train`, or its job stopped before writing one)']
    (store.root/'versions'/with_report/'report.html').write_text('<html>something else</html>')
    r = cli('report', with_report, '--store', store.root)
    assert r.returncode == 4 and "does not match its signed record's SHA-256" in r.stderr


@pytest.mark.slow
def test_report_from_s3_is_a_checked_copy_in_the_cache(cli, s3_uri, add_candidate, runtime_cache_folder, tmp_path):
    store = open_store(s3_uri, create=True)
    v = add_candidate(store)
    save_report(store, v, executed_notebook(tmp_path/'run.ipynb'))
    r = cli('report', v, '--store', s3_uri)
    assert r.returncode == 0 and r.stderr == f'store: {s3_uri}\n', r.stderr
    path = runtime_cache_folder/'reports'/v/'report.html'
    assert r.stdout == f'{path}\n' and path.read_bytes() == store.get(f'versions/{v}/report.html')
    row, = json.loads(cli('models', '--store', s3_uri, '--json').stdout)
    assert row['report'] == f'{s3_uri}/versions/{v}/report.html'
