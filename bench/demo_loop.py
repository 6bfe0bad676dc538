"""`make demo-loop`: the loop (issues 15 and 16) on real data, on this machine, checked as it goes.

In a temporary store (with its own throwaway signing keys): train on day 1 of the data (`Time < 86400`) with
`fraud-mlops train` (the default model and protocol, the report's comparisons off, 200 bootstrap resamples:
under a minute on 2 cores for the full data's 144,786 rows), promote it, serve it on 127.0.0.1 with
`fraud-mlops serve` (prediction log flushed every half second), replay day 2 through the API with transaction ids
(`fraud_mlops.replay`), then add day 2's labels late, in steps (none, 10%, 50%, 100%, in a seeded random order, with
`fraud-mlops labels add`), running `monitor` on that replay's window after each: coverage grows and the realised
metrics appear. `fraud-mlops export-training-data` then writes the labelled traffic after day 1's rows, as the weekly
retraining does. Finally day 2 is replayed again with one feature shifted (V14 + 3 by default) under other ids, and
`monitor` runs on each replay's own time window (`--since/--until`): the shifted feature is flagged on the shifted window
(the most drifted input, and named by `fraud-mlops monitor --fail-on psi>0.2`) and not on the unshifted one, and every
other input drifts exactly as much in both. (Day 2 of the real data itself moves away from day 1 in about ten PCA inputs,
V1, V3 and V28 by a PSI above 1: the monitor flags those in both windows alike, and is right to; `nbs/01e_drift.ipynb`
shows why. So the unshifted window is "not flagged" for the shifted feature, not for every input.)

A challenger runs in shadow all along (issue 16): a second model of another kind (`--challenger`, default `lgbm`) trained
on day 1 and set with `fraud-mlops shadow`; the API scores it on every replayed row in its log. While only 10% of the
labels are in, `promote --evidence live` refuses (too few labelled frauds) and changes nothing; with all of them it
decides on the same labelled transactions, paired bootstrap, and the decision names that evidence. One alert of day 2
is asked for its reasons (`/predict?explain=3`), and `monitor` shows champion against shadow and the reasons behind alerts.

Prints the monitor outputs and one line per expectation; exits 1 if any expectation fails (it is also a check).
`--quick` runs on the committed CI subset (day 2: 4,935 rows) in about a minute; `--data` takes another CSV.
"""
import argparse, http.client, json, os, shutil, signal, subprocess, sys, tempfile, time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from fraud_mlops.data import CI_SUBSET, DAY, FEATURES, FULL_DATA, TARGET, DataError, load_transactions, resolve_path  # noqa: E402
from fraud_mlops.drift import PSI_ALERT  # noqa: E402
from fraud_mlops.monitor import format_monitor, monitor  # noqa: E402
from fraud_mlops.predlog import read_log  # noqa: E402
from fraud_mlops.registry import list_decisions, read_champion, read_shadow  # noqa: E402
from fraud_mlops.replay import replay  # noqa: E402
from fraud_mlops.store import open_store  # noqa: E402
from common import free_port, stop  # noqa: E402  (bench/common.py, beside this script)

CLI = Path(sys.executable).parent/'fraud-mlops'
TRAIN_PARAMS = {'compare_with': '', 'n_boot': '200'}
LABEL_STEPS = (0.1, 0.5, 1.0)
DRIFT = 'psi>0.2'


