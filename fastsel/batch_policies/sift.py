"""SIFT (Das, Chen, Ieong, Bansal, Sanghavi, "Understanding the Training Speedup from
Sampling with Approximate Losses", arXiv 2402.07052; seeds 003/004): approximate losses
from an early exit pick the rows of each mini-batch that get the full forward/backward."""
from __future__ import annotations

import copy
import time
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..validation import values
from ..validation.fields import check_fields, check_int, check_real, refuse
from ..validation.values import round_half_up
from .base import BatchPolicy, check_keep, spearman
from .step_api import StepView


class _StopForward(Exception):
    """Raised by the exit hook to end a selection forward at the exit module."""


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"the exit module must output a tensor (or a tuple starting with one), "
                    f"got {type(out).__name__}")


def pool_channels_first(feat: torch.Tensor) -> torch.Tensor:
    """Global average pool of [B, C, *spatial] to [B, C] ([B, C] stays as is)."""
    return feat.flatten(2).mean(2) if feat.dim() > 2 else feat


def pool_channels_last(feat: torch.Tensor) -> torch.Tensor:
    """Mean over the middle dims of [B, *tokens, C] to [B, C] (transformer layers)."""
    return feat.flatten(1, -2).mean(1) if feat.dim() > 2 else feat


_POOLS = {"channels_first": pool_channels_first, "channels_last": pool_channels_last}


def module_names(model: nn.Module, limit: int = 8) -> str:
    names = [n for n, _ in model.named_modules() if n]
    more = f", … ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(repr(n) for n in names[:limit]) + more


