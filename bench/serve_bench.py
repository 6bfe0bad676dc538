"""`make bench`: the API under load on loopback, against the seed's way of serving and a no-model ceiling.

Trains and promotes the training job's default model (`--model` for another) on the CI subset into a temporary store (or serves the
champion of `--store` / `$FRAUD_MLOPS_STORE` when that store has one), trains the seed's reference
(StandardScaler + RandomForest(100), n_jobs=-1 as the seed had it), then starts each server in turn with
uvicorn on 127.0.0.1 and drives it with wrk (`apt-get install -y wrk`; without it, a bounded async httpx
client, much slower, so its figures are the client's ceiling more than the server's). Prints req/s, p50
and p99 at 1 and 8 connections for `POST /predict`, rows/s for `POST /predict/batch` with 10,000 rows a
request, and the ratios. All traffic goes to 127.0.0.1, each run is bounded in time. fraud-mlops runs as
shipped (metrics and its JSON access log on, which replaces uvicorn's); the no-model ceiling runs without
any access log, the seed's reference with uvicorn's default one, as the seed shipped it.
"""
import argparse, asyncio, json, os, re, shutil, subprocess, sys, tempfile, time
from pathlib import Path

import httpx
import joblib
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from fraud_mlops.data import CI_SUBSET, FEATURES, TARGET, load_transactions, resolve_path  # noqa: E402
from fraud_mlops.registry import read_champion, save_version, set_champion
from fraud_mlops.store import StoreError, open_store  # noqa: E402
from common import start_uvicorn, stop  # noqa: E402  (bench/common.py, beside this script)


def load_avg():
    return ' '.join(f'{x:.2f}' for x in os.getloadavg())


def champion_store(uri, X, y, tmp, model=None):
    "A store URI with a champion: `uri`'s if it has one, else a temp store with a freshly trained default model."
    if uri:
        try:
            pointer, _ = read_champion(open_store(uri))
            if pointer: return uri, f"champion {pointer['version']} of {uri}"
        except StoreError: pass
    from fraud_mlops.train import build_manifest, train_candidate
    df = load_transactions(resolve_path(CI_SUBSET))
    r = train_candidate(df, **({'model': model} if model else {}), n_boot=0, n_jobs=1, folds=2, compare_rules=False)
    store = open_store(f'{tmp}/store', create=True)
    m = save_version(store, r.model, build_manifest(r, CI_SUBSET, 'ci', len(df), int(df[TARGET].sum()), {}), r.evidence['X'], r.evidence['y'], r.evidence['p'])
    set_champion(store, m['version'], None)
    return store.uri, f"{r.kind} trained on the CI subset ({len(df)} rows), version {m['version']}"


def start(app, env, workers, log_path, app_dir=None, quiet=False):
    "Start uvicorn serving `app`, ready once /predict answers the example; `quiet`: without uvicorn's own access log."
    args = ['--workers', workers, *(['--app-dir', app_dir] if app_dir else []), *(['--no-access-log'] if quiet else [])]
    body = json.dumps({'features': X_EXAMPLE}).encode()
    ready = lambda url: httpx.post(f'{url}/predict', content=body, headers={'content-type': 'application/json'}, timeout=2).status_code == 200
    return start_uvicorn(app, env, log_path, *args, ready=ready)


def wrk(url, body_file, connections, seconds, tmp):
    "(req/s, p50 ms, p99 ms, errors) from one wrk run."
    lua = Path(tmp) / 'post.lua'
    lua.write_text(f'local f = io.open("{body_file}", "rb")\nwrk.method = "POST"\nwrk.body = f:read("*a")\nf:close()\n'
                   'wrk.headers["Content-Type"] = "application/json"\n')
    out = subprocess.run(['wrk', '-t1', f'-c{connections}', f'-d{seconds}s', '--latency', '--timeout', '10s', '-s', str(lua), url],
                         capture_output=True, text=True, timeout=seconds + 60).stdout
    def ms(label):
        m = re.search(rf'^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$', out, re.M)
        return float(m.group(1)) * {'us': 1e-3, 'ms': 1.0, 's': 1e3}[m.group(2)] if m else float('nan')
    rps = float(re.search(r'Requests/sec:\s+([\d.]+)', out).group(1))
    errors = sum(int(n) for n in re.findall(r'Non-2xx or 3xx responses: (\d+)', out))
    errors += sum(int(n) for n in re.findall(r'(?:connect|read|write|timeout) (\d+)', out))
    return rps, ms('50'), ms('99'), errors


async def _httpx_load(url, body, connections, seconds):
    lat, errors, stop_at = [], 0, time.monotonic() + seconds
    limits = httpx.Limits(max_connections=connections)
    async with httpx.AsyncClient(limits=limits, timeout=10) as c:
        async def worker():
            nonlocal errors
            while time.monotonic() < stop_at:
                t = time.perf_counter()
                try: ok = (await c.post(url, content=body, headers={'content-type': 'application/json'})).status_code == 200
                except httpx.HTTPError: ok = False
                lat.append(time.perf_counter() - t); errors += not ok
        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.monotonic() - t0
    a = np.array(lat) * 1e3
    return len(a) / elapsed, float(np.percentile(a, 50)), float(np.percentile(a, 99)), errors


def load(url, body_file, connections, seconds, tmp):
    if shutil.which('wrk'): return wrk(url, body_file, connections, seconds, tmp)
    return asyncio.run(_httpx_load(url, Path(body_file).read_bytes(), connections, seconds))


