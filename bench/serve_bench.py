"""`make bench`: the API under load on loopback, against the seed's way of serving and a no-model ceiling.

Trains and promotes the training job's default model (`--model` for another) on the CI subset into a temporary store (or serves the
champion of `--store` / `$FRAUD_MLOPS_STORE` when that store has one), trains the seed's reference
(StandardScaler + RandomForest(100), n_jobs=-1 as the seed had it), then starts each server in turn with
uvicorn on 127.0.0.1 and drives it with wrk (`apt-get install -y wrk`; without it, a bounded async httpx
client, much slower, so its figures are the client's ceiling more than the server's). Prints req/s, p50
and p99 at 1 and 8 connections for `POST /predict`, rows/s for `POST /predict/batch` with 10,000 rows a
request, and the ratios; then one worker's peak RSS (VmHWM, reset before each case) for the largest batch the
settings allow, and for hostile bodies (64 MiB of `[],`, declared or chunked; `[],` up to the body limit), with the
slowest `/health/live` meanwhile, and what unfinished bodies hold and when they are dropped. All traffic goes to
127.0.0.1, each run is bounded in time. fraud-mlops runs as
shipped (metrics, its JSON access log on, which replaces uvicorn's, and the prediction log on); then once
with the prediction log off and once more on, for the log's cost in the same run (on, off, on: the mean of
the two runs with it on against the one off, so the machine's drift during the run does not pass for the
log's cost), and the rows the log wrote are counted back from the store. The no-model ceiling runs without
any access log, the seed's reference with uvicorn's default one, as the seed shipped it. Then a challenger in
shadow (`fraud-mlops shadow`: a second model of the same kind, scored by the log's writer on every answered row):
/predict at 8 connections and batches with it against the same server without it, run just before, and the
logged rows the shadow scored; and what `?explain=K` costs: per row in process (one row, and rows of a
1,000-row batch) and /predict?explain=3 at 8 connections. The shadow runs need the temporary store (not `--store`).
"""
import argparse, asyncio, json, os, re, shutil, socket, subprocess, sys, tempfile, threading, time
from pathlib import Path

import httpx
import joblib
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from fraud_mlops.data import CI_SUBSET, FEATURES, TARGET, load_transactions, resolve_path  # noqa: E402
from fraud_mlops.registry import read_champion, save_version, set_champion
from fraud_mlops.store import StoreError, open_store  # noqa: E402
from common import reset_peak, rss_mb, start_uvicorn, stop  # noqa: E402  (bench/common.py, beside this script)


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
    if app.startswith('fraud_mlops'): args += ['--http', 'fraud_mlops.api:GuardedHTTP', '--timeout-keep-alive', '75']  # as the image runs it
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


def post_raw(url, path, body, chunked=False, piece=1 << 20):
    "(status or None, seconds to the status line) of a POST of `body` on a raw socket, sent by a thread while the answer is awaited."
    host, port = url.split('//')[1].split(':')
    s = socket.create_connection((host, int(port)), timeout=300)
    head = f'POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n'
    head += 'Transfer-Encoding: chunked\r\n\r\n' if chunked else f'Content-Length: {len(body)}\r\n\r\n'
    def send():
        try:
            s.sendall(head.encode())
            for i in range(0, len(body), piece):
                b = body[i:i + piece]
                s.sendall(b'%x\r\n%s\r\n' % (len(b), b) if chunked else b)
            if chunked: s.sendall(b'0\r\n\r\n')
        except OSError: pass  # the server answered and closed before the end: what a limit should do
    t0 = time.perf_counter(); sender = threading.Thread(target=send, daemon=True); sender.start()
    try: first = s.recv(64)
    except OSError: first = b''
    seconds = time.perf_counter() - t0
    s.close(); sender.join(30)
    m = re.match(rb'HTTP/1.1 (\d+)', first)
    return (int(m.group(1)) if m else None), seconds


def probe(url, pid, body, chunked=False):
    "(status, seconds, peak RSS MB, RSS before MB, slowest GET /health/live ms meanwhile) of POST /predict/batch `body`."
    reset_peak(pid); before = rss_mb(pid)
    slowest, done = [0.0], threading.Event()
    def ping():
        with httpx.Client(timeout=60) as c:
            while not done.is_set():
                t = time.perf_counter(); c.get(f'{url}/health/live'); slowest[0] = max(slowest[0], time.perf_counter() - t)
                time.sleep(0.02)
    pinger = threading.Thread(target=ping, daemon=True); pinger.start(); time.sleep(0.1)
    status, seconds = post_raw(url, '/predict/batch', body, chunked)
    time.sleep(0.2); done.set(); pinger.join(60)
    return status, seconds, rss_mb(pid, 'VmHWM'), before, slowest[0] * 1e3


