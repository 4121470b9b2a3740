"""`builtin:tiny`: a 2-layer Llama with random weights and a locally trained tokenizer.

It exists so a real vLLM server can be smoke-tested without any model hub: its answers are
meaningless but deterministic at temperature 0, so checks pin shapes, token counts and hashes.

This file runs in two places. stackbuild imports it to find or create the cached model; the
generation itself (`generate`) runs as a script inside the serving environment, which has torch,
transformers, tokenizers and safetensors through vLLM — stackbuild does not depend on them.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

BUILTIN_PREFIX = "builtin:"
TINY = "builtin:tiny"
SEED = 1234
VOCAB_SIZE = 512
# Head size 64: the CPU attention kernels only accept a fixed set of head sizes.
LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
CORPUS = """\
The quick brown fox jumps over the lazy dog. A patch stack layers small changes over a pinned
upstream source, and every layer is applied as a commit so that it can be checked, rebased and
exported again. Return only the number 42. Copy the target word exactly: pineapple, river,
mountain, lantern, harbour. The server answers health checks, lists its models and streams
tokens one by one; the first token arrives after the prompt is processed and the rest follow at
a steady pace. Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 42 64 128 256 512 1024.
"""


def is_builtin(spec: str) -> bool:
    return spec.startswith(BUILTIN_PREFIX)


def recipe_digest() -> str:
    """The model is a pure function of this file, so its hash names the cached copy."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def model_dir(cache_dir: Path) -> Path:
    return cache_dir / "models" / f"tiny-{recipe_digest()}"


def ensure(cache_dir: Path, python: str, log: Path | None = None) -> Path:
    """The cached tiny model, generated once with `python` (an interpreter that has torch)."""
    # Absolute import: this file also runs as a plain script where the package is absent.
    from builder.errors import SmokeError

    from builder.fsutil import publishing

    final = model_dir(cache_dir)
    with publishing(final, TINY, is_made) as staging:
        if staging is not None:
            proc = subprocess.run([python, str(Path(__file__).resolve()), str(staging)],
                                  capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
            if log is not None:
                log.write_text(proc.stdout + proc.stderr, encoding="utf-8")
            if proc.returncode != 0:
                tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
                raise SmokeError(f"generating {TINY} with {python} failed: {tail}", where=str(log or python),
                                 hint="the serving environment needs torch, transformers, tokenizers and safetensors")
    return final


def is_made(folder: Path) -> bool:
    """The folder is published whole (fsutil.publishing): a config.json in it means a finished model."""
    return (folder / "config.json").is_file()


def generate(out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   model_max_length=LLAMA_CONFIG["max_position_embeddings"])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))

    config = LlamaConfig(**{**LLAMA_CONFIG, "vocab_size": VOCAB_SIZE})
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).to(torch.float32)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(out))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "do_sample": False}, indent=2) + "\n")


if __name__ == "__main__":
    generate(Path(sys.argv[1]))
