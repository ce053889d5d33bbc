"""Tiny random models built from a config, with a small real BPE tokenizer, saved as local HF folders."""

from __future__ import annotations

from pathlib import Path

import torch

CORPUS = [
    "The committee met on Tuesday to discuss the budget for the coming year.",
    "Rivers carry sediment from the mountains down to the sea over many centuries.",
    "She wrote the numbers 12, 345 and 6789 on the board before the lecture began.",
    "Congress shall make no law respecting an establishment of religion.",
]


# text a browser must show as it is: bidi overrides and isolates, marks, zero-width characters, a BOM,
# controls (NUL, ESC) and HTML; repeated so that BPE merges them into tokens of their own
HOSTILE = [
    "Price \u202e and which \u202c is it? \u2066isolated\u2069 \u200eleft\u200f right.",
    "zero\u200bwidth join\u200cer \u200djoin\ufeffbom word\u2060joiner, line\u2028break.",
    "<script>alert(1)</script> <b onclick='x'>&amp; bold</b> <!-- c --> a < b > c.",
    "control \x00nul \x1b[31mred\x1b[0m \x07bell \x7fdel and tab\tafter.",
]


def hostile_documents(n: int = 60) -> list[str]:
    """Documents mixing ordinary sentences with HOSTILE ones."""
    return [
        f"Document {i}. {HOSTILE[i % len(HOSTILE)]} {CORPUS[i % len(CORPUS)]} {HOSTILE[(i + 1) % 4]}" for i in range(n)
    ]


def documents(n: int = 60) -> list[str]:
    """Deterministic varied documents of different lengths."""
    docs = []
    for i in range(n):
        words = " ".join(CORPUS[(i + j) % len(CORPUS)] for j in range(1 + i % 5))
        docs.append(f"Document {i}. {words}")
    return docs


def make_tokenizer(add_bos: bool, docs: list[str] | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<unk>", "<pad>", "<bos>"]
    tk.train_from_iterator(
        (docs or documents()) * 3,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    if add_bos:
        bos = tk.token_to_id("<bos>")
        tk.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos)]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<bos>", unk_token="<unk>", pad_token="<pad>"
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>", unk_token="<unk>", pad_token="<pad>"
    )


def make_neox(folder: Path, n_layers: int = 3, d_model: int = 32, seed: int = 0, docs: list[str] | None = None) -> Path:
    """A random GPT-NeoX (Pythia's architecture) with a Pythia-like tokenizer (no BOS added), trained on
    `docs` (default: documents())."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    tok = make_tokenizer(add_bos=False, docs=docs)
    cfg = GPTNeoXConfig(
        vocab_size=len(tok),
        hidden_size=d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        intermediate_size=2 * d_model,
        max_position_embeddings=256,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights than the default init, so layers differ visibly
        for p in model.parameters():
            p.mul_(4.0)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_text_folder(folder: Path, docs: list[str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(docs or documents()):
        (folder / f"doc{i:03d}.txt").write_text(d)
    return folder
