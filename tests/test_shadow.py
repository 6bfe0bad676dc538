"""The shadow pointer (issue 16): started, shown, stopped and listed, on a folder and on S3; signed and sequenced like the
champion's, so an unsigned, foreign or replayed pointer is refused; two starts at once, one wins; from the command line, a
version that is unknown, unsigned, tampered or corrupt is refused with exit 2 and nothing changes."""
import json, re, threading

import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from fraud_mlops.data import FEATURES
from fraud_mlops.promotion import promote, prune_rejected
from fraud_mlops.registry import (SHADOW, check_sequence, decided_versions, list_decisions, model_statuses, read_champion,
                                  read_shadow, save_version, set_shadow, stop_shadow)
from fraud_mlops.signing import new_key_pair, read_private_key, sign, signed
from fraud_mlops.store import ConflictError, IntegrityError, Missing, open_store


@pytest.fixture(scope='module')
def rows(ci_df):
    "(X, y) of the CI subset."
    return ci_df[FEATURES].to_numpy(), ci_df.Class.to_numpy()


def fit(rows, C=1.0):
    "A logistic regression (regularised by `C`) of the CI subset."
    return make_pipeline(StandardScaler(), LogisticRegression(C=C)).fit(*rows)


def bundle(store, rows, C=1.0):
    "`fit(rows, C)` saved as a new version (evidence: the first 2,000 rows); its id."
    X, y = rows
    return save_version(store, fit(rows, C), {'threshold': 0.5, 'metrics': {'test': {}}}, X[:2000], y[:2000])['version']


def open_kind(kind, request):
    "A fresh store: a local folder, or a bucket in moto's in-process S3."
    uri = request.getfixturevalue('mock_s3_uri') if kind == 's3' else request.getfixturevalue('tmp_path')/'registry'
    return open_store(uri, create=True)


def statuses(store): return {r['version']: r['status'] for r in model_statuses(store)}


@pytest.mark.parametrize('kind', ['local', 's3'])
def test_start_show_replace_stop_and_the_statuses(kind, request, rows, save_as_champion):
    store = open_kind(kind, request)
    a = save_as_champion(store, fit(rows), *rows)
    b, c = bundle(store, rows, 0.1), bundle(store, rows, 0.01)
    assert read_shadow(store) == (None, None)
    p1 = set_shadow(store, b, 'b on live traffic')
    assert (p1['version'], p1['previous'], p1['reason'], p1['started_at']) == (b, None, 'b on live traffic', p1['updated_at'])
    assert p1['signature']['algorithm'] == 'Ed25519' and read_shadow(store)[0] == p1
    assert statuses(store) == {a: 'champion', b: 'shadow', c: 'candidate'}
    assert set_shadow(store, b, 'again') == p1                                  # running already: kept, with its start
    p2 = set_shadow(store, c)
    assert (p2['version'], p2['previous']) == (c, b) and p2['sequence'] > p1['sequence']
    assert statuses(store) == {a: 'champion', b: 'candidate', c: 'shadow'}
    p3 = stop_shadow(store, 'enough')
    assert (p3['version'], p3['previous'], p3['started_at']) == (None, c, None) and p3['sequence'] > p2['sequence']
    assert read_shadow(store)[0] == p3 and stop_shadow(store) is None          # nothing running: nothing written
    assert read_shadow(store)[0] == p3
    assert statuses(store) == {a: 'champion', b: 'candidate', c: 'candidate'}
    log = list_decisions(store)
    assert [(d['decision'], d['candidate'], d['champion']) for d in log] == [
        ('promoted', a, None), ('shadow', b, a), ('shadow', c, a), ('shadow-stop', c, a)]
    assert log[2]['previous'] == b and log[3]['reason'] == 'enough'
    assert decided_versions(store) == {a}                                      # shadowing decides nothing
    assert read_champion(store)[0]['version'] == a


@pytest.mark.parametrize('kind', ['local', 's3'])
def test_unsigned_foreign_tampered_and_replayed_shadow_pointers_are_refused(kind, request, rows, save_as_champion):
    store = open_kind(kind, request)
    save_as_champion(store, fit(rows), *rows)
    b, c = bundle(store, rows, 0.1), bundle(store, rows, 0.01)
    running = set_shadow(store, b); stopped = stop_shadow(store)
    where = re.escape(f'{SHADOW} in store {store.uri}')
    foreign = sign({**stopped, 'version': c, 'sequence': stopped['sequence'] + 1}, read_private_key(new_key_pair()[0]))
    for pointer, says in (({k: v for k, v in running.items() if k != 'signature'}, 'is not signed'),
                          (foreign, 'which is not trusted here'),
                          ({**stopped, 'version': c}, 'does not match its signature'),
                          (signed({'version': '../../x', 'sequence': 9}), "names '../../x' is not a version id")):
        store.put(SHADOW, json.dumps(pointer).encode())
        with pytest.raises(IntegrityError, match=f'{where} .*{re.escape(says)}') as e: read_shadow(store)
        assert e.value.tag == store.get_tagged(SHADOW)[1]                       # a poller need not read it again until it changes
        with pytest.raises(IntegrityError, match=re.escape(says)): set_shadow(store, c)   # nor is it overwritten
    store.put(SHADOW, json.dumps(running).encode())                # the older, running pointer put back after the stop
    assert read_shadow(store)[0] == running                        # valid on its own; a worker that has seen the stop refuses it:
    with pytest.raises(IntegrityError, match=where + re.escape(f" has sequence {running['sequence']} (version {b}), but sequence "
                                                               f"{stopped['sequence']} (stopped) was served before")):
        check_sequence(running, stopped, store.uri, SHADOW)
    again = set_shadow(store, c)                                   # a change made on top of the replayed pointer still ranks above
    assert check_sequence(again, stopped, store.uri, SHADOW) == again


