"""`flashmoe chat`: a terminal chat with history, streaming, thinking, and tool calls.

Tool calls in the model's output are parsed (flashmoe.tool_calls), run, and their results go back
through the chat template's tool role; the model then continues. The conversation prefix is kept
in a PrefixCache, so each turn prefills only what is new since the last one.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape

from .cli_common import SEED_OPTION, TEMPERATURE_OPTION, TOP_K_OPTION, TOP_P_OPTION, engine_options
from .config import EngineConfig
from .tool_calls import CallText, Content, Event, OutputParser, ParsedOutput, Reasoning, ToolCall

if TYPE_CHECKING:
    from .engine import Engine
    from .runtime.sampling import SamplingParams

HELP = """commands:
  /help            this text
  /system [TEXT]   show or set the system prompt
  /clear           forget the conversation (keeps the system prompt)
  /save FILE       save the conversation as JSON      /load FILE   load one
  /quit            leave (or Ctrl-D)
input: end a line with \\ to continue it, or enclose several lines in \"\"\" ... \"\"\".
Ctrl-C stops the answer being written; the session goes on."""

MAX_TOOL_ROUNDS = 8  # model -> tools -> model loops per user message, against a model that never stops calling
TOOL_OUTPUT_CHARS = 16_000


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]
    run: Callable[[dict[str, Any]], str]
    confirm: bool = False  # ask the user before each run

    def spec(self) -> dict[str, Any]:
        fn = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": fn}


def _run_shell(args: dict[str, Any]) -> str:
    done = subprocess.run(str(args.get("command", "")), shell=True, capture_output=True, text=True, timeout=300)
    return f"{done.stdout}{done.stderr}[exit code {done.returncode}]"


def _read_file(args: dict[str, Any]) -> str:
    path = Path(str(args.get("path", ""))).expanduser()
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read(TOOL_OUTPUT_CHARS + 1)


BUILTIN_TOOLS = [
    Tool("shell", "Run a shell command on the user's machine (after the user confirms) and return its output.",
         {"type": "object", "properties": {"command": {"type": "string", "description": "The command line."}},
          "required": ["command"]}, _run_shell, confirm=True),
    Tool("read_file", "Return the text of a file on the user's machine.",
         {"type": "object", "properties": {"path": {"type": "string", "description": "Path of the file."}},
          "required": ["path"]}, _read_file),
]


def load_user_tools(path: Path) -> list[Tool]:
    """Tools from a JSON list of {"name", "description", "parameters" (JSON schema), "command", "confirm"}.

    The command (a string split like a shell would, or a list) runs without a shell and gets the
    call's arguments as JSON on stdin and in $FLASHMOE_TOOL_ARGS; its output is the result."""
    entries = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of tools")
    tools = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not isinstance(e.get("name"), str) or not e.get("command"):
            raise ValueError(f"{path}: tool #{i} needs at least a \"name\" and a \"command\"")
        argv = shlex.split(e["command"]) if isinstance(e["command"], str) else [str(a) for a in e["command"]]

        def run(args: dict[str, Any], argv: list[str] = argv) -> str:
            payload = json.dumps(args, ensure_ascii=False)
            done = subprocess.run(argv, input=payload, capture_output=True, text=True, timeout=300,
                                  env={**os.environ, "FLASHMOE_TOOL_ARGS": payload})
            return f"{done.stdout}{done.stderr}" + (f"[exit code {done.returncode}]" if done.returncode else "")

        tools.append(Tool(e["name"], e.get("description", ""), e.get("parameters") or {"type": "object", "properties": {}},
                          run, bool(e.get("confirm", False))))
    return tools


def load_engine(model: Path, config: EngineConfig) -> Engine:
    """The engine to chat with (a seam the REPL tests use to script the model's output)."""
    from .cli_common import open_engine

    return open_engine(model, config)


