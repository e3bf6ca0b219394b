import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """``tiny_model(family, **kw)`` → a directory with a tiny random model of that family (cached per session)."""
    from tiny_models import write_tiny_model

    made = {}

    def make(family: str, seed: int = 0, head: str = "base"):
        key = (family, seed, head)
        if key not in made:
            made[key] = write_tiny_model(family, tmp_path_factory.mktemp(f"{family}-{seed}-{head}"), seed, head)
        return made[key]

    return make


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and OpenMP threads crawl on a busy machine: a module that asks
    (``pytestmark = pytest.mark.usefixtures("one_thread")``) runs on one."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