@pytest.mark.parametrize('kind', ['local', 's3'])
def test_two_starts_at_once_one_wins_and_the_other_changes_nothing(kind, request, rows, save_as_champion):
    store = open_kind(kind, request)
    save_as_champion(store, fit(rows), *rows)
    b, c = bundle(store, rows, 0.1), bundle(store, rows, 0.01)
    barrier, put_if = threading.Barrier(2, timeout=60), store.put_if
    def racing_put_if(*args):                                      # both have read the pointer before either writes
        barrier.wait(); return put_if(*args)
    store.put_if = racing_put_if
    outcomes = {}
    def start(v):
        try: outcomes[v] = set_shadow(store, v)['version']
        except ConflictError as e: outcomes[v] = e
    threads = [threading.Thread(target=start, args=(v,)) for v in (b, c)]
    for t in threads: t.start()
    for t in threads: t.join(120)
    won = [v for v, o in outcomes.items() if o == v]
    lost = [o for o in outcomes.values() if isinstance(o, ConflictError)]
    assert len(won) == 1 and len(lost) == 1, outcomes
    assert 'changed since it was read' in str(lost[0]) and read_shadow(store)[0]['version'] == won[0]
    assert [d['candidate'] for d in list_decisions(store) if d['decision'] == 'shadow'] == won   # the loser logged nothing


def test_a_shadowed_version_stays_the_default_pick_and_is_not_pruned(store, champion, add_candidate):
    weak = add_candidate(store, n_estimators=3, max_depth=1)
    assert promote(store, notify=False)['decision'] == 'rejected'
    set_shadow(store, weak, 'rejected offline: try it on live traffic')
    assert prune_rejected(store) == [] and statuses(store)[weak] == 'shadow'
    fresh = add_candidate(store, n_estimators=5, random_state=1)
    set_shadow(store, fresh)
    d = promote(store, dry_run=True, notify=False)
    assert d['candidate'] == fresh and d['evidence']['kind'] == 'offline'
    assert d['evidence']['f1_difference_ci95'] == d['bootstrap']['f1_difference_ci95']
    assert prune_rejected(store) == [weak]                         # no longer the shadow: pruned like any rejected version


def test_the_command_line_starts_shows_and_stops_and_refuses_a_bad_version_changing_nothing(
        cli, store, rows, save_as_champion, plant_payload, tmp_path):
    a = save_as_champion(store, fit(rows), *rows)
    b, unsigned, tampered, corrupt, foreign = (bundle(store, rows, C) for C in (0.1, 0.01, 0.02, 0.03, 0.04))
    at = ('--store', store.root)
    assert cli('shadow', *at).stdout == 'no shadow is running\n'
    r = cli('shadow', b, '--reason', 'try b', *at)
    assert r.returncode == 0 and r.stdout.startswith(f'shadow {b} scored beside the champion since ') and r.stdout.endswith(': try b)\n')
    assert cli('shadow', *at).stdout == r.stdout
    assert {x['version']: x['status'] for x in json.loads(cli('models', '--json', *at).stdout)}[b] == 'shadow'
    # what write access to the store allows, and a clumsy hand: no signature, a swapped model, a foreign key, a damaged file
    m = json.loads(store.get(f'versions/{unsigned}/manifest.json')); del m['signature']
    store.put(f'versions/{unsigned}/manifest.json', json.dumps(m).encode())
    marker = tmp_path/'payload-ran'; plant_payload(store, tampered, marker)
    m = json.loads(store.get(f'versions/{foreign}/manifest.json'))
    store.put(f'versions/{foreign}/manifest.json', json.dumps(sign(m, read_private_key(new_key_pair()[0]))).encode())
    model = store.get(f'versions/{corrupt}/model.joblib'); store.put(f'versions/{corrupt}/model.joblib', model[:-1])
    before = store.get(SHADOW), store.keys('decisions')
    for version, says in ((a, f'version {a} is the champion: a shadow must be another version; nothing changed'),
                          ('20200101T000000.000Z-abcdef', f'version 20200101T000000.000Z-abcdef not found in store {store.root}'),
                          (unsigned, f'manifest of version {unsigned} is not signed'),
                          (tampered, f'manifest of version {tampered} does not match its signature'),
                          (foreign, f'manifest of version {foreign} is signed by key'),
                          (corrupt, f"model.joblib of version {corrupt} does not match its manifest's SHA-256")):
        r = cli('shadow', version, *at)
        assert r.returncode == 2 and says in r.stderr and len([l for l in r.stderr.splitlines() if not l.startswith('store: ')]) == 1, (version, r.stderr)
        assert (store.get(SHADOW), store.keys('decisions')) == before, version
    r = cli('shadow', '../x', *at)                                              # not a version name at all: argparse's usage error
    assert r.returncode == 2 and "'../x' is not a version id" in r.stderr and (store.get(SHADOW), store.keys('decisions')) == before
    assert not marker.exists()                                                  # nothing was unpickled
    r = cli('shadow', '--stop', '--reason', 'enough', *at)
    pointer = json.loads(store.get(SHADOW))
    assert r.returncode == 0 and r.stdout == f"no shadow is running (stopped {b} at {pointer['updated_at']}, by {pointer['by']}: enough)\n"
    assert cli('shadow', '--stop', *at).stdout == r.stdout and json.loads(store.get(SHADOW)) == pointer   # stopped already
    history = [line.split()[1:3] for line in cli('models', '--history', *at).stdout.splitlines()[1:]]
    assert history == [['promoted', a], ['shadow', b], ['shadow-stop', b]]


