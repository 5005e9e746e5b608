"""Issue 7: interrupted runs resume, two runs can share a cache, and a run is deterministic.

Every run here is a real ``unmerge run`` in its own process (``UNMERGE_CACHE`` in a temporary directory, offline).
Runs that must die go through ``KILLER``, a short driver that wraps one library function so that the process
sends itself SIGKILL at a chosen point (mid-training, mid-way through writing a statistic or a merged model, before
an evaluation), then calls the same CLI entry point. Nothing in the library knows about it.

To stay within a few minutes on two cores the recipe is the e2e test's tiny recipe cut down further (no oracle,
two removal candidates, smaller evaluations); it still has every stage and every evaluation protocol.
The two concurrent runs (one empty cache) and the resumed run (another) each compute everything once, so comparing
their bundles is also the determinism check.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_workflow_e2e import TINY_RECIPE

from unmerge.report import verify

RECIPE = copy.deepcopy(TINY_RECIPE)
RECIPE.update(
    name="resume",
    oracle_model=None,
    removal={"methods": ["uncertainty_removal", "negation"], "alpha": [1.0],
             "params": {"uncertainty_removal": {"m_max": 5.0}}},
    evaluate={"toxicity": {"prompt_limit": 4, "samples_per_prompt": 2, "max_new_tokens": 6},
              "perplexity": {"limit": 16, "max_length": 32}, "accuracy": {"limit": 8},
              "forget_quality": {"holdout": "builtin:toxic-heldout", "members": 8}},
)
RECIPE["finetune"] = {**RECIPE["finetune"], "max_steps": 6}

KILLER = '''
"""unmerge's CLI, SIGKILLed by itself at the point named by $KILL_AT (test driver, see tests/test_resume.py)."""
import os, signal, sys

