"""Page keys: a chained SHA-256 over each page's token ids, SGLang's scheme.

A page's key hashes the previous page's key (its 32 raw bytes) followed by the
page's token ids, each as 4 bytes little-endian unsigned. The key therefore
names the whole prefix up to and including the page, so equal keys mean equal
KV contents in any process, on any host, after any restart. This is byte for
byte what SGLang's ``get_hash_str`` computes (its default SHA-256 mode), so a
store filled by either side is readable by the other's keys.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

__all__ = ["hash_page", "page_keys"]


def hash_page(token_ids: Iterable[int], prior_key: str | None = None) -> str:
    """Key (64 hex chars) of one page given the key of the page before it.

    ``token_ids`` are ints (0 <= id < 2**32); a tuple entry (EAGLE bigram
    mode in SGLang) contributes each of its elements in order.

    Example:
        >>> k0 = hash_page([1, 2, 3])
        >>> k1 = hash_page([4, 5, 6], prior_key=k0)
        >>> len(k1)
        64
    """
    hasher = hashlib.sha256()
    if prior_key is not None:
        hasher.update(_key_bytes(prior_key))
    for token in token_ids:
        if isinstance(token, tuple):
            for element in token:
                hasher.update(_token_bytes(element))
        else:
            hasher.update(_token_bytes(token))
    return hasher.hexdigest()


def page_keys(token_ids: Sequence[int], page_size: int, prior_key: str | None = None) -> list[str]:
    """Keys of the full pages of ``token_ids`` (a trailing partial page has none).

    Args:
        token_ids: the sequence's token ids (a list, or a 1-D integer tensor).
        page_size: tokens per page; the store's page size.
        prior_key: key of the page just before ``token_ids[0]`` (64 hex
            digits), to continue a chain (None at the start of a sequence).

    Example:
        >>> len(page_keys(list(range(10)), page_size=4))  # 2 tokens left over
        2
    """
    if not isinstance(page_size, int) or isinstance(page_size, bool) or page_size <= 0:
        raise ValueError(f"page_size: expected a positive int, got {page_size!r}")
    if hasattr(token_ids, "tolist"):  # a tensor or numpy array: plain ints once
        token_ids = token_ids.tolist()
    if prior_key is not None:
        _key_bytes(prior_key)   # refuse a bad key even when no full page follows
    keys: list[str] = []
    key = prior_key
    for start in range(0, len(token_ids) - page_size + 1, page_size):
        key = hash_page(token_ids[start:start + page_size], key)
        keys.append(key)
    return keys


_HEX_DIGITS = frozenset("0123456789abcdef")


def _key_bytes(key) -> bytes:
    """The 32 raw bytes of a page key; ValueError unless it is 64 lowercase hex digits."""
    if not isinstance(key, str) or len(key) != 64 or not _HEX_DIGITS.issuperset(key):
        raise ValueError(f"prior_key: expected None or 64 lowercase hex digits (a page key), "
                         f"got {key!r}")
    return bytes.fromhex(key)


def _token_bytes(token: int) -> bytes:
    try:
        return int(token).to_bytes(4, byteorder="little", signed=False)
    except OverflowError:
        raise ValueError(f"token_ids: expected ids in [0, 2**32), got {token}") from None