def measure(name, url, files, args, tmp):
    row = {'server': name}
    for c in (1, 8):
        row[f'c{c}'] = load(f'{url}/predict', files['single'], c, args.seconds, tmp)
        print(f'  {name:<24} /predict        c={c}: {row[f"c{c}"][0]:9.0f} req/s  p50 {row[f"c{c}"][1]:.2f} ms  p99 {row[f"c{c}"][2]:.2f} ms'
              f'  errors {row[f"c{c}"][3]}', flush=True)
    b = load(f'{url}/predict/batch', files['batch'], 1, args.seconds, tmp)
    row['batch'] = (b[0] * args.batch_rows, b[1], b[2], b[3])
    print(f'  {name:<24} /predict/batch c=1: {row["batch"][0]:9.0f} rows/s  ({b[0]:.2f} req/s, p50 {b[1]:.0f} ms)  errors {b[3]}', flush=True)
    return row


def main():
    global X_EXAMPLE
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--store', default=os.environ.get('FRAUD_MLOPS_STORE'), help='serve this store\'s champion if it has one')
    p.add_argument('--seconds', type=int, default=8, help='length of each load run (default 8)')
    p.add_argument('--workers', type=int, default=1, help='uvicorn workers for every server (default 1)')
    p.add_argument('--batch-rows', type=int, default=10_000)
    p.add_argument('--model', help="model kind to train when no champion is given (default: the training job's default)")
    args = p.parse_args()
    if not shutil.which('wrk'):
        print('wrk not found: install it with `apt-get update && apt-get install -y wrk` (Debian/Ubuntu) for real figures;\n'
              'falling back to a bounded async httpx client, whose own cost dominates at these speeds.')
    df = load_transactions(resolve_path(CI_SUBSET))
    X, y = df[FEATURES].to_numpy(), df[TARGET].to_numpy()
    X_EXAMPLE = X[0].tolist()
    tmp = tempfile.mkdtemp(prefix='fraud-bench-')
    try:
        print(f'machine: {os.cpu_count()} cores, load average (1, 5, 15 min) at start: {load_avg()}', flush=True)
        store, what = champion_store(args.store, X, y, tmp, args.model)
        print(f'model: {what}')
        from fraud_mlops.modelling import make_model
        ref = make_model('seed_rf', n_jobs=-1, n_estimators=100).fit(X, y)
        joblib.dump(ref, f'{tmp}/reference.joblib')
        files = {'single': f'{tmp}/single.json', 'batch': f'{tmp}/batch.json'}
        Path(files['single']).write_text(json.dumps({'features': X_EXAMPLE}))
        rows = X[np.arange(args.batch_rows) % len(X)].tolist()
        Path(files['batch']).write_text(json.dumps({'instances': rows}))
        print(f'load: wrk 1 thread, {args.seconds} s a run, on 127.0.0.1; every server on uvicorn with {args.workers} worker(s)', flush=True)
        servers = [('fraud-mlops', 'fraud_mlops.serving:app', {'FRAUD_MLOPS_STORE': store, 'FRAUD_MLOPS_POLL_SECONDS': '10'}, None),
                   ('seed reference', 'seed_reference:app', {'BENCH_REFERENCE_MODEL': f'{tmp}/reference.joblib'}, ROOT / 'bench'),
                   ('no-model constant', 'constant_app:app', {}, ROOT / 'bench')]
        results = {}
        for name, app, env, app_dir in servers:  # the ceiling logs nothing; ours replaces uvicorn's log line with its own
            proc, url = start(app, env, args.workers, f'{tmp}/{name.replace(" ", "_")}.log', app_dir,
                              quiet=name == 'no-model constant')
            try: results[name] = measure(name, url, files, args, tmp)
            finally: stop(proc)
        proc, url = start('fraud_mlops.serving:app', {'FRAUD_MLOPS_STORE': store, 'FRAUD_MLOPS_ACCESS_LOG': '0'}, args.workers,
                          f'{tmp}/nolog.log', quiet=True)  # no access log at all
        try: nolog = load(f'{url}/predict', files['single'], 8, args.seconds, tmp)
        finally: stop(proc)
        ours, refr, const = results['fraud-mlops'], results['seed reference'], results['no-model constant']
        print(f'\nload average at end: {load_avg()}')
        print(f'\n| server | /predict c=1 req/s | p50 ms | p99 ms | /predict c=8 req/s | p50 ms | p99 ms | batch rows/s (10k rows/request) |')
        print('| --- | --- | --- | --- | --- | --- | --- | --- |')
        for name, r in results.items():
            print(f"| {name} | {r['c1'][0]:.0f} | {r['c1'][1]:.2f} | {r['c1'][2]:.2f} | {r['c8'][0]:.0f} | {r['c8'][1]:.2f} | {r['c8'][2]:.2f} | {r['batch'][0]:.0f} |")
        print(f'\nfraud-mlops / seed reference: {ours["c8"][0] / refr["c8"][0]:.1f}x req/s at 8 connections, '
              f'{ours["c1"][0] / refr["c1"][0]:.1f}x at 1, {ours["batch"][0] / refr["batch"][0]:.1f}x batch rows/s')
        print(f'fraud-mlops / no-model constant: {ours["c8"][0] / const["c8"][0]:.0%} of its req/s at 8 connections, '
              f'{ours["c1"][0] / const["c1"][0]:.0%} at 1, {ours["batch"][0] / const["batch"][0]:.0%} of its batch rows/s')
        print(f'access log cost: {nolog[0]:.0f} req/s at 8 connections with no access log (FRAUD_MLOPS_ACCESS_LOG=0, uvicorn --no-access-log) vs {ours["c8"][0]:.0f} with it on '
              f'(p99 {nolog[2]:.2f} vs {ours["c8"][2]:.2f} ms)')
        errors = sum(r[k][3] for r in results.values() for k in ('c1', 'c8', 'batch')) + nolog[3]
        print(f'failed requests in all runs: {errors}')
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
    main()
