"""The `flashmoe` command as a user runs it: a real subprocess each time, but for the bad-input cases
that an in-process run (typer's CliRunner) tests as well."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from flashmoe.cli import app
from flashmoe.cli_common import PORT_OPTION

from .test_convert import files_under, write_oversized_tokenizer


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


def test_demo_completes_python_with_the_bundled_model():
    from flashmoe.demo import DEMO_PROMPT

    out = flashmoe("demo", "--tokens", 24, "--seed", 3)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(DEMO_PROMPT) and len(out.stdout) > len(DEMO_PROMPT) + 20
    assert "hits in decode" in out.stderr and "read per token" in out.stderr
    greedy = flashmoe("demo", "--tokens", 32, "--temperature", 0).stdout[len(DEMO_PROMPT):]
    assert greedy.startswith("    ") and any(word in greedy for word in ("return", "line", "path"))  # the body, on topic


def test_demo_chat_calls_a_tool():
    out = flashmoe("demo", "--chat", "-p", "Where is shutil.copyfile defined?", "--temperature", 0, "--tokens", 48)
    assert out.returncode == 0, out.stderr
    assert "<tool_call>" in out.stdout and "<function=find_source>" in out.stdout and "copyfile" in out.stdout


def test_trace_records_a_text_and_summarizes_its_locality(tmp_path, packed16):
    from flashmoe.analysis.routing_trace import RoutingTrace

    (tmp_path / "code.py").write_text("def f(x):\n    return x + 1\n" * 8)
    out = flashmoe("trace", "--model", packed16, "--data", tmp_path / "code.py", "--out", tmp_path / "t.npz", "--tokens", 100)
    assert out.returncode == 0, out.stderr
    trace = RoutingTrace.load(tmp_path / "t.npz")  # the byte tokenizer: one token per character
    assert trace.ids.shape == (100, 4, 2) and trace.num_experts == 8 and trace.source == "code.py"
    assert "reuse w=1" in out.stderr and "load entropy" in out.stderr and "uniform routing" in out.stderr


@pytest.mark.parametrize("command", ["generate", "chat", "serve", "bench"])
def test_gpu_options_are_offered_by_every_command_that_loads_a_model(command):
    out = flashmoe(command, "--help")
    assert out.returncode == 0 and all(f in out.stdout for f in ("--dense-bits", "--prefetch", "--cpu-experts"))


def test_generate_with_8_bit_dense_weights(packed16):
    out = flashmoe("generate", "-m", packed16, "-p", "The cat", "-n", 6, "--temperature", 0, "--dense-bits", 8)
    assert out.returncode == 0, out.stderr
    from flashmoe.engine import Engine, EngineConfig
    from flashmoe.runtime.sampling import SamplingParams

    texts = {bits: "".join(s.text for s in Engine(packed16, EngineConfig(dense_bits=bits)).generate("The cat", SamplingParams(max_tokens=6)))
             for bits in (16, 8)}
    assert texts[8] != texts[16]  # the unit-gain test model diverges at the second token: the option is seen
    assert out.stdout == texts[8] + "\n"


def assert_one_error_line(exit_code: int, stderr: str, expected_code: int, message: str) -> None:
    """A bad input ends in one line, `error: ...` naming the problem, and the exit code: no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert exit_code == expected_code and "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], stderr