class Demo:
    "The demo's folder, store, environment and expectations; `check` records one, `run` runs a `fraud-mlops` command."
    def __init__(self, folder):
        self.folder, self.failed = Path(folder), []
        self.store = self.folder/'registry'
        drop = ('FRAUD_MLOPS_SIGNING_KEY', 'FRAUD_MLOPS_PUBLIC_KEYS', 'FRAUD_MLOPS_INSECURE_ALLOW_UNSIGNED', 'API_URL')
        self.env = {**{k: v for k, v in os.environ.items() if k not in drop}, 'FRAUD_MLOPS_STORE': str(self.store),
                    'FRAUD_MLOPS_KEY_DIR': str(self.folder/'keys'), 'FRAUD_MLOPS_CACHE_DIR': str(self.folder/'cache'),
                    'FRAUD_MLOPS_LOG_FLUSH_SECONDS': '0.5'}
        os.environ.update({k: self.env[k] for k in ('FRAUD_MLOPS_STORE', 'FRAUD_MLOPS_KEY_DIR', 'FRAUD_MLOPS_CACHE_DIR')})

    def run(self, *args, quiet=False):
        "`fraud-mlops ARGS` with the demo's environment; the finished process (its output shown unless `quiet`)."
        r = subprocess.run([str(CLI), *map(str, args)], env=self.env, cwd=self.folder, capture_output=True, text=True)
        if not quiet: print(r.stdout.rstrip() or r.stderr.rstrip()[-2000:])
        return r

    def check(self, ok, what):
        "Record expectation `what`, met or not, and say so."
        print(f"{'ok  ' if ok else 'FAIL'}  {what}")
        if not ok: self.failed.append(what)
        return ok


T0 = time.monotonic()

def section(title): print(f'\n=== [{time.monotonic() - T0:5.1f} s] {title}', flush=True)


