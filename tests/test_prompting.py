"""Prompt cleaning and subject-token lookup (port.md §4.1, §5), and ``run_prompt`` with a given prompt."""

from __future__ import annotations

import dataclasses

import json
import string
from pathlib import Path

import pytest
from tokenizers import pre_tokenizers
from transformers import T5Tokenizer

from posegen_cli.errors import InputError
from posegen_cli import prompting
from posegen_cli.prompting import PromptOptions, TextTokenizer, clean_prompt, locate_subject, prompt_line
from posegen_cli.prompting.tokens import candidate_nouns, find_subject, overlapping_positions, release_choice
from posegen_cli.prompting.umt5 import tokenize as encoder_tokenize
from posegen_cli.report import Reporter
from posegen_cli.testing.tokenizer import make_tiny_tokenizer


def run_prompt(image, out_dir=None, **kwargs):
    """``prompting.run_prompt`` with the :class:`PromptOptions` fields given as keywords beside its own."""
    fields = {f.name for f in dataclasses.fields(PromptOptions)}
    options = PromptOptions(**{k: v for k, v in kwargs.items() if k in fields})
    return prompting.run_prompt(image, out_dir, options, **{k: v for k, v in kwargs.items() if k not in fields})

SP = "\u2581"
WORD_PIECES = [
    "a", "A", "woman", "man", "girl", "boy", "hu", "Wo", "in", "the", "red", "dress", "and", "stands", "next", "to",
    "robot", "photo", "of", "park",
]
INNER_PIECES = ["man", "'s"]


@pytest.fixture(scope="module", params=["whitespace-split", "metaspace-only"])
def tok(request: pytest.FixtureRequest) -> T5Tokenizer:
    """umT5-shaped: Unigram, "▁" word starts, ``</s>`` appended; "Woman" splits into "▁Wo"+"man", "human" into "▁hu"+"man".

    Two pre-tokenizers: transformers 5 builds T5 with whitespace splitting first (piece spans exclude the space); a
    tokenizer.json converted from SentencePiece may have Metaspace alone, where "▁woman" spans the space before it.
    """
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), (SP, -2.0)]
    pieces += [(SP + w, -2.0) for w in WORD_PIECES] + [(p, -3.0) for p in INNER_PIECES]
    chars = string.ascii_letters + string.digits + string.punctuation
    pieces += [(c, -8.0) for c in chars] + [(SP + c, -9.0) for c in chars]
    seen: set[str] = set()
    unique = [(p, s) for p, s in pieces if not (p in seen or seen.add(p))]
    tokenizer = T5Tokenizer(vocab=unique, extra_ids=0, model_max_length=512)
    if request.param == "metaspace-only":
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SP, prepend_scheme="always", split=True)
        assert tokenizer("a woman", return_offsets_mapping=True)["offset_mapping"][1] == (1, 7)
    else:
        assert tokenizer("a woman", return_offsets_mapping=True)["offset_mapping"][1] == (2, 7)
    return tokenizer


def release_lookup(tokenizer: T5Tokenizer, prompt: str) -> tuple[str, int]:
    """The release's rule (generate_prompt.py / inference.py), with its umT5 ids replaced by this tokenizer's "▁word" ids."""
    token_dict = {w: tokenizer.convert_tokens_to_ids(SP + w) for w in ("woman", "girl", "man", "boy")}
    ids = tokenizer(clean_prompt(prompt), padding="max_length", max_length=512, truncation=True).input_ids
    for keyword, token_id in token_dict.items():
        if keyword in prompt:
            return keyword, ids.index(token_id)
    raise RuntimeError("no keyword")


def pieces_at(tokenizer: T5Tokenizer, ids: list[int], positions: list[int]) -> list[str]:
    return tokenizer.convert_ids_to_tokens([ids[i] for i in positions])


