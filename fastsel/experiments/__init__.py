"""The experiment harness, apart from the library: the training recipe (``train``), the
datasets (``datasets``), policy × budget comparisons (``compare``, ``tables``), their
report and plots (``report``) and the micro-benchmarks (``bench``). ``fastsel compare``,
``fastsel report`` and ``fastsel bench`` run them. The library (``fastsel.Sampler`` and
the rest) never imports this package.

Until issue 20 these modules sat beside the library as ``fastsel.train``,
``fastsel.compare``, ``fastsel.report``, ``fastsel.datasets`` and ``fastsel.bench``; those
names still import, with a DeprecationWarning (``fastsel/_moved.py``)."""
