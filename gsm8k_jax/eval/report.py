"""Rendering a `comparison.ComparisonReport`: Markdown, and a plot of each
run's accuracy with its 95% interval; `save_report` writes both, and the
JSON, into a local or `gs://` folder.

The report says in words what a reader must not miss: which runs are
incomplete, on how many problems each pair was compared, and whether each
difference is significant. Needs neither jax nor a model.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING

from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from gsm8k_jax import storage

if TYPE_CHECKING:
    from gsm8k_jax.eval.comparison import ComparisonReport, PairedComparison, RunRow
    from gsm8k_jax.eval.multi_sample import MultiSampleMetrics

__all__ = ["REPORT_FILES", "plot_accuracies", "render_markdown", "save_report"]

REPORT_FILES = ("comparison.md", "comparison.json", "accuracy.png")

# Responses longer than this are cut in the Markdown report (never in JSON).
_MARKDOWN_RESPONSE_CHARS = 600


def _label(row: RunRow) -> str:
    return f"#{row.index} `{row.tag}`"


def _percent(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2%}"


def _interval(low: float, high: float) -> str:
    return f"{low:.2%}–{high:.2%}"


def _points(x: float) -> str:
    return f"{100 * x:+.2f}"


def _ids(ids: Sequence[int]) -> str:
    return ", ".join(map(str, ids)) if ids else "none"


def _quote(text: str) -> list[str]:
    if len(text) > _MARKDOWN_RESPONSE_CHARS:
        text = text[:_MARKDOWN_RESPONSE_CHARS] + " […]"
    return ["    " + line for line in (text or "(empty)").splitlines()]


def _progress(row: RunRow) -> str:
    """Problems finished of those the run was started on, e.g. `12/32, incomplete`."""
    done = f"{row.num_finished}/{row.num_examples}"
    return done if row.complete else f"{done}, incomplete"


def _verdict(p: PairedComparison, level: float) -> str:
    """McNemar's verdict in words, e.g. `not significant at 5% (McNemar exact
    p = 0.42)`; `nothing to pair` when the runs share no problem."""
    if p.mcnemar is None:
        return "nothing to pair"
    word = "significant" if p.significant else "not significant"
    return f"{word} at {level:.0%} (McNemar exact p = {p.mcnemar.p_value:.4g})"


def render_markdown(report: ComparisonReport, max_disagreements: int) -> str:
    """The report as Markdown; see `ComparisonReport.to_markdown`."""
    lines = ["# GSM8K comparison", ""]
    method = report.extraction_method
    lines += [f"Every run is scored with `{method}` extraction of its responses.", ""]
    lines += _table_markdown(report)
    if report.paired:
        lines += _paired_section_markdown(report, max_disagreements)
    elif len(report.runs) == 1:
        lines += ["One run: nothing to compare it with.", ""]
    if report.consistency:
        lines += _consistency_markdown(report)
    if report.multi_sample:
        lines += ["## Several samples per question", ""]
        for m in report.multi_sample:
            lines += _multi_sample_markdown(m, report.runs[m.run])
    return "\n".join(lines) + "\n"


def _table_markdown(report: ComparisonReport) -> list[str]:
    rows = report.runs
    multi = any(r.num_samples > 1 for r in rows)
    header = ["Run", "Model", "Checkpoint", "batch_size"]
    header += ["Samples"] if multi else []
    header += ["Problems", "Correct", "Total", "Accuracy (95% interval)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        name = _label(r) + (" (baseline)" if r.index == report.baseline else "")
        interval = _interval(*r.accuracy_ci95) + (
            "*" if r.interval == "clustered" else ""
        )
        base = f"base ({r.model_path})" if r.model_path else "base"
        cells = [name, r.model_name, r.checkpoint or base, str(r.batch_size)]
        cells += [str(r.num_samples)] if multi else []
        cells += [_progress(r), str(r.correct), str(r.total)]
        cells += [f"{r.accuracy:.2%} ({interval})"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if multi:
        lines += [
            (
                "Accuracy is over all samples. \\* Wilson's interval on the items the"
                " samples are worth, clustered by question (samples of a question are"
                " correlated); otherwise Wilson's over all samples."
            ),
            "",
        ]
    tags = [r.tag for r in rows]
    shared = [r for r in rows if tags.count(r.tag) > 1]
    if shared:
        where = ", ".join(f"{_label(r)} from {r.source}" for r in shared)
        lines += [f"Runs of the same tag: {where}.", ""]
    incomplete = [_label(r) for r in rows if not r.complete]
    if incomplete:
        lines += [
            (
                f"**Incomplete:** {', '.join(incomplete)}: fewer problems finished than"
                " the run was started on, or no summary yet (stopped, or still"
                " running). An incomplete run's accuracy covers only the problems it"
                " finished, and it is compared with other runs only on the problems"
                " both finished."
            ),
            "",
        ]
    return lines


def _paired_section_markdown(
    report: ComparisonReport, max_disagreements: int
) -> list[str]:
    rows = report.runs
    level = report.significance_level
    lines = [
        f"## Paired comparison against {_label(rows[report.baseline])}",
        "",
        (
            "Each run is paired with the baseline on the problems both finished"
            f" (by example id). A difference is significant at {level:.0%} when"
            f" McNemar's exact test gives p < {level:g}."
        ),
        "",
    ]
    for p in report.paired:
        summary = f"- {_label(rows[p.candidate])}: "
        if p.difference is not None:
            summary += (
                f"{_points(p.difference.diff)} points on the {p.num_common} problems"
                " both finished, "
            )
        differs = (
            f" (other settings too: {', '.join(p.differing_settings)})"
            if p.differing_settings
            else ""
        )
        lines.append(summary + _verdict(p, level) + differs)
    lines.append("")
    tested = [p for p in report.paired if p.significant_holm is not None]
    if len(tested) > 1:
        kept = [_label(rows[p.candidate]) for p in tested if p.significant_holm]
        lines += [
            (
                f"{len(tested)} runs are each tested against the baseline, so one"
                f" may pass at {level:.0%} by chance alone. With Holm's correction"
                f" for the {len(tested)} tests, significant at {level:.0%}:"
                f" {', '.join(kept) or 'none'}."
            ),
            "",
        ]
    if any(p.first_sample_only for p in report.paired):
        lines += [
            (
                "Runs with several samples per question are paired on sample 0 of"
                " each question (McNemar's test needs one answer each). Over all"
                " samples, each question's share of correct samples, paired by"
                " question:"
            ),
            "",
        ]
        for p in report.paired:
            if (d := p.mean_difference) is not None:
                lines.append(
                    f"- {_label(rows[p.candidate])}: {_points(d.diff)} points, 95%"
                    f" paired bootstrap interval [{_points(d.low)},"
                    f" {_points(d.high)}] over {p.num_common} questions"
                )
        lines.append("")
    for p in report.paired:
        lines += _paired_markdown(p, report, max_disagreements)
    return lines


def _paired_markdown(
    p: PairedComparison, report: ComparisonReport, max_disagreements: int
) -> list[str]:
    rows = report.runs
    lines = [f"### {_label(rows[p.candidate])} vs baseline", ""]
    for r in (rows[p.baseline], rows[p.candidate]):
        if not r.complete:
            lines += [
                (
                    f"**Incomplete:** {_label(r)} finished {r.num_finished} of"
                    f" {r.num_examples} problems, so this pair covers only the"
                    " problems both runs finished, not the full set."
                ),
                "",
            ]
    if p.differing_settings:
        lines += [
            (
                f"**Settings differ** from the baseline's:"
                f" {', '.join(p.differing_settings)}. The difference below is not"
                " the checkpoint's alone."
            ),
            "",
        ]
    if p.question_mismatches:
        lines += [
            (
                f"**Warning:** {len(p.question_mismatches)} ids have different questions"
                " in the two runs (other data files?) and are left out: ids"
                f" {_ids(p.question_mismatches)}."
            ),
            "",
        ]
    if p.difference is None or p.mcnemar is None:
        return lines + ["No problem in common: nothing to pair.", ""]
    d, m = p.difference, p.mcnemar
    left_out = [
        f"{n} finished by {who} only"
        for n, who in (
            (p.baseline_unpaired, "the baseline"),
            (p.candidate_unpaired, "this run"),
        )
        if n
    ]
    lines += [
        f"- Paired on the {p.num_common} problems both runs finished"
        + (f" (left out: {', '.join(left_out)})" if left_out else ""),
        (
            f"- Accuracy on them: baseline {_percent(p.baseline_accuracy)}, this run"
            f" {_percent(p.candidate_accuracy)}"
        ),
        (
            f"- Difference (this run − baseline): {_points(d.diff)} points, 95% paired"
            f" bootstrap interval [{_points(d.low)}, {_points(d.high)}]"
            f" ({report.num_resamples:,} resamples)"
            + (
                "; the runs are right on the same problems, so no resample differs"
                " (the interval is a point, not certainty)"
                if m.b + m.c == 0
                else ""
            )
        ),
        (
            f"- McNemar exact test: b = {m.b} (only the baseline right), c = {m.c}"
            f" (only this run right): {_verdict(p, report.significance_level)}"
        ),
        f"- Only the baseline right: ids {_ids(p.baseline_only_correct)}",
        f"- Only this run right: ids {_ids(p.candidate_only_correct)}",
        "",
    ]
    return lines + _disagreements_markdown(p, max_disagreements)


def _disagreements_markdown(p: PairedComparison, max_disagreements: int) -> list[str]:
    shown = p.disagreements[:max_disagreements]
    if not shown:
        return []
    more = len(p.disagreements) - len(shown)
    lines = [
        f"Disagreements to read ({len(shown)} of {len(p.disagreements)}"
        + (f"; all {more + len(shown)} in comparison.json" if more else "")
        + "):",
        "",
    ]
    for dis in shown:
        lines += [f"#### Example {dis.id} (gold {dis.gold})", ""]
        lines += [f"> {line}" for line in dis.question.splitlines()] + [""]
        for who, answer in (("Baseline", dis.baseline), ("This run", dis.candidate)):
            verdict = "right" if answer.correct else "wrong"
            extracted = (
                "no answer extracted"
                if answer.extracted_answer is None
                else f"answer `{answer.extracted_answer}`"
            )
            lines += [
                f"{who} ({verdict}, {extracted}):",
                "",
                *_quote(answer.response),
                "",
            ]
    return lines


def _consistency_markdown(report: ComparisonReport) -> list[str]:
    lines = [
        "## Batch-size consistency",
        "",
        (
            "Runs with the same model, checkpoint, data and settings but for the"
            " batch size, matched by (example id, sample). Both shares should be"
            " 100%."
        ),
        "",
        "| Runs | batch_size | Rows | Identical responses | Identical correctness |",
        "|---|---|---|---|---|",
    ]
    for c in report.consistency:
        i, j = c.runs
        lines.append(
            f"| #{i} vs #{j} | {c.batch_sizes[0]} vs {c.batch_sizes[1]} |"
            f" {c.num_rows} | {_percent(c.identical_responses_share)}"
            f" ({c.identical_responses}/{c.num_rows}) |"
            f" {_percent(c.identical_correctness_share)}"
            f" ({c.identical_correctness}/{c.num_rows}) |"
        )
    return lines + [""]


def _multi_sample_markdown(m: MultiSampleMetrics, row: RunRow) -> list[str]:
    mean = _percent(m.mean_accuracy)
    if m.mean_accuracy_ci95 is not None:
        mean += f" ({_interval(*m.mean_accuracy_ci95)})"
    return [
        f"### {_label(row)}: k = {m.num_samples}, {m.num_questions} questions",
        "",
        "| Metric | Value |",
        "|---|---|",
        *(f"| {name} (unbiased) | {_percent(v)} |" for name, v in m.pass_at.items()),
        f"| maj@{m.num_samples} | {_percent(m.maj_at_k)} |",
        f"| mean accuracy (95% clustered interval) | {mean} |",
        "",
        f"Submitting one of the {m.num_samples} samples per question:",
        "",
        "| Selection | Accuracy |",
        "|---|---|",
        *(f"| {name} | {_percent(v)} |" for name, v in m.selection.items()),
        "",
    ]


def _plot_label(row: RunRow, baseline: int) -> str:
    """A run's tick label: its name, then n and its accuracy with the interval,
    e.g. `n = 12 of 32, incomplete: 41.7% (19.3%–68.0%)`."""
    n = f"n = {row.num_finished}"
    if not row.complete:
        n += f" of {row.num_examples}, incomplete"
    if row.num_samples > 1:
        n += f" × {row.num_samples} samples"
    low, high = row.accuracy_ci95
    name = f"#{row.index} {row.tag}" + (" (baseline)" if row.index == baseline else "")
    return f"{name}\n{n}: {row.accuracy:.1%} ({low:.1%}–{high:.1%})"


def save_report(report: ComparisonReport, output_dir: str | os.PathLike) -> str:
    """Writes `REPORT_FILES` (Markdown, JSON, the accuracy plot) into
    `output_dir`, local or `gs://`, each atomically; returns the Markdown."""
    markdown = report.to_markdown()
    png = io.BytesIO()
    plot_accuracies(report, png)
    contents = (
        markdown,
        json.dumps(report.to_json(), indent=2, ensure_ascii=False) + "\n",
        png.getvalue(),
    )
    for name, data in zip(REPORT_FILES, contents, strict=True):
        storage.write_atomic(storage.join(output_dir, name), data)
    return markdown


