"""Speculative decoding (beyond/speculative.py) gives the target's tokens, whatever the draft:
greedy equal to generate_cached, sampled tokens distributed as the target's own (a chi-square
test that a wrong acceptance rule fails), caches rolled back to exactly the accepted tokens,
refusals before any work, and eos; and the commands around it (tools/speculative.py, generate.py
--draft, train.py --draft)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import TOL64

import beyond.speculative as spec
from beyond.window import window_cache
from block import GPT, GPTConfig
from generate import generate_cached, prefill
from parts import task
from parts.sampling import Sampler, sampling_probs
from tools import speculative as spec_command
from tools.references import random_model
from tools.speculative import DRAFT, TARGET

ROOT = Path(__file__).resolve().parent.parent
EOS = ord(task.END)
# Tiny random models with a vocabulary of 8, so a distribution over tokens has few cells; init_std
# 0.5 makes p and q far from uniform and far from each other.
TINY = {"vocab_size": 8, "max_seq_len": 16, "d_model": 16, "n_heads": 2, "n_layers": 1,
        "init_std": 0.5}
# chi-square, 7 degrees of freedom (8 cells): exceeded with probability 0.001 by a right sampler
CHI2_LIMIT = 24.32


@pytest.fixture(scope="module")
def shipped():
    return GPT.load(TARGET, dtype="float64"), GPT.load(DRAFT, dtype="float64")


def random_draft(seed: int = 5) -> GPT:
    """A random draft for the reversal target: same vocabulary, nothing learned."""
    return GPT(GPTConfig(d_model=32, n_heads=2, n_layers=1, init_std=0.2), seed=seed,
               dtype="float64")


def held_out(n: int) -> list[np.ndarray]:
    return [task.encode(p) for p in task.random_prompts(task.prompt_rng(0, "test"), n)]


# --- greedy: the cached decoder's tokens ---------------------------------------------------------

@pytest.mark.parametrize("which", ["shipped draft", "random draft"])
def test_greedy_is_generate_cached_on_held_out_prompts(shipped, which):
    target, draft = shipped[0], shipped[1] if which == "shipped draft" else random_draft()
    for i, prompt in enumerate(held_out(10)):
        gamma = 1 + i % 6
        want = generate_cached(target, prompt[None], len(prompt), eos_id=EOS)
        got = spec.generate_speculative(target, draft, prompt[None], len(prompt), gamma=gamma,
                                        eos_id=EOS)
        np.testing.assert_array_equal(got.tokens, want.tokens)
        np.testing.assert_allclose(got.logits, want.logits, rtol=0, atol=TOL64)
        assert got.cache_lengths == want.cache_lengths
        assert got.proposed > 0
    if which == "random draft":
        assert got.acceptance_rate < 0.5  # the equality above did not come from a good draft


def test_the_shipped_draft_is_small_and_agrees_with_the_target(shipped):
    assert DRAFT.stat().st_size < 2 ** 20
    assert shipped[1].config.d_model < shipped[0].config.d_model
    runs = [spec.generate_speculative(*shipped, p[None], len(p), eos_id=EOS)
            for p in held_out(10)]
    accepted = sum(r.accepted for r in runs)
    assert accepted / (accepted + sum(r.rejected for r in runs)) > 0.9


def test_a_left_padded_prompt_decodes_as_alone():
    target, draft = random_model(GPTConfig(**TINY), seed=1), random_model(GPTConfig(**TINY), 2)
    prompt = np.array([3, 1, 4, 1])
    padded = np.array([[0, 0, 3, 1, 4, 1]])
    want = generate_cached(target, prompt[None], 9)
    got = spec.generate_speculative(target, draft, padded, 9, gamma=3,
                                    attention_mask=np.array([[0, 0, 1, 1, 1, 1]]))
    np.testing.assert_array_equal(got.tokens, want.tokens)
    as_list = spec.generate_speculative(target, draft, [prompt], 9, gamma=3)
    np.testing.assert_array_equal(as_list.tokens, want.tokens)


@pytest.mark.parametrize("max_new_tokens", [1, 2, 3, 7])
def test_every_length_is_exact_and_no_round_overshoots(max_new_tokens):
    target, draft = random_model(GPTConfig(**TINY), seed=1), random_model(GPTConfig(**TINY), 2)
    prompt = np.array([[5, 2, 7]])
    want = generate_cached(target, prompt, max_new_tokens)
    got = spec.generate_speculative(target, draft, prompt, max_new_tokens, gamma=6)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    assert got.tokens.shape == (1, max_new_tokens)


# --- sampling: the target's distribution ---------------------------------------------------------

def tiny_pair() -> tuple[GPT, GPT]:
    """The engine (fast=True, proven equal to the readable path by verify.py): the statistical
    tests run thousands of rounds."""
    return (random_model(GPTConfig(**TINY), seed=1, fast=True),
            random_model(GPTConfig(**TINY), seed=2, fast=True))


def chi_square(tokens: np.ndarray, probs: np.ndarray) -> float:
    counts = np.bincount(tokens, minlength=probs.size)
    expected = tokens.size * probs
    return float(((counts - expected) ** 2 / expected).sum())


def first_tokens_of_a_round(target: GPT, draft: GPT, draws: int, seed: int) -> np.ndarray:
    """The first token each of `draws` rounds (gamma 3) emits after the same prompt: d_1 if it
    was accepted, else the token drawn from the leftover. Both caches are rewound each time."""
    prompt = np.array([1, 6, 3, 0])
    sampler = Sampler(temperature=1.0, rng=np.random.default_rng(seed))
    target_cache, draft_cache = target.new_cache(1), draft.new_cache(1)
    prefill(target, prompt[None, :-1], target_cache)  # everything but the newest token
    prefill(draft, prompt[None, :-1], draft_cache)
    seq = np.concatenate([prompt, np.zeros(4, dtype=np.int64)])
    out = np.empty(draws, dtype=np.int64)
    for i in range(draws):
        r = spec.speculative_round(target, draft, target_cache, draft_cache, seq, 4, 3, sampler)
        out[i] = r.drafts[0] if r.accepted else r.token
        target_cache.truncate(3)
        draft_cache.truncate(3)
    return out


def target_probs(target: GPT, ids: list[int]) -> np.ndarray:
    """(V,) the target's sampling distribution (temperature 1) after ids."""
    return sampling_probs(target(np.array([ids]))[:, -1], 1.0)[0]


