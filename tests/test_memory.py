"""keep_freed_memory: a freed big tensor's memory is reused, not unmapped and faulted in again."""

import platform
import resource
import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
from chromaflow.models.memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():  # like a training step's activations: tensors of 4-48 MB, all freed at its end
    live = [torch.empty(n << 20).fill_(1.0) for n in (1, 3, 9, 2, 12, 5, 8)]
for _ in range(3):  # glibc settles where each size goes
    step()
start = faults()
for _ in range(4):
    step()
print(faults() - start)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the thresholds are glibc's mallopt settings")
def test_freed_tensors_are_reused_instead_of_faulted_in_again():
    def faults(arm: str) -> int:
        done = subprocess.run([sys.executable, "-c", PROBE, arm], capture_output=True, text=True, check=True)
        return int(done.stdout)

    pages = 4 * (40 << 22) // resource.getpagesize()  # four steps of 40 M floats
    plain, kept = faults("plain"), faults("keep")
    assert plain > 0.3 * pages, plain   # big tensors mapped afresh, step after step
    assert kept < 0.05 * pages, kept    # the first steps' memory, reused


def test_every_cli_command_keeps_freed_memory():
    from chromaflow import cli
    cli.keep_freed_memory.cache_clear()
    cli.main(["info", "tiny"])
    assert cli.keep_freed_memory.cache_info().currsize == 1  # called by main, before the command
    assert cli.keep_freed_memory() or platform.libc_ver()[0] != "glibc"
