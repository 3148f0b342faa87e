"""The `flashmoe` command as a user runs it: a real subprocess each time."""

import subprocess
import sys

import pytest


def flashmoe(*args, input=None):
    return subprocess.run([sys.executable, "-m", "flashmoe", *map(str, args)], capture_output=True, text=True, input=input, timeout=300)


@pytest.mark.parametrize("command", ["convert", "generate", "demo"])
def test_help(command):
    out = flashmoe(command, "--help")
    assert out.returncode == 0 and "Usage" in out.stdout


def test_generate_streams_only_the_continuation_to_stdout(packed16):
    out = flashmoe("generate", "--model", packed16, "--prompt", "Hello", "--tokens", 6, "--temperature", 0, "--host-mem", "64K")
    assert out.returncode == 0, out.stderr
    from flashmoe.engine import Engine
    from flashmoe.runtime.sampling import SamplingParams

    expected = "".join(s.text for s in Engine(packed16).generate("Hello", SamplingParams(max_tokens=6)))
    assert out.stdout == expected + "\n"
    for field in ("prefill", "decode", "per layer (ms)", "mixer", "routing", "expert I/O", "expert compute", "hits in decode", "read per token", "peak RSS"):
        assert field in out.stderr


def test_chat_flag_and_stdin_prompt(packed16):
    out = flashmoe("generate", "-m", packed16, "-p", "-", "-n", 3, "--chat", "--seed", 1, "--temperature", 0.7, input="Hi there")
    assert out.returncode == 0, out.stderr


def test_user_errors_are_one_clear_line(tmp_path, packed16):
    out = flashmoe("generate", "--model", tmp_path, "--prompt", "x")
    assert out.returncode == 2 and "not a flashmoe model directory" in out.stderr and "Traceback" not in out.stderr
    out = flashmoe("generate", "--model", packed16, "--prompt", "x", "--host-mem", "1K")
    assert out.returncode == 2 and "raise --host-mem to at least" in out.stderr
    out = flashmoe("generate", "--model", packed16, "--prompt", "x", "--k", 99)
    assert out.returncode == 2 and "--k must be between 1 and 8" in out.stderr
    out = flashmoe("convert", tmp_path, tmp_path / "out")
    assert out.returncode == 2 and "config.json" in out.stderr
    for flag in (["--prefetch"], ["--cpu-experts", 1]):  # GPU-path options refused on the CPU, not ignored
        out = flashmoe("generate", "--model", packed16, "--prompt", "x", *flag)
        assert out.returncode == 2 and f"{flag[0]} is for the GPU path" in out.stderr


def test_demo_completes_python_with_the_bundled_model():
    from flashmoe.demo import DEMO_PROMPT

    out = flashmoe("demo", "--tokens", 24, "--seed", 3)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(DEMO_PROMPT) and len(out.stdout) > len(DEMO_PROMPT) + 20
    assert "hits in decode" in out.stderr and "read per token" in out.stderr
    assert flashmoe("demo", "--tokens", 24, "--seed", 3).stdout == out.stdout  # seeded sampling repeats
    greedy = flashmoe("demo", "--tokens", 32, "--temperature", 0).stdout[len(DEMO_PROMPT):]
    assert greedy.startswith("    ") and any(word in greedy for word in ("return", "line", "path"))  # the body, on topic


def test_demo_chat_calls_a_tool():
    out = flashmoe("demo", "--chat", "-p", "Where is shutil.copyfile defined?", "--temperature", 0, "--tokens", 48)
    assert out.returncode == 0, out.stderr
    assert "<tool_call>" in out.stdout and "<function=find_source>" in out.stdout and "copyfile" in out.stdout


def test_trace_records_a_text_and_summarizes_its_locality(tmp_path, packed16):
    from flashmoe.runtime.routing_trace import RoutingTrace

    (tmp_path / "code.py").write_text("def f(x):\n    return x + 1\n" * 8)
    out = flashmoe("trace", "--model", packed16, "--data", tmp_path / "code.py", "--out", tmp_path / "t.npz", "--tokens", 100)
    assert out.returncode == 0, out.stderr
    trace = RoutingTrace.load(tmp_path / "t.npz")  # the byte tokenizer: one token per character
    assert trace.ids.shape == (100, 4, 2) and trace.num_experts == 8 and trace.source == "code.py"
    assert "reuse w=1" in out.stderr and "load entropy" in out.stderr and "uniform routing" in out.stderr
    out = flashmoe("trace", "--model", packed16, "--data", tmp_path / "missing.py", "--out", tmp_path / "u.npz")
    assert out.returncode == 2 and "is not a file" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("command", ["generate", "chat", "serve", "bench"])
def test_gpu_options_are_offered_by_every_command_that_loads_a_model(command):
    out = flashmoe(command, "--help")
    assert out.returncode == 0 and all(f in out.stdout for f in ("--dense-bits", "--prefetch", "--cpu-experts"))


def test_generate_with_8_bit_dense_weights(packed16):
    out = flashmoe("generate", "-m", packed16, "-p", "The cat", "-n", 6, "--temperature", 0, "--dense-bits", 8)
    assert out.returncode == 0, out.stderr
    from flashmoe.engine import Engine
    from flashmoe.runtime.sampling import SamplingParams

    texts = {bits: "".join(s.text for s in Engine(packed16, dense_bits=bits).generate("The cat", SamplingParams(max_tokens=6)))
             for bits in (16, 8)}
    assert texts[8] != texts[16]  # the unit-gain test model diverges at the second token: the option is seen
    assert out.stdout == texts[8] + "\n"
    out = flashmoe("generate", "-m", packed16, "-p", "Hello", "--dense-bits", 4)
    assert out.returncode == 2 and "--dense-bits must be 16 or 8" in out.stderr and "Traceback" not in out.stderr
