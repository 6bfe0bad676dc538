"""Delayed labels and export-training-data: every refused label file (exit 2, nothing under labels/), the latest label winning,
ids not (yet) in the prediction log, the export read back by the training loader, and label files on S3 (moto)."""
import contextlib, io, json, os, time
from datetime import datetime, timezone

import numpy as np
import pandas as pd
import pytest

from fraud_mlops.cli import main
from fraud_mlops.data import FEATURES, DataError, load_transactions
from fraud_mlops.labels import add_labels, export_training_data, latest_labels, read_labels
from fraud_mlops.predlog import PredictionLog
from fraud_mlops.store import open_store

DAY1 = datetime(2026, 11, 30, 12, tzinfo=timezone.utc).timestamp()
DAY2 = datetime(2026, 12, 1, 12, tzinfo=timezone.utc).timestamp()


@pytest.fixture(autouse=True)
def restore_store_setting(monkeypatch):
    "`--store` sets FRAUD_MLOPS_STORE for what the command starts; run in this process, it is put back after each test."
    monkeypatch.setenv('FRAUD_MLOPS_STORE', os.environ.get('FRAUD_MLOPS_STORE', 'registry'))


def run_cli(*argv):
    "(exit code, stdout, stderr after its first line, `store: <the store used>`, which test_cli checks) of `fraud-mlops ARGV`, run in this process (so moto's in-process mock applies)."
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try: main([str(a) for a in argv])
        except SystemExit as e: code = e.code
    first, _, rest = err.getvalue().partition('\n')
    assert first.startswith('store: '), err.getvalue()
    return code, out.getvalue(), rest


def log_rows(store, df, ids, t=DAY2, version='v1'):
    "Record rows `df` (training schema) with transaction ids `ids` in the prediction log of `store` at time `t`, through `PredictionLog`."
    X = df[FEATURES].to_numpy()
    p = np.linspace(0.01, 0.99, len(df))          # placeholder probabilities: labels and the export only need ids and features
    plog = PredictionLog(store)
    plog.record_many(t, 'req', list(ids), version, p, p > 0.5, X)
    plog.close()


@pytest.fixture
def labelled(store, ci_df):
    "`store` whose log holds the first 300 CI rows as ci-0..ci-299 (day 2); returns those rows."
    rows = ci_df.iloc[:300].reset_index(drop=True)
    log_rows(store, rows, [f'ci-{i}' for i in range(300)])
    return rows


REFUSED = {
    'missing column': ('labels.csv', 'transaction_id,lable\n1,1\n', 'missing column label'),
    'empty id': ('labels.csv', 'transaction_id,label\n1,1\n  ,0\n', "transaction_id must be non-empty text or a whole number (line 3: '  ')"),
    'label 2': ('labels.csv', 'transaction_id,label\n1,1\n2,2\n', "label must be 0 or 1 (line 3: '2')"),
    'label -1': ('labels.csv', 'transaction_id,label\n1,-1\n', "label must be 0 or 1 (line 2: '-1')"),
    'label yes': ('labels.csv', 'transaction_id,label\n1,yes\n', "label must be 0 or 1 (line 2: 'yes')"),
    'label NaN': ('labels.csv', 'transaction_id,label\n1,NaN\n', "label must be 0 or 1 (line 2: 'NaN')"),
    'label empty': ('labels.csv', 'transaction_id,label\n1,\n', "label must be 0 or 1 (line 2: '')"),
    'label 0.5': ('labels.csv', 'transaction_id,label\n1,0.5\n2,1\n3,0.5\n', "label must be 0 or 1 (line 2: '0.5'; line 4: '0.5')"),
    'many bad labels': ('labels.csv', 'transaction_id,label\n' + ''.join(f'{i},2\n' for i in range(10)), "(line 2: '2'; line 3: '2'; line 4: '2'; and 7 more)"),
    'label_time': ('labels.csv', 'transaction_id,label,label_time\n1,1,2026-12-01\n2,0,2026-02-30\n', "label_time is not an ISO date or time (line 3: '2026-02-30')"),
    'empty file': ('labels.csv', '', 'file is empty'),
    'header only': ('labels.csv', 'transaction_id,label\n', 'no labels in it'),
    'too many fields': ('labels.csv', 'transaction_id,label\n1,1\n2,0,note\n', 'not a readable CSV (line 3: 3 fields, the header has 2)'),
    'too few fields': ('labels.csv', 'transaction_id,label,label_time\n1,1,2026-12-01\n2,0\n', 'not a readable CSV (line 3: 2 fields, the header has 3)'),
    'binary csv': ('labels.csv', b'\x89PNG\r\n\x1a\n\x00\xff\xfe', 'not a readable CSV'),
    'not csv or parquet': ('labels.json', '[{"transaction_id": "1", "label": 1}]', 'not a label file: name a .csv or .parquet file'),
    'garbage parquet': ('labels.parquet', 'transaction_id,label\n1,1\n', 'not a readable Parquet file'),
    'parquet NaN label': ('labels.parquet', pd.DataFrame({'transaction_id': ['a', 'b'], 'label': [1.0, np.nan]}), 'label must be 0 or 1 (row 2: nan)'),
    'parquet bool label': ('labels.parquet', pd.DataFrame({'transaction_id': ['a'], 'label': [True]}), 'label must be 0 or 1 (row 1: True)'),
    'parquet float ids': ('labels.parquet', pd.DataFrame({'transaction_id': [1.5], 'label': [1]}), 'transaction_id must be non-empty text or a whole number (row 1: 1.5)'),
    'parquet null id': ('labels.parquet', pd.DataFrame({'transaction_id': ['a', None], 'label': [1, 0]}), 'transaction_id must be non-empty text or a whole number (row 2: None)'),
    'duplicate column': ('labels.csv', 'transaction_id,label,label\n1,1,0\n', 'column label appears twice'),
}


