"""`flashmoe chat` driven through a pseudo-terminal, as a person would use it."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pexpect
import pytest

SCRIPT = Path(__file__).with_name("chat_script.py")
PROMPT = ">>> "


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory) -> Path:
    """A converted tiny model with room for the tool definitions (byte-level: ~1000 tokens)."""
    from flashmoe.convert import convert
    from tests.conftest import build_hf_model

    hf = tmp_path_factory.mktemp("chat_hf")
    build_hf_model("text", hf, max_position_embeddings=4096)
    convert(hf, hf.parent / "chat_model", bits=16)
    return hf.parent / "chat_model"


def spawn(tmp_path: Path, args: list[str], script: list[str] | None = None, delay: float = 0.0) -> pexpect.spawn:
    """The chat command in a pty; with `script`, the model's answers are forced (see chat_script.py)."""
    # One thread: the tiny model gains nothing from more, and they stall when the machine is busy.
    env = {**os.environ, "HOME": str(tmp_path), "NO_COLOR": "1", "TERM": "dumb", "COLUMNS": "200", "OMP_NUM_THREADS": "1",
           "FLASHMOE_CHAT_PROMPTS": str(tmp_path / "prompts.jsonl"), "FLASHMOE_CHAT_DELAY": str(delay),
           "FLASHMOE_CHAT_SCRIPT": json.dumps(script or [])}
    program = [str(SCRIPT)] if script is not None else ["-m", "flashmoe"]
    child = pexpect.spawn(sys.executable, program + ["chat", *args], env=env, encoding="utf-8", timeout=120,
                          dimensions=(50, 200), preexec_fn=_default_sigint)
    child.expect_exact(PROMPT)
    return child


def _default_sigint() -> None:
    """In the child, before exec: Ctrl-C delivered and at its default (Python then raises
    KeyboardInterrupt), whatever the test process's thread had blocked or ignored."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def prompts(tmp_path: Path) -> list[str]:
    return [json.loads(line) for line in (tmp_path / "prompts.jsonl").read_text().splitlines()]


def test_turns_history_and_commands(tiny_chat_model, tmp_path):
    """The real (random) model: two turns, the second reusing the first's prefix, and the commands."""
    child = spawn(tmp_path, ["--model", str(tiny_chat_model), "--max-tokens", "8", "--temperature", "0", "--no-builtin-tools"])
    child.sendline("Hello there")
    child.expect(r"\((\d+) reused\), \d+ generated")
    assert child.match.group(1) == "0"
    child.expect_exact(PROMPT)
    child.sendline("first line \\")  # continued on the next line
    child.sendline("second line")
    child.expect(r"\((\d+) reused\)")
    assert int(child.match.group(1)) > 0  # everything up to the first answer came from the cache
    child.expect_exact(PROMPT)
    child.sendline("/system Be terse.")
    child.expect_exact("system prompt: Be terse.")
    saved = tmp_path / "conversation.json"
    child.sendline(f"/save {saved}")
    child.expect_exact("saved 5 messages")
    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[3]["content"] == "first line \nsecond line"
    child.sendline("/clear")
    child.expect_exact("conversation cleared")
    child.sendline(f"/load {saved}")
    child.expect_exact("loaded 4 messages")
    child.sendline("/nonsense")
    child.expect_exact("unknown command")
    child.sendline("/quit")
    child.expect(pexpect.EOF)


SHELL_CALL = "<tool_call>\n<function=shell>\n<parameter=command>\n{}\n</parameter>\n</function>\n</tool_call>"


