"""End to end, one GSM8K task three ways on a tiny random Gemma 3 in float32:
lm-eval's own hf model, our preset through our eval script, and lm-eval
through our backend's command line. Same prompts, same text cut at the same
place, same filtered answers, same exact_match.

The task is lm-eval's zero-shot one (short prompts keep transformers'
generation on 2 CPU cores to seconds); tests/eval/test_lm_eval_tasks.py
proves every preset's prompts equal lm-eval's.
"""

import json
import os
import shutil
import subprocess
import sys

import lm_eval
import pytest
import torch
import transformers
from eval.test_eval_scripts import read_outputs, run_script
from hf_models import make_tiny_hf_model
from lm_eval.tasks import TaskManager
from lm_eval_tasks import local_name, write_local_tasks

from gsm8k_jax.eval.lm_eval_filters import FLEXIBLE_EXTRACT, INVALID, STRICT_MATCH
from gsm8k_jax.models.specs import TINY_MODEL_DIR

TASK = "gsm8k_cot_zeroshot"
NUM_PROBLEMS = 16
MAX_GEN_TOKS = 32
FILTERS = (STRICT_MATCH, FLEXIBLE_EXTRACT)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random transformers Gemma 3 with the bundled model's tokenizer, its
    digits' embeddings (tied to the output layer) scaled up so that its noise
    holds numbers for the filters to find."""
    path = tmp_path_factory.mktemp("hf")
    model = make_tiny_hf_model(path, vocab_size=4096)
    tokenizer = transformers.AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    digits = tokenizer.convert_tokens_to_ids([str(d) for d in range(10)])
    with torch.no_grad():
        model.model.embed_tokens.weight[digits] *= 2.0
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(TINY_MODEL_DIR / name, path / name)
    return path


def by_doc(samples):
    """lm-eval's logged samples as {doc_id: {filter: sample}}."""
    docs = {}
    for sample in samples:
        docs.setdefault(sample["doc_id"], {})[sample["filter"]] = sample
    return docs


def prompt_of(sample):
    """The prompt sent, from a samples file's record or an in-memory one."""
    arguments = sample["arguments"]
    if isinstance(arguments, dict):
        return arguments["gen_args_0"]["arg_0"]
    return arguments[0][0]


def test_hf_our_preset_and_our_backend_agree(model_dir, tmp_path):
    tasks = write_local_tasks(tmp_path / "tasks")
    # Our two runs compile the same programs: the second reads them from disk.
    env = os.environ | {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
    }
    # Our preset through our eval script.
    ours = run_script(
        f"--task={TASK}",
        "--model.model_name=gemma3-1b-pt",
        f"--model.model_path={model_dir}",
        "--model.dtype=float32",
        f"--num_examples={NUM_PROBLEMS}",
        f"--max_generation_steps={MAX_GEN_TOKS}",
        "--batch_size=8",
        f"--output_dir={tmp_path / 'ours'}",
        env=env,
    )
    # lm-eval through our backend, as a user runs it (a process of its own).
    backend_out = tmp_path / "backend"
    backend = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gsm8k_jax.lm_eval_backend",
            "run",
            "--model",
            "gsm8k_jax",
            "--model_args",
            f"model_name=gemma3-1b-pt,model_path={model_dir},dtype=float32",
            "--tasks",
            local_name(TASK),
            "--include_path",
            str(tasks),
            "--limit",
            str(NUM_PROBLEMS),
            "--gen_kwargs",
            f"max_gen_toks={MAX_GEN_TOKS}",
            "--batch_size",
            "4",
            "--log_samples",
            "--output_path",
            str(backend_out),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    # lm-eval's hf model (what `lm_eval --model hf` runs; built-in tasks not
    # indexed), with the <bos> a Gemma setup needs.
    hf = lm_eval.simple_evaluate(
        model="hf",
        model_args={
            "pretrained": str(model_dir),
            "dtype": "float32",
            "add_bos_token": True,
        },
        tasks=[local_name(TASK)],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        limit=NUM_PROBLEMS,
        gen_kwargs={"max_gen_toks": MAX_GEN_TOKS},
        batch_size=1,
        device="cpu",
        log_samples=True,
    )
    output, _ = backend.communicate(timeout=600)
    assert backend.returncode == 0, output

    (samples_file,) = backend_out.rglob("samples_*.jsonl")
    (results_file,) = backend_out.rglob("results_*.json")
    backend_docs = by_doc(map(json.loads, samples_file.read_text().splitlines()))
    backend_results = json.loads(results_file.read_text())
    assert backend_results["config"]["gsm8k_jax_model"] == "gemma3-1b-pt"
    hf_docs = by_doc(hf["samples"][local_name(TASK)])
    rollouts_text, summary = read_outputs(
        tmp_path / "ours", f"gemma3-1b-pt_base_{TASK}_bs8"
    )
    rollouts = [json.loads(line) for line in rollouts_text.splitlines()]

    assert [r["id"] for r in rollouts] == sorted(hf_docs) == sorted(backend_docs)
    for r in rollouts:
        hf_doc, backend_doc = hf_docs[r["id"]], backend_docs[r["id"]]
        for name in FILTERS:
            for sample in (hf_doc[name], backend_doc[name]):
                assert prompt_of(sample) == r["prompt"]
                assert sample["resps"] == [[r["response"]]]
                answer = r["extracted_answers"][name]
                assert sample["filtered_resps"] == [answer or INVALID]
                assert bool(sample["exact_match"]) == r["correct_by_method"][name]
    for name in FILTERS:
        for key in (f"exact_match,{name}", f"exact_match_stderr,{name}"):
            expected = hf["results"][local_name(TASK)][key]
            assert summary["lm_eval"][key] == expected
            assert backend_results["results"][local_name(TASK)][key] == expected
        # The script's last line gives lm-eval's own figures.
        expected = hf["results"][local_name(TASK)][f"exact_match,{name}"]
        assert f"{name} {expected:.2%}" in ours.stdout.splitlines()[-1]
    # Noise, but not only failures: some answers are numbers.
    assert any(r["extracted_answers"][FLEXIBLE_EXTRACT] for r in rollouts)
