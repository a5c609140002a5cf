"""lmms-eval end to end: tiny saved LLaVA and Qwen2.5-VL checkpoints on a tiny local task, through lmms-eval's CLI.

Needs the eval extra (``pip install -e '.[test,eval]'``); skipped without lmms-eval. ``.ci/run`` runs this
module in its own virtual environment (``-m eval``). Each family runs unrouted, keep-all, and the release's
``*ours_vs_pdrop_avg64`` schedule under both policies (8 CLI runs, two at a time).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

lmms_eval = pytest.importorskip("lmms_eval")

from rerouting.eval.tiny import TASKS, save_tiny_llava, save_tiny_qwen, write_tiny_task  # noqa: E402
from rerouting.reference import PRESETS, RoutingError  # noqa: E402
from rerouting.reference.budget import schedule_trace  # noqa: E402

pytestmark = [pytest.mark.eval]
LMMS_EVAL = Path(sys.executable).with_name("lmms-eval")
FAMILIES = {"llava": ("ours_vs_pdrop_avg64", 32), "qwen": ("qwen25vl_ours_vs_pdrop_avg64", 28)}
RUNS = ("none", "keepall", "reroute", "remove")


def _env(root: Path) -> dict[str, str]:
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return {**os.environ, **offline, "HF_HOME": str(root / "hf"), "OMP_NUM_THREADS": "1"}


def _model_args(folder: Path, run: str, preset: str, keepall: Path) -> str:
    schedule = {"none": "none", "keepall": str(keepall)}.get(run, preset)
    policy = f",policy={run}" if run in ("reroute", "remove") else ""
    return f"pretrained={folder},schedule={schedule}{policy}"


def _cli(root: Path, family: str, run: str) -> dict:
    preset, _ = FAMILIES[family]
    out = root / "out" / f"{family}-{run}"
    command = [
        str(LMMS_EVAL), "--model", "rerouting",
        "--model_args", _model_args(root / family, run, preset, root / "keepall.yaml"),
        "--tasks", ",".join(TASKS), "--include_path", str(root / "task"),
        "--batch_size", "3", "--log_samples", "--output_path", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=root, env=_env(root), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    results = json.loads(next(out.rglob("*_results.json")).read_text())
    samples = {
        task: [
            json.loads(line) for line in next(out.rglob(f"*_samples_{task}.jsonl")).read_text().splitlines()
        ]
        for task in TASKS
    }
    return {"results": results, "samples": samples, "stdout": done.stdout}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[tuple[str, str], dict]:
    root = tmp_path_factory.mktemp("lmms")
    save_tiny_llava(root / "llava")
    save_tiny_qwen(root / "qwen")
    write_tiny_task(root / "task")
    (root / "keepall.yaml").write_text("layers: [2, 9]\nkeep: [1.0, 1.0]\n")
    jobs = [(family, run) for family in FAMILIES for run in RUNS]
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = pool.map(lambda job: _cli(root, *job), jobs)
        return dict(zip(jobs, done))


def _answers(run: dict) -> dict[str, list[str]]:
    return {task: [s["filtered_resps"] for s in samples] for task, samples in run["samples"].items()}


@pytest.mark.spec("routing.equiv.keep-all")
@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_answers_equal_the_unrouted_models(runs, family):
    unrouted, keep_all = runs[family, "none"], runs[family, "keepall"]
    assert _answers(keep_all) == _answers(unrouted)
    for task in TASKS:  # and the budgets agree: keep ratio 1 runs every visual token at every layer
        for a, b in zip(unrouted["samples"][task], keep_all["samples"][task]):
            ra, rb = a["token_counts"][0]["routing"], b["token_counts"][0]["routing"]
            assert (
                ra["visual_per_layer"]
                == rb["visual_per_layer"]
                == [ra["num_visual"]] * len(ra["visual_per_layer"])
            )
            assert ra["tflops"] == rb["tflops"] and ra["kv_bytes"] == rb["kv_bytes"]


@pytest.mark.spec("budget.active-counts")
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("policy", ["reroute", "remove"])
def test_budgets_are_logged_per_sample_and_averaged(runs, family, policy):
    preset, num_layers = FAMILIES[family]
    run = runs[family, policy]
    config = PRESETS[preset].with_policy(policy)
    every = []
    for task in TASKS:
        logged = [s["token_counts"][0] for s in run["samples"][task]]
        assert len(logged) == 4
        for counts in logged:
            record = counts["routing"]
            assert record["schedule"] == f"{preset}/{policy}"
            assert counts["input_tokens"] == record["num_text"] + record["num_visual"]
            expected = schedule_trace(
                config, num_text=record["num_text"], num_visual=record["num_visual"], num_layers=num_layers
            ).samples[0]
            assert record["visual_per_layer"] == list(expected.layer_visual_counts)
            assert record["avg_T"] == pytest.approx(sum(record["visual_per_layer"]) / num_layers)
            assert record["avg_T"] < record["num_visual"] and record["avg_T_nominal"] is not None
            assert record["tflops"] > 0 and record["tflops_probe"] > 0 and record["kv_bytes"] > 0
            every.append(record)
        summary = run["results"]["throughput"]
        mean = sum(c["routing"]["avg_T"] for c in logged) / len(logged)
        assert summary[f"avg_T[{task}]"] == pytest.approx(mean)
    summary = run["results"]["throughput"]
    assert summary["avg_T"] == pytest.approx(sum(r["avg_T"] for r in every) / len(every))
    kv = sum(r["kv_bytes"] for r in every) / len(every) / 2**20
    assert summary["avg_kv_mib"] == pytest.approx(kv)
    assert re.search(r"\|avg_T\s*\|", run["stdout"]), "the printed throughput summary lacks avg_T"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("run", RUNS)
def test_metrics_are_computed_and_boxes_parsed(runs, family, run):
    result = runs[family, run]
    metrics = result["results"]["results"]
    assert {"refcoco_IoU,none", "refcoco_ACC@0.5,none"} <= set(metrics["rerouting_tiny_rec"])
    assert {"pope_accuracy,none", "pope_f1_score,none"} <= set(metrics["rerouting_tiny_pope"])
    for sample in result["samples"]["rerouting_tiny_rec"]:
        assert len(sample["refcoco_IoU"]["pred"]) == 4  # the task parsed what the model handed it
        grounding = sample["token_counts"][0]["routing"].get("grounding")
        if family == "llava":  # protocol lmms: the task's prompt and parser, nothing rewritten
            assert grounding is None
        else:  # protocol qwen: the Nüwa prompt, the answer parsed into the task's normalised form
            expr = sample["refcoco_IoU"]["answer"]  # the referring expression of the document
            assert (
                grounding["prompt"]
                == f"Locate {expr} in this image and output the bbox coordinates in JSON format."
            )
            assert grounding["protocol"] == "qwen" and "raw" in grounding
            box = grounding["box"]
            assert sample["filtered_resps"] == (
                "" if box is None else "[" + ", ".join(f"{v:.4f}" for v in box) + "]"
            )


def test_the_model_is_registered_through_the_entry_point():
    from lmms_eval.models import get_model

    from rerouting.eval.model import Rerouting

    assert get_model("rerouting") is Rerouting


def test_bad_model_args_are_named(tmp_path):
    from rerouting.eval.model import Rerouting

    with pytest.raises(RoutingError, match=r"pretrained='/nowhere' is not a local checkpoint folder"):
        Rerouting(pretrained="/nowhere", schedule="none")
    folder = save_tiny_llava(tmp_path / "llava", num_layers=4)
    with pytest.raises(RoutingError, match=r"unknown model argument\(s\) \['schedul'\]"):
        Rerouting(pretrained=str(folder), schedul="none")
    with pytest.raises(RoutingError, match=r"schedule='ours_vs_pdrop_avg64' does not fit this model"):
        Rerouting(pretrained=str(folder), schedule="ours_vs_pdrop_avg64")
    with pytest.raises(RoutingError, match=r"batch_size=0 is not an integer >= 1"):
        Rerouting(pretrained=str(folder), schedule="none", batch_size=0)
    with pytest.raises(RoutingError, match=r"grounding='box'"):
        Rerouting(pretrained=str(folder), schedule="none", grounding="box")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(RoutingError, match=r"is a 'bert' checkpoint; supported: llava, qwen2_5_vl"):
        Rerouting(pretrained=str(tmp_path / "bert"), schedule="none")


def test_copied_constants_match_lmms_eval():
    from lmms_eval.tasks.refcoco.utils_rec import refcoco_bbox_rec_doc_to_text

    from rerouting.eval.grounding import LMMS_REC_PROMPT
    from rerouting.eval.inputs import VICUNA_CHAT_TEMPLATE

    assert refcoco_bbox_rec_doc_to_text({"answer": "the cat"}) == LMMS_REC_PROMPT + "the cat"
    source = (Path(lmms_eval.__file__).parent / "models" / "simple" / "llava_hf.py").read_text()
    assert f'VICUNA_CHAT_TEMPLATE = "{VICUNA_CHAT_TEMPLATE}"' in source


def _requests(task: str, docs: list[dict], gen_kwargs: dict) -> list:
    from lmms_eval.api.instance import Instance

    from rerouting.eval.grounding import LMMS_REC_PROMPT

    def visual(doc):
        return [doc["image"]]

    return [
        Instance(
            request_type="generate_until",
            arguments=(LMMS_REC_PROMPT + doc["expr"], dict(gen_kwargs), visual, i, task, "test"),
            idx=0,
            metadata={"task": task, "doc_id": i, "repeats": 1},
        )
        for i, doc in enumerate(docs)
    ]


@pytest.mark.spec("layout.batch-independence")
@pytest.mark.parametrize("family", FAMILIES)
def test_batches_answer_as_batch_one(tmp_path, family):
    """In process: the same requests at batch 1 and batch 3 give the same answers and budgets."""
    import torch

    from rerouting.eval.model import Rerouting
    from rerouting.eval.tiny import _SCENES, _image

    save = save_tiny_llava if family == "llava" else save_tiny_qwen
    folder = save(tmp_path / family)
    docs = [
        {"image": _image(b, c, x, y, w, h), "expr": f"the {n} rectangle"} for b, n, c, x, y, w, h in _SCENES
    ]
    answers = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for batch_size in (1, 3):
            model = Rerouting(pretrained=str(folder), schedule=FAMILIES[family][0], batch_size=batch_size)
            model.task_dict = {"tiny": {"test": docs}}
            results = model.generate_until(_requests("tiny", docs, {"max_new_tokens": 6, "until": ["\n"]}))
            answers[batch_size] = [(r.text, r.token_counts.to_dict()) for r in results]
    finally:
        torch.set_num_threads(threads)
    assert answers[1] == answers[3]
    assert all(counts["routing"]["schedule"].endswith("/reroute") for _, counts in answers[3])
