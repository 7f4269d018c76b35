"""The bundled synthetic stream: a checkable target task mixed with distractors and label noise.

The target task is selectable (``target_task``); each one has a corruption rule that gives a wrong
answer of the right form, so corrupted samples teach a wrong mapping, and a look-alike distractor
(a different task whose prompts look like the target's):

| target | prompt | answer | corrupted answer | look-alike |
|---|---|---|---|---|
| ``addition`` | ``12+345=`` | ``357`` | the sum plus a non-zero offset | ``multiply`` |
| ``reverse`` | ``rev:abcd=`` | ``dcba`` | another ordering of the same letters | ``copy`` |
| ``copy`` | ``copy:xyz=`` | ``xyz`` | another ordering of the same letters (or one letter changed) | ``reverse`` |
| ``sort`` | ``sort:3142=`` | ``1234`` | another ordering of the same digits | ``rsort`` |

Distractors (named tasks): ``reverse``, ``sort``, ``copy``, ``count`` (``count a:abaca=`` → ``3``),
``multiply`` (``12*3=`` → ``36``), ``add`` (addition as a distractor) and ``rsort`` (descending sort,
``rsort:3142=`` → ``4321``). A task cannot be both the target and a distractor.

Everything is deterministic from the seed. The val split holds only clean target samples whose
prompts never occur in train. With the byte tokenizer every sample is at most ~20 tokens.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

Sample = dict[str, str]  # {"prompt", "answer", "kind"}
Generator = Callable[[random.Random], tuple[str, str]]

_LETTERS = "abcdefghij"


def _letters(rng: random.Random) -> str:
    return "".join(rng.choices(_LETTERS, k=rng.randint(3, 6)))


def _digits(rng: random.Random) -> str:
    return "".join(rng.choices("0123456789", k=rng.randint(3, 6)))


def _reverse(rng: random.Random) -> tuple[str, str]:
    s = _letters(rng)
    return f"rev:{s}=", s[::-1]


def _sort(rng: random.Random) -> tuple[str, str]:
    s = _digits(rng)
    return f"sort:{s}=", "".join(sorted(s))


def _rsort(rng: random.Random) -> tuple[str, str]:
    s = _digits(rng)
    return f"rsort:{s}=", "".join(sorted(s, reverse=True))


def _copy(rng: random.Random) -> tuple[str, str]:
    s = _letters(rng)
    return f"copy:{s}=", s


def _count(rng: random.Random) -> tuple[str, str]:
    letter = rng.choice("abc")
    s = "".join(rng.choices("abc", k=rng.randint(3, 7)))
    return f"count {letter}:{s}=", str(s.count(letter))


def _multiply(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 9)
    return f"{a}*{b}=", str(a * b)


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    return f"{a}+{b}=", str(a + b)


DISTRACTORS: dict[str, Generator] = {
    "reverse": _reverse,
    "sort": _sort,
    "copy": _copy,
    "count": _count,
    "multiply": _multiply,
    "add": _add,
    "rsort": _rsort,
}
#: target task -> (its generator, or None for addition (digit range from the config); look-alike distractor)
TARGET_TASKS: dict[str, tuple[Generator | None, str]] = {
    "addition": (None, "multiply"),
    "reverse": (_reverse, "copy"),
    "copy": (_copy, "reverse"),
    "sort": (_sort, "rsort"),
}
#: the distractor that is the same task as a target (cannot be mixed in with it)
_SAME_TASK = {"addition": "add", "reverse": "reverse", "copy": "copy", "sort": "sort"}


def look_alike(target_task: str) -> str:
    """The distractor whose prompts look like ``target_task``'s."""
    return TARGET_TASKS[target_task][1]


@dataclass(kw_only=True)
class SyntheticConfig:
    """Mix of the synthetic train stream; the rest after target and corrupted is spread over distractors."""

    num_train: int = 4096  #: train samples
    num_val: int = 256  #: val samples (target task only)
    target_task: str = "addition"  #: addition | reverse | copy | sort (see pipeline/data/synthetic.py)
    target_fraction: float = 0.4  #: share of clean target samples in train
    corrupted_fraction: float = 0.2  #: share of target-form samples with a wrong answer in train
    #: the other tasks mixed into train
    distractors: list[str] = field(default_factory=lambda: ["reverse", "sort", "copy", "count"])
    distractor_weights: list[float] | None = None  #: relative weights, one per distractor; None: uniform
    min_digits: int = 1  #: addition's operand digits, at least
    max_digits: int = 3  #: addition's operand digits, at most

    def __post_init__(self) -> None:
        if self.num_train < 1:
            raise ValueError(f"num_train: must be >= 1, got {self.num_train}")
        if self.num_val < 0:
            raise ValueError(f"num_val: must be >= 0, got {self.num_val}")
        if self.target_task not in TARGET_TASKS:
            raise ValueError(f"target_task: must be one of {', '.join(TARGET_TASKS)}, got {self.target_task!r}")
        for name in ("target_fraction", "corrupted_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: must be in [0, 1], got {getattr(self, name)}")
        rest = 1.0 - self.target_fraction - self.corrupted_fraction
        if rest < -1e-9:
            raise ValueError(
                f"corrupted_fraction: target_fraction + corrupted_fraction must be <= 1, "
                f"got {self.target_fraction + self.corrupted_fraction}"
            )
        unknown = [d for d in self.distractors if d not in DISTRACTORS]
        if unknown:
            raise ValueError(f"distractors: unknown task {unknown[0]!r}; known: {', '.join(DISTRACTORS)}")
        if _SAME_TASK[self.target_task] in self.distractors:
            raise ValueError(
                f"distractors: {_SAME_TASK[self.target_task]!r} is the target task {self.target_task!r} itself"
            )
        if len(set(self.distractors)) != len(self.distractors):
            raise ValueError("distractors: names must be unique")
        if rest > 1e-9 and not self.distractors:
            raise ValueError("distractors: empty, but target_fraction + corrupted_fraction < 1")
        if self.distractor_weights is not None:
            if len(self.distractor_weights) != len(self.distractors):
                raise ValueError(
                    f"distractor_weights: need one weight per distractor ({len(self.distractors)}), "
                    f"got {len(self.distractor_weights)}"
                )
            if any(w < 0 for w in self.distractor_weights) or (self.distractors and sum(self.distractor_weights) <= 0):
                raise ValueError("distractor_weights: must be >= 0 with a positive sum")
        if not 1 <= self.min_digits <= self.max_digits <= 9:
            raise ValueError(
                f"max_digits: need 1 <= min_digits <= max_digits <= 9, got {self.min_digits}..{self.max_digits}"
            )

    def kind_names(self) -> list[str]:
        """All kinds this stream can emit, in kind-id order."""
        return ["target", "corrupted"] + [f"distractor/{d}" for d in self.distractors]


