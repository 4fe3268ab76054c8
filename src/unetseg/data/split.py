"""Deterministic train/validation splits that keep whole sequences together.

Neighbouring frames of a driving sequence are near duplicates; putting one in training and its
neighbour in validation makes validation scores measure memory, not generalisation. So frames are
grouped into sequences and whole groups go to validation.

Grouping rules (:func:`sequence_groups`), applied to file stems (an image extension is stripped):

1. All-digit names (CARLA frame numbers such as ``002128``): sorted numerically, a new group starts
   where the number jumps by more than ``max_gap`` (default 20). Why 20: in the lab's 542-frame CARLA
   subset 397 steps are +1, and steps of 2-19 are frames the subset dropped from the same run (their
   pictures differ by 4-24 grey levels on average, like +1 neighbours); the next steps are 28 and then
   71 or more, between genuinely different runs (44 grey levels on average). ``max_gap=20`` gives 34
   groups of 1-58 frames there; ``max_gap=1`` would cut runs into 145 groups whose neighbours leak.
2. Names ending in a number after ``-`` or ``_`` (``F61-12``, ``town01_0042``): the prefix (``F61``)
   is the group. If every such name shares one prefix (``frame_0001``, ``frame_0002``, …) the prefix says
   nothing, and rule 1 is applied to the numbers instead.
3. Anything else: one group per file.

:func:`split_by_sequence` shuffles the groups with ``random.Random(seed)`` and moves whole groups to
validation until ``val_fraction`` of the frames is reached (never overshooting by more than the last
group needs, see the function). Same names, fraction and seed give the same split regardless of the
order of ``names``. If everything is one group, frames are split individually (with a warning).

Example:
    >>> from unetseg.data.split import split_by_sequence
    >>> s = split_by_sequence(["000001", "000002", "000003", "000500", "000501", "009000"], 0.3)
    >>> sorted(s.val_names) in (["000500", "000501"], ["000001", "000002", "000003"], ["009000"])
    True
    >>> s.groups
    3
"""

from __future__ import annotations

import random
import re
import warnings
from dataclasses import dataclass, field
from pathlib import PurePath

from ..errors import UnetsegError
from .layouts import IMAGE_EXTS

DEFAULT_MAX_GAP = 20
_PREFIXED = re.compile(r"^(.*?)[-_](\d+)$")


def _stem(name: str) -> str:
    p = PurePath(name)
    return p.stem if p.suffix.lower() in IMAGE_EXTS else p.name


def _runs(numbered: list[tuple[int, int]], max_gap: int) -> list[list[int]]:
    """``[(number, index)]`` -> lists of indices whose sorted numbers step by at most ``max_gap``."""
    runs: list[list[int]] = []
    last = None
    for num, i in sorted(numbered):
        if last is None or num - last > max_gap:
            runs.append([])
        runs[-1].append(i)
        last = num
    return runs


def sequence_groups(names: list[str], max_gap: int = DEFAULT_MAX_GAP) -> list[int]:
    """Group id per name (same order as ``names``); ids are numbered by each group's first sorted name.

    Example: ``sequence_groups(["000010", "000011", "000090", "F1-3", "F1-4", "x"])`` ->
    ``[0, 0, 1, 2, 2, 3]``.
    """
    if max_gap < 0:
        raise UnetsegError(f"max_gap must be >= 0, got {max_gap}")
    stems = [_stem(str(n)) for n in names]
    digits: list[tuple[int, int]] = []
    prefixed: dict[str, list[tuple[int, int]]] = {}
    groups: list[list[int]] = []
    for i, s in enumerate(stems):
        m = _PREFIXED.match(s)
        if s.isdigit():
            digits.append((int(s), i))
        elif m and m.group(1):
            prefixed.setdefault(m.group(1), []).append((int(m.group(2)), i))
        else:
            groups.append([i])
    groups += _runs(digits, max_gap)
    if len(prefixed) == 1 and len(next(iter(prefixed.values()))) > 1:
        groups += _runs(next(iter(prefixed.values())), max_gap)
    else:
        groups += [[i for _, i in members] for members in prefixed.values()]
    # Number groups by their smallest stem so ids do not depend on the input order.
    groups.sort(key=lambda g: min(stems[i] for i in g))
    out = [0] * len(names)
    for gid, members in enumerate(groups):
        for i in members:
            out[i] = gid
    return out