# --- cleaning -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("  A woman\n\t in  a   red dress. ", "A woman in a red dress."),
        ("Woman IN Red", "Woman IN Red"),  # no lower-casing
        ("A &amp;amp; B", "A & B"),  # HTML unescaped twice after ftfy
        ("&lt;b&gt; x", "<b> x"),
        ("The Mona Lisa doesnâ€™t have eyebrows.", "The Mona Lisa doesn't have eyebrows."),  # ftfy mojibake fix
        ("ＡＢＣ\u3000woman", "ABC woman"),  # full-width letters and ideographic space
        ("A\u00a0woman\u2028walks", "A woman walks"),
        ("a\x1cb", "ab"),  # control characters removed, not turned into spaces
        ("", ""),
    ],
)
def test_clean_prompt_exact(raw: str, clean: str) -> None:
    assert clean_prompt(raw) == clean


def test_clean_prompt_matches_diffusers_wan_pipeline() -> None:
    """diffusers' Wan pipeline cleans exactly as DiffSynth's WanPrompter (port.md §4.1): an independent implementation."""
    from diffusers.pipelines.wan.pipeline_wan_i2v import prompt_clean

    corpus = [
        "A young woman with long black hair,\nwearing a white dress.\r\n\r\nFull-body shot.",
        "  &amp;lt;tag&amp;gt; &quot;quoted&quot; &#39;single&#39;   ",
        "Ünïcödé — “smart quotes” and ﬁ ligatures\u200b zero-width",
        "色调艳丽，过曝，静态，细节模糊不清，字幕",
        "tabs\tand\x0bvertical\x0cfeeds\x85next-line",
    ]
    for text in corpus:
        assert clean_prompt(text) == prompt_clean(text)


def test_prompt_line_keeps_the_longest_line_like_the_release() -> None:
    assert prompt_line("  A woman in red.  ") == "A woman in red."
    assert prompt_line("Short.\r\nA woman in red stands still.\rTiny\n\nA man in blue sits down.") == "A woman in red stands still."
    # the release's readlines keeps the first of equally long lines
    assert prompt_line("first line\nsecond one") == "first line"


# --- subject word ---------------------------------------------------------------------------------------------------


def test_find_subject_whole_word_case_insensitive() -> None:
    assert find_subject("A human stands next to a Man.") == ("man", 25, 28)
    assert find_subject("A woman's dress.") == ("woman", 2, 7)
    assert find_subject("WOMAN in red") == ("woman", 0, 5)
    # priority order of the release: woman before man even when man comes first
    assert find_subject("A man and a woman.")[0] == "woman"
    with pytest.raises(InputError):
        find_subject("A human postman and many women.")


def test_no_subject_error_lists_nouns_and_the_option() -> None:
    with pytest.raises(InputError) as info:
        find_subject("A realistic photo of a robot in a red jacket standing in a park.")
    message = str(info.value)
    assert "nouns found: photo, robot, jacket, park" in message
    assert "--subject" in message and "\n" not in message


def test_subject_option_must_be_a_whole_word() -> None:
    assert find_subject("A photo of a robot.", "Robot") == ("robot", 13, 18)
    assert find_subject("A young woman walks.", "young woman") == ("young woman", 2, 13)
    with pytest.raises(InputError, match=r"--subject 'bot' is not a whole word of the prompt; nouns found: photo, robot"):
        find_subject("A photo of a robot.", "bot")
    with pytest.raises(InputError, match="empty"):
        find_subject("A photo.", " ")


def test_candidate_nouns() -> None:
    assert candidate_nouns("An anime illustration of the girl with a blue umbrella, the building behind.") == [
        "illustration", "girl", "umbrella", "building"
    ]
    assert candidate_nouns("no articles here") == []


# --- token positions ------------------------------------------------------------------------------------------------


def test_overlap_rule_skips_specials_and_a_lone_space_piece() -> None:
    offsets = [(0, 2), (2, 5), (5, 6), (6, 7), (7, 12), (0, 0), (0, 0)]
    special = [0, 0, 0, 0, 0, 1, 1]
    assert overlapping_positions(offsets, special, 0, 5) == [0, 1]
    assert overlapping_positions(offsets, special, 7, 12) == [4]  # (5,6) is the "▁" of the space before
    assert overlapping_positions(offsets, special, 6, 12) == [3, 4]
    assert overlapping_positions([(6, 12), (12, 13)], [0, 0], 7, 12) == [0]  # "▁woman" spanning its leading space


