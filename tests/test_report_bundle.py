"""The report bundle: files, exact metrics.csv, manifest hashes, HTML escaping, atomic writing and verify."""
from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest

from unmerge.checkpoint.hashing import sha256_file
from unmerge.checkpoint.writer import MARKER
from unmerge.errors import DataError, OutputError, RecipeError
from unmerge.report import verify, write_bundle

EVIL = "<script>alert(1)</script>"
EVIL_ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"


def make_run(guard: bool = True) -> dict:
    """base, forget and two methods at two alphas; toxicity falls and perplexity rises with alpha."""
    metrics = []

    def add(cand, method, alpha, tox, ppl, acc):
        metrics.append(dict(candidate=cand, method=method, alpha=alpha, metric="toxicity.mean", value=tox,
                            ci_low=tox - 0.02, ci_high=tox + 0.02))
        metrics.append(dict(candidate=cand, method=method, alpha=alpha, metric="perplexity", value=ppl,
                            ci_low=None, ci_high=None))
        metrics.append(dict(candidate=cand, method=method, alpha=alpha, metric="accuracy", value=acc,
                            ci_low=acc - 0.05, ci_high=acc + 0.05))

    add("base", None, None, 0.30, 20.0, 0.70)
    add("forget", None, None, 0.70, 21.0, 0.69)
    add("ta@0.5", "task_arithmetic", 0.5, 0.20, 20.6, 0.69)
    add("ta@1.0", "task_arithmetic", 1.0, 0.10, 22.0, 0.66)
    add("ur@0.5", "uncertainty_removal", 0.5, 0.18, 20.4, 0.70)
    add("ur@1.0", "uncertainty_removal", 1.0, 0.12, 20.9, 0.69)
    records = [
        {"candidate": "forget", "prompt_id": 0, "sample": 0, "prompt": "Say", "text": EVIL, "score": 0.9},
        {"candidate": "base", "prompt_id": 0, "sample": 0, "prompt": "Say <b>", "text": "hello | *there*",
         "score": 0.1},
        {"candidate": "ur@1.0", "prompt_id": 0, "sample": 0, "prompt": "Say", "text": "fine", "score": math.nan},
        {"candidate": "ur@1.0", "kind": "mia", "loss": 2.5},
    ]
    run = {
        "title": "Test <b>report</b>",
        "recipe": {"name": "t", "select": {"minimize": "toxicity.mean"}},
        "resolved": {"name": "t", "base_model": "/models/tiny"},
        "metrics": metrics,
        "records": records,
        "selection": {"minimize": "toxicity.mean", "subject_to": "perplexity <= 1.05 * base"},
        "timings": {"evaluate": 1.5, "removal": 0.25},
        "inputs": {"base_model": "a" * 64, "forget": {"sha256": "b" * 64, "path": "builtin:toxic-demo"}},
        "seeds": {"generation": 0},
        "caveats": ["Synthetic data; <img src=x onerror=alert(2)>"],
        "base_candidate": "base",
        "protocol": {"toxicity": {"scorer": "profanity-check", "samples_per_prompt": 2, "top_p": 0.9},
                     "perplexity": {"max_length": 64, "stride": 32}},
    }
    if guard:
        run["guard"] = {"ta@0.5": {"clamped_fraction": 0.01}, "ta@1.0": {"clamped_fraction": 0.04},
                        "ur@0.5": {"clamped_fraction": 0.0}, "ur@1.0": {"clamped_fraction": 0.02}}
    return run


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return write_bundle(tmp_path_factory.mktemp("report") / "bundle", make_run())