@pytest.mark.parametrize('case', REFUSED)
def test_a_bad_label_file_is_refused_in_one_line_and_nothing_is_written(store, tmp_path, case):
    name, content, message = REFUSED[case]
    path = tmp_path/name
    if isinstance(content, pd.DataFrame): content.to_parquet(path)
    else: path.write_bytes(content if isinstance(content, bytes) else content.encode())
    code, out, err = run_cli('labels', 'add', path, '--store', store.root)
    assert (code, out) == (2, ''), err
    assert err.startswith(f'error: {path}: ') and message in err and err.count('\n') == 1, err
    assert store.keys('labels') == []


def test_a_missing_file_or_store(store, tmp_path):
    code, _, err = run_cli('labels', 'add', tmp_path/'none.csv', '--store', store.root)
    assert (code, err) == (2, f"error: {tmp_path/'none.csv'}: no such file\n")
    (tmp_path/'l.csv').write_text('transaction_id,label\n1,1\n')
    code, _, err = run_cli('labels', 'add', tmp_path/'l.csv', '--store', tmp_path/'typo')
    assert code == 4 and 'does not exist' in err


def test_ids_are_text_and_accepted_forms_of_labels_and_times(tmp_path):
    (tmp_path/'l.csv').write_text('\ufefftransaction_id , label,label_time,note\n007,1,2026-12-01T10:00:00+02:00,x\n1e3,0.0,,\n12,1.0,2026-12-01,\n')
    df = read_labels(tmp_path/'l.csv')
    assert df.transaction_id.tolist() == ['007', '1e3', '12'] and df.label.tolist() == [1, 0, 1]
    assert df.label_time[0] == pd.Timestamp('2026-12-01T08:00:00Z') and df.label_time[2] == pd.Timestamp('2026-12-01T00:00:00Z')
    assert abs(df.label_time[1] - pd.Timestamp.now(tz='UTC')) < pd.Timedelta('1min')     # empty: now
    assert df.attrs['ignored_columns'] == ['note']
    pd.DataFrame({'transaction_id': np.array([7, 1234567890123], 'int64'), 'label': np.array([1, 0], 'int8'),
                  'label_time': pd.to_datetime(['2026-12-01 10:00', '2026-12-02'], format='ISO8601')}).to_parquet(tmp_path/'l.parquet')
    df = read_labels(tmp_path/'l.parquet')
    assert df.transaction_id.tolist() == ['7', '1234567890123'] and df.label_time[0] == pd.Timestamp('2026-12-01T10:00:00Z')


