"""The task the trained model learns: reverse a string, one byte per token.

    prompt:  the characters, then "="        attention=
    answer:  the characters reversed, then "." noitnetta.

The characters are a-z and space, 1 to MAX_CHARS of them. A token is a byte (ids 0 .. 255, so the
model's vocab_size of 256 covers every byte), and the model only ever sees the 29 bytes above: the
alphabet, "=" and ".". Generation stops at "." (eos_id = ord(".")).

Prompts are drawn from separate seeded streams (STREAMS), so the prompts a model is scored on
are not the draws it was trained on. Short strings repeat anyway: there are only 27 strings of one
character and 729 of two, and training sees hundreds of thousands of prompts.
"""

from __future__ import annotations

import numpy as np

ALPHABET = "abcdefghijklmnopqrstuvwxyz "
MAX_CHARS = 24  # longest prompt, without the "="
SEP = "="  # ends the prompt: "now answer"
END = "."  # ends the answer: the decoder's eos token
STREAMS = {"train": 0, "monitor": 1, "test": 2}  # one random stream per use of a seed


def encode(text: str) -> np.ndarray:
    """A str -> its byte ids (len(text),) as np.int64. Only ASCII: one character is one token."""
    try:
        data = text.encode("ascii")
    except UnicodeEncodeError as err:
        raise ValueError(f"cannot encode {text[err.start]!r}: only ASCII characters are "
                         "single-byte tokens") from None
    return np.frombuffer(data, dtype=np.uint8).astype(np.int64)


def decode(ids: np.ndarray) -> str:
    """Byte ids (n,) -> the str they spell (a byte >= 128 becomes U+FFFD, never an error, since a
    model may emit any of its 256 ids)."""
    return bytes(np.asarray(ids, dtype=np.uint8).tolist()).decode("ascii", errors="replace")


def check_chars(chars: str) -> str:
    """chars if they can be reversed by the model, else ValueError saying why: empty, longer than
    MAX_CHARS, or a character outside ALPHABET (named, with its index)."""
    if not isinstance(chars, str):
        raise TypeError(f"the characters must be a str, got {type(chars).__name__}")
    if not chars:
        raise ValueError("the prompt is empty: give 1 to 24 characters before '='")
    if len(chars) > MAX_CHARS:
        raise ValueError(f"the prompt has {len(chars)} characters before '=', more than "
                         f"MAX_CHARS={MAX_CHARS}")
    for i, ch in enumerate(chars):
        if ch not in ALPHABET:
            raise ValueError(f"character {ch!r} at index {i} is not in the alphabet (a-z and "
                             "space)")
    return chars


def make_prompt(chars: str) -> str:
    """'attention' -> 'attention=' (checked by check_chars)."""
    return check_chars(chars) + SEP


def check_prompt(prompt: str) -> str:
    """A whole prompt such as 'attention=' -> its characters 'attention', or ValueError saying why
    it is not one (no final '=', or characters check_chars refuses)."""
    if not isinstance(prompt, str):
        raise TypeError(f"a prompt must be a str, got {type(prompt).__name__}")
    if not prompt.endswith(SEP):
        raise ValueError(f"a prompt ends with {SEP!r}, got {prompt!r}")
    return check_chars(prompt[:-1])


def expected_answer(prompt: str) -> str:
    """'attention=' -> 'noitnetta.': the characters reversed, then END."""
    return check_prompt(prompt)[::-1] + END


def random_chars(rng: np.random.Generator, n: int, length_weights: np.ndarray | None = None
                 ) -> list[str]:
    """n random strings over ALPHABET. Lengths are drawn from 1 .. MAX_CHARS with probabilities
    proportional to length_weights (MAX_CHARS,), uniformly if None."""
    p = None
    if length_weights is not None:
        w = np.asarray(length_weights, dtype=np.float64)
        if w.shape != (MAX_CHARS,) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"length_weights must be {MAX_CHARS} non-negative numbers, not all "
                             f"zero, got {length_weights!r:.60}")
        p = w / w.sum()
    lengths = rng.choice(np.arange(1, MAX_CHARS + 1), size=n, p=p)
    letters = np.array(list(ALPHABET))
    return ["".join(letters[rng.integers(0, len(ALPHABET), size=length)])
            for length in lengths]


def random_prompts(rng: np.random.Generator, n: int, length_weights: np.ndarray | None = None
                   ) -> list[str]:
    """n random prompts ('xyz=' ...), lengths as in random_chars."""
    return [chars + SEP for chars in random_chars(rng, n, length_weights)]


def prompt_rng(seed: int, stream: str) -> np.random.Generator:
    """The generator for one use ("train", "monitor" or "test") of a seed: the same seed gives
    independent prompts for each use."""
    return np.random.default_rng([seed, STREAMS[stream]])
