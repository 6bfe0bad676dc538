"""`make bench-scale`: file scoring at 1x, 4x and 16x the full dataset, in this process and on a 2-worker LocalCluster.

The inputs are the 284,807 real rows replicated (1, 4 and 16 copies, an `id` column numbering the rows), written as
Parquet under a temporary folder (`BENCH_DIR` to choose another, kept) and deleted afterwards; `BENCH_COPIES=1,4,16`
chooses the sizes. Each run is a fresh process,
so its peak RSS is its own; on the cluster the workers' peak RSS is read from each worker before it stops. The model
is the default LightGBM candidate trained on the full data (all of it: this measures speed, not quality).

Printed: the model step alone (feature transform and trees, the API's runtime, on one chunk, against LightGBM's own
Booster.predict on the same chunk and threads, with a bit-for-bit check), then for each input
rows/s end to end (Parquet to Parquet) and peak RSS, with ratios to 1x: flat memory means a ratio near 1.
"""
import json, os, subprocess, sys, tempfile, time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

COPIES = [int(c) for c in os.environ.get('BENCH_COPIES', '1,4,16').split(',')]
CHUNK = int(os.environ.get('FRAUD_MLOPS_CHUNK_ROWS') or 250_000)

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
    from distributed import Client, LocalCluster
    with LocalCluster(n_workers=2, threads_per_worker=1, host='127.0.0.1', dashboard_address='127.0.0.1:0', processes=True) as c, Client(c) as client:
        r = score_file(src, dst, store, engine='dask', scheduler=c.scheduler_address, progress=False)
        workers = list(client.run(peak_mb).values())
else:
    r = score_file(src, dst, store, progress=False)
print(json.dumps({**r, 'client_mb': peak_mb(), 'worker_mb': workers}))
'''


def model_store(tmp, data):
    "A store whose champion is the default LightGBM pipeline fitted on `data`."
    from fraud_mlops.data import load_transactions
    from fraud_mlops.modelling import features_and_labels, fit_model, make_model
    from fraud_mlops.registry import open_store, save_version, set_champion
    X, y = features_and_labels(load_transactions(data))
    store = open_store(tmp/'registry', create=True)
    v = save_version(store, fit_model(make_model('lgbm'), X, y, 0.25), {'threshold': 0.5}, X[:100], y[:100])['version']
    set_champion(store, v, None)
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


def main():
    from fraud_mlops.data import FULL_DATA, fetch_dataset, resolve_path
    data = fetch_dataset(resolve_path('.')/FULL_DATA, progress=False)
    base = Path(os.environ.get('BENCH_DIR') or tempfile.mkdtemp(prefix='fraud-mlops-bench-'))
    base.mkdir(parents=True, exist_ok=True)
    print(f"machine: {os.cpu_count()} cores; load before: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    store, X = model_store(base, data)

    from fraud_mlops.scoring import scoring_model
    served = scoring_model(store)
    chunk = X[np.arange(CHUNK) % len(X)]
    got = served.predict(chunk)
    best = min(_timed(served.predict, chunk) for _ in range(5))
    features, booster = served.model.steps[0][1], served.model.steps[1][1].booster_
    lightgbm = lambda rows: booster.predict(features.transform(rows), num_threads=2)  # LightGBM's own runtime, same threads
    same = got.tobytes() == lightgbm(chunk).tobytes()
    ref = min(_timed(lightgbm, chunk) for _ in range(5))
    print(f"model step ({served.runtime}, features + trees, {CHUNK:,}-row chunk, best of 5): "
          f"{CHUNK / best:,.0f} rows/s (target >= 1,000,000); LightGBM's Booster.predict in the same run "
          f"{CHUNK / ref:,.0f} rows/s: {ref / best:.2f}x; probabilities {'bit-identical' if same else 'DIFFER'}")

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
        import shutil; shutil.rmtree(base)


def _timed(f, *args):
    start = time.perf_counter(); f(*args); return time.perf_counter() - start


if __name__ == '__main__':
    main()
