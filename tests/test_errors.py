"""The shared CUDA out-of-memory translation used by every GPU stage."""

from __future__ import annotations

import pytest
import torch

from posegen_cli.errors import ResourceError, out_of_memory_as


def test_out_of_memory_becomes_a_one_line_resource_error() -> None:
    with pytest.raises(ResourceError, match="^GPU full: lower the batch size$") as caught, out_of_memory_as("GPU full: lower the batch size"):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert caught.value.exit_code == 4
    assert caught.value.__cause__ is None and caught.value.__suppress_context__  # no torch traceback behind it


def test_other_errors_pass_through() -> None:
    with pytest.raises(RuntimeError, match="not memory"), out_of_memory_as("unused"):
        raise RuntimeError("not memory")
