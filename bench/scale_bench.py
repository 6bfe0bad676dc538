"""`make bench-scale`: `fraud-mlops score` of the full dataset end to end, then file scoring at 1x, 4x and 16x it, in this process and on a 2-worker LocalCluster.

First, the command as users run it: `fraud-mlops score full.parquet out.parquet` of the 284,807 real rows, a fresh
process each time (interpreter start, imports, loading and checking the model, reading, scoring, writing, exit), timed
from outside: once with an empty runtime cache (the first `score` of a version, which builds its entry; printed apart),
then `BENCH_RUNS` times (default 5) with that entry, alternating with a reference in the same run: the plain script one would
write without this package (pandas `read_parquet`, `joblib.load` of the same pipeline, `predict_proba`, `to_parquet`).
Printed: each run, the median rows/s of both and their ratio (target: the command at 150,000 rows/s or more on 2 cores).
`python bench/scale_bench.py --startup` prints only that.

The inputs are the 284,807 real rows replicated (1, 4 and 16 copies, an `id` column numbering the rows), written as
Parquet under a temporary folder (`BENCH_DIR` to choose another, kept) and deleted afterwards; `BENCH_COPIES=1,4,16`
chooses the sizes. Each run is a fresh process,
so its peak RSS is its own; on the cluster the workers' peak RSS is read from each worker before it stops. The model
is the default LightGBM candidate trained on the full data (all of it: this measures speed, not quality).

Printed: the model step alone (feature transform and trees, the API's runtime, on one chunk, against LightGBM's own
Booster.predict on the same chunk and threads, with a bit-for-bit check), then for each input
rows/s end to end (Parquet to Parquet) and peak RSS, with ratios to 1x: flat memory means a ratio near 1.
"""
import argparse, json, os, shutil, statistics, subprocess, sys, tempfile, time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

COPIES = [int(c) for c in os.environ.get('BENCH_COPIES', '1,4,16').split(',')]
RUNS = int(os.environ.get('BENCH_RUNS', '5'))

RUN = r'''
import json, sys
import fraud_mlops.runtime, fraud_mlops.scoring  # imports paid before the clock starts: the run measures the scoring
from fraud_mlops.scoring import score_file
engine, src, dst, store = sys.argv[1:5]
def peak_mb():
    "Peak RSS of this process (VmHWM: unlike ru_maxrss, not inherited from the parent across exec)."
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) / 1024
workers = []
if engine == 'dask':
    from fraud_mlops.cluster import close_dask, dask_client
    client = dask_client(workers=2)
    try:
        r = score_file(src, dst, store, engine='dask', scheduler=client.scheduler.address, progress=False)
        workers = list(client.run(peak_mb).values())
    finally: close_dask(client)
else:
    r = score_file(src, dst, store, progress=False)
print(json.dumps({**r, 'client_mb': peak_mb(), 'worker_mb': workers}))
'''


PLAIN = r'''
import sys, joblib, pandas as pd
src, dst, model, threshold = sys.argv[1:5]
X = pd.read_parquet(src)
p = joblib.load(model).predict_proba(X.drop(columns='id').to_numpy())[:, 1]
pd.DataFrame({'id': X['id'], 'fraud_probability': p, 'prediction': pd.Categorical.from_codes((p >= float(threshold)).astype('int8'), ['legit', 'fraud'])}).to_parquet(dst)
'''


def model_store(tmp, data, kind='lgbm'):
    "A store whose champion is pipeline `kind` (the default LightGBM model) fitted on `data`."
    from fraud_mlops.data import load_transactions
    from fraud_mlops.modelling import features_and_labels, fit_model, make_model
    from fraud_mlops.registry import read_champion, save_version, set_champion
    from fraud_mlops.store import open_store
    X, y = features_and_labels(load_transactions(data))
    store = open_store(tmp/'registry', create=True)
    v = save_version(store, fit_model(make_model(kind), X, y, 0.25), {'threshold': 0.5}, X[:100], y[:100])['version']
    set_champion(store, v, read_champion(store)[1])   # a kept BENCH_DIR may have a champion already
    return store.uri, X


def replicate(data, copies, path):
    "Write `copies` copies of the real rows (no label) as one Parquet file, a row group per copy, with an id column."
    import pyarrow.csv as pcsv
    table = pcsv.read_csv(data).drop_columns(['Class'])
    n = table.num_rows
    with_id = lambda k: table.add_column(0, 'id', pa.array(np.arange(n) + k * n))
    with pq.ParquetWriter(path, with_id(0).schema) as w:
        for k in range(copies): w.write_table(with_id(k))
    return n * copies


def startup(base, data, store):
    "Median rows/s of `fraud-mlops score` of the full data, a fresh process a run, and of the plain script, alternating; printed."
    from fraud_mlops.registry import load_champion
    from fraud_mlops.store import open_store
    src, rows = base/'x1.parquet', replicate(data, 1, base/'x1.parquet')
    model, manifest = load_champion(open_store(store))
    plain_model = base/'model.joblib'
    import joblib; joblib.dump(model, plain_model)
    command = [Path(sys.executable).parent/'fraud-mlops', 'score', src, base/'out.parquet', '--store', store]
    plain = [sys.executable, '-c', PLAIN, src, base/'plain.parquet', plain_model, str(manifest['threshold'])]
    env = {**os.environ, 'FRAUD_MLOPS_CACHE_DIR': str(base/'runtime-cache')}   # its own runtime cache, empty at first
    shutil.rmtree(base/'runtime-cache', ignore_errors=True)
    subprocess.run(command, check=True, capture_output=True, env={**env, 'FRAUD_MLOPS_CACHE_DIR': 'off'})  # numba's cache filled, files in the page cache
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env=env)   # the first run of the version: builds its runtime cache entry
    cold = time.perf_counter() - start
    times = {'fraud-mlops score': [], 'plain script': []}
    for _ in range(RUNS):
        for name, cmd in (('fraud-mlops score', command), ('plain script', plain)):
            start = time.perf_counter()
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode: sys.exit(f'{name} failed:\n{out.stderr[-3000:]}')
            times[name].append(time.perf_counter() - start)
    fast = rows / statistics.median(times['fraud-mlops score'])
    ref = rows / statistics.median(times['plain script'])
    for name, t in times.items(): print(f"  {name:18} {', '.join(f'{x:.2f}' for x in t)} s")
    print(f"`fraud-mlops score` of {rows:,} rows (Parquet to Parquet, process start to exit, runtime cache warm, median of {RUNS}): "
          f"{fast:,.0f} rows/s (target >= 150,000); the plain script in the same run {ref:,.0f} rows/s: {fast / ref:.2f}x")
    print(f"  first run of the version (runtime cache empty: unpickles, prepares, writes the entry): {cold:.2f} s, {rows / cold:,.0f} rows/s")
    src.unlink()


