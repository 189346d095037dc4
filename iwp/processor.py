"""Tokenizer and processor for LLaVA-OneVision, from a checkpoint or built locally with no download.

The local tokenizer is byte-level BPE with no merges (every byte is a token), plus the chat and image
special tokens, so it encodes any text and needs no vocabulary file. It serves tiny-llava-ov and the
random-weight builds of the real architectures.
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, LlavaOnevisionProcessor, Qwen2TokenizerFast
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")

# ChatML, as LLaVA-OneVision's Qwen2 uses it: images first, then the text of each turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ImageProcessor(LlavaOnevisionProcessor):
    """HF's LLaVA-OneVision processor without the video half, whose processor needs torchvision."""

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, **kwargs)


def byte_level_tokenizer(texts=None, vocab_size: int = 0) -> Qwen2TokenizerFast:
    """Byte-level BPE: with no `texts`, no merges (every byte is a token); with `texts`, merges learned from
    them up to `vocab_size` (every byte stays in the vocabulary, so any text still encodes)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    if texts is None:
        tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    else:
        tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if texts is not None:
        tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet,
                                                           special_tokens=list(SPECIAL_TOKENS), show_progress=False))
    return Qwen2TokenizerFast(
        tokenizer_object=tok, unk_token=None, bos_token=None, eos_token="<|im_end|>",
        pad_token="<|endoftext|>", additional_special_tokens=list(SPECIAL_TOKENS))


def image_processor_for(image_size: int, pinpoints: list[list[int]]) -> LlavaOnevisionImageProcessorPil:
    return LlavaOnevisionImageProcessorPil(
        size={"height": image_size, "width": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints)


def local_processor(image_size: int, patch_size: int, pinpoints: list[list[int]], tokenizer=None) -> ImageProcessor:
    return ImageProcessor(
        image_processor=image_processor_for(image_size, pinpoints), tokenizer=tokenizer or byte_level_tokenizer(),
        num_image_tokens=(image_size // patch_size) ** 2, vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE)


def processor_from_checkpoint(path: Path) -> ImageProcessor:
    """The processor a checkpoint directory ships: its tokenizer, image processor and chat template."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    image_processor = LlavaOnevisionImageProcessorPil.from_pretrained(path)
    settings = {}
    if (path / "processor_config.json").exists():
        settings = json.loads((path / "processor_config.json").read_text())
    template = tokenizer.chat_template
    if (path / "chat_template.jinja").exists():
        template = (path / "chat_template.jinja").read_text()
    elif (path / "chat_template.json").exists():
        template = json.loads((path / "chat_template.json").read_text())["chat_template"]
    return ImageProcessor(
        image_processor=image_processor, tokenizer=tokenizer,
        num_image_tokens=settings.get("num_image_tokens", 729),
        vision_feature_select_strategy=settings.get("vision_feature_select_strategy", "full"),
        vision_aspect_ratio=settings.get("vision_aspect_ratio", "anyres_max_9"),
        chat_template=template or CHAT_TEMPLATE)


def save_processor(processor: ImageProcessor, directory: Path) -> None:
    """Write the files processor_from_checkpoint reads back: tokenizer, image processor, template, settings."""
    processor.tokenizer.save_pretrained(directory)
    processor.image_processor.save_pretrained(directory)
    (directory / "chat_template.jinja").write_text(processor.chat_template)
    (directory / "processor_config.json").write_text(json.dumps({
        "num_image_tokens": processor.num_image_tokens,
        "vision_feature_select_strategy": processor.vision_feature_select_strategy,
        "vision_aspect_ratio": processor.vision_aspect_ratio}))