class ChatSession:
    def __init__(self, engine: Engine, params: SamplingParams, tools: list[Tool], system: str | None, think: bool,
                 show_think: bool, console: Console, prefix_cache_bytes: int, max_call_chars: int = 4096) -> None:
        from .runtime.prefix_cache import PrefixCache
        from .server.grammar import Grammars

        self.engine, self.params, self.console = engine, params, console
        self.tools = {t.name: t for t in tools}
        self.think, self.show_think = think, show_think
        # The grammar holds a model that opened a call inside it until the call is well-formed: a
        # model that cannot finish one would write until --max-tokens. Past this length it is stopped.
        self.max_call_chars = max_call_chars
        self._writing_call = False
        self.system = system
        self.messages: list[dict[str, Any]] = []
        self.cache = PrefixCache(prefix_cache_bytes)
        self.specs = [t.spec() for t in tools] or None
        self.grammar = None
        if self.specs:  # a call the model opens is always well-formed, as in the server (its "auto" mode)
            self.grammars = Grammars(engine.tokenizer, (Path(engine.dir) / "tokenizer.json").read_text(encoding="utf-8"),
                                     engine.args.vocab_size, engine.stop_ids)
            self.grammar = self.grammars.tool_calls(self.specs, "auto", reasoning=think)
            self.grammars.processor(self.grammar)  # a tool schema it cannot compile fails here, not mid-chat

    def conversation(self) -> list[dict[str, Any]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def ask(self, text: str) -> None:
        """One user message, then model turns until it answers without calling a tool."""
        self.messages.append({"role": "user", "content": text})
        for _ in range(MAX_TOOL_ROUNDS):
            calls = self._answer()
            if not calls:
                return
            for call in calls:
                result = self._run_tool(call)
                self.messages.append({"role": "tool", "tool_call_id": call.id, "name": call.name, "content": result})
        self.console.print(f"[dim](stopped after {MAX_TOOL_ROUNDS} rounds of tool calls)[/]")

    def _answer(self) -> list[ToolCall]:
        """Generates one assistant message, streaming it; returns its tool calls (none if interrupted)."""
        from .engine import ContextLengthError
        from .runtime.prefix_cache import cached_generate, chat_checkpoints

        tok, specs = self.engine.tokenizer, self.specs
        messages = self.conversation()
        ids = tok.encode_chat(messages, tools=specs, enable_thinking=self.think)
        checkpoints = chat_checkpoints(tok, messages, ids, specs, enable_thinking=self.think)
        parser, out, interrupted = OutputParser(specs, reasoning=self.think, show_calls=True), ParsedOutput(), False
        self._writing_call = False
        processor = self.grammars.processor(self.grammar) if self.grammar else None
        try:
            gen, reused = cached_generate(self.engine, self.cache, ids, self.params, checkpoints, processor)
            with closing(iter(gen)) as steps:
                for step in steps:
                    self._show(parser.push(step.text), out)
                    if parser.open_call_chars > self.max_call_chars:
                        interrupted = True
                        self.console.print(f"\n[yellow]\\[tool call stopped: {parser.open_call_chars} characters without an "
                                           f"end (--max-call-chars {self.max_call_chars}); not run][/]", soft_wrap=True)
                        break
            self._show(parser.finish(), out)
        except KeyboardInterrupt:
            interrupted = True
            self._show(parser.finish(), out)
            self.console.print("\n[yellow]\\[stopped][/]")
        except ContextLengthError as e:
            self.messages.pop()
            self.console.print(f"[red]{escape(str(e))}[/] (use /clear)")
            return []
        self.console.print()
        if not interrupted:
            s = gen.stats
            self.console.print(f"[dim]{len(ids)} prompt tokens ({reused} reused), {s.decode_tokens + 1} generated, "
                               f"{s.decode_tps:.1f} tok/s[/]")
        calls = [] if interrupted else out.tool_calls
        message: dict[str, Any] = {"role": "assistant", "content": out.content}
        if calls:
            message["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                                     for c in calls]
        self.messages.append(message)
        return calls

    def _show(self, events: list[Event], out: ParsedOutput) -> None:
        for e in events:
            if isinstance(e, CallText):  # the call as it is written, dimmed; the parsed call follows
                if not self._writing_call:
                    self.console.print("\n[dim]writing a tool call:[/]")
                    self._writing_call = True
                self.console.print(e.text, end="", style="dim", markup=False, highlight=False)
                continue
            self._writing_call = False
            if isinstance(e, Content):
                self.console.print(e.text, end="", markup=False, highlight=False)
            elif isinstance(e, Reasoning):
                if self.show_think:
                    self.console.print(e.text, end="", style="dim", markup=False, highlight=False)
                elif not out.reasoning:
                    self.console.print("[dim](thinking...)[/]")
            else:
                args = json.dumps(e.arguments, ensure_ascii=False)
                self.console.print(f"\n[bold cyan]tool call[/] {escape(e.name)} {escape(args)}")
            out.add([e])

    def _run_tool(self, call: ToolCall) -> str:
        tool = self.tools.get(call.name)
        if tool is None:
            return f"error: there is no tool named {call.name!r}"
        if tool.confirm:
            try:
                answer = input(f"run {call.name} {json.dumps(call.arguments, ensure_ascii=False)}? [y/N] ")
            except (KeyboardInterrupt, EOFError):
                answer = ""
            if answer.strip().lower() not in ("y", "yes"):
                self.console.print("[dim]not run[/]")
                return "The user declined to run this."
        try:
            result = tool.run(call.arguments)
        except Exception as e:  # the model should see why its call failed, not the session end
            result = f"error: {type(e).__name__}: {e}"
        if len(result) > TOOL_OUTPUT_CHARS:
            result = result[:TOOL_OUTPUT_CHARS] + f"\n[... truncated to {TOOL_OUTPUT_CHARS} characters]"
        self.console.print(f"[dim]{escape(result[:400])}{' ...' if len(result) > 400 else ''}[/]")
        return result

    def command(self, line: str) -> bool:
        """Runs a /command; False when the session should end."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/quit", "/exit"):
            return False
        if name == "/help":
            self.console.print(HELP, markup=False)
        elif name == "/clear":
            self.messages.clear()
            self.console.print("[dim]conversation cleared[/]")
        elif name == "/system":
            if arg:
                self.system = arg
            self.console.print(f"[dim]system prompt:[/] {escape(self.system or '(none)')}")
        elif name == "/save" and arg:
            Path(arg).expanduser().write_text(json.dumps({"messages": self.conversation()}, indent=2, ensure_ascii=False))
            self.console.print(f"[dim]saved {len(self.conversation())} messages to {escape(arg)}[/]")
        elif name == "/load" and arg:
            self._load(Path(arg).expanduser())
        else:
            self.console.print(f"unknown command {line!r}; /help lists them", markup=False)
        return True

    def _load(self, path: Path) -> None:
        try:
            messages = json.loads(path.read_text(encoding="utf-8"))["messages"]
            if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
                raise ValueError("every message needs a role")
        except (OSError, ValueError, KeyError, TypeError) as e:
            self.console.print(f"[red]cannot load {escape(str(path))}: {escape(str(e))}[/]")
            return
        if messages and messages[0]["role"] == "system":
            self.system, messages = messages[0].get("content"), messages[1:]
        self.messages = messages
        self.console.print(f"[dim]loaded {len(messages)} messages from {escape(str(path))}[/]")


def read_message(prompt: str = ">>> ") -> str:
    """One user message: a line, lines joined by a trailing backslash, or a \"\"\" block."""
    line = input(prompt)
    if line.strip() == '"""':
        lines = []
        while (line := input("... ")).strip() != '"""':
            lines.append(line)
        return "\n".join(lines)
    parts = []
    while line.endswith("\\"):
        parts.append(line[:-1])
        line = input("... ")
    return "\n".join(parts + [line])


def _setup_readline() -> None:
    try:
        import readline
    except ImportError:  # no line editing on this platform; plain input() still works
        return
    history = Path.home() / ".cache" / "flashmoe" / "chat_history"
    history.parent.mkdir(parents=True, exist_ok=True)
    try:
        readline.read_history_file(history)
    except OSError:
        pass
    readline.set_history_length(1000)
    import atexit

    atexit.register(readline.write_history_file, history)


@engine_options()
def chat_command(
    model: Path = typer.Option(..., "--model", "-m", help="Packed model directory (from flashmoe convert)."),
    system: Optional[str] = typer.Option(None, "--system", "-s", help="System prompt (change it later with /system)."),
    think: bool = typer.Option(False, "--think", help="Let the model reason before answering; the reasoning stays hidden."),
    show_think: bool = typer.Option(False, "--show-think", help="Let the model reason and show the reasoning, dimmed."),
    tools_file: Optional[Path] = typer.Option(
        None, "--tools", help='JSON list of extra tools: {"name", "description", "parameters" (JSON schema), '
        '"command" (gets the arguments as JSON on stdin), "confirm" (ask before each run)}.'),
    builtin_tools: bool = typer.Option(True, "--builtin-tools/--no-builtin-tools",
                                       help="Offer the shell tool (asks y/n before each command) and the read_file tool."),
    max_tokens: int = typer.Option(4096, "--max-tokens", "-n", help="Most tokens per answer."),
    max_call_chars: int = typer.Option(
        4096, "--max-call-chars", help="Stop a tool call that grows past this many characters (a model stuck in a call)."),
    temperature: Optional[float] = TEMPERATURE_OPTION,
    top_p: Optional[float] = TOP_P_OPTION,
    top_k: Optional[int] = TOP_K_OPTION,
    seed: Optional[int] = SEED_OPTION,
    prefix_cache: str = typer.Option("1G", "--prefix-cache", help="Memory for the conversation's cached prefix states (0 = off)."),
    config: EngineConfig = None,
):
    """Chat with the model in the terminal: streamed answers, history, tool calls (type /help inside)."""
    from .cli_common import USER_ERRORS, fail, sampling_params
    from .utils import parse_size

    console = Console(highlight=False)
    try:
        tools = (BUILTIN_TOOLS if builtin_tools else []) + (load_user_tools(tools_file) if tools_file else [])
        params = sampling_params(model, temperature, top_p, top_k, max_tokens=max_tokens, seed=seed)
        engine = load_engine(model, config)
        session = ChatSession(engine, params, tools, system, think or show_think, show_think, console, parse_size(prefix_cache),
                              max_call_chars)
    except USER_ERRORS as e:
        fail(e)
    try:
        _repl(session, console, model.name)
    finally:
        engine.close()  # saves what adaptive placement learned, for the next run


def _repl(session: ChatSession, console: Console, model_name: str) -> None:
    _setup_readline()
    names = ", ".join(session.tools) or "none"
    console.print(f"[bold]flashmoe chat[/] with {escape(model_name)}: tools {escape(names)}. "
                  "/help for commands, Ctrl-D to leave.")
    while True:
        try:
            line = read_message()
        except KeyboardInterrupt:
            console.print("^C  (/quit or Ctrl-D leaves)")
            continue
        except EOFError:
            console.print()
            return
        if line.strip().startswith("/"):
            if not session.command(line.strip()):
                return
        elif line.strip():
            try:
                session.ask(line)
            except KeyboardInterrupt:  # while a tool ran: the answer in progress is dropped
                console.print("\n[yellow]\\[stopped][/]")