@pytest.fixture(scope="module")
def places(tiny_vlm, packed16, tmp_path_factory) -> dict[str, str]:
    """What the bad-input tables name: a private copy of a checkpoint beside a user's file, the packed
    test model, and checkpoints and models broken one way each."""
    root = tmp_path_factory.mktemp("bad_inputs")
    shutil.copytree(tiny_vlm[0], root / "hf")
    (root / "notes.txt").write_text("the user's own")

    def broken(name: str, files: dict[str, str | bytes], copied=("config.json", "tokenizer.json")):
        (root / name).mkdir()
        for f in copied:
            shutil.copy(tiny_vlm[0] / f, root / name)
        for f, content in files.items():
            (root / name / f).write_bytes(content.encode() if isinstance(content, str) else content)

    def safetensors(header) -> bytes:
        raw = json.dumps(header).encode()
        return len(raw).to_bytes(8, "little") + raw + bytes(64)

    broken("list_header", {"model.safetensors": safetensors([{"dtype": "F32"}])})
    broken("no_offsets", {"model.safetensors": safetensors({"w": {"dtype": "F32", "shape": [2]}})})
    broken("index_not_json", {"model.safetensors.index.json": '{"weight_map": {'})
    broken("index_no_map", {"model.safetensors.index.json": '{"metadata": {}}'})
    broken("index_escapes", {"model.safetensors.index.json": '{"weight_map": {"w": "../hf/model.safetensors"}}'})
    broken("config_not_json", {"config.json": '{"model_type": "qwen3_5_moe",\n "text_config": }'}, copied=())
    broken("user_dir", {"mine.txt": "mine"}, copied=())
    broken("empty", {}, copied=())
    shutil.copytree(packed16, root / "model_with_notes")
    (root / "model_with_notes" / "notes.txt").write_text("mine")
    shutil.copytree(packed16, root / "big_tokenizer")
    write_oversized_tokenizer(root / "big_tokenizer")
    shutil.copytree(packed16, root / "hot")
    (root / "hot" / "generation_config.json").write_text('{"do_sample": true, "temperature": "hot"}')
    return {"root": str(root), "src": str(root / "hf"), "file": str(root / "notes.txt"), "model": str(packed16),
            **{p.name: str(p) for p in root.iterdir()}}


