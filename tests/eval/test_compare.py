"""Comparing runs: statistics on constructed results against independent
computations, loading, rendering, and real tiny-model runs end to end."""

import copy
import dataclasses
import functools
import json
import logging
import math
import re
import subprocess
import sys
from pathlib import Path

import fsspec
import jax
import numpy as np
import pytest
import scipy.stats
import transformers
from eval.test_scoring import wilson
from flax import nnx
from fresh_interpreter import imported_after
from gcs_emulator import upload_dir
from lora_checkpoints import random_factors, write_tunix_checkpoint

from gsm8k_jax.checkpoints.lora import LoraConfig, load_lora
from gsm8k_jax.checkpoints.lora_checkpoint import (
    TRAINING_SETTINGS_FILE,
    save_lora_config,
)
from gsm8k_jax.eval.comparison import Answer, check_baseline, compare_runs
from gsm8k_jax.eval.multi_sample import (
    majority_vote_scorer,
    mean_logprob_scorer,
    rerank,
)
from gsm8k_jax.eval.report import plot_accuracies
from gsm8k_jax.eval.results import ResultsWarning
from gsm8k_jax.eval.runner import EvalConfig
from gsm8k_jax.eval.runs import RunResult, load_run, load_runs
from gsm8k_jax.eval.sweep import evaluate_checkpoints
from gsm8k_jax.models.gemma3.params import CheckpointError
from gsm8k_jax.models.registry import load_pretrained
from gsm8k_jax.models.specs import TINY_MODEL_DIR
from gsm8k_jax.sampling.sampler import SamplingParams

REPO = Path(__file__).resolve().parents[2]
EVAL_SCRIPT = REPO / "research" / "script" / "eval_gsm8k_base.py"
COMPARE_SCRIPT = REPO / "research" / "script" / "compare_checkpoints.py"
QUICK = ["--num_examples=6", "--max_generation_steps=12"]


def rollout(
    i, correct, *, sample=0, response=None, answer=None, logprob=-1.0, tokens=1
):
    """A rollout of a problem whose answer is 7; the response boxes `answer`
    (default: 7 when `correct`, else nothing), as comparisons score it again."""
    if answer is None and correct:
        answer = "7"
    if response is None:
        response = f"\\boxed{{{answer}}}" if answer is not None else "x"
    return {
        "id": i,
        "sample_index": sample,
        "question": f"question {i}",
        "gold": "7",
        "reference_solution": "3 + 4 = 7\n#### 7",
        "prompt": f"prompt {i}",
        "response": response,
        "extracted_answer": answer,
        "correct": correct,
        "num_tokens": tokens,
        "finish_reason": "eos",
        "logprob": logprob,
    }


def make_run(
    rollouts,
    *,
    tag="run",
    batch_size=4,
    num_samples=1,
    temperature=0.0,
    num_examples=None,
    finished=True,
):
    """A run of `rollouts`, started on `num_examples` problems (default: those
    in `rollouts`), with a summary when `finished`."""
    run_info = {
        "model": {"model_name": "gemma3-tiny", "model_path": ""},
        "lora_checkpoint": "",
        "data_sha256": "abc",
        "num_examples": (
            len({r["id"] for r in rollouts}) if num_examples is None else num_examples
        ),
        "eval": {
            "batch_size": batch_size,
            "sampling": {"num_samples": num_samples, "temperature": temperature},
        },
    }
    return RunResult(
        tag=tag,
        model_name="gemma3-tiny",
        checkpoint="",
        batch_size=batch_size,
        num_samples=num_samples,
        rollouts=rollouts,
        summary={"run": run_info} if finished else None,
        run_info=run_info,
        source="memory",
    )


