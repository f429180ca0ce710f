"""Why rho picks mislabelled samples (issue 15): one rho run on the noisy synthetic set
(N = 1,500, B = 0.3), then each group's train-loss EMA, irreducible and reducible loss, and
the mislabelled share of the top reducible losses. Printed; the issue-15 output is
bench/results/compare_issue15/rho_diagnostic/mechanism.log.

    python bench/rho_mechanism.py
"""
import torch
from fastsel.experiments import datasets
import fastsel.experiments.train as T
from fastsel.experiments.train import RunSpec, holdout_split, train_one
cap = {}
orig = T.make_sampler
def spy(spec, data, **kw):
    s = orig(spec, data, **kw); cap["s"] = s; cap["irr"] = kw.get("irreducible"); return s
T.make_sampler = spy
d = datasets.synthetic(n_train=1500, n_test=1000, label_noise=0.2)
spec = RunSpec("rho", budget=0.3, epochs=10, seed=0)
r = train_one(spec, d.train, d.test, d.channels, d.size, d.classes)
st = cap["s"].state; irr = cap["irr"]
keep = holdout_split(1500, 0.1, 0)[0]
z = d.masks["noisy_label"][keep]
seen = st.seen > 0
for name, m in (("noisy", z & seen), ("clean", ~z & seen)):
    print(name, f"train-loss EMA {st.loss[m].mean():.2f}  irreducible {irr[m].mean():.2f}  reducible {(st.loss - irr)[m].mean():.2f}  median reducible {(st.loss - irr)[m].median():.2f}  picked/sample {st.selected[m].float().mean():.2f}")
red = torch.where(seen, st.loss - irr, torch.full_like(irr, -1e9))
k = int(0.19 * len(irr))
top = red.topk(k).indices
print(f"top {k} by reducible loss: {z[top].float().mean():.2f} mislabelled (base {z.float().mean():.2f}); their train loss {st.loss[top][z[top]].mean():.2f} vs irreducible {irr[top][z[top]].mean():.2f}")