def test_single_piece_word(tok: T5Tokenizer) -> None:
    found = locate_subject(tok, "A woman in a red dress.")
    assert found.word == "woman" and found.positions == [1]
    assert pieces_at(tok, found.input_ids, found.positions) == [SP + "woman"]
    assert len(found.input_ids) == 512 and found.input_ids[found.input_ids.index(tok.eos_token_id) + 1] == tok.pad_token_id


def test_capitalised_word_is_split_into_pieces(tok: T5Tokenizer) -> None:
    found = locate_subject(tok, "Woman in a red dress.")
    assert found.positions == [0, 1]
    assert pieces_at(tok, found.input_ids, found.positions) == [SP + "Wo", "man"]


@pytest.mark.parametrize(
    ("prompt", "pieces"),
    [
        ("The woman, in red.", [SP + "woman"]),
        ("The woman's dress.", [SP + "woman"]),
        ("the woman.", [SP + "woman"]),
        ("(woman)", ["w", "o", "man"]),  # "(" takes the "▁", so the word is spelled in inner pieces
    ],
)
def test_punctuation_and_possessive_are_not_part_of_the_word(tok: T5Tokenizer, prompt: str, pieces: list[str]) -> None:
    found = locate_subject(tok, prompt)
    assert pieces_at(tok, found.input_ids, found.positions) == pieces


def test_repeated_word_gives_the_first_occurrence(tok: T5Tokenizer) -> None:
    found = locate_subject(tok, "A woman and the woman and a woman.")
    assert found.positions == [1]


def test_human_does_not_match_man(tok: T5Tokenizer) -> None:
    found = locate_subject(tok, "A human stands next to a man.")
    assert found.word == "man"
    assert pieces_at(tok, found.input_ids, found.positions) == [SP + "man"]
    ids = found.input_ids
    assert ids.index(tok.convert_tokens_to_ids("man")) < found.positions[0]  # "hu"+"man" comes first and is skipped
    with pytest.raises(InputError, match="nouns found: human"):
        locate_subject(tok, "A human in the park.")


def test_cleaning_happens_before_lookup(tok: T5Tokenizer) -> None:
    found = locate_subject(tok, "  A&amp;amp;B\n\n the   woman")
    assert pieces_at(tok, found.input_ids, found.positions) == [SP + "woman"]
    assert (found.start, found.end) == (8, 13)  # in "A&B the woman"


@pytest.mark.parametrize(
    "prompt",
    [
        "A woman in a red dress stands next to the park.",
        "A girl and a boy.",
        "The man and the woman.",
        "A human and a man.",
        "A woman, a woman's dress, and a woman.",
        "the boy stands.\n",
        "A photo of a girl in the park, the girl stands next to a robot.",
    ],
)
def test_same_position_as_the_release_for_its_four_words(tok: T5Tokenizer, prompt: str) -> None:
    keyword, position = release_lookup(tok, prompt)
    found = locate_subject(tok, prompt)
    assert found.word == keyword
    assert found.positions == [position]
    assert release_choice(tok, found.input_ids, prompt) == (keyword, position)


def test_first_whole_word_wins_over_the_releases_lower_case_rule(tok: T5Tokenizer) -> None:
    prompt = "Woman stands. A woman."
    _, release = release_lookup(tok, prompt)
    found = locate_subject(tok, prompt)
    assert found.positions == [0, 1] and release > 1
    assert release_choice(tok, found.input_ids, prompt) == ("woman", release)


def test_ids_are_the_text_encoders_ids() -> None:
    """The lookup tokenizes exactly as the text encoder's tokenizer call (pipelines.text.tokenize)."""
    tiny = make_tiny_tokenizer()
    prompt = "  A woman with long black hair &amp;amp; a red dress,\n dancing in the street. "
    found = locate_subject(tiny, prompt)
    ids, mask = encoder_tokenize(tiny, prompt)
    assert found.input_ids == ids[0].tolist()
    assert found.positions == [1] and int(mask.sum()) > found.positions[0]


def test_subject_past_the_token_limit(tok: T5Tokenizer) -> None:
    prompt = "the " * 520 + "woman"
    with pytest.raises(InputError, match="past the 512-token limit"):
        locate_subject(tok, prompt)
    found = locate_subject(tok, "the " * 510 + "woman")
    assert found.positions == [510]  # the last slot before </s>


