"""`lit-entropy report`: reading CSVLogger logs, labels from config.yaml, aggregation over seeds, the PNGs and
the markdown table, on small logs written here (2 labels x 2 seeds)."""

from __future__ import annotations

import csv
import math
import os
import statistics
import sys
from pathlib import Path

import pytest
import yaml

from lit_entropy.callbacks.entropy_law import LawFit
from lit_entropy.errors import ConfigError, DataError
from lit_entropy.report import early_law_error, early_law_rmse, main
from lit_entropy.report_figures import (
    LEGEND_INSIDE_MAX,
    aggregate,
    band_figure,
    import_pyplot,
    law_text,
    rolling_mean,
    series_styles,
)
from lit_entropy.run_log import (
    RunLog,
    config_label,
    find_metrics_csv,
    load_run,
    read_metrics,
    validation_pairs,
)

STEPS = 30  # RL iterations per fake run
VAL_STEPS = [4, 9, 14, 19, 24, 29]  # a validation every 5 iterations
KS = [1, 4, 8]
#: the law each label's accuracies follow exactly: (a, b)
LAWS = {"GRPO": (0.05, 0.6), "ClipCov": (0.02, 0.7)}

# --- fake logs -----------------------------------------------------------------------------------------


def fake_entropy(label: str, seed: int, step: int) -> float:
    start = 2.0 if label == "GRPO" else 2.2
    floor = 0.2 if label == "GRPO" else 0.8
    return floor + (start - floor) * math.exp(-step / 8) + 0.01 * seed


def fake_reward(label: str, seed: int, step: int) -> float:
    return 0.1 + 0.01 * step + (0.05 if label == "ClipCov" else 0.0) + 0.02 * seed * (step % 3)


def window_entropy(label: str, seed: int, val_step: int) -> float:
    """Mean entropy of the steps since the previous validation (the pairing the report and EntropyLaw use)."""
    previous = max((s for s in VAL_STEPS if s < val_step), default=-1)
    window = [fake_entropy(label, seed, s) for s in range(previous + 1, val_step + 1)]
    return sum(window) / len(window)


def fake_accuracy(label: str, seed: int, val_step: int) -> float:
    a, b = LAWS[label]
    return -a * math.exp(window_entropy(label, seed, val_step)) + b


def fake_pass_at(label: str, seed: int, val_step: int, k: int) -> float:
    return min(
        1.0, 0.1 * math.log2(2 * k) + 0.005 * val_step + 0.03 * seed + (0.1 if label == "ClipCov" else 0)
    )


def write_metrics(path: Path, label: str, seed: int, validation: bool = True) -> None:
    """A CSVLogger-style file: one row per training iteration, one row per validation, at the same step."""
    rows = []
    for step in range(STEPS):
        rows.append(
            {
                "epoch": 0,
                "step": step,
                "train/entropy": fake_entropy(label, seed, step),
                "rollout/reward_mean": fake_reward(label, seed, step),
                "train/loss": 0.01 * step,
            }
        )
        if validation and step in VAL_STEPS:
            row = {"epoch": 0, "step": step, "val/accuracy": fake_accuracy(label, seed, step)}
            row.update({f"val/pass@{k}": fake_pass_at(label, seed, step, k) for k in KS})
            rows.append(row)
    columns = sorted({key for row in rows for key in row})
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def write_config(folder: Path, callbacks: list[str]) -> None:
    config = {
        "seed_everything": 0,
        "trainer": {"callbacks": [{"class_path": path, "init_args": {}} for path in callbacks] or None},
        "model": {"class_path": "lit_entropy.GRPO"},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))


@pytest.fixture
def run_dirs(tmp_path) -> list[Path]:
    """GRPO x 2 seeds and ClipCov x 2 seeds, laid out as LightningCLI leaves them (nested versions)."""
    dirs = []
    for label in ("GRPO", "ClipCov"):
        for seed in (0, 1):
            run = tmp_path / f"{label.lower()}_seed{seed}"
            stale = run / "lightning_logs" / "version_0" / "metrics.csv"
            write_metrics(stale, "GRPO", seed=7)  # an older version of the run: must be ignored
            os.utime(stale, (1_000_000, 1_000_000))
            log_dir = run / "lightning_logs" / "version_1"
            write_metrics(log_dir / "metrics.csv", label, seed)
            if label == "ClipCov":
                write_config(
                    log_dir,
                    [
                        "lit_entropy.callbacks.ClipCov",
                        "lit_entropy.callbacks.entropy_law.EntropyLaw",
                        "lightning.pytorch.callbacks.ModelCheckpoint",
                    ],
                )
            elif seed == 1:  # the baseline: no regularizer among its callbacks
                write_config(log_dir, ["lightning.pytorch.callbacks.LearningRateMonitor"])
            # GRPO seed 0 has no config.yaml at all: also the baseline
            dirs.append(run)
    return dirs


