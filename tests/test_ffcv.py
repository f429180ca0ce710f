"""fastsel as the order of a real FFCV Loader over a real .beton written from digits."""
import os
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("ffcv", reason="FFCV is installed by the README's commands")

import fastsel  # noqa: E402
from fastsel.ffcv import Order, pipelines, steps_per_epoch, write_beton  # noqa: E402
from ffcv.loader import Loader  # noqa: E402
from ffcv.traversal_order.base import TraversalOrder  # noqa: E402

N = 240


def digits():
    from sklearn.datasets import load_digits
    d = load_digits()
    return d.images[:N] / 16.0, d.target[:N]


@pytest.fixture(scope="module")
def beton(tmp_path_factory):
    images, labels = digits()
    path = str(tmp_path_factory.mktemp("ffcv") / "digits.beton")
    write_beton([(images[i], int(labels[i])) for i in range(N)], path)
    return path


def expected_images(ids):
    images, _ = digits()
    return torch.tensor(np.rint(images[ids] * 255) / 255, dtype=torch.float32)


def make_loader(path, sampler, **kw):
    return Loader(path, batch_size=16, num_workers=1, order=Order(sampler), pipelines=pipelines(),
                  drop_last=False, **kw)


class TinyCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.head = torch.nn.Linear(8 * 16, 10)

    def forward(self, x):
        return self.head(torch.nn.functional.max_pool2d(torch.relu(self.conv(x)), 2).flatten(1))


def train(loader, sampler, model=None, stop=None):
    torch.manual_seed(0)
    model = model or TinyCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stream, per_epoch = [], []
    for e in sampler.epochs():
        expected = sampler.epoch_indices()
        got = []
        for b, (img, lab, ids) in enumerate(loader):
            torch.testing.assert_close(img[:, 0], expected_images(ids.numpy()))  # ids match contents
            assert torch.equal(lab, torch.tensor(digits()[1][ids.numpy()]))
            loss = sampler.loss(model(img), lab, ids)
            opt.zero_grad()
            loss.backward()
            opt.step()
            got += ids.tolist()
            if stop == (e, b):
                return stream + got, per_epoch
        assert got == expected  # the epoch yields exactly the selected set, in its order
        per_epoch.append(got)
        stream += got
    return stream, per_epoch


@pytest.mark.parametrize("policy", ["tftb", "uniform"])
def test_training_through_ffcv_yields_the_selection(beton, policy):
    s = fastsel.Sampler(N, policy=policy, budget=0.3, epochs=4, seed=1)
    loader = make_loader(beton, s)
    assert len(loader) == steps_per_epoch(s, 16, drop_last=False) == 5
    stream, per_epoch = train(loader, s)
    assert len(per_epoch) == 4 and all(len(e) == 72 and len(set(e)) == 72 for e in per_epoch)
    assert s.summary()["passes"] == 4 * 72


def test_first_epoch_asked_twice_gives_the_same_selection(beton):
    s = fastsel.Sampler(N, policy="p-sgd", budget=0.5, epochs=2)
    order = Order(s)
    loader = make_loader(beton, s)  # FFCV asks for epoch 0 while it builds the loader
    first = list(loader.first_traversal_order)
    assert list(loader.traversal_order.sample_order(0)) == first
    assert [i for _, _, ids in loader for i in ids.tolist()] == first
    assert isinstance(order, TraversalOrder)


def test_main_branch_custom_order_path(beton):
    """FFCV's main branch checks issubclass(order, TraversalOrder) and builds the order as
    order(loader, **order_kwargs): both halves of that, on a real loader."""
    assert issubclass(Order, TraversalOrder)
    s = fastsel.Sampler(N, policy="tftb", budget=0.25, epochs=2, seed=4)
    loader = Loader(beton, batch_size=16, num_workers=1, pipelines=pipelines(), drop_last=False)
    loader.traversal_order = Order(loader, **{"sampler": s})
    loader.first_traversal_order = loader.next_traversal_order()
    stream, per_epoch = train(loader, s)
    assert [len(e) for e in per_epoch] == [60, 60]


