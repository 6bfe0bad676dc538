"""The prediction log against real stores and real processes: a round trip on S3 (a moto server over HTTP), two writer
processes at once on one store, a full buffer that refuses rows without ever blocking, an S3 endpoint that refuses
connections and then comes back, `close` writing everything, and a process stopped by SIGTERM losing nothing."""
import json, logging, signal, subprocess, sys, threading, time
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pytest

from fraud_mlops.data import FEATURES
from fraud_mlops.predlog import LOG_SCHEMA, PREFIX, PredictionLog, log_files, read_log
from fraud_mlops.registry import new_version_id
from fraud_mlops.store import LocalStore, S3Store, open_store, s3_client

T0 = datetime(2026, 12, 2, 12, tzinfo=timezone.utc).timestamp()


@pytest.fixture(scope='module')
def rows(ci_df):
    "(features (n, 30), P(fraud) stand-ins) of the real CI subset."
    return ci_df[FEATURES].to_numpy(), np.random.default_rng(1).random(len(ci_df))


def logged(store, **kw):
    "The whole log of `store` as one table (these tests' logs are small)."
    tables = list(read_log(store, **kw))
    return pa.concat_tables(tables) if tables else LOG_SCHEMA.empty_table()


def record_ci(plog, rows, version, start=0, stop=None):
    "Record CI rows [start, stop): the first ten one by one as /predict would, the rest as one batch with ids."
    X, p = rows
    stop = len(X) if stop is None else stop
    for i in range(start, start + 10): plog.record_one(T0 + i, f'one-{i}', f'tx{i}', version, p[i], bool(p[i] > .9), X[i])
    plog.record_many(T0 + start + 10, f'batch-{start}', [f'tx{i}' for i in range(start + 10, stop)], version, p[start + 10:stop],
                     p[start + 10:stop] > .9, X[start + 10:stop])
    return stop - start


def test_round_trip_on_s3(s3_uri, rows):
    store, v = open_store(s3_uri, create=True), new_version_id()
    with PredictionLog(store, flush_seconds=0.2) as plog: n = record_ci(plog, rows, v)
    assert (plog.written, plog.pending, plog.dropped, plog.failed_writes) == (n, 0, 0, 0)
    back = logged(store)
    assert back.schema == LOG_SCHEMA and back.num_rows == n
    order = np.argsort([int(t[2:]) for t in back['transaction_id'].to_pylist()], kind='stable')
    assert np.array_equal(np.column_stack([back[f].to_numpy() for f in FEATURES])[order], rows[0])
    assert np.array_equal(back['fraud_probability'].to_numpy()[order], rows[1])
    assert all(k.startswith(f'{PREFIX}/date=2026-12-02/version={v}/') for _, _, k in log_files(store))
    assert logged(store, since='2026-12-02T12:00:05Z', until='2026-12-02T12:00:07Z')['request_id'].to_pylist() == ['one-5', 'one-6']


def test_round_trip_in_moto_mock(mock_s3_uri, rows):
    store, v = open_store(mock_s3_uri, create=True), new_version_id()
    plog = PredictionLog(store)
    n = record_ci(plog, rows, v, 0, 500)
    assert plog.close() == 0 and logged(store).num_rows == n and plog.files == 1


WRITER = r'''
import sys, time
import numpy as np
from fraud_mlops.predlog import PredictionLog
from fraud_mlops.store import open_store
store, version, n, t0 = open_store(sys.argv[1], create=True), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
X = np.random.default_rng(int(sys.argv[5])).random((n, 30))
plog = PredictionLog(store, flush_rows=200, flush_seconds=0.05).start()
while time.time() < t0: time.sleep(0.001)          # both processes start recording together
for i in range(n):                                  # the same times in both: their files have the same first-row times
    plog.record_one(t0, f'{sys.argv[5]}-{i}', f'{sys.argv[5]}-{i}', version, 0.5, False, X[i])
    if i % 500 == 0: time.sleep(0.01)               # several flushes each
left = plog.close(timeout=30)
print(plog.written, plog.files, plog.dropped, left)
'''


@pytest.mark.parametrize('kind', ['local', 's3'])
def test_two_writer_processes_on_one_store_never_overwrite_each_other(kind, tmp_path, request, rows):
    uri = str(tmp_path/'store') if kind == 'local' else request.getfixturevalue('s3_uri')
    store, v, n = open_store(uri, create=True), new_version_id(), 3000
    t0 = round(time.time() + 3, 3)
    procs = [subprocess.Popen([sys.executable, '-c', WRITER, uri, v, str(n), str(t0), str(seed)], stdout=subprocess.PIPE, text=True)
             for seed in (1, 2)]
    outs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert [o[0] for o in outs] == [str(n)] * 2 and [o[2:] for o in outs] == [['0', '0']] * 2, outs   # written, files, dropped, left
    files = log_files(store)
    assert len(files) == sum(int(o[1]) for o in outs) and len({k for _, _, k in files}) == len(files)
    back = logged(store)
    assert back.num_rows == 2 * n and len(set(back['request_id'].to_pylist())) == 2 * n


class HangingStore(LocalStore):
    "A local store whose writes wait until `release` is set: a store that hangs."
    release = None
    def put_new(self, key, data):
        self.release.wait(); super().put_new(key, data)


