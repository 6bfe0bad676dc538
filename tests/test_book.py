"The book's shape: every notebook imports only modules of earlier notebooks, and no module outgrows a chapter."
import json, re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NBS = sorted((ROOT/'nbs').glob('*.ipynb'))
IMPORT = re.compile(r'^\s*(?:from\s+(?:fraud_mlops\.(\w+)|fraud_mlops)\s+import\s+([\w ,()]+)|import\s+fraud_mlops\.(\w+))', re.M)


def code(nb):
    return [''.join(c['source']) for c in json.loads(nb.read_text())['cells'] if c['cell_type'] == 'code']


def exported_module(nb):
    for src in code(nb):
        m = re.search(r'^#\|\s*default_exp\s+(\S+)', src, re.M)
        if m: return m.group(1)


def imported_modules(nb, known):
    "Package modules a notebook imports, including `from fraud_mlops import train` forms."
    found = set()
    for src in code(nb):
        for sub, names, plain in IMPORT.findall(src):
            if sub or plain: found.add(sub or plain)
            else: found |= {n.strip() for n in names.strip('()').split(',') if n.strip() in known}
    return found


def test_each_notebook_imports_only_earlier_chapters():
    chapter = {exported_module(nb): nb.name for nb in NBS if exported_module(nb)}
    assert len(chapter) >= 10, chapter
    late = []
    for nb in NBS:
        for mod in imported_modules(nb, chapter) - {exported_module(nb)}:
            if mod not in chapter: late.append(f'{nb.name} imports fraud_mlops.{mod}, which no notebook exports')
            elif chapter[mod] > nb.name: late.append(f'{nb.name} imports fraud_mlops.{mod} from the later {chapter[mod]}')
    assert not late, '\n'.join(late)


def test_the_order_check_catches_a_late_import(tmp_path):
    nb = tmp_path/'01_x.ipynb'
    nb.write_text(json.dumps({'cells': [{'cell_type': 'code', 'source': ['from fraud_mlops.serving import app\n',
                                                                          'from fraud_mlops import cli, nothing']}]}))
    assert imported_modules(nb, {'serving', 'cli'}) == {'serving', 'cli'}


def test_every_module_is_exported_by_one_notebook():
    exports = [exported_module(nb) for nb in NBS if exported_module(nb)]
    assert len(exports) == len(set(exports)), exports
    modules = {p.stem for p in (ROOT/'fraud_mlops').glob('*.py')} - {'__init__', '_modidx'}
    assert modules == set(exports)


@pytest.mark.parametrize('module', sorted((ROOT/'fraud_mlops').glob('*.py')), ids=lambda p: p.name)
def test_no_module_over_400_lines(module):
    if module.name == '_modidx.py': pytest.skip("nbdev's generated index, not code")
    assert len(module.read_text().splitlines()) <= 400
