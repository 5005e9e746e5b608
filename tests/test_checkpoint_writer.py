"""The sharded safetensors writer: round trips (streamed with a declared layout, and buffered), shard planning and
naming, the index, atomicity (temporary names until complete, cleanup on errors) and validation."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from unmerge.checkpoint import Checkpoint, ShardedWriter
from unmerge.errors import OutputError


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "model.embed.weight": torch.randn(64, 16, generator=gen),
        "model.layers.0.w": torch.randn(16, 16, generator=gen).to(torch.bfloat16),
        "model.layers.0.b": torch.randn(16, generator=gen).to(torch.float16),
        "buffer.ids": torch.arange(10),
        "buffer.mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 4),
        "lm_head.weight": torch.randn(64, 16, generator=gen),
    }


def _layout(tensors):
    return [(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@pytest.mark.parametrize("streamed", [True, False])
def test_round_trip_single_file(tmp_path, streamed):
    tensors = _tensors()
    writer = ShardedWriter(tmp_path, metadata={"note": "x"}, layout=_layout(tensors) if streamed else None)
    for name, t in tensors.items():
        writer.add(name, t)
    assert writer.finish() == [tmp_path / "model.safetensors"]
    loaded = load_file(tmp_path / "model.safetensors")
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name
    with safe_open(tmp_path / "model.safetensors", framework="pt") as handle:
        assert handle.metadata() == {"format": "pt", "note": "x"}
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # no temporary left


def test_streamed_header_is_aligned_and_tensors_contiguous(tmp_path):
    tensors = _tensors()
    writer = ShardedWriter(tmp_path, layout=_layout(tensors))
    for name, t in tensors.items():
        writer.add(name, t)
    writer.finish()
    raw = (tmp_path / "model.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert header_len % 8 == 0
    header = json.loads(raw[8:8 + header_len])
    spans = sorted(v["data_offsets"] for k, v in header.items() if k != "__metadata__")
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert len(raw) == 8 + header_len + spans[-1][1]


@pytest.mark.parametrize("streamed", [True, False])
def test_sharding_index_and_names(tmp_path, streamed):
    tensors = _tensors()
    cap = _nbytes(tensors["model.embed.weight"]) + 100  # the two big tensors cannot share a shard
    writer = ShardedWriter(tmp_path, max_shard_bytes=cap, layout=_layout(tensors) if streamed else None)
    for name, t in tensors.items():
        writer.add(name, t)
    files = writer.finish()
    count = len(files)
    assert count >= 2
    assert [f.name for f in files] == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(_nbytes(t) for t in tensors.values())
    for f in files:  # every shard but a single oversized tensor respects the cap
        with safe_open(f, framework="pt") as handle:
            sizes = [_nbytes(handle.get_tensor(k)) for k in handle.keys()]
        assert sum(sizes) <= cap or len(sizes) == 1
    ckpt = Checkpoint(tmp_path)
    for name, t in tensors.items():
        assert torch.equal(ckpt.get(name), t)


def test_streamed_tensors_may_arrive_in_any_order(tmp_path):
    tensors = _tensors()
    writer = ShardedWriter(tmp_path, max_shard_bytes=5000, layout=_layout(tensors))
    for name in reversed(list(tensors)):
        writer.add(name, tensors[name])
    writer.finish()
    ckpt = Checkpoint(tmp_path)
    for name, t in tensors.items():
        assert torch.equal(ckpt.get(name), t)


def test_a_shard_is_renamed_into_place_only_when_complete(tmp_path):
    tensors = {"a": torch.ones(100), "b": torch.ones(100), "c": torch.ones(100)}
    writer = ShardedWriter(tmp_path, max_shard_bytes=800, layout=_layout(tensors))  # shards: {a, b}, {c}
    writer.add("a", tensors["a"])
    assert not list(tmp_path.glob("model-*.safetensors"))  # still under a temporary name
    assert list(tmp_path.glob(".*.tmp"))
    writer.add("b", tensors["b"])
    assert [p.name for p in tmp_path.glob("model-*.safetensors")] == ["model-00001-of-00002.safetensors"]
    writer.add("c", tensors["c"])
    writer.finish()
    assert not list(tmp_path.glob(".*.tmp"))


def test_incomplete_output_is_an_error_and_leaves_no_temporaries(tmp_path):
    tensors = _tensors()
    writer = ShardedWriter(tmp_path, layout=_layout(tensors))
    writer.add("model.embed.weight", tensors["model.embed.weight"])
    with pytest.raises(OutputError, match="never written"):
        writer.finish()
    assert not list(tmp_path.iterdir())


def test_streamed_writer_validates_names_shapes_dtypes_and_duplicates(tmp_path):
    tensors = {"a": torch.ones(4), "b": torch.ones(2, 2)}
    writer = ShardedWriter(tmp_path, layout=_layout(tensors))
    with pytest.raises(OutputError, match="not declared"):
        writer.add("zzz", torch.ones(1))
    writer = ShardedWriter(tmp_path, layout=_layout(tensors))
    with pytest.raises(OutputError, match="declared as"):
        writer.add("a", torch.ones(5))
    assert not list(tmp_path.iterdir())  # the failed write removed its partial shard
    writer = ShardedWriter(tmp_path, layout=_layout(tensors))
    with pytest.raises(OutputError, match="declared as"):
        writer.add("b", torch.ones(2, 2, dtype=torch.float64))
    with pytest.raises(OutputError, match="declared twice"):
        ShardedWriter(tmp_path, layout=[("a", (1,), torch.float32), ("a", (1,), torch.float32)])


def test_streamed_writer_holds_no_tensor(tmp_path):
    """The bytes are on disk when ``add`` returns: changing the tensor afterwards changes nothing."""
    t = torch.zeros(1000)
    writer = ShardedWriter(tmp_path, layout=[("t", (1000,), torch.float32), ("u", (1,), torch.float32)])
    writer.add("t", t)
    t.fill_(7.0)
    writer.add("u", torch.ones(1))
    writer.finish()
    assert torch.equal(Checkpoint(tmp_path).get("t"), torch.zeros(1000))


def test_merge_output_is_streamed_into_shards(tmp_path):
    """End to end through the engine: a small shard cap gives several shards that reload to the merged values."""
    from unmerge.engine import merge_checkpoints

    gen = torch.Generator().manual_seed(1)
    base = {f"layers.{i}.weight": torch.randn(32, 32, generator=gen) for i in range(4)}
    base["buffer"] = torch.arange(3)
    paths = []
    for k, scale in enumerate((0.0, 1.0, 2.0)):
        d = tmp_path / f"m{k}"
        d.mkdir()
        writer = ShardedWriter(d)
        for name, t in base.items():
            writer.add(name, t + scale if t.is_floating_point() else t)
        writer.finish()
        paths.append(Checkpoint(d))
    out = tmp_path / "out"
    merge_checkpoints("task_arithmetic", paths[0], paths[1:], out, params={"lambda": 0.5},
                      max_shard_bytes=2 * 32 * 32 * 4, progress=False)
    assert len(list(out.glob("model-*.safetensors"))) >= 2
    merged = Checkpoint(out)
    for name, t in base.items():
        want = t + 1.5 if t.is_floating_point() else t
        torch.testing.assert_close(merged.get(name), want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method, params", [("task_arithmetic", {"lambda": 0.5}),
                                            ("ties", {"density": 0.5, "compat": "mergekit"}),
                                            ("dare_ties", {"density": 0.5, "seed": 3})])
def test_cuda_merge_equals_cpu_merge(tmp_path, method, params):
    """The engine streams each tensor to the device (staged through pinned buffers) and back: same output."""
    from unmerge.engine import merge_checkpoints

    paths = []
    for k in range(3):
        d = tmp_path / f"m{k}"
        d.mkdir()
        writer = ShardedWriter(d)
        gen = torch.Generator().manual_seed(k)
        for i in range(3):
            writer.add(f"layers.{i}.weight", torch.randn(300, 70, generator=gen))
        writer.add("ids", torch.arange(5))
        writer.finish()
        paths.append(Checkpoint(d))
    outs = {}
    for device in ("cpu", "cuda"):
        merge_checkpoints(method, paths[0], paths[1:], tmp_path / device, params=params, device=device,
                          progress=False)
        outs[device] = Checkpoint(tmp_path / device)
    for name in outs["cpu"].names():
        torch.testing.assert_close(outs["cuda"].get(name), outs["cpu"].get(name), rtol=1e-6, atol=1e-7)
