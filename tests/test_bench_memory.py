"""pmptrain.bench.memory: the peak RSS of a block is the kernel's mark, reset on entry (issue 17)."""

import pytest
import torch

from pmptrain.bench.memory import PeakRSS, peak_rss_bytes, reset_peak_rss


def _spike(mb: int) -> None:
    t = torch.ones(mb * 2**18)  # mb MB of float32, touched, freed at once
    del t


@pytest.mark.skipif(not reset_peak_rss(), reason="needs Linux /proc/self/clear_refs")
def test_a_short_peak_inside_the_block_is_seen_and_an_earlier_one_is_not():
    _spike(96)  # an earlier, larger peak: the lifetime maximum would report it
    with PeakRSS() as mem:
        assert mem.exact
        _spike(48)  # far shorter than the old 10 ms sampling interval
    _, inc = mem.result_mb()
    assert 44 <= inc < 90, inc
    with PeakRSS() as quiet:
        pass
    assert quiet.result_mb()[1] < 8  # nothing allocated: no earlier peak leaks in


@pytest.mark.skipif(not reset_peak_rss(), reason="needs Linux /proc/self/clear_refs")
def test_reset_brings_the_mark_down_to_the_current_rss():
    _spike(64)
    high = peak_rss_bytes()
    assert reset_peak_rss()
    assert peak_rss_bytes() <= high - 48 * 2**20
