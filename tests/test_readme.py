"README.md stays short and true: its length, its configuration table, its chapter map and the make targets it names."
import re
from pathlib import Path

from fraud_mlops.config import config_table

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT/'README.md').read_text()
MAX_LINES = 150


def section(title):
    "The text of the README's `## title` section, up to the next `## ` heading."
    m = re.search(rf'^## {re.escape(title)}\n(.*?)(?=^## |\Z)', README, re.M | re.S)
    assert m, f'README.md has no "## {title}" section'
    return m.group(1)


def code_spans(text):
    "Inline code spans and the lines of fenced code blocks, comments dropped: where commands are written."
    blocks = re.findall(r'^```[^\n]*\n(.*?)^```', text, re.M | re.S)
    inline = re.findall(r'`([^`\n]+)`', re.sub(r'^```[^\n]*\n.*?^```', '', text, flags=re.M | re.S))
    return [line.split(' #')[0] for b in blocks for line in b.splitlines()] + inline


def test_readme_is_short():
    n = len(README.splitlines())
    assert n <= MAX_LINES, f'README.md has {n} lines; keep it to {MAX_LINES}: the rest belongs in the notebooks'


def test_configuration_section_is_config_table():
    body = section('Configuration')
    m = re.search(r'^<!-- config:start -->\n(.*?)\n<!-- config:end -->$', body, re.M | re.S)
    assert m, 'the Configuration section needs the lines <!-- config:start --> and <!-- config:end -->'
    assert m.group(1) == config_table(), 'README.md is out of step with fraud_mlops.config: paste config_table() between the markers'


def test_chapter_map_is_the_notebooks():
    "One row a notebook, in a table; every notebook named in the section exists, every notebook in nbs/ has its row."
    body = section('The book')
    rows = [m.group(1) for line in body.splitlines() if line.startswith('|') and (m := re.search(r'nbs/([\w.-]+\.ipynb)', line))]
    present = {p.name for p in (ROOT/'nbs').glob('*.ipynb')}
    assert len(rows) == len(set(rows)), 'a notebook has two rows in the chapter map'
    assert sorted(set(re.findall(r'nbs/([\w.-]+\.ipynb)', body)) - present) == [], 'the chapter map names notebooks that do not exist'
    assert sorted(present - set(rows)) == [], 'notebooks missing from the chapter map in README.md'


def test_make_targets_named_exist():
    makefile = (ROOT/'Makefile').read_text()
    targets = set(re.findall(r'^([a-z][\w-]*)\s*:(?!=)', makefile, re.M))
    named = set()
    for span in code_spans(README):
        for m in re.finditer(r'(?:^|[\s;&|(])make((?:\s+[^\s;&|)]+)*)', span):
            for word in m.group(1).split():
                if '=' in word or word.startswith('-'): continue   # VAR=value, -C dir
                if not re.fullmatch(r'[a-z][\w-]*', word): break
                named.add(word)
    assert {'run', 'test'} <= named, f'README.md should name make run and make test; found {sorted(named)}'
    assert sorted(named - targets) == [], f'README.md names make targets the Makefile does not have (it has {sorted(targets)})'
