"""`make bench-quality`: detection quality on later data, the documented default against the seed's recipe, same rows, same run.

For each time cut (`--cuts`, seconds since the first transaction), the training job's default (`train_candidate` with its
defaults, the same function and defaults `nbs/03_train.ipynb` runs) is trained on every transaction before the cut; then every
later transaction is scored by the served runtime and judged at the candidate's own threshold. The seed's recipe (scaler +
balanced random forest on a stratified random 80%, best-F1 threshold on the other 20%) is trained on the same rows.

Printed per cut and as means: AUPRC, F1, precision, recall, precision at an alert budget (`--alerts-per-day` highest scores
a day), and the F1 of the best threshold in hindsight (known only afterwards: the ceiling for any threshold rule). Last, the
time to train on all rows: the default's whole recipe (rolling evaluation, out-of-fold threshold, final fit) against the
seed's recipe, in the same run (`--no-full` skips it).
"""
import argparse, sys, time

import numpy as np

from fraud_mlops.data import FULL_DATA, fetch_dataset, load_transactions, resolve_path
from fraud_mlops.evaluation import budget_precision, choose_threshold, classification_metrics, f1_curve
from fraud_mlops.modelling import features_and_labels, fit_model, fraud_probability, make_model
from fraud_mlops.runtime import fast_predictor
from fraud_mlops.train import holdout_threshold, seed_recipe, train_candidate

KEYS = ('auprc', 'f1', 'precision', 'recall', 'budget_precision', 'hindsight_f1')


def judge(y, p, threshold, times, alerts_per_day):
    "The figures of scores `p` at `threshold` on later rows `y`."
    m = classification_metrics(y, p, threshold)
    return {**{k: m[k] for k in KEYS[:4]}, 'budget_precision': budget_precision(y, p, times, alerts_per_day)['precision'],
            'hindsight_f1': float(f1_curve(y, p)[1].max())}


def one_cut(df, cut, alerts_per_day):
    "Train both recipes on the rows before `cut`, score every later row; return their figures and fit times."
    before, later = df[df.Time < cut], df[df.Time >= cut]
    Xb, yb = features_and_labels(before)
    Xl, yl = features_and_labels(later)
    clock = time.perf_counter(); ours = train_candidate(before); ours_s = time.perf_counter() - clock
    clock = time.perf_counter(); seed, seed_t = seed_recipe(Xb, yb); seed_s = time.perf_counter() - clock
    _, predict = fast_predictor(ours.model)
    times, p = later.Time.to_numpy(), predict(Xl)
    rules = {'f1 (default)': ours.threshold, 'f1_max': choose_threshold(ours.choice['y'], ours.choice['p'], 'f1_max'),
             'holdout (previous)': holdout_threshold(lambda: make_model(ours.kind, **ours.params), Xb, yb, 0.25, 42, fit_model)}
    rule_f1 = {k: classification_metrics(yl, p, t)['f1'] for k, t in rules.items() if t is not None}
    return {'ours': {**judge(yl, p, ours.threshold, times, alerts_per_day), 'seconds': ours_s}, 'rules': rule_f1,
            'seed': {**judge(yl, fraud_probability(seed, Xl), seed_t, times, alerts_per_day), 'seconds': seed_s},
            'rows': len(later), 'frauds': int(yl.sum()), 'train_frauds': int(yb.sum())}


def row(label, r):
    return f"{label:<22}" + ''.join(f"{r[k]:>12.3f}" for k in KEYS) + f"{r['seconds']:>9.1f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--data', default=str(FULL_DATA), help='the full dataset (fetched if missing)')
    ap.add_argument('--cuts', default='45000,65000,86400,105000,125000,145000',
                    help='comma-separated time cuts in seconds (the data spans 0 to 172,792)')
    ap.add_argument('--alerts-per-day', type=float, default=100, help='review capacity for precision at budget')
    ap.add_argument('--no-full', action='store_true', help='skip timing both recipes on all rows')
    a = ap.parse_args(argv)
    path = resolve_path(a.data)
    if not path.exists(): fetch_dataset(path)
    df = load_transactions(path)
    cuts = [float(c) for c in a.cuts.split(',')]
    head = f"{'':<22}" + ''.join(f"{k.replace('budget_precision', 'prec@budget').replace('hindsight_f1', 'hindsight'):>12}" for k in KEYS) + f"{'fit s':>9}"
    print(f"{len(df):,} rows, {int(df.Class.sum())} frauds; alert budget {a.alerts_per_day:g} a day")
    print(head)
    runs = []
    for cut in cuts:
        r = one_cut(df, cut, a.alerts_per_day); runs.append(r)
        print(f"cut {cut:>9,.0f} s: {r['rows']:,} later rows, {r['frauds']} frauds ({r['train_frauds']} before)")
        print(row('  fraud-mlops default', r['ours'])); print(row("  seed's recipe", r['seed']))
        print('  F1 lost against hindsight by threshold rule: ' + ', '.join(f"{k} {r['ours']['hindsight_f1'] - f:.3f}" for k, f in r['rules'].items()))
        sys.stdout.flush()
    mean = {w: {k: float(np.mean([r[w][k] for r in runs])) for k in (*KEYS, 'seconds')} for w in ('ours', 'seed')}
    print(f"mean over {len(cuts)} cuts"); print(row('  fraud-mlops default', mean['ours'])); print(row("  seed's recipe", mean['seed']))
    for k in ('auprc', 'f1'):
        d = mean['ours'][k] - mean['seed'][k]
        print(f"target mean {k} >= seed's: {mean['ours'][k]:.3f} vs {mean['seed'][k]:.3f} ({d:+.3f}): {'met' if d >= 0 else 'MISSED'}")
    for k in runs[0]['rules']:
        print(f"mean F1 lost against hindsight, rule {k}: {np.mean([r['ours']['hindsight_f1'] - r['rules'][k] for r in runs if k in r['rules']]):.3f}")
    gap = mean['ours']['hindsight_f1'] - mean['ours']['f1']
    print(f"moonshot F1 within 0.02 of hindsight: {gap:.3f} below: {'met' if gap <= 0.02 else 'missed'}; "
          f"AUPRC >= 0.85: {'met' if mean['ours']['auprc'] >= 0.85 else 'missed'} ({mean['ours']['auprc']:.3f})")
    if not a.no_full:
        X, y = features_and_labels(df)
        clock = time.perf_counter(); train_candidate(df); ours = time.perf_counter() - clock
        clock = time.perf_counter(); seed_recipe(X, y); seed = time.perf_counter() - clock
        print(f"training on all {len(df):,} rows: default {ours:.1f} s, seed's recipe {seed:.1f} s: {ours / seed:.2f}x the seed's "
              f"(target <= 2x): {'met' if ours <= 2 * seed else 'MISSED'}")


if __name__ == '__main__':
    main()
