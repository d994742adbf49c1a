"""The worker pauses the cyclic garbage collector for a batch and always turns it back on."""

from __future__ import annotations

import gc

import pytest

from workers.consumer import _collector_paused


def test_the_collector_is_paused_for_a_batch_and_back_on_after_it_fails():
    assert gc.isenabled()
    with _collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(OSError), _collector_paused():  # a failed batch is retried later
        raise OSError("storage went away")
    assert gc.isenabled()