def test_jpeg_beton_ids_match_their_images(tmp_path):
    images, labels = digits()
    big = np.kron(images[:50], np.ones((4, 4)))  # 32x32, so JPEG blocks have room
    path = write_beton([(big[i], int(labels[i])) for i in range(50)], str(tmp_path / "j.beton"),
                       image_format="jpeg", jpeg_quality=95)
    s = fastsel.Sampler(50, policy="uniform", budget=1.0, epochs=1)
    loader = Loader(path, batch_size=10, num_workers=1, order=Order(s), pipelines=pipelines(), drop_last=False)
    ref = torch.tensor(big, dtype=torch.float32)
    for img, lab, ids in loader:
        for row, i in zip(img[:, 0], ids.tolist()):
            err = (ref - row).abs().mean(dim=(1, 2))
            assert int(err.argmin()) == i and float(err[i]) < 0.05


def test_resume_mid_training_gives_the_same_remaining_order(beton):
    s = fastsel.Sampler(N, policy="tftb", budget=0.3, epochs=4, seed=2)
    full, _ = train(make_loader(beton, s), s)
    s = fastsel.Sampler(N, policy="tftb", budget=0.3, epochs=4, seed=2)
    torch.manual_seed(0)
    model = TinyCNN()  # the same initial weights as train() makes; plain SGD keeps no state
    part, _ = train(make_loader(beton, s), s, model=model, stop=(1, 1))
    sd = s.state_dict()
    r = fastsel.Sampler(N, policy="tftb", budget=0.3, epochs=4, seed=2)
    r.load_state_dict(sd)
    # A new Loader restarts FFCV's epoch counter at 0; the order follows the sampler.
    rest, _ = train(make_loader(beton, r), r, model=model)
    assert len(part) == 72 + 32
    assert part + rest == full


def test_wrong_setups_are_refused(beton):
    with pytest.raises(TypeError, match="fastsel.Sampler"):
        Order(object())
    with pytest.raises(ValueError, match="N=100"):
        Loader(beton, batch_size=8, num_workers=1, order=Order(fastsel.Sampler(100, budget=0.5, epochs=1)),
               pipelines=pipelines())
    with pytest.raises(ValueError, match="image_format"):
        write_beton([(np.zeros((4, 4)), 0)], "/tmp/x.beton", image_format="png")


# ---- Loader(indices=...): the sampler's N is len(indices), its sample i is the file's indices[i]

SUBSETS = {
    "first half": np.arange(120),                         # ids and sampler indices coincide
    "second half": np.arange(120, 240),                   # refused before the rule existed
    "scattered, unsorted": np.random.default_rng(7).permutation(N)[:100],
    "whole file, permuted": np.random.default_rng(8).permutation(N),
}


