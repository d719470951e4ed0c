"""The tokenizer, chat template and processor files of a tiny test checkpoint.

A real byte-level BPE tokenizer (Qwen2's pre-tokenizer, normaliser and decoder) whose few hundred
merges are learned here from a small built-in text, with Qwen's added tokens after the learned
vocabulary (on the real tokenizer they sit at 151643 and up; here they follow the merges, so
their ids are small). Everything is deterministic: the same call writes the same bytes.

Files written next to the weights, as the Qwen3-VL repository has them:
tokenizer.json, tokenizer_config.json (with the chat template), chat_template.json,
generation_config.json, preprocessor_config.json.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

# Qwen's added tokens in Qwen's order. The first 14 are special (skipped when decoding with
# skip_special_tokens); the rest are ordinary added tokens of Qwen3's vocabulary.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
ADDED_TOKENS = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"

# Qwen2's pre-tokenizer split (as in transformers' tokenization_qwen2.py).
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
MAX_MERGES = 320  # the text yields fewer (pairs seen at least twice)

# The merges are learned from this text: plain chat-like English with digits and punctuation,
# so common words become single tokens and anything else still round-trips through bytes.
_TRAINING_TEXT = """\
You are a helpful assistant. Describe the image in one sentence.
The picture shows a red square on a white background, next to a blue circle and a green line.
What is in the image? There are two cats sitting on the table, and one dog is under the chair.
Count the objects: one, two, three, four, five, six, seven, eight, nine, ten.
The quick brown fox jumps over the lazy dog. The lazy dog does not jump at all.
Hello! How are you today? I am fine, thank you. What would you like to know about this photo?
In the top left corner there is a small tree; in the bottom right corner there is a large house.
The colors are red, orange, yellow, green, blue, indigo and violet, like a rainbow after rain.
Please answer the question about the image with a short answer, then explain your reasoning.
The model reads the text and the image tokens, then it writes the answer token by token.
A vision encoder turns every patch of the picture into a vector; the language model reads them.
The year 2025 had 365 days, and the train left at 10:45 with 128 people and 64 bags on board.
Numbers like 3.14, 42, 1000 and 7 appear in text, and so do words like the, and, of, to, in.
She said: "This is the best picture I have seen." He replied, "It is a nice picture indeed."
The weather is sunny, the sky is clear, and the sea is calm; it is a good day for a walk.
Write a short story about a robot who learns to paint pictures of the city at night.
The robot looked at the lights of the city, took a brush, and painted the first line.
def main(): print("hello world") # a line of code, with brackets [0, 1, 2] and {"key": "value"}
"""


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    # The trainer is deterministic: the alphabet is fixed (all 256 bytes) and ties between
    # equally frequent pairs break by pair id, so the same text gives the same merges.
    trainer = trainers.BpeTrainer(
        vocab_size=256 + MAX_MERGES,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train_from_iterator([_TRAINING_TEXT], trainer=trainer)

    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS])
    return tokenizer.to_str()


def token_ids() -> dict[str, int]:
    """Ids of Qwen's added tokens in the tiny tokenizer, by token text."""
    added = json.loads(_tokenizer_json())["added_tokens"]
    return {entry["content"]: entry["id"] for entry in added}


def tokenizer_size() -> int:
    """Number of tokens (learned vocabulary plus added tokens); the highest id is this minus 1."""
    data = json.loads(_tokenizer_json())
    return len(data["model"]["vocab"]) + len(data["added_tokens"])