def test_tool_calls_with_confirmation(tiny_chat_model, tmp_path):
    """Scripted answers: the model's output is forced, everything around it is real."""
    (tmp_path / "notes.txt").write_text("remember the milk")
    tools = [{"name": "add", "description": "Add two numbers.", "command": [sys.executable, "-c",
              "import json, sys; a = json.load(sys.stdin); print(a['x'] + a['y'])"],
              "parameters": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}}}}]
    (tmp_path / "tools.json").write_text(json.dumps(tools))
    script = [
        "Let me look.\n\n" + SHELL_CALL.format("echo flashmoe-$((6*7))"),
        "It printed flashmoe-42.",
        SHELL_CALL.format("rm -rf /nonexistent-dir"),
        "Understood.",
        f"<tool_call>\n<function=read_file>\n<parameter=path>\n{tmp_path / 'notes.txt'}\n</parameter>\n</function>\n</tool_call>\n"
        '<tool_call>\n{"name": "add", "arguments": {"x": 2, "y": 3}}\n</tool_call>',
        "Milk, and 5.",
    ]
    child = spawn(tmp_path, ["--model", str(tiny_chat_model), "--max-tokens", "400", "--tools", str(tmp_path / "tools.json")],
                  script)
    child.sendline("What does the command print?")
    child.expect_exact("Let me look.")
    child.expect_exact('tool call shell {"command": "echo flashmoe-$((6*7))"}')
    # The call was shown while it was written, then parsed; the markers around it are not shown.
    assert "writing a tool call:" in child.before and "<function=shell>" in child.before and "<tool_call>" not in child.before
    child.expect_exact("[y/N] ")
    child.sendline("y")
    child.expect_exact("flashmoe-42")
    child.expect_exact("It printed flashmoe-42.")
    child.expect_exact(PROMPT)

    child.sendline("Now delete it.")
    child.expect_exact("[y/N] ")
    child.sendline("n")
    child.expect_exact("not run")
    child.expect_exact("Understood.")
    child.expect_exact(PROMPT)

    child.sendline("Read my notes and add 2 and 3.")  # read_file and the user's tool: no confirmation
    child.expect_exact("Milk, and 5.")
    child.expect_exact(PROMPT)
    child.sendeof()
    child.expect(pexpect.EOF)

    sent = prompts(tmp_path)
    assert len(sent) == 6
    # Each result went back through the template's tool role: a <tool_response> in a user turn.
    assert "<|im_start|>user\n<tool_response>\nflashmoe-42\n[exit code 0]\n</tool_response><|im_end|>" in sent[1]
    assert "<tool_response>\nThe user declined to run this.\n</tool_response>" in sent[3]
    assert "<tool_response>\nremember the milk\n</tool_response>\n<tool_response>\n5\n\n</tool_response>" in sent[5]
    assert '"name": "add"' in sent[0]  # the user's tool was offered to the model


def test_a_tool_call_that_never_ends_is_shown_and_stopped(tiny_chat_model, tmp_path):
    """A model stuck inside a call (the grammar keeps it there until the call is well-formed) is
    shown writing it, stopped at --max-call-chars, and the call is not run; the session goes on."""
    stuck = "<tool_call>\n<function=shell>\n<parameter=command>\n" + "echo " * 100
    child = spawn(tmp_path, ["--model", str(tiny_chat_model), "--max-tokens", "1000", "--max-call-chars", "120"],
                  [stuck, "Fine."])
    child.sendline("Go.")
    child.expect_exact("writing a tool call:")
    child.expect(r"tool call stopped: 1\d\d characters without an end \(--max-call-chars 120\); not run")
    child.expect_exact(PROMPT)
    assert "[y/N]" not in child.before
    child.sendline("And now?")
    child.expect_exact("Fine.")
    child.expect_exact(PROMPT)
    child.sendline("/quit")
    child.expect(pexpect.EOF)


def test_ctrl_c_stops_the_answer_not_the_session(tiny_chat_model, tmp_path):
    child = spawn(tmp_path, ["--model", str(tiny_chat_model), "--max-tokens", "3000", "--no-builtin-tools"],
                  ["la " * 900, "Short answer."], delay=0.01)
    child.sendline("Sing.")
    child.expect_exact("la la la la")
    child.sendintr()
    child.expect_exact("[stopped]")
    child.expect_exact(PROMPT)
    child.sendline("Again, briefly.")
    child.expect_exact("Short answer.")
    child.expect_exact(PROMPT)
    child.sendintr()  # at the prompt: a hint, not an exit
    child.expect_exact("/quit or Ctrl-D leaves")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    sent = prompts(tmp_path)
    assert "la la" in sent[1] and "Short answer." not in sent[1]  # the interrupted answer stays in the history


def test_thinking_shown_or_hidden(tiny_chat_model, tmp_path):
    answer = "Let me weigh this.\n</think>\n\nForty-two."
    for flag, seen in (("--show-think", "Let me weigh this."), ("--think", "(thinking...)")):
        child = spawn(tmp_path, ["--model", str(tiny_chat_model), "--no-builtin-tools", flag], [answer])
        child.sendline("What is the answer?")
        child.expect_exact(PROMPT)
        turn = child.before
        assert seen in turn and "Forty-two." in turn and "</think>" not in turn
        assert ("weigh" in turn) == (flag == "--show-think")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    assert all(p.endswith("<|im_start|>assistant\n<think>\n") for p in prompts(tmp_path))  # the model thinks first
