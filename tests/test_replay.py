"""`fraud_mlops.replay` against the real API (`fraud-mlops serve`'s app under uvicorn, a subprocess on loopback): every row sent
once with its id and logged under it, the rate bound held on the wire, answers other than 200 counted and never retried, a
server that goes away counted and stopped, and a URL elsewhere refused before anything is sent."""
import socket, threading

import pytest

from fraud_mlops.data import CI_SUBSET, DataError, load_transactions, resolve_path
from fraud_mlops.predlog import read_log
from fraud_mlops.replay import replay
from fraud_mlops.store import open_store


@pytest.fixture(scope='module')
def day2():
    df = load_transactions(resolve_path(CI_SUBSET))
    return df[df.Time >= 86_400]


@pytest.fixture
def served(api_server, store, champion):
    "The API serving `store`'s champion (prediction log flushed every 0.2 s); its Server."
    return api_server({'FRAUD_MLOPS_STORE': str(store.root), 'FRAUD_MLOPS_LOG_FLUSH_SECONDS': '0.2'})


def test_every_row_is_sent_once_with_its_id_and_logged_under_it(served, store, day2):
    rows = day2.iloc[:1_234]
    r = replay(rows, served.url, 50_000, batch=100, single_every=4)
    assert (r['rows'], r['rows_ok'], r['errors'], r['stopped']) == (1_234, 1_234, {}, None)
    assert r['statuses'] == {200: r['requests']} and r['requests'] == 13 + 4   # 12 full batches, a short one, every 4th alone
    served.stop()                                                               # SIGTERM: the log is flushed
    log = [t.to_pydict() for t in read_log(open_store(store.root), columns=['transaction_id', 'source', 'V14'])]
    ids = [i for t in log for i in t['transaction_id']]
    assert sorted(ids) == sorted(r['ids']) == sorted(f'tx-{i}' for i in rows.index)
    sources = [s for t in log for s in t['source']]
    assert sources.count('predict') == 4 and sources.count('batch') == 1_230
    v14 = dict(zip(ids, (v for t in log for v in t['V14'])))
    assert all(v14[f'tx-{i}'] == x for i, x in rows.V14.items())               # each row under its own id, values exact


def test_the_rate_bound_holds_on_the_wire(served, day2):
    r = replay(day2.iloc[:1_500], served.url, 3_000, batch=250, single_every=0)
    assert r['rows_ok'] == 1_500 and r['seconds'] >= 0.5 and r['rows_per_second'] <= 3_000


def test_answers_other_than_200_are_counted_not_retried(api_server, tmp_path, day2):
    empty = open_store(tmp_path/'empty', create=True)   # no champion: the API is up and answers 503
    server = api_server({'FRAUD_MLOPS_STORE': str(empty.root)}, wait='/health/live')
    r = replay(day2.iloc[:50], server.url, 1e6, batch=10, single_every=5)
    assert r['statuses'] == {503: r['requests']} and r['requests'] == 5 + 1 and (r['rows'], r['rows_ok']) == (50, 0)


def test_a_server_that_stops_answering_is_counted_and_the_replay_stops(day2):
    "A listener that accepts and closes each connection at once: every request fails, none is retried, the replay stops."
    listener = socket.socket(); listener.bind(('127.0.0.1', 0)); listener.listen()
    accepted = []
    def close_all():
        while True:
            try: conn, _ = listener.accept()
            except OSError: return
            accepted.append(1); conn.close()
    threading.Thread(target=close_all, daemon=True).start()
    try: r = replay(day2, f'http://127.0.0.1:{listener.getsockname()[1]}', 1e6, batch=100, max_errors=4)
    finally: listener.close()
    assert r['requests'] == 4 and sum(r['errors'].values()) == 4 and r['statuses'] == {} and r['rows_ok'] == 0
    assert r['stopped'].startswith('stopped after 4 requests in a row got no answer') and len(accepted) == 4


@pytest.mark.parametrize('url', ['http://192.0.2.1:8000', 'http://example.com', 'http://127.0.0.1@example.com/',
                                 'https://127.0.0.1:8443', 'http://[::ffff:10.0.0.1]:80'])
def test_a_url_elsewhere_is_refused_before_anything_is_sent(url, day2):
    with pytest.raises(DataError, match='replay URL'): replay(day2, url, 100)
