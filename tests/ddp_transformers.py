"""Run by tests/test_transformers.py under ``torchrun --nproc_per_node=2`` (gloo, CPU): each
rank trains the budget through SamplerTrainer, then resumes a second run from a mid-epoch
checkpoint, and writes what it trained to ``OUT/rank{rank}.json``."""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fastsel  # noqa: E402
from fastsel.transformers import INDEX_KEY, SamplerTrainer  # noqa: E402
from test_transformers import EPOCHS, Images, Recorder, StopAt, make_args, vit  # noqa: E402

out = sys.argv[1]


class Selections(Recorder):
    """Also records each epoch's whole selection (every rank draws the same one)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if INDEX_KEY in inputs and self.sampler.epoch == len(self.selections):
            self.selections.append(sorted(self.sampler.cursor.selection.tolist()))
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def run(root, resume=None, callbacks=()):
    args = make_args(root, save_strategy="steps", save_steps=4, ddp_backend="gloo")
    # The TrainingArguments know this process's rank and the world size.
    s = fastsel.Sampler(len(Images()), policy="tftb", budget=0.5, epochs=EPOCHS, seed=0,
                        num_replicas=args.world_size, rank=args.process_index)
    t = Selections(sampler=s, model=vit(), args=args, train_dataset=Images(), callbacks=list(callbacks))
    t.rows, t.lrs, t.labels, t.selections = [], [], [], []
    t.train(resume_from_checkpoint=resume)
    return t, s, args


full, s, args = run(out + "/a")
part, _, _ = run(out + "/b", callbacks=[StopAt(4)])            # 3 steps an epoch: mid-epoch 1
rest, _, _ = run(out + "/b", resume=out + "/b/checkpoint-4")
try:
    SamplerTrainer(sampler=fastsel.Sampler(len(Images()), budget=0.5, epochs=EPOCHS, num_replicas=1, rank=0),
                   model=vit(), args=args,
                   train_dataset=Images())
    refused = ""
except ValueError as e:
    refused = str(e)
weights = [round(float(v.double().sum()), 12) for v in full.model.state_dict().values()]
json.dump({"full": full.rows, "part": part.rows, "rest": rest.rows, "steps": full.state.global_step,
           "resumed_steps": rest.state.global_step, "passes": s.summary()["passes"],
           "lr": full.optimizer.param_groups[0]["lr"], "selections": full.selections, "weights": weights,
           "same_weights": all(torch.equal(a, b) for a, b in zip(full.model.state_dict().values(),
                                                                   rest.model.state_dict().values())),
           "refused": refused}, open(f"{out}/rank{args.process_index}.json", "w"))
