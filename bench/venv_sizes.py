"""What the inference image's Python layer weighs against installing everything: builds fresh virtualenvs in a
temporary folder (pip's cache makes it quick) and sums the file sizes under each one's site-packages.

    .venv/bin/python bench/venv_sizes.py            # inference list, the package with all its requirements, .[dev]

  inference    requirements-inference.txt + the package (--no-deps): what Dockerfile-inference installs
  runtime      `pip install .`: the package with every runtime requirement (papermill, Jupyter kernel,
               matplotlib, optuna...), i.e. one fat requirements list for serving and training alike
  dev          `pip install .[dev]`: runtime plus the notebook, test and lint tools
"""
import json, subprocess, sys, tempfile, venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENVS = {'inference': [['-r', 'requirements-inference.txt'], ['--no-deps', '.']],
        'runtime': [['.']],
        'dev': [['.[dev]']]}


def site_packages(env):
    "The site-packages folder of virtualenv `env`."
    out = subprocess.run([env/'bin'/'python', '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                         capture_output=True, text=True, check=True).stdout
    return Path(out.strip())


def size_of(folder):
    "Total bytes of the files under `folder` (symlinks not followed)."
    return sum(p.lstat().st_size for p in folder.rglob('*') if p.is_file() and not p.is_symlink())


def measure(name, steps, where):
    env = where/name
    venv.create(env, with_pip=True)
    for args in steps:
        subprocess.run([env/'bin'/'python', '-m', 'pip', 'install', '--quiet', '--disable-pip-version-check', *args],
                       cwd=ROOT, check=True)
    listed = json.loads(subprocess.run([env/'bin'/'python', '-m', 'pip', 'list', '--format', 'json'],
                                       capture_output=True, text=True, check=True).stdout)
    return {'env': name, 'site_packages_mb': round(size_of(site_packages(env)) / 1e6, 1), 'distributions': len(listed)}


def main(names=None):
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(n, ENVS[n], Path(tmp)) for n in (names or ENVS)]
    for r in rows: print(f"{r['env']:10} {r['site_packages_mb']:8.1f} MB  {r['distributions']:4} distributions")
    return rows


if __name__ == '__main__': main(sys.argv[1:])
