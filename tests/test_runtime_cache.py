"""The runtime cache as `fraud-mlops score` uses it: the same output bits with and without it, for the fast kinds and a
kind without a fast runtime; a warm cache keeps scikit-learn, LightGBM and SciPy's heavy packages out of the process;
a damaged entry or an unwritable folder never fails the job."""
import json, subprocess, sys

import pytest

from fraud_mlops.data import FEATURES

KINDS = [('lgbm', {'n_estimators': 20}), ('lgbm_rf', {'n_estimators': 20, 'forest_trees': 10}), ('hgb', {'max_iter': 20})]
HEAVY = ('sklearn', 'lightgbm', 'scipy.linalg', 'scipy.stats', 'scipy.sparse')


@pytest.fixture(scope='module')
def ci_csv(ci_df, tmp_path_factory):
    path = tmp_path_factory.mktemp('cache-inputs')/'ci.csv'
    ci_df.to_csv(path, index=False)
    return path


@pytest.fixture
def champion_of(store, save_as_champion, ci_df):
    "`champion_of(kind, params)`: a model of `kind` fitted on the CI subset, made champion of `store`."
    from fraud_mlops.modelling import fit_model, make_model
    X, y = ci_df[FEATURES].to_numpy(), ci_df.Class.to_numpy()
    return lambda kind, params: save_as_champion(store, fit_model(make_model(kind, **params), X, y, 0.25), X, y, threshold=0.3)


@pytest.mark.parametrize('kind,params', KINDS)
def test_output_is_the_same_bits_without_the_cache_on_its_first_run_and_from_it(kind, params, cli, store, champion_of, ci_csv, tmp_path):
    champion_of(kind, params)
    cache = tmp_path/'cache'
    out = {}
    for run, folder in (('off', 'off'), ('cold', cache), ('warm', cache)):
        r = cli('score', ci_csv, tmp_path/f'{run}.parquet', '--store', store.root, '--chunk-rows', '3000',
                env={'FRAUD_MLOPS_CACHE_DIR': str(folder)})
        assert r.returncode == 0 and r.stderr == f'store: {store.root}\n', r.stderr
        out[run] = (tmp_path/f'{run}.parquet').read_bytes()
        if run == 'cold': entries = sorted(p.name for p in cache.iterdir()) if cache.exists() else []
    assert out['off'] == out['cold'] == out['warm']
    assert len(entries) == (0 if kind == 'hgb' else 1)          # a kind without a fast runtime never writes one
    assert sorted(p.name for p in cache.iterdir()) == entries if cache.exists() else entries == []


def _modules_after_score(store, src, dest, cache):
    "sorted(sys.modules) of a process that ran `fraud-mlops score` with runtime cache `cache`."
    code = ('import json, sys\nfrom fraud_mlops.cli import main\n'
            'main(sys.argv[1:])\nprint(json.dumps(sorted(sys.modules)))')
    env_code = f'import os; os.environ["FRAUD_MLOPS_CACHE_DIR"] = {str(cache)!r}\n' + code
    r = subprocess.run([sys.executable, '-c', env_code, 'score', str(src), str(dest), '--store', str(store.root)],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize('kind,params', KINDS[:2])
def test_a_warm_cache_scores_without_scikit_learn_lightgbm_or_scipys_heavy_packages(kind, params, store, champion_of, ci_csv, tmp_path):
    champion_of(kind, params)
    cold = _modules_after_score(store, ci_csv, tmp_path/'cold.parquet', tmp_path/'cache')
    warm = _modules_after_score(store, ci_csv, tmp_path/'warm.parquet', tmp_path/'cache')
    loaded = lambda mods, pkg: any(m == pkg or m.startswith(pkg + '.') for m in mods)
    assert all(loaded(cold, p) for p in ('sklearn', 'lightgbm', 'scipy.linalg'))  # the first run unpickles: the check can see them
    assert [p for p in HEAVY if loaded(warm, p)] == []
    assert (tmp_path/'cold.parquet').read_bytes() == (tmp_path/'warm.parquet').read_bytes()


def test_a_damaged_entry_is_rebuilt_and_an_unwritable_folder_is_a_warning(cli, store, champion_of, ci_csv, tmp_path):
    champion_of('lgbm_rf', KINDS[1][1])
    cache = tmp_path/'cache'
    env = {'FRAUD_MLOPS_CACHE_DIR': str(cache)}
    assert cli('score', ci_csv, tmp_path/'first.csv', '--store', store.root, env=env).returncode == 0
    entry, = cache.iterdir()
    good = entry.read_bytes()
    entry.write_bytes(good[:len(good) // 3])                     # truncated, as by a full disk
    r = cli('score', ci_csv, tmp_path/'second.csv', '--store', store.root, env=env)
    assert r.returncode == 0 and 'unreadable' in r.stderr and r.stderr.startswith('store: ') and len(r.stderr.strip().splitlines()) == 2, r.stderr
    assert entry.read_bytes() == good                            # rebuilt, the same bytes
    (tmp_path/'file').write_text('not a folder')
    r = cli('score', ci_csv, tmp_path/'third.csv', '--store', store.root, env={'FRAUD_MLOPS_CACHE_DIR': str(tmp_path/'file'/'cache')})
    assert r.returncode == 0 and 'not written' in r.stderr and r.stderr.startswith('store: ') and len(r.stderr.strip().splitlines()) == 2, r.stderr
    assert (tmp_path/'first.csv').read_bytes() == (tmp_path/'second.csv').read_bytes() == (tmp_path/'third.csv').read_bytes()