def test_a_rounds_first_token_follows_the_target_not_the_draft():
    target, draft = tiny_pair()
    p = target_probs(target, [1, 6, 3, 0])
    q = sampling_probs(draft(np.array([[1, 6, 3, 0]]))[:, -1], 1.0)[0]
    assert 0.5 * np.abs(p - q).sum() > 0.3  # the draft is far from the target: a real test
    tokens = first_tokens_of_a_round(target, draft, 1500, seed=0)
    assert chi_square(tokens, p) < CHI2_LIMIT
    assert chi_square(tokens, q) > 10 * CHI2_LIMIT  # and the test can tell p from q


@pytest.mark.parametrize("mutant", ["accept every draft", "fix from p, not p - q"])
def test_the_chi_square_test_fails_a_wrong_acceptance_rule(monkeypatch, mutant):
    """The same test on a decoder with a broken rule: it must fail, or it proves nothing."""
    def accept_all(p, q, drafts, rng):
        g = len(drafts)
        return g, int(spec.draw(p[g:g + 1], rng)[0]), np.zeros(g)

    def fix_from_p(p, q, drafts, rng):
        for i, x in enumerate(drafts):
            if rng.random() * q[i, x] >= p[i, x]:
                return i, int(spec.draw(p[i:i + 1], rng)[0]), np.zeros(len(drafts))
        return len(drafts), int(spec.draw(p[-1:], rng)[0]), np.zeros(len(drafts))

    monkeypatch.setattr(spec, "accept_sampled",
                        accept_all if mutant == "accept every draft" else fix_from_p)
    target, draft = tiny_pair()
    tokens = first_tokens_of_a_round(target, draft, 1500, seed=0)
    assert chi_square(tokens, target_probs(target, [1, 6, 3, 0])) > CHI2_LIMIT


