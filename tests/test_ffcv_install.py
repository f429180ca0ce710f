"""FFCV's install path (issue 2 proves it; the integration comes with fastsel.ffcv): a real
.beton written from digits and read back through FFCV's Loader in a given order."""
import numpy as np
import pytest

ffcv = pytest.importorskip("ffcv", reason="FFCV is installed by the README's commands")


def test_ffcv_writes_and_reads_a_beton(tmp_path):
    from ffcv.fields import IntField, NDArrayField
    from ffcv.fields.decoders import IntDecoder, NDArrayDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.writer import DatasetWriter
    from sklearn.datasets import load_digits

    d = load_digits()
    n = 100
    images = d.images[:n].astype(np.float32)
    labels = d.target[:n]

    class Digits:
        def __len__(self):
            return n

        def __getitem__(self, i):
            return images[i], int(labels[i]), i

    path = str(tmp_path / "digits.beton")
    DatasetWriter(path, {"image": NDArrayField(shape=(8, 8), dtype=np.dtype("float32")),
                         "label": IntField(), "id": IntField()}, num_workers=1).from_indexed_dataset(Digits())
    loader = Loader(path, batch_size=16, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [NDArrayDecoder()], "label": [IntDecoder()], "id": [IntDecoder()]})
    seen = []
    for img, lab, ids in loader:
        ids = np.asarray(ids).reshape(-1)
        np.testing.assert_array_equal(np.asarray(img), images[ids])
        np.testing.assert_array_equal(np.asarray(lab).reshape(-1), labels[ids])
        seen += ids.tolist()
    assert seen == list(range(n))
