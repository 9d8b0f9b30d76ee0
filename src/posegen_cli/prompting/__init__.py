"""Prompt stage: Qwen2.5-VL caption of the reference, the text encoder's cleaning, and the subject's token positions."""

from posegen_cli.prompting.clean import prompt_line
from posegen_cli.prompting.run import PromptOptions, PromptResult, TextTokenizer, load_text_tokenizer, run_prompt
from posegen_cli.prompting.tokens import SUBJECT_WORDS, SubjectTokens, locate_subject
from posegen_cli.prompting.umt5 import TEXT_LEN, clean_prompt, load_tokenizer, tokenize

__all__ = [
    "SUBJECT_WORDS",
    "TEXT_LEN",
    "PromptOptions",
    "PromptResult",
    "SubjectTokens",
    "TextTokenizer",
    "clean_prompt",
    "load_text_tokenizer",
    "load_tokenizer",
    "locate_subject",
    "prompt_line",
    "run_prompt",
    "tokenize",
]
