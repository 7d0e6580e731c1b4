"""Tools the agent tests register with THOUGHTWIRE_TOOLS, as a user would."""


def explode(reason: str) -> str:
    """Always fails.

    Args:
        reason: what to complain about
    """
    raise RuntimeError(f"exploded: {reason}")


async def add(a: int, b: int = 0) -> int:
    """Add two whole numbers."""
    return a + b
