"""A tiny random-init BLIP captioning model, built locally in seconds (no downloads).

It exercises the real save_pretrained / from_pretrained / processor / generate path of the
``transformers`` caption backend in tests and on machines without model weights. Its captions are
meaningless but deterministic.
"""

from __future__ import annotations

from pathlib import Path

import torch

IMAGE_SIZE = 32
_SEED = 1234

_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
_CAPTION_TEXT = """
a an the of on in at with and near by under over behind beside next to from for its his her their
is are sitting standing lying running walking playing looking holding wearing jumping sleeping posing
photo picture image close up view front side back top background foreground scene indoors outdoors
dog dogs cat cats puppy toy robot robots teddy bear bird man woman person child boy girl figure doll
car chair table sofa couch bed floor grass field park garden tree trees flowers sky clouds beach sand
water sea lake river snow road street city building wall window door room kitchen desk shelf book
red orange yellow green blue purple pink brown black white gray grey gold silver colorful dark light
small large big little tiny fluffy furry wooden plastic metal soft bright sunny blurry
head eyes ears nose tail paws legs arms face body fur hair collar hat shirt jacket
one two three some several
"""
_PUNCTUATION = list(".,;:!?'\"()-")
_LETTERS = list("abcdefghijklmnopqrstuvwxyz0123456789")


def tiny_vocab() -> list[str]:
    """WordPiece vocabulary: special tokens, punctuation, single characters (so any word can be spelled
    out with ``##`` continuations) and common caption words. Order defines token ids."""
    vocab: list[str] = []
    for token in [
        *_SPECIAL_TOKENS,
        *_PUNCTUATION,
        *_LETTERS,
        *(f"##{c}" for c in _LETTERS),
        *_CAPTION_TEXT.split(),
        "##s",
        "##es",
        "##ing",
        "##ed",
    ]:
        if token not in vocab:
            vocab.append(token)
    return vocab


def build_tiny_vlm(target_dir: Path) -> None:
    """Write a tiny BlipForConditionalGeneration + BlipProcessor to ``target_dir`` (save_pretrained)."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    target_dir = Path(target_dir)
    target_dir.mkdir(parents=True, exist_ok=True)
    (target_dir / "vocab.txt").write_text("\n".join(tiny_vocab()) + "\n", encoding="utf-8")
    # Loading from the vocab file (rather than building in memory) is the path real BERT tokenizers take.
    tokenizer = BertTokenizer.from_pretrained(str(target_dir))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})

    width = 32
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": width,
        "encoder_hidden_size": width,
        "intermediate_size": 2 * width,
        "projection_dim": width,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 64,
        # BLIP's generate starts decoding from bos and stops at sep: they must be ids of this vocabulary.
        "bos_token_id": tokenizer.convert_tokens_to_ids("[DEC]"),
        "eos_token_id": tokenizer.sep_token_id,
        "sep_token_id": tokenizer.sep_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision_config = {
        "hidden_size": width,
        "intermediate_size": 2 * width,
        "projection_dim": width,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": IMAGE_SIZE,
        "patch_size": 8,
    }
    config = BlipConfig(text_config=text_config, vision_config=vision_config, projection_dim=width)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        model = BlipForConditionalGeneration(config).eval()
    image_processor = BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)

    model.save_pretrained(target_dir)
    processor.save_pretrained(target_dir)


CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} : "
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image> {% else %}{{ item['text'] }} {% endif %}"
    "{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def build_tiny_chat_vlm(target_dir: Path) -> None:
    """Write a tiny LLaVA-style chat VLM (CLIP vision tower + Llama decoder) with a chat template.

    Exercises the transformers backend's chat path (AutoModelForImageTextToText + AutoProcessor +
    apply_chat_template), which real chat VLMs such as Qwen2-VL or SmolVLM take.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    target_dir = Path(target_dir)
    target_dir.mkdir(parents=True, exist_ok=True)
    words = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "user", "assistant"]
    words += [w for w in tiny_vocab() if not w.startswith(("[", "##"))]
    vocab = {word: index for index, word in enumerate(dict.fromkeys(words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    backend.decoder = decoders.WordPiece(prefix="##")  # joins word-level tokens with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
    )

    width, patch = 32, 8
    config = LlavaConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": width,
            "intermediate_size": 2 * width,
            "projection_dim": width,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": IMAGE_SIZE,
            "patch_size": patch,
        },
        text_config={
            "model_type": "llama",
            "vocab_size": len(tokenizer),
            "hidden_size": width,
            "intermediate_size": 2 * width,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        model = LlavaForConditionalGeneration(config).eval()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    # CLIP adds a CLS embedding that the "default" strategy drops: one extra token to account for.
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
    model.save_pretrained(target_dir)
    processor.save_pretrained(target_dir)
