"""The report's one-line verdict on a run's validation change (the demo's headline)."""

from spa_rl.recipes.report import validation_change


def row(step, counts):
    episodes = sum(n for n, _ in counts)
    return {"step": step, "val/pass@1": sum(c / n for n, c in counts) / len(counts), "val/episodes": episodes,
            "val/level_counts": counts}


def test_a_rise_on_most_levels_is_significant():
    before = [[4, 0]] * 8 + [[4, 2]] * 8
    after = [[4, 1]] * 8 + [[4, 3]] * 6 + [[4, 2]] * 2  # 14 of 16 levels up by one success in four
    line = validation_change(row(0, before), row(12, after))
    assert "0.250 ± 0.065 at step 0 -> 0.469 ± 0.060 at step 12" in line
    assert "+0.219 ± 0.021" in line and "+10.2 standard errors, a significant rise" in line
    assert "the same 16 levels x 4 samples" in line


def test_a_change_within_the_noise_is_called_so():
    before = [[4, 1], [4, 2], [4, 0], [4, 3]]
    after = [[4, 2], [4, 1], [4, 1], [4, 3]]
    line = validation_change(row(0, before), row(5, after))
    assert "+0.062" in line and "not significant (within two standard errors)" in line


def test_a_fall_is_called_a_fall():
    line = validation_change(row(0, [[2, 2]] * 3 + [[2, 1]]), row(1, [[2, 0]] * 3 + [[2, 1]]))
    assert "a significant fall" in line


def test_logs_without_level_counts_get_the_binomial_error_and_no_verdict():
    first, last = row(0, [[4, 1]] * 4), row(3, [[4, 2]] * 4)
    del first["val/level_counts"], last["val/level_counts"]
    line = validation_change(first, last)
    assert line.startswith("Validation Pass@1 0.250 (4/16) ± 0.108 at step 0 -> 0.500 (8/16)")
    assert "significant" not in line