@pytest.mark.parametrize("name", list(SUBSETS))
def test_subset_loader_trains_the_selection_mapped_to_file_ids(beton, name):
    subset = SUBSETS[name]
    s = fastsel.Sampler(len(subset), policy="tftb", budget=0.5, epochs=3, seed=5)
    order = Order(s)
    loader = Loader(beton, batch_size=16, num_workers=1, indices=subset, order=order, pipelines=pipelines(),
                    drop_last=False)
    torch.manual_seed(0)
    model = TinyCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trained = torch.zeros(len(subset), dtype=torch.int64)
    for _ in s.epochs():
        selection = s.epoch_indices()
        got, mapped = [], []
        for img, lab, ids in loader:
            torch.testing.assert_close(img[:, 0], expected_images(ids.numpy()))  # ids are the file's
            assert torch.equal(lab, torch.tensor(digits()[1][ids.numpy()]))
            sids = order.sampler_ids(ids)
            assert sids.dtype == torch.int64 and torch.equal(torch.from_numpy(subset)[sids], ids)
            loss = s.loss(model(img), lab, sids)
            opt.zero_grad()
            loss.backward()
            opt.step()
            got += ids.tolist()
            mapped += sids.tolist()
            trained[sids] += 1
        assert mapped == selection                      # the sampler's selection, in its order,
        assert got == subset[selection].tolist()        # read as the file's samples indices[sel]
        assert len(got) == len(subset) // 2
    assert s.summary()["passes"] == 3 * (len(subset) // 2)
    assert torch.equal(s.state.seen.cpu().long(), trained)  # the observations went to the right samples


def test_sampler_ids_maps_file_ids_back(beton):
    subset = np.array([200, 3, 57, 120, 9])
    order = Order(fastsel.Sampler(5, budget=1.0, epochs=1))
    with pytest.raises(RuntimeError, match="not bound"):
        order.sampler_ids(torch.tensor([3]))
    Loader(beton, batch_size=2, num_workers=1, indices=subset, order=order, pipelines=pipelines())
    ids = torch.tensor([3, 200, 9, 9, 120, 57])
    assert order.sampler_ids(ids).tolist() == [1, 0, 4, 4, 3, 2]
    assert order.sampler_ids(torch.tensor([0, 239])).tolist() == [-1, -1]  # not read by this Loader
    assert order.sampler_ids(torch.tensor([], dtype=torch.int64)).shape == (0,)
    whole = Order(fastsel.Sampler(N, budget=1.0, epochs=1))
    Loader(beton, batch_size=2, num_workers=1, order=whole, pipelines=pipelines())
    assert whole.sampler_ids(ids) is ids  # the whole file in order: the ids are the sampler's
    explicit = Order(fastsel.Sampler(N, budget=1.0, epochs=1))
    Loader(beton, batch_size=2, num_workers=1, indices=range(N), order=explicit, pipelines=pipelines())
    assert explicit.sampler_ids(ids) is ids


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sampler_ids_on_the_gpu_without_a_host_sync(beton):
    subset = np.arange(239, -1, -2)
    order = Order(fastsel.Sampler(len(subset), budget=1.0, epochs=1))
    Loader(beton, batch_size=8, num_workers=1, indices=subset, order=order, pipelines=pipelines())
    ids = torch.tensor([239, 1, 101], device="cuda")
    order.sampler_ids(ids)  # the table goes to the device once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = order.sampler_ids(ids)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.device == ids.device and out.tolist() == [0, 119, 69]


@pytest.mark.parametrize("indices,sampler_n,match", [
    ([5, 6, 5, 7], 4, r"indices=.*position\(s\) more than once \(e.g. 5\).*np.unique"),
    ([0, 1, N], 3, rf"indices=.*position {N}, outside the .beton's {N} samples"),
    ([-1, 0, 1], 3, r"indices=.*position -1, outside"),
    ([0.0, 1.0], 2, r"indices=.*integer positions.*float64"),
    (np.arange(N) % 2 == 0, N, r"indices=.*np.flatnonzero\(mask\)"),
    (np.arange(60), 50, r"reads 60 samples \(len\(indices\)\).*N=50.*N=len\(indices\)"),
    (np.arange(60, 120), 240, r"reads 60 samples \(len\(indices\)\).*N=240"),
    (None, 100, r"whole .beton, 240 samples.*N=100.*indices="),
])
def test_subsets_it_cannot_map_are_refused(beton, indices, sampler_n, match):
    order = Order(fastsel.Sampler(sampler_n, budget=0.5, epochs=1))
    with pytest.raises(ValueError, match=match):
        Loader(beton, batch_size=8, num_workers=1, indices=indices, order=order, pipelines=pipelines())
    with pytest.raises(RuntimeError, match="not bound"):  # a refused loader leaves it unbound
        order.sampler_ids(torch.tensor([0]))


def test_a_beton_whose_ids_are_not_its_positions_is_refused(tmp_path):
    """The ids are the file's only if its index field holds each sample's position, as
    write_beton writes it; a file written otherwise would train the wrong samples."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    class Shifted:
        def __len__(self):
            return 20

        def __getitem__(self, i):
            return np.zeros((4, 4, 3), dtype=np.uint8), 0, i + 1000

    path = str(tmp_path / "shifted.beton")
    DatasetWriter(path, {"image": RGBImageField(write_mode="raw"), "label": IntField(), "index": IntField()},
                  num_workers=1).from_indexed_dataset(Shifted())
    with pytest.raises(ValueError, match="index field is not each sample's position.*id 1000.*write_beton"):
        Loader(path, batch_size=4, num_workers=1, order=Order(fastsel.Sampler(20, budget=1.0, epochs=1)),
               pipelines=pipelines())


def test_readme_subset_example_runs(beton):
    import re
    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "ffcv.md")) as f:
        block = next(b for b in re.findall(r"```python\n(.*?)```", f.read(), re.S) if "sampler_ids" in b)
    for real, small in (('device="cuda"', "device=None"), ("epochs=30", "epochs=2"), ("num_workers=8", "num_workers=1"),
                        ("batch_size=256", "batch_size=16")):  # a 240-sample file, on the CPU
        assert real in block
        block = block.replace(real, small)
    labels = digits()[1]
    keep = labels != 0  # every file sample but the zeros
    scope = {"np": np, "fastsel": fastsel, "Loader": Loader, "path": beton, "keep": keep, "model": TinyCNN()}
    exec(compile(block, "docs/ffcv.md", "exec"), scope)
    s, order, ids = scope["sampler"], scope["order"], scope["ids"]
    assert s.n == int(keep.sum()) and s.summary()["passes"] >= 2 * 4 * 16
    assert int(s.state.seen.sum()) == s.summary()["passes"]
    assert (scope["labels"] != 0).all()  # the last batch: file samples of the subset only
    assert torch.equal(torch.from_numpy(np.flatnonzero(keep))[order.sampler_ids(ids)], ids)


def _rank(rank, world, init_file, beton_path, out_dir, indices=None):
    import torch.distributed as dist
    sys.path.insert(0, os.path.dirname(__file__))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        s = fastsel.Sampler(N if indices is None else len(indices), policy="tftb", budget=0.5, epochs=2, seed=3)
        order = Order(s)
        loader = Loader(beton_path, batch_size=8, num_workers=1, order=order, pipelines=pipelines(),
                        drop_last=False, distributed=True, indices=indices)
        shards = []
        for _ in s.epochs():
            got = []
            for _, lab, ids in loader:
                s.loss(torch.randn(len(ids), 10), lab, order.sampler_ids(ids))
                got += ids.tolist()
            shards.append((got, s.cursor.selection.tolist()))
        torch.save(shards, os.path.join(out_dir, f"ffcv{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("indices", [None, np.arange(239, 119, -1)], ids=["whole file", "subset"])
def test_two_gloo_ranks_get_equal_disjoint_shards(beton, tmp_path, indices):
    import torch.multiprocessing as mp
    mp.start_processes(_rank, args=(2, str(tmp_path / "init"), beton, str(tmp_path), indices), nprocs=2,
                       join=True, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"ffcv{r}.pt") for r in range(2))
    to_file = (lambda sel: sel) if indices is None else (lambda sel: indices[sel].tolist())
    for (a, sel_a), (b, sel_b) in zip(r0, r1):
        assert sel_a == sel_b
        assert len(a) == len(b) == (60 if indices is None else 30)
        assert not set(a) & set(b) and sorted(a + b) == sorted(to_file(sel_a))


def test_an_ffcv_loop_past_the_budget_trains_the_budget_and_warns_once(beton):
    """A loop that never asks ``sampler.epochs()`` (``for e in range(E)``) still trains
    exactly the budget: past it the order is empty and one warning says why."""
    import warnings
    s = fastsel.Sampler(N, policy="tftb", budget=0.25, epochs=2, seed=3)
    loader = make_loader(beton, s)
    model = TinyCNN()
    per_epoch = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            rows = 0
            for img, lab, ids in loader:
                s.loss(model(img), lab, ids).backward()
                rows += len(ids)
            per_epoch.append(rows)
    assert per_epoch == [60, 60, 0, 0]
    assert len([w for w in caught if "budget is spent" in str(w.message)]) == 1
    assert s.summary()["passes"] == 120
