"""scripts/train_demo.py end to end on a tiny corpus and architecture: it writes a checkpoint that
transformers loads and flashmoe converts and runs, plus the held-out text and eval prompts."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

SCRIPT = Path(__file__).parents[1] / "scripts" / "train_demo.py"


def write_corpus(root: Path) -> None:
    """Stdlib-like files under names chosen so that the hash split holds some out, whatever Python runs."""
    import zlib

    source = textwrap.dedent('''
        def join_words(words, sep=" "):
            """Join the words with sep between them."""
            return sep.join(words)


        class Counter:
            def count(self, items):
                """Count the items."""
                return len(list(items))
        ''')
    heldout = train = 0
    i = 0
    while heldout < 2 or train < 20:
        name = f"pkg/mod_{i}.py"
        held = zlib.crc32(name.encode()) % 50 == 0
        if held or train < 20:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(source.replace("join_words", f"join_words_{i}") * 3)
            heldout, train = heldout + held, train + (not held)
        i += 1


def test_tiny_training_run_writes_a_loadable_model(tmp_path):
    import transformers

    from flashmoe.convert import convert
    from flashmoe.engine import Engine
    from flashmoe.runtime.sampling import SamplingParams

    write_corpus(tmp_path / "lib")
    out = tmp_path / "hf"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), "--stdlib", str(tmp_path / "lib"), "--tiny", "--vocab", "400",
         "--train-seconds", "3", "--seq", "64", "--batch", "2", "--log-every", "2", "--warmup", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    log = json.loads((out / "train_log.json").read_text())
    assert log["curve"] and log["files"]["heldout"] >= 2 and len(log["final"]["load_entropy"]) == 4
    assert (out / "heldout.txt").read_text().startswith("\ndef join_words_")
    prompts = [json.loads(line) for line in (out / "eval_prompts.jsonl").read_text().splitlines()]
    assert any("tools" in p for p in prompts) and any("tools" not in p for p in prompts)
    reference = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert reference.config.num_experts == 8 and reference.config.vocab_size <= 400
    convert(out, tmp_path / "packed", bits=4)
    steps = list(Engine(tmp_path / "packed").generate("def f(x):\n", SamplingParams(max_tokens=4, temperature=0)))
    assert len(steps) >= 1