def test_the_latest_label_time_wins_and_the_history_stays(store, tmp_path):
    def add(label, when):
        (tmp_path/'l.csv').write_text(f'transaction_id,label,label_time\ntx-1,{label},{when}\n')
        code, out, err = run_cli('labels', 'add', tmp_path/'l.csv', '--store', store.root)
        assert code == 0, err
    add(1, '2026-12-01T10:00:00Z')                                  # a chargeback: fraud
    add(0, '2026-12-05T10:00:00Z')                                  # reversed later: legitimate wins
    assert latest_labels(store).loc['tx-1', 'label'] == 0
    add(1, '2026-12-03T10:00:00Z')                                  # added last, but about an earlier time: it does not win
    assert latest_labels(store).loc['tx-1', 'label'] == 0
    add(1, '2026-12-05T10:00:00Z')                                  # the same time as the winner: the one added last wins
    assert latest_labels(store).loc['tx-1', 'label'] == 1
    assert latest_labels(store, until='2026-12-04').loc['tx-1', 'label'] == 1   # as it stood then (the 3 Dec label)
    assert latest_labels(store, until='2026-12-02').loc['tx-1', 'label_time'] == pd.Timestamp('2026-12-01T10:00:00Z')
    files = store.keys('labels')
    assert len(files) == 4 and all(k.startswith('labels/') and k.endswith('.parquet') for k in files)
    history = pd.concat(pd.read_parquet(store.root/k) for k in files)
    assert history.label.tolist() == [1, 0, 1, 1] and set(history.source) == {str(tmp_path/'l.csv')}
    (tmp_path/'two.csv').write_text('transaction_id,label,label_time\ntx-2,1,2026-12-01\ntx-2,0,2026-12-01\n')
    add_labels(store, read_labels(tmp_path/'two.csv'), 'two.csv')  # one file, same time: the later row wins
    assert latest_labels(store).loc['tx-2', 'label'] == 0


def test_unmatched_ids_are_counted_shown_and_kept(store, labelled, tmp_path, ci_df):
    ids = [f'ci-{i}' for i in range(10)] + [f'unknown-{i}' for i in range(7)]
    pd.DataFrame({'transaction_id': ids, 'label': [0] * 17, 'case': 'c-1'}).to_csv(tmp_path/'l.csv', index=False)
    code, out, err = run_cli('labels', 'add', tmp_path/'l.csv', '--store', store.root, '--json')
    r = json.loads(out)
    assert (code, r['written'], r['matched'], r['unmatched'], r['ignored_columns']) == (0, 17, 10, 7, ['case'])
    assert r['unmatched_examples'] == [f'unknown-{i}' for i in range(5)] and r['file'] == store.keys('labels')[0]
    assert len(latest_labels(store)) == 17                                           # stored all the same
    code, out, err = run_cli('labels', 'add', tmp_path/'l.csv', '--store', store.root)
    assert out.splitlines() == [f"added 17 label(s) in {store.keys('labels')[1]}: 10 match logged predictions, 7 do not (yet)",
                                '  ids not in the prediction log, e.g.: unknown-0, unknown-1, unknown-2, unknown-3, unknown-4',
                                '  ignored column(s): case']
    log_rows(store, ci_df.iloc[300:307], [f'unknown-{i}' for i in range(7)])       # the predictions, flushed after their labels
    r = export_training_data(store, tmp_path/'out.csv')
    assert r['rows'] == 17


def test_export_round_trip_into_the_training_loader(store, labelled, tmp_path):
    y = labelled.Class.to_numpy()
    pd.DataFrame({'transaction_id': [f'ci-{i}' for i in range(300)], 'label': y}).to_csv(tmp_path/'l.csv', index=False)
    assert run_cli('labels', 'add', tmp_path/'l.csv', '--store', store.root)[0] == 0
    code, out, err = run_cli('export-training-data', tmp_path/'out.csv', '--store', store.root)
    assert (code, out.strip()) == (0, f"exported 300 labelled transaction(s) ({y.sum()} fraud) to {tmp_path/'out.csv'}"), err
    back = load_transactions(tmp_path/'out.csv')
    pd.testing.assert_frame_equal(back, labelled, check_exact=False, rtol=1e-15)   # CSV text, read back by pandas' float parser
    assert y.sum() > 0 and (tmp_path/'out.csv').read_text().splitlines()[0] == 'Time,' + ','.join(f'V{i}' for i in range(1, 29)) + ',Amount,Class'


