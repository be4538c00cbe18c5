"""Counts in messages, in words: shared by every layer that writes to an operator."""


def counted(n: int, one: str, many: str | None = None) -> str:
    """`1 virtual service`, `2 virtual services`: n and the word in its number."""
    return f"{n} {one}" if n == 1 else f"{n} {many or one + 's'}"