def test_the_token_after_a_bonus_or_a_fix_follows_the_target():
    """Token 2 of generate_speculative (max 3 tokens, gamma 1): the bonus from p when d_1 was
    kept, else the next round's own token. Its marginal, summed exactly over tokens 0 and 1."""
    target, draft = tiny_pair()
    prompt = [2, 5, 1]
    p0 = target_probs(target, prompt)
    expected = np.zeros(8)
    for t0 in range(8):
        p1 = target_probs(target, [*prompt, t0])
        for t1 in range(8):
            expected += p0[t0] * p1[t1] * target_probs(target, [*prompt, t0, t1])
    rng = np.random.default_rng(1)
    runs = [spec.generate_speculative(target, draft, np.array([prompt]), 3, gamma=1,
                                      temperature=1.0, rng=rng) for _ in range(1500)]
    assert sum(r.rounds[0].accepted for r in runs) > 150  # the bonus path ran, many times
    assert chi_square(np.array([r.tokens[0, 2] for r in runs]), expected) < CHI2_LIMIT


@pytest.mark.parametrize("keep_one", [{"top_k": 1}, {"top_p": 1e-9}], ids=["top_k=1", "top_p"])
def test_keeping_only_the_top_token_samples_greedily(keep_one):
    """top_k=1 (or a top_p that keeps one token) at temperature 1 leaves both distributions one
    token each, so every draw is the argmax: the greedy tokens of generate_cached, for every
    seed. A decoder that dropped the filter for the target drew other tokens (it matched greedy
    in 2 runs of 50). The draft samples with the same filter, so each proposal had q = 1 (without
    it the tokens stay the target's, only fewer drafts are accepted)."""
    target, draft = tiny_pair()
    for seed in range(12):
        prompt = np.array([[seed % 8, (3 * seed) % 8, 1]])
        got = spec.generate_speculative(target, draft, prompt, 8, gamma=3, temperature=1.0,
                                        rng=np.random.default_rng(seed), **keep_one)
        np.testing.assert_array_equal(got.tokens, generate_cached(target, prompt, 8).tokens)
        assert all((r.q == 1.0).all() for r in got.rounds)


def test_a_draft_equal_to_the_target_is_always_accepted():
    target = tiny_pair()[0]
    out = spec.generate_speculative(target, target, np.array([[1, 2]]), 12, gamma=4,
                                    temperature=0.8, top_k=5, rng=np.random.default_rng(0))
    assert out.acceptance_rate == 1.0 and out.rejected == 0
    assert len(out.rounds) == 3  # 1 + (4 + 1) + (4 + 1) + 1 tokens, the last round drafts 0


# --- the caches after a round --------------------------------------------------------------------

def assert_cache_holds(model: GPT, cache, seq: np.ndarray) -> None:
    """cache is what a fresh prefill of seq (1-D) makes: length, flags, K and V (and zeros
    past them)."""
    fresh = model.new_cache(1)
    prefill(model, seq[None], fresh)
    assert len(cache) == len(fresh) == seq.size
    np.testing.assert_array_equal(cache.positions, fresh.positions)
    for kv, ref in zip(cache.layers, fresh.layers, strict=True):
        np.testing.assert_allclose(kv.keys, ref.keys, rtol=0, atol=TOL64)
        np.testing.assert_allclose(kv.values, ref.values, rtol=0, atol=TOL64)