def run_compare(*args: str) -> subprocess.CompletedProcess:
    """compare_checkpoints.py with `args`, its output captured."""
    return subprocess.run(
        [sys.executable, str(COMPARE_SCRIPT), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )


def single(correct, **kwargs):
    return make_run([rollout(i, bool(c)) for i, c in enumerate(correct)], **kwargs)


# --------------------------------------------------------------------------- #
# Paired comparison
# --------------------------------------------------------------------------- #


def test_mcnemar_and_bootstrap_against_independent_computations():
    rng = np.random.default_rng(1)
    a = rng.random(60) < 0.5
    b = a.copy()
    b[:9] = ~a[:9]  # Nine discordant items.
    report = compare_runs(
        [single(a, tag="a"), single(b, tag="b", temperature=1.0)], num_resamples=4000
    )
    (paired,) = report.paired
    b_count, c_count = int(np.sum(a & ~b)), int(np.sum(~a & b))
    assert (paired.mcnemar.b, paired.mcnemar.c) == (b_count, c_count)
    assert paired.mcnemar.p_value == pytest.approx(
        scipy.stats.binomtest(b_count, b_count + c_count, 0.5).pvalue, rel=1e-12
    )
    d = b.astype(float) - a.astype(float)
    assert paired.difference.diff == pytest.approx(d.mean())
    # The percentile interval is close to the normal one of the paired differences.
    half = 1.96 * d.std(ddof=0) / math.sqrt(len(d))
    assert paired.difference.low == pytest.approx(d.mean() - half, abs=0.02)
    assert paired.difference.high == pytest.approx(d.mean() + half, abs=0.02)
    assert paired.baseline_accuracy == pytest.approx(a.mean())
    assert paired.candidate_accuracy == pytest.approx(b.mean())
    assert not report.consistency  # Other sampling settings: not grouped.


def test_disagreements_by_hand():
    # ids:         0  1  2  3  4  5 (5 only in the baseline), 9 (only candidate)
    base = [rollout(i, c) for i, c in zip(range(6), [1, 1, 0, 0, 1, 0])]
    cand = [rollout(i, c) for i, c in zip(range(5), [1, 0, 1, 0, 0])]
    cand.append(rollout(9, True))
    cand[2] = rollout(2, True, response="so \\boxed{7}", answer="7")
    report = compare_runs(
        [make_run(base, tag="base"), make_run(cand, tag="lora")], num_resamples=100
    )
    (p,) = report.paired
    assert p.num_common == 5 and not p.question_mismatches
    assert (p.baseline_unpaired, p.candidate_unpaired) == (1, 1)
    assert (
        "- Paired on the 5 problems both runs finished (left out: 1 finished by the"
        " baseline only, 1 finished by this run only)"
    ) in report.to_markdown()
    assert p.baseline_only_correct == [1, 4]
    assert p.candidate_only_correct == [2]
    assert (p.mcnemar.b, p.mcnemar.c, p.mcnemar.num_items) == (2, 1, 5)
    assert [d.id for d in p.disagreements] == [1, 2, 4]
    two = p.disagreements[1]
    assert (two.question, two.gold) == ("question 2", "7")
    assert two.baseline == Answer(response="x", extracted_answer=None, correct=False)
    assert two.candidate == Answer(
        response="so \\boxed{7}", extracted_answer="7", correct=True
    )
    assert not p.first_sample_only


def test_runs_scored_under_other_methods_are_scored_again_alike():
    """Two runs with the same responses, one stored as scored by `strict` and
    one by `flexible` (--extraction_method), compare as equal: every run is
    scored again from its responses, under the comparison's method and its
    own task's answer format."""
    texts = ["so 7", "\\boxed{7}", "The answer is 7.", "7 or 8", "no"]
    by_strict = [False, True, False, False, False]
    by_flexible = [True, True, True, False, False]

    def run(stored, tag):
        rows = [
            rollout(i, c, response=t) for i, (t, c) in enumerate(zip(texts, stored))
        ]
        return make_run(rows, tag=tag)

    cot = run(by_strict, "cot")
    cot.run_info["eval"]["task"] = "gsm8k_cot"
    runs = [run(by_strict, "strict"), run(by_flexible, "flexible"), cot]
    report = compare_runs(runs, num_resamples=100)
    assert report.extraction_method == "strict"
    assert [r.correct for r in report.runs] == [1, 1, 2]  # cot: "The answer is 7."
    assert report.paired[0].mcnemar.b == report.paired[0].mcnemar.c == 0
    assert "scored with `strict` extraction" in report.to_markdown()
    flexible_report = compare_runs(
        runs, num_resamples=100, extraction_method="flexible"
    )
    assert [r.correct for r in flexible_report.runs] == [3, 3, 3]
    with pytest.raises(ValueError, match="extraction_method must be one of"):
        compare_runs(runs, extraction_method="lenient")


def test_question_mismatch_is_left_out_and_reported():
    base = single([1, 1, 1], tag="a")
    other = [rollout(i, True) for i in range(3)]
    other[1]["question"] = "something else"
    report = compare_runs([base, make_run(other, tag="b")], num_resamples=10)
    (p,) = report.paired
    assert p.question_mismatches == [1] and p.num_common == 2
    assert "1 ids have different questions" in report.to_markdown()


def test_runs_of_other_settings_are_flagged():
    """A pair whose runs differ in more than the checkpoint and batch size
    (here the generation limit and the temperature) says so, beside its
    verdict; a pair that differs in the checkpoint alone does not."""
    base = single([1, 0, 1], tag="base")
    lora = single([1, 1, 1], tag="lora", batch_size=8)
    lora.run_info["lora_checkpoint"] = "/ckpt/actor/5/model_params"
    lora.run_info["model"]["lora_config"] = {"rank": 16}
    other = single([1, 1, 0], tag="other", temperature=1.0)
    other.run_info["eval"]["sampling"]["max_generation_steps"] = 16
    report = compare_runs([base, lora, other], baseline=0, num_resamples=10)
    assert [p.differing_settings for p in report.paired] == [
        [],
        ["eval.sampling.max_generation_steps", "eval.sampling.temperature"],
    ]
    markdown = report.to_markdown()
    assert markdown.count("**Settings differ** from the baseline's:") == 1
    assert (
        "(other settings too: eval.sampling.max_generation_steps,"
        " eval.sampling.temperature)"
    ) in markdown
    assert report.to_json()["paired"][1]["differing_settings"] == [
        "eval.sampling.max_generation_steps",
        "eval.sampling.temperature",
    ]


def test_significance_is_stated_in_words():
    base = single([0] * 20, tag="base")
    # Six problems only the candidate gets right: p = 2 / 2**6; five: 2 / 2**5.
    better = single([1] * 6 + [0] * 14, tag="better")
    same = single([1] * 5 + [0] * 15, tag="same")
    report = compare_runs([base, better, same], num_resamples=100)
    p_better, p_same = report.paired
    assert (p_better.mcnemar.p_value, p_same.mcnemar.p_value) == (2 / 64, 2 / 32)
    assert (p_better.significant, p_same.significant) == (True, False)
    markdown = report.to_markdown()
    assert (
        "- #1 `better`: +30.00 points on the 20 problems both finished, significant"
        " at 5% (McNemar exact p = 0.03125)"
    ) in markdown
    assert (
        "- #2 `same`: +25.00 points on the 20 problems both finished, not"
        " significant at 5% (McNemar exact p = 0.0625)"
    ) in markdown
    assert (
        "c = 6 (only this run right): significant at 5% (McNemar exact p = 0.03125)"
    ) in markdown
    assert [p["significant"] for p in report.to_json()["paired"]] == [True, False]


def test_incomplete_run_is_marked_and_paired_on_shared_problems_only():
    base = single([1, 0, 1, 1, 0, 1], tag="base")
    stopped = single([1, 1], tag="stopped", num_examples=6, finished=False)
    report = compare_runs([base, stopped], num_resamples=10)
    assert [(r.num_finished, r.num_examples, r.complete) for r in report.runs] == [
        (6, 6, True),
        (2, 6, False),
    ]
    (p,) = report.paired
    assert (p.num_common, p.baseline_unpaired, p.candidate_unpaired) == (2, 4, 0)
    assert (p.baseline_accuracy, p.candidate_accuracy) == (0.5, 1.0)
    markdown = report.to_markdown()
    assert "| #0 `base` (baseline) | gemma3-tiny | base | 4 | 6/6 | 4 | 6 |" in markdown
    assert (
        "| #1 `stopped` | gemma3-tiny | base | 4 | 2/6, incomplete | 2 | 2 | 100.00% ("
        in markdown
    )
    assert "**Incomplete:** #1 `stopped`: fewer problems finished" in markdown
    assert (
        "**Incomplete:** #1 `stopped` finished 2 of 6 problems, so this pair covers"
        " only the problems both runs finished, not the full set."
    ) in markdown
    assert (
        "- Paired on the 2 problems both runs finished (left out: 4 finished by the"
        " baseline only)"
    ) in markdown
    assert (
        "- #1 `stopped`: +50.00 points on the 2 problems both finished, not"
        " significant at 5% (McNemar exact p = 1)"
    ) in markdown
    # All problems but no summary yet: still incomplete.
    unsummarised = single([1, 0], tag="u", finished=False)
    assert not compare_runs([unsummarised]).runs[0].complete


def test_pairing_uses_sample_zero_with_several_samples():
    base = single([1, 0, 1], tag="greedy")
    sampled = make_run(
        [
            rollout(i, c, sample=s)
            for i, row in enumerate([[0, 1], [1, 1], [1, 0]])
            for s, c in enumerate(row)
        ],
        tag="k2",
        num_samples=2,
        temperature=1.0,
    )
    report = compare_runs([base, sampled], num_resamples=10)
    (p,) = report.paired
    assert p.first_sample_only
    assert (p.baseline_only_correct, p.candidate_only_correct) == ([0], [1])
    assert "paired on sample 0" in report.to_markdown()


def test_baseline_by_tag_and_bad_baselines():
    runs = [single([1], tag="a"), single([0], tag="b")]
    assert compare_runs(runs, baseline="b", num_resamples=10).baseline == 1
    with pytest.raises(ValueError, match="no run has that tag"):
        compare_runs(runs, baseline="c")
    with pytest.raises(ValueError, match="out of range"):
        compare_runs(runs, baseline=2)
    with pytest.raises(ValueError, match="No runs"):
        compare_runs([])


def test_the_default_baseline_is_the_base_models_fullest_run():
    """Runs sort by tag, so a base model's quick run of a few problems (or a
    LoRA's) can come first: the default baseline is the base model's run
    that finished the most problems, the first of equals."""
    lora = dataclasses.replace(single([1, 0, 1, 1], tag="a_lora"), checkpoint="c")
    runs = [lora, single([1, 0], tag="b_base_bs16"), single([1, 0, 0], tag="c_base")]
    assert compare_runs(runs, num_resamples=10).baseline == 2
    runs.append(single([0, 0, 0], tag="d_base"))
    assert compare_runs(runs, num_resamples=10).baseline == 2
    longer = dataclasses.replace(single([1] * 5, tag="b_lora"), checkpoint="d")
    assert compare_runs([lora, longer], num_resamples=10).baseline == 1
    lone = compare_runs(runs[1:2], num_resamples=10).to_markdown()
    assert "One run: nothing to compare it with." in lone


def test_runs_of_the_same_tag_are_told_apart_by_folder():
    runs = [
        dataclasses.replace(single([1, 0], tag="base_bs32"), source=folder)
        for folder in ("results/walkthrough", "results/quickstart")
    ]
    assert (
        "Runs of the same tag: #0 `base_bs32` from results/walkthrough,"
        " #1 `base_bs32` from results/quickstart."
    ) in compare_runs(runs, num_resamples=10).to_markdown()
    assert "Runs of the same tag" not in compare_runs(runs[:1]).to_markdown()


# --------------------------------------------------------------------------- #
# Batch-size consistency
# --------------------------------------------------------------------------- #


def test_batch_size_consistency_shares():
    rows = [rollout(i, c) for i, c in enumerate([1, 0, 1, 0])]
    other_text = [dict(r) for r in rows]
    other_text[1]["response"] = "y"  # Wrong either way: same correctness.
    other_correct = [dict(r) for r in rows]
    other_correct[0] = rollout(0, False)
    other_correct[3] = rollout(3, True)
    runs = [
        make_run(rows, tag="bs1", batch_size=1),
        make_run(other_text, tag="bs2", batch_size=2),
        make_run(other_correct, tag="bs8", batch_size=8),
        make_run(rows, tag="hot", batch_size=1, temperature=0.7),
    ]
    report = compare_runs(runs, num_resamples=10)
    shares = {
        c.runs: (c.identical_responses_share, c.identical_correctness_share)
        for c in report.consistency
    }
    assert shares == {
        (0, 1): (3 / 4, 1.0),
        (0, 2): (2 / 4, 2 / 4),
        (1, 2): (1 / 4, 2 / 4),
    }
    assert report.consistency[0].batch_sizes == (1, 2)
    assert "| #0 vs #1 | 1 vs 2 | 4 | 75.00% (3/4) | 100.00% (4/4) |" in (
        report.to_markdown()
    )


def test_consistency_pairs_the_runs_of_one_program_alone():
    """Greedy runs that differ in a seed they never read are the same
    program; a run with tensor parallelism (--mesh_model=2) is another, and
    a record from before --mesh_model was recorded may be either: it is
    paired with neither."""
    rows = [rollout(i, c) for i, c in enumerate([1, 0, 1])]
    one = make_run(rows, tag="one", batch_size=1)
    one.run_info["mesh_model"] = 1
    seeded = make_run(rows, tag="seeded", batch_size=2)
    seeded.run_info["eval"]["sampling"]["seed"] = 5
    seeded.run_info["mesh_model"] = 1
    split = make_run(rows, tag="split", batch_size=4)
    split.run_info["mesh_model"] = 2
    older = make_run(rows, tag="older", batch_size=8)
    report = compare_runs([one, seeded, split, older], num_resamples=10)
    assert [c.runs for c in report.consistency] == [(0, 1)]


# --------------------------------------------------------------------------- #
# Several samples per question
# --------------------------------------------------------------------------- #

# Correct samples per question (k = 4): c = 0, 1, 2, 4.
GRID = [[0, 0, 0, 0], [0, 0, 1, 0], [1, 0, 0, 1], [1, 1, 1, 1]]


def sampled_run():
    answers = [
        [None, "3", "3", "5"],  # maj: 3 (wrong)
        ["4", "4", "7", None],  # maj: 4 (wrong); 7 is right
        ["7", "2", "9", "7.0"],  # maj: 7 (right)
        ["7", "7", "7", "7"],
    ]
    logprobs = [
        [-1.0, -2.0, -3.0, -4.0],
        [-9.0, -9.0, -0.5, -9.0],  # mean log-prob picks the right one
        [-9.0, -1.0, -1.0, -9.0],  # ... and here a wrong one
        [-1.0, -1.0, -1.0, -1.0],
    ]
    rollouts = [
        rollout(
            i, bool(c), sample=s, answer=answers[i][s], logprob=logprobs[i][s], tokens=2
        )
        for i, row in enumerate(GRID)
        for s, c in enumerate(row)
    ]
    return make_run(rollouts, tag="k4", num_samples=4, temperature=1.0)


def test_pass_at_k_maj_and_clustered_mean_known_values():
    run = sampled_run()
    (m,) = compare_runs([run], num_resamples=10).multi_sample
    counts = [sum(row) for row in GRID]
    for j in (1, 2, 4):
        expected = np.mean([1 - math.comb(4 - c, j) / math.comb(4, j) for c in counts])
        assert m.pass_at[f"pass@{j}"] == pytest.approx(expected)
    assert m.pass_at == pytest.approx(
        {"pass@1": 7 / 16, "pass@2": (0 + 1 / 2 + 5 / 6 + 1) / 4, "pass@4": 3 / 4}
    )
    assert m.maj_at_k == 2 / 4
    per_question = np.mean(GRID, axis=1)
    se = per_question.std(ddof=1) / 2
    assert m.mean_accuracy == pytest.approx(7 / 16)
    # 16 samples worth p(1-p)/SE^2 (about 5.4) independent items.
    effective = 7 / 16 * 9 / 16 / se**2
    assert 4 < effective < 16
    assert m.mean_accuracy_ci95 == pytest.approx(wilson(7 / 16, effective), abs=1e-6)
    assert m.selection == pytest.approx(
        {
            "sample 0 (baseline)": 2 / 4,
            "majority vote": 2 / 4,
            "mean log-prob per token": 2 / 4,
            "oracle (any correct = pass@4)": 3 / 4,
        }
    )
    row = compare_runs([run], num_resamples=10).runs[0]
    assert (row.correct, row.total, row.interval) == (7, 16, "clustered")
    assert row.accuracy_ci95 == pytest.approx(m.mean_accuracy_ci95)


def test_reranker_built_ins_on_constructed_candidates():
    def cands(answers, logprobs=None, tokens=None):
        n = len(answers)
        return [
            rollout(0, False, sample=s, answer=a, logprob=lp, tokens=t)
            for s, (a, lp, t) in enumerate(
                zip(answers, logprobs or [-1.0] * n, tokens or [1] * n)
            )
        ]

    # Numeric equality groups 7 and 7.0; the tie with 5 goes to the first seen.
    assert majority_vote_scorer(cands(["5", "7", "7.0", None, "5"])) == 0
    assert majority_vote_scorer(cands([None, "3", "4", "4.00"])) == 2
    assert majority_vote_scorer(cands([None, None])) == 0
    # Mean log-prob per token: -2, -3, -1 -> the last.
    assert (
        mean_logprob_scorer(
            cands(["1", "2", "3"], logprobs=[-10.0, -3.0, -4.0], tokens=[5, 1, 4])
        )
        == 2
    )
    run = sampled_run()
    assert rerank(run, majority_vote_scorer) == pytest.approx(
        compare_runs([run], num_resamples=10).multi_sample[0].maj_at_k
    )
    assert rerank(run, lambda c: 3) == 2 / 4
    with pytest.raises(ValueError, match="chose candidate 4 of 4"):
        rerank(run, lambda c: 4)


# --------------------------------------------------------------------------- #
# Rendering
# --------------------------------------------------------------------------- #


def test_markdown_json_and_png(tmp_path):
    runs = [
        single([1, 0, 1, 1], tag="base"),
        single([1, 1, 0, 1], tag="lora"),
        sampled_run(),
    ]
    report = compare_runs(runs, baseline="base", num_resamples=200)
    markdown = report.to_markdown(max_disagreements=1)
    assert markdown.startswith("# GSM8K comparison")
    assert (
        "| Run | Model | Checkpoint | batch_size | Samples | Problems | Correct | Total |"
        in markdown
    )
    assert (
        "| #0 `base` (baseline) | gemma3-tiny | base | 4 | 1 | 4/4 | 3 | 4 | 75.00% ("
        in markdown
    )
    assert "Incomplete" not in markdown
    assert "Disagreements to read (1 of 2; all 2 in comparison.json)" in markdown
    assert "McNemar exact test: b = 1" in markdown
    assert "| maj@4 | 50.00% |" in markdown
    assert "| mean log-prob per token | 50.00% |" in markdown

    data = json.loads(json.dumps(report.to_json()))
    assert data["baseline"] == 0 and len(data["runs"]) == 3
    assert data["paired"][0]["mcnemar"]["b"] == 1
    assert len(data["paired"][0]["disagreements"]) == 2
    assert data["multi_sample"][0]["pass_at"]["pass@4"] == 0.75

    png = tmp_path / "not yet made" / "accuracy.png"
    plot_accuracies(report, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_base_runs_of_other_weights_are_told_apart():
    """A full fine-tune evaluated as a base model (--model.model_path) is not
    labelled as the named model's base weights."""
    named = single([1, 0, 1], tag="gemma3-tiny_base_bs4")
    tuned = single([1, 1, 1], tag="gemma3-tiny_base_bs4")
    tuned.run_info["model"]["model_path"] = "runs/ff/hf/2"
    markdown = compare_runs([named, tuned], num_resamples=10).to_markdown()
    assert "| gemma3-tiny | base | 4 |" in markdown
    assert "| gemma3-tiny | base (runs/ff/hf/2) | 4 |" in markdown


def test_plot_labels_each_run_with_n_and_its_interval(tmp_path):
    runs = [
        single([1, 0, 1, 1], tag="base"),
        single([1, 1], tag="stopped", num_examples=4, finished=False),
        sampled_run(),
    ]
    report = compare_runs(runs, num_resamples=10)
    fig = plot_accuracies(report, tmp_path / "accuracy.png")
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    intervals = [
        f"({low:.1%}–{high:.1%})"
        for low, high in (r.accuracy_ci95 for r in report.runs)
    ]
    assert labels == [
        f"#0 base (baseline)\nn = 4: 75.0% {intervals[0]}",
        f"#1 stopped\nn = 2 of 4, incomplete: 100.0% {intervals[1]}",
        f"#2 k4\nn = 4 × 4 samples: 43.8% {intervals[2]}",
    ]
    # The error bars span the same intervals.
    spans = [c.get_segments()[0][:, 0] for c in fig.axes[0].collections]
    np.testing.assert_allclose(spans, [r.accuracy_ci95 for r in report.runs])


# --------------------------------------------------------------------------- #
# Loading
# --------------------------------------------------------------------------- #


def write_run(folder, tag, rollouts, *, summary=True, run_info=None):
    folder.mkdir(parents=True, exist_ok=True)
    info = run_info or make_run(rollouts).run_info
    (folder / f"run_{tag}.json").write_text(json.dumps(info))
    (folder / f"rollouts_{tag}.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rollouts)
    )
    if summary:
        (folder / f"summary_{tag}.json").write_text(json.dumps({"run": info}))


def test_load_run_from_folder_or_files(tmp_path):
    write_run(tmp_path / "one", "a", [rollout(1, True), rollout(0, False)])
    run = load_run(tmp_path / "one")
    assert (run.tag, run.model_name, run.checkpoint, run.batch_size) == (
        "a",
        "gemma3-tiny",
        "",
        4,
    )
    assert [r["id"] for r in run.rollouts] == [0, 1]
    for name in ("rollouts_a.jsonl", "summary_a.json", "run_a.json"):
        assert load_run(tmp_path / "one" / name).rollouts == run.rollouts

    write_run(tmp_path / "one", "b", [rollout(0, True)], summary=False)
    with pytest.raises(ValueError, match="holds 2 runs \\(a, b\\)"):
        load_run(tmp_path / "one")
    _, b = load_runs(tmp_path / "one")
    run_file = json.loads((tmp_path / "one" / "run_b.json").read_text())
    assert b.summary is None and b.run_info == run_file  # Unfinished: run file.


@pytest.mark.parametrize("damage", ["{", '{"correct": 1, "tot', "[]", "{}"])
def test_a_damaged_summary_is_read_past_from_the_rollouts(tmp_path, damage):
    """Comparisons score every run again from its rollouts: a summary that
    cannot be read (truncated, not an object, without its run record) is
    named in a warning, and the run is read from its rollouts and run
    record, as finished as they show."""
    rows = [rollout(0, True), rollout(1, False)]
    write_run(tmp_path, "t", rows)
    (summary,) = tmp_path.glob("summary_*.json")
    summary.write_text(damage)
    with pytest.warns(ResultsWarning) as caught:
        (run,) = load_runs(tmp_path)
    (warning,) = caught
    assert str(warning.message).startswith(f"{summary} is damaged (")
    assert str(warning.message).endswith(
        "): run 't' is compared from its rollouts and run_t.json (rerunning its"
        " evaluation command writes the summary again without generating)."
    )
    assert run.rollouts == rows and run.summary is None
    assert run.run_info == json.loads((tmp_path / "run_t.json").read_text())
    assert run.complete  # All it was started on, and it wrote its summary.
    assert compare_runs([run, run]).runs[0].correct == 1


def test_a_damaged_summary_without_a_run_record_is_one_clear_error(tmp_path):
    write_run(tmp_path, "t", [rollout(0, True)])
    (tmp_path / "summary_t.json").write_text("{")
    (tmp_path / "run_t.json").unlink()
    with pytest.raises(ValueError, match="summary_t.json is damaged .* and run_t.json"):
        load_runs(tmp_path)


def test_a_run_without_a_run_record_is_one_clear_error(tmp_path):
    """evaluate(..., run_info={}) writes results the comparison cannot place."""
    write_run(tmp_path, "t", [rollout(0, True)], run_info={"note": "mine"})
    with pytest.raises(ValueError, match="run 't' .* lacks 'eval'.*gsm8k_jax.run_info"):
        load_runs(tmp_path)


def test_load_keeps_finished_examples_only(tmp_path):
    info = make_run([], num_samples=2).run_info
    rows = [rollout(0, True, sample=0), rollout(0, True, sample=1), rollout(1, True)]
    write_run(tmp_path, "k2", rows, run_info=info)
    assert [r["id"] for r in load_run(tmp_path).rollouts] == [0, 0]


def test_stopped_run_loads_as_incomplete_and_is_left_untouched(tmp_path):
    info = single([1, 1, 1, 1]).run_info  # Started on 4 problems.
    write_run(
        tmp_path,
        "a",
        [rollout(0, True), rollout(1, False)],
        summary=False,
        run_info=info,
    )
    path = tmp_path / "rollouts_a.jsonl"
    with open(path, "a") as f:
        f.write('{"id": 2, "corr')  # Killed while writing.
    before = path.read_text()
    run = load_run(path)
    assert (run.num_finished, run.num_examples, run.complete) == (2, 4, False)
    assert [r["id"] for r in run.rollouts] == [0, 1]
    assert path.read_text() == before  # A reader repairs nothing.
    write_run(tmp_path, "a", [rollout(i, True) for i in range(4)], run_info=info)
    assert load_run(path).complete


def no_files(folder):
    folder.mkdir()


def empty_rollouts(folder):
    write_run(folder, "a", [])


def rollouts_only(folder):
    write_run(folder, "a", [rollout(0, True)])
    (folder / "run_a.json").unlink()
    (folder / "summary_a.json").unlink()


def test_a_damaged_rollouts_line_leaves_its_problem_unfinished(tmp_path):
    """Named in a warning; the run's other problems are compared, and the
    run is marked incomplete."""
    write_run(tmp_path, "a", [rollout(0, True), rollout(1, True), rollout(2, False)])
    path = tmp_path / "rollouts_a.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + '{"id": 1, "corr\n' + lines[2])
    with pytest.warns(ResultsWarning, match="rollouts_a.jsonl, line 2 is damaged"):
        (run,) = load_runs(tmp_path)
    assert [r["id"] for r in run.rollouts] == [0, 2]
    assert (run.num_finished, run.num_examples, run.complete) == (2, 3, False)


@pytest.mark.parametrize(
    "setup, error, message",
    [
        (lambda folder: None, FileNotFoundError, "Results path not found"),
        (no_files, FileNotFoundError, "it is empty"),
        (empty_rollouts, ValueError, "no finished example"),
        (rollouts_only, FileNotFoundError, "neither summary_a.json nor run_a.json"),
    ],
)
def test_clear_load_errors(tmp_path, setup, error, message):
    folder = tmp_path / "results"
    setup(folder)
    with pytest.raises(error, match=message):
        load_runs(folder)


def test_load_run_rejects_other_files(tmp_path):
    other = tmp_path / "notes.txt"
    other.write_text("hi")
    with pytest.raises(ValueError, match="not a results file"):
        load_run(other)


# --------------------------------------------------------------------------- #
# Real runs on the tiny model
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """eval_gsm8k_base.py at batch sizes 2 and 4 (run concurrently)."""
    out = tmp_path_factory.mktemp("cli_runs")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(EVAL_SCRIPT),
                *QUICK,
                f"--batch_size={bs}",
                f"--output_dir={out}",
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for bs in (2, 4)
    ]
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{stdout}\n{stderr}"
    return out


def stopped_copy(folder, tag, target, num_lines):
    """A copy of a finished run as if stopped after its first `num_lines`
    rollouts: the run record and one chunk, no summary."""
    (target / f"chunks_{tag}").mkdir(parents=True)
    (target / f"run_{tag}.json").write_text((folder / f"run_{tag}.json").read_text())
    lines = (folder / f"rollouts_{tag}.jsonl").read_text().splitlines(keepends=True)
    chunk = target / f"chunks_{tag}" / "0000-00000000.jsonl"
    chunk.write_text("".join(lines[:num_lines]))
    return target


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_compare_script_on_real_runs_one_stopped(cli_runs, tmp_path, request, where):
    """Runs read from local folders or gs://, the report written there too."""
    stopped = stopped_copy(cli_runs, "gemma3-tiny_base_bs4", tmp_path / "stopped", 3)
    results, out = cli_runs, tmp_path / "cmp"
    if where == "gcs":
        results = f"{request.getfixturevalue('gcs_bucket')}/compare"
        upload_dir(cli_runs, f"{results}/runs")
        upload_dir(stopped, f"{results}/stopped")
        stopped, results, out = (
            f"{results}/stopped",
            f"{results}/runs",
            f"{results}/cmp",
        )
    proc = run_compare(
        f"--results={results}/rollouts_gemma3-tiny_base_bs2.jsonl,{results}/summary_gemma3-tiny_base_bs4.json,{stopped}",
        f"--output_dir={out}",
    )
    assert proc.returncode == 0, proc.stderr
    fs, out = fsspec.core.url_to_fs(str(out))
    fs.invalidate_cache()
    markdown = fs.cat_file(f"{out}/comparison.md").decode()
    assert markdown in proc.stdout
    assert "| #0 vs #1 | 2 vs 4 | 6 | 100.00% (6/6) | 100.00% (6/6) |" in markdown
    assert "| #0 vs #2 | 2 vs 4 | 3 | 100.00% (3/3) | 100.00% (3/3) |" in markdown
    # Identical answers: no difference, and the report says so in words.
    assert (
        "- #1 `gemma3-tiny_base_bs4`: +0.00 points on the 6 problems both finished,"
        " not significant at 5% (McNemar exact p = 1)"
    ) in proc.stdout
    assert "| 6/6 |" in markdown and "| 3/6, incomplete |" in markdown
    assert (
        "- Paired on the 3 problems both runs finished (left out: 3 finished by the"
        " baseline only)"
    ) in markdown
    data = json.loads(fs.cat_file(f"{out}/comparison.json"))
    assert [c["identical_responses_share"] for c in data["consistency"]] == [1.0] * 3
    assert [(r["tag"], r["complete"]) for r in data["runs"]] == [
        ("gemma3-tiny_base_bs2", True),
        ("gemma3-tiny_base_bs4", True),
        ("gemma3-tiny_base_bs4", False),
    ]
    assert fs.cat_file(f"{out}/accuracy.png")[:4] == b"\x89PNG"


def test_reading_and_comparing_import_neither_jax_nor_the_cli():
    code = (
        "import gsm8k_jax.eval.comparison, gsm8k_jax.eval.multi_sample\n"
        "import gsm8k_jax.eval.report, gsm8k_jax.eval.runs, gsm8k_jax.eval.stats\n"
        "from gsm8k_jax import compare_runs, load_runs, plot_accuracies"
    )
    heavy = ("jax", "flax", "gsm8k_jax.eval.cli")
    assert imported_after(code, heavy, prints_nothing=True) == []


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "Nothing to compare"),
        # Evaluation flags beside runs on disk would be silently ignored.
        (
            ["--results=x", "--temperature=0.7", "--num_examples=2", "--model.dtype=f"],
            "--num_examples, --temperature, --model.dtype set how --lora_checkpoints",
        ),
        # Flags a launcher passes to every command are not refused.
        (
            ["--results=/no/such/x", "--compilation_cache_dir=", "--distributed=false"],
            "/no/such/x",
        ),
    ],
)
def test_compare_script_refuses_in_one_line(tmp_path, args, message):
    proc = run_compare(*args, f"--output_dir={tmp_path}")
    assert proc.returncode == 1 and message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_compare_script_warns_in_one_line_and_compares_a_damaged_summary(tmp_path):
    rows = [rollout(i, i % 2 == 0) for i in range(4)]
    write_run(tmp_path / "a", "a", rows)
    write_run(tmp_path / "b", "b", rows)
    summary = tmp_path / "b" / "summary_b.json"
    truncated = '{"correct": 2, "to'
    summary.write_text(truncated)
    column = truncated.index('"to') + 1
    proc = run_compare(
        f"--results={tmp_path / 'a'},{tmp_path / 'b'}",
        f"--output_dir={tmp_path / 'cmp'}",
    )
    assert proc.returncode == 0, proc.stderr
    (warning,) = proc.stderr.splitlines()
    assert warning == (
        f"warning: {summary} is damaged (not valid JSON at line 1, column"
        f" {column}: Unterminated string starting at): run 'b'"
        " is compared from its rollouts"
        " and run_b.json (rerunning its evaluation command writes the summary"
        " again without generating)."
    )
    markdown = (tmp_path / "cmp" / "comparison.md").read_text()
    assert markdown.count("| 4/4 | 2 | 4 | 50.00%") == 2  # Both complete.


