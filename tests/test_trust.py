"""Issue 14's attacks and faults, each reproduced as an attacker or a clumsy operator would, against default settings, with what
happens now: crafted pickles never run, unsigned or replayed pointers are refused, names cannot leave the store, an empty key
is an error, a dead promoter's lock and a decision lost in a crash are recovered."""
import json, signal, subprocess, sys, time

import httpx
import pytest

from fraud_mlops.registry import list_decisions, read_champion
from fraud_mlops.signing import signed


def test_a_crafted_pickle_in_the_store_never_runs_in_the_api_at_start_or_when_the_poller_finds_it(
        store, add_champion, add_candidate, api_server, example_request, tmp_path, plant_payload):
    first = add_champion(store)
    marker = tmp_path/'payload-ran'
    server = api_server({'FRAUD_MLOPS_STORE': str(store.root), 'FRAUD_MLOPS_POLL_SECONDS': '0.2'})
    # the "stealth" attack: a new version whose model is a payload, and the pointer moved to it (which no key signs)
    v = add_candidate(store)
    plant_payload(store, v, marker)
    pointer, _ = read_champion(store)
    store.put('champion.json', json.dumps({**pointer, 'version': v, 'sequence': pointer['sequence'] + 1}).encode())
    time.sleep(2)                                                        # ten polls
    assert httpx.post(server.url + '/predict', json=example_request).json()['model_version'] == first   # still the old model
    assert not marker.exists()
    server.stop()
    log = server.log.read_text()
    assert log.count('champion.json in store') == 1 and 'changed after signing; refusing it' in log, log[-3000:]   # one line, not one per poll
    # the champion's own model swapped in place, and a fresh worker starting on that store: not ready, nothing unpickled
    store.put('champion.json', json.dumps(pointer).encode())
    plant_payload(store, first, marker)
    fresh = api_server({'FRAUD_MLOPS_STORE': str(store.root)}, wait='/health/live')
    r = httpx.get(fresh.url + '/health/ready')
    assert r.status_code == 503 and f'manifest of version {first} does not match its signature' in r.json()['detail']
    assert not marker.exists()


def test_the_api_needs_only_public_keys_and_never_shows_a_secret(store, add_champion, api_server, example_request, cli, tmp_path):
    v = add_champion(store)
    public = json.loads(cli('keys', '--json').stdout)['public_key']
    env = {'FRAUD_MLOPS_STORE': str(store.root), 'FRAUD_MLOPS_KEY_DIR': str(tmp_path/'no-keys-here'), 'FRAUD_MLOPS_PUBLIC_KEYS': public}
    server = api_server(env)
    assert httpx.post(server.url + '/predict', json=example_request).json()['model_version'] == v
    shown = httpx.get(server.url + '/model').text
    assert '"algorithm":"Ed25519"' in shown.replace(' ', '') and 'PRIVATE' not in shown
    assert not (tmp_path/'no-keys-here').exists()                         # serving never makes (or needs) a private key


@pytest.mark.parametrize('var', ['FRAUD_MLOPS_SIGNING_KEY', 'FRAUD_MLOPS_PUBLIC_KEYS'])
def test_an_empty_or_malformed_key_is_an_error_never_signing_off(cli, var):
    for value, says in (('', f'{var} is set but empty'), ('not-a-key', var)):
        r = cli('keys', env={var: value})
        assert r.returncode == 2 and says in r.stderr, r.stderr
        assert 'not-a-key' not in r.stderr or var == 'FRAUD_MLOPS_PUBLIC_KEYS'   # a private key's value is never echoed


def test_an_empty_public_key_stops_the_api_at_start(store, add_champion, api_server):
    add_champion(store)
    with pytest.raises(AssertionError, match='FRAUD_MLOPS_PUBLIC_KEYS is set but empty'):
        api_server({'FRAUD_MLOPS_STORE': str(store.root), 'FRAUD_MLOPS_PUBLIC_KEYS': ''}, seconds=20)


def test_names_that_leave_the_store_are_refused(store, champion, cli, tmp_path, ci_df):
    data = tmp_path/'in.csv'; ci_df.head(5).drop(columns='Class').to_csv(data, index=False)
    for args in (('score', data, tmp_path/'out.csv', '--version', '../../x'), ('promote', '--version', '../x'), ('rollback', '--to', '/etc')):
        r = cli(*args, '--store', store.root)
        assert r.returncode == 2 and 'is not a version id' in r.stderr, (args, r.stderr)
    assert not (tmp_path/'out.csv').exists()
    pointer, _ = read_champion(store)                                    # a signed pointer naming ../../x (a signer's mistake)
    store.put('champion.json', json.dumps(signed({**pointer, 'version': '../../x', 'sequence': 9})).encode())
    r = cli('score', data, tmp_path/'out.csv', '--store', store.root)
    assert r.returncode == 4 and "names '../../x' is not a version id" in r.stderr, r.stderr


