"""`nbs/01a_eda.ipynb` is a job: papermill runs it on the CI subset (its default, with the kernel in nbs/ as `make lab` has it)
and on any file with the training columns, showing its tables as DataFrames; the prose's claims are checked only on the files
they are about."""
import subprocess, sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from fraud_mlops.data import CI_SUBSET, resolve_path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run_eda(tmp_path, *params):
    "The executed notebook of `papermill nbs/01a_eda.ipynb` with the kernel in nbs/ and `params` (-p pairs)."
    out = tmp_path/'eda.ipynb'
    r = subprocess.run([str(BIN/'papermill'), str(ROOT/'nbs'/'01a_eda.ipynb'), str(out), '--cwd', str(ROOT/'nbs'), '--no-progress-bar',
                        *map(str, params)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    return nbformat.read(out, 4)


def outputs(nb, kind):
    return [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', []) if o.output_type in kind]


def first_line(nb):
    return outputs(nb, ('stream',))[0]['text'].splitlines()[0]


def tables(nb):
    "The HTML tables the job showed (DataFrames), not text dumps."
    return [o['data']['text/html'] for o in outputs(nb, ('display_data', 'execute_result')) if 'text/html' in o['data']]


def test_the_default_is_the_ci_subset_and_its_claims_hold(tmp_path):
    nb = run_eda(tmp_path)
    assert first_line(nb).startswith(f"{resolve_path(CI_SUBSET)}: 10,000 rows, 492 frauds (the CI subset)")
    assert len(tables(nb)) == 7 and all('<table' in t for t in tables(nb))
    assert not any('----' in o['text'] for o in outputs(nb, ('stream',)))   # no printed text tables


@pytest.mark.parametrize('frauds', [True, False], ids=['both classes', 'legit only'])
def test_any_file_with_the_training_columns_runs(tmp_path, frauds):
    "Real rows, another file: a few hundred of the CI subset (or only its legit ones); its tables are its own, the claims are not checked."
    ci = pd.read_csv(resolve_path(CI_SUBSET))
    small = (ci.iloc[::25] if frauds else ci[ci.Class == 0].iloc[:300]).reset_index(drop=True)
    small.to_csv(tmp_path/'mine.csv', index=False)
    nb = run_eda(tmp_path, '-p', 'data_path', tmp_path/'mine.csv')
    n_fraud = int(small.Class.sum())
    assert (frauds, n_fraud > 0) == (frauds, frauds)
    assert first_line(nb).startswith(f"{tmp_path/'mine.csv'}: {len(small):,} rows, {n_fraud:,} frauds (not the full dataset or the CI subset)")
    classes = tables(nb)[0]
    assert f'<td>{len(small) - n_fraud}</td>' in classes and f'<td>{n_fraud}</td>' in classes
    assert any('nothing to separate' in o['text'] for o in outputs(nb, ('stream',))) == (not frauds)


def test_a_file_without_the_columns_stops_the_job_saying_which(tmp_path):
    pd.DataFrame({'Time': [0.0], 'Amount': [1.0]}).to_csv(tmp_path/'bad.csv', index=False)
    r = subprocess.run([str(BIN/'papermill'), str(ROOT/'nbs'/'01a_eda.ipynb'), str(tmp_path/'out.ipynb'), '--no-progress-bar',
                        '-p', 'data_path', str(tmp_path/'bad.csv')], capture_output=True, text=True)
    assert r.returncode != 0 and 'DataError' in r.stderr and 'wrong columns (missing:' in r.stderr, r.stderr[-2000:]
