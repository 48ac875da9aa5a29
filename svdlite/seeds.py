"""Seeds and generators: the one rule for a seed nobody gave (drawn from the operating system's randomness, printed
or recorded by the caller so that the run can be made again), one `torch.Generator` per video, and the seed of a
batch item, derived from the run's seed and the item's name alone.
"""
import hashlib
import secrets

import torch

RANDOM_SEED_LIMIT = 2**32  # short enough to read and type back; any int in [0, 2**64) is accepted as a seed


def random_seed() -> int:
    """A fresh seed in [0, 2**32) (not drawn from torch's global generator, which the run must not depend on)."""
    return secrets.randbelow(RANDOM_SEED_LIMIT)


def make_generator(seed: int | None, generator: torch.Generator | None) -> torch.Generator:
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    return generator if generator is not None else torch.Generator().manual_seed(
        seed if seed is not None else random_seed())


def per_image(value, count: int, batched: bool, name: str) -> list:
    """A per-image argument as a list of `count`: for a list of images a list (or None), else the one value."""
    if not batched:
        return [value]
    if value is None:
        return [None] * count
    if not isinstance(value, (list, tuple)) or len(value) != count:
        raise ValueError(f"{name} for a list of {count} images must be a list of {count} (one per image) or None, "
                         f"got {type(value).__name__}" + (f" of {len(value)}" if isinstance(value, (list, tuple))
                                                          else ""))
    return list(value)


def make_generators(count: int, seed, generator, batched: bool) -> tuple[list, list[torch.Generator]]:
    """(seeds, generators), one per image: `seed` is an int (a list of images: image k gets seed + k), a list of
    ints, or None (a random seed); the seed is None where a generator was passed."""
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if generator is not None:
        return [None] * count, per_image(generator, count, batched, "generator")
    if batched and isinstance(seed, (list, tuple)):
        seeds = per_image(seed, count, batched, "seed")
    else:
        if seed is None:
            seed = random_seed()
        seeds = [seed + k for k in range(count)] if isinstance(seed, int) and not isinstance(seed, bool) else [seed]
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**64:
            raise ValueError(f"a seed must be an int in [0, 2**64), got {s!r}")
    return seeds, [torch.Generator().manual_seed(s) for s in seeds]


def item_seed(seed: int, name: str) -> int:
    """The seed of the batch item named `name` (its output stem) in a run with seed `seed`: a 63-bit hash of both, so
    it does not depend on the other items, their order or the number of processes."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "big") >> 1
