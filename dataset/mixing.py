"""General rows mixed into a domain run, so a LoRA or full SFT on a narrow set does not forget how to chat.

An epoch of ``MixedRows`` is every row of the main data plus a fresh draw from the mix file, sized so that the drawn
rows are ``ratio`` of the epoch (practice: 0.15-0.3). The draw is a function of (seed, epoch) only: the index space
stays the same size every epoch, so the trainer's sampler shuffles and splits it across ranks as any dataset, and a
resumed run that sets the same epoch sees the same rows. The held-out split is taken from the main data only.

    mixed = MixedRows(domain_rows, general_rows, ratio=0.2, seed=42)
    mixed.set_epoch(epoch)          # before each epoch's loader: which general rows fill the mix slots
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from torch.utils.data import Dataset


class MixedRows(Dataset):
    """Indices ``[0, len(main))`` are the main rows; the ``n_mix`` indices after them are this epoch's draw from
    ``mix``: without replacement, and when the mix file is smaller than the draw, every mix row as often as the draw
    allows (whole passes in a fresh order each, then a sample for the rest)."""

    def __init__(self, main: Dataset, mix: Dataset, ratio: float, seed: int):
        if not 0 < ratio < 1:
            raise ValueError(f"mix ratio must be between 0 and 1 (exclusive), got {ratio}")
        if len(mix) == 0:
            raise ValueError("the mix data has no rows")
        self.main, self.mix, self.ratio, self.seed = main, mix, ratio, seed
        self.n_mix = round(len(main) * ratio / (1 - ratio))  # n_mix / (len(main) + n_mix) = ratio
        self.set_epoch(0)

    def over(self, main: Dataset) -> MixedRows:
        """The same mix over other main rows (the training rows, once the held-out ones are split off)."""
        return MixedRows(main, self.mix, self.ratio, self.seed)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        rng = np.random.default_rng([self.seed, epoch])
        passes, rest = divmod(self.n_mix, len(self.mix))
        draws = [rng.permutation(len(self.mix)) for _ in range(passes)]
        self.drawn = np.concatenate([*draws, rng.choice(len(self.mix), size=rest, replace=False)])

    def __len__(self) -> int:
        return len(self.main) + self.n_mix

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.main[i] if i < len(self.main) else self.mix[int(self.drawn[i - len(self.main)])]

    def mixed_in(self, indices: Iterable[int]) -> int:
        """How many of ``indices`` are rows of the mix file."""
        return int((np.fromiter(indices, dtype=np.int64) >= len(self.main)).sum())
