"""The interface a batch policy may use of its step (``fastsel.batch_policies.StepView``):
SelectiveStep satisfies it, the built-in policies use exactly it and never import the
step's modules, and a user's policy written against it runs."""
import ast
import os

import torch
import torch.nn.functional as F

from fastsel.batch_policies import BatchPolicy, StepView
from fastsel.selective import SelectiveStep
from test_selective import data, mlp  # noqa: E402  (the same small model and data)

POLICY_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "fastsel", "batch_policies")


def _policy_modules():
    for f in sorted(os.listdir(POLICY_DIR)):
        if f.endswith(".py"):
            with open(os.path.join(POLICY_DIR, f)) as fh:
                yield f, ast.parse(fh.read())


def _step_view_members():
    return set(StepView.__annotations__) | {k for k, v in vars(StepView).items()
                                            if not k.startswith("_") and (callable(v) or isinstance(v, property))}


def test_selective_step_satisfies_the_step_view():
    for policy, kw in (("sb", {}), ("osgd", {}), ("sift", {"module": "1"})):
        assert isinstance(SelectiveStep(mlp(), policy, **kw), StepView)
    assert not isinstance(object(), StepView)


#: The step's own modules, which no batch policy may import.
STEP_MODULES = {"fastsel.selective", "fastsel.selective_state", "fastsel.step_passes",
                "fastsel.step_schedule"}


def _imported(node):
    """The absolute names an import statement of fastsel/batch_policies/ names."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = ".".join(["fastsel", "batch_policies"][:3 - node.level]) if node.level else ""
    mod = ".".join(p for p in (base, node.module) if p)
    return [mod] + [f"{mod}.{a.name}" for a in node.names]


def test_policies_use_exactly_the_step_view_and_never_import_the_step():
    used = set()
    for name, tree in _policy_modules():
        for node in ast.walk(tree):       # module level, function-local and TYPE_CHECKING alike
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                assert not STEP_MODULES & set(_imported(node)), (name, _imported(node))
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id == "step":
                used.add(node.attr)
    assert used == _step_view_members()


def test_a_policy_written_against_the_step_view_runs():
    class LowestLoss(BatchPolicy):
        """Backprop the k rows of lowest loss (an example of a user's own policy)."""
        name = "lowest"

        def choose(self, step: StepView, x, y, idx):
            losses = step.selection_forward(x, y, idx)
            return step.topk(-losses, 4)

    x, y = data(n=16)
    model = mlp()
    with torch.no_grad():
        expect = sorted(torch.topk(-F.cross_entropy(model(x), y, reduction="none"), 4).indices.tolist())
    s = SelectiveStep(model, LowestLoss())
    s.step(x, y)
    assert s.last["chosen"].tolist() == expect and s.summary()["backward_passes"] == 4
