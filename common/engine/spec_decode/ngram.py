"""n-gram prompt lookup: propose the tokens that followed the latest earlier occurrence of the last n tokens."""
from array import array


def propose_ngram(token_ids: list[int], k: int, n_max: int, n_min: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the last n tokens (longest n first)."""
    if k <= 0:
        return []
    # bytes.rfind does the search in C; matches are only valid at item boundaries
    raw = array("q", token_ids).tobytes()
    width = 8
    for n in range(min(n_max, len(token_ids) - 1), n_min - 1, -1):
        suffix = raw[-n * width:]
        limit = len(raw) - width  # the match must end before the last token, i.e. start before the suffix
        while True:
            pos = raw.rfind(suffix, 0, limit)
            if pos < 0:
                break
            if pos % width == 0:
                start = pos // width + n
                return token_ids[start:start + k]
            limit = pos + len(suffix) - 1  # a misaligned hit: look for one starting further left
    return []