def kill_on(owner, attr, when):
    real = getattr(owner, attr)
    def wrapper(*args, **kwargs):
        if when(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    setattr(owner, attr, wrapper)

def nth_call(n):
    calls = []
    return lambda *a, **k: calls.append(1) or len(calls) == n

def nth_tensor_of_nth_output(prefix, n_output, n_tensor):
    seen = {}
    def when(writer, name, tensor):
        key = writer.directory.name
        if not key.startswith(prefix):
            return False
        seen[key] = seen.get(key, 0) + 1
        return len(seen) == n_output and seen[key] == n_tensor
    return when

point = os.environ["KILL_AT"]
if point == "finetune":  # the 3rd of 6 training steps
    import transformers
    kill_on(transformers.Trainer, "training_step", nth_call(3))
elif point == "statistics":  # the 5th tensor written of the 2nd Fisher (the forget model's)
    from unmerge.checkpoint.writer import ShardedWriter
    kill_on(ShardedWriter, "add", nth_tensor_of_nth_output(".fisher-", 2, 5))
elif point == "merge":  # the 3rd tensor written of the 2nd merged model
    from unmerge.checkpoint.writer import ShardedWriter
    kill_on(ShardedWriter, "add", nth_tensor_of_nth_output(".merge-", 2, 3))
elif point == "evaluation":  # the 3rd of 4 evaluations
    import unmerge.evaluation
    kill_on(unmerge.evaluation, "evaluate_model", nth_call(3))
else:
    raise SystemExit(f"unknown KILL_AT {point!r}")

from unmerge.cli import main
main(sys.argv[1:], prog_name="unmerge")
'''

KILL_POINTS = ("finetune", "statistics", "merge", "evaluation")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    (root / "recipe.yaml").write_text(yaml.safe_dump(RECIPE))
    (root / "killer.py").write_text(KILLER)
    return root


def start(work: Path, home: str, out: str, kill_at: str | None = None, quiet: bool = True) -> subprocess.Popen:
    """``unmerge run`` in a new process with UNMERGE_CACHE=work/home (stage cache in home/runs)."""
    env = {**os.environ, "UNMERGE_CACHE": str(work / home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("KILL_AT", None)
    entry = ["-m", "unmerge.cli"]
    if kill_at:
        env["KILL_AT"] = kill_at
        entry = [str(work / "killer.py")]
    args = [sys.executable, *entry, "run", str(work / "recipe.yaml"), "--out", str(work / out)]
    log = work / f"{out}-{kill_at or 'run'}.log"  # a file, not a pipe: nobody reads while the process runs
    with open(log, "w") as handle:
        proc = subprocess.Popen(args + (["--quiet"] if quiet else []), env=env, stdout=handle, stderr=subprocess.STDOUT)
    proc.log = log
    return proc


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, proc.log.read_text(errors="replace")


def outputs(stages: Path) -> dict[str, dict[str, int]]:
    """Completed stage outputs in a stage cache: name -> {file: mtime_ns}."""
    done = {}
    for path in sorted(stages.iterdir()) if stages.exists() else []:
        if path.name.startswith("."):
            continue
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        done[path.name] = {str(f.relative_to(stages)): f.stat().st_mtime_ns for f in files}
    return done


def leftovers(stages: Path) -> list[str]:
    return sorted(p.name for p in stages.iterdir() if ".partial-" in p.name or ".tmp" in p.name)


def bundle_outputs(bundle: Path) -> dict[str, str]:
    return json.loads((bundle / "manifest.json").read_text())["outputs"]


def weights(stages: Path) -> dict[str, str]:
    """The sha256 of every weight file in a stage cache (fine-tuned model, statistics, merged models)."""
    return {str(p.relative_to(stages)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(stages.rglob("*.safetensors"))}


def same(a: dict, b: dict) -> bool:
    """``a == b``, printing the keys that differ (pytest shows it when the assertion fails)."""
    differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if differ:
        print("differ:", differ)
    return not differ


@pytest.fixture(scope="module")
def shared_procs(work):
    """Two uninterrupted runs started together on one empty cache; they run while the resumed run below is killed
    and restarted (its kill points count calls, not seconds, so the load does not move them)."""
    procs = [start(work, "home-shared", f"report-shared-{i}", quiet=False) for i in (1, 2)]
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="module")
def resumed(work, shared_procs):
    """One cache, killed at each point in turn, then run to the end; what was on disk after each kill."""
    stages = work / "home-resume" / "runs"
    seen = {}
    for point in KILL_POINTS:
        code, log = finish(start(work, "home-resume", "report-resume", kill_at=point))
        seen[point] = {"code": code, "log": log, "done": outputs(stages), "partial": leftovers(stages)}
    code, log = finish(start(work, "home-resume", "report-resume"))
    assert code == 0, log
    seen["end"] = {"done": outputs(stages), "partial": leftovers(stages)}
    return seen, work / "report-resume", stages


def stage_names(done: dict, stage: str) -> list[str]:
    return [name for name in done if name.startswith(f"{stage}-")]


def assert_killed(state: dict) -> None:
    assert state["code"] == -9, f"expected SIGKILL, got exit {state['code']}:\n{state['log'][-3000:]}"


def assert_kept(before: dict, after: dict) -> None:
    """Every output completed before a kill is still there, not recomputed (same files, same mtimes)."""
    for name, files in before.items():
        assert after.get(name) == files, f"{name} was recomputed or changed"


def test_kill_during_finetuning_then_resume(resumed):
    seen, _, _ = resumed
    state = seen["finetune"]
    assert_killed(state)
    assert state["done"] == {}  # nothing completed, nothing half-visible as complete
    assert any(p.startswith(".finetune-") and ".partial-" in p for p in state["partial"])  # killed mid-write
    assert seen["end"]["partial"] == []  # the half-written model was cleaned up by the next run


def test_kill_during_statistics_then_resume(resumed):
    seen, _, _ = resumed
    state = seen["statistics"]
    assert_killed(state)
    assert len(stage_names(state["done"], "finetune")) == 1 and len(stage_names(state["done"], "fisher")) == 1
    assert any(p.startswith(".fisher-") for p in state["partial"])
    assert_kept(state["done"], seen["end"]["done"])
    assert_kept(state["done"], seen["merge"]["done"])  # and the next (killed) run did not redo them either


def test_kill_during_merging_then_resume(resumed):
    seen, _, _ = resumed
    state = seen["merge"]
    assert_killed(state)
    assert len(stage_names(state["done"], "fisher")) == 2 and len(stage_names(state["done"], "merge")) == 1
    assert any(p.startswith(".merge-") for p in state["partial"])
    assert_kept(state["done"], seen["end"]["done"])


def test_kill_during_evaluation_then_resume(resumed):
    seen, _, _ = resumed
    state = seen["evaluation"]
    assert_killed(state)
    assert len(stage_names(state["done"], "merge")) == 2 and len(stage_names(state["done"], "eval")) == 2
    assert_kept(state["done"], seen["end"]["done"])
    assert len(stage_names(seen["end"]["done"], "eval")) == 4


@pytest.fixture(scope="module")
def shared(work, shared_procs):
    """The two runs sharing a cache, finished (progress on: their logs say which stages each computed). They are
    also the uninterrupted reference the resumed run is compared with."""
    results = [finish(p) for p in shared_procs]
    for code, log in results:
        assert code == 0, log[-3000:]
    return [work / f"report-shared-{i}" for i in (1, 2)], work / "home-shared" / "runs", [log for _, log in results]


def test_two_runs_sharing_a_cache_at_the_same_time(shared):
    bundles, stages, logs = shared
    assert leftovers(stages) == []
    assert verify(bundles[0]) == [] and verify(bundles[1]) == []
    assert bundle_outputs(bundles[0]) == bundle_outputs(bundles[1])
    # the lock made each stage run once: one process computed it, the other then found it in the cache
    computed, cached = [], []
    for log in logs:
        for line in log.replace("\r", "\n").splitlines():
            if match := re.search(r"unmerge\.workflow: (.+?) \.\.\.$", line):
                computed.append(match.group(1))
            elif match := re.search(r"unmerge\.workflow: (.+?): cached \(", line):
                cached.append(match.group(1))
    stages_run = 3 + 2 + 4  # fine-tune, 2 Fishers, 2 merges, 4 evaluations
    assert len(computed) == stages_run and len(set(computed)) == stages_run, computed
    assert sorted(cached) == sorted(computed)


def test_resumed_run_equals_an_uninterrupted_one(shared, resumed):
    """The run killed four times ends with the same bundle (every output's sha256) and the same weight files."""
    bundles, ref_stages, _ = shared
    _, bundle, stages = resumed
    assert verify(bundle) == []
    assert same(bundle_outputs(bundle), bundle_outputs(bundles[0]))
    assert same(weights(stages), weights(ref_stages))
    assert leftovers(stages) == [] and not [p for p in bundle.parent.iterdir() if ".partial-" in p.name]


def test_same_seed_same_outputs(shared, resumed):
    """Determinism (CPU): two runs of the recipe from empty caches of their own (the shared-cache pair, and the
    resumed run) give byte-identical bundles (the sha256 in their manifests) and weight files (fine-tuned model,
    statistics, merged models). Timings and the clock time are in manifest.json only, outside the hashed outputs."""
    bundles, stages_a, _ = shared
    _, bundle_b, stages_b = resumed
    a, b = json.loads((bundles[0] / "manifest.json").read_text()), json.loads((bundle_b / "manifest.json").read_text())
    assert same(a["outputs"], b["outputs"])
    assert {"report.md", "report.html", "metric_details.jsonl", "samples.jsonl", "metrics.csv"} <= set(a["outputs"])
    assert a["inputs"] == b["inputs"] and a["seeds"] == b["seeds"]
    assert "finetune" in a["timings"] and a["created_utc"]  # run facts: in the manifest, not in the outputs
    assert same(weights(stages_a), weights(stages_b))
