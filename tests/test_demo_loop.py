"""`make demo-loop` (bench/demo_loop.py) as a user runs it, on the committed CI subset (`--quick`): the whole loop, checked by
the demo itself (exit 0 only if every expectation holds), and its refusals of bad arguments before any work."""
import subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT/'bench'/'demo_loop.py'


def demo(*args):
    "`python bench/demo_loop.py ARGS` from the project folder; the finished process."
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=900)


@pytest.mark.slow   # a training job, a server and two replays: about a minute on 2 cores
def test_the_quick_demo_closes_the_loop_and_checks_it(tmp_path):
    r = demo('--quick', '--folder', tmp_path/'demo')
    assert r.returncode == 0, r.stdout[-8000:] + r.stderr[-3000:]
    out = r.stdout
    assert 'FAIL' not in out and 'all expectations met' in out
    for expected in ('ok    the day-1 model is promoted',
                     'ok    day 2: all 4,935 rows answered 200', 'ok    day 2: the prediction log holds its 4,935 rows in its window',
                     'ok    0 of 4,935 logged rows labelled (coverage 0.000)', 'ok    no labels, no realised recall (null, not 0)',
                     'ok    494 of 4,935 logged rows labelled (coverage 0.100)', 'ok    2,468 of 4,935 logged rows labelled (coverage 0.500)',
                     'ok    4,935 of 4,935 logged rows labelled (coverage 1.000)',
                     'ok    export-training-data: day 1 then the 4,935 labelled day-2 rows, every fraud kept',
                     'ok    V14 is not flagged on the unshifted replay', 'ok    V14 is flagged on the shifted replay, the most drifted input',
                     'ok    fraud-mlops monitor --fail-on "psi>0.2" exits 3 on the shifted window, naming V14',
                     'ok    the shadow scored every replayed row in the log (4,935)', 'ok    an alert carries its three strongest reasons',
                     'ok    monitor shows the champion against the shadow on the same labelled transactions',
                     'ok    promote --evidence live decides:'):
        assert expected in out, expected
    assert out.count('precision') >= 5 and 'drifting (PSI > 0.2): V14' in out   # the monitor tables are printed
    kept = tmp_path/'demo'
    assert (kept/'registry'/'champion.json').exists() and len(list((kept/'registry'/'labels').iterdir())) == 3


@pytest.mark.parametrize('args, message', [
    (['--shift', 'V99=1'], "--shift 'V99=1': V99 is not a feature"),
    (['--shift', 'V14'], "--shift 'V14': write FEATURE=NUMBER"),
    (['--data', 'no/such.csv'], 'no/such.csv: no such file'),
])
def test_bad_arguments_are_refused_before_any_work(args, message, tmp_path):
    r = demo('--quick', '--folder', tmp_path/'demo', *args)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not (tmp_path/'demo').exists()


def test_data_without_a_second_day_is_refused(tmp_path, ci_df):
    one_day = tmp_path/'day1.csv'
    ci_df[ci_df.Time < 86_400].to_csv(one_day, index=False)
    r = demo('--data', one_day, '--folder', tmp_path/'demo')
    assert r.returncode == 2 and 'the demo needs rows of day 1 and of day 2' in r.stderr, r.stderr