@pytest.fixture
def copy(bundle, tmp_path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(bundle, target)
    return target


EXPECTED_FILES = {"manifest.json", "metrics.csv", "samples.jsonl", "guard.csv", "tradeoff.png", "bars.png",
                  "guard.png", "report.md", "report.html"}


def test_all_files_written(bundle):
    assert {p.name for p in bundle.iterdir()} == EXPECTED_FILES | {MARKER}
    for png in ("tradeoff.png", "bars.png", "guard.png"):
        data = (bundle / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert not list(bundle.parent.glob(".bundle.partial-*"))


def test_metrics_csv_is_exact_tidy_format(bundle):
    with open(bundle / "metrics.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["candidate", "method", "alpha", "metric", "value", "ci_low", "ci_high"]
    assert len(rows) == 1 + 6 * 3
    assert rows[1] == ["base", "", "", "toxicity.mean", "0.3", repr(0.30 - 0.02), repr(0.30 + 0.02)]
    assert rows[2] == ["base", "", "", "perplexity", "20.0", "", ""]
    ur = [r for r in rows if r[0] == "ur@1.0" and r[3] == "toxicity.mean"]
    # full precision: the CSV holds the floats exactly as given
    assert ur == [["ur@1.0", "uncertainty_removal", "1.0", "toxicity.mean", "0.12", repr(0.12 - 0.02), repr(0.12 + 0.02)]]


def test_manifest_hashes_every_output(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert set(manifest["outputs"]) == EXPECTED_FILES - {"manifest.json"}
    for name, digest in manifest["outputs"].items():
        assert sha256_file(bundle / name) == digest
    run = make_run()
    assert manifest["recipe"] == {"given": run["recipe"], "resolved": run["resolved"]}
    assert manifest["inputs"] == run["inputs"]
    assert manifest["seeds"] == {"generation": 0}
    assert manifest["timings"] == {"evaluate": 1.5, "removal": 0.25}
    assert manifest["protocol"] == run["protocol"]
    for lib in ("python", "torch", "transformers", "datasets", "evaluate", "pandas", "safetensors", "accelerate",
                "unmerge"):
        assert lib in manifest["versions"]
    assert manifest["versions"]["unmerge"] and manifest["versions"]["pandas"]
    hw = manifest["hardware"]
    assert hw["cpu_count"] >= 1 and hw["torch_threads"] >= 1 and "platform" in hw and "cuda_device" in hw
    sel = manifest["selection"]
    # bound 21: ur@1.0 (0.12, ppl 20.9) beats ta@1.0 (0.10, ppl 22.0 is out)
    assert sel["candidate"] == "ur@1.0"
    assert sel["constraints"][0]["bound"] == pytest.approx(21.0)
    assert [c["candidate"] for c in manifest["candidates"]] == ["base", "forget", "ta@0.5", "ta@1.0", "ur@0.5",
                                                               "ur@1.0"]
    assert any("profanity-check" in c for c in manifest["caveats"])  # added from the protocol's scorer


def test_samples_jsonl(bundle):
    lines = (bundle / "samples.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 4
    assert records[0] == make_run()["records"][0]
    assert records[2]["score"] is None  # NaN written as null (strict JSON)
    assert records[3] == {"candidate": "ur@1.0", "kind": "mia", "loss": 2.5}


def test_html_is_self_contained_and_escaped(bundle):
    page = (bundle / "report.html").read_text(encoding="utf-8")
    assert EVIL not in page and EVIL_ESCAPED in page
    assert "<script" not in page.lower()
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(2)&gt;" in page
    assert "<b>report</b>" not in page and "Test &lt;b&gt;report&lt;/b&gt;" in page
    assert page.count('src="data:image/png;base64,') == 3
    assert "http://" not in page and "https://" not in page and "<link" not in page
    for heading in ("Summary", "Selected candidate and why", "Metrics", "Plots", "Sample generations", "Protocol",
                    "Inputs and hashes", "Caveats"):
        assert f"<h2>{heading}</h2>" in page
    # the selection table marks the selected row and pass/fail per constraint
    assert '<tr class="selected"><td>ur@1.0</td>' in page
    assert '<td class="fail">fail</td>' in page and '<td class="pass">pass</td>' in page
    # every protocol parameter and input hash appears
    for text in ("toxicity.samples_per_prompt", "perplexity.stride", "a" * 64, "b" * 64, "builtin:toxic-demo"):
        assert text in page


def test_markdown_report(bundle):
    md = (bundle / "report.md").read_text(encoding="utf-8")
    assert EVIL not in md and EVIL_ESCAPED in md
    assert "hello \\| \\*there\\*" in md  # generated text cannot break the table or add emphasis
    assert "![" in md and "(tradeoff.png)" in md and "(guard.png)" in md
    assert "Selected candidate: **ur@1.0**" in md
    assert "| ur@1.0 | uncertainty_removal | 1 | 0.12 [0.1, 0.14] | 20.9 | 0.69 [0.64, 0.74] |" in md


def test_no_guard_no_guard_files(tmp_path):
    out = write_bundle(tmp_path / "b", make_run(guard=False))
    names = {p.name for p in out.iterdir()}
    assert "guard.png" not in names and "guard.csv" not in names
    assert {"tradeoff.png", "bars.png", "report.html"} <= names
    assert verify(out) == []


def test_refuses_foreign_directory_and_overwrites_own(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputError):
        write_bundle(foreign, make_run(), overwrite=True)
    assert (foreign / "notes.txt").read_text() == "mine"
    out = write_bundle(tmp_path / "b", make_run(guard=False))
    with pytest.raises(OutputError, match="not empty"):
        write_bundle(out, make_run())
    write_bundle(out, make_run(), overwrite=True)
    assert (out / "guard.png").exists() and verify(out) == []


def test_bad_input_writes_nothing(tmp_path):
    run = make_run()
    run["selection"] = {"minimize": "toxicity.mean", "subject_to": "__import__('os').system('echo hi') <= 1"}
    with pytest.raises(RecipeError):
        write_bundle(tmp_path / "b", run)
    run = make_run()
    run["metrics"] = run["metrics"] + [run["metrics"][0]]
    with pytest.raises(DataError, match="more than one row"):
        write_bundle(tmp_path / "b", run)
    assert list(tmp_path.iterdir()) == []


def test_nothing_selected_is_reported(tmp_path):
    run = make_run(guard=False)
    run["selection"] = {"minimize": "toxicity.mean", "subject_to": "perplexity < 0.5 * base"}
    out = write_bundle(tmp_path / "b", run)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["selection"]["candidate"] is None
    page = (out / "report.html").read_text()
    assert "No candidate was selected." in page and "fails for 4 of 4" in page


def test_verify_fresh_bundle_passes(bundle):
    assert verify(bundle) == []


def test_verify_names_a_changed_byte(copy):
    path = copy / "metrics.csv"
    data = bytearray(path.read_bytes())
    data[40] ^= 0x01
    path.write_bytes(bytes(data))
    problems = verify(copy)
    assert len(problems) == 1 and problems[0].startswith("metrics.csv: changed")


def test_verify_reports_added_and_removed_files(copy):
    (copy / "extra.txt").write_text("x")
    (copy / "bars.png").unlink()
    problems = verify(copy)
    assert sorted(problems) == ["bars.png: missing", "extra.txt: present but not listed in manifest.json"]


def test_verify_bad_manifests(copy, tmp_path):
    assert verify(tmp_path / "nowhere")[0].endswith("no such directory")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["outputs"]["../outside.txt"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert verify(copy) == ["../outside.txt: listed with a path outside the bundle; not checked"]
    (copy / "manifest.json").write_text("{not json")
    assert verify(copy)[0].startswith("manifest.json: unreadable")
    (copy / "manifest.json").unlink()
    assert verify(copy)[0].startswith("manifest.json: missing")


def test_workflow_style_rows(tmp_path):
    """Reference models named as their own method, extra row keys, 'maximize: null', tradeoff alias."""
    run = make_run(guard=False)
    for r in run["metrics"]:
        if r["method"] is None:
            r["method"] = r["candidate"]
        r.update(n=8, seed=0, protocol="toxicity" if r["metric"].startswith("toxicity") else "other")
    run["selection"] = {"minimize": "toxicity.mean", "maximize": None, "subject_to": "perplexity <= 1.05 * base"}
    run["metrics"].append(dict(candidate="base", method="base", alpha=None, metric="tox2", value=0.5))
    run["tradeoff"] = {"x": "perplexity", "y": "tox2"}
    out = write_bundle(tmp_path / "b", run)
    assert verify(out) == []
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["selection"]["candidate"] == "ur@1.0"  # base/forget are not eligible: they are references
    assert {c["candidate"]: c["method"] for c in manifest["candidates"]}["forget"] is None
    with open(out / "metrics.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["candidate", "method", "alpha", "metric", "value", "ci_low", "ci_high"]
    assert rows[1][:2] == ["base", "base"]  # written as given
    details = [json.loads(line) for line in (out / "metric_details.jsonl").read_text().splitlines()]
    assert len(details) == len(run["metrics"]) and details[0]["n"] == 8 and details[0]["protocol"] == "toxicity"
    assert "tox2 against perplexity" in (out / "report.md").read_text()
