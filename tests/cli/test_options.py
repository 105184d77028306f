"""One place for the device and dtype options of every command (blipfast.options), and a command line that imports
only the command it runs."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from blipfast import cli
from blipfast.options import DTYPES, auto_dtype_name, resolve_device, resolve_dtype


def test_device_and_dtype_resolution():
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == want and resolve_device("auto").type == want
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="^--device: 'gpu7' is not a device"):
        resolve_device("gpu7")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="^--device cuda:1: no CUDA device is visible"):
            resolve_device("cuda:1")
    assert resolve_dtype(None, "cpu") == torch.float32 and resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert auto_dtype_name(torch.device("cuda")) == "bf16" and resolve_dtype(None, "cuda") == torch.bfloat16
    assert resolve_dtype("bfloat16") == resolve_dtype("bf16") == torch.bfloat16 and resolve_dtype("fp16") == torch.half
    with pytest.raises(ValueError, match="^--llm-dtype must be auto or one of bf16, fp16, fp32, got 'fp8'"):
        resolve_dtype("fp8", flag="--llm-dtype")


def test_every_command_offers_the_same_device_and_dtype_flags():
    sub = cli.build_parser()._subparsers._group_actions[0].choices
    seen = 0
    for name, parser in sub.items():
        acts = {a.dest: a for a in parser._actions}
        if "device" in acts and name != "train":  # train's options are its config table (choices: the same)
            assert acts["device"].help == "cuda, cuda:1 or cpu (default: cuda when available)", name
            seen += 1
        if "dtype" in acts:
            extra = ("fp8",) if name == "cache-features" else ()  # feature shards also store e4m3
            assert tuple(acts["dtype"].choices) == tuple(sorted(DTYPES)) + extra, name
            assert acts["dtype"].type("bfloat16") == "bf16", name  # the long names are read as the short ones
    assert seen >= 5
    train = {a.dest: a for a in sub["train"]._actions}
    assert tuple(train["precision"].choices) == ("auto", *sorted(DTYPES))


def test_main_imports_only_the_command_it_runs():
    code = ("import sys; from blipfast.cli import COMMANDS, main; main(['info']); "
            "print(sorted(m for m, _ in COMMANDS.values() if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "['blipfast._ext']"
    helped = subprocess.run([sys.executable, "-m", "blipfast.cli", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and all(name in helped.stdout for name in cli.COMMANDS)