def test_the_command_line_on_s3(cli, s3_uri, rows, save_as_champion):
    store = open_store(s3_uri, create=True)
    a = save_as_champion(store, fit(rows), *rows)
    b = bundle(store, rows, 0.1)
    r = cli('shadow', b, '--json', '--store', s3_uri)
    assert r.returncode == 0 and json.loads(r.stdout) == read_shadow(store)[0] and read_shadow(store)[0]['version'] == b
    r = cli('shadow', a, '--store', s3_uri)
    assert r.returncode == 2 and 'is the champion' in r.stderr
    store.put(f'versions/{b}/model.joblib', b'not a model')
    r = cli('shadow', b, '--store', s3_uri)
    assert r.returncode == 2 and "does not match its manifest's SHA-256" in r.stderr and read_shadow(store)[0]['version'] == b
    assert cli('shadow', '--stop', '--store', s3_uri).returncode == 0 and read_shadow(store)[0]['version'] is None


def test_promote_on_live_evidence_refuses_the_offline_options(cli, store):
    for extra in (('--version', '20200101T000000.000Z-abcdef'), ('--min-f1', '0.5'), ('--prune-rejected',)):
        r = cli('promote', '--evidence', 'live', *extra, '--store', store.root)
        assert r.returncode == 2 and 'go with --evidence offline' in r.stderr, r.stderr
    r = cli('promote', '--evidence', 'elsewhere', '--store', store.root)
    assert r.returncode == 2 and "invalid choice: 'elsewhere'" in r.stderr


def test_promote_on_live_evidence_without_a_shadow_is_a_conflict_and_changes_nothing(cli, store, rows, save_as_champion):
    pytest.importorskip('fraud_mlops.live')                       # 07d_live_promotion
    a = save_as_champion(store, fit(rows), *rows)
    before = store.get('champion.json'), store.keys('decisions')
    r = cli('promote', '--evidence', 'live', '--no-notify', '--resamples', '100', '--seed', '1', '--store', store.root)
    assert r.returncode == 3 and 'no shadow is running: start one with fraud-mlops shadow VERSION' in r.stderr, r.stderr
    assert (store.get('champion.json'), store.keys('decisions')) == before and read_champion(store)[0]['version'] == a


def test_promoting_the_running_shadow_offline_stops_it_and_leaves_another_alone(store, add_champion, add_candidate):
    "A shadow promoted offline serves as champion from then on: its shadow stops, logged; promoting another version leaves the shadow running."
    from fraud_mlops.promotion import promote
    from fraud_mlops.registry import read_shadow, set_shadow
    add_champion(store)
    shadowed, other = add_candidate(store, n_estimators=30), add_candidate(store, n_estimators=25)
    set_shadow(store, shadowed)
    d = promote(store, other, min_gain=-1.0, notify=False)               # any F1 passes: the gate is not what is tested here
    assert d['decision'] == 'promoted' and 'shadow_stop' not in d and read_shadow(store)[0]['version'] == shadowed
    d = promote(store, shadowed, min_gain=-1.0, notify=False)
    assert d['decision'] == 'promoted' and read_shadow(store)[0]['version'] is None
    stop = json.loads(store.get(d['shadow_stop']['log']))
    assert (stop['decision'], stop['candidate'], stop['reason']) == ('shadow-stop', shadowed, 'promoted to champion')
