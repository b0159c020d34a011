"""The errors minidiff raises for bad input, each a subclass of the built-in error a caller would catch anyway.

Every one of them is raised before any denoising step (or, for NonFiniteError, at the first step that goes
wrong) and its message names the file, key or argument that is wrong and what would be right:

    MinidiffError                      base of all of them
      FileFormatError(ValueError)      a file that is truncated, corrupt, malformed or hostile
        PickleRefusedError             a pickle checkpoint read without allow_pickle=True
        UnsafePathError                a path named by a file leaves the repo folder
        ConfigError                    a config.json value of the wrong type or out of range
        TokenizerFileError             a vocab.json / merges.txt / tokenizer.json that does not parse
        LoRAFileError                  a LoRA file that does not fit the pipeline
      ArgumentError(ValueError)        a bad argument to a pipeline call, a loader or the CLI
        ArgumentTypeError(TypeError)   ... of the wrong type
        TooLargeError                  a size or step count that cannot fit in memory (with the estimate)
      NonFiniteError(FloatingPointError)  latents or images became NaN/inf (model, step and likely cause named)
      OutputFileError(OSError)         the output file cannot be written, or would replace a file

FileNotFoundError (a file that is not there) keeps its built-in type.
"""


class MinidiffError(Exception):
    """Base of the documented errors."""


class FileFormatError(MinidiffError, ValueError):
    """A file that is truncated, corrupt, malformed, or not what its name says."""


class PickleRefusedError(FileFormatError):
    """A pickle checkpoint (which can run code when loaded) without allow_pickle=True."""


class UnsafePathError(FileFormatError):
    """A path named inside a file (a shard index, model_index.json) that leaves the repo folder."""


class ConfigError(FileFormatError):
    """A config value of the wrong type, out of range, or not matching the weights."""


class TokenizerFileError(FileFormatError):
    """A tokenizer file that does not parse or does not fit the text encoder."""


class LoRAFileError(FileFormatError):
    """A LoRA file whose keys, shapes or metadata do not fit."""


class ArgumentError(MinidiffError, ValueError):
    """A bad argument value."""


class ArgumentTypeError(ArgumentError, TypeError):
    """An argument of the wrong type."""


class TooLargeError(ArgumentError):
    """A request that cannot fit in memory; the message gives the estimate."""


class NonFiniteError(MinidiffError, FloatingPointError):
    """Latents or images that stopped being finite."""


class OutputFileError(MinidiffError, OSError):
    """An output file that cannot be written safely."""


__all__ = ["MinidiffError", "FileFormatError", "PickleRefusedError", "UnsafePathError", "ConfigError",
           "TokenizerFileError", "LoRAFileError", "ArgumentError", "ArgumentTypeError", "TooLargeError",
           "NonFiniteError", "OutputFileError"]
