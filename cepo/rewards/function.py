"""A reward written as a plain function, in the shape TRL's ``GRPOTrainer`` calls:
``f(completions: list[str], **columns) -> list[float]``.

The function receives keyword arguments, each a list with one entry per rollout row (the rows of a
prompt's group repeat its prompt's fields, as in TRL):

- ``prompts``: the prompt as the policy saw it (template and chat template applied);
- ``completions``: the generated text; ``completion_ids``: its token ids (up to and including EOS);
- ``question``: the task text without the template; ``gold``: every accepted gold answer (a tuple of
  strings, already extracted from the dataset's raw field, e.g. ``("18",)`` from GSM8K's ``"... #### 18"``);
  ``answer_kind``, ``source``, ``id``: the rest of the dataset record (:class:`cepo.data.example.Example`);
- the record's ``meta`` fields, each under its own name (``None`` where a row has no such field);
- ``rationales``, ``final_answers``: the completion split by the project's answer parser into the
  reasoning X and the final answer Y; ``marker_found`` and ``truncated`` (booleans).

A function that takes ``**kwargs`` receives every column; one that names its parameters receives only
those. It returns one number in [0, 1] per row (a list, tuple, array or tensor); anything else (a wrong
length, ``None``, NaN, a value outside [0, 1]) is refused with an error naming the function.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from cepo.rewards.base import RewardFunction, check_reward_values
from cepo.records import Rollout

# The columns built from the rollout itself; a meta field of the same name is not passed over them.
ROLLOUT_COLUMNS = ("prompts", "completions", "completion_ids", "question", "gold", "answer_kind", "source", "id",
                   "rationales", "final_answers", "marker_found", "truncated")


def _function_path(function: Callable) -> str:
    module = getattr(function, "__module__", None)
    name = getattr(function, "__qualname__", None) or type(function).__qualname__
    return f"{module}.{name}" if module else name


def reward_columns(rollout: Rollout) -> dict[str, list[Any]]:
    """The keyword arguments a reward function receives for ``rollout``: one list entry per row."""
    examples = rollout.examples
    lengths = rollout.completion_mask.sum(dim=1).tolist()
    columns: dict[str, list[Any]] = {
        "prompts": list(rollout.prompts),
        "completions": list(rollout.completions),
        "completion_ids": [ids[:n] for ids, n in zip(rollout.completion_ids.tolist(), lengths)],
        "question": [ex.question for ex in examples],
        "gold": [ex.gold for ex in examples],
        "answer_kind": [ex.answer_kind for ex in examples],
        "source": [ex.source for ex in examples],
        "id": [ex.id for ex in examples],
        "rationales": list(rollout.rationales),
        "final_answers": list(rollout.answers),
        "marker_found": [bool(v) for v in rollout.marker_found.tolist()],
        "truncated": [bool(v) for v in rollout.truncated.tolist()],
    }
    meta_keys = dict.fromkeys(key for ex in examples for key in ex.meta if key not in columns)
    for key in meta_keys:
        columns[key] = [ex.meta.get(key) for ex in examples]
    return columns


class FunctionReward(RewardFunction):
    """A reward term computed by a plain function with TRL's signature, named after the function.

    The function is ``f(completions, **columns) -> list[float]``; the columns are listed in the
    documentation of :mod:`cepo.rewards.function`. In YAML, under ``model.init_args``:
    ``rewards+: [{class_path: cepo.FunctionReward, init_args: {function: mypackage.rewards.length_penalty,
    weight: 0.2}}]``.
    """

    def __init__(self, function: Callable[..., Sequence[float]], weight: float = 1.0, name: str | None = None) -> None:
        """
        Args:
            function: The reward function, given as its import path in YAML (``mypackage.module.name``). It is
                called with keyword arguments only, each a list with one entry per completion, and returns
                one value in [0, 1] per completion.
            weight: Weight of this term in the combiner (0 = computed and logged, not optimised).
            name: Name of the term in logs and in ``model.reward_weights`` (default: the function's name).
        """
        if not callable(function):
            raise TypeError(f"FunctionReward: function must be callable, got {function!r}; give its import path, "
                            "e.g. mypackage.rewards.length_penalty")
        self.function = function
        self.path = _function_path(function)
        default = getattr(function, "__name__", None) or type(function).__name__
        super().__init__(weight=weight, name=name or default)
        try:
            parameters = list(inspect.signature(function).parameters.values())
        except (TypeError, ValueError):  # a builtin without a signature: give it every column
            parameters = []
        self._takes_all = not parameters or any(p.kind is p.VAR_KEYWORD for p in parameters)
        positional_only = [p.name for p in parameters if p.kind is p.POSITIONAL_ONLY and p.default is p.empty]
        if positional_only:
            raise TypeError(f"FunctionReward: {self.path} has positional-only parameters {positional_only}; reward "
                            "functions are called with keyword arguments only (completions=..., prompts=..., ...)")
        named = [p for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        self._wanted = [p.name for p in named]
        self._required = [p.name for p in named if p.default is p.empty]

    def score(self, rollout: Rollout) -> Tensor:
        columns = reward_columns(rollout)
        missing = [key for key in self._required if key not in columns]
        if missing:
            raise TypeError(f"reward {self.name!r} (function {self.path}) needs the columns {missing}, which this "
                            f"rollout does not have; the columns are {sorted(columns)}")
        kwargs = columns if self._takes_all else {key: columns[key] for key in self._wanted if key in columns}
        values = self.function(**kwargs)
        return checked_values(values, len(rollout), self.name, self.path)


def checked_values(values: Any, rows: int, name: str, path: str) -> Tensor:
    """``values`` as a float32 ``(rows,)`` tensor, or an error naming the term and its function: the length
    must match the rollout, and every value must be a finite number in [0, 1] (no None, no NaN)."""
    where = f"reward {name!r} (function {path})"
    if values is None or isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__"):
        raise TypeError(f"{where} returned {type(values).__name__}; a reward function returns a list of {rows} "
                        "numbers, one per completion")
    if len(values) != rows:
        raise ValueError(f"{where} returned {len(values)} values for {rows} completions; return one value per "
                         "completion, in the order of `completions`")
    if not isinstance(values, Tensor):
        nones = [i for i, v in enumerate(values) if v is None][:5]
        if nones:
            raise ValueError(f"{where} returned None for rows {nones}; return a number in [0, 1] for every "
                             "completion (0 where the reward does not apply)")
    try:
        tensor = torch.as_tensor(values, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"{where} returned values that are not numbers ({error}); return one number per "
                        "completion") from error
    if tensor.shape != (rows,):
        raise ValueError(f"{where} returned values of shape {tuple(tensor.shape)}; return one number per "
                         f"completion, shape ({rows},)")
    try:
        check_reward_values(name, tensor)
    except ValueError as error:
        raise ValueError(f"{error} (function {path})") from error
    return tensor