def test_a_key_made_on_first_use_is_private_and_said_where(cli, tmp_path):
    folder = tmp_path/'keys'
    r = cli('keys', env={'FRAUD_MLOPS_KEY_DIR': str(folder)})
    assert r.returncode == 0 and f'made a new signing key pair in {folder}' in r.stderr, r.stderr
    assert oct(folder.stat().st_mode & 0o777) == '0o700' and oct((folder/'signing-key.pem').stat().st_mode & 0o777) == '0o600'
    again = cli('keys', env={'FRAUD_MLOPS_KEY_DIR': str(folder)})
    assert 'made a new' not in again.stderr and again.stdout == r.stdout


def test_a_promoter_killed_while_holding_the_lock_does_not_block_the_next_one(store, champion, add_candidate, cli):
    # a promoter that dies inside the compare-and-swap, holding champion.json.lock, as `kill -9` leaves it
    hold = ("import os, sys, time; from fraud_mlops.store import open_store; s = open_store(sys.argv[1]); "
            "s.put = lambda *a: (print('holding', flush=True), time.sleep(600)); "
            "s.put_if('champion.json', b'x', s.get_tagged('champion.json')[1])")
    p = subprocess.Popen([sys.executable, '-c', hold, str(store.root)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == 'holding'
    p.send_signal(signal.SIGKILL); p.wait()
    assert (store.root/'champion.json.lock').exists()
    add_candidate(store, n_estimators=25)
    start = time.monotonic()
    r = cli('promote', '--store', store.root, '--no-notify', '--min-gain', '-1')
    assert r.returncode == 0 and r.stdout.startswith('promoted'), r.stderr
    assert 'broke the stale lock' in r.stderr and f'process {p.pid} of this host is gone' in r.stderr
    assert time.monotonic() - start < 30 and not (store.root/'champion.json.lock').exists()


def test_a_promoter_killed_between_the_flip_and_the_decision_log_leaves_a_champion_with_its_decision(store, champion, add_candidate, cli):
    v = add_candidate(store, n_estimators=25)
    die = ("import os, sys; from fraud_mlops.store import LocalStore; from fraud_mlops.promotion import promote; from fraud_mlops.store import open_store; "
           "put_new = LocalStore.put_new; "
           "LocalStore.put_new = lambda self, k, d: os._exit(9) if k.startswith('decisions/') else put_new(self, k, d); "
           "promote(open_store(sys.argv[1]), min_gain=-1, notify=False)")
    assert subprocess.run([sys.executable, '-c', die, str(store.root)]).returncode == 9
    pointer, _ = read_champion(store)
    assert pointer['version'] == v and not store.exists(pointer['decision_log'])     # flipped; the log write never happened
    history = list_decisions(store)
    assert history[-1]['candidate'] == v and history[-1]['decision'] == 'promoted'   # the pointer carries the decision
    assert v in cli('models', '--history', '--store', store.root).stdout
    add_candidate(store, n_estimators=22)
    assert cli('promote', '--store', store.root, '--no-notify').returncode == 0
    assert store.exists(pointer['decision_log'])                                    # the next promotion wrote the lost copy


def test_a_replayed_older_pointer_is_refused_by_a_running_api_and_a_rollback_is_followed(
        store, add_champion, add_candidate, api_server, example_request, cli):
    first = add_champion(store)
    old_pointer = store.get('champion.json')                             # signed, valid: what an attacker would keep and replay
    second = add_candidate(store, n_estimators=25)
    assert cli('promote', '--store', store.root, '--min-gain', '-1', '--no-notify').returncode == 0
    served = json.loads(store.get('champion.json'))['sequence']
    server = api_server({'FRAUD_MLOPS_STORE': str(store.root), 'FRAUD_MLOPS_POLL_SECONDS': '0.2'})
    version = lambda: httpx.post(server.url + '/predict', json=example_request).json()['model_version']
    model = lambda: httpx.get(server.url + '/model').json()['serving']
    assert version() == second and model()['pointer_sequence'] == served
    store.put('champion.json', old_pointer)                              # the replay
    time.sleep(1.5)
    assert version() == second                                           # refused: the newer model keeps serving
    failure = model()['reload_failure']
    assert f'version {first}), but sequence {served}' in failure['error'] and 'an older pointer was put back' in failure['error']
    assert 'fraud_mlops_reload_failing 1' in httpx.get(server.url + '/metrics').text
    assert httpx.get(server.url + '/health/ready').json()['reload_failure']['error'] == failure['error']
    # the operator repairs it by pointing the champion where it belongs: a new pointer, above every one served
    r = cli('rollback', '--store', store.root, '--to', second, '--no-notify')
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 10
    while model()['reload_failure'] is not None and time.monotonic() < deadline: time.sleep(0.1)
    assert model()['reload_failure'] is None and version() == second
    r = cli('rollback', '--store', store.root, '--no-notify')             # and a rollback proper is followed
    assert r.returncode == 0 and f'rollback: {first}' in r.stdout, r.stdout + r.stderr
    deadline = time.monotonic() + 10
    while version() != first and time.monotonic() < deadline: time.sleep(0.1)
    assert version() == first and model()['pointer_sequence'] > served
    server.stop()
    assert server.log.read_text().count('an older pointer was put back') == 1
