"""apply_token_phrase: the rare-token phrase replaces the first class-noun mention, exactly once."""

from __future__ import annotations

import pytest

from pipeline.captions import apply_token_phrase


@pytest.mark.parametrize(
    ("caption", "class_noun", "token_phrase", "expected"),
    [
        ("a dog on grass", "dog", "olis dog", "a olis dog on grass"),
        ("The dog sits on a red sofa.", "dog", "olis dog", "The olis dog sits on a red sofa."),
        ("Dog lying in the snow", "dog", "olis dog", "olis dog lying in the snow"),
        ("A DOG near a tree", "dog", "olis dog", "A olis dog near a tree"),
        # Only the first mention is replaced.
        ("a dog looks at another dog", "dog", "olis dog", "a olis dog looks at another dog"),
        # Plurals: the token phrase stays singular (it names one subject).
        ("two dogs playing in a park", "dog", "olis dog", "two olis dog playing in a park"),
        ("puppies on a bed", "puppy", "sks puppy", "sks puppy on a bed"),
        ("women walking by the sea", "woman", "ohwx woman", "ohwx woman walking by the sea"),
        # Word boundaries: "hotdog" and "dog-shaped" are not mentions of the dog.
        (
            "a hotdog and a dog-shaped cloud above a dog",
            "dog",
            "olis dog",
            "a hotdog and a dog-shaped cloud above a olis dog",
        ),
        # Multi-word class nouns, including the head-noun fallback.
        ("a small toy robot on a desk", "toy robot", "olis toy robot", "a small olis toy robot on a desk"),
        ("a Toy-Robot on a shelf", "toy robot", "olis toy robot", "a olis toy robot on a shelf"),
        ("a silver robot on a desk", "toy robot", "olis toy robot", "a silver olis toy robot on a desk"),
        # The token phrase's own words are not duplicated around the mention.
        ("a toy robot on a desk", "robot", "olis toy robot", "a olis toy robot on a desk"),
        ("a toy robot, on a desk", "toy", "olis toy robot", "a olis toy robot, on a desk"),
        # No mention: prefix.
        (
            "a sunny beach with palm trees",
            "dog",
            "olis dog",
            "a photo of olis dog, a sunny beach with palm trees",
        ),
        ("", "dog", "olis dog", "a photo of olis dog"),
        # Whitespace is normalised.
        ("  a   dog\non grass ", "dog", "olis dog", "a olis dog on grass"),
    ],
)
def test_apply_token_phrase(caption: str, class_noun: str, token_phrase: str, expected: str) -> None:
    assert apply_token_phrase(caption, class_noun, token_phrase) == expected


@pytest.mark.parametrize(
    ("caption", "class_noun", "token_phrase"),
    [
        ("a dog on grass", "dog", "olis dog"),
        ("Two dogs in a park", "dog", "olis dog"),
        ("a small toy robot on a desk", "toy robot", "olis toy robot"),
        ("a cat on a sofa", "dog", "olis dog"),
        ("a dog next to a dog", "dog", "sks"),
    ],
)
def test_apply_token_phrase_is_idempotent(caption: str, class_noun: str, token_phrase: str) -> None:
    once = apply_token_phrase(caption, class_noun, token_phrase)
    twice = apply_token_phrase(once, class_noun, token_phrase)
    assert twice == once
    assert once.lower().count(token_phrase.lower()) == 1


def test_caption_already_holding_the_phrase_is_unchanged() -> None:
    caption = "The Olis Dog runs across the dog park"
    assert apply_token_phrase(caption, "dog", "olis dog") == caption


def test_token_phrase_without_class_noun_replaces_the_mention() -> None:
    assert apply_token_phrase("a dog on grass", "dog", "sks") == "a sks on grass"
