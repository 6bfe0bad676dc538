"What the bench scripts share: a free loopback port, and a uvicorn server started, awaited and stopped."
import os, socket, subprocess, sys, time
from pathlib import Path

import httpx


def free_port():
    "A loopback TCP port nothing listens on."
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def start_uvicorn(app, env, log_path, *args, ready, seconds=120):
    "`uvicorn APP ARGS` on a free 127.0.0.1 port, `env` on top of ours, output to `log_path`; (process, url) once `ready(url)`."
    port = free_port()
    cmd = [sys.executable, '-m', 'uvicorn', app, '--host', '127.0.0.1', '--port', str(port), *map(str, args)]
    with open(log_path, 'wb') as log:
        proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    url, deadline = f'http://127.0.0.1:{port}', time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None: raise SystemExit(f'{app} exited:\n' + Path(log_path).read_text(errors='replace')[-3000:])
        try:
            if ready(url): return proc, url
        except httpx.TransportError: pass
        time.sleep(0.2)
    stop(proc); raise SystemExit(f'{app} not answering within {seconds} s')


def stop(proc):
    "Terminate `proc`, killing it after 15 s."
    proc.terminate()
    try: proc.wait(15)
    except subprocess.TimeoutExpired: proc.kill(); proc.wait()


def rss_mb(pid, field='VmRSS'):
    "`field` of /proc/PID/status (VmRSS now, VmHWM the peak since the start or `reset_peak`) in MB; None off Linux."
    try: lines = Path(f'/proc/{pid}/status').read_text().splitlines()
    except OSError: return None
    for line in lines:
        if line.startswith(field + ':'): return int(line.split()[1]) / 1024


def reset_peak(pid):
    "Make VmHWM of process `pid` start again from its current RSS (Linux: `5` into /proc/PID/clear_refs); False if it cannot."
    try: Path(f'/proc/{pid}/clear_refs').write_text('5'); return True
    except OSError: return False