def main():
    from fraud_mlops.config import settings
    from fraud_mlops.data import FULL_DATA, fetch_dataset, resolve_path
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--startup', action='store_true', help='only `fraud-mlops score` end to end against the plain script')
    p.add_argument('--model', default='lgbm', help="model kind of the champion (default lgbm; the training job's default is lgbm_rf)")
    args = p.parse_args()
    data = fetch_dataset(resolve_path('.')/FULL_DATA, progress=False)
    base = Path(os.environ.get('BENCH_DIR') or tempfile.mkdtemp(prefix='fraud-mlops-bench-'))
    base.mkdir(parents=True, exist_ok=True)
    print(f"machine: {os.cpu_count()} cores; load before: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    store, X = model_store(base, data, args.model)
    startup(base, data, store)
    if args.startup:
        if not os.environ.get('BENCH_DIR'):
            shutil.rmtree(base)
        return

    from fraud_mlops.scoring import scoring_model
    served = scoring_model(store, cache=False)   # the fitted model itself: its booster is the reference below
    chunk_rows = settings().chunk_rows
    chunk = X[np.arange(chunk_rows) % len(X)]
    got = served.predict(chunk)
    best = min(_timed(served.predict, chunk) for _ in range(5))
    if served.runtime == 'lightgbm-quickscorer':
        features, booster = served.model.steps[0][1], served.model.steps[1][1].booster_
        lightgbm = lambda rows: booster.predict(features.transform(rows), num_threads=served.predict.threads)  # LightGBM's own runtime, same threads
        same = got.tobytes() == lightgbm(chunk).tobytes()
        ref = min(_timed(lightgbm, chunk) for _ in range(5))
        print(f"model step ({served.runtime}, features + trees, {chunk_rows:,}-row chunk, best of 5): "
              f"{chunk_rows / best:,.0f} rows/s (target >= 1,000,000); LightGBM's Booster.predict in the same run "
              f"{chunk_rows / ref:,.0f} rows/s: {ref / best:.2f}x; probabilities {'bit-identical' if same else 'DIFFER'}")
    else: print(f"model step ({served.runtime}, {chunk_rows:,}-row chunk, best of 5): {chunk_rows / best:,.0f} rows/s")

    rows, results = {}, []
    for copies in COPIES:
        src = base/f'x{copies}.parquet'
        rows[copies] = replicate(data, copies, src)
        for engine in ('local', 'dask'):
            start = time.perf_counter()
            out = subprocess.run([sys.executable, '-c', RUN, engine, src, base/'out.parquet', store], capture_output=True, text=True)
            if out.returncode: sys.exit(f'{engine} x{copies} failed:\n{out.stderr[-3000:]}')
            r = json.loads(out.stdout.strip().splitlines()[-1])
            assert r['rows'] == rows[copies] and r['bad_rows'] == 0
            results.append({'copies': copies, 'engine': engine, 'rows': r['rows'], 'seconds': r['seconds'],
                            'process_seconds': time.perf_counter() - start, 'client_mb': r['client_mb'],
                            'worker_mb': max(r['worker_mb'] or [0])})
            (base/'out.parquet').unlink()
        src.unlink()

    print(f"\nload after: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    print(f"\n| input | rows | engine | scoring s | rows/s (Parquet to Parquet) | peak RSS, scoring process | peak RSS, largest worker | RSS vs 1x |")
    print('| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |')
    first = {}
    for r in results:
        mem = max(r['client_mb'], r['worker_mb'])
        first.setdefault(r['engine'], mem)
        print(f"| {r['copies']}x | {r['rows']:,} | {'in-process' if r['engine'] == 'local' else '2-worker LocalCluster'} | "
              f"{r['seconds']:.1f} | {r['rows'] / r['seconds']:,.0f} | {r['client_mb']:,.0f} MB | "
              f"{(str(round(r['worker_mb'])) + ' MB') if r['worker_mb'] else '-'} | {mem / first[r['engine']]:.2f} |")
    local = [r for r in results if r['engine'] == 'local']
    print(f"\nin-process end to end: {min(r['rows'] / r['seconds'] for r in local):,.0f} rows/s at worst (target >= 300,000); "
          f"peak RSS {min(r['client_mb'] for r in local):,.0f} to {max(r['client_mb'] for r in local):,.0f} MB over "
          f"{local[0]['rows']:,} to {local[-1]['rows']:,} rows")
    if not os.environ.get('BENCH_DIR'):
        shutil.rmtree(base)


def _timed(f, *args):
    start = time.perf_counter(); f(*args); return time.perf_counter() - start


if __name__ == '__main__':
    main()
