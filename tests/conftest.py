import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

# The suite must behave the same on a 2-core CI machine and a big workstation.
torch.set_num_threads(min(2, torch.get_num_threads()))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def bench_data(tmp_path_factory):
    """A prepared data folder with one small real corpus, ``src`` (leanopt's own sources)."""
    from pathlib import Path

    import leanopt
    from leanopt.bench import data as bdata

    d = tmp_path_factory.mktemp("bench-data")
    bdata.prepare(d, (), texts=[Path(leanopt.__file__).parent], text_name="src", tokenizer_from=["src"], vocab_size=320,
                  val_fraction=0.2, log=lambda s: None)
    return d


def one_run_smoke(**train_changes):
    """The smoke task reduced to one AdamW run on the ``src`` corpus (seconds)."""
    from dataclasses import replace

    from leanopt.bench.tasks import get_task

    task = get_task("smoke", corpus="src")
    return replace(task, runs=task.runs[:1], train=replace(task.train, **train_changes))