# The bad-input table: (arguments, stdin, exit code, part of the message). Each case is a real
# `python -m flashmoe` run, most of which is importing torch: one case of each kind, the rest in-process below.
BAD_INPUTS = {
    "convert onto its own source": (["convert", "{src}", "{src}", "--force"], None, 2, "is the source checkpoint"),
    "a safetensors header that is a JSON list": (["convert", "{list_header}", "{root}/out", "--bits", "16"], None, 2,
                                                 "not an object of tensors"),
    "a prompt on stdin that is not UTF-8": (["generate", "-m", "{model}", "-p", "-"], b"\xff\xfe hi", 2, "is not UTF-8 text"),
    "--temperature nan": (["generate", "-m", "{model}", "-p", "x", "--temperature", "nan"], None, 2,
                          "temperature must be a finite number >= 0"),
    "--k 0": (["generate", "-m", "{model}", "-p", "x", "--k", "0"], None, 2, "--k must be at least 1"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_a_bad_input_is_one_clear_error_line_and_exit_code_2(places, tiny_vlm, case):
    args, stdin, code, message = BAD_INPUTS[case]
    out = subprocess.run([sys.executable, "-m", "flashmoe", *(a.format(**places) for a in args)],
                         capture_output=True, input=stdin, timeout=300)
    assert_one_error_line(out.returncode, out.stderr.decode("utf-8", "replace"), code, message)
    assert_nothing_lost_or_left(places, tiny_vlm[0])


def assert_nothing_lost_or_left(places: dict[str, str], original: Path) -> None:
    """After a refused command: the source checkpoint and the user's file as they were, no working directory left."""
    root = Path(places["root"])
    assert files_under(root / "hf") == files_under(original) and (root / "notes.txt").read_text() == "the user's own"
    assert not list(root.glob(".*")) and not (root / "out").exists()


# Bad inputs that an in-process run tests as well as a subprocess: (arguments, message).
IN_PROCESS_BAD_INPUTS = {
    "--model an empty directory": (["generate", "-m", "{empty}", "-p", "x"], "not a flashmoe model directory"),
    "--host-mem below a token's experts": (["generate", "-m", "{model}", "-p", "x", "--host-mem", "1K"],
                                           "raise --host-mem to at least"),
    "--k 99": (["generate", "-m", "{model}", "-p", "x", "--k", "99"], "--k must be between 1 and 8"),
    "--prefetch on the CPU": (["generate", "-m", "{model}", "-p", "x", "--prefetch"], "--prefetch is for the GPU path"),
    "--cpu-experts on the CPU": (["generate", "-m", "{model}", "-p", "x", "--cpu-experts", "1"],
                                 "--cpu-experts is for the GPU path"),
    "--dense-bits 4": (["generate", "-m", "{model}", "-p", "x", "--dense-bits", "4"], "--dense-bits must be 16 or 8"),
    "a tokenizer larger than the vocabulary": (["generate", "-m", "{big_tokenizer}", "-p", "x"],
                                               "tokens but the model's vocabulary (vocab_size in config.json) has 320"),
    "--top-p nan": (["generate", "-m", "{model}", "-p", "x", "--top-p", "nan"], "top_p must be a number in (0, 1]"),
    "--temperature -1": (["generate", "-m", "{model}", "-p", "x", "--temperature", "-1"], "temperature must be a finite number"),
    "--temperature inf": (["generate", "-m", "{model}", "-p", "x", "--temperature", "inf"], "temperature must be a finite number"),
    "--repetition-penalty inf": (["generate", "-m", "{model}", "-p", "x", "--repetition-penalty", "inf"],
                                 "repetition_penalty must be a finite number > 0"),
    "--seed past 64 bits": (["generate", "-m", "{model}", "-p", "x", "--seed", str(2**70)], "seed must be a 64-bit integer"),
    "--tokens 0": (["generate", "-m", "{model}", "-p", "x", "--tokens", "0"], "max_tokens must be an integer of at least 1, not 0"),
    "--host-mem -1G": (["generate", "-m", "{model}", "-p", "x", "--host-mem", "-1G"], "cannot read '-1G' as a size"),
    "--host-mem abc": (["generate", "-m", "{model}", "-p", "x", "--host-mem", "abc"], "cannot read 'abc' as a size"),
    "--host-mem empty": (["generate", "-m", "{model}", "-p", "x", "--host-mem", ""], "cannot read '' as a size"),
    "--device foo": (["generate", "-m", "{model}", "-p", "x", "--device", "foo"], "--device must be auto, cpu, cuda or cuda:N"),
    "--model missing": (["generate", "-m", "{root}/missing", "-p", "x"], "missing does not exist: it is not a flashmoe model"),
    "--model a file": (["generate", "-m", "{file}", "-p", "x"], "notes.txt is a file: it is not a flashmoe model"),
    "generation_config.json of the wrong type": (["generate", "-m", "{hot}", "-p", "x"],
                                                 "generation_config.json: temperature must be a finite number >= 0"),
    "trace --data missing": (["trace", "-m", "{model}", "--data", "{root}/missing.py", "--out", "{root}/t.npz"],
                             "is not a file"),
    "trace --tokens 5": (["trace", "-m", "{model}", "--data", "{file}", "--out", "{root}/t.npz", "--tokens", "5"],
                         "--tokens 5 is too few"),
    "trace --out in a missing directory": (["trace", "-m", "{model}", "--data", "{file}", "--out", "{root}/no/t.npz"],
                                           "the directory {root}/no does not exist"),
    "eval --json a directory": (["eval", "-m", "{model}", "--data", "{file}", "--json", "{root}"], "is a directory: name a file"),
    "convert a directory without config.json": (["convert", "{empty}", "{root}/out"], "config.json not found"),
    "convert onto the directory holding the source": (["convert", "{src}", "{root}", "--force"],
                                                      "contains the source checkpoint"),
    "convert --force onto a user's file": (["convert", "{src}", "{file}", "--force"], "is a file"),
    "convert --group-size 0": (["convert", "{src}", "{root}/out", "--group-size", "0"], "--group-size 0 cannot quantize"),
    "convert --bits 3": (["convert", "{src}", "{root}/out", "--bits", "3"], "--bits must be 16, 8, 4 or 2, not 3"),
    "convert --ngram-bits 4": (["convert", "{src}", "{root}/out", "--ngram-bits", "4"],
                               "--ngram-bits must be 16 (the checkpoint's values) or 8 (int8 codes and a float32 scale per row), not 4"),
    "convert --group-size 48": (["convert", "{src}", "{root}/out", "--group-size", "48"], "use a power of two of at least 8"),
    "a config.json that is not JSON": (["convert", "{config_not_json}", "{root}/out", "--bits", "16"],
                                       "config.json is not valid JSON: Expecting value at line 2 column 17"),
    "an index that is not JSON": (["convert", "{index_not_json}", "{root}/out", "--bits", "16"],
                                  "model.safetensors.index.json is not valid JSON"),
    "an index without weight_map": (["convert", "{index_no_map}", "{root}/out", "--bits", "16"], "has no weight_map"),
    "an index naming a shard elsewhere": (["convert", "{index_escapes}", "{root}/out", "--bits", "16"],
                                          "not a file name beside it"),
    "a header entry without data_offsets": (["convert", "{no_offsets}", "{root}/out", "--bits", "16"],
                                            "tensor 'w' has data_offsets None"),
    "convert --force onto a directory of user files": (["convert", "{src}", "{user_dir}", "--force"], "is not one: it holds"),
    "convert --force onto a model holding a user file": (["convert", "{src}", "{model_with_notes}", "--force"],
                                                         "did not write (notes.txt)"),
}


@pytest.mark.parametrize("case", IN_PROCESS_BAD_INPUTS)
def test_a_bad_input_in_process_is_one_clear_error_line(places, tiny_vlm, case):
    args, message = IN_PROCESS_BAD_INPUTS[case]
    result = CliRunner().invoke(app, [a.format(**places) for a in args])
    assert_one_error_line(result.exit_code, result.stderr, 2, message.format(**places))
    assert_nothing_lost_or_left(places, tiny_vlm[0])


def test_the_port_option_refuses_what_is_not_a_tcp_port():
    serve = typer.Typer()

    @serve.command()
    def main(port: int = PORT_OPTION):
        print(port)

    for bad in ("0", "70000", "-1"):
        result = CliRunner().invoke(serve, ["--port", bad])
        assert_one_error_line(result.exit_code, result.stderr, 2, f"--port {bad} is not a TCP port: choose one from 1 to 65535")
    assert CliRunner().invoke(serve, ["--port", "8080"]).stdout == "8080\n"


def test_tokens_past_the_context_are_announced_and_generation_runs_to_the_cap(packed16):
    prompt = "a" * 505  # the byte tokenizer: one token a character, 7 short of the 512-token context
    result = CliRunner().invoke(app, ["generate", "-m", str(packed16), "-p", prompt, "--tokens", "100", "--temperature", "0"])
    assert result.exit_code == 0, result.stderr
    assert ("note: --tokens 100 reaches past the model's context of 512 tokens (the prompt takes 505): generating at most 7"
            in result.stderr)
    assert "decode 6 tok" in result.stderr  # the seventh token is sampled, never fed back


def test_a_conversion_without_a_tokenizer_warns_that_the_model_cannot_generate_text(tiny_vlm, tmp_path):
    src = shutil.copytree(tiny_vlm[0], tmp_path / "hf", ignore=shutil.ignore_patterns("tokenizer*"))
    result = CliRunner().invoke(app, ["convert", str(src), str(tmp_path / "out"), "--bits", "16"])
    assert result.exit_code == 0, result.stderr
    warning = result.stderr[result.stderr.index("warning:"):]
    assert "has no tokenizer.json" in warning and "cannot generate text until tokenizer.json" in warning


@pytest.mark.parametrize("model_type", ["qwen3_moe", "minimax_m2", "glm4_moe", "gpt_oss"])
def test_convert_and_generate_every_family_end_to_end(model_type, tmp_path):
    """What a user of each new family runs: convert a checkpoint saved by transformers, then generate;
    the continuation is the engine's own greedy one."""
    from flashmoe.engine import Engine, EngineConfig
    from flashmoe.runtime.sampling import SamplingParams

    from .conftest import build_hf_model

    build_hf_model(model_type, tmp_path / "hf", seed=8)
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "hf"), str(tmp_path / "q4"), "--group-size", "32"])  # in-process: faster
    assert result.exit_code == 0, result.stderr
    assert "experts: stored 4-bit;" in result.stderr
    out = flashmoe("generate", "-m", tmp_path / "q4", "-p", "abc", "--tokens", 5, "--temperature", 0, "--threads", 1)
    assert out.returncode == 0, out.stderr
    engine = Engine(tmp_path / "q4", EngineConfig(threads=1))
    assert out.stdout == "".join(s.text for s in engine.generate("abc", SamplingParams(max_tokens=5))) + "\n"


def test_bench_help_names_every_preset():
    from flashmoe.bench.presets import PRESETS

    text = " ".join(CliRunner().invoke(app, ["bench", "--help"], terminal_width=400).output.split())
    assert [name for name in PRESETS if name not in text] == []