class SIFT(BatchPolicy):
    """SIFT: an exit head on an intermediate module's pooled output gives approximate
    per-sample losses; the top ``keep`` share of each mini-batch by approximate loss gets
    the full forward and backward pass (Das et al. 2024, seeds 003/004).

    Args:
        module: the exit's module, by its name in ``model.named_modules()``.
        keep: share of each mini-batch kept (default 0.5, the paper's 50%).
        num_classes: the exit head's outputs; if None, the first step runs one full
            forward (without gradients) to read it from the logits.
        pool: "channels_first" (default: global average pool of [B, C, H, W]),
            "channels_last" (mean over tokens of [B, T, C]) or a callable [B, ...] → [B, D].
            The exit head is a BatchNorm without affine parameters (a standardisation of
            the pooled features) and a linear layer.
        exit_lr: learning rate of the exit head's own Adam optimizer. The head is trained
            jointly, every step, on the detached pooled features of the whole mini-batch,
            so it never changes the model's gradients.
        stop_at_exit: end the selection forward at the exit (an exception raised by the
            hook, caught here), so it costs only the layers up to the exit. Set False for a
            model whose forward must run to the end; it then costs a full forward.
        probe_every: every this many steps, the whole batch also gets a forward pass
            without gradients, before the update, so that the Spearman rank correlation
            between approximate and true losses is measured on it (0: never). Those
            forward passes are counted separately (``probe_forward``).
    """

    name = "sift"

    def __init__(self, module: Optional[str] = None, keep: Optional[float] = None,
                 num_classes: Optional[int] = None,
                 pool: Union[str, Callable[[torch.Tensor], torch.Tensor]] = "channels_first",
                 exit_lr: float = 1e-3, stop_at_exit: bool = True, probe_every: int = 20) -> None:
        if not isinstance(module, str) or not module:
            raise ValueError(f"SIFT needs module=, the name of an intermediate module in "
                             f"model.named_modules(), got module={module!r}")
        self.keep = check_keep(0.5 if keep is None else keep)
        num_classes = values.check_int("num_classes", num_classes, lo=1, allow_none=True,
                                       what="None or an int")
        if isinstance(pool, str):
            if pool not in _POOLS:
                raise ValueError(f"pool must be one of {sorted(_POOLS)} or a callable, got {pool!r}")
            pool = _POOLS[pool]
        elif not callable(pool):
            raise ValueError(f"pool must be one of {sorted(_POOLS)} or a callable, got {pool!r}")
        values.check_real("exit_lr", exit_lr, lo=0, lo_open=True)
        probe_every = values.check_int("probe_every", probe_every, lo=0)  # type: ignore[assignment]
        self.module_name = module
        self.num_classes = num_classes
        self.pool = pool
        self.exit_lr = float(exit_lr)
        self.stop_at_exit = bool(stop_at_exit)
        self.probe_every = probe_every
        self.head: Optional[nn.Sequential] = None
        self.head_opt: Optional[torch.optim.Optimizer] = None
        self._handle: Any = None
        self._model: Optional[nn.Module] = None
        self._capture = False
        self._stop = False
        self._feat: Optional[torch.Tensor] = None
        self.steps = 0
        self.exit_time = 0.0
        self.exit_logits: Optional[torch.Tensor] = None
        self.ran_full = False
        self.correlations: list = []

    # ---- the hook ---------------------------------------------------------------------
    def attach(self, step: StepView) -> None:
        mods = dict(step.model.named_modules())
        if self.module_name not in mods or not self.module_name:
            raise ValueError(f"module={self.module_name!r} is not in model.named_modules(); "
                             f"valid names include {module_names(step.model)}")
        self._handle = mods[self.module_name].register_forward_hook(self._hook)
        self._model = step.model

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if self._capture:
            self._feat = _first_tensor(output)
            if self._stop:
                raise _StopForward()

    def _exit_features(self, step: StepView, x: torch.Tensor,
                       stop: bool) -> Optional[torch.Tensor]:
        """Run the model up to the exit (or to the end) without gradients; returns the
        logits when the forward ran to the end."""
        self._capture, self._stop, self._feat = True, stop, None
        logits = None
        try:
            with torch.no_grad(), step.autocast_ctx(x):
                logits = step.model(x)
        except _StopForward:
            pass
        finally:
            self._capture, self._stop = False, False
        if self._feat is None:
            raise RuntimeError(f"module {self.module_name!r} did not run in the model's forward, "
                               f"so SIFT's exit saw nothing; name a module the forward calls")
        return logits

    def _new_head(self, d: int, c: int, device: torch.device) -> Tuple[nn.Sequential, torch.optim.Optimizer]:
        # Pooled early features have tiny, uneven scales; a parameter-free standardisation
        # (BatchNorm without affine) lets the linear head learn at a plain learning rate.
        g = torch.Generator().manual_seed(0x51F7)
        lin = nn.Linear(d, c)
        with torch.no_grad():
            bound = 1.0 / d ** 0.5
            lin.weight.uniform_(-bound, bound, generator=g)
            lin.bias.uniform_(-bound, bound, generator=g)
        head = nn.Sequential(nn.BatchNorm1d(d, affine=False), lin).to(device)
        return head, torch.optim.Adam(head.parameters(), lr=self.exit_lr)

    def _build_head(self, d: int, c: int, device: torch.device) -> None:
        self.head, self.head_opt = self._new_head(d, c, device)

    # ---- the step ---------------------------------------------------------------------
    def approximate(self, step: StepView, x: torch.Tensor, y: torch.Tensor,
                    update: bool = True) -> torch.Tensor:
        """The exit's per-sample losses (its logits go to ``self.exit_logits``), computed
        before the head learns from this batch; ``update`` then trains the head one step.
        The head standardises with the batch's statistics (running ones for one row)."""
        need_full = self.head is None and self.num_classes is None
        logits = self._exit_features(step, x, stop=self.stop_at_exit and not need_full)
        feat = self.pool(self._feat.detach()).float()  # type: ignore[union-attr]
        self._feat = None
        self.ran_full = logits is not None
        if self.head is None:
            c = self.num_classes if self.num_classes is not None else int(logits.shape[1])  # type: ignore[union-attr]
            self._build_head(int(feat.shape[1]), c, feat.device)
        self.head.train(feat.shape[0] > 1)  # type: ignore[union-attr]
        with torch.enable_grad():
            out = self.head(feat)  # type: ignore[misc]
            per = F.cross_entropy(out, y.to(torch.int64), reduction="none",
                                  ignore_index=step.ignore_index)
            if update:
                active = (y != step.ignore_index).sum().clamp(min=1)
                self.head_opt.zero_grad(set_to_none=True)  # type: ignore[union-attr]
                (per.sum() / active).backward()
                self.head_opt.step()  # type: ignore[union-attr]
        self.exit_logits = out.detach()
        return per.detach()

    def choose(self, step: StepView, x: torch.Tensor, y: torch.Tensor,
               idx: Optional[torch.Tensor]) -> torch.Tensor:
        t0 = time.perf_counter()
        step.sync_for_timing()
        approx = self.approximate(step, x, y)
        if self.ran_full:
            step.count_selection_forward(int(x.shape[0]))
        else:
            step.count_exit_forward(int(x.shape[0]))
        # The epoch-level sampler sees every row once, with the exit's logits.
        step.observe(self.exit_logits, y, idx)  # type: ignore[arg-type]
        step.sync_for_timing()
        self.exit_time += time.perf_counter() - t0
        t1 = step.clock()
        b = int(x.shape[0])
        k = max(1, min(b, round_half_up(self.keep * b)))
        pos = step.topk(approx, k)
        step.add_selection_time(t1)
        if self.probe_every and (self.steps + 1) % self.probe_every == 0:
            # True losses of the whole batch, before the update: one forward without
            # gradients on all rows, so every row sees the same batch (and BatchNorm
            # statistics) as the exit did.
            true = step.probe_losses(x, y)
            active = y != step.ignore_index
            if int(active.sum()) > 1:
                self.correlations.append(spearman(approx[active], true[active]))
        return pos

    def after_train(self, step: StepView, x: torch.Tensor, y: torch.Tensor,
                    idx: Optional[torch.Tensor], chosen: torch.Tensor,
                    train_losses: torch.Tensor) -> None:
        self.steps += 1

    def summary(self) -> Dict[str, Any]:
        corr = [c for c in self.correlations if c == c]
        recent = corr[-10:]
        return {"exit_module": self.module_name, "exit_time_s": self.exit_time,
                "rank_correlation": (sum(recent) / len(recent)) if recent else None,
                "rank_correlation_mean": (sum(corr) / len(corr)) if corr else None,
                "probes": len(self.correlations)}

    def config(self) -> Dict[str, Any]:
        return {"name": self.name, "module": self.module_name, "keep": self.keep}

    def state_dict(self) -> Dict[str, Any]:
        return {"head": None if self.head is None else self.head.state_dict(),
                "head_opt": None if self.head_opt is None else self.head_opt.state_dict(),
                "shape": None if self.head is None else (self.head[1].in_features, self.head[1].out_features),
                "steps": self.steps, "exit_time": self.exit_time,
                "correlations": list(self.correlations)}

    def _loaded_head(self, sd: Dict[str, Any]
                     ) -> Optional[Tuple[nn.Sequential, torch.optim.Optimizer]]:
        """A new exit head and its optimizer holding copies of ``sd``'s (None if ``sd`` has
        none), or a ValueError naming the field that does not fit; touches nothing here."""
        if sd["head"] is None:
            for key in ("head_opt", "shape"):
                if sd[key] is not None:
                    raise refuse(f"policy.{key}", "must be None when policy.head is None")
            return None
        shape = sd["shape"]
        if not isinstance(shape, (tuple, list)) or len(shape) != 2:
            raise refuse("policy.shape", f"must be (features, classes) of the exit head, got {shape!r}")
        d = check_int("policy.shape[0]", shape[0], lo=1)
        c = check_int("policy.shape[1]", shape[1], lo=1)
        if self.num_classes is not None and c != self.num_classes:
            raise refuse("policy.shape", f"is for an exit head of {c} classes, this policy has "
                                         f"num_classes={self.num_classes}")
        for key in ("head", "head_opt"):
            if not isinstance(sd[key], dict):
                raise refuse(f"policy.{key}", f"must be a state_dict (a dict), got {type(sd[key]).__name__}")
        p = next(self._model.parameters(), None) if self._model is not None else None
        dev = p.device if p is not None else torch.device("cpu")
        head, opt = self._new_head(d, c, dev)
        try:
            head.load_state_dict(sd["head"])   # copies into the new head's own tensors
        except (RuntimeError, KeyError, TypeError, ValueError) as e:
            raise refuse("policy.head", f"does not fit an exit head of shape {(d, c)}: {e}") from None
        try:
            # The optimizer keeps the tensors it is given when device and dtype match: copies.
            opt.load_state_dict(copy.deepcopy(sd["head_opt"]))
        except (RuntimeError, KeyError, TypeError, ValueError, IndexError) as e:
            raise refuse("policy.head_opt", f"does not fit the exit head's Adam optimizer: {e}") from None
        return head, opt

    def check_state_dict(self, sd: Any) -> None:
        super().check_state_dict(sd)
        check_fields(sd, ("head", "head_opt", "shape", "steps", "exit_time", "correlations"), "policy")
        check_int("policy.steps", sd["steps"], lo=0)
        check_real("policy.exit_time", sd["exit_time"], lo=0.0)
        corr = sd["correlations"]
        if not isinstance(corr, (list, tuple)):
            raise refuse("policy.correlations", f"must be a list of numbers, got {type(corr).__name__}")
        for i, v in enumerate(corr):
            check_real(f"policy.correlations[{i}]", v, allow_nan=True)  # NaN: a constant batch
        self._loaded_head(sd)

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        self.check_state_dict(sd)
        loaded = self._loaded_head(sd)
        self.head, self.head_opt = (None, None) if loaded is None else loaded
        self.steps = int(sd["steps"])
        self.exit_time = float(sd["exit_time"])
        self.correlations = [float(v) for v in sd["correlations"]]