def test_compare_script_refuses_a_run_listed_twice(cli_runs, tmp_path):
    """It was compared with itself, as a batch-size consistency pair too."""
    proc = run_compare(
        f"--results={cli_runs},{cli_runs}/summary_gemma3-tiny_base_bs4.json",
        f"--output_dir={tmp_path}",
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "names run 'gemma3-tiny_base_bs4' in" in proc.stderr


def fake_checkpoint(root, step):
    """The folder layout `resolve_lora_checkpoint` accepts (no real factors)."""
    params = root / "actor" / str(step) / "model_params"
    params.mkdir(parents=True)
    (params / "_METADATA").write_text("{}")
    return root / "actor"


def perturb_down_proj(model, key):
    """Adds unit noise from `key` to one weight, in place."""
    kernel = model.layers[0].mlp.down_proj.kernel
    noise = jax.random.normal(key, kernel.get_value().shape)
    kernel.set_value((kernel.get_value() + noise).astype(kernel.get_value().dtype))


def short_sweep(used: dict):
    """`evaluate_checkpoints` of two problems and four tokens on gemma3-tiny,
    whose checkpoints are not loaded: `used` maps each path to its config."""

    def fake_load_lora(model, path, config, *, merge=True):
        used[path] = config
        return model

    return functools.partial(
        evaluate_checkpoints,
        "gemma3-tiny",
        None,
        eval_config=EvalConfig(
            batch_size=2, sampling=SamplingParams(max_generation_steps=4)
        ),
        num_examples=2,
        show_progress=False,
        load_lora_fn=fake_load_lora,
    )


def test_sweep_uses_each_checkpoints_recorded_config(tmp_path, caplog):
    """A checkpoint our trainer wrote is evaluated with its recorded rank and
    alpha (its tag and run record say so), not the defaults; a given field
    that contradicts it is refused before anything is loaded."""
    recorded = fake_checkpoint(tmp_path / "trained", 100)
    save_lora_config(recorded, LoraConfig(rank=16, alpha=16.0))
    tunix = fake_checkpoint(tmp_path / "tunix", 100)
    used = {}
    sweep = functools.partial(
        short_sweep(used),
        lora_paths=[str(recorded), str(tunix)],
        lora_config=LoraConfig(rank=16, alpha=2.0),
        include_base=False,
    )
    with pytest.raises(
        ValueError,
        match=r"alpha=2\.0 \(--model\.lora_config\.alpha; lm-eval's model_args:"
        r" lora_alpha\), but the checkpoint",
    ):
        sweep(output_dir=tmp_path / "refused", given_lora_fields={"alpha"})
    assert not (tmp_path / "refused").exists() and not used
    # Trained on other base weights, as our trainer records them: a warning.
    settings = recorded / TRAINING_SETTINGS_FILE
    settings.write_text(json.dumps({"base_model": "sha256:0123456789abcdef"}))
    with caplog.at_level(logging.WARNING):
        runs = sweep(output_dir=tmp_path / "out", given_lora_fields={"rank"})
    warnings = [r.getMessage() for r in caplog.records if "base weights" in r.message]
    assert len(warnings) == 1 and f"({settings})" in warnings[0]
    # The Tunix checkpoint records no alpha, and only the rank was given.
    assert [r.getMessage() for r in caplog.records if "no LoRA alpha" in r.message]
    assert [r.tag for r in runs] == [
        "gemma3-tiny_trained-actor-100_r16a16_bs2",
        "gemma3-tiny_tunix-actor-100_r16a2_bs2",
    ]
    assert [c.alpha for c in used.values()] == [16.0, 2.0]
    assert runs[0].run_info["model"]["lora_config"]["alpha"] == 16.0


def test_sweep_without_a_config_uses_what_each_checkpoint_records(tmp_path):
    """lora_config=None: checkpoints trained with different ranks and alphas
    are each evaluated with their own; a checkpoint that records none is
    refused before anything is loaded."""
    first = fake_checkpoint(tmp_path / "first", 100)
    save_lora_config(first, LoraConfig(rank=16, alpha=16.0))
    second = fake_checkpoint(tmp_path / "second", 100)
    save_lora_config(second, LoraConfig(rank=8, alpha=4.0))
    tunix = fake_checkpoint(tmp_path / "tunix", 100)
    used = {}
    sweep = functools.partial(short_sweep(used), lora_config=None)
    with pytest.raises(CheckpointError, match="records no rank and alpha"):
        sweep(lora_paths=[str(first), str(tunix)], output_dir=tmp_path / "refused")
    assert not (tmp_path / "refused").exists() and not used
    runs = sweep(lora_paths=[str(first), str(second)], output_dir=tmp_path / "out")
    assert [r.tag for r in runs] == [
        "gemma3-tiny_base_bs2",
        "gemma3-tiny_first-actor-100_r16a16_bs2",
        "gemma3-tiny_second-actor-100_r8a4_bs2",
    ]
    assert [(c.rank, c.alpha) for c in used.values()] == [(16, 16.0), (8, 4.0)]


def test_sweep_tags_the_batch_asked_for_as_the_eval_scripts_do(tmp_path):
    """One evaluation, one tag: 2 problems at --batch_size=32 are bs32 (and
    run 2 slots), as in the scripts, so a rerun on more problems extends it."""
    (run,) = short_sweep({})(
        lora_paths=[],
        lora_config=None,
        eval_config=EvalConfig(
            batch_size=32, sampling=SamplingParams(max_generation_steps=4)
        ),
        output_dir=tmp_path,
    )
    assert run.tag == "gemma3-tiny_base_bs32" and run.batch_size == 32


def test_sweep_restores_base_weights_between_checkpoints(cli_runs, tmp_path):
    checkpoints = [
        fake_checkpoint(tmp_path / "a", 100),
        fake_checkpoint(tmp_path / "b", 200),
    ]
    base_model, _, _ = load_pretrained("gemma3-tiny")
    base_leaves = jax.tree.leaves(nnx.state(base_model, nnx.Param))
    seen = []

    def fake_load_lora(model, path, config, *, merge=True):
        """Checks the model holds the base weights, then perturbs one weight."""
        assert merge and config.rank == 16
        leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
        seen.append(
            (path, all(np.array_equal(x, y) for x, y in zip(leaves, base_leaves)))
        )
        perturb_down_proj(model, jax.random.key(len(seen)))
        return model

    out = tmp_path / "sweep"
    runs = evaluate_checkpoints(
        "gemma3-tiny",
        None,
        [str(c) for c in checkpoints],
        LoraConfig(),
        EvalConfig(batch_size=2, sampling=SamplingParams(max_generation_steps=12)),
        out,
        num_examples=6,
        show_progress=False,
        load_lora_fn=fake_load_lora,
    )
    assert [r.tag for r in runs] == [
        "gemma3-tiny_base_bs2",
        "gemma3-tiny_a-actor-100_r16a2_bs2",
        "gemma3-tiny_b-actor-200_r16a2_bs2",
    ]
    assert seen == [
        (str(checkpoints[0] / "100" / "model_params"), True),
        (str(checkpoints[1] / "200" / "model_params"), True),
    ]
    # The base run is the one eval_gsm8k_base.py writes, byte for byte.
    for name in (
        "run_gemma3-tiny_base_bs2.json",
        "rollouts_gemma3-tiny_base_bs2.jsonl",
    ):
        assert (out / name).read_text() == (cli_runs / name).read_text()
    assert runs[1].run_info["model"]["lora_checkpoint_path"] == str(checkpoints[0])
    base_responses = [r["response"] for r in runs[0].rollouts]
    assert all(
        [r["response"] for r in run.rollouts] != base_responses for run in runs[1:]
    )

    report = compare_runs(runs, num_resamples=100)
    assert [p.candidate for p in report.paired] == [1, 2] and not report.consistency


def test_sweep_records_how_its_loader_applies_each_checkpoint(tmp_path):
    """The default loader attaches ("attached", which `evaluate` checks
    against the model); a loader of the user's records "custom", which it
    cannot check. Here that loader merges: the sweep puts the base weights
    back before detaching, so no merged update is left to refuse."""
    hf_config = transformers.AutoConfig.from_pretrained(TINY_MODEL_DIR)
    checkpoints = []
    for seed, name in enumerate("ab"):
        actor = tmp_path / name / "actor"
        factors = random_factors(hf_config, 4, seed=seed)
        write_tunix_checkpoint(actor / "5" / "model_params", factors)
        checkpoints.append(str(actor))
    sweep = functools.partial(
        evaluate_checkpoints,
        "gemma3-tiny",
        None,
        lora_config=LoraConfig(rank=4, alpha=8.0),
        eval_config=EvalConfig(
            batch_size=2, sampling=SamplingParams(max_generation_steps=4)
        ),
        num_examples=2,
        show_progress=False,
    )
    merged = sweep(
        lora_paths=checkpoints,
        output_dir=tmp_path / "merged",
        include_base=False,
        load_lora_fn=functools.partial(load_lora, merge=True),
    )
    (attached,) = sweep(
        lora_paths=checkpoints[:1], output_dir=tmp_path / "attached", include_base=False
    )
    assert [r.run_info["lora_mode"] for r in merged] == ["custom", "custom"]
    assert attached.run_info["lora_mode"] == "attached"
    # Between two LoRA runs, how each was applied is a setting they differ in.
    (paired,) = compare_runs([attached, merged[0]], num_resamples=10).paired
    assert paired.differing_settings == ["lora_mode"]


def test_a_checkpoint_that_does_not_fit_is_refused_before_anything_runs(tmp_path):
    """Each checkpoint's factor shapes, read from its metadata alone, are
    checked against the model before any run (the base model's included)
    starts: a wrong rank is named with its checkpoint."""
    hf_config = transformers.AutoConfig.from_pretrained(TINY_MODEL_DIR)
    checkpoints = []
    for name, rank in (("fits", 4), ("other", 8)):
        params = tmp_path / name / "actor" / "5" / "model_params"
        write_tunix_checkpoint(params, random_factors(hf_config, rank))
        checkpoints.append(str(params.parent.parent))
    sweep = functools.partial(
        evaluate_checkpoints,
        "gemma3-tiny",
        None,
        lora_config=LoraConfig(rank=4, alpha=8.0),
        eval_config=EvalConfig(),
        output_dir=tmp_path / "out",
    )
    with pytest.raises(
        CheckpointError,
        match=f"^{re.escape(str(params))}: LoRA rank mismatch: LoraConfig rank=4"
        " .*but checkpoint has rank 8",
    ):
        sweep(lora_paths=checkpoints)
    # A checkpoint of a wider model (twice the hidden size).
    wider = copy.deepcopy(hf_config)
    wider.hidden_size *= 2
    params = tmp_path / "wider" / "actor" / "5" / "model_params"
    write_tunix_checkpoint(params, random_factors(wider, 4))
    with pytest.raises(
        CheckpointError,
        match=f"^{re.escape(str(params))}: LoRA shape mismatch: .* a checkpoint for"
        " another model size\\?",
    ):
        sweep(lora_paths=[checkpoints[0], str(params.parent.parent)])
    assert not (tmp_path / "out").exists()


def test_sweep_refuses_checkpoints_sharing_a_tag(tmp_path):
    same_step = [fake_checkpoint(tmp_path / name / "run", 100) for name in ("a", "b")]
    paths = " and ".join(map(str, same_step))
    with pytest.raises(ValueError, match=f"^Checkpoints {paths} would share run tag"):
        evaluate_checkpoints(
            "gemma3-tiny",
            None,
            [str(c) for c in same_step],
            LoraConfig(),
            EvalConfig(),
            tmp_path / "out",
            load_lora_fn=lambda *a, **k: pytest.fail("nothing may load"),
        )
    assert not (tmp_path / "out").exists()


def test_a_bad_baseline_is_refused_before_anything_is_evaluated(tmp_path):
    hf_config = transformers.AutoConfig.from_pretrained(TINY_MODEL_DIR)
    actor = tmp_path / "a" / "run" / "actor"
    write_tunix_checkpoint(
        actor / "100" / "model_params", random_factors(hf_config, 16)
    )
    checkpoint = str(actor)
    proc = run_compare(
        f"--lora_checkpoints={checkpoint}",
        "--baseline=5",
        f"--output_dir={tmp_path / 'out'}",
    )
    assert proc.returncode == 1
    # The checkpoint records no alpha (as Tunix's), and none was given.
    warning, error = proc.stderr.strip().splitlines()
    assert warning.startswith(
        f"warning: {checkpoint}/100/model_params records no LoRA alpha (Tunix"
        " writes none): using alpha 2, the default;"
    )
    assert error == "error: Baseline index 5 out of range for 2 runs."
    assert not list((tmp_path / "out").glob("*"))
    with pytest.raises(ValueError, match="Baseline 'nope': no run has that tag"):
        evaluate_checkpoints(
            "gemma3-tiny",
            None,
            [checkpoint],
            LoraConfig(rank=16),
            EvalConfig(),
            tmp_path / "api",
            load_lora_fn=lambda *a, **k: pytest.fail("nothing may load"),
            check_tags=lambda tags: check_baseline(tags, "nope"),
        )
    assert not (tmp_path / "api").exists()


def test_a_limit_past_the_context_is_refused_before_anything_loads(tmp_path):
    checkpoint = str(fake_checkpoint(tmp_path / "a" / "run", 100))
    with pytest.raises(ValueError, match="max_generation_steps=8192 .* no room"):
        evaluate_checkpoints(
            "gemma3-tiny",
            None,
            [checkpoint],
            LoraConfig(rank=16, alpha=16.0),
            EvalConfig(sampling=SamplingParams(max_generation_steps=8192)),
            tmp_path / "out",
            load_lora_fn=lambda *a, **k: pytest.fail("nothing may load"),
        )
    assert not (tmp_path / "out").exists()


def test_sweep_split_over_processes_equals_one_process(tmp_path):
    """Process 1 of 2 evaluates run 1 (of base, a, b); process 0 evaluates runs
    0 and 2, then reads run 1 from the shared folder: all as one process."""
    checkpoints = [str(fake_checkpoint(tmp_path / name, 100)) for name in "ab"]

    def perturbing_load_lora(model, path, config, *, merge=True):
        """Perturbs one weight by noise drawn from the checkpoint's path."""
        perturb_down_proj(model, jax.random.key(sum(map(ord, path))))
        return model

    def sweep(out, **kwargs):
        return evaluate_checkpoints(
            "gemma3-tiny",
            None,
            checkpoints,
            LoraConfig(),
            EvalConfig(batch_size=2, sampling=SamplingParams(max_generation_steps=8)),
            out,
            num_examples=2,
            show_progress=False,
            load_lora_fn=perturbing_load_lora,
            **kwargs,
        )

    alone = sweep(tmp_path / "alone")
    second = sweep(tmp_path / "shared", process_index=1, num_processes=2)
    assert [r.tag for r in second] == [alone[1].tag]
    assert not (tmp_path / "shared" / f"summary_{alone[2].tag}.json").exists()
    first = sweep(tmp_path / "shared", process_index=0, num_processes=2)
    assert [r.tag for r in first] == [r.tag for r in alone]
    assert [r.rollouts for r in first] == [r.rollouts for r in alone]
    assert len({tuple(x["response"] for x in r.rollouts) for r in alone}) == 3


def test_several_runs_against_one_baseline_are_corrected_for_together():
    """Each candidate is significant at 5% alone (McNemar p = 2/2^7 and
    2/2^6 = 0.03125 on 10 problems the baseline all got wrong); tested
    three at once, Holm's correction keeps the first alone."""
    base = single([0] * 10, tag="base")
    runs = [base] + [
        single([1] * right + [0] * (10 - right), tag=tag)
        for tag, right in (("seven", 7), ("six", 6), ("six_too", 6))
    ]
    report = compare_runs(runs, baseline=0)
    assert [p.significant for p in report.paired] == [True, True, True]
    assert [p.significant_holm for p in report.paired] == [True, False, False]
    assert (
        "3 runs are each tested against the baseline, so one may pass at 5% by"
        " chance alone. With Holm's correction for the 3 tests, significant at 5%:"
        " #1 `seven`." in report.to_markdown()
    )
    (alone,) = compare_runs(runs[:3:2], baseline=0).paired
    assert alone.significant_holm == alone.significant is True
    assert "Holm" not in compare_runs(runs[:3:2], baseline=0).to_markdown()


def test_runs_of_several_samples_are_also_paired_over_all_samples():
    """McNemar pairs sample 0; the mean difference pairs each question's share
    of correct samples (greedy baseline: k = 1), here +7/16 - 1/4 points."""
    sampled = sampled_run()
    greedy = single([1, 0, 0, 0], tag="greedy")
    report = compare_runs([greedy, sampled], baseline=0, num_resamples=2000)
    (p,) = report.paired
    shares = np.mean(GRID, axis=1)
    assert p.first_sample_only and p.num_common == 4
    assert p.mean_difference.diff == pytest.approx(shares.mean() - 1 / 4)
    assert p.mean_difference.low <= p.mean_difference.diff <= p.mean_difference.high
    assert (
        f"- #1 `k4`: {100 * (shares.mean() - 1 / 4):+.2f} points, 95% paired"
        " bootstrap interval" in report.to_markdown()
    )
    (greedy_pair,) = compare_runs([greedy, single([1, 1, 0, 0])]).paired
    assert greedy_pair.mean_difference is None


def test_runs_right_on_the_same_problems_get_a_point_interval_said_so():
    """No discordant problem: every resample gives the same difference, which
    the report says instead of a bare [+0.00, +0.00]."""
    same = compare_runs([single([0, 1, 0], tag="a"), single([0, 1, 0], tag="b")])
    (p,) = same.paired
    assert p.difference.low == p.difference.high == 0
    assert "the interval is a point, not certainty" in same.to_markdown()
    other = compare_runs([single([0, 1, 0], tag="a"), single([1, 1, 0], tag="b")])
    assert "not certainty" not in other.to_markdown()