def _number(rng: random.Random, cfg: SyntheticConfig) -> int:
    digits = rng.randint(cfg.min_digits, cfg.max_digits)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _addition(rng: random.Random, cfg: SyntheticConfig) -> tuple[str, int]:
    a, b = _number(rng, cfg), _number(rng, cfg)
    return f"{a}+{b}=", a + b


def _wrong(rng: random.Random, true: int) -> int:
    while True:
        wrong = true + rng.choice([-1, 1]) * rng.randint(1, max(10, true // 2))
        if wrong >= 0 and wrong != true:
            return wrong


def _wrong_order(rng: random.Random, true: str, alphabet: str) -> str:
    """Another ordering of ``true``'s characters; if all are equal, one character changed."""
    if len(set(true)) > 1:
        chars = list(true)
        while "".join(chars) == true:
            rng.shuffle(chars)
        return "".join(chars)
    i = rng.randrange(len(true))
    return true[:i] + rng.choice([c for c in alphabet if c != true[i]]) + true[i + 1 :]


def _target_sample(rng: random.Random, cfg: SyntheticConfig) -> tuple[str, str, Callable[[], str]]:
    """(prompt, true answer, a function drawing a corrupted answer) of the target task."""
    if cfg.target_task == "addition":
        prompt, total = _addition(rng, cfg)
        return prompt, str(total), lambda: str(_wrong(rng, total))
    generate = TARGET_TASKS[cfg.target_task][0]
    assert generate is not None  # only "addition" has no generator, handled above
    prompt, answer = generate(rng)
    alphabet = "0123456789" if cfg.target_task == "sort" else _LETTERS
    return prompt, answer, lambda: _wrong_order(rng, answer, alphabet)


def generate(cfg: SyntheticConfig, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(train, val) sample lists, deterministic in (cfg, seed).

    Train kinds follow the configured fractions exactly (counts rounded, then shuffled); val holds
    ``num_val`` clean target samples with prompts disjoint from every train prompt.
    """
    rng = random.Random(seed)
    val: list[Sample] = []
    val_prompts: set[str] = set()
    if cfg.target_task == "addition" and cfg.num_val > (10**cfg.max_digits) ** 2 // 4:
        raise ValueError(f"num_val: {cfg.num_val} distinct addition prompts do not fit max_digits={cfg.max_digits}")
    attempts = 0
    while len(val) < cfg.num_val:
        attempts += 1
        if attempts > 50 * cfg.num_val + 1000:
            raise ValueError(f"num_val: could not draw {cfg.num_val} distinct {cfg.target_task} prompts")
        prompt, answer, _ = _target_sample(rng, cfg)
        if prompt not in val_prompts:
            val_prompts.add(prompt)
            val.append({"prompt": prompt, "answer": answer, "kind": "target"})

    n_target = round(cfg.num_train * cfg.target_fraction)
    n_corrupted = min(round(cfg.num_train * cfg.corrupted_fraction), cfg.num_train - n_target)
    n_distractor = cfg.num_train - n_target - n_corrupted
    kinds = ["target"] * n_target + ["corrupted"] * n_corrupted
    if n_distractor:
        weights = cfg.distractor_weights or [1.0] * len(cfg.distractors)
        kinds += [f"distractor/{d}" for d in rng.choices(cfg.distractors, weights=weights, k=n_distractor)]
    rng.shuffle(kinds)

    train: list[Sample] = []
    for kind in kinds:
        if kind in ("target", "corrupted"):
            prompt, answer, corrupt = _target_sample(rng, cfg)
            while prompt in val_prompts:
                prompt, answer, corrupt = _target_sample(rng, cfg)
            train.append({"prompt": prompt, "answer": answer if kind == "target" else corrupt(), "kind": kind})
        else:
            prompt, answer = DISTRACTORS[kind.split("/", 1)[1]](rng)
            train.append({"prompt": prompt, "answer": answer, "kind": kind})
    return train, val
