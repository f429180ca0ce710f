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


def _rank(rank, world, init_file, beton_path, out_dir):
    import torch.distributed as dist
    sys.path.insert(0, os.path.dirname(__file__))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        s = fastsel.Sampler(N, policy="tftb", budget=0.5, epochs=2, seed=3)
        loader = Loader(beton_path, batch_size=8, num_workers=1, order=Order(s), pipelines=pipelines(),
                        drop_last=False, distributed=True)
        shards = []
        for _ in s.epochs():
            got = []
            for _, lab, ids in loader:
                s.loss(torch.randn(len(ids), 10), lab, ids)
                got += ids.tolist()
            shards.append((got, s._selection.tolist()))
        torch.save(shards, os.path.join(out_dir, f"ffcv{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_get_equal_disjoint_shards(beton, tmp_path):
    import torch.multiprocessing as mp
    mp.start_processes(_rank, args=(2, str(tmp_path / "init"), beton, str(tmp_path)), nprocs=2,
                       join=True, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"ffcv{r}.pt") for r in range(2))
    for (a, sel_a), (b, sel_b) in zip(r0, r1):
        assert sel_a == sel_b
        assert len(a) == len(b) == 60
        assert not set(a) & set(b) and sorted(a + b) == sorted(sel_a)
