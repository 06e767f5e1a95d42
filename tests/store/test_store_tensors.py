"""torch tensors: out of band, one blob per storage, loaded mapped; views stay views."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import pstore

torch = pytest.importorskip("torch", reason="torch is in the test extra for Python 3.11 only "
                                            "(the CPU build lies on these machines' disk)")

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64,
          torch.complex128, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8,
          torch.bool]


def sample(dtype: torch.dtype, shape: tuple[int, ...] = (64, 32)) -> torch.Tensor:
    values = torch.arange(int(torch.tensor(shape).prod()), dtype=torch.float64).reshape(shape)
    if dtype is torch.bool:
        return values.remainder(3) == 0
    return (values.remainder(100) - 50).to(dtype)


def shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype_round_trips_equal(store, dtype):
    tensor = sample(dtype)
    store["t"] = tensor
    loaded = store["t"]
    assert loaded.dtype == dtype and loaded.shape == tensor.shape
    assert torch.equal(loaded, tensor)


def test_a_large_tensor_is_a_blob_and_its_record_is_small(opener):
    store = opener(blob_threshold=1024)
    tensor = torch.randn(1000, 100)
    store["t"] = tensor
    store.close()
    reader = opener("r")
    (key, info), = reader.describe()
    assert info.blobs == 1 and info.blob_bytes == tensor.numel() * 4
    assert info.size < 1000
    assert torch.equal(reader["t"], tensor)


def test_views_of_one_storage_load_as_views_of_one_storage(opener):
    store = opener(blob_threshold=0)
    base = torch.arange(100, dtype=torch.float32)
    grid = base.view(10, 10)
    value = {"base": base, "slice": base[10:20], "column": grid[:, 3], "grid": grid,
             "transposed": grid.t()}
    store["views"] = value
    store.close()
    loaded = opener("r")["views"]
    for name, tensor in value.items():
        assert torch.equal(loaded[name], tensor), name
        assert loaded[name].stride() == tensor.stride(), name
        assert shares_storage(loaded[name], loaded["base"]), name
    assert not loaded["column"].is_contiguous()
    loaded["base"][33] = -1.0       # copy-on-write: the views see it, the store does not
    assert loaded["grid"][3, 3] == -1.0 and loaded["column"][3] == -1.0


def test_offset_non_contiguous_and_empty_tensors(store):
    base = torch.arange(60, dtype=torch.int64).reshape(3, 4, 5)
    value = [base[1:, ::2, 1:4], base.permute(2, 0, 1), torch.empty(0, 3), torch.tensor(7.5)]
    store["odd"] = value
    for loaded, tensor in zip(store["odd"], value, strict=True):
        assert torch.equal(loaded, tensor)
        assert loaded.shape == tensor.shape


def test_requires_grad_parameters_modules_and_optimizer_state(opener):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(5, 8)).sum().backward()
    optimizer.step()
    leaf = torch.ones(3, requires_grad=True)
    store = opener(blob_threshold=0)
    store["model"] = model
    store["state"] = model.state_dict()
    store["optimizer"] = optimizer.state_dict()
    store["leaf"] = leaf
    store.close()
    reader = opener("r")
    loaded = reader["model"]
    assert isinstance(loaded, torch.nn.Sequential)
    for mine, theirs in zip(loaded.parameters(), model.parameters(), strict=True):
        assert isinstance(mine, torch.nn.Parameter) and mine.requires_grad
        assert torch.equal(mine, theirs)
    sample_input = torch.randn(2, 8)
    assert torch.equal(loaded(sample_input), model(sample_input))
    state = reader["state"]
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    saved = reader["optimizer"]["state"]
    for index, entry in optimizer.state_dict()["state"].items():
        assert torch.equal(saved[index]["exp_avg"], entry["exp_avg"])
    assert reader["leaf"].requires_grad and torch.equal(reader["leaf"], leaf)


def test_a_tensor_with_a_hostile_layout_is_refused(store):
    from pstore.store.tensors import rebuild_storage, rebuild_tensor

    storage = rebuild_storage(bytearray(16))
    with pytest.raises(ValueError, match="reaches past its storage of 16 bytes"):
        rebuild_tensor(storage, "float32", (5,), (1,), 0, False, False)
    with pytest.raises(ValueError, match="names the dtype 'system'"):
        rebuild_tensor(storage, "system", (1,), (1,), 0, False, False)
    with pytest.raises(ValueError, match="malformed layout"):
        rebuild_tensor(storage, "float32", (1,), (1,), -1, False, False)


@pytest.mark.slow
def test_a_fresh_process_maps_a_256_mb_tensor_without_reading_it(tmp_path):
    path = tmp_path / "big.db"
    with pstore.open(path) as store:
        store["weights"] = {"w": torch.ones(64 * 1024 * 1024, dtype=torch.float32)}
    program = textwrap.dedent("""
        import os, sys, torch, pstore
        def rss():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        with pstore.open(sys.argv[1], "r") as store:
            before = rss()
            weights = store["weights"]["w"]
            after = rss()
            assert weights.shape == (64 * 1024 * 1024,) and float(weights[12345]) == 1.0
            print(after - before)
    """)
    done = subprocess.run([sys.executable, "-c", program, str(path)], capture_output=True,
                          text=True, check=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert int(done.stdout) < 16 * 1024 * 1024


def test_loading_plain_data_does_not_import_torch(tmp_path):
    with pstore.open(tmp_path / "plain.db") as store:
        store["plain"] = {"a": [1, 2]}
    program = ("import sys, pstore\n"
               "with pstore.open(sys.argv[1], 'r') as s: s['plain']\n"
               "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", program, str(tmp_path / "plain.db")],
                          capture_output=True, text=True, check=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.stdout.strip() == "False"