def test_a_transaction_scored_twice_is_one_row_with_its_latest_features(store, labelled, tmp_path):
    again = labelled.iloc[:50].copy()
    again['Amount'] = again.Amount + 1.0                        # a corrected amount, scored again later by another version
    log_rows(store, again, [f'ci-{i}' for i in range(50)], t=DAY2 + 3600, version='v2')
    log_rows(store, labelled.iloc[50:60], [f'ci-{i}' for i in range(50, 60)], t=DAY2 - 3600)   # and earlier: the day-2 rows stay latest
    pd.DataFrame({'transaction_id': [f'ci-{i}' for i in range(100)], 'label': labelled.Class[:100]}).to_csv(tmp_path/'l.csv', index=False)
    add_labels(store, read_labels(tmp_path/'l.csv'), 'l.csv')
    r = export_training_data(store, tmp_path/'out.csv')
    back = load_transactions(tmp_path/'out.csv').sort_values('Time', kind='stable')
    assert r['rows'] == 100 and len(back) == 100
    expected = pd.concat([again, labelled.iloc[50:100]]).sort_values('Time', kind='stable')
    np.testing.assert_allclose(back.to_numpy(), expected.to_numpy(), rtol=1e-15)


def test_the_time_window_and_append_to(store, ci_df, tmp_path):
    log_rows(store, ci_df.iloc[:20], [f'a-{i}' for i in range(20)], t=DAY1)
    log_rows(store, ci_df.iloc[20:50], [f'b-{i}' for i in range(30)], t=DAY2)
    ids = [f'a-{i}' for i in range(20)] + [f'b-{i}' for i in range(30)]
    add_labels(store, read_labels(_csv(tmp_path, ids, ci_df.Class[:50])), 'l.csv')
    code, out, err = run_cli('export-training-data', tmp_path/'day2.csv', '--store', store.root, '--since', '2026-12-01', '--until', '2026-12-02')
    assert code == 0 and len(load_transactions(tmp_path/'day2.csv')) == 30, err
    ci_df.iloc[1000:1100].to_csv(tmp_path/'original.csv', index=False)
    before = (tmp_path/'original.csv').read_bytes()
    code, out, err = run_cli('export-training-data', tmp_path/'all.csv', '--store', store.root, '--append-to', tmp_path/'original.csv')
    assert code == 0 and out.strip().endswith('after 100 rows of the original data'), err
    both = load_transactions(tmp_path/'all.csv')
    assert len(both) == 150 and np.allclose(both.iloc[:100].to_numpy(), ci_df.iloc[1000:1100].to_numpy())
    code, out, err = run_cli('export-training-data', tmp_path/'original.csv', '--store', store.root, '--append-to', tmp_path/'original.csv')
    assert code == 2 and 'is the input' in err and (tmp_path/'original.csv').read_bytes() == before
    (tmp_path/'broken.csv').write_text('Time,V1\n1,2\n')
    code, out, err = run_cli('export-training-data', tmp_path/'x.csv', '--store', store.root, '--append-to', tmp_path/'broken.csv')
    assert code == 2 and 'wrong columns' in err and not (tmp_path/'x.csv').exists()


def _csv(folder, ids, labels):
    path = folder/'labels.csv'
    pd.DataFrame({'transaction_id': ids, 'label': list(labels)}).to_csv(path, index=False)
    return path


def test_nothing_to_export_is_a_clear_error_and_writes_nothing(store, ci_df, tmp_path):
    code, _, err = run_cli('export-training-data', tmp_path/'out.csv', '--store', store.root)
    assert (code, err) == (2, f'error: no labels in {store.uri} yet (add some with `fraud-mlops labels add FILE`); nothing was written\n')
    add_labels(store, read_labels(_csv(tmp_path, ['x-1'], [1])), 'l.csv')
    code, _, err = run_cli('export-training-data', tmp_path/'out.csv', '--store', store.root)
    assert (code, err) == (2, f'error: no predictions logged in {store.uri} yet; nothing was written\n')
    log_rows(store, ci_df.iloc[:5], [f'ci-{i}' for i in range(5)])
    code, _, err = run_cli('export-training-data', tmp_path/'out.csv', '--store', store.root)
    assert code == 2 and 'none of the 1 labelled transactions is in the prediction log' in err
    assert sorted(os.listdir(tmp_path)) == ['labels.csv', 'registry']