def one_greedy_round(target: GPT, draft: GPT, g: int):
    prompt = np.array([4, 2, 6, 1, 3])
    target_cache, draft_cache = target.new_cache(1), draft.new_cache(1)
    prefill(target, prompt[None, :-1], target_cache)
    prefill(draft, prompt[None, :-1], draft_cache)
    seq = np.concatenate([prompt, np.zeros(g + 1, dtype=np.int64)])
    r = spec.speculative_round(target, draft, target_cache, draft_cache, seq, 5, g, Sampler())
    seq[5:5 + r.accepted + 1] = [*r.drafts[:r.accepted], r.token]
    return r, seq[:5 + r.accepted + 1], target_cache, draft_cache


def test_a_rejected_round_rolls_both_caches_back_to_the_accepted_tokens():
    target, draft = tiny_pair()
    r, seq, target_cache, draft_cache = one_greedy_round(target, draft, 4)
    assert r.accepted < 4  # a rejection happened (the rollback is what is tested)
    assert_cache_holds(target, target_cache, seq[:-1])  # all but the newest token
    assert_cache_holds(draft, draft_cache, seq[:-1])


def test_when_all_are_accepted_the_draft_is_one_token_behind_then_catches_up():
    target = tiny_pair()[0]
    r, seq, target_cache, draft_cache = one_greedy_round(target, target, 3)
    assert r.accepted == 3
    assert_cache_holds(target, target_cache, seq[:-1])
    assert_cache_holds(target, draft_cache, seq[:-2])  # it never ran its own last proposal
    out = np.concatenate([seq, np.zeros(4, dtype=np.int64)])
    spec.speculative_round(target, target, target_cache, draft_cache, out, seq.size, 2, Sampler())
    assert len(draft_cache) >= seq.size  # the missing token went in with the next round


# --- eos -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("same_draft", [False, True])
def test_eos_ends_the_answer_as_in_cached(same_draft):
    """eos is picked from the cached answer, so it occurs mid-round: inside the accepted drafts
    (a draft equal to the target accepts everything) or as the round's own token."""
    target, draft = tiny_pair()
    draft = target if same_draft else draft
    full = generate_cached(target, np.array([[3, 3, 7]]), 12).tokens[0]
    eos = int(full[5])
    want = generate_cached(target, np.array([[3, 3, 7]]), 12, eos_id=eos).tokens
    got = spec.generate_speculative(target, draft, np.array([[3, 3, 7]]), 12, gamma=4,
                                    eos_id=eos)
    np.testing.assert_array_equal(got.tokens, want)
    assert got.tokens[0, -1] == eos and eos not in got.tokens[0, :-1]


# --- sliding windows: the models' full caches and the band mask ---------------------------------

def windowed_tiny(window: int | None, seed: int, **changes: object) -> GPT:
    return random_model(GPTConfig(**(TINY | {"max_seq_len": 32, "sliding_window": window}
                                     | changes)), seed=seed)


@pytest.mark.parametrize(("target_window", "draft_window"), [(3, None), (None, 2), (3, 2)])
def test_a_windowed_target_or_draft_gives_generate_cacheds_tokens(target_window, draft_window):
    """Both caches are full KVCaches; the window comes from the mask, so rejected drafts are cut
    back as anywhere else. 20 tokens after 5, far past the window, with rejections (a random
    draft): the target's own tokens, and its logits to 1e-10 (generate_cached reads a windowed
    target through a rolling buffer)."""
    target = windowed_tiny(target_window, 1)
    draft = windowed_tiny(draft_window, 2)
    prompt = np.array([[1, 2, 3, 4, 5]])
    got = spec.generate_speculative(target, draft, prompt, 20, gamma=3)
    cache = None if target_window is None else window_cache(target, 1)
    expected = generate_cached(target, prompt, 20, cache=cache)
    np.testing.assert_array_equal(got.tokens, expected.tokens)
    np.testing.assert_allclose(got.logits, expected.logits, rtol=0, atol=TOL64)
    assert got.rejected > 0 and got.accepted > 0  # both ways through a round were taken