def plot_accuracies(
    report: ComparisonReport, path: str | os.PathLike | IO[bytes]
) -> Figure:
    """Saves a PNG of each run's accuracy (a point) with its 95% interval.

    One row per run, top to bottom in report order, labelled with the number
    of problems (n; incomplete runs say so) and the accuracy with its
    interval; the baseline is orange, with its accuracy as a dashed line.
    Drawn without pyplot, so it works with any matplotlib backend and leaves
    pyplot's state alone.

    Args:
      report: the comparison.
      path: a local file (its folder is made if need be), or a binary file
        object.

    Returns:
      The figure, for further use.
    """
    rows = report.runs
    fig = Figure(figsize=(8.0, 1.2 + 0.6 * len(rows)))
    ax = fig.add_subplot()
    for y, r in enumerate(rows):
        low, high = r.accuracy_ci95
        ax.errorbar(
            r.accuracy,
            y,
            xerr=[[r.accuracy - low], [high - r.accuracy]],
            fmt="o",
            capsize=4,
            color="tab:orange" if r.index == report.baseline else "tab:blue",
        )
    ax.axvline(rows[report.baseline].accuracy, color="tab:orange", linestyle="--", lw=1)
    ax.set_yticks(range(len(rows)), [_plot_label(r, report.baseline) for r in rows])
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlim(-0.02, 1.02)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlabel("GSM8K accuracy, 95% interval")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    if isinstance(path, (str, os.PathLike)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, format="png")
    return fig