def test_a_bad_logged_row_leaves_no_output_and_no_temporary_file(store, ci_df, tmp_path):
    rows = ci_df.iloc[:10].copy()
    log_rows(store, rows.iloc[:5], [f'ci-{i}' for i in range(5)], t=DAY1)
    rows.loc[7, 'V3'] = np.inf                                   # the API never logs such a row: a log written by something else
    log_rows(store, rows.iloc[5:], [f'ci-{i}' for i in range(5, 10)], t=DAY2)
    add_labels(store, read_labels(_csv(tmp_path, [f'ci-{i}' for i in range(10)], [0] * 10)), 'l.csv')
    (tmp_path/'out.csv').write_text('kept\n')
    with pytest.raises(DataError, match='transaction ci-7 has a missing or infinite feature; nothing was written'):
        export_training_data(store, tmp_path/'out.csv')
    assert (tmp_path/'out.csv').read_text() == 'kept\n' and not [p for p in os.listdir(tmp_path) if p.endswith('.tmp')]


def test_labels_on_s3_round_trip(mock_s3_uri, ci_df, tmp_path):
    from fraud_mlops.store import s3_client
    store = open_store(mock_s3_uri, create=True)
    log_rows(store, ci_df.iloc[:40], [f'ci-{i}' for i in range(40)])
    body = pd.DataFrame({'transaction_id': [f'ci-{i}' for i in range(45)], 'label': ci_df.Class[:45]}).to_csv(index=False).encode()
    s3_client().put_object(Bucket='fraud-models', Key='incoming/labels.csv', Body=body)
    code, out, err = run_cli('labels', 'add', 's3://fraud-models/incoming/labels.csv', '--store', mock_s3_uri, '--json')
    r = json.loads(out)
    assert (code, r['matched'], r['unmatched']) == (0, 40, 5), err
    assert store.keys('labels') == [r['file']]
    assert latest_labels(store).label.sum() == ci_df.Class[:45].sum()
    code, out, err = run_cli('labels', 'add', 's3://fraud-models/incoming/missing.csv', '--store', mock_s3_uri)
    assert (code, err) == (2, 'error: s3://fraud-models/incoming/missing.csv: no such object\n')
    s3_client().put_object(Bucket='fraud-models', Key='incoming/bad.csv', Body=b'transaction_id,label\nci-1,2\n')
    code, out, err = run_cli('labels', 'add', 's3://fraud-models/incoming/bad.csv', '--store', mock_s3_uri)
    assert code == 2 and "label must be 0 or 1 (line 2: '2')" in err and len(store.keys('labels')) == 1
    code, out, err = run_cli('export-training-data', tmp_path/'out.csv', '--store', mock_s3_uri)
    assert code == 0 and len(load_transactions(tmp_path/'out.csv')) == 40, err


def test_an_unreadable_log_file_is_skipped_and_named(store, labelled, tmp_path):
    add_labels(store, read_labels(_csv(tmp_path, [f'ci-{i}' for i in range(10)], [0] * 10)), 'l.csv')
    broken = 'predictions/date=2026-12-01/version=v1/20261201T000000.000000Z-other-000001.parquet'
    store.put(broken, b'not parquet')
    code, out, err = run_cli('export-training-data', tmp_path/'out.csv', '--store', store.root)
    assert code == 0 and out.splitlines() == [f"exported 10 labelled transaction(s) (0 fraud) to {tmp_path/'out.csv'}",
                                              f'  warning: skipped unreadable log file {broken}'], (out, err)


def test_the_export_holds_one_log_file_at_a_time(store, ci_df, tmp_path, monkeypatch):
    "Memory flat in the log's size: a table read from the log is released once the next one is read (the loop holds the one before), in both passes."
    import weakref
    import fraud_mlops.labels as labels_module
    for day in range(12):                                           # 12 files of 500 rows, one a day
        log_rows(store, ci_df.iloc[500 * day:500 * (day + 1)], [f'd{day}-{i}' for i in range(500)], t=DAY1 + 86_400 * day)
    add_labels(store, read_labels(_csv(tmp_path, [f'd{day}-0' for day in range(12)], [1] * 12)), 'l.csv')
    seen, most, read = [], [0], labels_module.read_log
    def watched(*args, **kw):
        for table in read(*args, **kw):
            seen.append(weakref.ref(table))
            most[0] = max(most[0], sum(r() is not None for r in seen))
            yield table
    monkeypatch.setattr(labels_module, 'read_log', watched)
    r = export_training_data(store, tmp_path/'out.csv')
    assert r['rows'] == 12 and len(seen) == 24 and most[0] == 2
