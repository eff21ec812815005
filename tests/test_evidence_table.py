"""The final-validation table of ``benchmarks/evidence.py``: means, spreads and the pass@k judgement."""

from __future__ import annotations

import statistics
from pathlib import Path


def validation(evidence, tmp_path: Path, label: str, seed: int, accuracy: float, pass8: float):
    folder = tmp_path / label.replace(" ", "_") / f"seed{seed}" / "final"
    log = folder / "validate" / "version_0"
    log.mkdir(parents=True)
    (log / "metrics.csv").write_text(f"epoch,step,val/accuracy,val/pass@8\n0,0,{accuracy},{pass8}\n")
    return evidence.Run(label, "-", seed, folder, ["python", "-m", "lit_entropy", "validate"])


def test_final_table_means_spreads_and_pass_at_k_judgement(evidence, tmp_path):
    grpo, method = [0.80, 0.84, 0.82], [0.90, 0.95, 0.91]
    runs = [validation(evidence, tmp_path, "GRPO", seed, 0.5, value) for seed, value in enumerate(grpo)]
    runs += [validation(evidence, tmp_path, "KLCov", seed, 0.6, value) for seed, value in enumerate(method)]
    runs += [
        validation(evidence, tmp_path, f"GRPO {evidence.TUNING_SEED}", 100, 0.5, 0.70),
        validation(evidence, tmp_path, f"KLCov kl_coef=4.0 {evidence.TUNING_SEED}", 100, 0.4, 0.75),
    ]
    evidence.final_table(runs, tmp_path / "report")
    text = (tmp_path / "report" / "final.md").read_text()

    grpo_row = next(line for line in text.splitlines() if line.startswith("| GRPO | 3 |"))
    assert f"{statistics.fmean(grpo):.4f} ± {statistics.stdev(grpo):.4f}" in grpo_row
    # the 3-seed method against the 3-seed baseline: +0.1 against a spread of max(std) = 0.0265
    difference = statistics.fmean(method) - statistics.fmean(grpo)
    spread = max(statistics.stdev(method), statistics.stdev(grpo))
    assert f"- KLCov: {difference:+.4f} (beyond the spread, spread {spread:.4f})" in text
    # the tuning-seed row against the baseline's tuning run (0.75 - 0.70), not against the 3-seed mean
    assert f"- KLCov kl_coef=4.0 {evidence.TUNING_SEED}: +0.0500 (one seed each: no spread" in text
    assert f"- GRPO {evidence.TUNING_SEED}:" not in text


def test_final_table_within_the_spread(evidence, tmp_path):
    runs = [validation(evidence, tmp_path, "GRPO", s, 0.5, v) for s, v in enumerate([0.7, 0.9])]
    runs += [validation(evidence, tmp_path, "REPO-R", s, 0.5, v) for s, v in enumerate([0.75, 0.95])]
    evidence.final_table(runs, tmp_path / "report")
    spread = statistics.stdev([0.7, 0.9])
    assert (
        f"- REPO-R: +0.0500 (within the spread, spread {spread:.4f})"
        in (tmp_path / "report" / "final.md").read_text()
    )
