"""lm-eval's strict-match and flexible-extract on our runs: a corpus of tricky
responses scored by lm-eval 0.4.13's own filters and exact_match, and by
ours (per response, and aggregated with its standard error)."""

import pytest
import transformers
from lm_eval.api.metrics import mean, mean_stderr
from lm_eval_tasks import lm_eval_requests, lm_eval_task_objects, write_local_tasks

from gsm8k_jax.eval.data import load_gsm8k
from gsm8k_jax.eval.lm_eval_filters import FLEXIBLE_EXTRACT, INVALID, STRICT_MATCH
from gsm8k_jax.eval.scoring import rescore, summarize
from gsm8k_jax.eval.stopping import (
    cut_at_stop_sequences,
    stop_token_sequences,
    with_eos_text,
)
from gsm8k_jax.eval.tasks import TASKS, lm_eval_scores
from gsm8k_jax.models.specs import TINY_MODEL_DIR

# {g}: the problem's gold answer; {G}: the same with thousands separators
# (placed where the gold answer has thousands).
CORPUS = [
    "#### {g}",
    "#### ${g}",
    "#### {G}",
    "#### {g}.",
    "#### {g},",
    "#### {g}.00",
    "#### {g}.5",
    "#### 0{g}",
    "####{g}",
    "#### -{g}",
    "#### {g} dollars",
    "#### 7\n#### {g}",
    "#### {g}\n#### 7",
    "The answer is {g}.",
    "The answer is -{g}.",
    "The answer is {g}",
    "The answer is ${g}.",
    "The answer is {G}.",
    "THE ANSWER IS {g}.",
    "So she pays $1,000.50 and keeps {g}.",
    "She keeps {g} apples.",
    "She keeps -{g} apples",
    "Answer: {g}!",
    "\\boxed{{{g}}}",
    "(({g}))",
    "It takes 1.5 hours, so {g}...",
    "...",
    "no number here",
    "",
    "{g}\n\n#### {G}\n\nQuestion: what is 3+4?",
]


@pytest.fixture(scope="module")
def lm_eval_tasks(tmp_path_factory):
    return lm_eval_task_objects(write_local_tasks(tmp_path_factory.mktemp("tasks")))


def responses(examples):
    return [
        template.format(g=e.gold, G=f"{int(e.gold):,}")
        for template, e in zip(CORPUS, examples, strict=True)
    ]


def lm_eval_scored(task_object, texts):
    """lm-eval's filtered answers and exact_match of each response, per filter."""
    requests = lm_eval_requests(task_object, len(texts), tokenizer=None, chat=False)
    for request, text in zip(requests, texts, strict=True):
        request.resps = [text]
    task_object.apply_filters()
    docs = list(task_object.eval_docs)
    return {
        name: [
            (
                r.filtered_resps[name],
                task_object.process_results(docs[r.doc_id], [r.filtered_resps[name]])[
                    "exact_match"
                ],
            )
            for r in requests
        ]
        for name in (STRICT_MATCH, FLEXIBLE_EXTRACT)
    }


@pytest.mark.parametrize("name", ["gsm8k", "gsm8k_cot", "gsm8k_cot_zeroshot"])
def test_our_lm_eval_scores_are_lm_evals(name, lm_eval_tasks):
    task = TASKS[name]
    examples = load_gsm8k(num_examples=len(CORPUS))
    texts = responses(examples)
    expected = lm_eval_scored(lm_eval_tasks[name], texts)

    ours = [lm_eval_scores(task, t, e.answer) for t, e in zip(texts, examples)]
    for filter_name, scored in expected.items():
        assert [
            (INVALID if s[filter_name][0] is None else s[filter_name][0]) for s in ours
        ] == [answer for answer, _ in scored]
        assert [s[filter_name][1] for s in ours] == [bool(m) for _, m in scored]
    # Both filters matter: each gets some right and some wrong.
    for scored in expected.values():
        assert 0 < sum(m for _, m in scored) < len(CORPUS)

    rollouts = [
        {
            "id": e.id,
            "sample_index": 0,
            "gold": e.gold,
            "reference_solution": e.answer,
            "response": t,
            "finish_reason": "eos",
            "num_tokens": 1,
        }
        for t, e in zip(texts, examples)
    ]
    summary = summarize(rollouts, 1, "strict", task)
    assert summary["lm_eval"]["task"] == name
    for filter_name, scored in expected.items():
        scores = [m for _, m in scored]
        assert summary["lm_eval"][f"exact_match,{filter_name}"] == mean(scores)
        assert summary["lm_eval"][f"exact_match_stderr,{filter_name}"] == mean_stderr(
            scores
        )
        assert summary["by_method"][filter_name]["correct"] == sum(scores)
    # Our strict extraction reads each task's own answer format, numerically:
    # wherever lm-eval's strict-match is right, so is ours.
    ours_strict = [
        r["correct_by_method"]["strict"] for r in rescore(rollouts, "strict", task)
    ]
    assert all(
        ours
        for ours, (_, lm_eval) in zip(ours_strict, expected[STRICT_MATCH])
        if lm_eval
    )
    assert sum(ours_strict) == summary["by_method"]["strict"]["correct"] > 0


@pytest.mark.parametrize(
    "text",
    ["a Question: b", "aQ:b Question: c", "x</s>y<|im_end|>z", "<|im_end|>", "no stop"],
)
def test_stop_sequences_cut_where_lm_eval_cuts(text):
    from lm_eval.models.utils import postprocess_generated_text

    for stops in (["Question:", "</s>", "<|im_end|>"], ["Q:", "Question:", ""]):
        assert cut_at_stop_sequences(text, stops) == postprocess_generated_text(
            text, stops, None
        )


@pytest.mark.parametrize("name", ["gsm8k", "gsm8k_cot", "gsm8k_cot_zeroshot"])
def test_generation_stops_on_tokens_that_write_a_stop_string(name):
    """Each task's stop strings give token sequences that decode (as
    completions are decoded) to text holding one of them; a text cut after
    such a sequence is cut where the whole text is."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    stops = with_eos_text(TASKS[name].until, tokenizer)
    sequences = stop_token_sequences(stops, tokenizer)
    assert any(tokenizer.decode(s) == TASKS[name].until[0] for s in sequences)
    for sequence in sequences:
        text = tokenizer.decode(sequence, skip_special_tokens=True)
        assert any(stop in text for stop in stops)
        before = "Janet has 3 eggs. The answer is 3.\n\n"
        assert cut_at_stop_sequences(before + text, stops) == cut_at_stop_sequences(
            before + text + "Question: more\nQ: text", stops
        )


@pytest.mark.parametrize("stops", [["ab", "bc"], ["b", "abc"], ["Q:", ":\n"]])
def test_no_early_stop_where_one_stop_string_could_overrun_another(stops):
    """Stopping at `ab` in `abc` would keep text that a cut at `bc` removes."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    assert stop_token_sequences(stops, tokenizer) == ()
    # A string that overlaps itself is cut at its first occurrence either way.
    assert stop_token_sequences(["\n\n", "Q:"], tokenizer)
