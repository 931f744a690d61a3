"""Errors raised by castlora's core. Each message names the file or field at fault and what to do."""


class CastloraError(Exception):
    """Base class for user-facing errors: the message is meant to be read by the person running castlora."""


class PairKeyError(CastloraError, ValueError):
    """A character-pair key or character id is unsafe or unknown."""


class SpecError(CastloraError, ValueError):
    """A pair spec file is malformed."""


class NotEnoughReferencesError(CastloraError):
    """Too few usable reference photos for a character."""


class ModelLoadError(CastloraError):
    """A model id or directory could not be loaded."""


class CaptionError(CastloraError):
    """A captioning backend failed (unreachable endpoint, bad response)."""


class SegmentationError(CastloraError):
    """Segmentation could not run or its inputs (e.g. user masks) are invalid."""


class CheckpointError(CastloraError):
    """A training checkpoint is corrupt, incomplete or was written by a different configuration."""


class StorageError(CastloraError):
    """Remote storage (S3) failed or holds an incomplete folder; the message names endpoint, bucket and key."""


class DataHomeError(CastloraError):
    """The data home (or a folder in it) is not a usable, writable folder."""


class ConfinementError(SpecError):
    """A file an inbox spec names (or a file in a folder it names) lies, or links, outside its pair folder."""


class LayoutError(CastloraError, ValueError):
    """A per-prompt layout (boxes, relative sizes or mode) is invalid; the message names the prompt and box."""
