"""An OpenAI- and Anthropic-compatible HTTP server over one Engine (`flashmoe serve`).

Layout: `app` wires the routes; `openai_chat`, `completions` and `anthropic` translate each API;
`service` plans and runs generations; `scheduler` is the one generation thread and its fair,
bounded queue; `grammar` constrains JSON and tool calls; `logprobs` writes token log-probabilities
in OpenAI's shapes; `http` holds the HTTP plumbing (bounded bodies, who may call, errors).
Only the command is imported here, so that `flashmoe --help` stays quick.
"""

from .cli import serve_command

__all__ = ["serve_command"]