def stalled_bodies(url, pid, n, size, wait):
    "(RSS growth MB, answered or closed, seconds until the last was) with `n` connections sending half of a `size`-byte body, then nothing."
    host, port = url.split('//')[1].split(':')
    before, socks = rss_mb(pid), []
    for _ in range(n):
        s = socket.create_connection((host, int(port)), timeout=wait + 5)
        s.sendall(f'POST /predict/batch HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {size}\r\n\r\n'.encode())
        try: s.sendall(b'[' * (size // 2))
        except OSError: pass
        socks.append(s)
    t0 = time.monotonic(); time.sleep(1); grown = rss_mb(pid) - before
    deadline, closed, last = t0 + wait, 0, 0.0
    for s in socks:
        s.settimeout(max(0.1, deadline - time.monotonic()))
        try: s.recv(64); closed += 1; last = time.monotonic() - t0  # an answer (408 or 503) or the end of the connection
        except OSError: pass
        s.close()
    return grown, closed, last


def memory(store, tmp, X):
    "Peak RSS of one worker for the largest allowed batch and for hostile bodies, and whether /health/live kept answering."
    from fraud_mlops.config import settings
    cfg = settings()
    proc, url = start('fraud_mlops.serving:app', {'FRAUD_MLOPS_STORE': store, 'FRAUD_MLOPS_ACCESS_LOG': '0'}, 1, f'{tmp}/memory.log', quiet=True)
    try:
        idle = rss_mb(proc.pid)
        print(f'\nmemory of one worker (RSS idle {idle:.0f} MB; FRAUD_MLOPS_MAX_BATCH={cfg.max_batch}, FRAUD_MLOPS_MAX_BODY_BYTES={cfg.max_body_bytes}):', flush=True)
        rows = X[np.arange(cfg.max_batch) % len(X)].tolist()
        largest = json.dumps({'instances': rows}).encode()
        with_ids = json.dumps({'instances': rows, 'ids': [f'tx-{i}' for i in range(len(rows))]}).encode()  # the orjson path
        slow = json.dumps({'instances': rows, 'note': True}).encode()  # a `true`: Python's json and pydantic
        del rows
        hostile = b'{"instances":[' + b'[],' * ((64 << 20) // 3 - 6) + b'[]]}'
        at_limit = b'{"instances":[' + b'[],' * ((min(cfg.max_body_bytes, 64 << 20)) // 3 - 6) + b'[]]}'
        cases = [(f'largest allowed batch ({cfg.max_batch} rows, {len(largest) / 2**20:.1f} MiB)', largest, False),
                 ('the same with ids (orjson path)', with_ids, False),
                 ('the same with a `true` (json + pydantic path)', slow, False),
                 ('hostile 64 MiB of [], (Content-Length)', hostile, False),
                 ('hostile 64 MiB of [], (chunked)', hostile, True),
                 (f'hostile [], up to the body limit ({len(at_limit) / 2**20:.1f} MiB)', at_limit, False)]
        for name, body, chunked in cases:
            status, secs, peak, before, live = probe(url, proc.pid, body, chunked)
            print(f'  {name:<52} {status}  in {secs:6.2f} s  peak RSS {peak:6.0f} MB (+{peak - before:.0f})  slowest /health/live {live:.0f} ms', flush=True)
        for size in (1 << 20, cfg.max_body_bytes):
            grown, closed, last = stalled_bodies(url, proc.pid, 10, size, cfg.body_timeout + 15)
            print(f'  10 unfinished bodies (half of {size / 2**20:.0f} MiB each){"":<18} +{grown:.0f} MB RSS; {closed}/10 answered and closed, '
                  f'the last after {last:.1f} s (FRAUD_MLOPS_BODY_TIMEOUT={cfg.body_timeout:g})', flush=True)
    finally: stop(proc)


def logged_rows(store):
    "{rows, files} of the prediction log in local store `store`."
    from fraud_mlops.predlog import log_files, read_log
    st = open_store(store)
    return {'rows': sum(t.num_rows for t in read_log(st, columns=['time'])), 'files': len(log_files(st))}


def shadow_rows(store):
    "Logged rows of local store `store` that a shadow scored."
    from fraud_mlops.predlog import read_log
    return sum(t.num_rows - t['shadow_probability'].null_count for t in read_log(open_store(store), columns=['shadow_probability']))


def shadow_and_explain(store, tmp, files, args, X, without):
    "Print /predict c=8 and batch rows/s with a shadow against `without` (the same server without one, just measured), and what ?explain costs."
    from fraud_mlops.reasons import explainer
    from fraud_mlops.registry import load_champion, set_shadow
    from fraud_mlops.train import build_manifest, train_candidate
    df = load_transactions(resolve_path(CI_SUBSET))
    st = open_store(store)
    model, manifest = load_champion(st)
    r = train_candidate(df, model=manifest.get('model_kind') or 'lgbm_rf', n_boot=0, n_jobs=1, folds=2, compare_rules=False, random_state=7)
    m = save_version(st, r.model, build_manifest(r, CI_SUBSET, 'ci', len(df), int(df[TARGET].sum()), {}), r.evidence['X'], r.evidence['y'], r.evidence['p'])
    set_shadow(st, m['version'], 'make bench')
    before = shadow_rows(store)
    proc, url = start('fraud_mlops.serving:app', {'FRAUD_MLOPS_STORE': store}, args.workers, f'{tmp}/shadow.log', quiet=True)
    try:
        assert httpx.get(f'{url}/').json()['shadow_version'] == m['version'], 'the shadow did not load'
        shadow = {'c8': load(f'{url}/predict', files['single'], 8, args.seconds, tmp),
                  'batch': load(f'{url}/predict/batch', files['batch'], 1, args.seconds, tmp)}
        explained = load(f'{url}/predict?explain=3', files['single'], 8, args.seconds, tmp)
    finally: stop(proc)
    scored = shadow_rows(store) - before
    b_with, b_without = shadow['batch'][0] * args.batch_rows, without['batch'][0] * args.batch_rows
    print(f"shadow cost: {shadow['c8'][0]:.0f} req/s at 8 connections with a shadow vs {without['c8'][0]:.0f} without, same run: "
          f"{shadow['c8'][0] / without['c8'][0]:.0%} (target >= 80%); p99 {shadow['c8'][2]:.2f} vs {without['c8'][2]:.2f} ms; "
          f"batch rows/s {b_with:.0f} vs {b_without:.0f} ({b_with / b_without:.0%}); {scored} logged rows scored by the shadow")
    exp = explainer(model, manifest)
    one = min(timeit_once(lambda: exp.reasons(X[i:i + 1], 3)) for i in range(200))
    many = min(timeit_once(lambda: exp.reasons(X[:1000], 3)) for _ in range(5)) / 1000
    print(f"explain cost ({exp.method}, in {exp.unit}): {one * 1e3:.3f} ms for one row, {many * 1e6:.1f} us a row in a 1,000-row batch (in process, best of runs); "
          f"/predict?explain=3 at 8 connections {explained[0]:.0f} req/s, p99 {explained[2]:.2f} ms (plain /predict with the shadow: {shadow['c8'][0]:.0f})")
    return shadow['c8'][3] + shadow['batch'][3] + explained[3]


def timeit_once(f):
    t = time.perf_counter(); f(); return time.perf_counter() - t


def main():
    global X_EXAMPLE
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--store', default=os.environ.get('FRAUD_MLOPS_STORE'), help='serve this store\'s champion if it has one')
    p.add_argument('--seconds', type=int, default=8, help='length of each load run (default 8)')
    p.add_argument('--workers', type=int, default=1, help='uvicorn workers for every server (default 1)')
    p.add_argument('--batch-rows', type=int, default=10_000)
    p.add_argument('--model', help="model kind to train when no champion is given (default: the training job's default)")
    p.add_argument('--memory-only', action='store_true', help='only the peak RSS of the largest batch and the hostile bodies')
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
        if args.memory_only: return memory(store, tmp, X)
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
        logged = logged_rows(store)  # what the servers above wrote to the prediction log, flushed on SIGTERM
        off_env = {'FRAUD_MLOPS_STORE': store, 'FRAUD_MLOPS_PREDICTION_LOG': '0'}
        proc, url = start('fraud_mlops.serving:app', off_env, args.workers, f'{tmp}/nopredlog.log', quiet=True)
        try: off = {'c8': load(f'{url}/predict', files['single'], 8, args.seconds, tmp),
                    'batch': load(f'{url}/predict/batch', files['batch'], 1, args.seconds, tmp)}
        finally: stop(proc)
        off['batch'] = (off['batch'][0] * args.batch_rows, *off['batch'][1:])  # rows/s, as `measure` reports batches
        proc, url = start('fraud_mlops.serving:app', {'FRAUD_MLOPS_STORE': store}, args.workers, f'{tmp}/predlog.log', quiet=True)
        try: on_again, again_batch = (load(f'{url}/predict', files['single'], 8, args.seconds, tmp),  # on, off, on: the machine's drift shows
                                      load(f'{url}/predict/batch', files['batch'], 1, args.seconds, tmp))
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
        on_c8 = (ours['c8'][0] + on_again[0]) / 2
        print(f"prediction log cost: {on_c8:.0f} req/s at 8 connections with the log on (mean of two runs: {ours['c8'][0]:.0f}, "
              f"{on_again[0]:.0f}) vs {off['c8'][0]:.0f} off (FRAUD_MLOPS_PREDICTION_LOG=0): {on_c8 / off['c8'][0]:.0%} (target >= 85%); "
              f"p99 {ours['c8'][2]:.2f} vs {off['c8'][2]:.2f} ms; batch rows/s {ours['batch'][0]:.0f} on vs {off['batch'][0]:.0f} off "
              f"({ours['batch'][0] / off['batch'][0]:.0%})")
        print(f"prediction log: {logged['rows']} rows in {logged['files']} Parquet files under {store}/predictions after the runs with it on")
        errors = sum(r[k][3] for r in results.values() for k in ('c1', 'c8', 'batch')) + nolog[3] + off['c8'][3] + off['batch'][3] + on_again[3]
        if store.startswith(tmp):  # our temporary store: a shadow may be set in it
            errors += again_batch[3] + shadow_and_explain(store, tmp, files, args, X, {'c8': on_again, 'batch': again_batch})
        else: print('shadow cost: not measured (it sets a shadow, so it needs the temporary store: run without --store)')
        print(f'failed requests in all runs: {errors}')
        memory(store, tmp, X)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
    main()
