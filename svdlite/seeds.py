"""The one rule for a seed nobody gave: drawn from the operating system's randomness, printed or recorded by the
caller so that the run can be made again."""
import secrets

RANDOM_SEED_LIMIT = 2**32  # short enough to read and type back; any int in [0, 2**64) is accepted as a seed


def random_seed() -> int:
    """A fresh seed in [0, 2**32) (not drawn from torch's global generator, which the run must not depend on)."""
    return secrets.randbelow(RANDOM_SEED_LIMIT)
