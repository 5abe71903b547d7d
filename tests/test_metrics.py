import pytest

from model.metrics import ngram_repetition, windowed_repetition


def test_ngram_repetition_hand_made():
    assert ngram_repetition("abcdefgh", n=4) == 0.0  # five distinct 4-grams
    assert ngram_repetition("abcabcabc", n=3) == 1.0  # abc x3, bca x2, cab x2: every 3-gram repeats
    # "abcdabcdxyz": 8 4-grams, abcd twice and nothing else repeated -> 2/8
    assert ngram_repetition("abcdabcdxyz", n=4) == pytest.approx(2 / 8)
    assert ngram_repetition("abc", n=4) == 0.0
    assert ngram_repetition([1, 2, 3, 4, 1, 2, 3, 4], n=4) == pytest.approx(2 / 5)  # token ids work too


def test_windowed_repetition_hand_made():
    assert windowed_repetition("abcdefghij", n=4) == 0.0
    assert windowed_repetition("a" * 60, n=4) == pytest.approx(1.0)
    # "abcdabcd": 4-grams abcd bcda cdab dabc abcd; only positions 0 and 4 match each other.
    # window 50 covers all: position 0 sees 1 of 4 others, position 4 sees 1 of 4, the rest 0 -> (0.25+0.25)/5
    assert windowed_repetition("abcdabcd", n=4) == pytest.approx(0.1)


def test_windowed_repetition_ignores_far_repeats_and_weights_near_ones():
    far = "abcd" + "".join(chr(0x4E00 + i) for i in range(200)) + "abcd"  # one repeat, 204 positions apart
    assert ngram_repetition(far, n=4) > 0
    assert windowed_repetition(far, n=4, window=50) == 0.0
    filler = "".join(chr(0x4E00 + i) for i in range(20))
    near, far = "abcdabcd" + filler, "abcd" + filler + "abcd"  # same length, one repeat at distance 4 vs 24
    assert windowed_repetition(near, n=4) == pytest.approx(windowed_repetition(far, n=4))
    assert windowed_repetition(near, n=4, weighted=True) > windowed_repetition(far, n=4, weighted=True)
