"""`RigL`: sparse training in your own PyTorch loop, in three lines.

    rigl = RigL(model, optimizer, sparsity=0.9, total_steps=T)
    ...
    loss.backward()
    if rigl.step():          # masks gradients; on a mask-update step RigL replaces the optimizer step
        optimizer.step()

The caller (or a framework: AMP, Accelerate, Lightning, the Hugging Face Trainer) calls
`optimizer.step()` itself, so RigL never has to own the loop. The invariant that makes this safe:
inactive weights are exactly 0 and stay 0 through the optimizer step, because `step()` masks the
gradients and every mask change zeroes the optimizer state (momentum, Adam moments) at inactive
positions; SGD (momentum, Nesterov, weight decay), Adam and AdamW then move no inactive weight
(rigl_core/sparse/masking.py). SET and GMP change masks after the optimizer step: a step post-hook on the
optimizer does it, whoever calls `optimizer.step()`.

With fp16 and a `torch.amp.GradScaler`:

    scaler.scale(loss).backward()
    if rigl.step(scaler=scaler):   # unscales first: grow scores are true gradients
        scaler.step(optimizer)     # an overflowing step is skipped: no optimizer step, no drop/grow
    scaler.update()

The service's Trainer runs its steps through this same class.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from rigl_core.sparse.build import build_sparsifier
from rigl_core.sparse.plan import Plan
from rigl_core.sparse.updater import Sparsifier
from rigl_core.sparse.updates import MaskUpdate
from rigl_core.spec import ScheduleSpec, SparsitySpec

STATE_VERSION = 1


class RigL:
    """Masks, schedule and mask updates for one model and optimizer.

    `sparsity` is the target over the masked layers (every conv/linear kernel by default) and
    `total_steps` the number of `step()` calls training will make (the schedule ends at
    `t_end · total_steps`). Options, by the JobSpec's names (README "The JobSpec", `sparsity.*`
    and `sparsity.schedule.*`): `method` ('rigl', 'set', 'snfs', 'static', 'gmp', 'snip',
    'dense'), `distribution` ('erk', 'er', 'uniform'), `delta_t` (100), `alpha` (0.3), `t_end` (0.75),
    `t_end_steps`, `decay`, `dense_first_layer`, `include`, `exclude`, `layer_density`,
    `grad_accumulation_n`, `snfs_momentum`, `gmp_begin`, ... . `seed` fixes the initial masks;
    `input_shape` (one sample's, e.g. [3, 32, 32]) lets `plan()`/`report()` count FLOPs.
    A bad option raises ValueError naming it.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, sparsity: float = 0.9,
                 total_steps: int | None = None, *, seed: int = 0, input_shape: Sequence[int] | None = None,
                 **options):
        if not isinstance(total_steps, int) or isinstance(total_steps, bool) or total_steps < 1:
            raise ValueError(f"total_steps: the number of training steps is required (an integer >= 1), "
                             f"got {total_steps!r}")
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
            raise ValueError(f"seed: must be an integer in 0..2**32-1, got {seed!r}")
        if input_shape is not None:
            if isinstance(input_shape, torch.Size):
                input_shape = list(input_shape)
            if not isinstance(input_shape, (list, tuple)) or not input_shape or \
                    not all(isinstance(v, int) and v > 0 for v in input_shape):
                raise ValueError(f"input_shape: one sample's shape as positive integers, e.g. [3, 32, 32], "
                                 f"got {input_shape!r}")
            input_shape = list(input_shape)
        optimizer = unwrap_optimizer(optimizer)
        spec = sparsity_spec(sparsity, options)
        if spec.method == "gmp" and total_steps < 2:
            raise ValueError("total_steps: GMP needs at least 2 steps")  # its last pruning step is before the end
        sparsifier, plan, _ = _library_error(lambda: build_sparsifier(model, optimizer, spec, total_steps,
                                                                      input_shape=input_shape, seed=seed))
        sparsifier.init_masks()
        self._attach(sparsifier, plan, total_steps, counts_flops=input_shape is not None)

    @classmethod
    def from_sparsifier(cls, sparsifier: Sparsifier, plan: Plan, total_steps: int,
                        counts_flops: bool = True) -> "RigL":
        """Wrap a sparsifier built elsewhere (the Trainer builds its own from a JobSpec)."""
        self = cls.__new__(cls)
        self._attach(sparsifier, plan, total_steps, counts_flops)
        return self

    def _attach(self, sparsifier: Sparsifier, plan: Plan, total_steps: int, counts_flops: bool) -> None:
        self.sparsifier = sparsifier
        self.optimizer = sparsifier.optimizer
        self._plan = plan
        if plan.total_steps is None:
            plan.total_steps = total_steps  # training FLOPs use T_end in steps (t_end_steps included)
        self.total_steps = total_steps
        self.counts_flops = counts_flops
        self.step_count = 0  # the next step() call's step, unless one is passed
        self.last_update: MaskUpdate | None = None  # the mask update made at the last step, if any
        self._after_step: int | None = None  # SET/SNFS/GMP: the step whose update waits for optimizer.step()
        self._prepared = False  # step() said the optimizer may step and it has not yet
        self._warned = False
        self._hook = None
        if self.optimizer is not None and sparsifier.layers:
            self._hook = self.optimizer.register_step_post_hook(self._after_optimizer_step)

    # ------------------------------------------------------------------ the step
    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Boolean mask per masked layer name (True: active), shaped like the layer's weight."""
        return self.sparsifier.masks

    def step(self, step: int | None = None, scaler: torch.amp.GradScaler | None = None,
             may_update: bool = True) -> bool:
        """Call after backward, before the optimizer step; step the optimizer only if it returns True.

        Masks the gradients (they are then unscaled and masked, ready to clip), makes a due mask
        update, and returns False when the optimizer must not step: RigL/SNIP update steps
        (the update replaces the step), a scaler overflow, or a due update with non-finite scores
        (postponed to the next finite step). `step` defaults to an internal counter (0, 1, ...).
        `may_update=False`: no mask update now, though one is due (the optimizer step that follows an
        update iteration at the same step, when update iterations do not count as steps).
        """
        if step is None:
            step = self.step_count
        self._flush_after_step()
        decision = self.sparsifier.prepare_step(step, scaler, may_update)
        self.step_count = step + 1
        self.last_update = decision.update
        self._prepared = decision.take_step
        self._after_step = step if decision.update_after_step else None
        return decision.take_step

    def _after_optimizer_step(self, optimizer, args, kwargs) -> None:
        """Optimizer step post-hook: SET/SNFS/GMP's update after the step; repairs an unprepared step."""
        if not self._prepared:
            if not self._warned:
                warnings.warn("optimizer.step() ran without rigl.step() before it (unmasked gradients): "
                              "masks re-applied; call rigl.step() after every backward",
                              RuntimeWarning, stacklevel=3)
                self._warned = True
            self.sparsifier.apply_masks()
            return
        self._prepared = False
        if self._after_step is not None:
            step, self._after_step = self._after_step, None
            self.last_update = self.sparsifier.finish_step(step)

    def _flush_after_step(self) -> None:
        """A SET/SNFS/GMP update whose optimizer step never came (the caller skipped it): make it now."""
        if self._after_step is not None:
            step, self._after_step = self._after_step, None
            self.sparsifier.finish_step(step)
        self._prepared = False

    def remove(self) -> None:
        """Detach from the optimizer (its step post-hook); masks stay as they are."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        """Masks, method state (accumulated scores, EMA, postponed update) and the step counter;
        save it with the model's and the optimizer's state dicts."""
        return {"version": STATE_VERSION, "step": self.step_count, "seed": self.sparsifier.seed,
                "sparsifier": self.sparsifier.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Load after `model.load_state_dict` and `optimizer.load_state_dict` (weights are re-masked)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"state_dict: unsupported version {state.get('version')!r}")
        self.sparsifier.load_state_dict(state["sparsifier"])
        self.step_count = int(state["step"])
        self.sparsifier.seed = int(state.get("seed", self.sparsifier.seed))  # SET's random growth draws from it
        self.last_update, self._after_step, self._prepared = None, None, False

    # ------------------------------------------------------------------ reporting
    def plan(self) -> dict:
        """The per-layer plan, as `rigl plan --json` prints it: target counts and densities (and
        FLOPs when `input_shape` was given; None otherwise)."""
        return self._flops_or_none(self._plan.to_dict())

    def nnz(self) -> dict[str, int]:
        return {name: int(mask.sum()) for name, mask in self.sparsifier.masks.items()}

    def leak_check(self) -> dict:
        """Nonzero weights at masked-out positions (must be none)."""
        leaked = {}
        with torch.no_grad():
            for layer in self.sparsifier.layers:
                count = int(torch.count_nonzero(layer.weight * ~self.sparsifier.masks[layer.name]))
                if count:
                    leaked[layer.name] = count
        return {"ok": not leaked, "leaked": leaked}

    def report(self) -> dict:
        """The plan with measured per-layer nnz, sparsity and exploration (share of positions ever
        active), the totals, and the leak check."""
        report = self._plan.to_dict(self.nnz(), self.sparsifier.neuron_counts())
        ever = self.sparsifier.ever_active_counts()
        for row in report["layers"]:  # unmasked layers are dense throughout: all of them explored
            row["exploration"] = ever[row["name"]] / row["params"] if row["name"] in ever else 1.0
        params = report["totals"]["params"]
        report["totals"]["exploration"] = (sum(r["exploration"] * r["params"] for r in report["layers"]) / params
                                           if params else 0.0)
        report["leak_check"] = self.leak_check()
        return self._flops_or_none(report)

    def _flops_or_none(self, table: dict) -> dict:
        if self.counts_flops:
            return table
        for part in (*table["layers"], table["totals"]):  # 0 would read as "costs nothing"
            for key in part:
                if "flops" in key:
                    part[key] = None
        return table


def unwrap_optimizer(optimizer):
    """The torch optimizer inside a framework's wrapper (Accelerate's AcceleratedOptimizer `.optimizer`,
    Lightning's LightningOptimizer `._optimizer`): its state is what gets masked and its step hook fires."""
    if not isinstance(optimizer, torch.optim.Optimizer) or not hasattr(optimizer, "_optimizer_step_post_hooks"):
        for attr in ("optimizer", "_optimizer"):
            inner = getattr(optimizer, attr, None)
            if isinstance(inner, torch.optim.Optimizer):
                return unwrap_optimizer(inner)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"optimizer: a torch.optim.Optimizer is required, got {type(optimizer).__name__}")
    return optimizer