def test_non_fast_tokenizer_is_refused() -> None:
    class Slow:
        is_fast = False

    with pytest.raises(InputError, match="offsets"):
        locate_subject(Slow(), "a woman")  # type: ignore[arg-type]


# --- run_prompt with a given prompt ---------------------------------------------------------------------------------


def test_run_prompt_with_given_prompt_writes_both_files(tmp_path: Path, tok: T5Tokenizer, reference_image_path: Path) -> None:
    out = tmp_path / "out"
    result = run_prompt(
        reference_image_path, out, prompt="A woman\nin a red dress &amp;amp; the robot.\n", subject="robot",
        tokenizer=TextTokenizer(tok, "tiny-t5", "test-rev"), reporter=Reporter(quiet=True),
    )
    assert result.prompt == "in a red dress &amp;amp; the robot."  # the longest line, as the release reads prompt files
    assert (result.subject, result.cached, result.captioned) == ("robot", False, False)
    assert result.prompt_txt == out / "prompt.txt" and result.prompt_json == out / "prompt.json"
    assert (out / "prompt.txt").read_text(encoding="utf-8") == result.prompt + "\n"
    record = json.loads((out / "prompt.json").read_text(encoding="utf-8"))
    assert record["encoder_text"] == "in a red dress & the robot."
    assert record["subject"] == "robot" and record["token_positions"] == result.token_positions
    assert pieces_at(tok, record["input_ids"], record["token_positions"]) == [SP + "robot"]
    assert record["encoder_text"][slice(*record["subject_span"])] == "robot"
    assert record["tokenizer"] == {"name": "tiny-t5", "revision": "test-rev"}
    assert record["caption"] is None
    assert sorted(p.name for p in out.iterdir()) == ["prompt.json", "prompt.txt"]  # no temporary files left
    assert set(result.summary()) >= {"prompt", "subject", "token_positions", "prompt_txt", "prompt_json", "cached"}


def test_run_prompt_default_folder_and_errors(tmp_path: Path, tok: T5Tokenizer, reference_image_path: Path) -> None:
    image = tmp_path / "me.png"
    image.write_bytes(reference_image_path.read_bytes())
    result = run_prompt(image, prompt="A girl.", tokenizer=TextTokenizer(tok, "t", "r"))
    assert result.prompt_json == tmp_path / "me_prompt" / "prompt.json" and result.token_positions == [1]
    with pytest.raises(InputError, match="reference image not found"):
        run_prompt(tmp_path / "nope.png", prompt="A girl.", tokenizer=TextTokenizer(tok, "t", "r"))
    with pytest.raises(InputError, match="nouns found: photo"):
        run_prompt(image, tmp_path / "x", prompt="A photo.", tokenizer=TextTokenizer(tok, "t", "r"))
    with pytest.raises(InputError, match="--prompt is empty"):
        run_prompt(image, tmp_path / "x", prompt=" \n ", tokenizer=TextTokenizer(tok, "t", "r"))
    assert not (tmp_path / "x").exists()


# --- the command line, offline, with a tokenizer folder laid out as the Wan repository ------------------------------


