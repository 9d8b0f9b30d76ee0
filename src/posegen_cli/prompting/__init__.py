"""Prompt stage: Qwen2.5-VL caption of the reference, the text encoder's cleaning, and the subject's token positions."""

from posegen_cli.prompting.clean import clean_prompt, prompt_line
from posegen_cli.prompting.run import PromptResult, TextTokenizer, load_text_tokenizer, run_prompt
from posegen_cli.prompting.tokens import SUBJECT_WORDS, SubjectTokens, locate_subject

__all__ = [
    "SUBJECT_WORDS",
    "PromptResult",
    "SubjectTokens",
    "TextTokenizer",
    "clean_prompt",
    "load_text_tokenizer",
    "locate_subject",
    "prompt_line",
    "run_prompt",
]