@pytest.mark.parametrize("which", ["target", "draft"])
def test_a_rope_window_model_past_max_seq_len_is_refused_up_front(no_work, which):
    """generate_cached runs a RoPE + window model past max_seq_len in a rolling buffer, which
    cannot take rejected drafts back; speculative decoding keeps full caches, so the request is
    refused before any work, naming max_seq_len (it ran, and failed half-way)."""
    long = GPT(GPTConfig(**(TINY | {"rope": True, "sliding_window": 4})), dtype="float64")
    other = GPT(GPTConfig(**(TINY | {"max_seq_len": 64})), dtype="float64")
    target, draft = (long, other) if which == "target" else (other, long)
    need = 20 if which == "target" else 19  # the draft never sees the last token
    with pytest.raises(ValueError, match=f"{which} has max_seq_len=16.*needs {need}"):
        spec.generate_speculative(target, draft, np.ones((1, 10), dtype=np.int64), 10)


# --- refusals, before any work -------------------------------------------------------------------

@pytest.fixture
def no_work(monkeypatch):
    """Any cache made or model run fails the test: a refusal must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("work started before the request was refused")
    monkeypatch.setattr(GPT, "new_cache", refuse)
    monkeypatch.setattr(GPT, "run", refuse)


@pytest.mark.parametrize(("gamma", "error"), [(0, ValueError), (-2, ValueError),
                                              (True, TypeError), (2.0, TypeError),
                                              (None, TypeError)])
def test_gamma_must_be_an_int_of_at_least_one(no_work, gamma, error):
    target, draft = tiny_pair()
    with pytest.raises(error, match="gamma"):
        spec.generate_speculative(target, draft, np.array([[1]]), 3, gamma=gamma)


def test_refusals_name_the_argument(no_work):
    target, draft = tiny_pair()
    ids = np.array([[1, 2]])
    other_vocab = GPT(GPTConfig(**(TINY | {"vocab_size": 9})), dtype="float64")
    short = GPT(GPTConfig(**(TINY | {"max_seq_len": 6})), dtype="float64")
    cases = [
        (lambda: spec.generate_speculative("gpt", draft, ids, 3), TypeError, "^target"),
        (lambda: spec.generate_speculative(target, None, ids, 3), TypeError, "^draft"),
        (lambda: spec.generate_speculative(target, other_vocab, ids, 3), ValueError,
         "draft has vocab_size=9, the target 8"),
        (lambda: spec.generate_speculative(target, short, ids, 6), ValueError,
         "draft has max_seq_len=6.*needs 7"),
        (lambda: spec.generate_speculative(target, draft, ids, 15), ValueError, "max_seq_len"),
        (lambda: spec.generate_speculative(target, draft, np.array([[1], [2]]), 3), ValueError,
         "prompt_ids.*batch of 2"),
        (lambda: spec.generate_speculative(target, draft, ids, 3, temperature=1.0), ValueError,
         "rng"),
        (lambda: spec.generate_speculative(target, draft, ids, 0), ValueError, "max_new_tokens"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


def test_a_draft_exactly_long_enough_is_accepted():
    """The draft never sees the last token: P + max_new_tokens - 1 positions suffice."""
    target = tiny_pair()[0]
    short = random_model(GPTConfig(**(TINY | {"max_seq_len": 6})), seed=2)
    got = spec.generate_speculative(target, short, np.array([[1, 2]]), 5, gamma=2)
    np.testing.assert_array_equal(got.tokens, generate_cached(target, np.array([[1, 2]]), 5).tokens)


def test_the_speed_up_formula_by_hand():
    # a = 0.5, gamma 2: 1 + 0.5 + 0.25 = 1.75 tokens per round, cost 2 * 0.1 + 1 = 1.2
    assert spec.expected_speedup(0.5, 2, 0.1) == pytest.approx(1.75 / 1.2)
    assert spec.expected_speedup(1.0, 4, 0.25) == pytest.approx(5 / 2)


# --- the commands around it ----------------------------------------------------------------------

def test_the_heavier_target_computes_the_same_function(shipped):
    """bench's section 2 rests on this: zero-weight blocks and zero-padded MLPs change nothing."""
    target = shipped[0]
    big = spec_command.heavier(target, 3, 1024)
    assert big.config.n_layers == target.config.n_layers + 3 and big.config.d_ff == 1024
    ids = held_out(1)[0][None]  # (1, P)
    np.testing.assert_allclose(big(ids), target(ids), rtol=0, atol=TOL64)


