"Promotion on real rows: better wins, worse and equal are rejected, the champion never changes by accident."
import multiprocessing as mp

import pytest

from fraud_mlops.promotion import promote, rollback
from fraud_mlops.registry import list_decisions, load_champion, model_statuses, read_champion
from fraud_mlops.store import ConflictError, StoreError, open_store


def test_first_candidate_becomes_champion_and_is_served_by_load_champion(store, add_candidate):
    v = add_candidate(store)
    d = promote(store, notify=False)
    assert (d['decision'], d['candidate'], d['champion']) == ('promoted', v, None)
    assert load_champion(store)[1]['version'] == v


def test_worse_candidate_is_rejected_and_kept(store, add_candidate):
    good = add_candidate(store, n_estimators=30)
    promote(store, notify=False)
    weak = add_candidate(store, n_estimators=3, max_depth=1)
    d = promote(store, notify=False)
    assert d['decision'] == 'rejected'
    assert d['candidate_metrics']['f1'] < d['champion_metrics']['f1']
    assert d['candidate_metrics']['rows'] == d['champion_metrics']['rows']   # same frozen rows for both
    assert read_champion(store)[0]['version'] == good
    assert {r['version']: r['status'] for r in model_statuses(store)} == {good: 'champion', weak: 'rejected'}
    assert (store.root/'versions'/weak/'model.joblib').exists()


def test_better_candidate_replaces_the_champion(store, add_candidate):
    weak = add_candidate(store, n_estimators=3, max_depth=1)
    promote(store, notify=False)
    good = add_candidate(store, n_estimators=30)
    d = promote(store, notify=False)
    assert d['decision'] == 'promoted' and d['champion'] == weak
    pointer, _ = read_champion(store)
    assert (pointer['version'], pointer['previous']) == (good, weak)
    assert rollback(store, notify=False)['candidate'] == weak
    assert read_champion(store)[0]['version'] == weak


def test_min_gain_keeps_the_champion_on_a_small_improvement(store, add_candidate):
    add_candidate(store, n_estimators=3, max_depth=1); promote(store, notify=False)
    add_candidate(store, n_estimators=30)
    d = promote(store, min_gain=0.99, notify=False)
    assert d['decision'] == 'rejected' and 'more than 0.99' in d['reason']


def test_a_corrupt_champion_blocks_promotion_with_a_clear_error(store, add_candidate):
    champ = add_candidate(store); promote(store, notify=False)
    add_candidate(store)
    (store.root/'versions'/champ/'model.joblib').write_bytes(b'not a model')
    with pytest.raises(StoreError, match="does not match its manifest's SHA-256"):
        promote(store, notify=False)
    assert read_champion(store)[0]['version'] == champ
    assert len(list_decisions(store)) == 1


def _promote_in_process(root, version, barrier, results):
    barrier.wait()
    try: results.put((version, promote(open_store(root), version, notify=False)['decision']))
    except ConflictError as e: results.put((version, f'conflict: {e}'))


def test_concurrent_promotions_never_lose_an_update(store, add_candidate):
    "Four processes promote four candidates at once: each either decides or fails with a conflict, and the log is one chain."
    versions = [add_candidate(store, n_estimators=5 + i, random_state=i) for i in range(4)]
    ctx = mp.get_context('fork')
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_promote_in_process, args=(str(store.root), v, barrier, results)) for v in versions]
    for p in procs: p.start()
    for p in procs: p.join(60)
    outcomes = dict(results.get(timeout=5) for _ in procs)
    assert set(outcomes) == set(versions)
    assert all(o in ('promoted', 'rejected') or o.startswith('conflict:') for o in outcomes.values())
    promoted = [d for d in list_decisions(store) if d['decision'] == 'promoted']
    assert promoted and promoted[0]['champion'] is None
    for before, after in zip(promoted, promoted[1:]):
        assert after['champion'] == before['candidate']    # every promotion saw the champion it replaced
    assert read_champion(store)[0]['version'] == promoted[-1]['candidate']
    assert [o for o in outcomes.values() if o == 'promoted'] == ['promoted'] * len(promoted)


def test_floor_turns_away_a_weak_first_model_and_the_record_carries_the_bootstrap(store, add_candidate):
    weak = add_candidate(store, n_estimators=3, max_depth=1)
    d = promote(store, min_f1=0.999, notify=False)
    assert d['decision'] == 'rejected' and d['reason'].endswith('is below the floor 0.999') and read_champion(store) == (None, None)
    promote(store, version=weak, notify=False)                        # decided again, without the floor: first model
    add_candidate(store, n_estimators=30)
    d = promote(store, notify=False)
    b = d['bootstrap']
    assert (b['resamples'], b['seed']) == (1000, 0) and 0 <= b['p_candidate_better'] <= 1
    lo, hi = b['f1_difference_ci95']
    assert lo <= b['f1_difference'] <= hi
    assert abs(b['f1_difference'] - (d['candidate_metrics']['f1'] - d['champion_metrics']['f1'])) < 1e-12
    assert d['evaluation']['champion_tested_on_same_rows'] is True    # same data and split: the same frozen rows
    assert list_decisions(store)[-1]['bootstrap'] == b                # logged as reported


def test_prune_rejected_deletes_only_rejected_versions_and_keeps_their_records(store, add_candidate):
    good = add_candidate(store, n_estimators=30); promote(store, notify=False)
    weak = add_candidate(store, n_estimators=3, max_depth=1); assert promote(store, notify=False)['decision'] == 'rejected'
    weaker = add_candidate(store, n_estimators=2, max_depth=1)
    d = promote(store, notify=False, prune=True)
    assert d['decision'] == 'rejected' and sorted(d['pruned']) == sorted([weak, weaker])
    assert not (store.root/'versions'/weak).exists() and not (store.root/'versions'/weaker).exists()
    assert [r['version'] for r in model_statuses(store)] == [good]
    assert [x['candidate'] for x in list_decisions(store)] == [good, weak, weaker]