def table_rows(report: Path) -> dict[str, list[str]]:
    """The rows of the first table (the one before the "## Against" heading)."""
    rows = {}
    for line in report.read_text().split("## Against", 1)[0].splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in LAWS:
            rows[cells[0]] = cells
    return rows


def mean_std(cell: str) -> tuple[float, float]:
    mean, std = cell.split("±")
    return float(mean), float(std)


# --- the command ---------------------------------------------------------------------------------------


def test_report_writes_figures_and_a_table_with_the_expected_numbers(run_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    main([*map(str, run_dirs), "--out", str(out)])
    for name in ("entropy_vs_step.png", "reward_vs_step.png", "accuracy_vs_entropy.png", "pass_at_k.png"):
        data = (out / name).read_bytes()
        assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n", name
    assert str(out / "report.md") in capsys.readouterr().out

    rows = table_rows(out / "report.md")
    assert list(rows) == ["GRPO", "ClipCov"]  # labels from config.yaml, in order of first appearance
    for label, cells in rows.items():
        assert cells[1] == "2"  # seeds
        # final entropy: per seed the mean of the last 10 iterations, then mean and sample std over seeds
        finals = [statistics.fmean(fake_entropy(label, seed, s) for s in range(20, 30)) for seed in (0, 1)]
        mean, std = mean_std(cells[2])
        assert mean == pytest.approx(statistics.fmean(finals), abs=1e-4)
        assert std == pytest.approx(statistics.stdev(finals), abs=1e-4)
        rewards = [statistics.fmean(fake_reward(label, seed, s) for s in range(20, 30)) for seed in (0, 1)]
        mean, std = mean_std(cells[3])
        assert mean == pytest.approx(statistics.fmean(rewards), abs=1e-4)
        assert std == pytest.approx(statistics.stdev(rewards), abs=1e-4)
        accuracies = [fake_accuracy(label, seed, 29) for seed in (0, 1)]
        mean, std = mean_std(cells[4])
        assert mean == pytest.approx(statistics.fmean(accuracies), abs=1e-4)
        assert std == pytest.approx(statistics.stdev(accuracies), abs=1e-4)
        assert cells[5].endswith("(k=8)")
        passes = [fake_pass_at(label, seed, 29, 8) for seed in (0, 1)]
        mean, std = mean_std(cells[5].removesuffix("(k=8)"))
        assert mean == pytest.approx(statistics.fmean(passes), abs=1e-4)
        assert std == pytest.approx(statistics.stdev(passes), abs=1e-4)
        # the accuracies follow the law exactly, so the pooled fit recovers a and b
        a, b = LAWS[label]
        assert float(cells[6]) == pytest.approx(a, abs=1e-4)
        assert float(cells[7]) == pytest.approx(b, abs=1e-4)
        assert float(cells[8]) == pytest.approx(b - a, abs=1e-4)
        assert float(cells[9]) == pytest.approx(1.0, abs=1e-4)
        # each run follows the law exactly, so the law fitted on its first validations predicts the last one
        mean, _ = mean_std(cells[10])
        assert mean == pytest.approx(0.0, abs=1e-4)


def test_labels_override_config(run_dirs, tmp_path):
    out = tmp_path / "out"
    main([*map(str, run_dirs), "--out", str(out), "--labels", "base", "base", "cov", "cov"])
    text = (out / "report.md").read_text()
    assert "| base | 2 |" in text and "| cov | 2 |" in text and "ClipCov" not in text.split("## Runs")[0]


def test_one_seed_per_label_prints_means_only(run_dirs, tmp_path):
    out = tmp_path / "out"
    main([str(run_dirs[0]), str(run_dirs[2]), "--out", str(out)])
    rows = table_rows(out / "report.md")
    assert rows["GRPO"][1] == "1" and "±" not in rows["GRPO"][2]
    expected = statistics.fmean(fake_entropy("GRPO", 0, s) for s in range(20, 30))
    assert float(rows["GRPO"][2]) == pytest.approx(expected, abs=1e-4)


def test_runs_without_validation_skip_the_validation_figures(tmp_path):
    write_metrics(tmp_path / "run" / "metrics.csv", "GRPO", 0, validation=False)
    out = tmp_path / "out"
    main([str(tmp_path / "run"), "--out", str(out), "--smooth", "3", "--last", "5"])
    assert (out / "entropy_vs_step.png").stat().st_size > 0
    assert (out / "reward_vs_step.png").stat().st_size > 0
    assert not (out / "accuracy_vs_entropy.png").exists() and not (out / "pass_at_k.png").exists()
    cells = table_rows(out / "report.md")["GRPO"]
    assert cells[4:] == ["n/a"] * 7  # accuracy, pass@k, a, b, ceiling, R^2, early-law error
    expected = statistics.fmean(fake_entropy("GRPO", 0, s) for s in range(25, 30))  # --last 5
    assert float(cells[2]) == pytest.approx(expected, abs=1e-4)


def test_label_count_mismatch_and_bad_windows_are_config_errors(run_dirs, tmp_path):
    with pytest.raises(ConfigError, match="--labels has 1 labels for 4 run folders"):
        main([*map(str, run_dirs), "--out", str(tmp_path / "out"), "--labels", "x"])
    with pytest.raises(ConfigError, match="--smooth=0"):
        main([str(run_dirs[0]), "--out", str(tmp_path / "out"), "--smooth", "0"])


def test_missing_matplotlib_names_the_extra(run_dirs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` sees when not installed
    with pytest.raises(ConfigError, match=r"pip install 'lit-entropy\[report\]'"):
        main([str(run_dirs[0]), "--out", str(tmp_path / "out")])


def test_missing_logs_are_data_errors_naming_the_path(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no metrics.csv under .*empty"):
        find_metrics_csv(tmp_path / "empty")
    with pytest.raises(DataError, match="does not exist"):
        find_metrics_csv(tmp_path / "nowhere")
    path = tmp_path / "other" / "metrics.csv"
    path.parent.mkdir()
    path.write_text("step,val/accuracy\n0,0.5\n")
    with pytest.raises(DataError, match=r"metrics.csv has no 'train/entropy'"):
        load_run(tmp_path / "other")
    path.write_text("epoch,val/accuracy\n0,0.5\n")
    with pytest.raises(DataError, match="no 'step' column"):
        read_metrics(path)
    path.write_text("step,train/entropy\n0,abc\n")
    with pytest.raises(DataError, match="line 2"):
        read_metrics(path)


# --- the pieces ----------------------------------------------------------------------------------------


def test_newest_metrics_file_is_used(run_dirs):
    assert find_metrics_csv(run_dirs[0]).parent.name == "version_1"


def test_a_run_folder_may_be_given_as_a_string(run_dirs):
    from_path = load_run(run_dirs[0])
    from_string = load_run(str(run_dirs[0]))
    assert from_string.path == from_path.path == find_metrics_csv(str(run_dirs[0]))
    assert from_string.values("train/entropy") == from_path.values("train/entropy")


def test_config_label():
    assert config_label({}) == "GRPO"
    assert config_label({"trainer": {"callbacks": None}}) == "GRPO"
    # one callback given as a mapping; a Lightning callback and a monitor are not regularizers
    assert config_label({"trainer": {"callbacks": {"class_path": "lit_entropy.callbacks.KLCov"}}}) == "KLCov"
    callbacks = [
        {"class_path": "lit_entropy.callbacks.EntropyConstraint"},
        {"class_path": "lightning.pytorch.callbacks.EarlyStopping"},
        {"class_path": "lit_entropy.callbacks.entropy_law.EntropyLaw"},
        {"class_path": "my_lab.regularizers.Fancy"},  # not importable here: counted, it may be a regularizer
        {"class_path": "lightning.pytorch.callbacks.NotInstalled"},  # not importable, but Lightning's
    ]
    assert config_label({"trainer": {"callbacks": callbacks}}) == "EntropyConstraint+Fancy"


def test_rolling_mean_by_hand():
    # window 3: [1], [1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5] -> 1, 1.5, 2, 3, 4
    assert rolling_mean([1, 2, 3, 4, 5], 3) == pytest.approx([1, 1.5, 2, 3, 4])
    assert rolling_mean([1, 2], 1) == [1, 2]
    with pytest.raises(ConfigError, match="window=0"):
        rolling_mean([1.0], 0)


def test_aggregate_by_hand():
    # step 0: (1, 3) -> mean 2, min 1, max 3; step 1: only the first run -> 2; step 2: only the second -> 5
    steps, mean, low, high = aggregate([[(0, 1.0), (1, 2.0)], [(0, 3.0), (2, 5.0)]])
    assert steps == [0, 1, 2]
    assert mean == [2.0, 2.0, 5.0] and low == [1.0, 2.0, 5.0] and high == [3.0, 2.0, 5.0]


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG's IHDR chunk (bytes 16-24), read without an image library."""
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


def test_a_long_legend_goes_beside_the_axes_and_widens_the_image(tmp_path):
    plt = import_pyplot()
    series = [[(step, 0.1 * step), (step + 1, 0.2)] for step in range(2)]

    def width(labels: int) -> int:
        path = tmp_path / f"{labels}.png"
        band_figure(plt, {f"method-{i}": series for i in range(labels)}, "train/entropy", "t", path)
        return png_size(path)[0]

    # 7 x 4.5 inches at 120 dpi is 840 px wide; a tight crop of a figure with the legend inside stays within it
    few, many = width(LEGEND_INSIDE_MAX), width(LEGEND_INSIDE_MAX + 1)
    assert few <= 840
    assert many > few + 100  # the legend's column of labels lies to the right of the axes


def test_twelve_labels_get_twelve_different_looks(tmp_path, monkeypatch):
    """Past matplotlib's ten default colours a label must not be drawn like the first one."""
    plt = import_pyplot()
    from matplotlib.colors import to_hex

    drawn = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda figure: (drawn.append(figure), close(figure)))
    series = [[(0, 0.5), (1, 0.4)], [(0, 0.6), (1, 0.3)]]
    band_figure(plt, {f"method-{i}": series for i in range(12)}, "train/entropy", "t", tmp_path / "e.png")
    lines = drawn[0].axes[0].get_lines()
    assert len(lines) == 12
    looks = {(to_hex(line.get_color()), line.get_linestyle()) for line in lines}
    assert len(looks) == 12
    # the first ten differ by colour alone, as matplotlib draws them; the eleventh reuses the first colour, dashed
    assert len({to_hex(line.get_color()) for line in lines[:10]}) == 10
    assert to_hex(lines[10].get_color()) == to_hex(lines[0].get_color())
    assert lines[10].get_linestyle() != lines[0].get_linestyle()
    assert series_styles(12)[10]["marker"] != series_styles(12)[0]["marker"]


def test_the_law_reads_with_one_sign_whatever_the_sign_of_a():
    assert law_text(LawFit(a=0.2, b=0.8, r2=0.5)) == "0.800 - 0.200 exp(H)"
    assert law_text(LawFit(a=-0.0831, b=0.5475, r2=0.1)) == "0.547 + 0.083 exp(H)"


def test_validation_pairs_average_the_entropy_since_the_previous_validation():
    run = RunLog(
        label="x",
        path=Path("metrics.csv"),
        metrics={
            "train/entropy": [(0, 1.0), (1, 2.0), (2, 3.0), (3, 5.0)],
            # at 1: steps 0, 1 -> 1.5; at 3: steps 2, 3 -> 4; at 3 again: no step since -> no pair
            "val/accuracy": [(1, 0.1), (3, 0.2), (3, 0.3)],
        },
    )
    assert validation_pairs(run) == [(1.5, 0.1), (4.0, 0.2)]


def test_a_law_fitted_on_too_few_points_is_flagged_in_the_table_and_warned_about(tmp_path, capsys):
    run = tmp_path / "short_run"
    write_metrics(run / "metrics.csv", "GRPO", seed=0)
    # keep two validations only: two points fit the law exactly (R² = 1), which says nothing
    lines = (run / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    accuracy = header.index("val/accuracy")
    validation_rows = [i for i, line in enumerate(lines) if i and line.split(",")[accuracy]]
    kept = [line for i, line in enumerate(lines) if i not in validation_rows[2:]]
    (run / "metrics.csv").write_text("\n".join(kept) + "\n")
    out = tmp_path / "report"
    main([str(run), "--out", str(out), "--labels", "GRPO"])
    err = capsys.readouterr().err
    assert (
        "lit-entropy report: warning: label 'GRPO': the law is fitted on 2 (entropy, val/accuracy) points"
        in err
    )
    row = table_rows(out / "report.md")["GRPO"]
    assert row[9] == "1.0000 (2 points: too few)"
    assert "**Warning:** label 'GRPO': the law is fitted on 2" in (out / "report.md").read_text()


def test_a_law_fitted_on_enough_points_has_no_warning(run_dirs, tmp_path, capsys):
    main([*map(str, run_dirs), "--out", str(tmp_path / "report")])
    assert "warning" not in capsys.readouterr().err
    assert "Warning" not in (tmp_path / "report" / "report.md").read_text()


def baseline_rows(report: Path) -> dict[str, list[str]]:
    """The rows of the second table (the one after the "## Against" heading)."""
    text = report.read_text().split("## Against", 1)[1].split("## Runs", 1)[0]
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in LAWS:
            rows[cells[0]] = cells
    return rows


def test_the_baseline_table_gives_entropy_ratios_every_pass_at_k_and_the_early_law_rmse(run_dirs, tmp_path):
    out = tmp_path / "out"
    main([*map(str, run_dirs), "--out", str(out)])
    header = [line for line in (out / "report.md").read_text().splitlines() if "entropy / GRPO" in line][0]
    assert "pass@1 | pass@4 | pass@8" in header
    rows = baseline_rows(out / "report.md")
    finals = {
        label: [statistics.fmean(fake_entropy(label, seed, s) for s in range(20, 30)) for seed in (0, 1)]
        for label in LAWS
    }
    reference = statistics.fmean(finals["GRPO"])
    for label, cells in rows.items():
        ratios = [h / reference for h in finals[label]]
        mean, std = cells[1].split("±")
        assert float(mean.strip().removesuffix("x")) == pytest.approx(statistics.fmean(ratios), abs=0.01)
        assert float(std) == pytest.approx(statistics.stdev(ratios), abs=0.01)
        for column, k in enumerate(KS, start=2):
            passes = [fake_pass_at(label, seed, 29, k) for seed in (0, 1)]
            assert mean_std(cells[column])[0] == pytest.approx(statistics.fmean(passes), abs=1e-4)
        assert cells[5] == cells[6] == "n/a"  # the fake logs hold no distinct_* columns
        # every run follows the law exactly, so the early fit predicts every later validation
        assert mean_std(cells[7])[0] == pytest.approx(0.0, abs=1e-4)
    assert float(rows["ClipCov"][1].split("x")[0]) > 1.5  # ClipCov's entropy floor is 4x GRPO's


def test_the_early_law_rmse_is_the_error_over_the_later_validations(tmp_path):
    # 7 validations: the early fit takes max(2, round(0.15 * 7)) = 2 of them, which fix the law exactly
    steps = list(range(7))
    entropy = [1.0 - 0.1 * s for s in steps]
    accuracy = [-0.1 * math.exp(h) + 0.5 for h in entropy]
    accuracy[4] += 0.03  # a later validation off the law by 0.03, another by -0.04
    accuracy[6] -= 0.04
    run = RunLog(
        label="GRPO",
        path=tmp_path,
        metrics={"train/entropy": list(zip(steps, entropy)), "val/accuracy": list(zip(steps, accuracy))},
    )
    expected = math.sqrt((0.03**2 + 0.04**2) / 5)  # 5 later validations, 3 of them exactly on the law
    assert early_law_rmse(run) == pytest.approx(expected, abs=1e-9)
    assert early_law_error(run) == pytest.approx(0.04, abs=1e-9)


def test_distinct_columns_are_the_last_validations_values(tmp_path):
    run = tmp_path / "run"
    write_metrics(run / "metrics.csv", "GRPO", seed=0)
    lines = (run / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    accuracy = header.index("val/accuracy")
    out_lines = [lines[0] + ",val/distinct_answers,val/distinct_correct"]
    count = 0
    for line in lines[1:]:
        if line.split(",")[accuracy]:
            count += 1
            line += f",{2.0 + count},{1.0 + 0.5 * count}"
        else:
            line += ",,"
        out_lines.append(line)
    (run / "metrics.csv").write_text("\n".join(out_lines) + "\n")
    main([str(run), "--out", str(tmp_path / "out")])
    cells = baseline_rows(tmp_path / "out" / "report.md")["GRPO"]
    assert cells[1] == "1.00x"  # the baseline against itself
    assert float(cells[5]) == pytest.approx(1.0 + 0.5 * len(VAL_STEPS))
    assert float(cells[6]) == pytest.approx(2.0 + len(VAL_STEPS))


def test_a_missing_baseline_label_warns_and_leaves_the_ratios_out(run_dirs, tmp_path, capsys):
    main([str(run_dirs[2]), "--out", str(tmp_path / "out")])  # ClipCov alone
    assert "no run is labelled 'GRPO' (--baseline)" in capsys.readouterr().err
    assert baseline_rows(tmp_path / "out" / "report.md")["ClipCov"][1] == "n/a"