@dataclass
class Split:
    """Indices into the dataset's frame list and the matching names, both sorted by index.

    ``groups`` is the number of sequence groups found; ``to_dict()`` is what the trainer saves as
    ``split.json``.
    """

    train: list[int]
    val: list[int]
    train_names: list[str]
    val_names: list[str]
    groups: int
    seed: int = 0
    val_fraction: float = 0.2
    max_gap: int = DEFAULT_MAX_GAP
    by_frame: bool = field(default=False)  # True when everything was one sequence and frames were split

    def to_dict(self) -> dict:
        """JSON-ready: names, indices and the parameters that produced the split."""
        return {"train": list(self.train_names), "val": list(self.val_names),
                "train_idx": list(self.train), "val_idx": list(self.val), "groups": self.groups,
                "seed": self.seed, "val_fraction": self.val_fraction, "max_gap": self.max_gap,
                "by_frame": self.by_frame}

    @classmethod
    def from_dict(cls, d: dict) -> Split:
        """Rebuild from :meth:`to_dict` output (uses the stored indices)."""
        try:
            train_names, val_names = list(d["train"]), list(d["val"])
            train = list(d.get("train_idx", range(len(train_names))))
            val = list(d.get("val_idx", range(len(train_names), len(train_names) + len(val_names))))
        except (KeyError, TypeError) as e:
            raise UnetsegError(f"split file: missing or malformed field {e}; expected 'train' and 'val' "
                               "name lists") from None
        return cls(train, val, train_names, val_names, int(d.get("groups", 0)), int(d.get("seed", 0)),
                   float(d.get("val_fraction", 0.2)), int(d.get("max_gap", DEFAULT_MAX_GAP)),
                   bool(d.get("by_frame", False)))

    @classmethod
    def from_names(cls, names: list[str], d: dict) -> Split:
        """Re-apply a saved split to a dataset whose frame names are ``names`` (indices are recomputed;
        a saved name missing from ``names`` is an error naming it)."""
        saved = cls.from_dict(d)
        pos = {n: i for i, n in enumerate(names)}
        missing = [n for n in saved.train_names + saved.val_names if n not in pos]
        if missing:
            more = f" … and {len(missing) - 10} more" if len(missing) > 10 else ""
            shown = ", ".join(missing[:10]) + more
            raise UnetsegError(f"split file lists {len(missing)} frame(s) not in the dataset: {shown}")
        train = sorted(pos[n] for n in saved.train_names)
        val = sorted(pos[n] for n in saved.val_names)
        return cls(train, val, [names[i] for i in train], [names[i] for i in val], saved.groups, saved.seed,
                   saved.val_fraction, saved.max_gap, saved.by_frame)


def _choose(sizes: dict[int, int], target: int, seed: int) -> set[int]:
    """Shuffle group ids with ``seed``; take groups that fit under ``target`` frames in that order, then,
    if still short, the one remaining group that lands closest to ``target``."""
    order = sorted(sizes)
    random.Random(seed).shuffle(order)
    chosen: set[int] = set()
    total = 0
    for g in order:
        if total + sizes[g] <= target:
            chosen.add(g)
            total += sizes[g]
    rest = [g for g in order if g not in chosen]
    if total < target and rest:
        best = min(rest, key=lambda g: abs(total + sizes[g] - target))
        if abs(total + sizes[best] - target) < target - total or total == 0:
            chosen.add(best)
    return chosen


def split_by_sequence(names: list[str], val_fraction: float = 0.2, seed: int = 0,
                      max_gap: int = DEFAULT_MAX_GAP) -> Split:
    """Split frame ``names`` into train and validation by whole sequence groups (see module doc).

    ``val_fraction`` in [0, 1): share of *frames* aimed for in validation; at least one frame goes there
    when the fraction is positive and there are two frames or more. Training is never left empty.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise UnetsegError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(names)
    if len(set(names)) != n:
        dup = sorted({x for x in names if names.count(x) > 1})[:5]
        raise UnetsegError(f"duplicate frame names: {', '.join(map(str, dup))}")
    gids = sequence_groups(names, max_gap)
    n_groups = len(set(gids))
    by_frame = False
    target = round(val_fraction * n)
    if val_fraction > 0 and n >= 2:
        target = min(max(target, 1), n - 1)
    if target > 0 and n_groups < 2:
        warnings.warn(f"all {n} frames form one sequence; splitting by frame, so validation frames are "
                      "near duplicates of training frames", stacklevel=2)
        # Order-independent: group ids follow the sorted names.
        order = sorted(range(n), key=lambda i: str(names[i]))
        gids = [0] * n
        for rank, i in enumerate(order):
            gids[i] = rank
        by_frame = True
    sizes: dict[int, int] = {}
    for g in gids:
        sizes[g] = sizes.get(g, 0) + 1
    chosen = _choose(sizes, target, seed) if target > 0 else set()
    if len(chosen) == len(sizes):  # never leave training empty
        chosen.discard(max(chosen, key=lambda g: (sizes[g], g)))
    val = [i for i in range(n) if gids[i] in chosen]
    train = [i for i in range(n) if gids[i] not in chosen]
    return Split(train, val, [names[i] for i in train], [names[i] for i in val], n_groups, seed, val_fraction,
                 max_gap, by_frame)