def test_a_full_buffer_refuses_rows_and_counts_them_and_never_blocks(tmp_path, rows):
    X, p = rows
    store = HangingStore(tmp_path, create=True); store.release = threading.Event()
    plog = PredictionLog(store, flush_rows=100, flush_seconds=0.01, max_rows=1000).start()
    v, slowest, start = new_version_id(), 0.0, time.monotonic()
    for i in range(5000):                                 # the writer hangs on its first file: the buffer fills up
        t = time.perf_counter(); plog.record_one(T0, 'r', None, v, p[i], False, X[i]); slowest = max(slowest, time.perf_counter() - t)
    assert plog.pending == 1000 and plog.dropped == 4000 and plog.written == 0
    assert slowest < 0.5 and time.monotonic() - start < 5     # generous: recording does not wait for the hung store (~1 us)
    plog.record_many(T0, 'b', None, v, p[:10], p[:10] > .9, X[:10]); assert plog.dropped == 4010
    store.release.set()
    assert plog.close(timeout=30) == 0 and plog.written == 1000 and logged(store).num_rows == 1000


def test_s3_down_then_back_keeps_the_rows_and_writes_them(free_port, aws_env, rows, caplog):
    """An endpoint refusing connections: writes fail, rows wait (in order, within max_rows), one warning; a moto server
    comes up on that port: the thread writes them all by itself."""
    from moto.server import ThreadedMotoServer
    X, p = rows
    port = free_port()
    aws_env(f'http://127.0.0.1:{port}')
    store, v = S3Store('s3://fraud-log/registry'), new_version_id()
    plog = PredictionLog(store, flush_rows=50, flush_seconds=0.2, max_rows=5000).start()
    with caplog.at_level(logging.WARNING, logger='fraud_mlops.predlog'):
        for k in range(6):
            plog.record_many(T0 + k, f'r{k}', [f'tx{k}-{i}' for i in range(500)], v, p[:500], p[:500] > .9, X[:500]); time.sleep(0.3)
        deadline = time.monotonic() + 30
        while plog.failed_writes < 3 and time.monotonic() < deadline: time.sleep(0.05)
        assert plog.failed_writes >= 3 and plog.written == 0 and plog.pending == 3000 and plog.dropped == 0
        assert 'cannot reach S3' in plog.last_error
        assert len([r for r in caplog.records if 'cannot write' in r.getMessage()]) == 1
        plog.record_many(T0, 'too-many', None, v, p[:2001], p[:2001] > .9, X[:2001])     # past max_rows: refused, counted
        assert plog.dropped == 2001 and plog.pending == 3000
        server = ThreadedMotoServer(ip_address='127.0.0.1', port=port, verbose=False); server.start()
        try:
            s3_client().create_bucket(Bucket='fraud-log')
            deadline = time.monotonic() + 30
            while plog.pending and time.monotonic() < deadline: time.sleep(0.05)
            assert plog.pending == 0 and plog.written == 3000
            back = logged(store)
            assert back['request_id'].to_pylist() == [f'r{k}' for k in range(6) for _ in range(500)]   # in the order recorded
            assert plog.close() == 0
        finally: server.stop()


def test_close_on_a_store_that_stays_down_returns_within_its_timeout(free_port, aws_env, rows, caplog):
    aws_env(f'http://127.0.0.1:{free_port()}')
    plog = PredictionLog(S3Store('s3://fraud-log/registry'), flush_seconds=60).start()
    plog.record_many(T0, 'r', None, new_version_id(), rows[1][:10], rows[1][:10] > .9, rows[0][:10])
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger='fraud_mlops.predlog'): assert plog.close(timeout=1) == 10
    assert time.monotonic() - start < 15
    assert any('10 row(s) not written to s3://fraud-log/registry at close' in r.getMessage() for r in caplog.records)


KILLED = r'''
import json, signal, sys, threading, time
import numpy as np
from fraud_mlops.predlog import PredictionLog
from fraud_mlops.store import open_store
plog = PredictionLog(open_store(sys.argv[1]), flush_rows=10**9, flush_seconds=3600).start()   # nothing written before close
X, version, stop = np.random.default_rng(0).random((1000, 30)), sys.argv[2], threading.Event()

def serve():                                             # a worker thread answering requests
    i = 0
    while not stop.is_set():
        plog.record_one(time.time(), f'r{i}', f'tx{i}', version, 0.5, False, X[i % 1000]); i += 1
        if i % 100 == 0: time.sleep(0.001)

def on_sigterm(signum, frame):                           # what the API's shutdown does
    left = plog.close(timeout=10); stop.set()
    print(json.dumps({'added': plog.added, 'written': plog.written, 'left': left}), flush=True); sys.exit(0)

signal.signal(signal.SIGTERM, on_sigterm)
threading.Thread(target=serve, daemon=True).start()
while plog.added < 20_000: time.sleep(0.01)
print('recording', flush=True)
while True: time.sleep(1)
'''


def test_a_process_stopped_by_sigterm_writes_every_row_it_recorded(tmp_path):
    store, v = LocalStore(tmp_path, create=True), new_version_id()
    proc = subprocess.Popen([sys.executable, '-c', KILLED, str(tmp_path), v], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == 'recording'
    assert not store.keys(PREFIX)                         # nothing written yet: everything is in memory
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    said = json.loads(out)
    assert proc.returncode == 0 and said['left'] == 0 and said['written'] == said['added'] >= 20_000
    back = logged(store)
    assert back.num_rows == said['added'] and len(set(back['request_id'].to_pylist())) == said['added']