def sparsity_spec(sparsity: float, options: dict) -> SparsitySpec:
    """The SparsitySpec of flat library options (`delta_t` for `schedule.delta_t`); errors name the option."""
    from pydantic import ValidationError

    schedule_fields = set(ScheduleSpec.model_fields)
    # `init` (magnitude masks from trained weights) is the Trainer's warm start, not a library option yet
    sparsity_fields = set(SparsitySpec.model_fields) - {"schedule", "sparsity", "init"}
    unknown = sorted(set(options) - schedule_fields - sparsity_fields)
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown option; options are "
                         f"{', '.join(sorted(schedule_fields | sparsity_fields))}")
    tree = {k: v for k, v in options.items() if k in sparsity_fields}
    tree["sparsity"] = sparsity
    tree["schedule"] = {k: v for k, v in options.items() if k in schedule_fields}
    try:
        return SparsitySpec.model_validate(tree)
    except ValidationError as exc:
        item = exc.errors()[0]
        loc = [str(p) for p in item["loc"] if p != "schedule"]
        name = loc[0] if loc else "options"
        message = item["msg"].removeprefix("Value error, ")
        if not loc and message.startswith("sparsity."):  # a cross-field check already names its field
            raise ValueError(message.removeprefix("sparsity.")) from None
        raise ValueError(f"{name}: {message}") from None


def _library_error(make):
    """Run `make`, renaming the JobSpec path in a ValueError (`sparsity.schedule.x`) to the option `x`."""
    try:
        return make()
    except ValueError as exc:
        message = str(exc)
        for prefix in ("sparsity.schedule.", "sparsity."):
            if message.startswith(prefix):
                raise ValueError(message[len(prefix):]) from None
        raise
