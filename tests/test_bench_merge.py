"""``unmerge bench merge`` on a tiny synthetic model: rounds of every job, median rows, ratios to the floor."""
from __future__ import annotations

from unmerge.bench import merge as bench


def test_bench_merge_runs_rounds_and_reports_medians(tmp_path, monkeypatch):
    tiny = {**bench.llama_shape(0), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 1, "num_key_value_heads": 1, "vocab_size": 128}
    monkeypatch.setattr(bench, "llama_shape", lambda size_bytes: tiny)
    order = []
    real = bench.run_monitored
    monkeypatch.setattr(bench, "run_monitored", lambda label, *a, **k: order.append(label) or real(label, *a, **k))
    rows = bench.bench_merge(tmp_path, 1, methods=("task_arithmetic", "ties"), with_mergekit=False, threads=1,
                             repeat=2)
    jobs = ["io-floor", "unmerge:task_arithmetic", "unmerge:ties"]
    # rounds in the balanced order (the second starts one job later), the mapped-pages floor once, last
    assert order == ["unmerge:task_arithmetic (cold hashes)"] + jobs + jobs[1:] + jobs[:1] + [bench.MAPPED_FLOOR]
    by_job = {row["job"]: row for row in rows}
    assert list(by_job) == ["io-floor", bench.MAPPED_FLOOR, "unmerge:task_arithmetic (cold hashes)",
                            "unmerge:task_arithmetic", "unmerge:ties", "model"]
    assert by_job["io-floor"]["runs"] == 2 and by_job["unmerge:ties"]["runs"] == 2
    assert by_job[bench.MAPPED_FLOOR]["runs"] == 1
    assert by_job["unmerge:task_arithmetic (cold hashes)"]["runs"] == 1
    for job in ("io-floor", bench.MAPPED_FLOOR, "unmerge:task_arithmetic", "unmerge:ties"):
        row = by_job[job]
        assert row["ok"] and row["error"] == "" and row["seconds"] > 0
        assert abs(row["x_floor"] - row["seconds"] / by_job["io-floor"]["seconds"]) < 0.02
        each = sorted(float(x) for x in row["each_s"].split("/"))
        assert len(each) == row["runs"] and abs(each[len(each) // 2] - row["seconds"]) < 0.006
    assert "2 layers" in by_job["model"]["error"]


def test_io_floor_writes_a_copy_of_the_first_input(tmp_path):
    import subprocess

    tiny = {**bench.llama_shape(0), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
            "num_attention_heads": 1, "num_key_value_heads": 1, "vocab_size": 128}
    base, other = tmp_path / "base", tmp_path / "other"
    bench.write_synthetic(base, tiny, seed=0)
    bench.write_synthetic(other, tiny, seed=1, base=base)
    for variant in ("copy", "mapped"):
        out = tmp_path / f"out-{variant}"
        subprocess.run(bench.python_job(bench.FLOOR_CODE) + [f"{base},{other}", str(out), variant], check=True)
        assert bench.max_abs_difference(out, base) == 0.0
        assert bench.max_abs_difference(out, other) > 0.0


def test_balanced_order_gives_every_job_every_predecessor_equally_often():
    for count in range(1, 7):
        rows = [bench.balanced_order(count, r) for r in range(count if count % 2 == 0 else 2 * count)]
        assert all(sorted(row) == list(range(count)) for row in rows)
        pairs = [(a, b) for row in rows for a, b in zip(row, row[1:])]
        if count > 1:
            assert {pairs.count((a, b)) for a in range(count) for b in range(count) if a != b} == \
                {len(pairs) // (count * (count - 1))}
        assert bench.balanced_order(count, len(rows)) == rows[0]  # and the design repeats