def test_generate_command_with_draft_checks_speculative_against_cached(capsys):
    from tools import generate_cli

    assert generate_cli.main(["--draft", str(DRAFT), "--prompt", "kv cache"]) == 0
    out = capsys.readouterr().out
    assert "tokens identical to cached greedy: True" in out
    assert "acceptance rate a = " in out and "speculative / cached tokens/s: " in out


def test_generate_command_exits_1_when_speculative_differs(capsys, monkeypatch):
    from tools import generate_cli

    def off_by_one(*args, **kwargs):
        out = real(*args, **kwargs)
        return out._replace(tokens=(out.tokens + 1) % 256)

    real = spec.generate_speculative
    monkeypatch.setattr(spec_command, "generate_speculative", off_by_one)
    assert generate_cli.main(["--draft", str(DRAFT), "--prompt", "kv cache"]) == 1
    assert "tokens identical to cached greedy: False" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--random", "--draft", "x.npz"],
                                  ["--draft", "no/such/draft.npz"]])
def test_generate_command_refuses_a_draft_it_cannot_use(capsys, argv):
    from tools import generate_cli

    with pytest.raises(SystemExit) as exit_info:
        generate_cli.main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    last = captured.err.strip().splitlines()[-1]
    assert "--draft" in last and "--checkpoint" not in last  # the flag given, not the target's
    assert captured.out == ""


@pytest.mark.parametrize(("config", "prompts", "match"), [
    ({"vocab_size": 128}, [], "vocab_size=128"),
    ({"max_seq_len": 16}, [], "max_seq_len=16"),
    # long enough for the first prompt ("ab=": 3 + 3 - 1 positions), not for the second
    ({"max_seq_len": 10}, ["--prompt", "ab", "--prompt", "abcdefgh"], "max_seq_len=10"),
], ids=["another vocabulary", "too short for the demo", "too short for the last prompt"])
def test_generate_command_checks_the_draft_before_printing_anything(tmp_path, capsys, model_calls,
                                                                     config, prompts, match):
    """Everything about the draft is checked with the target and the prompts, before the first
    line of output and before any decoding: not after the naive and cached demo has run."""
    from tools import generate_cli

    path = GPT(GPTConfig(**config)).save(tmp_path / "draft.npz")
    with pytest.raises(SystemExit) as exit_info:
        generate_cli.main(["--draft", str(path), *prompts])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    last = captured.err.strip().splitlines()[-1]
    assert "argument --draft" in last and match in last and str(path) in last
    assert model_calls["forward"] == 0


def test_train_draft_trains_the_small_config(tmp_path):
    from tools import train

    out = tmp_path / "draft.npz"
    assert train.main(["--draft", "--quick", "--out", str(out)]) == 0
    assert GPT.load(out).config == GPTConfig(**train.DRAFT_CONFIG)
    assert (tmp_path / "draft.log.json").is_file()


@pytest.mark.parametrize("flag", ["--no-causal-mask", "--plot"])
def test_train_draft_refuses_what_would_overwrite_or_ignore_it(capsys, flag):
    from tools import train

    before = DRAFT.read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--draft", flag])
    assert exit_info.value.code == 2
    assert "--draft" in capsys.readouterr().err
    assert DRAFT.read_bytes() == before
