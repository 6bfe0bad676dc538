"The package is generated from the notebooks: exporting again must change nothing."
import filecmp, shutil, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_nbdev_export_reproduces_the_package(tmp_path):
    for name in ('settings.ini', 'setup.py', 'README.md'): shutil.copy(ROOT/name, tmp_path/name)
    shutil.copytree(ROOT/'nbs', tmp_path/'nbs')
    subprocess.run([Path(sys.executable).parent/'nbdev_export'], cwd=tmp_path, check=True, capture_output=True)
    ours = sorted(p.name for p in (ROOT/'fraud_mlops').glob('*.py'))
    fresh = sorted(p.name for p in (tmp_path/'fraud_mlops').glob('*.py'))
    assert ours == fresh
    _, mismatch, errors = filecmp.cmpfiles(ROOT/'fraud_mlops', tmp_path/'fraud_mlops', ours, shallow=False)
    assert mismatch == [] and errors == [], f'out of step with nbs/: {mismatch + errors}; run nbdev_export'


def test_notebooks_keep_the_papermill_parameters_tag():
    import json
    nb = json.loads((ROOT/'nbs'/'03_train.ipynb').read_text())
    tagged = [c for c in nb['cells'] if 'parameters' in c['metadata'].get('tags', [])]
    assert len(tagged) == 1 and 'data_path' in ''.join(tagged[0]['source'])