# Renders like Qwen3-VL-Instruct's template (written for this project): ChatML turns; a content
# list renders its text parts as text and each image part ({"type": "image"}, or any part with an
# "image"/"image_url" key) as <|vision_start|><|image_pad|><|vision_end|>, videos likewise with
# <|video_pad|>; tools, tool calls and tool responses as Qwen does; add_vision_id numbers them.
# As in Qwen's, only a leading system message is rendered.
CHAT_TEMPLATE = """\
{%- macro render_content(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- elif content is not none -%}
        {%- for part in content -%}
            {%- if part.type == 'image' or 'image' in part or 'image_url' in part -%}
                {%- set counts.image = counts.image + 1 -%}
                {%- if add_vision_id %}Picture {{ counts.image }}: {% endif -%}
                {{- '<|vision_start|><|image_pad|><|vision_end|>' -}}
            {%- elif part.type == 'video' or 'video' in part -%}
                {%- set counts.video = counts.video + 1 -%}
                {%- if add_vision_id %}Video {{ counts.video }}: {% endif -%}
                {{- '<|vision_start|><|video_pad|><|vision_end|>' -}}
            {%- elif 'text' in part -%}
                {{- part.text -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- set counts = namespace(image=0, video=0) -%}
{%- if tools -%}
    {{- '<|im_start|>system\\n' -}}
    {%- if messages[0].role == 'system' -%}
        {{- render_content(messages[0].content) + '\\n\\n' -}}
    {%- endif -%}
    {{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n' -}}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' -}}
    {%- for tool in tools -%}
        {{- '\\n' + (tool | tojson) -}}
    {%- endfor -%}
    {{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and ' -}}
    {{- 'arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n' -}}
    {{- '{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n' -}}
{%- elif messages[0].role == 'system' -%}
    {{- '<|im_start|>system\\n' + render_content(messages[0].content) + '<|im_end|>\\n' -}}
{%- endif -%}
{%- for message in messages -%}
    {%- if message.role == 'user' -%}
        {{- '<|im_start|>' + message.role + '\\n' + render_content(message.content) + '<|im_end|>\\n' -}}
    {%- elif message.role == 'assistant' -%}
        {{- '<|im_start|>assistant\\n' + render_content(message.content) -}}
        {%- for tool_call in message.tool_calls or [] -%}
            {%- if not loop.first or message.content -%}{{- '\\n' -}}{%- endif -%}
            {%- set call = tool_call.function if tool_call.function else tool_call -%}
            {{- '<tool_call>\\n{"name": "' + call.name + '", "arguments": ' -}}
            {{- call.arguments if call.arguments is string else (call.arguments | tojson) -}}
            {{- '}\\n</tool_call>' -}}
        {%- endfor -%}
        {{- '<|im_end|>\\n' -}}
    {%- elif message.role == 'tool' -%}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}
        {{- '\\n<tool_response>\\n' + render_content(message.content) + '\\n</tool_response>' -}}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\\n' -}}
{%- endif -%}
"""


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True) + "\n")


def write_tokenizer_files(directory: Path, *, model_max_length: int = 262144) -> dict[str, int]:
    """Write tokenizer.json, tokenizer_config.json and chat_template.json; return token_ids()."""
    directory = Path(directory)
    (directory / "tokenizer.json").write_text(_tokenizer_json())
    ids = token_ids()
    added_tokens_decoder = {
        str(ids[t]): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": t in SPECIAL_TOKENS,
        }
        for t in (*SPECIAL_TOKENS, *ADDED_TOKENS)
    }
    _write_json(
        directory / "tokenizer_config.json",
        {
            "add_bos_token": False,
            "add_prefix_space": False,
            "added_tokens_decoder": added_tokens_decoder,
            "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
            "bos_token": None,
            "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "eos_token": EOS_TOKEN,
            "errors": "replace",
            "model_max_length": model_max_length,
            "pad_token": PAD_TOKEN,
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        },
    )
    _write_json(directory / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    return ids


def write_generation_config(directory: Path, *, sampling_defaults: bool) -> None:
    """generation_config.json. The real model ships sampling defaults (temperature 0.7, ...);
    the tiny one does not, so transformers' generate() and a server's default are greedy."""
    ids = token_ids()
    config = {
        "bos_token_id": ids[PAD_TOKEN],
        "eos_token_id": [ids[EOS_TOKEN], ids[PAD_TOKEN]],
        "pad_token_id": ids[PAD_TOKEN],
    }
    if sampling_defaults:
        config.update(do_sample=True, repetition_penalty=1.0, temperature=0.7, top_k=20, top_p=0.8)
    _write_json(Path(directory) / "generation_config.json", config)


def write_preprocessor_config(
    directory: Path, *, patch_size: int, temporal_patch_size: int, merge_size: int, min_pixels: int, max_pixels: int
) -> None:
    """preprocessor_config.json for Qwen2VLImageProcessor, as Qwen3-VL's repository has it."""
    _write_json(
        Path(directory) / "preprocessor_config.json",
        {
            "image_mean": [0.5, 0.5, 0.5],
            "image_processor_type": "Qwen2VLImageProcessorFast",
            "image_std": [0.5, 0.5, 0.5],
            "merge_size": merge_size,
            "patch_size": patch_size,
            "processor_class": "Qwen3VLProcessor",
            "size": {"longest_edge": max_pixels, "shortest_edge": min_pixels},
            "temporal_patch_size": temporal_patch_size,
        },
    )
