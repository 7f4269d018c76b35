"""The bundled synthetic stream: a checkable target task mixed with distractors and label noise.

Target: multi-digit addition, prompt ``"12+345="``, answer ``"357"``. Corrupted: the same kind of
prompt with a wrong answer (the true sum plus a non-zero offset). Distractors (each a named task):

| name | prompt | answer |
|---|---|---|
| ``reverse`` | ``rev:abcd=`` | ``dcba`` |
| ``sort`` | ``sort:3142=`` | ``1234`` |
| ``copy`` | ``copy:xyz=`` | ``xyz`` |
| ``count`` | ``count a:abaca=`` | ``3`` |
| ``multiply`` | ``12*3=`` | ``36`` (looks like the target, is not) |

Everything is deterministic from the seed. The val split holds only clean target samples whose
prompts never occur in train. With the byte tokenizer every sample is at most ~20 tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

Sample = dict[str, str]  # {"prompt", "answer", "kind"}

_LETTERS = "abcdefghij"


def _reverse(rng: random.Random) -> tuple[str, str]:
    s = "".join(rng.choices(_LETTERS, k=rng.randint(3, 6)))
    return f"rev:{s}=", s[::-1]


def _sort(rng: random.Random) -> tuple[str, str]:
    s = "".join(rng.choices("0123456789", k=rng.randint(3, 6)))
    return f"sort:{s}=", "".join(sorted(s))


def _copy(rng: random.Random) -> tuple[str, str]:
    s = "".join(rng.choices(_LETTERS, k=rng.randint(3, 6)))
    return f"copy:{s}=", s


def _count(rng: random.Random) -> tuple[str, str]:
    letter = rng.choice("abc")
    s = "".join(rng.choices("abc", k=rng.randint(3, 7)))
    return f"count {letter}:{s}=", str(s.count(letter))


def _multiply(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 9)
    return f"{a}*{b}=", str(a * b)


DISTRACTORS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "reverse": _reverse, "sort": _sort, "copy": _copy, "count": _count, "multiply": _multiply,
}


@dataclass(kw_only=True)
class SyntheticConfig:
    """Mix of the synthetic train stream; the rest after target and corrupted is spread over distractors."""

    num_train: int = 4096
    num_val: int = 256
    target_fraction: float = 0.4  # share of clean addition samples in train
    corrupted_fraction: float = 0.2  # share of addition samples with a wrong answer in train
    distractors: list[str] = field(default_factory=lambda: ["reverse", "sort", "copy", "count"])
    distractor_weights: list[float] | None = None  # relative weights, one per distractor; None: uniform
    min_digits: int = 1
    max_digits: int = 3

    def __post_init__(self) -> None:
        if self.num_train < 1:
            raise ValueError(f"num_train: must be >= 1, got {self.num_train}")
        if self.num_val < 0:
            raise ValueError(f"num_val: must be >= 0, got {self.num_val}")
        for name in ("target_fraction", "corrupted_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: must be in [0, 1], got {getattr(self, name)}")
        rest = 1.0 - self.target_fraction - self.corrupted_fraction
        if rest < -1e-9:
            raise ValueError(f"corrupted_fraction: target_fraction + corrupted_fraction must be <= 1, "
                             f"got {self.target_fraction + self.corrupted_fraction}")
        unknown = [d for d in self.distractors if d not in DISTRACTORS]
        if unknown:
            raise ValueError(f"distractors: unknown task {unknown[0]!r}; known: {', '.join(DISTRACTORS)}")
        if len(set(self.distractors)) != len(self.distractors):
            raise ValueError("distractors: names must be unique")
        if rest > 1e-9 and not self.distractors:
            raise ValueError("distractors: empty, but target_fraction + corrupted_fraction < 1")
        if self.distractor_weights is not None:
            if len(self.distractor_weights) != len(self.distractors):
                raise ValueError(f"distractor_weights: need one weight per distractor ({len(self.distractors)}), "
                                 f"got {len(self.distractor_weights)}")
            if any(w < 0 for w in self.distractor_weights) or (self.distractors and sum(self.distractor_weights) <= 0):
                raise ValueError("distractor_weights: must be >= 0 with a positive sum")
        if not 1 <= self.min_digits <= self.max_digits <= 9:
            raise ValueError(f"max_digits: need 1 <= min_digits <= max_digits <= 9, "
                             f"got {self.min_digits}..{self.max_digits}")

    def kind_names(self) -> list[str]:
        """All kinds this stream can emit, in kind-id order."""
        return ["target", "corrupted"] + [f"distractor/{d}" for d in self.distractors]


def _number(rng: random.Random, cfg: SyntheticConfig) -> int:
    digits = rng.randint(cfg.min_digits, cfg.max_digits)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)


def _addition(rng: random.Random, cfg: SyntheticConfig) -> tuple[str, int]:
    a, b = _number(rng, cfg), _number(rng, cfg)
    return f"{a}+{b}=", a + b


def _wrong(rng: random.Random, true: int) -> int:
    while True:
        wrong = true + rng.choice([-1, 1]) * rng.randint(1, max(10, true // 2))
        if wrong >= 0 and wrong != true:
            return wrong


def generate(cfg: SyntheticConfig, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(train, val) sample lists, deterministic in (cfg, seed).

    Train kinds follow the configured fractions exactly (counts rounded, then shuffled); val holds
    ``num_val`` clean target samples with prompts disjoint from every train prompt.
    """
    rng = random.Random(seed)
    val: list[Sample] = []
    val_prompts: set[str] = set()
    space = (10 ** cfg.max_digits) ** 2
    if cfg.num_val > space // 4:
        raise ValueError(f"num_val: {cfg.num_val} distinct addition prompts do not fit max_digits={cfg.max_digits}")
    while len(val) < cfg.num_val:
        prompt, total = _addition(rng, cfg)
        if prompt not in val_prompts:
            val_prompts.add(prompt)
            val.append({"prompt": prompt, "answer": str(total), "kind": "target"})

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
            prompt, total = _addition(rng, cfg)
            while prompt in val_prompts:
                prompt, total = _addition(rng, cfg)
            answer = total if kind == "target" else _wrong(rng, total)
            train.append({"prompt": prompt, "answer": str(answer), "kind": kind})
        else:
            prompt, answer = DISTRACTORS[kind.split("/", 1)[1]](rng)
            train.append({"prompt": prompt, "answer": answer, "kind": kind})
    return train, val