def test_cli_prompt_with_local_wan_tokenizer(tmp_path: Path, reference_image_path: Path) -> None:
    from typer.testing import CliRunner

    from posegen_cli.cli import app
    from posegen_cli.prompting.run import folder_revision

    wan = tmp_path / "models" / "wan-i2v-720p"
    make_tiny_tokenizer().save_pretrained(str(wan / "tokenizer"))
    (wan / "model_index.json").write_text("{}", encoding="utf-8")
    out = tmp_path / "out"
    args = ["prompt", str(reference_image_path), "--prompt", "A woman dancing in the street.", "-o", str(out),
            "--models-dir", str(tmp_path / "models"), "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["subject"] == "woman" and summary["token_positions"] == [1] and summary["captioned"] is False
    record = json.loads((out / "prompt.json").read_text(encoding="utf-8"))
    assert record["tokenizer"] == {
        "name": "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers/tokenizer", "revision": folder_revision(wan / "tokenizer")
    }
    assert record["tokenizer"]["revision"].startswith("sha256:")

    no_subject = CliRunner().invoke(app, [*args[:3], "A photo of a robot.", *args[4:]])
    assert no_subject.exit_code == 2
    assert "nouns found: photo, robot" in no_subject.stderr and "--subject" in no_subject.stderr


def test_cli_prompt_without_the_tokenizer_is_a_missing_model(tmp_path: Path, reference_image_path: Path) -> None:
    from typer.testing import CliRunner

    from posegen_cli.cli import app

    result = CliRunner().invoke(
        app, ["prompt", str(reference_image_path), "--prompt", "A woman.", "--models-dir", str(tmp_path)]
    )
    assert result.exit_code == 3
    assert "wan-i2v-720p" in result.stderr and len([l for l in result.stderr.splitlines() if l.strip()]) == 1


def test_folder_revision_of_a_hub_snapshot(tmp_path: Path) -> None:
    from posegen_cli.prompting.run import folder_revision

    snapshot = tmp_path / "models--Wan-AI--x" / "snapshots" / ("ab" * 20) / "tokenizer"
    snapshot.mkdir(parents=True)
    assert folder_revision(snapshot) == "ab" * 20
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "tokenizer.json").write_text("{}", encoding="utf-8")
    first = folder_revision(plain)
    (plain / "tokenizer.json").write_text('{"a": 1}', encoding="utf-8")
    assert folder_revision(plain) != first


def test_run_prompt_warns_where_the_release_would_read_another_token(
    tmp_path: Path, tok: T5Tokenizer, reference_image_path: Path
) -> None:
    import io

    from rich.console import Console

    stream = io.StringIO()
    reporter = Reporter(console=Console(file=stream, width=400))
    result = run_prompt(reference_image_path, tmp_path, prompt="Woman stands. A woman.", tokenizer=TextTokenizer(tok, "t", "r"),
                        reporter=reporter)
    assert result.token_positions == [0, 1]
    _, release = release_lookup(tok, "Woman stands. A woman.")
    assert f"the release would read token {release} for 'woman'" in stream.getvalue()
    stream.truncate(0)
    run_prompt(reference_image_path, tmp_path, prompt="A woman stands.", tokenizer=TextTokenizer(tok, "t", "r"), reporter=reporter)
    assert "warning" not in stream.getvalue() and "subject 'woman' at token positions [1]" in stream.getvalue()


def test_run_prompt_warns_where_the_release_picks_another_word(
    tmp_path: Path, tok: T5Tokenizer, reference_image_path: Path
) -> None:
    """The release picks "man" inside "Woman" (case-sensitive substring, before any whole word) and reads "▁man"."""
    import io

    from rich.console import Console

    stream = io.StringIO()
    reporter = Reporter(console=Console(file=stream, width=400))
    prompt = "Woman stands next to a man."
    result = run_prompt(reference_image_path, tmp_path, prompt=prompt, tokenizer=TextTokenizer(tok, "t", "r"), reporter=reporter)
    assert (result.subject, result.token_positions) == ("woman", [0, 1])
    keyword, release = release_lookup(tok, prompt)
    assert keyword == "man" and release > 1
    assert f"the release would read token {release} for 'man'" in stream.getvalue()
    stream.truncate(0)
    stream.seek(0)
    run_prompt(reference_image_path, tmp_path, prompt="Woman stands.", tokenizer=TextTokenizer(tok, "t", "r"), reporter=reporter)
    assert "the release would stop" in stream.getvalue()  # it looks for "▁man" and crashes


def test_release_choice_follows_its_substring_rule(tok: T5Tokenizer) -> None:
    def ids(prompt: str) -> list[int]:
        return tok(clean_prompt(prompt), padding="max_length", max_length=512, truncation=True).input_ids

    prompt = "Woman stands next to a man."
    assert release_choice(tok, ids(prompt), prompt) == release_lookup(tok, prompt) == ("man", 6)
    assert release_choice(tok, ids("A human robot."), "A human robot.") == ("man", None)  # "▁man" absent: it crashed
    assert release_choice(tok, ids("A photo of a robot."), "A photo of a robot.") is None  # no keyword: it asked for an edit
