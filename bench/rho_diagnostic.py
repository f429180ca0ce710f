"""Where rho's accuracy goes (issue 15): for each synthetic setting, budget and seed, rho as
`fastsel compare` runs it, and rho with explore=1 (the same holdout, the same charged
budget, but its picks drawn uniformly): the gap between the two is the selection's own
effect; uniform vs rho(explore=1) is the holdout's cost. Also the share of each run's picks
that land on near-copies and on mislabelled samples. Same data and recipe as the compare
runs (n_train 1500, n_test 1000, 10 epochs, batch 32, OMP_NUM_THREADS=1).

    python bench/rho_diagnostic.py [N] [OUT_DIR]   # writes OUT_DIR/diag_n<N>.json (default .)

Results of issue 15: bench/results/compare_issue15/rho_diagnostic/."""
import json, os, sys
import torch
from fastsel.experiments import datasets
import fastsel.experiments.train as T
from fastsel.experiments.train import RunSpec, holdout_split, train_one

N = int(sys.argv[1]) if len(sys.argv) > 1 else 1500
SETTINGS = {"clean": {}, "noisy": {"label_noise": 0.2}, "redundant": {"redundancy": 0.5},
            "noisy_redundant": {"label_noise": 0.2, "redundancy": 0.5}}
captured = {}
orig = T.make_sampler
def spy(spec, data, **kw):
    s = orig(spec, data, **kw)
    captured["s"] = s
    return s
T.make_sampler = spy
out = []
for name, kw in SETTINGS.items():
    d = datasets.synthetic(n_train=N, n_test=1000, **kw)
    copy, noisy = d.masks["near_copy"], d.masks["noisy_label"]
    for b in (0.2, 0.3):
        for seed in range(3):
            for label, p, pk in (("uniform", "uniform", {}), ("rho", "rho", {}), ("rho explore=1", "rho", {"explore": 1.0})):
                spec = RunSpec(p, budget=b, epochs=10, seed=seed, policy_kwargs=pk)
                r = train_one(spec, d.train, d.test, d.channels, d.size, d.classes)
                sel = captured["s"].state.selected.float()
                keep = holdout_split(N, spec.holdout, seed)[0] if p == "rho" else torch.arange(N)
                c, z = copy[keep], noisy[keep]
                row = {"setting": name, "budget": b, "seed": seed, "run": label, "accuracy": r.accuracy,
                       "backward": r.backward, "picks_on_copies": float(sel[c].sum() / sel.sum()),
                       "picks_on_noisy": float(sel[z].sum() / sel.sum()),
                       "base_copies": float(c.float().mean()), "base_noisy": float(z.float().mean())}
                out.append(row)
                print(json.dumps(row), flush=True)
with open(os.path.join(sys.argv[2] if len(sys.argv) > 2 else ".", f"diag_n{N}.json"), "w") as f:
    json.dump(out, f, indent=1)
