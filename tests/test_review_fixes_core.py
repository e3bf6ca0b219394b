"""Issue 12, the inference core: identical starts, what users can vary about padding, truncation that keeps the
template whole, a LoRA round trip that keeps its head, quiet loading, and best weights restored."""

import random

import numpy as np
import pytest
import torch

import pyterrier_kdcl as kdcl


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and OpenMP threads crawl on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- identical starts ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family, head", [("bert", "none"), ("bert", "base"), ("qwen2", "base"), ("mamba", "base")])
def test_rerankers_built_alike_hold_identical_weights_whatever_ran_between(tiny_model, family, head):
    path = tiny_model(family, head=head)
    torch.manual_seed(1)
    first = kdcl.CrossEncoder(path, verbose=False, lora=True)
    torch.rand(1000), random.random(), np.random.rand(3)  # anything at all may run in between
    kdcl.CrossEncoder(path, verbose=False, lora={"r": 2})
    state = torch.get_rng_state()
    second = kdcl.CrossEncoder(path, verbose=False, lora=True)
    a, b = first.ranker.state_dict(), second.ranker.state_dict()
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert any("lora_A" in k and a[k].abs().sum() > 0 for k in a)  # the adapter's random half is compared too
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is left alone
