"""``rerouting audit`` (docs/audit.md): the default run, published numbers through the command line, the
solver, schedule files, ``--model`` folders, LaTeX and argument errors.

Published numbers are pinned at the precision the papers print them (spec/budget.md).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess

import pytest

from rerouting.conformance import audit
from rerouting.reference.archs import ArchSpec
from rerouting.reference.presets import PRESETS
from rerouting.reference.tiny import tiny_llava, tiny_llava_config

T = 1e12
KiB = 1024
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
FAST = ["-q", "--no-trace", "--no-plots"]


def run_cli(tmp_path, *argv, name="out"):
    """``main([...])`` into ``tmp_path/name``; returns (status, report dict or None)."""
    out = tmp_path / name
    status = audit.main([*argv, "--out", str(out)])
    path = out / "report.json"
    return status, (json.loads(path.read_text()) if status == 0 else None)


def run_of(report, schedule, policy=None):
    entry = next(s for s in report["schedules"] if s["name"] == schedule)
    policy = policy or entry["native_policy"]
    return next(r for r in entry["runs"] if r["policy"] == policy)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """``rerouting audit`` with no argument, run in a fresh folder: writes ./rerouting-audit/."""
    cwd = tmp_path_factory.mktemp("default")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        status = audit.main([])
    out = cwd / audit.DEFAULT_OUT
    return status, out, json.loads((out / "report.json").read_text())


# ---------------------------------------------------------------------------------------------
# The default run
# ---------------------------------------------------------------------------------------------


@pytest.mark.spec("budget.avg-tokens", "budget.active-counts", "budget.flops.true", "budget.kv.bytes")
def test_default_run_writes_every_file(default_run):
    status, out, report = default_run
    assert status == 0
    for name in ("report.md", "report.json", "report.tex", "report-table.tex"):
        assert (out / name).stat().st_size > 1000, name
    if HAVE_MATPLOTLIB:
        for name in ("visual_tokens_per_layer.png", "trace_heatmap.png"):
            data = (out / name).read_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, name
        assert report["files"]["staircase"] == "visual_tokens_per_layer.png"
    markdown = (out / "report.md").read_text()
    for section in ("## Flags", "## Summary", "## FLOPs by convention", "## Probe overhead per decision"):
        assert section in markdown
    for section in ("## KV cache", "## LM head", "## Matched-budget solver", "## Traced run"):
        assert section in markdown
    for source in ("arXiv 2403.06764", "arXiv 2410.17247", "arXiv 2602.02951"):  # each convention's source
        assert source in markdown


@pytest.mark.spec("budget.avg-tokens", "budget.flops.true", "budget.kv.entries", "budget.kv.decode-growth")
def test_default_run_json_schema(default_run):
    _, _, report = default_run
    assert report["schema_version"] == audit.SCHEMA_VERSION == "1.0"
    for key in ("generator", "model", "layout", "kv_dtype", "policies", "conventions", "dense", "decode"):
        assert key in report
    for key in ("convention_definitions", "schedules", "flags", "solver", "trace", "notes", "files"):
        assert key in report
    assert report["generator"]["command"] == "rerouting audit"
    assert report["model"]["name"] == "llava-1.5-7b" and report["model"]["source"] == "embedded"
    assert report["model"]["arch"]["num_layers"] == 32
    assert report["layout"] == {
        "num_visual": 576,
        "num_visual_source": "config image_seq_length",
        "num_text": audit.DEFAULT_TEXT,
        "num_text_source": "default",
        "visual_start": 0,
        "batch": 1,
        "image": None,  # --image-size: tests/test_audit_image_size.py
    }
    assert report["policies"] == ["remove", "reroute"] and report["kv_dtype"] == "float16"
    assert set(report["convention_definitions"]) == {"true", "fastv", "pdrop", "nuwa"}
    for info in report["convention_definitions"].values():
        assert info["source"] and info["rule"].startswith("budget.flops.")
    names = [s["name"] for s in report["schedules"]]
    assert names == [f"{f}_avg{t}" for t in (192, 128, 64) for f in audit_families()]
    run = run_of(report, "fastv_K3_avg192")
    for key in ("visual_counts", "avg_visual_tokens", "decisions", "flops", "probe_flops", "lm_head_flops"):
        assert key in run
    assert run["visual_counts"] == [576] * 3 + [152] * 29
    assert run["avg_visual_tokens"]["realized"] == 191.75
    assert round(run["avg_visual_tokens"]["nominal"], 2) == 192.02
    assert set(run["flops"]) == {"true", "fastv", "pdrop", "nuwa"}
    assert all(isinstance(v, int) for v in run["flops"].values())
    # KV: M + n_vis(l) entries per layer, 16 KiB each in fp16; 512 KiB per generated token
    assert run["kv"]["entries_per_layer"] == [64 + v for v in run["visual_counts"]]
    assert run["kv"]["bytes"] == sum(run["kv"]["entries_per_layer"]) * 16 * KiB
    assert run["kv"]["bytes_by_dtype"]["float32"] == 2 * run["kv"]["bytes"]
    assert report["dense"]["kv"]["bytes"] == 32 * 640 * 16 * KiB
    assert report["decode"]["kv_growth_bytes_per_token"] == 512 * KiB
    assert report["dense"]["lm_head_flops"] == 2 * 640 * 4096 * 32064  # apart from the decoder
    assert run["reduction_vs_dense"]["kv_bytes"] == pytest.approx(
        1 - run["kv"]["bytes"] / (32 * 640 * 16 * KiB)
    )


def audit_families():
    return ("fastv_K3", "ours_vs_fastv", "pdrop_earlyL2", "ours_vs_pdrop")


@pytest.mark.spec("budget.avg-tokens", "schedule.presets")
def test_default_run_flags_the_64_tier_pdrop_family_only(default_run):
    _, out, report = default_run
    flagged = {(f["schedule"], f["policy"]) for f in report["flags"]}
    assert flagged == {
        (name, p) for name in ("pdrop_earlyL2_avg64", "ours_vs_pdrop_avg64") for p in ("remove", "reroute")
    }
    for family in ("fastv_K3", "ours_vs_fastv"):
        for tier in (192, 128, 64):
            for run in next(s for s in report["schedules"] if s["name"] == f"{family}_avg{tier}")["runs"]:
                assert run["label_check"]["flagged"] is False
    pdrop64 = run_of(report, "pdrop_earlyL2_avg64")
    assert round(pdrop64["avg_visual_tokens"]["realized"], 2) == 80.44
    assert round(run_of(report, "ours_vs_pdrop_avg64")["avg_visual_tokens"]["realized"], 2) == 84.12
    assert pdrop64["label_check"]["realized_deviation"] > 0.25
    assert "OFF-LABEL" in (out / "report.md").read_text()


@pytest.mark.spec("budget.flops.probe", "budget.flops.true", "budget.kv.bytes")
def test_default_run_remove_vs_reroute(default_run):
    """Same per-layer counts and decoder FLOPs; reroute probes all M + N tokens, remove only text + pool."""
    _, _, report = default_run
    for tier in (192, 128, 64):
        fastv = run_of(report, f"fastv_K3_avg{tier}")
        ours = run_of(report, f"ours_vs_fastv_avg{tier}")
        assert ours["visual_counts"] == fastv["visual_counts"]
        assert ours["flops"] == fastv["flops"] and ours["kv"] == fastv["kv"]
        assert [d["probe_keys"] for d in ours["decisions"]] == [640] * 4
        removed = run_of(report, f"ours_vs_fastv_avg{tier}", "remove")
        assert [d["probe_keys"] for d in removed["decisions"]] == [640] + [
            64 + d["pool"] for d in removed["decisions"][1:]
        ]
        assert removed["decisions"][1]["pool"] == fastv["decisions"][0]["k"]
        assert ours["probe_flops"] == 4 * fastv["probe_flops"] > removed["probe_flops"]


@pytest.mark.spec("budget.active-counts", "budget.kv.entries")
def test_default_run_traced_prefill(default_run):
    """The tiny real run: reroute re-admits tokens, remove never does; counts and cache agree with the trace."""
    _, out, report = default_run
    trace = report["trace"]
    assert trace["model"]["image_grid"] == [4, 4]
    reroute, remove = trace["runs"]
    assert (reroute["policy"], remove["policy"]) == ("reroute", "remove")
    assert reroute["readmitted_total"] > 0 and remove["readmitted_total"] == 0
    for run in trace["runs"]:
        assert run["cache_matches_trace"] and run["model_free_counts_match"]
        for stage in run["stages"]:
            gone = stage["deferred"] + stage["removed"]
            assert sorted(stage["selected"] + gone) == list(range(16))
            assert sorted(stage["continuing"] + stage["readmitted"]) == stage["selected"]
    assert reroute["stages"][0]["selected"] == remove["stages"][0]["selected"]  # one decision: identical
    markdown = (out / "report.md").read_text()
    assert "re-admitted" in markdown and "deferred (bypass, may return)" in markdown


@pytest.mark.spec("budget.avg-tokens")
def test_default_run_solver_section(default_run):
    _, _, report = default_run
    solves = {(s.get("family"), s.get("target_avg")): s for s in report["solver"] if s["kind"] == "matched"}
    assert solves[("ours_vs_pdrop", 192.0)]["ratios"] == [0.4502, 0.4502, 0.2251, 0.1126]
    assert solves[("ours_vs_pdrop", 128.0)]["ratios"] == [0.2655, 0.2655, 0.1328, 0.0664]
    true64 = solves[("ours_vs_pdrop", 64.0)]
    assert true64["ratios"][0] == 0.0808 and true64["release_preset"]["ratios"][0] == 0.1392
    assert true64["k"] == [46, 46, 23, 11] and true64["avg_visual_tokens"]["realized"] == 63.53125
    assert solves[("pdrop_earlyL2", 64.0)]["ratios"][0] == 0.2162
    identical = [s for s in report["solver"] if s["kind"] == "identical"]
    assert [s["release_preset"]["same_schedule"] for s in identical] == [True, True, True]
    assert all(s["identical_counts"] for s in identical)


@pytest.mark.spec("budget.avg-tokens", "budget.flops.true")
def test_default_run_is_fast_and_prints_a_summary(tmp_path, capsys):
    import time

    start = time.perf_counter()
    assert audit.main(["-q", "--no-plots", "--out", str(tmp_path)]) == 0
    assert time.perf_counter() - start < 60
    printed = capsys.readouterr().out
    assert "dense (unrouted)" in printed and "ours_vs_pdrop_avg64" in printed and "OFF-LABEL" in printed


# ---------------------------------------------------------------------------------------------
# Published numbers through the command line
# ---------------------------------------------------------------------------------------------


@pytest.mark.spec("budget.flops.pdrop", "budget.active-counts")
def test_pdrop_paper_table_through_cli(tmp_path):
    """PDrop §4.1 / Table 1 (LLaVA-1.5-7B, MACs, visual tokens only) and its LLaVA-NeXT-7B row."""
    lambdas = tmp_path / "lambdas.yaml"
    lambdas.write_text(
        "schedules:\n"
        "  - {name: pdrop_lambda0.4, layers: [8, 16, 24], keep: [0.4, 0.16, 0.064], policy: remove}\n"
        "  - {name: pdrop_lambda0.6, layers: [8, 16, 24], keep: [0.6, 0.36, 0.216], policy: remove}\n"
    )
    argv = ["--schedule", "pdrop_default", "--schedule", "fastv_K2_R50", "--schedule", str(lambdas)]
    status, report = run_cli(tmp_path, *argv, "--convention", "pdrop", "--policy", "remove", *FAST)
    assert status == 0
    tflops = {s["name"]: round(s["runs"][0]["flops"]["pdrop"] / T, 2) for s in report["schedules"]}
    tflops["vanilla"] = round(report["dense"]["flops"]["pdrop"] / T, 2)
    assert tflops == {
        "vanilla": 3.82,
        "pdrop_default": 1.78,
        "pdrop_lambda0.4": 1.54,
        "pdrop_lambda0.6": 2.06,
        "fastv_K2_R50": 2.01,
    }
    assert round(run_of(report, "pdrop_default")["avg_visual_tokens"]["realized"]) == 270  # PDrop Table 5
    assert round(run_of(report, "fastv_K2_R50")["avg_visual_tokens"]["realized"]) == 306
    status, next_report = run_cli(
        tmp_path, "--visual-tokens", "2880", "--schedule", "pdrop_default", *FAST, name="next"
    )
    assert status == 0 and round(next_report["dense"]["flops"]["pdrop"] / T, 1) == 20.8


@pytest.mark.spec("budget.flops.nuwa", "schedule.keep-count")
def test_nuwa_64_through_cli(tmp_path, default_run):
    """Nüwa App. C: 112 tokens after stage 1 for layers 0-15, 16 from layer 16: 0.6476 T; vanilla 5.972 T."""
    schedule = tmp_path / "nuwa64.json"
    schedule.write_text(
        json.dumps(
            {"name": "nuwa64", "layers": [16], "keep": [16], "unit": "count", "policy": "remove", "label": 64}
        )
    )
    status, report = run_cli(
        tmp_path, "--schedule", str(schedule), "--visual-tokens", "112", "--convention", "nuwa", *FAST
    )
    assert status == 0
    run = run_of(report, "nuwa64")
    assert run["avg_visual_tokens"]["realized"] == 64.0 and not run["label_check"]["flagged"]
    assert round(run["flops"]["nuwa"] / T, 4) == 0.6476
    assert round(default_run[2]["dense"]["flops"]["nuwa"] / T, 3) == 5.972


@pytest.mark.spec("budget.flops.fastv")
def test_fastv_table1_through_cli(tmp_path):
    """FastV Table 1 (LLaVA-1.5-13B, 36 system + 576 image tokens): per-layer average in billions of MACs."""
    schedules = tmp_path / "fastv13b.yaml"
    schedules.write_text(
        "- {name: K2_R50, layers: [2], keep: [288], unit: count, policy: remove}\n"
        "- {name: K3_R75, layers: [3], keep: [144], unit: count, policy: remove}\n"
        "- {name: K5_R90, layers: [5], keep: [58], unit: count, policy: remove}\n"
    )
    argv = ["--model", "llava-1.5-13b", "--text-tokens", "36", "--convention", "fastv"]
    status, report = run_cli(tmp_path, *argv, "--schedule", str(schedules), *FAST)
    assert status == 0
    per_layer = {s["name"]: s["runs"][0]["fastv_per_layer_average"] / 1e9 for s in report["schedules"]}
    assert round(report["dense"]["fastv_per_layer_average"] / 1e9, 1) == 154.6
    assert round(per_layer["K2_R50"], 1) == 84.6
    assert round(per_layer["K3_R75"], 1) == 52.9
    assert round(per_layer["K5_R90"], 2) == 39.68
    assert "FastV per-layer avg" in (tmp_path / "out" / "report.md").read_text()


# ---------------------------------------------------------------------------------------------
# Matched-budget solver
# ---------------------------------------------------------------------------------------------


@pytest.mark.spec("budget.avg-tokens")
def test_solver_through_cli(tmp_path):
    """α = 0.4502 at 192 and 0.2655 at 128 (the release's), 0.0808 for a true 64; integer rounding reported."""
    argv = ["--target-avg", "192", "--target-avg", "128", "--target-avg", "64", "--layers", "2,7,15,23"]
    status, report = run_cli(tmp_path, *argv, "--shape", "1,1,0.5,0.25", *FAST)
    assert status == 0
    solved = {s["target_avg"]: s for s in report["solver"]}
    assert [solved[t]["ratios"][0] for t in (192.0, 128.0, 64.0)] == [0.4502, 0.2655, 0.0808]
    assert solved[192.0]["scale"] == pytest.approx((32 * 192 - 1152) / 11088, rel=1e-12)
    assert solved[192.0]["ratios"] == list(PRESETS["ours_vs_pdrop_avg192"].schedule.keep)
    assert solved[64.0]["k"] == [46, 46, 23, 11]
    assert solved[64.0]["avg_visual_tokens"]["realized"] == 63.53125
    assert solved[64.0]["avg_visual_tokens"]["nominal"] == pytest.approx(64, abs=0.01)
    assert not any(s["flagged"] for s in solved.values())
    # the solved schedules are audited too, labelled with their target, and pass the label check
    names = [s["name"] for s in report["schedules"]]
    assert len(names) == 3 and all(s["label"] in (192, 128, 64) for s in report["schedules"])
    assert report["flags"] == []
    status, geometric = run_cli(
        tmp_path, "--target-avg", "64", "--layers", "2,7,15,23", "--shape", "geometric", *FAST, name="geo"
    )
    assert status == 0 and geometric["solver"][0]["ratios"][0] == 0.2162
    assert geometric["solver"][0]["scale_name"] == "lambda"


@pytest.mark.spec("budget.avg-tokens", "budget.flops.probe")
def test_schedule_identical_mode(tmp_path):
    """fastv_K3_avg64 + re-scoring at 7, 15, 23 == ours_vs_fastv_avg64: same counts, extra probes only."""
    status, report = run_cli(tmp_path, "--identical-to", "fastv_K3_avg64", "--extra-layers", "7,15,23", *FAST)
    assert status == 0
    record = report["solver"][0]
    assert record["kind"] == "identical" and record["identical_counts"]
    assert record["layers"] == [3, 7, 15, 23] and record["keep"] == [0.01916] * 4
    base = run_of(report, "fastv_K3_avg64")
    twin = run_of(report, record["name"])
    assert twin["policy"] == "reroute" and twin["visual_counts"] == base["visual_counts"]
    assert twin["flops"] == base["flops"] and twin["kv"] == base["kv"]
    assert twin["probe_flops"] == 4 * base["probe_flops"]
    assert not twin["label_check"]["flagged"]


# ---------------------------------------------------------------------------------------------
# Inputs: schedule files, --model folders
# ---------------------------------------------------------------------------------------------


@pytest.mark.spec("budget.avg-tokens", "schedule.decision-layers", "schedule.keep-ratio")
def test_schedule_files_yaml_and_json(tmp_path):
    yaml_file = tmp_path / "mine.yaml"
    yaml_file.write_text("layers: [2, 7, 15, 23]\nkeep: [0.0808, 0.0808, 0.0404, 0.0202]\nlabel: 64\n")
    json_file = tmp_path / "pair.json"
    json_file.write_text(
        json.dumps(
            {
                "schedules": [
                    {"name": "a_avg128", "layers": [3], "keep": [0.1418], "policy": "remove"},
                    {
                        "layers": [3, 9],
                        "keep": [100, 50],
                        "unit": "count",
                        "scorer": {"probe_layer": "previous"},
                    },
                ]
            }
        )
    )
    status, report = run_cli(tmp_path, "--schedule", str(yaml_file), "--schedule", str(json_file), *FAST)
    assert status == 0
    by_name = {s["name"]: s for s in report["schedules"]}
    assert set(by_name) == {"mine", "a_avg128", "pair-1"}
    assert by_name["mine"]["label"] == 64 and by_name["mine"]["label_source"] == "file"
    assert by_name["mine"]["native_policy"] == "reroute" and by_name["mine"]["source"] == "file"
    assert by_name["a_avg128"]["label"] == 128 and by_name["a_avg128"]["label_source"] == "name"
    assert by_name["pair-1"]["unit"] == "count" and by_name["pair-1"]["scorer"]["probe_layer"] == "previous"
    assert run_of(report, "pair-1")["visual_counts"] == [576] * 3 + [100] * 6 + [50] * 23
    assert not run_of(report, "mine")["label_check"]["flagged"]


BAD_FILES = {
    "unknown.yaml": ("layers: [3]\nkeep: [0.5]\nratio: 2\n", ["'ratio'", "valid keys"]),
    "ratio.yaml": ("layers: [3]\nkeep: [1.5]\n", ["1.5", "schedule.keep-ratio"]),
    "order.json": ('{"layers": [7, 3], "keep": [0.5, 0.5]}', ["[7, 3]", "schedule.decision-layers"]),
    "range.yaml": ("layers: [3, 40]\nkeep: [0.5, 0.25]\n", ["[40]", "schedule.decision-layers"]),
    "count.yaml": ("layers: [3]\nkeep: [600]\nunit: count\n", ["600", "N=576", "schedule.keep-count"]),
    "missing.yaml": ("layers: [3]\n", ["missing key", "keep"]),
    "policy.yaml": ("layers: [3]\nkeep: [0.5]\npolicy: prune\n", ["'prune'", "remove, reroute"]),
    "broken.yaml": ("layers: [3\nkeep: 0.5\n", ["not valid YAML"]),
    "broken.json": ('{"layers": [3],', ["not valid JSON"]),
    "percent.yaml": (
        'layers: [3, 7]\nkeep: ["50%", 0.25]\n',
        ["'50%'", "is not a number", "schedule.keep-ratio"],
    ),
}


@pytest.mark.spec(
    "budget.avg-tokens", "schedule.decision-layers", "schedule.keep-ratio", "schedule.keep-count"
)
@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_schedule_files_give_a_clear_error(tmp_path, capsys, name):
    text, expected = BAD_FILES[name]
    path = tmp_path / name
    path.write_text(text)
    status, _ = run_cli(tmp_path, "--schedule", str(path), *FAST)
    err = capsys.readouterr().err
    assert status == 2
    assert str(path) in err and "Traceback" not in err
    for fragment in expected:
        assert fragment in err, (fragment, err)


@pytest.mark.spec("budget.flops.true", "budget.kv.bytes")
def test_model_from_a_local_folder(tmp_path):
    """save_pretrained of a tiny LLaVA config (config.json only): built on meta, shapes read from modules."""
    config = tiny_llava_config(num_layers=8)
    folder = tmp_path / "tiny-llava"
    config.save_pretrained(folder)
    assert [p.name for p in folder.iterdir()] == ["config.json"]
    schedule = tmp_path / "tiny.yaml"
    schedule.write_text("layers: [1, 3, 5]\nkeep: [0.5, 0.5, 0.25]\n")
    expected = ArchSpec.from_model(tiny_llava(config), name="tiny-llava").to_dict()
    for model in (folder, folder / "config.json"):
        status, report = run_cli(
            tmp_path, "--model", str(model), "--schedule", str(schedule), *FAST, name=model.name
        )
        assert status == 0
        assert report["model"]["arch"] == expected
        assert report["model"]["source"] == str((folder / "config.json").resolve())
        assert report["layout"]["num_visual"] == 16  # the config's image_seq_length
        assert report["kv_dtype"] == "float16"
        run = run_of(report, "tiny")
        assert run["visual_counts"] == [16, 8, 8, 8, 8, 4, 4, 4]
        assert run["kv"]["bytes"] == sum(64 + v for v in run["visual_counts"]) * 2 * 2 * 8 * 2
    (tmp_path / "empty").mkdir()
    status, _ = run_cli(tmp_path, "--model", str(tmp_path / "empty"), *FAST, name="empty-out")
    assert status == 2


@pytest.mark.spec("budget.kv.bytes", "budget.kv.decode-growth")
def test_embedded_qwen_and_kv_dtype(tmp_path):
    status, report = run_cli(tmp_path, "--model", "qwen2.5-vl-7b", "--schedule", "fastv_K3_avg64", *FAST)
    assert status == 0 and report["kv_dtype"] == "bfloat16"  # the checkpoint's dtype
    assert report["decode"]["kv_growth_bytes_per_token"] == 56 * KiB
    assert report["model"]["arch"]["num_kv_heads"] == 4
    assert any("L = 28" in note for note in report["notes"])  # LLaVA-1.5 labels do not hold on 28 layers
    status, report = run_cli(
        tmp_path, "--schedule", "fastv_K3_avg64", "--kv-dtype", "float32", *FAST, name="f32"
    )
    assert status == 0 and report["decode"]["kv_growth_bytes_per_token"] == 1024 * KiB


@pytest.mark.spec("budget.flops.pdrop", "budget.flops.fastv")
def test_convention_and_policy_options(tmp_path):
    argv = ["--schedule", "ours_vs_pdrop_avg64", "--policy", "reroute", "--convention", "pdrop"]
    status, report = run_cli(tmp_path, *argv, *FAST)
    assert status == 0 and report["conventions"] == ["pdrop"] and report["policies"] == ["reroute"]
    runs = report["schedules"][0]["runs"]
    assert [r["policy"] for r in runs] == ["reroute"]
    assert set(runs[0]["flops"]) == set(audit.CONVENTIONS)  # report.json keeps all four
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "PDrop (T MACs)" in markdown and "FastV (T MACs)" not in markdown


# ---------------------------------------------------------------------------------------------
# LaTeX
# ---------------------------------------------------------------------------------------------


def _pdflatex(folder, name):
    return subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", name],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.spec("budget.flops.true")
def test_latex_is_a_booktabs_table(default_run):
    _, out, _ = default_run
    document = (out / "report.tex").read_text()
    table = (out / "report-table.tex").read_text()
    assert document.startswith("\\documentclass") and "\\usepackage{booktabs}" in document
    for text in (document, table):
        for command in ("\\toprule", "\\midrule", "\\bottomrule"):
            assert command in text
        assert text.count("\\begin{") == text.count("\\end{")
        assert "pdrop\\_earlyL2\\_avg64\\textsuperscript{\\dag}" in text  # the off-label flag
    assert table in document  # the snippet is the document's table


@pytest.mark.spec("budget.flops.true")
@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed")
def test_latex_compiles(default_run, tmp_path):
    _, out, _ = default_run
    shutil.copy(out / "report.tex", tmp_path)
    shutil.copy(out / "report-table.tex", tmp_path)
    result = _pdflatex(tmp_path, "report.tex")
    assert result.returncode == 0, result.stdout[-2000:]
    assert (tmp_path / "report.pdf").stat().st_size > 1000
    wrapper = "\\documentclass{article}\n\\usepackage[landscape]{geometry}\n\\usepackage{booktabs}\n"
    wrapper += "\\usepackage{graphicx}\n\\begin{document}\n\\input{report-table}\n\\end{document}\n"
    (tmp_path / "paper.tex").write_text(wrapper)
    result = _pdflatex(tmp_path, "paper.tex")
    assert result.returncode == 0, result.stdout[-2000:]


@pytest.mark.spec("budget.flops.true")
@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed")
@pytest.mark.parametrize("table", ["report-table", "report-table-full"])
@pytest.mark.parametrize("columns", ["onecolumn", "twocolumn"])
def test_latex_table_fits_a_paper(default_run, tmp_path, table, columns):
    """``\\input{report-table}`` in a plain one- or two-column article: compiles, no overfull box."""
    _, out, _ = default_run
    shutil.copy(out / f"{table}.tex", tmp_path)
    paper = f"\\documentclass[{columns}]{{article}}\n\\usepackage{{booktabs}}\n\\usepackage{{graphicx}}\n"
    paper += f"\\begin{{document}}\nText.\n\\input{{{table}}}\n\\end{{document}}\n"
    (tmp_path / "paper.tex").write_text(paper)
    result = _pdflatex(tmp_path, "paper.tex")
    assert result.returncode == 0, result.stdout[-2000:]
    log = (tmp_path / "paper.log").read_text(errors="replace")
    assert "Overfull \\hbox" not in log, [line for line in log.splitlines() if "Overfull" in line]


# ---------------------------------------------------------------------------------------------
# Bad arguments
# ---------------------------------------------------------------------------------------------

BAD_ARGUMENTS = [
    (["--model", "llava-1.5-70b"], ["'llava-1.5-70b'", "llava-1.5-7b", "qwen2.5-vl-7b"]),
    (["--schedule", "fastv_K9"], ["'fastv_K9'", "fastv_K3_avg64", "pdrop_default"]),
    (["--schedule", "missing.yaml"], ["'missing.yaml'", "no such file"]),
    (["--policy", "prune"], ["'prune'", "remove", "reroute", "both"]),
    (["--convention", "flops"], ["'flops'", "pdrop", "nuwa", "all"]),
    (["--kv-dtype", "int8"], ["'int8'", "float16", "bfloat16"]),
    (["--visual-tokens", "0"], ["--visual-tokens", "0"]),
    (["--text-tokens", "many"], ["--text-tokens", "'many'"]),
    (["--target-avg", "-3"], ["--target-avg", "'-3'"]),
    (["--target-avg", "64"], ["--target-avg", "--layers"]),
    (["--target-avg", "40", "--layers", "3"], ["40", "budget.avg-tokens"]),
    (["--target-avg", "64", "--layers", "2,x"], ["--layers", "'2,x'"]),
    (["--target-avg", "64", "--layers", "3", "--shape", "cubic"], ["--shape", "'cubic'", "geometric"]),
    (["--identical-to", "fastv_K3_avg64"], ["--extra-layers"]),
    (["--identical-to", "fastv_K3_avg64", "--extra-layers", "40"], ["[40]", "--extra-layers"]),
    (["--schedule", "fastv_K3_avg64", "--schedule", "fastv_K3_avg64"], ["'fastv_K3_avg64'", "twice"]),
    (["--frobnicate"], ["--frobnicate"]),
    # options that would do nothing in the given combination are errors, naming the right option
    (["--shape", "geometric"], ["--shape geometric", "--target-avg"]),
    (["--shape", "1,1,0.5"], ["--shape 1,1,0.5", "--target-avg"]),
    (
        ["--identical-to", "fastv_K3_avg64", "--extra-layers", "3,7"],
        ["--extra-layers [3]", "already decision layers"],
    ),
    (["--identical-to", "nope", "--extra-layers", "7"], ["--identical-to 'nope'", "valid presets"]),
]


@pytest.mark.spec("budget.avg-tokens", "schedule.presets")
@pytest.mark.parametrize(
    "argv,expected", BAD_ARGUMENTS, ids=lambda v: " ".join(v) if isinstance(v, list) else None
)
def test_bad_arguments_exit_2_naming_the_value(tmp_path, capsys, argv, expected):
    status = audit.main([*argv, *FAST, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err and "error" in err
    for fragment in expected:
        assert fragment in err, (fragment, err)


@pytest.mark.spec("budget.avg-tokens", "schedule.presets")
def test_help_and_out_is_a_file(tmp_path, capsys):
    assert audit.main(["--help"]) == 0
    printed = capsys.readouterr().out
    assert "--target-avg" in printed and "ours_vs_pdrop_avg64" in printed and "docs/audit.md" in printed
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert audit.main(["--out", str(blocker), *FAST]) == 2
    assert "is not a folder" in capsys.readouterr().err


@pytest.mark.spec("budget.avg-tokens")
def test_cli_dispatches_to_audit(tmp_path):
    from rerouting.cli import main

    assert main(["audit", "--schedule", "fastv_K3_avg64", *FAST, "--out", str(tmp_path)]) == 0
    assert main(["audit", "--policy", "x", "-q"]) == 2
