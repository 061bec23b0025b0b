"""pmptrain bench's time to every optimizer's final accuracy (issue 17, "per second")."""

from pmptrain.bench.report import format_time_to_final_acc, time_to_final_acc


def _run(name, accs, secs, selected=True):
    return {"optimizer": name, "selected": selected,
            "curves": {"test_acc": accs, "seconds": secs, "epoch": list(range(1, len(accs) + 1))}}


ROWS = [{"optimizer": "adam", "final_acc_median": 0.80}, {"optimizer": "emsa", "final_acc_median": 0.85},
        {"optimizer": "sgd", "final_acc_median": 0.70}]
RUNS = [
    _run("adam", [0.60, 0.75, 0.80], [1.0, 2.0, 3.0]), _run("adam", [0.62, 0.79, 0.81], [1.1, 2.2, 3.3]),
    _run("emsa", [0.81, 0.84, 0.85], [3.0, 6.0, 9.0]), _run("emsa", [0.70, 0.82, 0.86], [3.1, 6.1, 9.1]),
    _run("sgd", [0.50, 0.65, 0.70], [0.5, 1.0, 1.5]), _run("sgd", [0.50, 0.60, 0.69], [0.5, 1.0, 1.5]),
    _run("emsa", [0.99, 0.99, 0.99], [0.1, 0.2, 0.3], selected=False),  # another grid value: ignored
]


def test_seconds_to_each_final_accuracy_are_medians_over_the_seeds_that_reached_it():
    ttf = time_to_final_acc(ROWS, RUNS)
    assert set(ttf) == {"adam", "emsa", "sgd"}
    adam = ttf["adam"]
    assert adam["target_acc"] == 0.80
    assert adam["seconds"]["adam"] == (3.0 + 3.3) / 2 and adam["reached"]["adam"] == [2, 2]
    assert adam["seconds"]["emsa"] == (3.0 + 6.1) / 2  # the first epoch at or above the target
    assert adam["seconds"]["sgd"] is None and adam["reached"]["sgd"] == [0, 2]
    assert ttf["emsa"]["seconds"]["adam"] is None
    assert ttf["emsa"]["seconds"]["emsa"] == 9.05 and ttf["emsa"]["reached"]["emsa"] == [2, 2]  # ≥, not >
    assert ttf["sgd"]["seconds"]["sgd"] == 1.5 and ttf["sgd"]["reached"]["sgd"] == [1, 2]  # 0.69 < 0.70
    assert ttf["sgd"]["seconds"]["emsa"] == 3.05


def test_the_text_table_names_targets_and_partial_seeds():
    text = format_time_to_final_acc(time_to_final_acc(ROWS, RUNS))
    lines = text.splitlines()
    assert "adam (80.00%)" in lines[0] and "emsa (85.00%)" in lines[0]
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert rows["adam"] == ["3.1", "not", "reached", "2.1"]
    assert rows["sgd"] == ["not", "reached", "not", "reached", "1.5", "(1/2)"]

    assert format_time_to_final_acc({}) == ""