def serve(demo, seconds=120):
    "`fraud-mlops serve` on a free 127.0.0.1 port; (process, url) once /health/ready answers 200."
    port = free_port()
    with open(demo.folder/'serve.log', 'wb') as log:
        proc = subprocess.Popen([str(CLI), 'serve', '--host', '127.0.0.1', '--port', str(port)], env=demo.env, cwd=demo.folder,
                                stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None: raise SystemExit('fraud-mlops serve exited:\n' + (demo.folder/'serve.log').read_text()[-3000:])
        try:
            conn = http.client.HTTPConnection('127.0.0.1', port, timeout=2); conn.request('GET', '/health/ready')
            if conn.getresponse().status == 200: return proc, f'http://127.0.0.1:{port}'
        except OSError: pass
        time.sleep(0.2)
    stop(proc); raise SystemExit(f'fraud-mlops serve not ready within {seconds} s')


def logged(store, since, until, expected, seconds=30):
    "Rows the prediction log of `store` holds in [since, until), once it holds `expected` of them (or `seconds` have passed)."
    deadline = time.monotonic() + seconds
    while True:
        n = sum(t.num_rows for t in read_log(store, since, until, columns=['transaction_id']))
        if n >= expected or time.monotonic() > deadline: return n
        time.sleep(0.25)


def replayed(demo, store, name, rows, url, rate, **kw):
    "Replay `rows` to `url`, check every row was answered and logged; the replay's result."
    r = replay(rows, url, rate, **kw)
    print(f"{name}: {r['rows']:,} rows in {r['requests']:,} requests, {r['seconds']:.1f} s ({r['rows_per_second']:,.0f} rows/s), "
          f"statuses {r['statuses']}, window {r['since']} .. {r['until']}")
    demo.check(r['rows_ok'] == len(rows) and not r['errors'], f"{name}: all {len(rows):,} rows answered 200")
    n = logged(store, r['since'], r['until'], len(rows))
    demo.check(n == len(rows), f"{name}: the prediction log holds its {len(rows):,} rows in its window ({n:,})")
    return r


def quality(summary):
    "The one version's row of a monitor summary (None if it has none)."
    return summary['versions'][0] if len(summary['versions']) == 1 else None


def live_promotion(demo, store, champion, shadow, frauds_labelled):
    "`fraud-mlops promote --evidence live`: refused (exit 3, nothing changed) below 30 labelled frauds, else decided on the labelled traffic."
    before = len(list_decisions(store))
    r = demo.run('promote', '--evidence', 'live', '--no-notify')
    if frauds_labelled < 30:
        demo.check(r.returncode == 3 and 'nothing' in r.stderr and len(list_decisions(store)) == before
                   and read_champion(store)[0]['version'] == champion,
                   f'promote --evidence live with {frauds_labelled} labelled frauds: refused (exit 3), nothing changed')
        return None
    d = list_decisions(store)[-1] if len(list_decisions(store)) > before else {}
    e = d.get('evidence', {})
    demo.check(r.returncode == {'promoted': 0, 'rejected': 3}.get(d.get('decision')) and e.get('kind') == 'live' and (e.get('champion'), e.get('shadow')) == (champion, shadow)
               and e.get('frauds') == frauds_labelled,
               f"promote --evidence live decides: {d.get('decision')} on {e.get('rows')} labelled rows, {e.get('frauds')} frauds, "
               f"F1 shadow {d.get('candidate_metrics', {}).get('f1', float('nan')):.3f} vs champion {d.get('champion_metrics', {}).get('f1', float('nan')):.3f}, "
               f"difference {e.get('f1_difference', float('nan')):+.3f} [{', '.join(f'{x:+.3f}' for x in e.get('f1_difference_ci95') or [])}]")
    now = read_champion(store)[0]['version']
    demo.check(now == (shadow if d.get('decision') == 'promoted' else champion)
               and (read_shadow(store)[0]['version'] is None) == (d.get('decision') == 'promoted'),
               f"the champion is now {now} ({'the shadow, whose shadow run is stopped' if now == shadow else 'unchanged, the shadow still running'})")
    return d


def labels_late(demo, store, day2, window, champion, shadow, seed=0):
    "Add day 2's labels in steps (a seeded random order) with `fraud-mlops labels add`, monitoring `window` before the first and after each."
    order = np.random.default_rng(seed).permutation(len(day2))
    labels = pd.DataFrame({'transaction_id': [f'tx-{i}' for i in day2.index], 'label': day2[TARGET].to_numpy()})
    done, frauds = 0, int(day2[TARGET].sum())
    for step in (0.0, *LABEL_STEPS):
        upto = int(round(step * len(day2)))
        if upto > done:
            path = demo.folder/f'labels-{int(step * 100)}.csv'
            labels.iloc[order[done:upto]].to_csv(path, index=False)
            section(f'labels arrive: {step:.0%} of day 2 (fraud-mlops labels add {path.name})')
            r = demo.run('labels', 'add', path)
            demo.check(r.returncode == 0, f'labels add {path.name} exits 0')
            done = upto
        else: section('monitor before any label has arrived')
        summary = monitor(store, window['since'], window['until'], n_boot=100)
        print(format_monitor(summary))
        v = quality(summary)
        demo.check(v is not None and v['rows'] == len(day2) and v['labelled'] == done,
                   f"{done:,} of {len(day2):,} logged rows labelled (coverage {v['coverage']:.3f})" if v else 'one model version in the log')
        if done == 0: demo.check(v is not None and v['recall'] is None, 'no labels, no realised recall (null, not 0)')
        if step == LABEL_STEPS[0]:   # too few labelled frauds yet to rank two models (with 30 or more, the decision waits for all labels)
            if (n := int(day2[TARGET].to_numpy()[order[:done]].sum())) < 30: live_promotion(demo, store, champion, shadow, n)
    ok = v is not None and v['recall'] is not None and v['precision'] is not None
    demo.check(ok, f"all labels in: realised recall {v['recall']:.3f}, precision {v['precision']:.3f} on {frauds} frauds" if ok
               else 'all labels in: realised recall and precision')
    for row in summary.get('shadow', []):
        print(f"champion {row.get('champion')} vs shadow {row.get('shadow')} on {row.get('date')}: {json.dumps({k: row[k] for k in row if k not in ('champion', 'shadow', 'date')}, default=str)[:600]}")
    demo.check(bool(summary.get('shadow')), 'monitor shows the champion against the shadow on the same labelled transactions')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--data', help=f'transactions CSV with two days (default {FULL_DATA}; with --quick {CI_SUBSET})')
    p.add_argument('--quick', action='store_true', help='the CI subset (day 2: 4,935 rows) and a faster replay: about a minute')
    p.add_argument('--rate', type=float, help='replay rows per second (default 10,000; --quick 5,000)')
    p.add_argument('--shift', default='V14=3', help='FEATURE=DELTA added to the second replay (default V14=3)')
    p.add_argument('--challenger', default='lgbm', help='model kind of the challenger run in shadow (default lgbm)')
    p.add_argument('--folder', help='work in this folder, and keep it (default: a temporary folder, removed unless something fails)')
    args = p.parse_args(argv)
    data = resolve_path(args.data or (CI_SUBSET if args.quick else FULL_DATA))
    feature, _, delta = args.shift.partition('=')
    try: delta = float(delta)
    except ValueError: p.error(f'--shift {args.shift!r}: write FEATURE=NUMBER, e.g. V14=3')
    if feature not in FEATURES: p.error(f'--shift {args.shift!r}: {feature} is not a feature ({FEATURES[0]}, {FEATURES[1]}..{FEATURES[-1]})')
    try: df = load_transactions(data)
    except DataError as e: p.error(f'{e} (`make data` fetches the full dataset)')
    day1, day2 = df[df.Time < DAY], df[(df.Time >= DAY) & (df.Time < 2 * DAY)]
    if not len(day1) or not len(day2): p.error(f'{data}: the demo needs rows of day 1 and of day 2 (Time < 86400, then up to 172800)')
    rate = args.rate or (5_000 if args.quick else 10_000)
    folder = Path(args.folder or tempfile.mkdtemp(prefix='fraud-mlops-demo-'))
    folder.mkdir(parents=True, exist_ok=True)
    demo, started = Demo(folder), time.monotonic()
    pa_csv.write_csv(pa.Table.from_pandas(day1, preserve_index=False), folder/'day1.csv')
    print(f'{data}: day 1 {len(day1):,} rows ({int(day1[TARGET].sum())} frauds), day 2 {len(day2):,} rows ({int(day2[TARGET].sum())} frauds); '
          f'working in {folder}')

    section('train on day 1, promote')
    params = [a for k, v in TRAIN_PARAMS.items() for a in ('-p', k, v)]
    t = time.monotonic()
    demo.check(demo.run('train', '--data', folder/'day1.csv', '--output', folder/'train.ipynb', *params).returncode == 0,
               f'fraud-mlops train on day 1 ({time.monotonic() - t:.0f} s, {" ".join(params)})')
    r = demo.run('promote', '--no-notify')
    if not demo.check(r.returncode == 0 and r.stdout.startswith('promoted'), 'the day-1 model is promoted'): return finish(demo, folder, args, started)
    store = open_store(demo.store)
    champion = read_champion(store)[0]['version']

    section(f'train a challenger ({args.challenger}) on day 1 and run it in shadow')
    t = time.monotonic()
    demo.check(demo.run('train', '--data', folder/'day1.csv', '--output', folder/'challenger.ipynb', '-p', 'model', args.challenger, *params).returncode == 0,
               f'fraud-mlops train -p model {args.challenger} on day 1 ({time.monotonic() - t:.0f} s)')
    shadow = [m['version'] for m in json.loads(demo.run('models', '--json', quiet=True).stdout) if m['version'] != champion][-1]
    demo.check(demo.run('shadow', shadow).returncode == 0 and read_shadow(store)[0]['version'] == shadow, f'fraud-mlops shadow {shadow}')

    proc, url = serve(demo)
    try:
        section(f'replay day 2 through {url} with transaction ids (tx-<row>), at most {rate:,.0f} rows/s')
        plain = replayed(demo, store, 'day 2', day2, url, rate)
        shadowed = sum(t.num_rows - t['shadow_probability'].null_count for t in read_log(store, plain['since'], plain['until'], columns=['shadow_probability']))
        demo.check(shadowed == len(day2), f'the shadow scored every replayed row in the log ({shadowed:,})')
        section('the reasons of one alert of day 2 (POST /predict?explain=3)')
        conn, answer = http.client.HTTPConnection(url.split('//')[1]), {}
        for _, row in day2[day2[TARGET] == 1].iterrows():          # the first fraud of day 2 that the champion flags
            conn.request('POST', '/predict?explain=3', json.dumps({'features': row[FEATURES].tolist()}), {'Content-Type': 'application/json'})
            answer = json.loads(conn.getresponse().read())
            if answer.get('prediction') == 'fraud': break
        print(json.dumps(answer))
        demo.check(answer.get('prediction') == 'fraud' and len(answer.get('reasons', [])) == 3, 'an alert carries its three strongest reasons')
        labels_late(demo, store, day2, plain, champion, shadow)

        section('export the labelled traffic after day 1 (what the weekly retraining trains on)')
        r = demo.run('export-training-data', folder/'retrain.csv', '--append-to', folder/'day1.csv', '--since', plain['since'], '--until', plain['until'])
        exported = pd.read_csv(folder/'retrain.csv') if r.returncode == 0 else None
        demo.check(exported is not None and len(exported) == len(day1) + len(day2)
                   and int(exported[TARGET].sum()) == int(day1[TARGET].sum() + day2[TARGET].sum()),
                   f'export-training-data: day 1 then the {len(day2):,} labelled day-2 rows, every fraud kept')

        section(f'replay day 2 again with {feature} + {delta:g} (ids shifted-<row>)')
        moved = replayed(demo, store, f'day 2, {feature} + {delta:g}', day2, url, rate, id_prefix='shifted', shift={feature: delta})
    finally: stop(proc)

    seen = []
    for name, r in (('the unshifted replay', plain), (f'the {feature}-shifted replay', moved)):
        section(f"monitor on {name}'s own window: --since {r['since']} --until {r['until']}")
        summary = monitor(store, r['since'], r['until'], n_boot=100)
        print(format_monitor(summary))
        cli = demo.run('monitor', '--since', r['since'], '--until', r['until'], '--fail-on', DRIFT, quiet=True)
        print(f'\nfraud-mlops monitor --fail-on "{DRIFT}" on this window: exit {cli.returncode}; {cli.stderr.strip() or "no condition holds"}')
        seen.append(({row['feature']: row['psi'] for row in summary['features']}, cli))
    (plain_psi, plain_cli), (moved_psi, moved_cli) = seen
    section('drift: the shifted window against the unshifted one')
    if not demo.check(feature in plain_psi and feature in moved_psi, 'monitor measures feature drift (the bundle has a training reference)'):
        return finish(demo, folder, args, started)
    moving = sorted((f for f, v in plain_psi.items() if v > PSI_ALERT), key=lambda f: -plain_psi[f])
    print(f"day 2 itself moves away from day 1 in {len(moving)} inputs ({', '.join(moving) or 'none'}): real, flagged in both windows "
          f"alike (nbs/01e_drift.ipynb shows they move at every hour of day 2); the claim below is about {feature}")
    demo.check(plain_psi[feature] <= PSI_ALERT, f'{feature} is not flagged on the unshifted replay (PSI {plain_psi[feature]:.3f})')
    demo.check(moved_psi[feature] > PSI_ALERT and max(moved_psi, key=moved_psi.get) == feature,
               f'{feature} is flagged on the shifted replay, the most drifted input (PSI {moved_psi[feature]:.3f})')
    others = max(abs(moved_psi[f] - plain_psi[f]) for f in plain_psi if f != feature)
    demo.check(others < 1e-9, f'every other input drifts exactly as much in both windows (largest difference {others:.1e})')
    demo.check(moved_cli.returncode == 3 and feature in moved_cli.stderr,
               f'fraud-mlops monitor --fail-on "{DRIFT}" exits 3 on the shifted window, naming {feature}')
    demo.check(plain_cli.returncode == (3 if moving else 0) and feature not in plain_cli.stderr,
               f'on the unshifted window it exits {3 if moving else 0} ({"the day-level inputs" if moving else "nothing moved"}), '
               f'and does not name {feature}')
    section('promote on live evidence: the shadow against the champion on the labelled day 2 (fraud-mlops promote --evidence live)')
    live_promotion(demo, store, champion, shadow, int(day2[TARGET].sum()))
    return finish(demo, folder, args, started)


def finish(demo, folder, args, started):
    "Say how it went; remove the folder unless asked to keep it; the exit code."
    section(f'{"all expectations met" if not demo.failed else f"{len(demo.failed)} expectation(s) failed"} in {time.monotonic() - started:.0f} s')
    for what in demo.failed: print(f'FAIL  {what}')
    if args.folder or demo.failed: print(f'kept {folder} (store, serve.log, label files)')
    else: shutil.rmtree(folder, ignore_errors=True)
    return 1 if demo.failed else 0


if __name__ == '__main__':
    signal.signal(signal.SIGTERM, signal.default_int_handler)   # a stopped demo still stops its server
    sys.exit(main())
