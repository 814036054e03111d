from collections import Counter

import numpy as np
import pytest

from robustseg.data.cases import Case
from robustseg.data.splits import grouped_kfold, label_budget, subject_strata
from robustseg.errors import ConfigError


def _subjects(n):
    return [f"s{i:03d}" for i in range(n)]


def test_every_subject_in_exactly_one_fold_and_balanced():
    folds = grouped_kfold(_subjects(23), k=5, seed=1)
    assert set(folds) == set(_subjects(23))
    sizes = Counter(folds.values())
    assert set(sizes) == set(range(5))
    assert max(sizes.values()) - min(sizes.values()) <= 1


def test_deterministic_and_order_independent():
    subs = _subjects(30)
    a = grouped_kfold(subs, 5, seed=7)
    b = grouped_kfold(list(reversed(subs)) + subs[:3], 5, seed=7)  # duplicates ignored
    assert a == b
    assert grouped_kfold(subs, 5, seed=8) != a


def test_stratified_spreads_each_stratum():
    subs = _subjects(40)
    strata = {s: ("rare" if i < 5 else "common") for i, s in enumerate(subs)}
    folds = grouped_kfold(subs, 5, seed=0, strata=strata)
    rare_folds = Counter(folds[s] for s in subs if strata[s] == "rare")
    assert sorted(rare_folds.values()) == [1, 1, 1, 1, 1]
    sizes = Counter(folds.values())
    assert max(sizes.values()) - min(sizes.values()) <= 1


def test_too_few_subjects_or_folds():
    with pytest.raises(ConfigError, match="cannot make 5 subject-grouped folds from 3 subjects"):
        grouped_kfold(_subjects(3), 5)
    with pytest.raises(ConfigError, match="folds must be >= 2"):
        grouped_kfold(_subjects(3), 1)


def test_label_budget_deterministic_stratified():
    subs = _subjects(50)
    strata = {s: i % 2 for i, s in enumerate(subs)}
    chosen = label_budget(subs, 10, seed=3, strata=strata)
    assert len(chosen) == 10 and chosen <= set(subs)
    assert Counter(strata[s] for s in chosen) == {0: 5, 1: 5}
    assert label_budget(subs, 10, seed=3, strata=strata) == chosen
    assert label_budget(subs, 10, seed=4, strata=strata) != chosen
    with pytest.raises(ConfigError, match="exceeds"):
        label_budget(subs, 51)


def _case(cid, sid, dataset="a", motion=0, meta=None):
    return Case(case_id=cid, subject_id=sid, image=np.zeros((1, 2, 2), np.float32), dataset=dataset,
                motion_level=motion, meta=meta or {})


def test_subject_strata_fields():
    cases = [_case("1", "s1", "a", 0), _case("2", "s1", "a", 3), _case("3", "s2", "b", 1)]
    assert subject_strata(cases, "auto") == {"s1": "a", "s2": "b"}
    assert subject_strata(cases, "motion_level") == {"s1": 3, "s2": 1}  # worst level per subject
    assert subject_strata(cases, None) is None
    grouped = [_case("1", "s1", meta={"group": "DCM"}), _case("2", "s2", meta={"group": "NOR"})]
    assert subject_strata(grouped, "auto") == {"s1": "DCM", "s2": "NOR"}
    assert subject_strata(grouped, "group") == {"s1": "DCM", "s2": "NOR"}
    with pytest.raises(ConfigError, match="no field or meta key 'scanner'"):
        subject_strata(cases, "scanner")
