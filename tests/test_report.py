"""The training report leads with the answer: the model card is its first output, a missed target says MISSED, and neither the
executed notebook nor `fraud-mlops train`'s terminal carries third-party log lines."""
import json, warnings

import pytest

from fraud_mlops.data import CI_SUBSET, resolve_path
from fraud_mlops.registry import list_versions
from fraud_mlops.store import open_store

NOISE = ('Connecting to rank', 'UserWarning', 'Finding random open ports', '[LightGBM]', 'Warning:', 'IPKernelApp')
# LightGBM's native 'Listening...' comes from a listener thread of its own, whose log level nothing outside LightGBM can set:
# it reaches a process's own stdout, never the job's notebook or terminal (the first test runs the job and checks both)
DASK_NOISE = ('Connecting to rank', 'Connected to rank', 'Binding port', 'Finding random open ports', 'will be ignored', 'UserWarning')
QUICK = ('-p', 'n_estimators', '20', '-p', 'n_boot', '100', '-p', 'folds', '2', '-p', 'compare_with', '', '-p', 'random_split_report', 'False')


def visible_outputs(nb):
    "Every output of the executed notebook, in order, as (kind, text): what a report with its inputs hidden shows besides the prose."
    out = []
    for c in nb['cells']:
        for o in c.get('outputs', []):
            data = o.get('data', {})
            out.append((o['output_type'], o.get('text') and ''.join(o['text']) or ''.join(data.get('text/markdown', data.get('text/plain', '')))))
    return out


@pytest.mark.slow
def test_the_card_comes_first_names_the_version_and_marks_a_missed_target(cli, tmp_path):
    store, out = tmp_path/'s', tmp_path/'runs'/'o.ipynb'
    r = cli('train', '--data', resolve_path(CI_SUBSET), '--store', store, '--output', out, *QUICK, '-p', 'max_memory_mb', '1',
            '-p', 'currency', 'USD')
    assert r.returncode == 0, r.stderr
    version, = list_versions(open_store(store))
    nb = json.loads(out.read_text())
    outputs = visible_outputs(nb)
    kind, card = outputs[0]                                        # nothing before it: no print, no table, no warning
    assert kind == 'display_data' and card.startswith(f'# Model card: `{version}`')
    assert card.splitlines()[1].startswith('**MISSED: peak memory of training')   # 1 MB cannot be met: said first, and in the table
    assert '**MISSED**' in card and 'USD ' in card and 'No champion in the store yet' in card
    first_code = next(i for i, c in enumerate(nb['cells']) if c.get('outputs'))
    assert all(c['cell_type'] == 'markdown' and c['source'][0].startswith('# ') or not c.get('outputs')
               for c in nb['cells'][:first_code])                  # only the title (and silent code) come before it
    text = json.dumps(outputs)
    for noise in NOISE: assert noise not in text and noise not in r.stderr and noise not in r.stdout, noise


@pytest.mark.slow
def test_the_card_compares_with_the_champion(papermill_train, add_champion, tmp_path):
    store = tmp_path/'s'
    champion = add_champion(open_store(store, create=True))
    out = tmp_path/'o.ipynb'
    papermill_train(out, store, n_estimators='20', n_boot='100', folds='2', compare_with='seed_rf', random_split_report='False')
    card = visible_outputs(json.loads(out.read_text()))[0][1]
    assert f"Champion `{champion}` (`lgbm`) on the same" in card
    assert "seed_rf (seed's recipe)" in card and 'not measured' not in card      # the seed's targets are measured now


def test_a_dask_fit_prints_no_lightgbm_chatter(ci_df, capfd, tmp_path):
    "LightGBM's Dask fit says nothing: no ports, ranks or connection retries, no 'n_jobs will be ignored' warning; afterwards LightGBM logs as before."
    from distributed import Client, LocalCluster
    import lightgbm.basic as lb
    from fraud_mlops.modelling import features_and_labels, make_model
    from fraud_mlops.train import fit_model_dask
    X, y = features_and_labels(ci_df)
    before = lb._LOGGER
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address='127.0.0.1:0') as c, Client(c) as client, \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        capfd.readouterr()
        fit_model_dask(make_model('lgbm', n_estimators=10), X, y, 0.5, client=client, folder=tmp_path/'parts', partition_rows=3_000)
        printed = capfd.readouterr()
    assert not [str(w.message) for w in caught if 'lightgbm' in str(w.filename) or 'will be ignored' in str(w.message)]
    for noise in DASK_NOISE: assert noise not in printed.out + printed.err, (noise, printed)
    assert lb._LOGGER is before
